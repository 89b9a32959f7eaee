"""Exact inference in hidden Markov chains: forward-backward (HMM-FB) and Viterbi (HMM-VIT).

Conventions (hmmlearn's). S sequences are concatenated along time, ``lengths`` (S,) sums to
N; ``log_startprob`` (K,) is log p(z_1 = k), the state that emits the first frame of every
sequence; ``log_transmat`` (K, K) holds log A_jk = log p(z_t = k | z_t-1 = j);
``log_emission`` (N, K) holds log p_k(x_t) = log p(x_t | z_t = k). Entries of -inf (zero
probabilities) are allowed anywhere as long as every sequence keeps a positive probability.

HMM-FB (PRML (13.33)-(13.43)). With b_t(k) = p_k(x_t) exp(-m_t), m_t = max_k log p_k(x_t)
(each frame rescaled by its largest emission, added back below), the forward and backward
messages, each known up to a positive factor per frame, are

    alpha~_1 ~ pi o b_1,       alpha~_t = ((alpha~_t-1 A) o b_t) / s_t                (HMM-FB.1)
    beta~_T ~ 1,               beta~_t-1 ~ A (b_t o beta~_t)                           (HMM-FB.2)

where s_t > 0 are the renormalisations applied (s_1 = 1 with alpha~_1 = pi o b_1). Then

    log p(x) = sum_t (log s_t + m_t) + log sum_k alpha~_T(k)                          (HMM-FB.3)
    gamma_t(k) = alpha~_t(k) beta~_t(k) / omega_t,  omega_t = sum_k alpha~_t(k) beta~_t(k)
                                                                                      (HMM-FB.4)
    xi_t(j, k) = alpha~_t-1(j) A_jk b_t(k) beta~_t(k) / (s_t omega_t)                 (HMM-FB.5)

(the denominator of (HMM-FB.5) is sum_jk of its numerator, since s_t alpha~_t is the vector
(alpha~_t-1 A) o b_t). Equivalently gamma_t(k) and xi_t(j, k) are the derivatives of
log p(x) with respect to log p_k(x_t) and log A_jk, which is how the generic path (autodiff
of Pyro's enumerated likelihood) obtains them.

HMM-VIT (PRML 13.2.5): delta_t(k) = max_j (delta_t-1(j) + log A_jk) + log p_k(x_t),
psi_t(k) = argmax_j (...), the best path read back from argmax_k delta_T(k); its log
probability is then summed along the path itself.

Arithmetic. Two exact evaluations of (HMM-FB.1-2):

* scaled probabilities, when every A_jk >= a = e^-M with M <= 150: the messages are
  probabilities and every step is a matrix product. Then beta_t(j) / beta_t(j') and
  alpha_t(k) / b_t(k) over states stay within 1/a, so gamma_t(k) <= b_t(k) / a^2: an entry
  that underflows (below ~e^-708 of its frame) carries posterior mass below e^-400 and
  flushing it changes nothing, however sharp the emissions. (At the first frame of a
  sequence pi is folded into b before the rescaling, so no lower bound on pi is needed.)
  The messages lose at most a factor e^-(2M + log K) per step and are renormalised every
  few steps (``_period``).
* log space otherwise (zeros or tiny entries in A: left-right and banded models): the
  messages are logarithms, divided by their maximum at every step (log s_t), and each
  product with A is a matrix product of exp(x - max x) whose entries that come out below
  1e-250 (fed only by states far below the best one, which zeros in A make possible) are
  recomputed by an exact logsumexp (``_LogMatrix``). A state that is e^-10000 behind the
  best one for a stretch of frames is still represented, and comes back when the emissions
  favour it again.

Layouts. Python steps cost more than the arithmetic, so the frames are swept as rows of
a (C, L) grid, all rows at once:

* side by side: one row per sequence, left-padded so that every sequence ends at the last
  step (L = the longest sequence); best for many short sequences;
* blocks, for long sequences: the sequences are laid end to end as one chain of N transfer
  matrices M_t = A diag(b_t), where the first frame of every sequence has the "reset"
  M_t = 1 (pi o b_t)^T -- the message after a reset is pi o b_t whatever came before and
  the backward message before it is constant, so each sequence's messages are its own --
  and the chain is cut into C blocks of L ~ sqrt(N) / 2 frames. Then
  1. every block's transfer product P_c = M_cL ... M_cL+L-1 is formed, all blocks at once,
     in L steps (scaled: one positive factor per block suffices, the rows and columns of a
     product staying within 1/a of each other; log space: exact as above);
  2. the messages entering and leaving every block, alpha_in(c) ~ alpha_in(0) P_0 ...
     P_c-1 and beta_out(c) ~ P_c+1 ... P_C-1 1, follow from prefix and suffix products in
     log2 C batched rounds (Hillis-Steele scans);
  3. the messages inside all blocks are swept from those, L vector steps each way.
  About 3 L + 2 log2 C sequential steps instead of N, for N K^3 multiply-adds in step 1.

The layout is chosen by a rough cost model (``_use_blocks``). Viterbi uses the same
layouts in the max-plus semiring (products as K elementwise maxima, the block boundaries
as C small steps in numpy); its back-pointers are followed inside every block for all K
possible end states at once, then block to block.

Everything is computed in float64 and returned in the dtype of ``log_emission``, with no
autograd graph and on one thread (see ``_single_threaded``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ChainPosterior", "forward_backward", "viterbi"]

_WORK = torch.float64
#: A is "dense" when every log A_jk >= -_DENSE_NATS: the scaled arithmetic is exact then.
_DENSE_NATS = 150.0
#: entries of the (rows, K, K) temporary of a Viterbi step, per chunk of rows (32 MiB)
_CHUNK_ELEMENTS = 1 << 22
#: a row of xi_t at more than e^600 (before the factor A_jk) is summed in log space instead
_XI_EXP_LIMIT = 600.0


@dataclass
class ChainPosterior:
    """The exact posterior of the hidden chain given every sequence (HMM-FB).

    Attributes
    ----------
    log_likelihood:
        (S,) log p(x^(s)) of each sequence (HMM-FB.3).
    gamma:
        (N, K) p(z_t = k | x), per frame (HMM-FB.4); each row sums to one.
    xi_sum:
        (K, K) sum over every transition t-1 -> t inside a sequence of xi_t (HMM-FB.5),
        the expected transition counts of Baum-Welch.
    start:
        (S, K) gamma at the first frame of each sequence (= ``gamma[starts]``).
    xi:
        (N, K, K) per-step xi_t(j, k) = p(z_t-1 = j, z_t = k | x), zero on the first frame
        of every sequence; only when ``per_step_xi=True``, else None.
    """

    log_likelihood: torch.Tensor
    gamma: torch.Tensor
    xi_sum: torch.Tensor
    start: torch.Tensor
    xi: torch.Tensor | None = None


def forward_backward(
    log_startprob: torch.Tensor,
    log_transmat: torch.Tensor,
    log_emission: torch.Tensor,
    lengths: torch.Tensor | Sequence[int] | None = None,
    *,
    per_step_xi: bool = False,
) -> ChainPosterior:
    """Posterior marginals of a hidden Markov chain by forward-backward (HMM-FB).

    Parameters
    ----------
    log_startprob:
        (K,) log p(z_1 = k) of the state emitting the first frame of each sequence; a
        log-distribution (its logsumexp 0 within 1e-6; 1e-5 in float32), as each row of A.
    log_transmat:
        (K, K) log A_jk = log p(z_t = k | z_t-1 = j); each row a log-distribution.
    log_emission:
        (N, K) log p(x_t | z_t = k) for every frame of every sequence, concatenated.
    lengths:
        (S,) positive integers summing to N (tensor, list or array), or None for one
        sequence of N frames.
    per_step_xi:
        Also return the (N, K, K) per-step xi_t.

    -inf entries are zero probabilities; NaN and +inf are refused. float32 and float64 are
    accepted (all three tensors in one dtype, on one device); the result has that dtype.

    Returns
    -------
    ChainPosterior
        log-likelihood (S,), gamma (N, K), xi_sum (K, K), start (S, K), xi (N, K, K) or None.

    Raises
    ------
    ValueError
        For malformed input (the message names the fix), or a sequence of probability zero.
    """
    chain = _prepare(log_startprob, log_transmat, log_emission, lengths)
    return _forward_backward(chain, per_step_xi=per_step_xi)


def viterbi(
    log_startprob: torch.Tensor,
    log_transmat: torch.Tensor,
    log_emission: torch.Tensor,
    lengths: torch.Tensor | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The most probable state path of each sequence (HMM-VIT, max-product).

    Arguments as for :func:`forward_backward`.

    Returns
    -------
    (log_prob, path)
        log_prob (S,): log p(x^(s), z^(s)*) of each best path (in the input dtype);
        path (N,) int64: the best state of every frame, sequences concatenated.
        Paths that tie exactly (as far as rounding keeps them tied) are broken towards
        lower state indices, from the last frame backwards.
    """
    chain = _prepare(log_startprob, log_transmat, log_emission, lengths)
    return _viterbi(chain)


