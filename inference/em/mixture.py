"""Mixtures in the one EM loop: EM-MIX.1-3 for any component family, from its sums.

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

A component family says how to take and read its sums (:class:`SufficientStatistics`);
:class:`MixtureFamily` adds what every mixture shares -- the responsibilities, the weights
pi_k = N_k / N (EM-MIX.2), the entropy of q and the start -- and is the
:class:`~elbolab.inference.em.family.Family` the EM loop runs. The same component
statistics serve the emissions of a hidden Markov model (:mod:`.hmm`), with the smoothed
marginals gamma_t(k) in place of r_dk (HMM-M). The Gaussian sums are taken about a shift
c_k (the current means, known before the pass) so that the scatter keeps its digits when a
component is far from the origin (PRML (9.25) centred, not E[x x^T] - mu mu^T).

A component family registers its statistics, or only a data-level M-step::

    @register_statistics(MyMixture)
    class MyStatistics(SufficientStatistics):
        def collect(self, model, x, resp): ...          # dict of sums, "nk" included
        def m_step(self, model, stats, nk, reg_covar): ...
        def expected_log_lik(self, model, stats): ...   # (K,) sum_d r_dk log p_k(x_d)

    @register_m_step(MyMixture)                          # sugar: the data are the "sums"
    def _m_step(model, x, resp, nk, reg_covar): ...

A family with only a data-level M-step still runs through the same loop: its "statistics"
are the data and responsibilities themselves, concatenated over chunks (exact, but memory
then grows with the data).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .family import Chunk, EChunk, Family, Stats, lookup_family, set_family
from .init import initial_responsibilities

#: signature of a data-level M-step: (model, x (N, D), resp (N, K), nk (K,), reg_covar)
MStep = Callable[..., None]
#: (rows, K) entries per E-step block (2 MiB in float64). Temporaries of this size come back
#: from the allocator already mapped; a whole (N, K) table per pass is mapped afresh each
#: time, which costs more than the arithmetic (bench/bench_em_libraries.py, faults column).
E_BLOCK_ELEMENTS = 1 << 18


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


# ---------------------------------------------------------------------------- the family
def weights_m_step(nk: torch.Tensor) -> torch.Tensor:
    """pi_k := N_k / sum_k' N_k', N_k = sum_d r_dk (EM-MIX.2), shape (K,)."""
    return nk / nk.sum()


class MixtureFamily(Family):
    """A mixture sum_k pi_k p_k(x; theta_k) in the EM loop, from its component statistics.

    E-step: r_dk from the exact guide (EM-MIX.1), in blocks of rows; the sums are the
    component statistics of the weighted responsibilities, the log-likelihood and the
    entropy -sum_d w_d sum_k r_dk log r_dk. M-step: EM-MIX.3 for the components, EM-MIX.2
    for the weights. Q(theta~, theta) = sum_k [N_k log pi_k + sum_d r_dk log p_k(x_d)].
    """

    def __init__(self, component: SufficientStatistics) -> None:
        self.component = component
        self.fixed, self.additive = component.fixed, component.additive
        self.data_m_step = _data_m_step(component)

    # ------------------------------------------------------------------ start
    def start(self, em, chunk: Chunk, rng) -> None:
        """One M-step on initial responsibilities (``em.init``), as scikit-learn starts.

        Sums taken about a shift (Gaussian) are taken twice: about the data's centre,
        then about the means the first update found, so the start keeps every digit.
        """
        resp = start_responsibilities(em, chunk, rng)
        if resp is None:
            return
        x, w = chunk.x, chunk.w
        wresp = resp if w is None else resp * w.unsqueeze(-1)
        for _ in range(2 if self.fixed else 1):
            self.m_step(em, self.component.collect(em.model, x, wresp), x.shape[0])
        if isinstance(em.init, dict):
            em.model.set_params(**em.init)

    # ------------------------------------------------------------------ E-step
    def e_step(self, em, chunk: Chunk, **plate) -> EChunk:
        """r_dk in blocks of rows, reduced to sums (the blocks' (rows, K) temporaries stay
        small and the allocator reuses them). ``plate``: ``total_size=N`` for a minibatch
        the model's plate subsamples."""
        block = E_BLOCK_ELEMENTS // em.model.n_components if self.additive else chunk.rows
        block = max(block, 1)
        total = None
        for start in range(0, chunk.rows, block):
            w = None if chunk.w is None else chunk.w[start : start + block]
            part = self._e_block(em, chunk.x[start : start + block], w, **plate)
            total = part if total is None else self.add(total, part)
        return total

    def _e_block(self, em, x, w, **plate) -> EChunk:
        log_px, log_resp = responsibilities(em.guide, x, w, **plate)
        resp = log_resp.exp()
        wresp = resp if w is None else resp * w.unsqueeze(-1)
        return EChunk(
            self.component.collect(em.model, x, wresp),
            float(log_px.sum() if w is None else (log_px * w).sum()),
            -float(torch.where(resp > 0, wresp * log_resp, 0.0).sum()),
            float(x.shape[0] if w is None else w.sum()),
            x.shape[0],
        )

    def empty_stats(self, em) -> Stats:
        dtype, D, K = em.model.dtype, em.model.n_features_in_, em.model.n_components
        return self.component.collect(
            em.model, torch.zeros(0, D, dtype=dtype), torch.zeros(0, K, dtype=dtype)
        )

    # ------------------------------------------------------------------ M-step
    def m_step(self, em, stats: Stats, rows: float) -> None:
        """EM-MIX.3 for the components, then EM-MIX.2 for the weights, from the sums.

        The sums are first put per unit of mean weight: times ``rows`` / (total weight),
        with ``rows`` the number of data points they sum over. With sample weights of any
        scale c the update is then that of the unweighted sums, and ``reg_covar``'s
        pseudo-counts (Bernoulli, categorical) count samples of mean weight.
        """
        weight = self.total_weight(stats)
        if weight > 0 and rows != weight:
            stats = self.scaled(stats, rows / weight)
        nk = stats["nk"]
        nk = nk + 10 * torch.finfo(nk.dtype).eps  # keeps an empty component finite
        self.component.m_step(em.model, stats, nk, em.reg_covar)
        em.model.assign("weights", weights_m_step(nk))

    def expected_log_joint(self, em, stats: Stats) -> float:
        """sum_k [N_k log pi_k + sum_d r_dk log p_k(x_d; theta)] (EM-MIX.LB without H)."""
        log_weights = em.model.weights_.log()
        expected = self.component.expected_log_lik(em.model, stats)
        joint = expected + torch.where(stats["nk"] > 0, stats["nk"] * log_weights, 0.0)
        return float(joint.sum())

    # ------------------------------------------------------------------ sums
    def combine(self, a, b, alpha=1.0, beta=1.0):
        return self.component.combine(a, b, alpha, beta)

    def scaled(self, stats, factor):
        return self.component.scaled(stats, factor)


