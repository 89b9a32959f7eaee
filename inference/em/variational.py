"""Variational Bayes for conjugate mixtures, as a family of the one EM loop (VB-EM).

With the mean-field guide (:class:`~elbolab.guides.MeanFieldPosterior`) the loop's two
steps are coordinate ascent on the bound (CAVI, PRML section 10.2):

1. E-step (VB-Z) -- q(z) from q(theta): EM-MIX.1 for the guide's plug-in mixture, run by
   the same code as EM's E-step, which returns the same sums: N_k, and sum_d r_dk (x_d - c_k)
   and its outer products about a shift c_k (:class:`~.mixture.GaussianStatistics`).
2. M-step (VB-THETA) -- q(theta) from those sums: every natural parameter is the prior's
   plus a sum (PRML (10.58)-(10.63)), so the update is EM-MIX.2/3 with the point estimate
   replaced by a distribution.

The bound (VB-ELBO) after an M-step is, from the sums alone,

    L = sum_k [N_k ln w~_k + sum_d r_dk ln N(x_d | m_k, W_k^-1 / nu_k)] + H(q(z))
        - KL(q(theta) || p(theta))

(``MeanFieldPosterior`` for ln w~), and after an E-step sum_d ln sum_k rho_dk - KL: every
term of PRML (10.70)-(10.77), constants included. KL(q(theta) || p) is counted once for all
the data, so a chunk's E-step leaves it out and :meth:`VariationalMixtureFamily.bound_offset`
adds it to the pass.

Because the sums are EM's, everything the loop does with them carries over: chunks, several
processes (all-reduced sums) and the stochastic mode, where the running average of the sums
makes each M-step a natural-gradient step on q(theta) of size gamma_t (Hoffman, Blei, Wang
& Paisley 2013: the natural parameters are linear in the sums).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch

from ...guides.mean_field import MeanFieldPosterior
from ...models.conjugate import BayesianGaussianMixture, ConjugateMixture
from ...models.conjugate_discrete import (
    BayesianBernoulliMixture,
    BayesianCategoricalMixture,
    BayesianPoissonMixture,
)
from ...models.gaussian import singular_covariance_error
from .family import Chunk, EChunk, Stats, set_family
from .init import initial_responsibilities
from .mixture import MixtureFamily, lookup_statistics

#: VB-THETA of a conjugate family: (model, sums, reg_covar) -> the guide's buffers
VBTheta = Callable[[ConjugateMixture, Stats, float], dict]


def padded_counts(stats: Stats) -> torch.Tensor:
    """N_k plus the 10 eps EM's M-step adds (an empty component keeps finite updates)."""
    return stats["nk"] + 10 * torch.finfo(stats["nk"].dtype).eps


def weights_vb_theta(model: ConjugateMixture, n: torch.Tensor) -> torch.Tensor:
    """q(pi) from N_k: alpha_k = alpha_0 + N_k, or the sticks a_k = 1 + N_k,
    b_k = gamma + sum_{j>k} N_j (PRML (10.58); Blei & Jordan 2006)."""
    gamma = model.weight_concentration_prior_
    if model.weight_concentration_prior_type == "dirichlet_process":
        after = n.flip(0).cumsum(0).flip(0) - n  # sum_{j > k} N_j
        return torch.stack([1 + n, gamma + after])
    return gamma + n


