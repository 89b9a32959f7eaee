"""EM as maximisation of Pyro's ELBO with the exact-posterior guide (EM-1).

One iteration:

1. E-step -- ``guide.refresh(x)``: q_d(z) := p(z | x_d; theta), theta~ := theta.
   The bound now touches the log-likelihood (EM-TIGHT). With a closed form, the pass
   reduces the data to additive sums (:mod:`.statistics`), chunk by chunk.
2. M-step -- theta := argmax_theta sum_d LB_d(q_d, theta), either in closed form from
   those sums (EM-MIX.2/3) or by maximising Pyro's ELBO with the guide frozen.
3. Stop when the per-sample bound changes by less than ``tol``.

By BASIC and EM-TIGHT the log-likelihood never decreases (EM-MONO):
``log_likelihoods[t] <= lower_bounds[t] <= log_likelihoods[t + 1]``.

Because the sums add up over any split of the data, EM over chunks (a list, a
``DataLoader``, a memory-mapped ``.npy`` file) and over the shards of several processes
(``distributed=True``: the sums are all-reduced) is the same algorithm as full-batch EM, and
gives the same parameters to rounding. ``stochastic=True`` replaces the sums by running
averages over minibatches (Cappe & Moulines 2009): approximate, but one pass can be enough.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ...guides import ExactPosterior
from ...models.base import MixtureModel, check_positive_int
from .data import DEFAULT_CHUNK_SIZE, DataSource
from .fitter import EMResult, MixtureFitter, real_number
from .gradient import elbo_loss, gradient_m_step
from .registry import lookup_m_step
from .statistics import lookup_statistics

M_STEPS = ("auto", "closed-form", "gradient")
#: (rows, K) entries per E-step block (2 MiB in float64). Temporaries of this size come back
#: from the allocator already mapped; a whole (N, K) table per pass is mapped afresh each
#: time, which costs more than the arithmetic (bench/bench_em_libraries.py, faults column).
E_BLOCK_ELEMENTS = 1 << 18


@dataclass
class EPass:
    """What one E-step pass over all the data returns (sums, so chunks and ranks add up).

    ``stats``: the family's sums (None with a gradient M-step); ``log_lik``:
    sum_d w_d log p(x_d); ``neg_entropy``: sum_d w_d sum_k r_dk log r_dk; ``weight``:
    sum_d w_d; ``rows``: number of data points.
    """

    stats: dict | None
    log_lik: float
    neg_entropy: float
    weight: float
    rows: int


def check_step_size(step_size) -> Callable[[int], float]:
    """gamma_t of stochastic EM: ``t ** -step_size`` for a float in (0.5, 1], or a callable."""
    if callable(step_size):
        return step_size
    if isinstance(step_size, (bool, np.bool_)) or not isinstance(step_size, numbers.Real):
        raise ValueError(f"step_size must be a float in (0.5, 1] or a callable, got {step_size!r}")
    if not 0.5 < step_size <= 1:
        raise ValueError(
            f"step_size must be in (0.5, 1] (gamma_t = t ** -step_size: the sum of gamma_t "
            f"must diverge and that of gamma_t ** 2 converge), got {step_size!r}"
        )
    kappa = float(step_size)
    return lambda t: t**-kappa


class EM(MixtureFitter):
    """Expectation-maximisation for a model with discrete latent sites.

    Parameters
    ----------
    model:
        A :class:`~elbolab.models.MixtureModel` (or a linear-Gaussian model: ``PPCA``,
        ``FactorAnalysis``, with ``ExactGaussianPosterior(model)``: see
        :class:`~elbolab.inference.linear_gaussian.LinearGaussianEM`).
    guide:
        ``ExactPosterior(model)``.
    m_step:
        ``"auto"`` (closed form where one is registered for the model's family, gradient
        otherwise), ``"closed-form"`` or ``"gradient"``.
    tol:
        Stop when the mean per-sample bound changes by less than ``tol`` (stochastic EM:
        when the average of log p(x_d) over a pass does).
    max_iter:
        Maximum number of EM iterations per initialisation (stochastic EM: passes).
    gradient_max_iter:
        L-BFGS iterations of each gradient M-step.
    chunk_size:
        Rows read at a time from a ``.npy`` file or ``numpy.memmap``.
    stochastic:
        Stochastic (online) EM, **approximate**: after each minibatch of ``batch_size``
        rows, the running sums s_t = (1 - gamma_t) s_{t-1} + gamma_t sbar(x_b; theta_{t-1})
        (per-datum averages) are updated and theta_t is their closed-form M-step (Cappe &
        Moulines 2009). Families without closed-form sums take minibatch SVI steps instead
        (Adam on Pyro's ``TraceEnum_ELBO`` with the guide refreshed on each minibatch; for
        data in memory the model's ``"data"`` plate is subsampled, ``total_size=N``, so
        Pyro scales the minibatch ELBO by N / B, and the loss is that over the total weight).
        ``max_iter`` passes at most are made over the data (one if it is a one-shot
        iterator). Minibatches are drawn at random from all the data when any row can be
        read (in memory, a list of chunks, a ``.npy`` file); a ``DataLoader`` or a stream
        is read in its own order (shuffled within each chunk), so give it in random order.
    batch_size:
        Minibatch size of stochastic EM.
    step_size:
        Stochastic EM's gamma_t: a float kappa in (0.5, 1] for gamma_t = t ** -kappa (default
        0.6), or a callable t -> gamma_t in (0, 1].
    learning_rate:
        Adam's learning rate for the minibatch SVI steps of families without closed form.
    distributed:
        Each process of a ``torch.distributed`` job passes its own shard to ``fit``; the
        sums of every pass are all-reduced and every process takes the same M-step, so the
        result is that of one process on all the data. The start is computed on rank 0's
        first chunk and broadcast. See :mod:`elbolab.inference.distributed`.

    ``n_init``, ``init``, ``reg_covar``, ``seed``, ``warm_start``, ``progress`` and
    ``callback`` are described in :class:`~elbolab.inference.fitting.MixtureFitter`.
    ``fit`` takes a tensor or array (N, D), a list of chunks, a ``DataLoader`` or a ``.npy``
    path (:mod:`elbolab.inference.chunks`); the start is computed on the first chunk.
    """

    scheme = "EM"
    reads_chunks = True

    def __new__(cls, model=None, guide=None, *args, **kwargs):
        # A Gaussian latent has its own E- and M-steps (LG-EM): EM(model, guide) picks them.
        from ...guides.exact_gaussian import ExactGaussianPosterior
        from .linear_gaussian import LinearGaussianEM

        if cls is EM and isinstance(guide, ExactGaussianPosterior):
            cls = LinearGaussianEM
        return super().__new__(cls)

    def __init__(
        self,
        model: MixtureModel,
        guide: ExactPosterior,
        *,
        m_step: str = "auto",
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        init: str | dict = "kmeans++",
        reg_covar: float = 1e-6,
        seed: int | None = None,
        warm_start: bool = False,
        gradient_max_iter: int = 20,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        stochastic: bool = False,
        batch_size: int = 1024,
        step_size: float | Callable[[int], float] = 0.6,
        learning_rate: float = 0.01,
        distributed: bool = False,
        progress: bool = True,
        callback: Callable[[int, MixtureModel], None] | None = None,
    ) -> None:
        if m_step not in M_STEPS:
            raise ValueError(f"m_step must be one of {M_STEPS}, got {m_step!r}")
        if m_step == "closed-form" and lookup_m_step(type(model)) is None:
            raise ValueError(
                f"no closed-form M-step is registered for {type(model).__name__}; "
                "use m_step='gradient' or register one with "
                "elbolab.inference.register_m_step"
            )
        super().__init__(
            model,
            guide,
            tol=tol,
            max_iter=max_iter,
            n_init=n_init,
            init=init,
            reg_covar=reg_covar,
            seed=seed,
            warm_start=warm_start,
            progress=progress,
            callback=callback,
        )
        self.m_step = m_step
        self.gradient_max_iter = check_positive_int(
            "gradient_max_iter", gradient_max_iter, "L-BFGS iterations per gradient M-step"
        )
        self.chunk_size = check_positive_int("chunk_size", chunk_size, "rows read at a time")
        self.stochastic, self.distributed = bool(stochastic), bool(distributed)
        self.batch_size = check_positive_int("batch_size", batch_size, "rows per minibatch")
        self.step_size = step_size
        self._gamma = check_step_size(step_size)
        if not 0 < real_number("learning_rate", learning_rate) < math.inf:
            raise ValueError(f"learning_rate must be positive and finite, got {learning_rate!r}")
        self.learning_rate = float(learning_rate)
        self._single_pass = self.stochastic
        if self.stochastic and self.distributed:
            raise ValueError(
                "stochastic EM runs on one process; for several processes use exact EM "
                "(distributed=True without stochastic), which reads each shard in chunks."
            )
        if self.distributed:
            statistics = lookup_statistics(type(model)) if self._closed_form() else None
            if statistics is None or not statistics.additive:
                raise ValueError(
                    f"distributed EM needs additive sufficient statistics, and "
                    f"{type(model).__name__} has none with m_step={m_step!r}; register them "
                    "with elbolab.inference.register_statistics."
                )
        if self.scheme == "EM" and self.stochastic:
            self.scheme = "stochastic EM (approximate)"

    def _closed_form(self) -> bool:
        if self.m_step == "gradient":
            return False
        return lookup_statistics(type(self.model)) is not None

    def _after_last_run(self, x, w) -> None:
        """Nothing to do: the loop ends with an E-step at the final parameters."""

    # ------------------------------------------------------------------ distributed hooks
    def _source(self, x, sample_weight, reset: bool) -> DataSource:
        if not self.distributed:
            return super()._source(x, sample_weight, reset)
        from .. import distributed as dist_ops

        source, error = None, None
        try:
            source = super()._source(x, sample_weight, reset)
        except ValueError as caught:
            error = caught
        dist_ops.agree(error, "checking each rank's shard")
        return source

    def _check_samples(self, n: int) -> None:
        if not self.distributed:  # a shard may hold fewer rows than K; the total may not
            super()._check_samples(n)

    def _initialize_from(self, source: DataSource, rng) -> None:
        if not self.distributed:
            return super()._initialize_from(source, rng)
        from .. import distributed as dist_ops

        error = None
        try:
            if dist_ops.rank() == 0:
                super()._initialize_from(source, rng)
            else:  # parameters of the right shapes; their values come from rank 0
                self.model.build_for(self._first_chunk(source, reset=True)[0])
        except ValueError as caught:
            error = caught
        dist_ops.agree(error, "the start (computed on rank 0's first chunk)")
        with dist_ops.collective("broadcasting the start from rank 0"):
            dist_ops.broadcast_module(self.model, src=0)

    def _reduce(self, e: EPass, error: BaseException | None, what: str) -> EPass:
        """Sum a pass over every rank (a no-op on one process)."""
        if not self.distributed:
            if error is not None:
                raise error
            return e
        from .. import distributed as dist_ops

        dist_ops.agree(error, what)
        scalars = torch.tensor([e.log_lik, e.neg_entropy, e.weight, e.rows], dtype=torch.float64)
        tensors = dict(e.stats) | {"_scalars": scalars}
        fixed = lookup_statistics(type(self.model)).fixed
        with dist_ops.collective(what):
            dist_ops.all_reduce_sum(tensors, skip=fixed)
        ll, neg_entropy, weight, rows = tensors.pop("_scalars").tolist()
        if rows == 0:
            raise ValueError("every shard is empty; pass data to at least one rank.")
        return EPass(tensors, ll, neg_entropy, weight, int(rows))

    # ------------------------------------------------------------------ the E-step pass
    def _e_step(self, x, w, **plate):
        """E-step on one chunk: refresh the guide, return log p(x_d) (n,) and log r_dk (n, K).

        ``plate``: ``total_size=N`` when ``x`` is a minibatch the model's plate subsamples.
        """
        self.guide.refresh(x, w, **plate)  # (EM-1 step 1)
        log_joint = self.guide.joint(x, w, **plate).log_joint.transpose(-1, -2)  # (n, K)
        log_px = log_joint.logsumexp(-1)  # log p(x_d)
        log_resp = log_joint - log_px.unsqueeze(-1)  # log r_dk (EM-MIX.1)
        return log_px, log_resp

    def _e_pass(self, source: DataSource, what: str) -> EPass:
        """One E-step over every chunk, reduced to sums (and over every rank)."""
        statistics = lookup_statistics(type(self.model)) if self._closed_form() else None
        total = EPass(None, 0.0, 0.0, 0.0, 0)
        error = None
        # additive sums: each chunk in blocks of rows, so the (rows, K) temporaries of the
        # E-step stay small and the allocator reuses them instead of mapping fresh memory
        additive = statistics is not None and statistics.additive
        block = max(1, E_BLOCK_ELEMENTS // self.model.n_components) if additive else None
        try:
            for x, w in _row_blocks(self._chunks(source), block):
                log_px, log_resp = self._e_step(x, w)
                resp = log_resp.exp()
                wresp = resp if w is None else resp * w.unsqueeze(-1)
                total.log_lik += float(log_px.sum() if w is None else (log_px * w).sum())
                total.neg_entropy += float(torch.where(resp > 0, wresp * log_resp, 0.0).sum())
                total.weight += float(x.shape[0] if w is None else w.sum())
                total.rows += x.shape[0]
                if statistics is not None:
                    stats = statistics.collect(self.model, x, wresp)
                    total.stats = (
                        stats if total.stats is None else statistics.combine(total.stats, stats)
                    )
            if total.rows == 0 and not self.distributed:
                raise ValueError("the data have no rows; pass at least one non-empty chunk.")
            if total.rows == 0:
                raise ValueError(
                    "this rank's shard is empty; give every rank at least one row "
                    "(fewer processes, or more data)."
                )
        except ValueError as caught:
            error = caught
        if total.stats is None and statistics is not None:
            total.stats = statistics.collect(self.model, *self._empty_like())
        return self._reduce(total, error, what)

    def _empty_like(self):
        """A (0, D) chunk and (0, K) responsibilities (an empty shard still sends its zeros)."""
        dtype, D = self.model.dtype, self.model.n_features_in_
        return torch.zeros(0, D, dtype=dtype), torch.zeros(0, self.model.n_components, dtype=dtype)

    # ------------------------------------------------------------------ batch EM
    def _run(self, x, w, desc: str) -> EMResult:
        """EM iterations on data in memory (one chunk)."""
        from .data import InMemory

        return self._run_source(InMemory(x, w), desc)

    def _run_source(self, source: DataSource, desc: str) -> EMResult:
        if self.stochastic:
            return self._run_stochastic(source, desc)
        return self._run_batch(source, desc)

    def _run_batch(self, source: DataSource, desc: str) -> EMResult:
        """EM iterations from the model's current parameters (the loop lives here only)."""
        model, closed = self.model, self._closed_form()
        if not closed and not source.in_memory:
            raise ValueError(
                "EM over chunks needs the closed-form M-step; the gradient M-step needs the "
                "data in memory as one tensor (or use m_step='auto')."
                if self.m_step == "gradient"
                else f"EM over chunks needs a closed-form M-step, and {type(model).__name__} "
                "has none; register its sufficient statistics (register_statistics) or pass "
                "the data in memory for the gradient M-step."
            )
        statistics = lookup_statistics(type(model)) if closed else None
        if self.callback is not None:
            self.callback(0, model)
        e = self._e_pass(source, "the E-step pass at the start")
        lls, lbs = [e.log_lik / e.weight], []
        previous, converged, it = lls[0], False, 0  # after an E-step, bound = ll (EM-TIGHT)
        bar = tqdm(
            total=self.max_iter, desc=desc, delay=1.0, disable=not self.progress, leave=False
        )
        for it in range(1, self.max_iter + 1):
            if closed:
                self.m_step_from(statistics, e.stats, e.rows)  # (EM-MIX.2/3)
                # sum_k r_dk log(pi_k p_k(x_d) / r_dk) at the new theta (EM-MIX.LB), from the sums
                log_weights = model.weights_.log()
                expected = statistics.expected_log_lik(model, e.stats)
                joint_term = expected + torch.where(
                    e.stats["nk"] > 0, e.stats["nk"] * log_weights, 0.0
                )
                bound = (float(joint_term.sum()) - e.neg_entropy) / e.weight
            else:
                bound = gradient_m_step(
                    model, self.guide, source.x, source.w, max_iter=self.gradient_max_iter
                )
            self._check_finite()
            e = self._e_pass(source, f"the E-step pass of iteration {it}")
            lbs.append(bound)
            lls.append(e.log_lik / e.weight)
            if self.callback is not None:
                self.callback(it, model)
            bar.update(1)
            bar.set_postfix(bound=f"{bound:.6g}", refresh=False)
            if abs(bound - previous) < self.tol:
                converged = True
                break
            previous = bound
        bar.close()
        return EMResult(
            lls,
            lbs,
            converged,
            it,
            "closed-form" if closed else "gradient",
            n_passes=it + 1,
        )

    # ------------------------------------------------------------------ stochastic EM
    def _minibatches(self, source: DataSource, generator: torch.Generator):
        """Minibatches of ``batch_size`` rows drawn at random from all the data where any row
        can be read (in memory, a list of chunks, a ``.npy`` file); otherwise (a
        ``DataLoader``, a stream) in the order given, shuffled within each chunk."""
        B = self.batch_size
        if source.in_memory:
            order = torch.randperm(source.x.shape[0], generator=generator)
            for start in range(0, order.shape[0], B):
                idx = order[start : start + B]
                yield source.x[idx], None if source.w is None else source.w[idx]
            return
        if source.n_rows is not None:
            order = torch.randperm(source.n_rows, generator=generator).numpy()
            for start in range(0, order.shape[0], B):
                idx = np.sort(order[start : start + B])  # sorted: one sweep over the file
                yield self._check_chunk(start // B, int(idx[0]), *source.rows(idx), reset=False)
            return
        for x, w in self._chunks(source):
            order = torch.randperm(x.shape[0], generator=generator)
            for start in range(0, x.shape[0], B):
                idx = order[start : start + B]
                yield x[idx], None if w is None else w[idx]

    def _run_stochastic(self, source: DataSource, desc: str) -> EMResult:
        """Cappe & Moulines online EM, or minibatch SVI without closed-form sums."""
        model = self.model
        statistics = lookup_statistics(type(model)) if self._closed_form() else None
        if statistics is not None and not statistics.additive:
            statistics.combine({}, {}, 0.5, 0.5)  # raises the error that says what to do
        optimizer = None
        plate, total_weight = {}, None
        if statistics is None:
            optimizer = torch.optim.Adam(list(model.parameters()), lr=self.learning_rate)
            takes_total = "total_size" in inspect.signature(model.forward).parameters
            if source.in_memory and takes_total:  # N known: Pyro's plate scales by N / B
                plate = {"total_size": source.x.shape[0]}
                total_weight = float(source.x.shape[0] if source.w is None else source.w.sum())
        generator = torch.Generator().manual_seed(0 if self.seed is None else self.seed)
        passes = self.max_iter if source.reiterable else 1
        if source.n_rows is not None and not source.in_memory:
            for _ in self._chunks(source):  # every chunk checked once, errors naming it
                pass
        if self.callback is not None:
            self.callback(0, model)
        # rows the running sums stand for (pseudo-counts are per sample, as in batch EM):
        # all of the data where its size is known, otherwise the rows seen so far
        n_total = source.x.shape[0] if source.in_memory else source.n_rows
        running, t, lls, converged, seen = None, 0, [], False, 0
        bar = tqdm(total=passes, desc=desc, delay=1.0, disable=not self.progress, leave=False)
        for epoch in range(1, passes + 1):
            ll_sum, weight_sum = 0.0, 0.0
            for x, w in self._minibatches(source, generator):
                if x.shape[0] == 0:  # every row of it had weight 0
                    continue
                t += 1
                seen += x.shape[0]
                log_px, log_resp = self._e_step(x, w, **plate)  # at theta_{t-1}
                weight = float(x.shape[0] if w is None else w.sum())
                ll_sum += float(log_px.sum() if w is None else (log_px * w).sum())
                weight_sum += weight
                if statistics is None:
                    self._svi_step(optimizer, x, w, total_weight if plate else weight, plate)
                else:
                    resp = log_resp.exp()
                    wresp = resp if w is None else resp * w.unsqueeze(-1)
                    # sbar: the minibatch's sums per unit weight
                    sbar = {
                        k: v if k in statistics.fixed else v / weight
                        for k, v in statistics.collect(model, x, wresp).items()
                    }
                    gamma = float(self._gamma(t))
                    if not 0 < gamma <= 1:
                        raise ValueError(f"step_size gave gamma_{t} = {gamma}; keep it in (0, 1]")
                    # s_t = (1 - gamma_t) s_{t-1} + gamma_t sbar_t
                    running = (
                        sbar
                        if running is None
                        else statistics.combine(running, sbar, 1.0 - gamma, gamma)
                    )
                    self.m_step_from(statistics, running, n_total or seen)  # theta(s_t)
                self._check_finite()
            if weight_sum == 0:
                raise ValueError("the data have no rows; pass at least one non-empty chunk.")
            lls.append(ll_sum / weight_sum)
            if self.callback is not None:
                self.callback(epoch, model)
            bar.update(1)
            # the pass averages of log p(x_d) (each at the theta of its minibatch) settle
            if len(lls) > 1 and abs(lls[-1] - lls[-2]) < self.tol:
                converged = True
                break
        bar.close()
        return EMResult(
            lls,
            [],
            converged,
            len(lls),
            "stochastic" if statistics is not None else "minibatch SVI",
            n_passes=len(lls),
            approximate=True,
        )

    def _svi_step(self, optimizer, x, w, weight: float, plate: dict) -> None:
        """One Adam step on the minibatch's estimate of the bound per unit weight.

        Data in memory (``plate = {"total_size": N}``): the model's ``"data"`` plate is
        subsampled, so Pyro scales the minibatch ELBO by N / B, an unbiased estimate of the
        ELBO of all N rows, and ``weight`` is the total weight of the data. A stream (N
        unknown, ``plate = {}``): the minibatch's ELBO over its own weight.
        """
        optimizer.zero_grad()
        loss = elbo_loss(self.model, self.guide, x, w, **plate) / weight
        if not math.isfinite(float(loss.detach())):
            raise ValueError(
                "minibatch SVI produced a non-finite loss; lower learning_rate or scale the data."
            )
        loss.backward()
        optimizer.step()


def _row_blocks(chunks, block: int | None):
    """Each (x, w) chunk cut into blocks of at most ``block`` rows (None: as it comes)."""
    for x, w in chunks:
        if block is None or x.shape[0] <= block:
            yield x, w
            continue
        for start in range(0, x.shape[0], block):
            yield x[start : start + block], None if w is None else w[start : start + block]
