"""What the one EM loop asks of a model family, and the registry that finds it.

EM moves statistics, nothing else. For every model whose posterior is exact, one E-step
over a chunk of data reduces it to additive sums of expected sufficient statistics under
q(z) = p(z | x; theta~) (EM-1 step 1), and the M-step reads only those sums (EM-1 step 2):

    stats = sum over chunks (and ranks) of  family.e_step(em, chunk).stats
    family.m_step(em, stats, rows)                                  theta := argmax Q
    LB(q, theta) = family.expected_log_joint(em.model, stats) + H(q)          (LB-1)

with H(q) the entropy of the posterior the E-step used, itself a sum over the data: by
EM-TIGHT and LB-1, H(q) = log p(x; theta~) - Q(theta~, theta~), so a family that does not
know it directly gets it from its own Q. Sums add up over any split of the data, so the
loop runs unchanged on data in memory, in chunks, on several processes (the sums are
all-reduced) and on minibatches (running averages of the sums, Cappe & Moulines 2009).

A family is registered by model class, like ``torch.distributions.kl``'s ``register_kl``::

    @register_family(MyModel)
    class MyFamily(Family):
        def start(self, em, chunk, rng): ...         # build and set a starting theta
        def e_step(self, em, chunk): ...             # -> EChunk(stats, log_lik, entropy, ...)
        def m_step(self, em, stats, rows): ...       # theta from the sums
        def expected_log_joint(self, em, stats): ...  # Q(theta~, theta), from the sums

The mixtures register one family each through their component statistics
(:mod:`.mixture`), PPCA and factor analysis one (:mod:`.linear_gaussian`), hidden Markov
models one per emission family (:mod:`.hmm`). A model with no family, or EM asked for the
gradient M-step, gets :class:`GradientFamily`: the data are kept, and each M-step
maximises Pyro's ELBO with the exact guide frozen (generalised EM).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: a dict of tensors; the entries a family names in ``fixed`` are not sums
Stats = dict[str, torch.Tensor]


@dataclass
class Chunk:
    """One piece of data as the E-step sees it: ``x`` (n, D), weights (n,) or None, and
    for sequence models the lengths (S,) of the whole sequences it holds (or None).

    A family that summarises its data (``Family.summarises``) is given its summary of
    all the data instead: ``x`` None, ``summary`` its sums over ``n_rows`` rows.
    """

    x: torch.Tensor | None
    w: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    summary: Stats | None = None
    n_rows: int | None = None

    @property
    def rows(self) -> int:
        return int(self.x.shape[0]) if self.x is not None else int(self.n_rows)

    @property
    def weight(self) -> float:
        """sum_d w_d (the number of rows when unweighted)."""
        return float(self.rows if self.w is None else self.w.sum())


@dataclass
class EChunk:
    """What one E-step over a chunk returns, every field a sum over its data points.

    ``stats``: the family's sums; ``log_lik``: sum_d w_d log p(x_d; theta~); ``entropy``:
    sum_d w_d H(q_d) (a family that does not know it directly takes
    log p(x; theta~) - Q(theta~, theta~), by EM-TIGHT and LB-1); ``weight``: sum_d w_d;
    ``rows``: number of data points (frames, for sequences).
    """

    stats: Stats
    log_lik: float
    entropy: float
    weight: float
    rows: int


class Family:
    """The statistics, M-step and start of one model family; see the module docstring.

    Attributes
    ----------
    fixed:
        Entries of the statistics that say where sums were taken (a shift) and are equal
        on every chunk and rank; all others add up.
    additive:
        Whether the statistics of chunks may be averaged with weights (stochastic EM) and
        all-reduced (several processes). Non-additive families keep their chunks.
    summarises:
        Whether :meth:`summarize` reduces the data, once, to sums that do not depend on
        theta (PPCA and factor analysis: n, the mean and the scatter); the E-steps then
        read those sums instead of the data.
    sequences:
        Whether a chunk holds whole sequences (``Chunk.lengths``); chunks, minibatches and
        shards are then never cut inside a sequence.
    """

    fixed: tuple[str, ...] = ()
    additive: bool = True
    summarises: bool = False
    sequences: bool = False
    #: the ``EMResult.m_step`` label
    kind = "closed-form"

    # ------------------------------------------------------------------ the family's part
    def start(self, em, chunk: Chunk, rng) -> None:
        """Build ``em.model`` for the data and set a starting theta (``em.init``)."""
        raise NotImplementedError  # pragma: no cover - interface

    def e_step(self, em, chunk: Chunk) -> EChunk:
        """The E-step on one chunk at the model's theta~: its sums (EM-1 step 1)."""
        raise NotImplementedError  # pragma: no cover - interface

    def m_step(self, em, stats: Stats, rows: float) -> None:
        """theta := argmax_theta Q(theta~, theta) from the sums over ``rows`` data points."""
        raise NotImplementedError  # pragma: no cover - interface

    def expected_log_joint(self, em, stats: Stats) -> float:
        """Q(theta~, theta) = E_q[log p(x, z; theta)] at ``em.model``'s theta, from the sums."""
        raise NotImplementedError  # pragma: no cover - interface

    def maximize(self, em, stats: Stats, rows: float) -> float:
        """The M-step, then Q(theta~, theta) at the new theta: what the loop asks for.

        A family may take Q from the M-step's own quantities (the mixtures do: the
        closed forms make the trace terms of Q known); by default :meth:`m_step`, then
        :meth:`expected_log_joint`.
        """
        self.m_step(em, stats, rows)
        return self.expected_log_joint(em, stats)

    def bound_offset(self, em, e: EChunk) -> float:
        """A term of the bound that no chunk's sums hold, for a pass ``e`` (default 0;
        variational Bayes: -KL(q(theta) || p(theta)), counted once for all the data)."""
        return 0.0

    def empty_stats(self, em) -> Stats:
        """The sums of no data (an empty shard still sends its zeros)."""
        raise NotImplementedError  # pragma: no cover - interface

    def summarize(self, em, chunk: Chunk, shift: torch.Tensor) -> Stats:
        """theta-free sums of one chunk about ``shift`` (``summarises``)."""
        raise NotImplementedError  # pragma: no cover - only where summarises

    def combine_summaries(self, a: Stats, b: Stats) -> Stats:
        """Two chunks' summaries together."""
        raise NotImplementedError  # pragma: no cover - only where summarises

    def empty_summary(self, em) -> Stats:
        """The summary of no data."""
        raise NotImplementedError  # pragma: no cover - only where summarises

    # ------------------------------------------------------------------ sums
    def combine(self, a: Stats, b: Stats, alpha: float = 1.0, beta: float = 1.0) -> Stats:
        """alpha * a + beta * b entry by entry (the fixed entries are a's)."""
        return {k: a[k] if k in self.fixed else alpha * a[k] + beta * b[k] for k in a}

    def scaled(self, stats: Stats, factor: float) -> Stats:
        """The sums of data whose weights are all multiplied by ``factor``."""
        return {k: v if k in self.fixed else v * factor for k, v in stats.items()}

    def total_weight(self, stats: Stats) -> float:
        """sum_d w_d of the data behind ``stats`` (the M-step puts sums per mean weight)."""
        return float(stats["nk"].sum())

    def add(self, a: EChunk, b: EChunk) -> EChunk:
        """Two chunks' E-steps together."""
        return EChunk(
            self.combine(a.stats, b.stats),
            a.log_lik + b.log_lik,
            a.entropy + b.entropy,
            a.weight + b.weight,
            a.rows + b.rows,
        )


_FAMILIES: dict[type, Family] = {}


def register_family(model_class: type) -> Callable[[type[Family]], type[Family]]:
    """Class decorator registering the EM family of ``model_class`` (and its subclasses)."""
    if not isinstance(model_class, type):
        raise TypeError(f"register_family expects a class, got {model_class!r}")

    def decorator(cls: type[Family]) -> type[Family]:
        _FAMILIES[model_class] = cls()
        return cls

    return decorator


def set_family(model_class: type, family: Family) -> None:
    """Register an already built family instance for ``model_class``."""
    _FAMILIES[model_class] = family


def lookup_family(model_class: type) -> Family | None:
    """The family of ``model_class`` or of its nearest registered base, else None."""
    for cls in model_class.__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    return None