def gaussian_vb_theta(model: BayesianGaussianMixture, stats: Stats, reg_covar: float) -> dict:
    """q(theta) from the sums over the data (VB-THETA, PRML (10.58)-(10.63)), as the guide's
    buffers (``guides.mean_field.Q_NAMES``).

    ``stats``: N_k (K,), the shift c_k (K, D), s1 = sum_d r_dk (x_d - c_k) (K, D) and s2
    its outer products (K, D, D) (diagonals (K, D) for ``diag`` and ``spherical``). With
    xbar_k = c_k + s1_k / N_k, S_k the scatter about xbar_k over N_k (+ ``reg_covar`` I)
    and d_k = xbar_k - m_0:

        alpha_k = alpha_0 + N_k                (sticks: a_k = 1 + N_k, b_k = gamma + sum_{j>k} N_j)
        beta_k = beta_0 + N_k,  m_k = (beta_0 m_0 + N_k xbar_k) / beta_k,  nu_k = nu_0 + N_k
        W_k^-1 = W_0^-1 + N_k S_k + beta_0 N_k / beta_k d_k d_k^T

    restricted as the covariance type says: the diagonal of W_k^-1 (``diag``), its mean
    diagonal times I (``spherical``), or for ``tied`` one (W, nu) for all k:
    nu = nu_0 + N / K, W^-1 = W_0^-1 + (N / K) S + (beta_0 / K) sum_k N_k / beta_k d_k d_k^T,
    S the pooled scatter. N_k carries the M-step's 10 eps, as EM's does.
    """
    K, D = stats["s1"].shape
    n = padded_counts(stats)
    delta = stats["s1"] / n.unsqueeze(-1)
    xbar = stats["shift"] + delta
    s1, s2 = stats["s1"], stats["s2"]
    kind = model.covariance_type
    full = kind in ("full", "tied")
    scatter = s2 - s1.unsqueeze(-1) * delta.unsqueeze(-2) if full else s2 - s1 * delta
    m0, psi0 = model.mean_prior_, model.precision_scale_prior_
    beta0, nu0 = model.mean_precision_prior_, model.degrees_of_freedom_prior_
    concentration = weights_vb_theta(model, n)
    beta = beta0 + n
    means = (beta0 * m0 + n.unsqueeze(-1) * xbar) / beta.unsqueeze(-1)
    d = xbar - m0
    eye = torch.eye(D, dtype=n.dtype)
    if kind == "full":
        S = scatter / n[:, None, None] + reg_covar * eye
        outer = d.unsqueeze(-1) * d.unsqueeze(-2)
        psi = psi0 + n[:, None, None] * S + (beta0 * n / beta)[:, None, None] * outer
        nu = nu0 + n
    elif kind == "tied":
        S = scatter.sum(0) / n.sum() + reg_covar * eye
        outer = ((n / beta)[:, None, None] * d.unsqueeze(-1) * d.unsqueeze(-2)).sum(0)
        psi = (psi0 + n.sum() / K * S + beta0 / K * outer).expand(K, D, D)
        nu = (nu0 + n.sum() / K).expand(K)
    else:
        S = scatter / n.unsqueeze(-1) + reg_covar  # (K, D) variances
        sq = d * d
        if kind == "spherical":
            S, sq = S.mean(-1, keepdim=True), sq.mean(-1, keepdim=True)
        diag = psi0.diagonal() + n.unsqueeze(-1) * (S + (beta0 / beta).unsqueeze(-1) * sq)
        psi = diag.expand(K, D).diag_embed()
        nu = nu0 + n
    _, info = torch.linalg.cholesky_ex(psi)
    if bool((info != 0).any()) or not bool(torch.isfinite(psi).all()):
        raise singular_covariance_error(kind)
    return {
        "weight_concentration": concentration,
        "mean_precision": beta,
        "means": means,
        "degrees_of_freedom": nu,
        "precision_scale": psi,
    }


def bernoulli_vb_theta(model: BayesianBernoulliMixture, stats: Stats, reg_covar: float) -> dict:
    """Beta(a0 + S_kj, b0 + N_k - S_kj), S_kj = sum_d r_dk x_dj."""
    n = padded_counts(stats)
    a0, b0 = model.beta_prior_
    return {
        "weight_concentration": weights_vb_theta(model, n),
        "concentration1": a0 + stats["s1"],
        "concentration0": b0 + (n.unsqueeze(-1) - stats["s1"]).clamp_min(0),
    }


def poisson_vb_theta(model: BayesianPoissonMixture, stats: Stats, reg_covar: float) -> dict:
    """Gamma(a0 + S_kj, b0_j + N_k), S_kj = sum_d r_dk x_dj."""
    n = padded_counts(stats)
    return {
        "weight_concentration": weights_vb_theta(model, n),
        "rate_shape": model.rate_shape_prior_ + stats["s1"],
        "rate_rate": model.rate_rate_prior_ + n.unsqueeze(-1),
    }


def categorical_vb_theta(model: BayesianCategoricalMixture, stats: Stats, reg_covar: float) -> dict:
    """Dir(c0 + sum_d r_dk [x_dj = c])."""
    n = padded_counts(stats)
    return {
        "weight_concentration": weights_vb_theta(model, n),
        "probs_concentration": model.probs_concentration_prior_ + stats["counts"],
    }


