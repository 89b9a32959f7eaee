"""Additive sufficient statistics: the E-step reduces data to sums, the M-step reads only those.

For every built-in component family the closed-form M-step (EM-MIX.3) depends on the data
only through sums over data points weighted by the responsibilities r_dk (EM-MIX.1):

==============  ==============================================================
family          statistics per component k (all sums over d of r_dk times ...)
==============  ==============================================================
every family    N_k = sum_d r_dk                                 (EM-MIX.2)
Gaussian        sum_d r_dk (x_d - c_k),  sum_d r_dk (x_d - c_k)(x_d - c_k)^T
Bernoulli       sum_d r_dk x_d
Poisson         sum_d r_dk x_d,  sum_d r_dk sum_j log x_dj!
categorical     sum_d r_dk [x_dj = c]
==============  ==============================================================

Sums add up over any split of the data, so EM over chunks (out of core), over the shards of
several processes (``all_reduce``), and stochastic EM (running averages of the sums, Cappe &
Moulines 2009) all reuse the same two functions per family. The Gaussian sums are taken
about a shift c_k (the current means, known before the pass) so that the scatter keeps its
digits when a component is far from the origin (PRML (9.25) centred, not E[x x^T] - mu mu^T).

A family registers a :class:`SufficientStatistics` like a closed-form M-step::

    @register_statistics(MyMixture)
    class MyStatistics(SufficientStatistics):
        def collect(self, model, x, resp): ...          # dict of sums, "nk" included
        def m_step(self, model, stats, nk, reg_covar): ...
        def expected_log_lik(self, model, stats): ...   # (K,) sum_d r_dk log p_k(x_d)

A family with only a data-level M-step (:func:`~elbolab.inference.register_m_step`) still
runs through the same loop: its "statistics" are the data and responsibilities themselves,
concatenated over chunks (exact, but memory then grows with the data).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .registry import _M_STEPS, MStep

_STATISTICS: dict[type, SufficientStatistics] = {}


class SufficientStatistics:
    """What one component family needs for EM over data it never holds at once.

    ``stats`` is a dict of tensors. Entries named in :attr:`fixed` say where the sums were
    taken (e.g. a shift) and are equal on every chunk and rank; all others add up.
    """

    #: entries that are not sums (not added, not all-reduced)
    fixed: tuple[str, ...] = ()
    #: whether stats of different chunks may be averaged with weights (stochastic EM)
    additive: bool = True

    def collect(
        self, model, x: torch.Tensor, resp: torch.Tensor
    ) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        """Sums over the data ``x`` (N, D) with weighted responsibilities ``resp`` (N, K)."""
        raise NotImplementedError

    def m_step(self, model, stats: dict, nk: torch.Tensor, reg_covar: float) -> None:
        """Set the component parameters from ``stats`` (EM-MIX.3); ``nk`` (K,) is padded."""
        raise NotImplementedError  # pragma: no cover - interface

    def expected_log_lik(self, model, stats: dict) -> torch.Tensor:
        """sum_d r_dk log p_k(x_d; theta) at the model's current theta, shape (K,)."""
        raise NotImplementedError  # pragma: no cover - interface

    def scaled(self, stats: dict, factor: float) -> dict:
        """The sums of data whose weights are all multiplied by ``factor``."""
        return {k: v if k in self.fixed else v * factor for k, v in stats.items()}

    def combine(self, a: dict, b: dict, alpha: float = 1.0, beta: float = 1.0) -> dict:
        """alpha * a + beta * b entry by entry (the fixed entries are a's)."""
        return {
            k: a[k] if k in self.fixed else alpha * a[k] + beta * b[k]
            for k in a  # same keys in both
        }


def register_statistics(
    model_class: type,
) -> Callable[[type[SufficientStatistics]], type[SufficientStatistics]]:
    """Class decorator registering the sufficient statistics of ``model_class``'s family."""
    if not isinstance(model_class, type):
        raise TypeError(f"register_statistics expects a class, got {model_class!r}")

    def decorator(cls: type[SufficientStatistics]) -> type[SufficientStatistics]:
        _STATISTICS[model_class] = cls()
        return cls

    return decorator


