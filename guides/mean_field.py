"""The mean-field guide q(z) q(pi) prod_k q(mu_k, Lambda_k): with it, the EM loop is VB (CAVI).

For :class:`~elbolab.models.BayesianGaussianMixture` (PRML section 10.2, VI-MF):

    q(pi)              = Dir(alpha)  or  prod_k Beta(v_k | a_k, b_k)   (the sticks)
    q(mu_k, Lambda_k)  = N(mu_k | m_k, (beta_k Lambda_k)^-1) W(Lambda_k | W_k, nu_k)
    q(z_d)             = Categorical(r_d),  r_dk proportional to rho_dk            (VB-Z)

    ln rho_dk = E[ln pi_k] + 1/2 E[ln |Lambda_k|] - D/2 ln 2 pi - D / (2 beta_k)
                - nu_k / 2 (x_d - m_k)^T W_k (x_d - m_k)       (PRML (10.46), (10.64)-(10.67))

ln rho_dk is, for every d, ln w~_k + ln N(x_d | m_k, W_k^-1 / nu_k) with

    ln w~_k = E[ln pi_k] + 1/2 sum_i psi((nu_k + 1 - i) / 2) + D/2 ln(2 / nu_k) - D / (2 beta_k),

so VB-Z is EM-MIX.1 for a plug-in Gaussian mixture with weights w~ / sum w~, means m_k and
covariances W_k^-1 / nu_k (scikit-learn's ``covariances_``), up to ln sum_k w~_k per point.
The guide keeps that plug-in and its :class:`~elbolab.guides.ExactPosterior`, so the E-step
is the one EM runs, Pyro's enumeration included, and the sums it returns are EM's
(VB-THETA reads them: :mod:`elbolab.inference.em.variational`).

q(theta)'s parameters are buffers of this module (``state_dict`` saves them); the
``covariance_type`` restricts W_k (diagonal, a multiple of I, or one (W, nu) shared). The
guide is a Pyro program with the model's signature, so ``pyro.infer.Trace_ELBO().loss(model,
guide, x)`` estimates the same bound (VB-ELBO) that :meth:`MeanFieldPosterior.elbo` computes
in closed form.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from ..models.base import NotFittedError
from ..models.conjugate import (
    BayesianGaussianMixture,
    expected_log_weights,
    kl_normal_wishart,
    kl_weights,
    link_posterior,
    stick_weights,
    wishart_sample,
)
from ..models.gaussian import GaussianMixture
from .exact import ExactPosterior

#: the buffers holding q(theta), in the order :meth:`MeanFieldPosterior.set_q` takes them
Q_NAMES = (
    "weight_concentration",
    "mean_precision",
    "means",
    "degrees_of_freedom",
    "precision_scale",
)


class MeanFieldPosterior(PyroModule):
    """q(z) q(pi) prod_k q(mu_k, Lambda_k) for a :class:`~elbolab.models.BayesianGaussianMixture`.

    Parameters
    ----------
    model:
        The conjugate mixture it approximates the posterior of.

    Fitted attributes (scikit-learn's names and layouts): ``weight_concentration_``
    (alpha (K,), or the sticks' ``(a, b)``), ``mean_precision_`` beta (K,), ``means_`` m
    (K, D), ``degrees_of_freedom_`` nu (K,) (``"tied"``: one value), ``covariances_``
    W_k^-1 / nu_k ((K, D, D) full, (D, D) tied, (K, D) diag, (K,) spherical),
    ``precisions_``, ``weights_`` E_q[pi] (normalised under the Dirichlet process, as
    scikit-learn does).
    """

    def __init__(self, model: BayesianGaussianMixture) -> None:
        if not isinstance(model, BayesianGaussianMixture):
            raise ValueError(
                f"MeanFieldPosterior approximates the posterior of a BayesianGaussianMixture, "
                f"got {type(model).__name__}; for a mixture with point parameters use "
                "ExactPosterior(model)"
            )
        super().__init__()
        self._model_ref = (model,)  # a tuple keeps the model out of the state_dict
        self._plugin: tuple = ()  # (GaussianMixture, ExactPosterior) once built
        link_posterior(model, self)

    @property
    def model(self) -> BayesianGaussianMixture:
        return self._model_ref[0]

    # ------------------------------------------------------------------ q(theta)
    @property
    def is_built(self) -> bool:
        return "means" in self._buffers

    def _require_built(self) -> None:
        if not self.is_built:
            raise NotFittedError(
                "this MeanFieldPosterior has no q(theta) yet: fit it with "
                "elbolab.inference.EM(model, guide).fit(x)"
            )

    def build(self) -> MeanFieldPosterior:
        """Allocate q(theta) for the model's K, D and dtype (values set by the first M-step)."""
        model = self.model
        model._require_built()
        K, D, dtype = model.n_components, model.n_features_in_, model.dtype
        dp = model.weight_concentration_prior_type == "dirichlet_process"
        self.register_buffer(
            "weight_concentration", torch.ones((2, K) if dp else (K,), dtype=dtype)
        )
        self.register_buffer("mean_precision", torch.ones(K, dtype=dtype))
        self.register_buffer("means", torch.zeros(K, D, dtype=dtype))
        self.register_buffer("degrees_of_freedom", torch.full((K,), float(D), dtype=dtype))
        self.register_buffer("precision_scale", torch.eye(D, dtype=dtype).repeat(K, 1, 1))
        plugin = GaussianMixture(K, model.covariance_type).build(D, dtype)
        self._plugin = (plugin, ExactPosterior(plugin))
        return self

    def unbuild(self) -> MeanFieldPosterior:
        for name in Q_NAMES:
            self._buffers.pop(name, None)
        self._plugin = ()
        return self

    def set_q(self, **q: torch.Tensor) -> None:
        """Set q(theta) (entries of ``Q_NAMES``), then the plug-in mixture VB-Z reads."""
        for name, value in q.items():
            self._buffers[name].copy_(value)
        self.sync()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.is_built:
            self.sync()
        return out

    @property
    def plugin(self) -> GaussianMixture:
        """The Gaussian mixture whose exact posterior is VB-Z's q(z)."""
        self._require_built()
        return self._plugin[0]

    @property
    def exact(self) -> ExactPosterior:
        """The plug-in's exact posterior (the E-step EM runs)."""
        self._require_built()
        return self._plugin[1]

    @torch.no_grad()
    def sync(self) -> None:
        """Plug-in weights w~ / sum w~, means m_k and covariances W_k^-1 / nu_k from q(theta)."""
        from ..inference.em.mixture import write_param  # (inference imports the guides)

        plugin, kind = self.plugin, self.model.covariance_type
        nu = self.degrees_of_freedom
        write_param(plugin, "weights", self.log_weights_tilde().log_softmax(0), unconstrained=True)
        write_param(plugin, "means", self.means, unconstrained=True)
        if kind in ("full", "tied"):
            chol = torch.linalg.cholesky(self.precision_scale)  # of Psi_k = W_k^-1
            log_diag = chol.diagonal(dim1=-2, dim2=-1).log() - 0.5 * nu.log().unsqueeze(-1)
            tril = chol.tril(-1) / nu.sqrt()[:, None, None] + log_diag.diag_embed()
            write_param(plugin, "scale_tril", tril if kind == "full" else tril[0], True)
        else:
            var = self.precision_scale.diagonal(dim1=-2, dim2=-1) / nu.unsqueeze(-1)
            var = var if kind == "diag" else var[:, 0]
            write_param(plugin, "scales", 0.5 * var.log(), unconstrained=True)

    def expected_log_weights(self) -> torch.Tensor:
        """E_q[ln pi_k], shape (K,)."""
        self._require_built()
        return expected_log_weights(
            self.model.weight_concentration_prior_type, self.weight_concentration
        )

    def log_weights_tilde(self) -> torch.Tensor:
        """ln w~_k (K,): ln rho_dk - ln N(x_d | m_k, W_k^-1 / nu_k), the same for every d."""
        D, nu, beta = self.model.n_features_in_, self.degrees_of_freedom, self.mean_precision
        i = torch.arange(D, dtype=nu.dtype)
        half_digamma = 0.5 * torch.digamma(0.5 * (nu.unsqueeze(-1) - i)).sum(-1)
        return (
            self.expected_log_weights()
            + half_digamma
            + 0.5 * D * (math.log(2) - nu.log())
            - 0.5 * D / beta
        )

    def kl(self) -> torch.Tensor:
        """KL(q(theta) || p(theta)) = KL of the weights + sum_k KL of (mu_k, Lambda_k) (0-d)."""
        self._require_built()
        model = self.model
        kl_pi = kl_weights(
            model.weight_concentration_prior_type,
            self.weight_concentration,
            model.weight_concentration_prior_,
        )
        kl_theta = kl_normal_wishart(
            self.mean_precision,
            self.means,
            self.precision_scale,
            self.degrees_of_freedom,
            model.mean_precision_prior_,
            model.mean_prior_,
            model.precision_scale_prior_,
            model.degrees_of_freedom_prior_,
        )
        return kl_pi + kl_theta.sum()

    # ------------------------------------------------------------------ q(z) (VB-Z)
    @torch.no_grad()
    def refresh(self, *args, **kwargs) -> MeanFieldPosterior:
        """The E-step's q(z) at the current q(theta) (the plug-in's exact posterior)."""
        self.sync()
        self.exact.refresh(*args, **kwargs)
        return self

    @torch.no_grad()
    def predict_proba(self, x) -> torch.Tensor:
        """q(z_d = k) = r_dk (VB-Z), shape (N, K)."""
        return self.plugin.predict_proba(self.model.validate_data(x))

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        """The component of largest r_dk for each row, shape (N,)."""
        return self.predict_proba(x).argmax(-1)

    @torch.no_grad()
    def log_rho_normalizer(self, x) -> torch.Tensor:
        """ln sum_k rho_dk, shape (N,): the bound's per-point term at the optimal q(z_d)."""
        x = self.model.validate_data(x)
        return self.plugin.log_likelihood(x) + self.log_weights_tilde().logsumexp(0)

    @torch.no_grad()
    def elbo(self, x, sample_weight=None) -> float:
        """VB-ELBO at q(z) = VB-Z's for the current q(theta), summed over the data:

        sum_d w_d ln sum_k rho_dk - KL(q(theta) || p(theta)) (every term of PRML (10.70)-(10.77)).

        ``sample_weight``: relative weights, as EM reads them: put to mean 1 (w_d N / sum w),
        so that unit weights count each row once."""
        per_point = self.log_rho_normalizer(x)
        if sample_weight is not None:
            w = torch.as_tensor(sample_weight, dtype=per_point.dtype)
            per_point = per_point * w * (w.numel() / w.sum())
        return float(per_point.sum() - self.kl())

    # ------------------------------------------------------------------ the Pyro program
    def forward(self, x: torch.Tensor, sample_weight: torch.Tensor | None = None):
        """Draws pi (or the sticks), Lambda_k, mu_k and z_d from q, at the model's sites."""
        self._require_built()
        model = self.model
        K = model.n_components
        if model.weight_concentration_prior_type == "dirichlet_process":
            a, b = self.weight_concentration
            with pyro.plate("stick_plate", K):
                pyro.sample("sticks", dist.Beta(a, b))
        else:
            pyro.sample("weights", dist.Dirichlet(self.weight_concentration))
        scale = torch.cholesky_inverse(torch.linalg.cholesky(self.precision_scale))  # W_k
        with pyro.plate("components", K):
            precisions = pyro.sample(
                "precisions", dist.Wishart(self.degrees_of_freedom, covariance_matrix=scale)
            )
            pyro.sample(
                "means",
                dist.MultivariateNormal(
                    self.means, precision_matrix=self.mean_precision[:, None, None] * precisions
                ),
            )
        with torch.no_grad():
            resp = self.plugin.predict_proba(x)  # (N, K), VB-Z at the current q(theta)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=1.0 if sample_weight is None else sample_weight):
                pyro.sample(model.latent_site, dist.Categorical(probs=resp))

    @torch.no_grad()
    def draw(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` draws of theta from q: ``weights`` (n, K), ``means`` (n, K, D) and
        ``covariances`` Lambda_k^-1 (n, K, D, D). Under the Dirichlet process the weights
        are the sticks' pi_k, put to sum 1 over the K components."""
        self._require_built()
        c = self.weight_concentration
        if c.dim() == 1:
            weights = dist.Dirichlet(c).sample((n,))
        else:
            v = dist.Beta(c[0], c[1]).sample((n,))
            left = torch.cumprod(1 - v, -1)
            weights = v * torch.cat([torch.ones_like(v[:, :1]), left[:, :-1]], -1)
            weights = weights / weights.sum(-1, keepdim=True)
        scale = torch.cholesky_inverse(torch.linalg.cholesky(self.precision_scale))  # W_k
        precisions = wishart_sample(self.degrees_of_freedom, (n,), covariance_matrix=scale)
        means = dist.MultivariateNormal(
            self.means, precision_matrix=self.mean_precision[:, None, None] * precisions
        ).sample()
        covariances = torch.cholesky_inverse(torch.linalg.cholesky(precisions))
        return {"weights": weights, "means": means, "covariances": covariances}

    # ------------------------------------------------------------------ predictive
    @torch.no_grad()
    def sample_predictive(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws (x, z) from the posterior predictive (PRML (10.81)); see
        ``BayesianGaussianMixture.sample``."""
        model = self.model
        K, D = model.n_components, model.n_features_in_
        if model.weight_concentration_prior_type == "dirichlet_process":
            probs = stick_weights(self.weight_concentration)  # (K + 1,), the rest last
        else:
            probs = self.weight_concentration / self.weight_concentration.sum()
        z = dist.Categorical(probs=probs).sample((n,))
        beta, nu = self.mean_precision, self.degrees_of_freedom
        m, psi = self.means, self.precision_scale
        if probs.shape[0] > K:  # a fresh component: the prior's predictive
            beta = torch.cat([beta, beta.new_tensor([model.mean_precision_prior_])])
            nu = torch.cat([nu, nu.new_tensor([model.degrees_of_freedom_prior_])])
            m = torch.cat([m, model.mean_prior_.unsqueeze(0)])
            psi = torch.cat([psi, model.precision_scale_prior_.unsqueeze(0)])
        df = nu + 1 - D
        scale = ((1 + beta) / (df * beta))[:, None, None] * psi
        student = dist.MultivariateStudentT(df, m, torch.linalg.cholesky(scale))
        x = student.sample((n,))  # (n, K(+1), D): each row's own component below
        return x[torch.arange(n), z], z

    # ------------------------------------------------------------------ fitted attributes
    def _q(self, name: str) -> torch.Tensor:
        self._require_built()
        return self._buffers[name].detach()

    @property
    def weight_concentration_(self):
        """alpha (K,), or the sticks' ``(a, b)``, each (K,)."""
        c = self._q("weight_concentration")
        return c if c.dim() == 1 else (c[0], c[1])

    @property
    def mean_precision_(self) -> torch.Tensor:
        return self._q("mean_precision")

    @property
    def means_(self) -> torch.Tensor:
        return self._q("means")

    @property
    def degrees_of_freedom_(self) -> torch.Tensor:
        nu = self._q("degrees_of_freedom")
        return nu[0] if self.model.covariance_type == "tied" else nu

    @property
    def covariances_(self) -> torch.Tensor:
        """W_k^-1 / nu_k in scikit-learn's layout for the covariance type."""
        cov = self._q("precision_scale") / self._q("degrees_of_freedom")[:, None, None]
        kind = self.model.covariance_type
        if kind == "full":
            return cov
        if kind == "tied":
            return cov[0]
        diag = cov.diagonal(dim1=-2, dim2=-1)
        return diag if kind == "diag" else diag[:, 0]

    @property
    def precisions_(self) -> torch.Tensor:
        """The inverses of ``covariances_`` (nu_k W_k), in the same layout."""
        cov = self.covariances_
        if self.model.covariance_type in ("full", "tied"):
            return torch.cholesky_inverse(torch.linalg.cholesky(cov))
        return cov.reciprocal()

    @property
    def weights_(self) -> torch.Tensor:
        """E_q[pi_k] (K,); under the Dirichlet process normalised over the K components."""
        c = self._q("weight_concentration")
        if c.dim() == 1:
            return c / c.sum()
        w = stick_weights(c)[:-1]
        return w / w.sum()

    @property
    def n_features_in_(self) -> int | None:
        return self.model.n_features_in_

    def extra_repr(self) -> str:
        return f"n_components={self.model.n_components}, built={self.is_built}"
