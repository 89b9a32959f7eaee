"""The exact Gaussian posterior of a linear-Gaussian model: with it, maximising the ELBO is EM.

For z ~ N(0, I), x | z ~ N(W z + mu, Psi) the posterior is Gaussian and known in closed
form (LG-POST):

    q_d(z) = p(z | x_d; theta~) = N(m_d, S),   S = (I + W^T Psi^-1 W)^-1,
                                               m_d = S W^T Psi^-1 (x_d - mu)

As with :class:`~elbolab.guides.ExactPosterior` for discrete latents, :meth:`refresh` is
the E-step: it freezes theta~ := theta and caches (m, S) for the data; until the next
refresh the guide answers from theta~, whatever the M-step does to the model. As a Pyro
program it samples ``"z"`` from N(m_d, S) inside the model's data plate, so any Pyro ELBO
can be evaluated with it (``TraceMeanField_ELBO`` uses the closed-form KL registered
below).
"""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch.distributions import Independent, MultivariateNormal, Normal, register_kl

from ..models.linear_gaussian import LinearGaussian, gaussian_bound


class ExactGaussianPosterior(PyroModule):
    """q_d(z) = p(z | x_d; theta~) for a :class:`~elbolab.models.PPCA` or factor analysis.

    Call it exactly like the model: ``guide(x)``.
    """

    def __init__(self, model: LinearGaussian) -> None:
        if not isinstance(model, LinearGaussian):
            raise ValueError(
                f"ExactGaussianPosterior needs a linear-Gaussian model (PPCA, FactorAnalysis), "
                f"got {type(model).__name__}; for discrete latents use ExactPosterior, for "
                "other continuous ones AmortizedNormal."
            )
        super().__init__()
        self._model_ref = (model,)  # a tuple keeps the model out of this module's parameters
        self._frozen: tuple = ()  # (frozen copy of the model holding theta~,) or ()
        self._cache: tuple | None = None  # (key, m (N, k), S (k, k))

    @property
    def model(self) -> LinearGaussian:
        return self._model_ref[0]

    @property
    def twin(self) -> LinearGaussian | None:
        """The frozen copy of the model holding theta~, or None before :meth:`refresh`."""
        return self._frozen[0] if self._frozen else None

    @property
    def frozen(self) -> bool:
        return bool(self._frozen)

    # ------------------------------------------------------------------ E-step
    @torch.no_grad()
    def refresh(self, x=None, sample_weight=None) -> ExactGaussianPosterior:
        """E-step: theta~ := theta; with ``x``, compute and cache q for it (weights do not
        change a posterior; they are taken for the signature of the other guides)."""
        model, twin = self.model, self.twin
        if twin is None or twin.dtype != model.dtype:
            twin = copy.deepcopy(model)
            twin.requires_grad_(False)
            self._frozen = (twin,)
        else:
            twin.load_state_dict(model.state_dict())
        self._cache = None
        if x is not None:
            loc, cov = twin.posterior(x)
            self._cache = (self._key(x), loc, cov)
        return self

    def release(self) -> ExactGaussianPosterior:
        """Drop theta~: the guide follows the live model again."""
        self._frozen, self._cache = (), None
        return self

    @staticmethod
    def _key(x) -> tuple:
        # the same memory, layout and version: a detached or re-validated view still hits
        if isinstance(x, torch.Tensor):
            return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version)
        return (id(x),)

    @torch.no_grad()
    def posterior(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """(m (N, k), S (k, k)) of q for ``x`` (cached after :meth:`refresh` with ``x``)."""
        if self._cache is not None and self._cache[0] == self._key(x):
            return self._cache[1], self._cache[2]
        return (self.twin if self.frozen else self.model).posterior(x)

    def bound(self, x) -> torch.Tensor:
        """LB(q, theta) per sample in closed form at the *live* model's theta, shape (N,).

        Right after :meth:`refresh` this is log p(x_d) (EM-TIGHT); after an M-step it is
        the bound the M-step maximised.
        """
        x = self.model.validate_data(x)
        loc, cov = self.posterior(x)
        return gaussian_bound(self.model, x, loc, cov)

    # ------------------------------------------------------------------ the Pyro program
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        loc, cov = self.posterior(x)
        scale_tril = torch.linalg.cholesky(cov)
        with pyro.plate("data", x.shape[0], dim=-1):
            return pyro.sample(
                self.model.latent_site, dist.MultivariateNormal(loc, scale_tril=scale_tril)
            )


@register_kl(MultivariateNormal, Independent)
def _kl_mvn_diagonal_normal(p: MultivariateNormal, q: Independent) -> torch.Tensor:
    """KL(N(m, S) || N(mu, diag s^2)) = 1/2 [tr(D^-1 S) + (mu - m)^T D^-1 (mu - m) - k
    + log det D - log det S], D = diag(s^2): the guide against the model's N(0, I) prior."""
    if not isinstance(q.base_dist, Normal) or q.reinterpreted_batch_ndims != 1:
        raise NotImplementedError
    var = q.base_dist.scale.square()
    k = p.event_shape[-1]
    trace = (torch.diagonal(p.covariance_matrix, dim1=-2, dim2=-1) / var).sum(-1)
    mahalanobis = ((q.base_dist.loc - p.loc).square() / var).sum(-1)
    log_det_p = 2 * torch.diagonal(p.scale_tril, dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + mahalanobis - k + var.log().sum(-1) - log_det_p)