@contextmanager
def _single_threaded() -> Iterator[None]:
    """torch's intra-op threads set to 1 for the duration (and restored).

    The sweeps are hundreds of steps of small tensor operations: a second thread cannot
    share one usefully, and on a machine whose other core is busy every parallel step then
    waits for a descheduled thread (measured: 3-5x slower with 2 threads on 2 shared cores).
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ============================================================================ input checks
@dataclass
class _Chain:
    """Checked inputs in float64 and the bookkeeping of the concatenated sequences."""

    log_pi: torch.Tensor  # (K,)
    log_a: torch.Tensor  # (K, K)
    log_b: torch.Tensor  # (N, K) the emissions as given
    lengths: list[int]  # (S,)
    out_dtype: torch.dtype
    frame_max: torch.Tensor  # (N,) m_t
    first: torch.Tensor  # (S,) index of the first frame of each sequence
    is_start: torch.Tensor  # (N,) bool
    seq_id: torch.Tensor  # (N,) int64

    @property
    def log_bn(self) -> torch.Tensor:
        """(N, K) log b_t = log p_k(x_t) - m_t (formed when asked: the scaled path fuses it)."""
        return self.log_b - self.frame_max[:, None]

    @property
    def n(self) -> int:
        return self.log_b.shape[0]

    @property
    def k(self) -> int:
        return self.log_b.shape[1]

    @property
    def device(self) -> torch.device:
        return self.log_b.device


def _check_values(name: str, x: torch.Tensor) -> None:
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN; replace it by a log-probability (-inf for zero)")
    if torch.isposinf(x).any():
        raise ValueError(
            f"{name} contains +inf; log-probabilities are at most 0 for start and transition "
            "probabilities and finite for densities (use -inf for a zero probability)"
        )


def _check_normalised(name: str, lse: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    bad = (lse - 0.0).abs() > tol
    if bad.any():
        where = int(bad.nonzero()[0, 0]) if bad.dim() else None
        total = float(lse.reshape(-1)[where or 0].exp())
        row = f" row {where}" if where is not None else ""
        raise ValueError(
            f"{name}{row} sums to {total:.6g} in probability, not 1: pass log-probabilities "
            f"(torch.log of a distribution), normalised, e.g. torch.log_softmax(logits, dim=-1)"
        )


def _as_lengths(lengths, n: int) -> list[int]:
    if lengths is None:
        return [n]
    if isinstance(lengths, torch.Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(
                f"lengths must hold integers, got a {lengths.dtype} tensor; pass "
                "lengths.long() or a list of ints"
            )
        if lengths.dim() != 1:
            raise ValueError(
                f"lengths must be one-dimensional (S,), got shape {tuple(lengths.shape)}"
            )
        values = [int(v) for v in lengths.tolist()]
    else:
        try:
            items = list(lengths)
        except TypeError:
            raise ValueError(
                f"lengths must be a sequence of ints (or None for one sequence), got "
                f"{type(lengths).__name__}"
            ) from None
        values = []
        for v in items:
            if isinstance(v, bool) or not float(v).is_integer():
                raise ValueError(f"lengths must hold integers, got {v!r}")
            values.append(int(v))
    if not values:
        raise ValueError("lengths is empty: pass at least one sequence (or None for one)")
    for s, v in enumerate(values):
        if v <= 0:
            raise ValueError(
                f"lengths[{s}] = {v}: every sequence needs at least one frame; drop the empty "
                "sequences from lengths (and their rows, if any, from log_emission)"
            )
    if sum(values) != n:
        raise ValueError(
            f"lengths sum to {sum(values)} but log_emission has {n} rows (frames): lengths "
            "must split the rows of log_emission exactly"
        )
    return values


def _prepare(log_startprob, log_transmat, log_emission, lengths) -> _Chain:
    names = ("log_startprob", "log_transmat", "log_emission")
    tensors = (log_startprob, log_transmat, log_emission)
    for name, x in zip(names, tensors, strict=True):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"{name} must be float32 or float64, got {x.dtype}; pass log-probabilities "
                "as floating-point tensors"
            )
    dtype = log_emission.dtype
    for name, x in zip(names, tensors, strict=True):
        if x.dtype != dtype:
            raise ValueError(
                f"{name} is {x.dtype} but log_emission is {dtype}: pass all three in one dtype"
            )
        if x.device != log_emission.device:
            raise ValueError(
                f"{name} is on {x.device} but log_emission is on {log_emission.device}: pass "
                "all three on one device"
            )
    if log_emission.dim() != 2 or log_emission.shape[0] == 0 or log_emission.shape[1] == 0:
        raise ValueError(
            f"log_emission must be (N, K) with N >= 1 frames and K >= 1 states, got shape "
            f"{tuple(log_emission.shape)}"
        )
    n, k = log_emission.shape
    if log_startprob.shape != (k,):
        raise ValueError(
            f"log_startprob must be ({k},) to match log_emission's {k} states, got shape "
            f"{tuple(log_startprob.shape)}"
        )
    if log_transmat.shape != (k, k):
        raise ValueError(
            f"log_transmat must be ({k}, {k}) to match log_emission's {k} states, got shape "
            f"{tuple(log_transmat.shape)}"
        )
    _check_values("log_startprob", log_startprob)
    _check_values("log_transmat", log_transmat)
    lens = _as_lengths(lengths, n)

    with torch.no_grad():
        log_pi = log_startprob.detach().to(_WORK).contiguous()
        log_a = log_transmat.detach().to(_WORK).contiguous()
        log_b = log_emission.detach().to(_WORK).contiguous()
        _check_normalised("log_startprob", torch.logsumexp(log_pi, 0), dtype)
        _check_normalised("log_transmat", torch.logsumexp(log_a, 1), dtype)

        frame_max = log_b.amax(1)  # m_t; NaN and +inf show through the maximum
        _check_values("log_emission", frame_max)
        dead = torch.isneginf(frame_max)
        if dead.any():
            t = int(dead.nonzero()[0, 0])
            raise ValueError(
                f"log_emission row {t} is -inf for every state: no state can emit frame {t}, "
                "so its sequence has probability zero; fix the emission model (or drop the "
                "frame)"
            )
        device = log_b.device
        len_t = torch.tensor(lens, dtype=torch.int64, device=device)
        first = torch.cumsum(len_t, 0) - len_t
        is_start = torch.zeros(n, dtype=torch.bool, device=device)
        is_start[first] = True
        seq_id = torch.repeat_interleave(torch.arange(len(lens), device=device), len_t)
    return _Chain(
        log_pi=log_pi,
        log_a=log_a,
        log_b=log_b,
        lengths=lens,
        out_dtype=dtype,
        frame_max=frame_max,
        first=first,
        is_start=is_start,
        seq_id=seq_id,
    )


# ================================================================================= layout
@dataclass
class _Layout:
    """Frames arranged as C rows of L steps: sequences side by side, or one chain in blocks.

    ``index`` (C, L) gives each cell's frame (N for padding, whose log b is 0); ``reset``
    (L, C) marks the cells whose transfer is the reset 1 (pi o b_t)^T; ``chained`` says
    whether row c continues row c - 1 (blocks of one chain) or stands alone (sequences).
    """

    index: torch.Tensor  # (C, L) int64
    reset: torch.Tensor  # (L, C) bool
    valid: torch.Tensor | None  # cells holding frames, in frame order (None: the first N)
    chained: bool
    n: int

    def __post_init__(self) -> None:
        pad = (self.index == self.n).T
        self.inner = ~(self.reset | pad)  # (L, C) cells of a transition inside a sequence
        steps = self.reset.any(1).tolist()
        self.reset_steps: list[bool] = steps  # (L,) whether any row resets at step i
        self.reset_rows: list[torch.Tensor | None] = [
            self.reset[i].nonzero()[:, 0] if hit else None for i, hit in enumerate(steps)
        ]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.index.shape)


def _side_by_side(chain: _Chain) -> _Layout:
    """One row per sequence, left-padded so that every sequence ends at step L - 1."""
    device = chain.device
    len_t = torch.tensor(chain.lengths, dtype=torch.int64, device=device)
    steps = max(chain.lengths)
    lead = steps - len_t  # (S,) padding cells before each sequence
    pos = torch.arange(steps, device=device)[None, :]
    index = chain.first[:, None] + pos - lead[:, None]
    pad = pos < lead[:, None]
    index = torch.where(pad, chain.n, index)
    reset = (pos == lead[:, None]).T.contiguous()
    valid = (~pad).reshape(-1).nonzero()[:, 0] if bool(pad.any()) else None
    return _Layout(index, reset, valid, chained=False, n=chain.n)


def _blocks(chain: _Chain, block_length: int) -> _Layout:
    """The sequences end to end, padded at the end to C blocks of L frames.

    The padding is a sequence of its own (it starts with a reset), so the last real frame
    has beta = 1 and the padding never reaches a real frame.
    """
    device = chain.device
    n = chain.n
    steps = max(1, min(block_length, n))
    rows = -(-n // steps)
    cells = torch.arange(rows * steps, device=device)
    index = torch.where(cells < n, cells, n).reshape(rows, steps)
    starts = torch.zeros(rows * steps + 1, dtype=torch.bool, device=device)
    starts[:n] = chain.is_start
    starts[n] = True  # the padding, if any
    reset = starts[: rows * steps].reshape(rows, steps).T.contiguous()
    return _Layout(index, reset, None, chained=True, n=n)


def _cells(chain: _Chain, layout: _Layout) -> torch.Tensor:
    """log b_t at every cell, time-major (L, C, K); padding cells hold 0 (b = 1)."""
    values = chain.log_bn
    padded = torch.cat([values, values.new_zeros(1, values.shape[1])])
    return padded[layout.index.T]


def _frames(layout: _Layout, cells: torch.Tensor) -> torch.Tensor:
    """Per-cell values (L, C, ...) back to per-frame (N, ...), in frame order."""
    steps, rows = cells.shape[:2]
    flat = cells.transpose(0, 1).reshape(rows * steps, *cells.shape[2:])
    if layout.valid is None:
        return flat[: layout.n]
    return flat.index_select(0, layout.valid)


def _state_frames(
    layout: _Layout, cells: torch.Tensor, divisor: torch.Tensor | None = None
) -> torch.Tensor:
    """State-major cells (L, K, C), optionally divided by (L, C) first, as per-frame (N, K).

    (L, K, C) and (C, L, K) are the two orders of one (L K, C) matrix: a 2-D transposed copy
    (which torch blocks for the cache) moves it, three times faster than a 3-D permute.
    """
    steps, k, rows = cells.shape
    if divisor is not None:
        cells = cells.div_(divisor[:, None, :])
    flat = cells.view(steps * k, rows).t().contiguous().view(rows * steps, k)
    if layout.valid is None:
        return flat[: layout.n]
    return flat.index_select(0, layout.valid)


def _default_block_length(n: int) -> int:
    """L ~ sqrt(N) / 2: the boundaries cost only log2 C rounds, so short blocks pay."""
    return min(512, max(32, int(math.sqrt(n) / 2)))


def _use_blocks(chain: _Chain, kind: str) -> bool:
    """Whether the chained blocks beat one sweep over the longest sequence.

    Side by side costs ~T_max steps per sweep; the blocks ~3 L steps in all plus the work of
    the transfer products (N K^3 multiply-adds, and N K^2 exponentials in log space), which
    a large K makes dominant. Rough costs on one core, in seconds, measured on the kernels
    below; used only to choose the layout.
    """
    n, k, rows = chain.n, chain.k, len(chain.lengths)
    steps, length = max(chain.lengths), _default_block_length(n)
    if kind == "scaled":  # a step: two small matrix products and two products by b
        side = steps * 2 * (15e-6 + 0.5e-9 * rows * k * k)
        blocks = 3 * length * 15e-6 + 1e-9 * n * k * k + 0.5e-9 * n * k**3
    elif kind == "log":  # a step: ~15 operations, exp and log of every entry
        side = steps * 2 * (250e-6 + 100e-9 * rows * k)
        blocks = 3 * length * 250e-6 + 90e-9 * n * k * k + 0.5e-9 * n * k**3
    else:  # "max", Viterbi: one sweep, the back-tracking, max-plus products
        side = steps * 1.5 * (70e-6 + 3e-9 * rows * k * k)
        blocks = 2.5 * length * 70e-6 + 4.5e-9 * n * k * k + 3e-9 * n * k**3
    return blocks < side


def _dense(chain: _Chain) -> bool:
    return bool(chain.log_a.min() >= -_DENSE_NATS)


# ======================================================================= scaled arithmetic
@dataclass
class _Scaled:
    """Messages of the scaled arithmetic at every cell, state-major (L, K, C).

    alpha~_t = ((alpha~_t-1 A) o b_t) / s_t, where s_t is 1 except every few steps and at
    block starts (the renormalisations); beta~_t-1 ~ A (b_t o beta~_t) up to any factor.
    """

    alpha: torch.Tensor  # (L, K, C) alpha~_t
    beta: torch.Tensor  # (L, K, C) beta~_t
    weighted: torch.Tensor  # (L, K, C) b_t o beta~_t
    log_s: torch.Tensor  # (L, C) log s_t
    shift: torch.Tensor  # (N,) m_t of every frame


def _scaled_forward(
    b: torch.Tensor, layout: _Layout, a_t: torch.Tensor, alpha_in: torch.Tensor, period: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(HMM-FB.1) in every row at once: alpha~ (L, K, C) and log s_t (L, C).

    State-major: a step is the wide product A^T alpha~ (K, K) @ (K, C), twice as fast as
    (C, K) @ (K, K) for narrow K. ``b`` (L, K, C) the rescaled emissions; ``alpha_in``
    (K, C) the message before step 0, columns summing to one. At the first frame of a
    sequence b already holds pi o b (see :func:`_emission_cells`). With all
    A_jk >= e^-M a message loses at most a factor e^-(2M + log K) per step, so
    renormalising every ``period`` steps keeps it far from underflow.
    """
    steps, k, rows = b.shape
    alpha = torch.empty_like(b)
    log_s = b.new_zeros(steps, rows)
    prev = alpha_in
    cells, emit = alpha.unbind(0), b.unbind(0)  # views made once: indexing costs per step
    for i in range(steps):
        cur = cells[i]
        torch.mm(a_t, prev, out=cur)  # (alpha~_t-1 A)^T
        if layout.reset_steps[i]:
            cur[:, layout.reset_rows[i]] = 1.0  # a new sequence: the past is dropped
        cur.mul_(emit[i])  # o b_t
        if (i + 1) % period == 0:
            s = cur.sum(0)
            cur.div_(s)
            torch.log(s, out=log_s[i])
        prev = cur
    return alpha, log_s


