"""The mean-field guide q(z) q(pi) prod_k q(theta_k): with it, the EM loop is VB (CAVI).

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

The same holds for every conjugate mixture (:class:`~elbolab.models.conjugate.ConjugateMixture`:
Bernoulli with Beta priors, Poisson with Gamma priors, categorical with Dirichlet priors):
the plug-in's parameters are exp E_q[ln theta] normalised, and the normaliser moves into
ln w~_k. The model says how (``plugin_values``); this guide is the same for all of them.

q(theta)'s parameters are buffers of this module (``state_dict`` saves them); the
``covariance_type`` restricts W_k (diagonal, a multiple of I, or one (W, nu) shared). The
guide is a Pyro program with the model's signature, so ``pyro.infer.Trace_ELBO().loss(model,
guide, x)`` estimates the same bound (VB-ELBO) that :meth:`MeanFieldPosterior.elbo` computes
in closed form.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from ..models.base import NotFittedError
from ..models.conjugate import (
    ConjugateMixture,
    expected_log_weights,
    kl_weights,
    link_posterior,
    stick_breaking,
    stick_weights,
)
from .exact import ExactPosterior


class MeanFieldPosterior(PyroModule):
    """q(z) q(pi) prod_k q(theta_k) for a conjugate mixture (e.g. ``BayesianGaussianMixture``).

    Parameters
    ----------
    model:
        The conjugate mixture it approximates the posterior of.

    Fitted attributes (scikit-learn's names and layouts for the Gaussian mixture):
    ``weight_concentration_`` (alpha (K,), or the sticks' ``(a, b)``), ``weights_``
    E_q[pi] (normalised under the Dirichlet process, as scikit-learn does), and the
    family's own (:meth:`ConjugateMixture.q_attributes`): for the Gaussian
    ``mean_precision_`` beta (K,), ``means_`` m (K, D), ``degrees_of_freedom_`` nu (K,)
    (``"tied"``: one value), ``covariances_`` W_k^-1 / nu_k ((K, D, D) full, (D, D) tied,
    (K, D) diag, (K,) spherical), ``precisions_``.
    """

    def __init__(self, model: ConjugateMixture) -> None:
        if not isinstance(model, ConjugateMixture):
            raise ValueError(
                f"MeanFieldPosterior approximates the posterior of a conjugate mixture (e.g. "
                f"BayesianGaussianMixture), got {type(model).__name__}; for a mixture with "
                "point parameters use ExactPosterior(model)"
            )
        super().__init__()
        self._model_ref = (model,)  # a tuple keeps the model out of the state_dict
        self._plugin: tuple = ()  # (plug-in mixture, its ExactPosterior) once built
        self._q_names: tuple[str, ...] = ()
        link_posterior(model, self)

    @property
    def model(self) -> ConjugateMixture:
        return self._model_ref[0]

    # ------------------------------------------------------------------ q(theta)
    @property
    def is_built(self) -> bool:
        return "weight_concentration" in self._buffers

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
        K, dtype = model.n_components, model.dtype
        dp = model.weight_concentration_prior_type == "dirichlet_process"
        self.register_buffer(
            "weight_concentration", torch.ones((2, K) if dp else (K,), dtype=dtype)
        )
        q = model.q_init()
        for name, value in q.items():
            self.register_buffer(name, value)
        self._q_names = ("weight_concentration", *q)
        plugin = model.plugin()
        self._plugin = (plugin, ExactPosterior(plugin))
        return self

    def unbuild(self) -> MeanFieldPosterior:
        for name in list(self._buffers):
            self._buffers.pop(name)
        self._plugin, self._q_names = (), ()
        return self

    @property
    def q(self) -> dict[str, torch.Tensor]:
        """The components' q(theta) buffers by name (the weights' not included)."""
        self._require_built()
        return {n: self._buffers[n] for n in self._q_names if n != "weight_concentration"}

    def set_q(self, **q: torch.Tensor) -> None:
        """Set q(theta) (any of its buffers), then the plug-in mixture VB-Z reads."""
        for name, value in q.items():
            self._buffers[name].copy_(value)
        self.sync()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.is_built:
            self.sync()
        return out

    @property
    def plugin(self):
        """The point-parameter mixture whose exact posterior is VB-Z's q(z)."""
        self._require_built()
        return self._plugin[0]

    @property
    def exact(self) -> ExactPosterior:
        """The plug-in's exact posterior (the E-step EM runs)."""
        self._require_built()
        return self._plugin[1]

    @torch.no_grad()
    def sync(self) -> None:
        """The plug-in's weights w~ / sum w~ and component parameters from q(theta)."""
        from ..inference.em.mixture import write_param  # (inference imports the guides)

        values, offset = self.model.plugin_values(self.q)
        plugin = self.plugin
        log_weights_tilde = self.expected_log_weights() + offset
        write_param(plugin, "weights", log_weights_tilde.log_softmax(0), unconstrained=True)
        for name, (value, unconstrained) in values.items():
            write_param(plugin, name, value, unconstrained=unconstrained)

    def expected_log_weights(self) -> torch.Tensor:
        """E_q[ln pi_k], shape (K,)."""
        self._require_built()
        return expected_log_weights(
            self.model.weight_concentration_prior_type, self.weight_concentration
        )

    def log_weights_tilde(self) -> torch.Tensor:
        """ln w~_k (K,): ln rho_dk - ln p_plugin,k(x_d), the same for every d."""
        return self.expected_log_weights() + self.model.plugin_values(self.q)[1]

    def kl(self) -> torch.Tensor:
        """KL(q(theta) || p(theta)) = KL of the weights + sum_k KL of theta_k (0-d)."""
        self._require_built()
        model = self.model
        kl_pi = kl_weights(
            model.weight_concentration_prior_type,
            self.weight_concentration,
            model.weight_concentration_prior_,
        )
        return kl_pi + model.kl_components(self.q).sum()

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

        sum_d w_d ln sum_k rho_dk - KL(q(theta) || p(theta)) (every term; for the Gaussian,
        PRML (10.70)-(10.77)).

        ``sample_weight``: relative weights, as EM reads them: put to mean 1 (w_d N / sum w),
        so that unit weights count each row once."""
        per_point = self.log_rho_normalizer(x)
        if sample_weight is not None:
            w = torch.as_tensor(sample_weight, dtype=per_point.dtype)
            per_point = per_point * w * (w.numel() / w.sum())
        return float(per_point.sum() - self.kl())

    # ------------------------------------------------------------------ the Pyro program
    def forward(self, x: torch.Tensor, sample_weight: torch.Tensor | None = None):
        """Draws pi (or the sticks), theta_k and z_d from q, at the model's sites."""
        self._require_built()
        model = self.model
        K = model.n_components
        if model.weight_concentration_prior_type == "dirichlet_process":
            a, b = self.weight_concentration
            with pyro.plate("stick_plate", K):
                pyro.sample("sticks", dist.Beta(a, b))
        else:
            pyro.sample("weights", dist.Dirichlet(self.weight_concentration))
        with pyro.plate("components", K):
            model.guide_sites(self.q)
        with torch.no_grad():
            resp = self.plugin.predict_proba(x)  # (N, K), VB-Z at the current q(theta)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=1.0 if sample_weight is None else sample_weight):
                pyro.sample(model.latent_site, dist.Categorical(probs=resp))

    # ------------------------------------------------------------------ draws
    @torch.no_grad()
    def draw(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` draws of theta from q in the plug-in's layout: ``weights`` (n, K) and the
        family's (Gaussian: ``means`` (n, K, D), ``covariances`` (n, K, D, D)). Under the
        Dirichlet process the weights are the sticks' pi_k, put to sum 1 over K."""
        self._require_built()
        c = self.weight_concentration
        if c.dim() == 1:
            weights = dist.Dirichlet(c).sample((n,))
        else:
            weights = stick_breaking(dist.Beta(c[0], c[1]).sample((n,)))[:, :-1]
            weights = weights / weights.sum(-1, keepdim=True)
        return {"weights": weights, **self.model.draw_components(self.q, n)}

    @torch.no_grad()
    def sample_predictive(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws (x, z) from the posterior predictive; see ``ConjugateMixture.sample``."""
        model = self.model
        K = model.n_components
        if model.weight_concentration_prior_type == "dirichlet_process":
            probs = stick_weights(self.weight_concentration)  # (K + 1,), the rest last
        else:
            probs = self.weight_concentration / self.weight_concentration.sum()
        z = dist.Categorical(probs=probs).sample((n,))
        x = model.predictive(self.q).sample((n,))  # (n, K, D): each row's own component below
        if probs.shape[0] > K:  # a fresh component: the prior's predictive
            fresh = model._fresh_predictive().sample((n,)).unsqueeze(1)
            x = torch.cat([x, fresh.to(x.dtype)], 1)
        return x[torch.arange(n), z].to(model.dtype), z

    # ------------------------------------------------------------------ fitted attributes
    @property
    def weight_concentration_(self):
        """alpha (K,), or the sticks' ``(a, b)``, each (K,)."""
        self._require_built()
        c = self.weight_concentration.detach()
        return c if c.dim() == 1 else (c[0], c[1])

    @property
    def weights_(self) -> torch.Tensor:
        """E_q[pi_k] (K,); under the Dirichlet process normalised over the K components."""
        self._require_built()
        c = self.weight_concentration.detach()
        if c.dim() == 1:
            return c / c.sum()
        w = stick_weights(c)[:-1]
        return w / w.sum()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if not name.endswith("_") or name.startswith("_") or not self.is_built:
                raise
            attributes = self.model.q_attributes({k: v.detach() for k, v in self.q.items()})
            if name[:-1] in attributes:
                return attributes[name[:-1]]
            raise

    @property
    def n_features_in_(self) -> int | None:
        return self.model.n_features_in_

    def extra_repr(self) -> str:
        return f"n_components={self.model.n_components}, built={self.is_built}"