def _data_m_step(component: SufficientStatistics) -> MStep:
    """The data-level M-step ``(model, x, resp, nk, reg_covar)`` of a component family."""
    if isinstance(component, DataStatistics):
        return component.m_step_fn

    def m_step(model, x, resp, nk, reg_covar: float) -> None:
        component.m_step(model, component.collect(model, x, resp), nk, reg_covar)

    m_step.__name__ = f"m_step_{type(component).__name__.removesuffix('Statistics')}"
    m_step.__doc__ = f"EM-MIX.3 from {type(component).__name__}'s sums of (x, resp)."
    return m_step


def responsibilities(guide, x, w=None, **plate) -> tuple[torch.Tensor, torch.Tensor]:
    """The E-step of a mixture (EM-1 step 1): refresh the guide on ``x``, return log p(x_d)
    (n,) and log r_dk (n, K) (EM-MIX.1)."""
    guide.refresh(x, w, **plate)
    log_joint = guide.joint(x, w, **plate).log_joint.transpose(-1, -2)  # (n, K)
    log_px = log_joint.logsumexp(-1)  # log p(x_d)
    return log_px, log_joint - log_px.unsqueeze(-1)


def start_responsibilities(em, chunk: Chunk, rng) -> torch.Tensor | None:
    """Build ``em.model`` for the data, set the entries of an ``init`` dict, and return the
    initial responsibilities (n, K) of ``em.init``'s method, or None when the dict gave
    every parameter (``model.param_names()``).

    What a partial dict leaves out is estimated, as scikit-learn does, from k-means++
    responsibilities, so a partial start never leaves components identical.
    """
    model, x = em.model, chunk.x
    model.build_for(x)
    given = dict(em.init) if isinstance(em.init, dict) else {}
    if given:
        model.set_params(**given)  # every given value checked before any work
    em._init_complete = bool(given) and set(model.param_names()) <= set(given)
    if em._init_complete:
        return None
    if x.shape[0] < model.n_components:
        raise ValueError(
            f"the init dict leaves out {sorted(set(model.param_names()) - set(given))}, "
            f"which are estimated from the data, and x has {x.shape[0]} rows for "
            f"{model.n_components} components; give every parameter in init or more rows."
        )
    method = em.init if isinstance(em.init, str) else "kmeans++"
    return initial_responsibilities(x, model.n_components, method, rng, chunk.w)


# ---------------------------------------------------------------------------- registry
def register_statistics(
    model_class: type,
) -> Callable[[type[SufficientStatistics]], type[SufficientStatistics]]:
    """Class decorator registering the component statistics of ``model_class``'s family:
    its mixture (and the emissions of its hidden Markov model) then fit in closed form."""
    if not isinstance(model_class, type):
        raise TypeError(f"register_statistics expects a class, got {model_class!r}")

    def decorator(cls: type[SufficientStatistics]) -> type[SufficientStatistics]:
        set_family(model_class, MixtureFamily(cls()))
        return cls

    return decorator


def register_m_step(model_class: type) -> Callable[[MStep], MStep]:
    """Decorator registering a data-level closed-form component M-step for ``model_class``.

    The function receives ``(model, x, resp, nk, reg_covar)``: data ``x`` (N, D), weighted
    responsibilities ``resp`` (N, K), their column sums ``nk`` (K,) and the regulariser,
    and sets the model's component parameters. The weights pi are set by EM itself
    (EM-MIX.2), the same for every family. Sugar for :func:`register_statistics` with the
    data themselves as the statistics.
    """
    if not isinstance(model_class, type):
        raise TypeError(f"register_m_step expects a class, got {model_class!r}")

    def decorator(fn: MStep) -> MStep:
        set_family(model_class, MixtureFamily(DataStatistics(fn)))
        return fn

    return decorator


def lookup_statistics(model_class: type) -> SufficientStatistics | None:
    """The component statistics of ``model_class`` (or its nearest registered base)."""
    family = lookup_family(model_class)
    return family.component if isinstance(family, MixtureFamily) else None


def lookup_m_step(model_class: type) -> MStep | None:
    """The data-level closed-form M-step of ``model_class`` or its nearest base, else None."""
    family = lookup_family(model_class)
    return family.data_m_step if isinstance(family, MixtureFamily) else None


def registered_families() -> list[type]:
    """Mixture classes with a closed-form M-step (registered statistics or M-step)."""
    from .family import _FAMILIES

    return [c for c, f in _FAMILIES.items() if isinstance(f, MixtureFamily)]


# ---------------------------------------------------------------------------- the families
from ...models import (  # noqa: E402  (the built-in families, registered below)
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