def lookup_statistics(model_class: type) -> SufficientStatistics | None:
    """The statistics of ``model_class`` (or of its nearest base with a closed form), else None.

    The class hierarchy is walked once: at each class, registered statistics win over a
    registered data-level M-step, which is wrapped in :class:`DataStatistics`.
    """
    for cls in model_class.__mro__:
        if cls in _STATISTICS:
            return _STATISTICS[cls]
        if cls in _M_STEPS:
            return DataStatistics(_M_STEPS[cls])
    return None


def _component_log_prob(model, x: torch.Tensor) -> torch.Tensor:
    """log p_k(x_d; theta) for every d, k, shape (N, K)."""
    component = model._component_dist(**model._component_params())  # batch (K,)
    return component.log_prob(x.unsqueeze(-2))


class DataStatistics(SufficientStatistics):
    """A data-level M-step seen as statistics: the data and responsibilities themselves.

    Exact over chunks (they are concatenated), but memory grows with the data and running
    averages are impossible, so stochastic EM refuses it.
    """

    additive = False

    def __init__(self, m_step_fn: MStep) -> None:
        self.m_step_fn = m_step_fn

    def collect(self, model, x, resp):
        return {"nk": resp.sum(0), "x": x, "resp": resp}

    def scaled(self, stats, factor):
        return {"nk": stats["nk"] * factor, "x": stats["x"], "resp": stats["resp"] * factor}

    def combine(self, a, b, alpha=1.0, beta=1.0):
        if alpha != 1.0 or beta != 1.0:
            raise ValueError(
                "this family has a data-level M-step (register_m_step), which cannot be "
                "averaged over minibatches; register its sufficient statistics with "
                "elbolab.inference.register_statistics to use stochastic EM."
            )
        return {
            "nk": a["nk"] + b["nk"],
            "x": torch.cat([a["x"], b["x"]]),
            "resp": torch.cat([a["resp"], b["resp"]]),
        }

    def m_step(self, model, stats, nk, reg_covar):
        self.m_step_fn(model, stats["x"], stats["resp"], nk, reg_covar)

    @torch.no_grad()
    def expected_log_lik(self, model, stats):
        log_p = _component_log_prob(model, stats["x"])  # (N, K)
        return torch.where(stats["resp"] > 0, stats["resp"] * log_p, 0.0).sum(0)


# ---------------------------------------------------------------------------- the families
# imported here, after the registry, so the model modules stay free of inference code
from ...models import (  # noqa: E402
    BernoulliMixture,
    CategoricalMixture,
    GaussianMixture,
    PoissonMixture,
)
from ...models.gaussian import BLOCK, cholesky_or_raise, singular_covariance_error  # noqa: E402


