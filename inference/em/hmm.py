"""Hidden Markov models in the one EM loop: Baum-Welch from the exact posterior's sums.

The E-step is forward-backward (HMM-FB, :func:`~elbolab.guides.forward_backward.
forward_backward`) at theta~; it reduces each chunk of whole sequences to

    start_k = sum_s gamma_1^(s)(k)         (K,)     expected first states
    trans_jk = sum_t xi_t(j, k)            (K, K)   expected transitions
    the emission family's component sums with r_tk = gamma_t(k)

which add up over chunks, ranks and minibatches like any family's. The M-step (HMM-M) is

    pi_k := start_k / S,   A_jk := trans_jk / sum_k' trans_jk',
    theta_k := the emission family's EM-MIX.3 from its sums,

and Q(theta~, theta) (HMM-Q) = sum_k start_k log pi_k + sum_jk trans_jk log A_jk + the
emissions' sum_t sum_k gamma_t(k) log p_k(x_t). The entropy of q is log p(x) - Q(theta~,
theta~) (EM-TIGHT with LB-1). Zeros in pi or A stay zeros (their counts are 0).
"""

from __future__ import annotations

import warnings

import torch

from ...guides.forward_backward import forward_backward
from ...models.hmm import HiddenMarkovModel
from .family import Chunk, EChunk, Family, Stats, lookup_family
from .gradient import GradientFamily
from .mixture import MixtureFamily, start_responsibilities

#: the chain's own sums, beside the emission family's
CHAIN_KEYS = ("start", "trans")


