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
from torch.distributions import transform_to

from .family import Chunk, EChunk, Family, Stats, lookup_family, set_family
from .init import initial_responsibilities

#: signature of a data-level M-step: (model, x (N, D), resp (N, K), nk (K,), reg_covar)
MStep = Callable[..., None]
#: (rows, K) entries per E-step block (2 MiB in float64). Temporaries of this size come back
#: from the allocator already mapped; a whole (N, K) table per pass is mapped afresh each
#: time, which costs more than the arithmetic (bench/bench_em_libraries.py, faults column).
E_BLOCK_ELEMENTS = 1 << 18


_TRANSFORMS: dict = {}


def write_param(model, name: str, value: torch.Tensor, unconstrained: bool = False) -> None:
    """Set ``model``'s constrained parameter ``name`` to a closed-form M-step's ``value``, in
    place (its unconstrained tensor is overwritten, as ``model.assign`` does).

    Without ``assign``'s checks: the closed forms below give values of the right shape in
    the support by construction (Cholesky factors with positive pivots, clamped
    probabilities, normalised weights), and a non-finite value is caught by EM's check of
    the parameters after every M-step (and by :func:`lookup_m_step`'s function).
    ``unconstrained``: ``value`` is already the unconstrained value (what the transform's
    inverse gives, e.g. the logarithm of a simplex's probabilities).
    """
    if not unconstrained:
        constraint = model._pyro_params[name][0]
        transform = _TRANSFORMS.get(constraint)
        if transform is None:
            transform = _TRANSFORMS[constraint] = transform_to(constraint)
        value = transform.inv(value)
    with torch.no_grad():
        model._parameters[name + "_unconstrained"].copy_(value)