def _clamp_probs(p: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(p.dtype).eps
    return p.clamp(eps, 1 - eps)


@register_statistics(GaussianMixture)
class GaussianStatistics(SufficientStatistics):
    """Sums about a shift c_k (K, D), the component means before the pass.

    ``s1`` = sum_d r_dk (x_d - c_k) (K, D); ``s2`` = sum_d r_dk (x_d - c_k)(x_d - c_k)^T
    (K, D, D) for full and tied covariances, its diagonal (K, D) for diag and spherical.
    """

    fixed = ("shift",)

    def collect(self, model, x, resp, shift: torch.Tensor | None = None):
        c = model.means.detach() if shift is None else shift.expand(model.n_components, -1)
        nk = resp.sum(0)  # (K,)
        full = model.covariance_type in ("full", "tied")
        K, D = c.shape
        s1 = resp.T @ x - nk.unsqueeze(-1) * c  # sum_d r_dk (x_d - c_k)
        s2 = torch.zeros((K, D, D) if full else (K, D), dtype=x.dtype)
        for start in range(0, x.shape[0], BLOCK):  # (K, B, D) temporaries stay small
            diff = x[start : start + BLOCK].unsqueeze(0) - c.unsqueeze(1)  # x_d - c_k
            weighted = diff * resp[start : start + BLOCK].T.unsqueeze(-1)  # r_dk (x_d - c_k)
            if full:
                s2.baddbmm_(weighted.mT, diff)
            else:
                s2 += (weighted * diff).sum(1)
        return {"nk": nk, "shift": c.clone(), "s1": s1, "s2": s2}

    def combine(self, a, b, alpha=1.0, beta=1.0):
        return super().combine(a, self.recentre(b, a["shift"]), alpha, beta)

    @staticmethod
    def recentre(stats: dict, shift: torch.Tensor) -> dict:
        """The same sums taken about ``shift`` instead (exact algebra, no data needed)."""
        if torch.equal(stats["shift"], shift):
            return stats
        nk, s1, s2 = stats["nk"], stats["s1"], stats["s2"]
        delta = stats["shift"] - shift  # x - c' = (x - c) + delta
        s1_new = s1 + nk.unsqueeze(-1) * delta
        if s2.dim() == 3:
            cross = s1.unsqueeze(-1) * delta.unsqueeze(-2)  # s1 delta^T
            outer = delta.unsqueeze(-1) * delta.unsqueeze(-2)
            s2_new = s2 + cross + cross.mT + nk[:, None, None] * outer
        else:
            s2_new = s2 + 2 * s1 * delta + nk.unsqueeze(-1) * delta**2
        return {"nk": nk, "shift": shift.clone(), "s1": s1_new, "s2": s2_new}

    @staticmethod
    def _scatter(stats: dict, means: torch.Tensor) -> torch.Tensor:
        """sum_d r_dk (x_d - mu_k)(x_d - mu_k)^T (or its diagonal) from the sums about c_k."""
        nk, s1, s2 = stats["nk"], stats["s1"], stats["s2"]
        delta = means - stats["shift"]  # mu_k - c_k
        if s2.dim() == 3:
            cross = s1.unsqueeze(-1) * delta.unsqueeze(-2)
            outer = delta.unsqueeze(-1) * delta.unsqueeze(-2)
            return s2 - cross - cross.mT + nk[:, None, None] * outer
        return s2 - 2 * s1 * delta + nk.unsqueeze(-1) * delta**2

    def m_step(self, model, stats, nk, reg_covar):
        """N_k, mu_k, Sigma_k of PRML (9.24)-(9.27) from the sums (EM-MIX.3)."""
        means = stats["shift"] + stats["s1"] / nk.unsqueeze(-1)  # mu_k (PRML 9.24)
        scatter = self._scatter(stats, means)  # sum_d r_dk (x_d - mu_k)(...)^T (PRML 9.25)
        floor = self._singular_floor(stats, means, scatter)
        kind, D = model.covariance_type, means.shape[1]
        if kind in ("full", "tied"):
            eye = torch.eye(D, dtype=means.dtype)
            if kind == "full":
                cov = scatter / nk[:, None, None] + reg_covar * eye  # Sigma_k
            else:
                cov = scatter.sum(0) / nk.sum() + reg_covar * eye  # one Sigma for all k
            scale_tril = cholesky_or_raise(cov, kind, floor)
            model.assign("means", means)
            model.assign("scale_tril", scale_tril)
            return
        var = scatter / nk.unsqueeze(-1) + reg_covar  # sigma_kj^2
        if kind == "spherical":
            var = var.mean(-1)  # one variance per component: the mean of the diagonal
        if not bool((var > floor).all()) or not bool(torch.isfinite(var).all()):
            raise singular_covariance_error(kind)
        model.assign("means", means)
        model.assign("scales", var.sqrt())

    @staticmethod
    def _singular_floor(stats, means, scatter) -> float:
        """eps times the largest feature variance of the data (law of total variance).

        Below it, the round-off in a component mean alone changes (x - mu)^2 / sigma^2 by
        O(1): the likelihood is running off to a degenerate spike on a few points.
        """
        nk = stats["nk"]
        n = nk.sum()
        within = torch.diagonal(scatter, dim1=-2, dim2=-1) if scatter.dim() == 3 else scatter
        grand = (nk.unsqueeze(-1) * means).sum(0) / n  # (D,)
        between = nk.unsqueeze(-1) * (means - grand) ** 2  # (K, D)
        var = (within + between).sum(0) / n
        return float(torch.finfo(means.dtype).eps * var.max())

    def expected_log_lik(self, model, stats):
        """-1/2 [N_k log|2 pi Sigma_k| + tr(Sigma_k^-1 S_k)], S_k the scatter about mu_k."""
        means = model.means.detach()
        nk, D = stats["nk"], means.shape[1]
        scatter = self._scatter(stats, means)
        kind = model.covariance_type
        if kind in ("full", "tied"):
            L = model.scale_tril.detach().expand(model.n_components, D, D)
            half_logdet = torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)  # log|Sigma|/2
            a = torch.linalg.solve_triangular(L, scatter, upper=False)  # L^-1 S
            b = torch.linalg.solve_triangular(L, a.mT, upper=False)  # L^-1 S L^-T
            trace = torch.diagonal(b, dim1=-2, dim2=-1).sum(-1)
            return -0.5 * (nk * (D * math.log(2 * math.pi) + 2 * half_logdet) + trace)
        var = model.scales.detach() ** 2
        if kind == "spherical":
            var = var.unsqueeze(-1).expand(-1, D)
        terms = nk.unsqueeze(-1) * (2 * math.pi * var).log() + scatter / var
        return -0.5 * terms.sum(-1)