def _xlogy(count: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """count * log p with 0 log 0 = 0 (a zero probability that is never used)."""
    return torch.where(count > 0, count * p.log(), 0.0)


class HMMFamily(Family):
    """Baum-Welch for a :class:`~elbolab.models.HiddenMarkovModel` whose emission family has
    closed-form component statistics (``emission``, a :class:`.mixture.MixtureFamily`)."""

    sequences = True

    def __init__(self, emission: MixtureFamily) -> None:
        self.emission = emission
        self.fixed, self.additive = emission.fixed, emission.additive

    # ------------------------------------------------------------------ start
    def start(self, em, chunk: Chunk, rng) -> None:
        """pi and A uniform (as hmmlearn starts them), the emissions by the mixture start on
        all the frames (``em.init`` for the method); an ``init`` dict's entries win. With a
        uniform pi and A the first E-step gives the mixture's responsibilities."""
        model = em.model
        given = dict(em.init) if isinstance(em.init, dict) else {}
        model.build_for(chunk.x)
        if given:
            model.set_params(**given)  # checked before any work
        em._init_complete = set(model.param_names()) <= set(given)
        if em._init_complete:
            return
        emission_init = {k: v for k, v in given.items() if k not in CHAIN_KEYS}
        view = _EmissionView(em, emission_init or (em.init if isinstance(em.init, str) else None))
        resp = start_responsibilities(view, chunk, rng)
        if resp is not None:
            x, w = chunk.x, chunk.w
            wresp = resp if w is None else resp * w.unsqueeze(-1)
            component = self.emission.component
            for _ in range(2 if self.fixed else 1):
                stats = component.collect(model.emission, x, wresp)
                nk = stats["nk"] + 10 * torch.finfo(x.dtype).eps
                component.m_step(model.emission, stats, nk, em.reg_covar)
        if given:
            model.set_params(**given)

    # ------------------------------------------------------------------ E-step
    def e_step(self, em, chunk: Chunk, **_) -> EChunk:
        """Forward-backward over the chunk's sequences at theta~ (HMM-FB)."""
        model = em.model
        em.guide.refresh()  # theta~ := theta
        with torch.no_grad():
            post = forward_backward(*model.log_potentials(chunk.x), chunk.lengths)
            stats = self.emission.component.collect(model.emission, chunk.x, post.gamma)
            stats = stats | {"start": post.start.sum(0), "trans": post.xi_sum}
            log_lik = float(post.log_likelihood.sum())
            entropy = log_lik - self.expected_log_joint(em, stats)  # (EM-TIGHT, LB-1)
        return EChunk(stats, log_lik, entropy, float(chunk.rows), chunk.rows)

    def empty_stats(self, em) -> Stats:
        K, dtype = em.model.n_components, em.model.dtype
        sums = self.emission.empty_stats(_EmissionView(em, None))
        return sums | {
            "start": torch.zeros(K, dtype=dtype),
            "trans": torch.zeros(K, K, dtype=dtype),
        }

    # ------------------------------------------------------------------ M-step
    @torch.no_grad()
    def m_step(self, em, stats: Stats, rows: float) -> None:
        """HMM-M: pi from the first states, A from the transitions, emissions in closed form.

        A state with no expected visits keeps finite parameters (the regularised empty
        estimate of its emissions, its row of A unchanged) and a warning says which.
        """
        model, K = em.model, em.model.n_components
        start, trans = stats["start"], stats["trans"]
        model.set_params(startprob=start / start.sum())
        rows_sum = trans.sum(-1, keepdim=True)
        current = model.transmat.detach()
        tiny = torch.finfo(trans.dtype).tiny
        transmat = torch.where(rows_sum > 0, trans / rows_sum.clamp_min(tiny), current)
        model.set_params(transmat=transmat)
        component = self.emission.component
        nk = stats["nk"]
        empty = [k for k in range(K) if not float(nk[k]) > 0]
        if empty:
            warnings.warn(
                f"state(s) {empty} of the hidden Markov model are never visited (no expected "
                "frames); their emissions keep the regularised empty estimate. Use fewer "
                "states, or another start (init, seed).",
                UserWarning,
                stacklevel=4,
            )
        comp = {k: v for k, v in stats.items() if k not in CHAIN_KEYS}
        component.m_step(model.emission, comp, nk + 10 * torch.finfo(nk.dtype).eps, em.reg_covar)

    def expected_log_joint(self, em, stats: Stats) -> float:
        """Q(theta~, theta) of HMM-Q from the sums."""
        model = em.model
        chain = (
            _xlogy(stats["start"], model.startprob_).sum()
            + _xlogy(stats["trans"], model.transmat_).sum()
        )
        comp = {k: v for k, v in stats.items() if k not in CHAIN_KEYS}
        emissions = self.emission.component.expected_log_lik(model.emission, comp).sum()
        return float(chain + emissions)

    # ------------------------------------------------------------------ sums
    def total_weight(self, stats: Stats) -> float:
        return float(stats["nk"].sum())

    def combine(self, a: Stats, b: Stats, alpha: float = 1.0, beta: float = 1.0) -> Stats:
        comp = self.emission.combine(
            {k: v for k, v in a.items() if k not in CHAIN_KEYS},
            {k: v for k, v in b.items() if k not in CHAIN_KEYS},
            alpha,
            beta,
        )
        return comp | {k: alpha * a[k] + beta * b[k] for k in CHAIN_KEYS}

    def scaled(self, stats: Stats, factor: float) -> Stats:
        comp = self.emission.scaled({k: v for k, v in stats.items() if k not in CHAIN_KEYS}, factor)
        return comp | {k: stats[k] * factor for k in CHAIN_KEYS}


class _EmissionView:
    """What the mixture start reads of a fitter, pointed at the HMM's emission model."""

    def __init__(self, em, init) -> None:
        self.model, self.guide, self.reg_covar = em.model.emission, em.guide, em.reg_covar
        self.init = init if init is not None else "kmeans++"
        self._init_complete = False


def hmm_family(model: HiddenMarkovModel, m_step: str = "auto") -> Family:
    """Baum-Welch when the emission family has closed-form statistics, else the gradient
    M-step of the whole program (generalised EM)."""
    emission = lookup_family(type(model.emission))
    if m_step != "gradient" and isinstance(emission, MixtureFamily):
        return HMMFamily(emission)
    return GradientFamily()