class SufficientStatistics:
    """What one component family needs for EM over data it never holds at once.

    ``stats`` is a dict of tensors. Entries named in :attr:`fixed` say where the sums were
    taken (e.g. a shift) and are equal on every chunk and rank; all others add up.
    """

    #: entries that are not sums (not added, not all-reduced)
    fixed: tuple[str, ...] = ()
    #: whether stats of different chunks may be averaged with weights (stochastic EM)
    additive: bool = True
    #: whether EM may record its iterations and replay them (:mod:`.recorded`): the
    #: methods below do tensor operations only (no Python side effects, no values read
    #: but through :func:`~elbolab.models.enumeration.holds`)
    recordable: bool = False
    #: whether :meth:`m_step`'s own checks (through ``holds``) fail whenever it would write
    #: a non-finite parameter (a recorded iteration then checks nothing more)
    checks_finite: bool = False

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

    #: whether the update is the same for the sums of data whose weights are all
    #: multiplied by one factor (then EM does not put them per mean weight first), and
    #: :meth:`m_step_expected_log_lik` is given
    scale_free: bool = False

    def m_step_expected_log_lik(self, model, stats: dict, nk, reg_covar: float) -> torch.Tensor:
        """:meth:`m_step`, then sum_k sum_d r_dk log p_k(x_d) at the new theta (0-d), which
        a family may know from the update's own quantities; default: by
        :meth:`expected_log_lik`."""
        self.m_step(model, stats, nk, reg_covar)
        return self.expected_log_lik(model, stats).sum()

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
        stats, log_liks, entropies = self.e_sums(em, chunk, **plate)
        return EChunk(
            stats,
            sum(float(v) for v in log_liks),
            sum(-float(v) for v in entropies),
            chunk.weight,
            chunk.rows,
        )

    def e_sums(self, em, chunk: Chunk, **plate) -> tuple[Stats, list, list]:
        """The E-step's sums as tensors: the statistics, and per block of rows
        sum_d w_d log p(x_d) and sum_d w_d sum_k r_dk log r_dk (minus the entropy)."""
        block = E_BLOCK_ELEMENTS // em.model.n_components if self.additive else chunk.rows
        block = max(block, 1)
        stats, log_liks, entropies = None, [], []
        for start in range(0, chunk.rows, block):
            w = None if chunk.w is None else chunk.w[start : start + block]
            part, log_lik, entropy = self._e_block(em, chunk.x[start : start + block], w, **plate)
            stats = part if stats is None else self.combine(stats, part)
            log_liks.append(log_lik)
            entropies.append(entropy)
        return stats, log_liks, entropies

    def _e_block(self, em, x, w, **plate) -> tuple[Stats, torch.Tensor, torch.Tensor]:
        log_px, log_resp = responsibilities(em.guide, x, w, transposed=True, **plate)
        resp = log_resp.exp()  # (K, n)
        wresp = resp if w is None else resp * w
        return (
            self.component.collect(em.model, x, wresp.T),
            log_px.sum() if w is None else (log_px * w).sum(),
            torch.where(resp > 0, wresp * log_resp, 0.0).sum(),
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
        pseudo-counts (Bernoulli, categorical) count samples of mean weight. (Families
        whose update does not depend on that scale, ``scale_free``, skip it.)
        """
        self._m_step(em, stats, rows, with_q=False)

    def maximize(self, em, stats: Stats, rows: float) -> float:
        """:meth:`m_step`, then Q at the new theta (``maximize_tensor``)."""
        return float(self.maximize_tensor(em, stats, rows))

    def maximize_tensor(self, em, stats: Stats, rows: float) -> torch.Tensor:
        """The M-step, and sum_k [N_k log pi_k + sum_d r_dk log p_k(x_d)] at the new theta
        as a 0-d tensor: from the M-step's own values where the component family gives
        them (:meth:`SufficientStatistics.m_step_expected_log_lik`)."""
        return self._m_step(em, stats, rows, with_q=True)

    def _m_step(self, em, stats: Stats, rows: float, with_q: bool) -> torch.Tensor | None:
        given = stats
        if not self.component.scale_free:
            weight = stats["nk"].sum()
            # (times 1 exactly where the sums are already per mean weight)
            stats = self.scaled(stats, torch.where(weight > 0, rows / weight, 1.0))
        nk = stats["nk"]
        nk = nk + 10 * torch.finfo(nk.dtype).eps  # keeps an empty component finite
        log_weights = weights_m_step(nk).log()  # (what the simplex's transform inverts to)
        component, expected = self.component, None
        if not with_q:
            component.m_step(em.model, stats, nk, em.reg_covar)
        elif component.scale_free:  # the sums as given: Q of their weights
            expected = component.m_step_expected_log_lik(em.model, stats, nk, em.reg_covar)
        else:
            component.m_step(em.model, stats, nk, em.reg_covar)
        write_param(em.model, "weights", log_weights, unconstrained=True)
        if not with_q:
            return None
        if expected is None:
            expected = component.expected_log_lik(em.model, given).sum()
        n = given["nk"]
        return expected + torch.where(n > 0, n * log_weights, 0.0).sum()

    def expected_log_joint(self, em, stats: Stats) -> float:
        """sum_k [N_k log pi_k + sum_d r_dk log p_k(x_d; theta)] (EM-MIX.LB without H)."""
        return float(self.expected_log_joint_tensor(em, stats))

    def expected_log_joint_tensor(self, em, stats: Stats) -> torch.Tensor:
        """:meth:`expected_log_joint` as a 0-d tensor."""
        log_weights = em.model.weights_.log()
        expected = self.component.expected_log_lik(em.model, stats)
        joint = expected + torch.where(stats["nk"] > 0, stats["nk"] * log_weights, 0.0)
        return joint.sum()

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
        from .fitter import parameters_finite

        if not parameters_finite(model):
            raise ValueError(
                "the M-step produced non-finite parameters; check x, resp and nk for NaN or "
                "inf, or raise reg_covar."
            )

    m_step.__name__ = f"m_step_{type(component).__name__.removesuffix('Statistics')}"
    m_step.__doc__ = f"EM-MIX.3 from {type(component).__name__}'s sums of (x, resp)."
    return m_step


def responsibilities(
    guide, x, w=None, transposed: bool = False, **plate
) -> tuple[torch.Tensor, torch.Tensor]:
    """The E-step of a mixture (EM-1 step 1): refresh the guide on ``x``, return log p(x_d)
    (n,) and log r_dk (n, K) (EM-MIX.1); ``transposed``: log r as (K, n), the layout of
    the guide's table (the sum over k then runs over rows, which is faster)."""
    guide.refresh(x, w, **plate)
    log_joint = guide.joint(x, w, **plate).log_joint  # (K, n)
    log_px = log_joint.logsumexp(0)  # log p(x_d)
    log_resp = log_joint - log_px
    return log_px, log_resp if transposed else log_resp.T


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
from ...models.enumeration import holds  # noqa: E402
from ...models.gaussian import BLOCK, singular_covariance_error  # noqa: E402


def _clamp_probs(p: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(p.dtype).eps
    return p.clamp(eps, 1 - eps)


@register_statistics(GaussianMixture)
class GaussianStatistics(SufficientStatistics):
    """Sums about a shift c_k (K, D), the component means before the pass.

    ``s1`` = sum_d r_dk (x_d - c_k) (K, D); ``s2`` = sum_d r_dk (x_d - c_k)(x_d - c_k)^T
    (K, D, D) for full and tied covariances, its diagonal (K, D) for diag and spherical.
    """

    recordable = True
    scale_free = True
    # its update fails its checks on anything non-finite: the means, the factors and the
    # weights all enter the Cholesky factor or the variances it checks
    checks_finite = True

    fixed = ("shift",)

    def collect(self, model, x, resp, shift: torch.Tensor | None = None):
        c = model.means.detach() if shift is None else shift.expand(model.n_components, -1)
        nk = resp.sum(0)  # (K,)
        full = model.covariance_type in ("full", "tied")
        K, D = c.shape
        s1 = resp.T @ x - nk.unsqueeze(-1) * c  # sum_d r_dk (x_d - c_k)
        s2 = None
        for start in range(0, x.shape[0], BLOCK):  # (K, B, D) temporaries stay small
            diff = x[start : start + BLOCK].unsqueeze(0) - c.unsqueeze(1)  # x_d - c_k
            weighted = diff * resp[start : start + BLOCK].T.unsqueeze(-1)  # r_dk (x_d - c_k)
            if full:
                part = None if s2 is None else s2.baddbmm_(weighted.mT, diff)
                s2 = weighted.mT @ diff if part is None else part
            else:
                part = (weighted * diff).sum(1)
                s2 = part if s2 is None else s2.add_(part)
        if s2 is None:  # no rows
            s2 = torch.zeros((K, D, D) if full else (K, D), dtype=x.dtype)
        return {"nk": nk, "shift": c.clone(), "s1": s1, "s2": s2}

    def combine(self, a, b, alpha=1.0, beta=1.0):
        return super().combine(a, self.recentre(b, a["shift"]), alpha, beta)

    @staticmethod
    def recentre(stats: dict, shift: torch.Tensor) -> dict:
        """The same sums taken about ``shift`` instead (exact algebra, no data needed)."""
        if stats["shift"] is shift or holds((stats["shift"] == shift).all()):
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
        self._update(model, stats, nk, reg_covar)

    def m_step_expected_log_lik(self, model, stats, nk, reg_covar):
        """The update, and sum_k -1/2 [N_k log|2 pi Sigma_k| + tr(Sigma_k^-1 S_k)] at it.

        The update makes the trace known: Sigma_k = S_k / n_k + reg I (n_k = N_k + the
        M-step's 10 eps), so tr(Sigma_k^-1 S_k) = n_k (D - reg tr Sigma_k^-1); tied, diag
        and spherical likewise (the trace summed over components, or over the diagonal).
        No scatter about the new means and no solve is needed (one inverse where
        reg_covar > 0); the same Q as :meth:`expected_log_lik` to round-off.
        """
        log_det, trace = self._update(model, stats, nk, reg_covar, with_q=True)
        D = stats["s1"].shape[-1]
        n = stats["nk"]
        return -0.5 * ((n * (D * math.log(2 * math.pi) + log_det)).sum() + trace)

    def _update(self, model, stats, nk, reg_covar, with_q: bool = False):
        nk1 = nk.unsqueeze(-1)
        delta = stats["s1"] / nk1  # mu_k - c_k
        means = stats["shift"] + delta  # mu_k (PRML 9.24)
        # sum_d r_dk (x_d - mu_k)(...)^T = S_c - N_k delta delta^T, S_c the sums about c_k
        # (PRML 9.25; s1 = N_k delta, so the cross terms are N_k delta delta^T too)
        s1, s2 = stats["s1"], stats["s2"]
        if s2.dim() == 3:
            scatter = s2 - s1.unsqueeze(-1) * delta.unsqueeze(-2)
        else:
            scatter = s2 - s1 * delta
        floor = self._singular_floor(stats, means, scatter)
        kind = model.covariance_type
        if kind in ("full", "tied"):
            if kind == "full":
                cov = scatter / nk1.unsqueeze(-1)  # Sigma_k
            else:
                cov = scatter.sum(0) / nk.sum()  # one Sigma for all k
            cov.diagonal(dim1=-2, dim2=-1).add_(reg_covar)
            scale_tril, info = torch.linalg.cholesky_ex(cov)
            pivots = scale_tril.diagonal(dim1=-2, dim2=-1)
            # positive definite, no pivot below the round-off floor, none infinite
            squares = pivots * pivots
            if not holds((info == 0).all() & ((squares > floor) & (squares < math.inf)).all()):
                raise singular_covariance_error(kind)
            log_pivots = pivots.log()
            write_param(model, "means", means, unconstrained=True)  # (the reals: no transform)
            write_param(
                model, "scale_tril", scale_tril.tril(-1) + log_pivots.diag_embed(), True
            )  # (what the transform inverts to)
            if not with_q:
                return None
            log_det = 2 * log_pivots.sum(-1)  # log |Sigma|, (K,) or ()
            n_used = nk if kind == "full" else nk.sum()
            trace = n_used * stats["s1"].shape[-1]
            if reg_covar:  # tr Sigma^-1 = || L^-1 ||_F^2
                eye = torch.eye(scale_tril.shape[-1], dtype=scale_tril.dtype)
                inverse = torch.linalg.solve_triangular(scale_tril, eye, upper=False)
                trace = trace - reg_covar * n_used * (inverse * inverse).sum((-2, -1))
            return log_det, trace.sum()
        var = scatter / nk1 + reg_covar  # sigma_kj^2
        if kind == "spherical":
            var = var.mean(-1)  # one variance per component: the mean of the diagonal
        if not holds((var > floor).all() & (var < math.inf).all()):
            raise singular_covariance_error(kind)
        log_var = var.log()
        write_param(model, "means", means, unconstrained=True)
        write_param(model, "scales", 0.5 * log_var, unconstrained=True)  # log sigma
        if not with_q:
            return None
        D = stats["s1"].shape[-1]
        if kind == "spherical":
            log_det = D * log_var
            trace = nk * D if not reg_covar else nk * D * (1 - reg_covar / var)
        else:
            log_det = log_var.sum(-1)
            trace = nk * D if not reg_covar else nk * (D - reg_covar * var.reciprocal().sum(-1))
        return log_det, trace.sum()

    @staticmethod
    def _singular_floor(stats, means, scatter) -> torch.Tensor:
        """eps times the largest feature variance of the data (law of total variance).

        Below it, the round-off in a component mean alone changes (x - mu)^2 / sigma^2 by
        O(1): the likelihood is running off to a degenerate spike on a few points.
        """
        nk = stats["nk"]
        n = nk.sum()
        within = torch.diagonal(scatter, dim1=-2, dim2=-1) if scatter.dim() == 3 else scatter
        grand = (nk.unsqueeze(-1) * means).sum(0) / n  # (D,)
        spread = means - grand
        between = nk.unsqueeze(-1) * (spread * spread)  # (K, D)
        var = (within + between).sum(0) / n
        return torch.finfo(means.dtype).eps * var.max()

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

    recordable = True

    def collect(self, model, x, resp):
        return {"nk": resp.sum(0), "s1": resp.T @ x}

    def m_step(self, model, stats, nk, reg_covar):
        """mu_kj = (sum_d r_dk x_dj + reg) / (N_k + 2 reg) (PRML 9.59; EM-MIX.3)."""
        probs = (stats["s1"] + reg_covar) / (nk.unsqueeze(-1) + 2 * reg_covar)
        write_param(model, "probs", _clamp_probs(probs))

    def expected_log_lik(self, model, stats):
        p = model.probs.detach()
        s1, nk = stats["s1"], stats["nk"].unsqueeze(-1)
        return (s1 * p.log() + (nk - s1) * torch.log1p(-p)).sum(-1)


@register_statistics(PoissonMixture)
class PoissonStatistics(SufficientStatistics):
    """``s1`` = sum_d r_dk x_d (K, D); ``log_fact`` = sum_d r_dk sum_j log x_dj! (K,)."""

    recordable = True
    scale_free = True

    def collect(self, model, x, resp):
        log_fact = torch.lgamma(x + 1).sum(-1)  # (N,)
        return {"nk": resp.sum(0), "s1": resp.T @ x, "log_fact": resp.T @ log_fact}

    def m_step(self, model, stats, nk, reg_covar):
        """lambda_kj = (1 / N_k) sum_d r_dk x_dj + reg (EM-MIX.3)."""
        rates = stats["s1"] / nk.unsqueeze(-1) + reg_covar
        write_param(model, "rates", rates.clamp_min(torch.finfo(rates.dtype).tiny))

    def expected_log_lik(self, model, stats):
        rate = model.rates.detach()
        nk = stats["nk"].unsqueeze(-1)
        return (stats["s1"] * rate.log() - nk * rate).sum(-1) - stats["log_fact"]


@register_statistics(CategoricalMixture)
class CategoricalStatistics(SufficientStatistics):
    """``counts`` = sum_d r_dk [x_dj = c] (K, D, C)."""

    recordable = True

    def collect(self, model, x, resp):
        K, D, C = model.n_components, x.shape[1], model.n_categories
        # counts[k, j, c] = sum_d r_dk [x_dj = c]: each r_d added at (j, x_dj); no (N, D, C)
        cell = (torch.arange(D) * C + x.long()).reshape(-1)  # (N D,) index of (j, x_dj)
        counts = torch.zeros(D * C, K, dtype=resp.dtype)
        counts = counts.index_add(0, cell, resp.repeat_interleave(D, dim=0))
        return {"nk": resp.sum(0), "counts": counts.T.reshape(K, D, C)}

    def m_step(self, model, stats, nk, reg_covar):
        """theta_kjc = (sum_d r_dk [x_dj = c] + reg) / (N_k + C reg) (EM-MIX.3)."""
        C = model.n_categories
        probs = (stats["counts"] + reg_covar) / (nk[:, None, None] + C * reg_covar)
        probs = _clamp_probs(probs)
        write_param(model, "probs", probs / probs.sum(-1, keepdim=True))

    def expected_log_lik(self, model, stats):
        counts = stats["counts"]
        return torch.where(counts > 0, counts * model.probs.detach().log(), 0.0).sum((-1, -2))