@register_statistics(BernoulliMixture)
class BernoulliStatistics(SufficientStatistics):
    """``s1`` = sum_d r_dk x_d (K, D)."""

    def collect(self, model, x, resp):
        return {"nk": resp.sum(0), "s1": resp.T @ x}

    def m_step(self, model, stats, nk, reg_covar):
        """mu_kj = (sum_d r_dk x_dj + reg) / (N_k + 2 reg) (PRML 9.59; EM-MIX.3)."""
        probs = (stats["s1"] + reg_covar) / (nk.unsqueeze(-1) + 2 * reg_covar)
        model.assign("probs", _clamp_probs(probs))

    def expected_log_lik(self, model, stats):
        p = model.probs.detach()
        s1, nk = stats["s1"], stats["nk"].unsqueeze(-1)
        return (s1 * p.log() + (nk - s1) * torch.log1p(-p)).sum(-1)


@register_statistics(PoissonMixture)
class PoissonStatistics(SufficientStatistics):
    """``s1`` = sum_d r_dk x_d (K, D); ``log_fact`` = sum_d r_dk sum_j log x_dj! (K,)."""

    def collect(self, model, x, resp):
        log_fact = torch.lgamma(x + 1).sum(-1)  # (N,)
        return {"nk": resp.sum(0), "s1": resp.T @ x, "log_fact": resp.T @ log_fact}

    def m_step(self, model, stats, nk, reg_covar):
        """lambda_kj = (1 / N_k) sum_d r_dk x_dj + reg (EM-MIX.3)."""
        rates = stats["s1"] / nk.unsqueeze(-1) + reg_covar
        model.assign("rates", rates.clamp_min(torch.finfo(rates.dtype).tiny))

    def expected_log_lik(self, model, stats):
        rate = model.rates.detach()
        nk = stats["nk"].unsqueeze(-1)
        return (stats["s1"] * rate.log() - nk * rate).sum(-1) - stats["log_fact"]


@register_statistics(CategoricalMixture)
class CategoricalStatistics(SufficientStatistics):
    """``counts`` = sum_d r_dk [x_dj = c] (K, D, C)."""

    def collect(self, model, x, resp):
        K, D, C = model.n_components, x.shape[1], model.n_categories
        # counts[k, j, c] = sum_d r_dk [x_dj = c]: each r_d added at (j, x_dj); no (N, D, C)
        cell = (torch.arange(D) * C + x.long()).reshape(-1)  # (N D,) index of (j, x_dj)
        counts = torch.zeros(D * C, K, dtype=resp.dtype)
        counts.index_add_(0, cell, resp.repeat_interleave(D, dim=0))
        return {"nk": resp.sum(0), "counts": counts.T.reshape(K, D, C)}

    def m_step(self, model, stats, nk, reg_covar):
        """theta_kjc = (sum_d r_dk [x_dj = c] + reg) / (N_k + C reg) (EM-MIX.3)."""
        C = model.n_categories
        probs = (stats["counts"] + reg_covar) / (nk[:, None, None] + C * reg_covar)
        probs = _clamp_probs(probs)
        model.assign("probs", probs / probs.sum(-1, keepdim=True))

    def expected_log_lik(self, model, stats):
        counts = stats["counts"]
        return torch.where(counts > 0, counts * model.probs.detach().log(), 0.0).sum((-1, -2))