class VariationalMixtureFamily(MixtureFamily):
    """VB-Z and VB-THETA for a conjugate mixture in the EM loop, from the sums of its
    point-parameter family (the plug-in's :class:`~.mixture.SufficientStatistics`)."""

    kind = "cavi"

    def __init__(self, plugin_class: type, vb_theta: VBTheta) -> None:
        super().__init__(lookup_statistics(plugin_class))
        self.vb_theta = vb_theta

    @staticmethod
    def _plugin(em) -> SimpleNamespace:
        """What EM's E-step reads (``model``, ``guide``): the guide's plug-in mixture."""
        return SimpleNamespace(model=em.guide.plugin, guide=em.guide.exact)

    # ------------------------------------------------------------------ start
    def start(self, em, chunk: Chunk, rng) -> None:
        """Priors from the data, then one VB-THETA on starting responsibilities (``em.init``:
        a method name, or ``{"responsibilities": (N, K)}``), as scikit-learn starts."""
        model, guide, x, w = em.model, em.guide, chunk.x, chunk.w
        resp = self._start_responsibilities(em, chunk, rng)
        model.build_for(x)
        guide.build()
        wresp = resp if w is None else resp * w.unsqueeze(-1)
        plugin = guide.plugin
        if self.fixed:  # sums about a shift: the data's centre, then the means found
            centre = (wresp.sum(1, keepdim=True) * x).sum(0) / wresp.sum()
            with torch.no_grad():
                plugin.means_unconstrained.copy_(centre.expand_as(plugin.means_unconstrained))
        for _ in range(2 if self.fixed else 1):
            self.m_step(em, self.component.collect(plugin, x, wresp), x.shape[0])

    @staticmethod
    def _start_responsibilities(em, chunk: Chunk, rng) -> torch.Tensor:
        K, x = em.model.n_components, chunk.x
        if not isinstance(em.init, dict):
            if x.shape[0] < K:
                raise ValueError(
                    f"x has {x.shape[0]} rows for {K} components; pass more rows, fewer "
                    "components, or init={'responsibilities': resp}"
                )
            return initial_responsibilities(x, K, em.init, rng, chunk.w)
        unknown = sorted(set(em.init) - {"responsibilities"})
        if unknown or "responsibilities" not in em.init:
            raise ValueError(
                f"variational Bayes starts from responsibilities: init must be a method name "
                f"or {{'responsibilities': resp}} with resp of shape (n_samples, "
                f"n_components), got the keys {sorted(em.init)}"
            )
        resp = torch.as_tensor(em.init["responsibilities"], dtype=x.dtype)
        if resp.shape != (x.shape[0], K):
            raise ValueError(
                f"init['responsibilities'] must have shape (n_samples, n_components) = "
                f"({x.shape[0]}, {K}), got {tuple(resp.shape)}"
            )
        if not bool(torch.isfinite(resp).all() & (resp >= 0).all()) or not bool(
            torch.allclose(resp.sum(1), torch.ones((), dtype=x.dtype), atol=1e-6)
        ):
            raise ValueError(
                "init['responsibilities'] must be finite, non-negative, and each row must "
                "sum to 1 (a probability vector over the components per sample)"
            )
        return resp / resp.sum(1, keepdim=True)

    # ------------------------------------------------------------------ E-step (VB-Z)
    def e_step(self, em, chunk: Chunk, **plate) -> EChunk:
        """EM's E-step on the plug-in: its sums, sum_d w_d ln sum_k rho_dk and H(q(z))."""
        stats, log_liks, entropies = self.e_sums(self._plugin(em), chunk, **plate)
        log_norm = float(em.guide.log_weights_tilde().logsumexp(0))  # ln sum_k w~_k
        return EChunk(
            stats,
            sum(float(v) for v in log_liks) + chunk.weight * log_norm,
            sum(-float(v) for v in entropies),
            chunk.weight,
            chunk.rows,
        )

    def empty_stats(self, em) -> Stats:
        return super().empty_stats(self._plugin(em))

    def bound_offset(self, em, e: EChunk) -> float:
        """-KL(q(theta) || p(theta)), counted once per ``e.rows`` data points of weight
        ``e.weight`` (the sums are read per mean weight)."""
        return -float(em.guide.kl()) * e.weight / e.rows

    # ------------------------------------------------------------------ M-step (VB-THETA)
    def m_step(self, em, stats: Stats, rows: float) -> None:
        """q(theta) from the sums put per mean weight (times ``rows`` / their total weight)."""
        weight = float(stats["nk"].sum())
        if weight > 0 and weight != rows:
            stats = self.scaled(stats, rows / weight)
        em.guide.set_q(**self.vb_theta(em.model, stats, em.reg_covar))

    def maximize(self, em, stats: Stats, rows: float) -> float:
        """VB-THETA, then E_q[ln p(x, z | theta)] - KL at the new q(theta), from the sums."""
        self.m_step(em, stats, rows)
        guide = em.guide
        plugin = guide.plugin
        expected = self.component.expected_log_lik(plugin, stats).sum()
        nk = stats["nk"]
        joint = expected + torch.where(nk > 0, nk * guide.log_weights_tilde(), 0.0).sum()
        return float(joint) - float(guide.kl()) * float(nk.sum()) / rows


def register_conjugate(model_class: type, plugin_class: type) -> Callable[[VBTheta], VBTheta]:
    """Decorator registering VB-THETA ``fn(model, stats, reg_covar)`` of a conjugate
    mixture whose VB-Z is the E-step of ``plugin_class`` (whose statistics it reads)."""

    def decorator(fn: VBTheta) -> VBTheta:
        set_family(model_class, VariationalMixtureFamily(plugin_class, fn))
        return fn

    return decorator


from ...models import BernoulliMixture, CategoricalMixture, GaussianMixture, PoissonMixture  # noqa: E402

register_conjugate(BayesianGaussianMixture, GaussianMixture)(gaussian_vb_theta)
register_conjugate(BayesianBernoulliMixture, BernoulliMixture)(bernoulli_vb_theta)
register_conjugate(BayesianPoissonMixture, PoissonMixture)(poisson_vb_theta)
register_conjugate(BayesianCategoricalMixture, CategoricalMixture)(categorical_vb_theta)

#: scikit-learn's name for the Gaussian update
vb_theta = gaussian_vb_theta

__all__ = ["MeanFieldPosterior", "VariationalMixtureFamily", "register_conjugate", "vb_theta"]