def _scaled_backward(
    b: torch.Tensor, layout: _Layout, a: torch.Tensor, beta_out: torch.Tensor, period: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(HMM-FB.2) in every row at once: beta~ (L, K, C), any scale per cell.

    ``beta_out`` (K, C) the message at the last step. ``b`` is overwritten by b o beta~,
    the weighted messages of (HMM-FB.5) (b is not needed after this sweep).
    """
    steps = b.shape[0]
    beta = torch.empty_like(b)
    beta[steps - 1] = beta_out
    cells, emit = beta.unbind(0), b.unbind(0)
    for i in range(steps - 1, 0, -1):
        w = emit[i].mul_(cells[i])  # b_t o beta~_t
        prev = cells[i - 1]
        torch.mm(a, w, out=prev)  # A (b_t o beta~_t)
        if layout.reset_steps[i]:
            prev[:, layout.reset_rows[i]] = 1.0  # the last frame of a sequence
        if i % period == 0:
            prev.div_(prev.sum(0))
    emit[0].mul_(cells[0])
    return beta


def _scaled_products(
    b: torch.Tensor, layout: _Layout, a_t: torch.Tensor, period: int
) -> torch.Tensor:
    """Every block's transfer product P_c (C, K, K), up to one positive factor per block.

    With all A_jk >= e^-M the rows (and columns) of a product stay within e^M of each other
    and its largest entry falls by at most e^-(M + log K) per step: one scale per block,
    renormalised every ``period`` steps, keeps every entry that matters far from underflow.
    The products are built transposed, X[l, j, c] = P_c[j, l], so that a step is one wide
    matrix product (P A)^T = A^T P^T over all blocks, (K, K) @ (K, K C).
    """
    steps, k, rows = b.shape
    x = torch.eye(k, dtype=b.dtype, device=b.device)[:, :, None].expand(k, k, rows).contiguous()
    nxt = torch.empty_like(x)
    emit = b[:, :, None, :].unbind(0)
    for i in range(steps):
        torch.mm(a_t, x.view(k, k * rows), out=nxt.view(k, k * rows))  # (P A)^T
        if layout.reset_steps[i]:  # (P 1 1^T)^T where the step is a reset (pi is in b)
            here = layout.reset_rows[i]
            nxt[:, :, here] = x[:, :, here].sum(0, keepdim=True)
        nxt.mul_(emit[i])  # (... diag(b_t))^T
        if (i + 1) % period == 0 or i == steps - 1:
            nxt.div_(nxt.sum((0, 1), keepdim=True))
        x, nxt = nxt, x
    return x.permute(2, 1, 0).contiguous()


def _scan(p: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Inclusive prefix products P_0 ... P_c (or suffix products P_c ... P_C-1), (C, K, K).

    Hillis-Steele: log2 C rounds of batched products, each renormalised to sum one (with
    all A_jk >= e^-M any product keeps the bounds of :func:`_scaled_products`).
    """
    out = p / p.sum((-1, -2), keepdim=True)
    rows = out.shape[0]
    d = 1
    while d < rows:
        if reverse:  # out[c] <- out[c] out[c + d]
            head = torch.bmm(out[: rows - d], out[d:])
            out = torch.cat([head, out[rows - d :]])
        else:  # out[c] <- out[c - d] out[c]
            tail = torch.bmm(out[: rows - d], out[d:])
            out = torch.cat([out[:d], tail])
        out = out / out.sum((-1, -2), keepdim=True)
        d *= 2
    return out


def _scaled_boundaries(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Messages entering (alpha) and leaving (beta) every block, (K, C) each.

    alpha_in(c) ~ alpha_in(0) P_0 ... P_c-1 and beta_out(c) ~ P_c+1 ... P_C-1 1, from
    prefix and suffix products (log2 C batched rounds instead of C small steps).
    """
    rows, k, _ = p.shape
    alpha_in = p.new_full((k, rows), 1.0 / k)  # block 0: anything, its first frame resets
    beta_out = p.new_full((k, rows), 1.0 / k)  # the last block ends the chain
    prefix = _scan(p[:-1], reverse=False)
    suffix = _scan(p[1:], reverse=True)
    v = prefix.sum(1)  # (1/K) 1^T P_0 ... P_c-1, up to the factor
    alpha_in[:, 1:] = (v / v.sum(-1, keepdim=True)).T
    w = suffix.sum(2)  # P_c+1 ... P_C-1 1
    beta_out[:, :-1] = (w / w.sum(-1, keepdim=True)).T
    return alpha_in, beta_out


def _period(chain: _Chain) -> int:
    """Steps between renormalisations of the scaled messages and products.

    Over that many steps a message falls by at most e^-250 (e^-(2M + log K) per step), so
    its entries, their products in (HMM-FB.5) and 1 / (s_t omega_t) stay within e^+-650.
    """
    nats = 2.0 * max(1.0, -float(chain.log_a.min())) + math.log(chain.k)
    return max(1, min(16, int(250.0 / nats)))


def _emission_cells(chain: _Chain, layout: _Layout, exp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """b (or log b) at every cell, state-major (L, K, C), and the per-frame shifts m_t (N,).

    log b_t = log p_k(x_t) - m_t with m_t = max_k log p_k(x_t), except at the first frame of
    a sequence, where pi is folded in: log b_t = log pi_k + log p_k(x_t) - m_t, m_t the
    maximum of that. So the largest entry of every message after a reset is 1, however small
    some pi_k are (the bounds of the scaled arithmetic need no lower bound on pi). Padding
    cells hold b = 1.
    """
    rows, steps = layout.shape
    k, n = chain.k, chain.n
    first = chain.first
    shift = chain.frame_max.clone()
    shift[first] = _finite_or_zero((chain.log_b[first] + chain.log_pi).amax(1))  # -inf: p = 0
    b = chain.log_b.new_empty(rows * steps if layout.chained else n, k)
    torch.sub(chain.log_b, shift[:, None], out=b[:n])
    b[first] += chain.log_pi
    b[n:] = 0.0  # the padding of the chain
    if not layout.chained and layout.valid is not None:  # unequal lengths, left-padded
        b = torch.cat([b, b.new_zeros(1, k)])[layout.index.reshape(-1)]
    # to state-major by a 2-D transposed copy (see _state_frames), exp on the way
    flat = b.view(rows, steps * k).t()
    cells = torch.exp(flat, out=b.new_empty(steps * k, rows)) if exp else flat.contiguous()
    return cells.view(steps, k, rows), shift


def _scaled_messages(chain: _Chain, layout: _Layout) -> _Scaled:
    """The scaled messages at every cell (dense A)."""
    b, shift = _emission_cells(chain, layout, exp=True)
    a = chain.log_a.exp()
    a_t = a.T.contiguous()
    rows = layout.shape[0]
    period = _period(chain)
    if layout.chained and rows > 1:
        p = _scaled_products(b, layout, a_t, period)
        alpha_in, beta_out = _scaled_boundaries(p)
    else:
        alpha_in = b.new_full((chain.k, rows), 1.0 / chain.k)
        beta_out = b.new_full((chain.k, rows), 1.0 / chain.k)
    alpha, log_s = _scaled_forward(b, layout, a_t, alpha_in, period)
    beta = _scaled_backward(b, layout, a, beta_out, period)
    weighted = b  # overwritten by the backward sweep
    if layout.chained and rows > 1:
        # block c starts from alpha_in(c) = alpha~(end of c - 1) / its sum: that sum is an
        # s_t of the first frame of block c (unless it is a reset, which drops the past)
        ends = alpha[-1, :, :-1].sum(0).log()
        log_s[0, 1:] += torch.where(layout.reset[0, 1:], 0.0, ends)
    return _Scaled(alpha, beta, weighted, log_s, shift)


def _scaled_posterior(chain: _Chain, layout: _Layout, m: _Scaled, per_step_xi: bool):
    """log-likelihood, gamma, xi_sum and xi from the scaled messages (cells to frames)."""
    steps, k, rows = m.alpha.shape
    # (HMM-FB.3): log p(x) = sum_t (log s_t + m_t) + log sum_k alpha~_T(k)
    loglik = _log_likelihood(chain, _frames(layout, m.log_s), m.shift)
    if layout.chained:
        last = chain.first + torch.tensor(chain.lengths, device=chain.device) - 1
        ends = m.alpha[last % steps, :, last // steps]  # (S, K)
    else:
        ends = m.alpha[steps - 1].T
    loglik += ends.sum(-1).log()

    # (the messages are consumed in place: fresh memory costs more than the arithmetic)
    joint = m.beta.mul_(m.alpha)
    omega = joint.sum(1)  # (L, C) omega~_t

    # xi_t(j, k) = alpha~_t-1(j) A_jk (b_t o beta~_t)(k) / (s_t omega~_t)   (HMM-FB.5)
    factor = torch.where(layout.inner, torch.exp(-m.log_s) / omega, 0.0)  # (L, C)
    u0 = None
    if layout.chained and rows > 1:  # first frames of blocks: t - 1 ends the block before
        u0 = m.alpha[-1, :, :-1] * factor[0, 1:]
    u = m.alpha[:-1].mul_(factor[1:, None, :])  # alpha~_t-1 / (s_t omega~_t), t inside a row
    counts = torch.bmm(u, m.weighted[1:].transpose(1, 2)).sum(0)
    if u0 is not None:
        counts += u0 @ m.weighted[0, :, 1:].T
    gamma = _state_frames(layout, joint, omega)  # alpha~ beta~ / omega~          (HMM-FB.4)
    a = chain.log_a.exp()
    xi_sum = a * counts
    xi = None
    if per_step_xi:
        first = m.alpha.new_zeros(k, rows)
        if u0 is not None:
            first[:, 1:] = u0
        us = _state_frames(layout, torch.cat([first[None], u]))
        ws = _state_frames(layout, m.weighted)
        xi = us[:, :, None] * a * ws[:, None, :]
    return loglik, gamma, xi_sum, xi


# ========================================================================== log arithmetic
#: a shifted sum of exponentials at or above this is exact to 1e-40: every term it lost to
#: underflow was below 1e-307 (the sums are formed by matrix products, K terms at most)
_SAFE_SUM = 1e-250


class _LogMatrix:
    """A fixed matrix A given by log A, for exact products log(A^T exp(X)) of log-columns X.

    Each column is shifted by its maximum and multiplied in probability space (one matrix
    product, as in pyro's ``_logmatmulexp``); an entry whose shifted sum falls below
    ``_SAFE_SUM`` (its terms come only from states far below the column's best one, which
    zeros in A make possible) and that is not a structural zero is recomputed by an exact
    logsumexp. So every entry is exact to rounding, whatever the spread of a column.
    """

    def __init__(self, log_a: torch.Tensor) -> None:
        self.log_a = log_a  # (K, K): the exact recomputation reads column k of log A
        self.a_t = log_a.exp().T.contiguous()
        self.sparse = bool(torch.isneginf(log_a).any())
        self.support_t = (log_a > -math.inf).to(log_a.dtype).T.contiguous()

    def left(self, x: torch.Tensor, keep_shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """log(A^T exp(x)) - shift for log-columns x (K, M), and shift (M,), the column maxima
        of x (0 where a column is all -inf); with ``keep_shift`` the shift is added back."""
        shift = x.amax(0)
        shift.masked_fill_(torch.isneginf(shift), 0.0)
        r = torch.mm(self.a_t, torch.exp(x - shift))
        out = torch.log(r)
        doubt = r < _SAFE_SUM
        if self.sparse and bool(doubt.any()):  # a structural zero is exact already
            doubt &= torch.mm(self.support_t, (x > -math.inf).to(x.dtype)) > 0
        where = doubt.nonzero()
        if where.numel():
            k, m = where[:, 0], where[:, 1]
            exact = torch.logsumexp(self.log_a.T[k] + x[:, m].T, -1)
            out[k, m] = exact - shift[m]
        if keep_shift:
            out.add_(shift)
        return out, shift


def _log_bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(exp(X) exp(Y)) for batches (C, K, K), exact (same scheme as :class:`_LogMatrix`)."""
    sx = x.amax(-1, keepdim=True)
    sx.masked_fill_(torch.isneginf(sx), 0.0)
    sy = y.amax(-2, keepdim=True)
    sy.masked_fill_(torch.isneginf(sy), 0.0)
    r = torch.bmm(torch.exp(x - sx), torch.exp(y - sy))
    out = torch.log(r).add_(sx).add_(sy)
    fx, fy = (x > -math.inf).to(x.dtype), (y > -math.inf).to(y.dtype)
    doubt = (r < _SAFE_SUM) & (torch.bmm(fx, fy) > 0)
    where = doubt.nonzero()
    if where.numel():
        c, i, k = where[:, 0], where[:, 1], where[:, 2]
        out[c, i, k] = torch.logsumexp(x[c, i] + y[c, :, k], -1)
    return out


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def _log_forward(
    lb: torch.Tensor, layout: _Layout, a: _LogMatrix, alpha_in: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(HMM-FB.1) in log space, state-major: log alpha~ (L, K, C) and log s_t (L, C).

    Each step divides the previous message by its maximum (log s_t = that maximum; 0 at a
    reset, where the past is dropped and pi is already in b), so no separate
    renormalisation is needed. ``lb`` (L, K, C) log b; ``alpha_in`` (K, C) the message
    before step 0, each column with logsumexp 0.
    """
    steps = lb.shape[0]
    alpha = torch.empty_like(lb)
    log_s = lb.new_empty(steps, lb.shape[2])
    prev = alpha_in
    cells, emit, scales = alpha.unbind(0), lb.unbind(0), log_s.unbind(0)
    for i in range(steps):
        cur, shift = a.left(prev, keep_shift=False)  # log(A^T alpha~_t-1) - log s_t
        scales[i].copy_(shift)
        if layout.reset_steps[i]:
            here = layout.reset_rows[i]
            cur[:, here] = 0.0
            scales[i][here] = 0.0
        prev = torch.add(cur, emit[i], out=cells[i])
    return alpha, log_s


def _log_backward(
    lb: torch.Tensor, layout: _Layout, a_t: _LogMatrix, beta_out: torch.Tensor
) -> torch.Tensor:
    """(HMM-FB.2) in log space, state-major: log beta~ (L, K, C), any scale per cell.

    ``a_t`` holds A transposed: log(A exp(y)) column by column is log((A^T)^T exp(y)).
    """
    steps = lb.shape[0]
    beta = torch.empty_like(lb)
    beta[steps - 1] = beta_out
    cells, emit = beta.unbind(0), lb.unbind(0)
    for i in range(steps - 1, 0, -1):
        v, _ = a_t.left(cells[i] + emit[i], keep_shift=False)  # log A (b_t o beta~_t)
        if layout.reset_steps[i]:
            v[:, layout.reset_rows[i]] = 0.0  # the last frame of a sequence
        cells[i - 1].copy_(v)
    return beta


def _log_products(lb: torch.Tensor, layout: _Layout, a: _LogMatrix) -> torch.Tensor:
    """log P_c (C, K, K) of every block, exact, up to one additive constant per block.

    Built transposed, X[l, j, c] = log P_c[j, l], so that each step is one wide exact
    product of :class:`_LogMatrix` over all blocks' rows at once.
    """
    steps, k, rows = lb.shape
    x = torch.full((k, k, rows), -math.inf, dtype=lb.dtype, device=lb.device)
    x.diagonal(dim1=0, dim2=1).fill_(0.0)
    emit = lb[:, :, None, :].unbind(0)
    for i in range(steps):
        nxt, _ = a.left(x.view(k, k * rows), keep_shift=True)  # log((P A)^T)
        nxt = nxt.view(k, k, rows)
        if layout.reset_steps[i]:  # log((P 1 1^T)^T) where the step is a reset (pi is in b)
            here = layout.reset_rows[i]
            nxt[:, :, here] = torch.logsumexp(x[:, :, here], 0, keepdim=True)
        nxt.add_(emit[i])
        x = nxt.sub_(_finite_or_zero(nxt.amax((0, 1), keepdim=True)))
    return x.permute(2, 1, 0).contiguous()


def _log_scan(p: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Inclusive prefix (or suffix) products of log-matrices (C, K, K), exact (see _scan)."""
    out = p
    rows = out.shape[0]
    d = 1
    while d < rows:
        if reverse:
            out = torch.cat([_log_bmm(out[: rows - d], out[d:]), out[rows - d :]])
        else:
            out = torch.cat([out[:d], _log_bmm(out[: rows - d], out[d:])])
        out = out - _finite_or_zero(out.amax((-1, -2), keepdim=True))
        d *= 2
    return out


def _log_boundaries(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log messages entering (alpha, logsumexp 0) and leaving (beta) every block, (K, C)."""
    rows, k, _ = p.shape
    alpha_in = p.new_full((k, rows), -math.log(k))
    beta_out = p.new_zeros(k, rows)
    prefix = _log_scan(p[:-1], reverse=False)
    suffix = _log_scan(p[1:], reverse=True)
    v = torch.logsumexp(prefix, 1)  # log 1^T P_0 ... P_c-1 (up to a constant)
    alpha_in[:, 1:] = (v - torch.logsumexp(v, -1, keepdim=True)).T
    w = torch.logsumexp(suffix, 2)  # log P_c+1 ... P_C-1 1
    beta_out[:, :-1] = (w - _finite_or_zero(w.amax(-1, keepdim=True))).T
    return alpha_in, beta_out


def _log_messages(chain: _Chain, layout: _Layout):
    """log alpha~, log beta~ (N, K), log s_t (N,), m_t (N,) and log sum alpha~ (S,) at the
    last frame of each sequence, in log space (any A)."""
    lb, shift = _emission_cells(chain, layout, exp=False)
    rows = layout.shape[0]
    a = _LogMatrix(chain.log_a)
    if layout.chained and rows > 1:
        alpha_in, beta_out = _log_boundaries(_log_products(lb, layout, a))
    else:
        alpha_in = lb.new_full((chain.k, rows), -math.log(chain.k))
        beta_out = lb.new_zeros(chain.k, rows)
    alpha, log_s = _log_forward(lb, layout, a, alpha_in)
    beta = _log_backward(lb, layout, _LogMatrix(chain.log_a.T.contiguous()), beta_out)
    steps = lb.shape[0]
    if layout.chained and rows > 1:  # block c starts from alpha_in(c), see _scaled_messages
        ends = torch.logsumexp(alpha[-1, :, :-1], 0)
        log_s[0, 1:] += torch.where(layout.reset[0, 1:], 0.0, ends)
    if layout.chained:
        last = chain.first + torch.tensor(chain.lengths, device=chain.device) - 1
        final = torch.logsumexp(alpha[last % steps, :, last // steps], -1)
    else:
        final = torch.logsumexp(alpha[steps - 1], 0)
    return (
        _state_frames(layout, alpha),
        _state_frames(layout, beta),
        _frames(layout, log_s),
        shift,
        final,
    )


# ============================================================================== posterior
def _layout_for(chain: _Chain, mode: str | None, block_length: int | None, kind: str) -> _Layout:
    if mode is None:
        mode = "blocks" if _use_blocks(chain, kind) else "side_by_side"
    if mode == "blocks":
        length = block_length or _default_block_length(chain.n)
        return _blocks(chain, length)
    if mode == "side_by_side":
        return _side_by_side(chain)
    raise ValueError(f"mode must be 'blocks' or 'side_by_side', got {mode!r}")


def _log_likelihood(
    chain: _Chain, log_c: torch.Tensor, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """(HMM-FB.3) per sequence, without its last term: the sum of log s_t + m_t."""
    shift = chain.frame_max if shift is None else shift
    total = log_c.new_zeros(len(chain.lengths))
    return total.index_add_(0, chain.seq_id, log_c + shift)


def _zero_probability(chain: _Chain, loglik: torch.Tensor) -> None:
    """Raise for the sequences of probability zero (found again, side by side, exactly)."""
    layout = _side_by_side(chain)
    lb, shift = _emission_cells(chain, layout, exp=False)
    start = lb.new_full((chain.k, layout.shape[0]), -math.log(chain.k))
    alpha, log_s = _log_forward(lb, layout, _LogMatrix(chain.log_a), start)
    exact = _log_likelihood(chain, _frames(layout, log_s), shift)
    exact += torch.logsumexp(alpha[-1], 0)
    dead = (~torch.isfinite(exact)).nonzero().reshape(-1).tolist()
    if dead:
        shown = ", ".join(str(s) for s in dead[:10]) + (", ..." if len(dead) > 10 else "")
        raise ValueError(
            f"sequence(s) {shown} have probability zero under these parameters: every path "
            "through them meets a zero start, transition or emission probability; check "
            "log_startprob, the zeros of log_transmat and log_emission for those sequences"
        )


def _forward_backward(
    chain: _Chain,
    *,
    per_step_xi: bool = False,
    mode: str | None = None,
    block_length: int | None = None,
    arithmetic: str | None = None,
) -> ChainPosterior:
    with torch.no_grad(), _single_threaded():
        if arithmetic is None:
            arithmetic = "scaled" if _dense(chain) else "log"
        layout = _layout_for(chain, mode, block_length, arithmetic)
        if arithmetic == "scaled":
            loglik, gamma, xi_sum, xi = _scaled_posterior(
                chain, layout, _scaled_messages(chain, layout), per_step_xi
            )
        elif arithmetic == "log":
            log_alpha, log_beta, log_s, shift, final = _log_messages(chain, layout)
            loglik = _log_likelihood(chain, log_s, shift) + final  # (HMM-FB.3)
            gamma = xi_sum = xi = None
        else:
            raise ValueError(f"arithmetic must be 'scaled' or 'log', got {arithmetic!r}")
        if not bool(torch.isfinite(loglik).all()):
            _zero_probability(chain, loglik)
            if arithmetic == "scaled":  # not expected: the scaled path lost a sequence
                return _forward_backward(
                    chain,
                    per_step_xi=per_step_xi,
                    mode=mode,
                    block_length=block_length,
                    arithmetic="log",
                )
        if gamma is None:
            gamma, xi_sum, xi = _log_posterior(chain, log_alpha, log_beta, log_s, per_step_xi)
        dtype = chain.out_dtype
        return ChainPosterior(
            log_likelihood=loglik.to(dtype),
            gamma=gamma.to(dtype),
            xi_sum=xi_sum.to(dtype),
            start=gamma[chain.first].to(dtype),
            xi=None if xi is None else xi.to(dtype),
        )


def _log_posterior(
    chain: _Chain,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    log_s: torch.Tensor,
    per_step_xi: bool,
):
    """gamma (HMM-FB.4), xi_sum and xi (HMM-FB.5) from log-space messages, per frame."""
    joint = log_alpha + log_beta
    log_omega = torch.logsumexp(joint, -1)  # (N,)  log omega_t
    gamma = joint.sub_(log_omega[:, None]).exp_()  # alpha~ beta~ / omega

    log_a = chain.log_a
    inner = ~chain.is_start[1:]  # transitions t-1 -> t inside a sequence, t = 1 .. N-1
    # xi_t(j, k) = exp(lu_t(j) + log A_jk + lv_t(k))
    lu = log_alpha[:-1] - (log_s[1:] + log_omega[1:])[:, None]  # log alpha~_t-1 / (s_t omega_t)
    lv = chain.log_bn[1:] + log_beta[1:]  # log b_t o beta~_t (inner frames: m_t = max log p)
    shift = _finite_or_zero(lv.amax(-1, keepdim=True))
    lu.add_(shift)
    lv.sub_(shift)
    fits = lu.amax(-1) <= _XI_EXP_LIMIT  # exp(lu) can be formed
    use = inner & fits
    u = torch.where(use[:, None], lu.exp(), 0.0)
    # sum_t xi_t = A o sum_t u_t^T v_t                                             (HMM-FB.5)
    xi_sum = log_a.exp() * torch.einsum("nj,nk->jk", u, lv.exp())
    rest = (inner & ~fits).nonzero()[:, 0]
    if rest.numel():  # rows too large for exp: sum them in log space
        xi_sum += _xi_rows(lu[rest], log_a, lv[rest]).sum(0)
    xi = None
    if per_step_xi:
        xi = gamma.new_zeros(chain.n, chain.k, chain.k)
        rows = inner.nonzero()[:, 0]
        xi[rows + 1] = _xi_rows(lu[rows], log_a, lv[rows])
    return gamma, xi_sum, xi


def _xi_rows(lu: torch.Tensor, log_a: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
    """xi_t (R, K, K) = exp(lu_t(j) + log A_jk + lv_t(k)) for R frames (HMM-FB.5)."""
    return (lu[:, :, None] + log_a + lv[:, None, :]).exp_()


# ================================================================================ Viterbi
#: steps between renormalisations of delta (only its differences matter; no exp is taken)
_MAX_PERIOD = 8


def _max_sweep(
    lb: torch.Tensor, layout: _Layout, log_a: torch.Tensor, log_pi: torch.Tensor, delta_in
) -> tuple[torch.Tensor, torch.Tensor]:
    """HMM-VIT in every row: back-pointers psi (L, C, K) and the last delta (C, K).

    At a reset psi points to the best state of the frame before (the end of the previous
    sequence), so following psi through the whole chain gives every sequence's best path.
    """
    steps, rows, k = lb.shape
    log_a_t = log_a.T.contiguous()
    psi = torch.empty(steps, rows, k, dtype=torch.int64, device=lb.device)
    chunk = max(1, _CHUNK_ELEMENTS // (k * k))
    delta = delta_in
    pointers, emit = psi.unbind(0), lb.unbind(0)
    whole = rows <= chunk
    if whole:  # buffers reused by every step
        z = lb.new_empty(rows, k, k)
        deltas = (lb.new_empty(rows, k), lb.new_empty(rows, k))
    for i in range(steps):
        if whole:  # max_j delta(j) + log A_jk, reduced over the last axis
            torch.add(delta[:, None, :], log_a_t, out=z)
            best = deltas[i % 2]
            torch.max(z, -1, out=(best, pointers[i]))
        else:
            parts = [
                torch.max(delta[s : s + chunk, None, :] + log_a_t, -1)
                for s in range(0, rows, chunk)
            ]
            best = torch.cat([p[0] for p in parts])
            torch.cat([p[1] for p in parts], out=pointers[i])
        if layout.reset_steps[i]:
            here = layout.reset_rows[i]
            best[here] = log_pi
            pointers[i][here] = delta[here].argmax(-1, keepdim=True)
        best.add_(emit[i])
        if (i + 1) % _MAX_PERIOD == 0:
            best.sub_(_finite_or_zero(best.amax(-1, keepdim=True)))
        delta = best
    return psi, delta


def _max_products(
    lb: torch.Tensor, layout: _Layout, log_a: torch.Tensor, log_pi: torch.Tensor
) -> torch.Tensor:
    """Max-plus transfer products of every block (C, K, K), up to a constant per block.

    (P (x) A)[j, k] = max_l P[j, l] + log A_lk as K elementwise maxima (no (C, K, K, K)
    temporary).
    """
    steps, rows, k = lb.shape
    q = torch.full((rows, k, k), -math.inf, dtype=lb.dtype, device=lb.device)
    q.diagonal(dim1=1, dim2=2).fill_(0.0)
    nxt = torch.empty_like(q)
    emit = lb[:, :, None, :].unbind(0)
    for i in range(steps):
        torch.add(q[:, :, 0:1], log_a[0], out=nxt)
        for l in range(1, k):
            torch.maximum(nxt, q[:, :, l : l + 1] + log_a[l], out=nxt)
        if layout.reset_steps[i]:
            here = layout.reset_rows[i]
            nxt[here] = q[here].amax(-1, keepdim=True) + log_pi
        nxt.add_(emit[i])
        nxt.sub_(_finite_or_zero(nxt.amax((-1, -2), keepdim=True)))
        q, nxt = nxt, q
    return q


def _viterbi(
    chain: _Chain, *, mode: str | None = None, block_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), _single_threaded():
        layout = _layout_for(chain, mode, block_length, "max")
        lb = _cells(chain, layout)
        steps, rows, k = lb.shape
        delta_in = lb.new_zeros(rows, k)
        if layout.chained and rows > 1:
            prods = _max_products(lb, layout, chain.log_a, chain.log_pi).cpu().numpy()
            entering = np.zeros((rows, k))
            for c in range(rows - 1):  # delta entering block c + 1 (numpy: tiny steps)
                v = (entering[c][:, None] + prods[c]).max(0)
                top = v.max()
                entering[c + 1] = v - top if np.isfinite(top) else v
            delta_in = torch.from_numpy(entering).to(lb.device)
        psi, last = _max_sweep(lb, layout, chain.log_a, chain.log_pi, delta_in)

        pointers = psi.unbind(0)
        if layout.chained:
            # inside every block, follow psi back from each of the K possible end states
            paths = torch.empty(steps, rows, k, dtype=torch.int64, device=lb.device)
            paths[steps - 1] = torch.arange(k, device=lb.device)
            for i in range(steps - 1, 0, -1):
                torch.gather(pointers[i], 1, paths[i], out=paths[i - 1])
            # block to block: the end state of block c - 1 from block c (numpy: tiny steps)
            ends = [0] * rows
            ends[rows - 1] = int(last[rows - 1].argmax())
            heads = paths[0].cpu().numpy()
            entry = psi[0].cpu().numpy()
            for c in range(rows - 1, 0, -1):
                ends[c - 1] = int(entry[c, heads[c, ends[c]]])
            end = torch.tensor(ends, dtype=torch.int64, device=lb.device)
            best = paths.gather(2, end[None, :, None].expand(steps, rows, 1))[..., 0]
        else:  # every row ends its own sequence: one path per row
            best = torch.empty(steps, rows, 1, dtype=torch.int64, device=lb.device)
            best[steps - 1, :, 0] = last.argmax(-1)
            for i in range(steps - 1, 0, -1):
                torch.gather(pointers[i], 1, best[i], out=best[i - 1])
            best = best[..., 0]
        path = _frames(layout, best)

        # log p(x, z*) summed along the path
        log_pi, log_a = chain.log_pi, chain.log_a
        emit = chain.log_b.gather(1, path[:, None])[:, 0]
        move = torch.empty_like(emit)
        move[1:] = log_a[path[:-1], path[1:]]
        move[chain.is_start] = log_pi[path[chain.is_start]]
        log_prob = emit.new_zeros(len(chain.lengths)).index_add_(0, chain.seq_id, emit + move)
        if not bool(torch.isfinite(log_prob).all()):
            _zero_probability(chain, log_prob)
        return log_prob.to(chain.out_dtype), path
