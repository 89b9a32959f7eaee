"""EM as maximisation of Pyro's ELBO with the exact-posterior guide (EM-1).

One iteration:

1. E-step -- the guide is refreshed, q_d(z) := p(z | x_d; theta), theta~ := theta, and
   the pass reduces the data to additive sums of expected sufficient statistics, chunk
   by chunk (the model's family, :mod:`.family`). The bound now touches the
   log-likelihood (EM-TIGHT).
2. M-step -- theta := argmax_theta sum_d LB_d(q_d, theta), in closed form from those sums
   (EM-MIX.2/3, LG-EM, HMM-M) or, for a model without one, by maximising Pyro's ELBO with
   the guide frozen.
3. Stop when the per-sample bound changes by less than ``tol``.

The loop knows no family: mixtures, PPCA and factor analysis, and hidden Markov models
all run through it, and so does a model with only a gradient M-step.

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

import numpy as np
import torch

from ...guides import ExactPosterior
from ...models.base import MixtureModel, check_positive_int
from .data import DEFAULT_CHUNK_SIZE, DataSource
from .family import Chunk, EChunk
from .fitter import EMResult, Fitter, real_number
from .gradient import elbo_loss
from .progress import progress_bar, report
from .recorded import RecordedStep

M_STEPS = ("auto", "closed-form", "gradient")


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


class EM(Fitter):
    """Expectation-maximisation for a model whose posterior is exact.

    Parameters
    ----------
    model:
        A :class:`~elbolab.models.MixtureModel`, a linear-Gaussian model (``PPCA``,
        ``FactorAnalysis``), a hidden Markov model, or a
        :class:`~elbolab.models.BayesianGaussianMixture` (variational Bayes).
    guide:
        Its exact posterior: ``ExactPosterior(model)`` for discrete latents,
        ``ExactGaussianPosterior(model)`` for PPCA and factor analysis; or
        ``MeanFieldPosterior(model)`` for a ``BayesianGaussianMixture``, with which each
        iteration is a step of coordinate ascent on the bound (CAVI: VB-Z, VB-THETA;
        ``m_step`` is then ``"cavi"`` in the result).
    m_step:
        ``"auto"`` (closed form where the model's family has one, gradient otherwise),
        ``"closed-form"`` or ``"gradient"``.
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

    n_init:
        Number of starts; the one with the highest final bound is kept.
    init:
        Mixtures: ``"kmeans++"`` (default), ``"kmeans"``, ``"random_from_data"``,
        ``"random"``; PPCA and factor analysis: ``"random"``; or a dict of parameters
        (``model.param_names()``), a partial one completed from the default start;
        variational Bayes: a method, or ``{"responsibilities": resp}`` (N, K).
    reg_covar:
        Regulariser of the closed-form M-step, in the data's units: added to covariance
        diagonals (Gaussian), a pseudo-count per sample (Bernoulli, categorical), added to
        rates (Poisson), a floor on noise variances (PPCA, FA), added to the scatter's
        diagonal in VB-THETA (as scikit-learn's). 0: the plain update.
    seed:
        Seed of the starts (and of stochastic EM's minibatches): a seed fixes a run.
    warm_start:
        Start from the model's current parameters if it already has some.
    progress:
        Show a progress bar: iterations, and the last change of the bound against ``tol``
        (:mod:`.progress`). It appears for fits longer than a second, on a terminal or in a
        notebook, and is removed when the fit stops; where stderr is not a terminal (a
        log file, a pipe) nothing is written, as tqdm does with ``disable=None``.
    callback:
        ``callback(iteration, model)`` after the start (0) and each iteration.

    ``fit`` takes a tensor or array (N, D), a list of chunks, a ``DataLoader`` or a ``.npy``
    path (:mod:`elbolab.inference.em.data`); the start is computed on the first chunk.
    """

    scheme = "EM"
    reads_chunks = True

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
            m_step=m_step,
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
        if self.distributed and not (self._closed_form() and self.family.additive):
            raise ValueError(
                f"distributed EM needs additive sufficient statistics, and "
                f"{type(model).__name__} has none with m_step={m_step!r}; register them "
                "with elbolab.inference.register_statistics."
            )
        if self.scheme == "EM" and self.stochastic:
            self.scheme = "stochastic EM (approximate)"

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
        """The start: on the first chunk, or from the summary of all the data for a family
        that summarises; with several processes rank 0's, broadcast."""
        if self.family.summarises:
            self._first_chunk(source, reset=True)  # the data decide the dtype
            summary = self._summary(source)
        if not self.distributed:
            if self.family.summarises:
                return self.family.start(self, summary, rng)
            return super()._initialize_from(source, rng)
        from .. import distributed as dist_ops

        error = None
        try:
            if self.family.summarises:
                self.family.start(self, summary, rng)
            elif dist_ops.rank() == 0:
                super()._initialize_from(source, rng)
            else:  # parameters of the right shapes; their values come from rank 0
                self.model.build_for(self._first_chunk(source, reset=True)[0])
                if self._holds_theta():
                    self.guide.build()
        except ValueError as caught:
            error = caught
        dist_ops.agree(error, "the start (computed on rank 0's first chunk)")
        with dist_ops.collective("broadcasting the start from rank 0"):
            dist_ops.broadcast_module(self.model, src=0)
            if self._holds_theta():  # q(theta) too (variational Bayes)
                dist_ops.broadcast_module(self.guide, src=0)
                self.guide.sync()

    def _reduce(self, e: EChunk, error: BaseException | None, what: str) -> EChunk:
        """Sum a pass over every rank (a no-op on one process)."""
        if not self.distributed:
            if error is not None:
                raise error
            return e
        from .. import distributed as dist_ops

        dist_ops.agree(error, what)
        scalars = torch.tensor([e.log_lik, e.entropy, e.weight, e.rows], dtype=torch.float64)
        tensors = dict(e.stats) | {"_scalars": scalars}
        with dist_ops.collective(what):
            dist_ops.all_reduce_sum(tensors, skip=self.family.fixed)
        log_lik, entropy, weight, rows = tensors.pop("_scalars").tolist()
        if rows == 0:
            raise ValueError("every shard is empty; pass data to at least one rank.")
        return EChunk(tensors, log_lik, entropy, weight, int(rows))

    # ------------------------------------------------------------------ the E-step pass
    def _e_pass(self, source: DataSource, what: str) -> EChunk:
        """One E-step over every chunk, reduced to sums (and over every rank)."""
        family, total, error = self.family, None, None
        try:
            for chunk in self._pass_chunks(source):
                part = family.e_step(self, chunk)
                total = part if total is None else family.add(total, part)
            if total is None:
                raise ValueError(
                    "this rank's shard is empty; give every rank at least one row "
                    "(fewer processes, or more data)."
                    if self.distributed
                    else "the data have no rows; pass at least one non-empty chunk."
                )
        except ValueError as caught:
            if not self.distributed:
                raise
            error = caught
        if total is None:  # an empty shard still sends its zeros
            total = EChunk(family.empty_stats(self), 0.0, 0.0, 0.0, 0)
        return self._reduce(total, error, what)

    def _pass_chunks(self, source: DataSource):
        """The chunks an E-step pass reads: the data, or the family's summary of them."""
        if self.family.summarises:
            yield self._summary(source)
            return
        yield from self._chunks(source)

    def _summary(self, source: DataSource) -> Chunk:
        """The family's theta-free summary of all the data (and ranks), made once per fit.

        Sums are taken about one shift per fit: the first chunk's mean on rank 0 (sent to
        every rank), so that they keep their digits and add up over chunks and ranks.
        """
        cached = getattr(self, "_summary_of", None)
        if cached is not None and cached[0] is source:  # one summary per fit
            return cached[1]
        family, total, rows, error = self.family, None, 0, None
        try:
            shift = self._shift(source)
            for chunk in self._chunks(source):
                part = family.summarize(self, chunk, shift)
                total = part if total is None else family.combine_summaries(total, part)
                rows += chunk.rows
            if total is None and not self.distributed:
                raise ValueError("the data have no rows; pass at least one non-empty chunk.")
        except ValueError as caught:
            error = caught
        if self.distributed:
            from .. import distributed as dist_ops

            dist_ops.agree(error, "summarising each rank's shard")
            total = family.empty_summary(self) if total is None else total
            tensors = dict(total) | {"_rows": torch.tensor([float(rows)], dtype=torch.float64)}
            with dist_ops.collective("summing the shards' summaries"):
                dist_ops.all_reduce_sum(tensors, skip=("shift",))
            rows = int(tensors.pop("_rows"))
            total = tensors
        elif error is not None:
            raise error
        summary = Chunk(None, summary=total, n_rows=rows)
        self._summary_of = (source, summary)
        return summary

    def _shift(self, source: DataSource) -> torch.Tensor:
        """The mean of the first chunk (rank 0's, on every rank)."""
        x0, w0 = self._first_chunk(source, reset=False)
        shift = x0.mean(0) if w0 is None else (x0 * w0.unsqueeze(-1)).sum(0) / w0.sum()
        if self.distributed:
            from .. import distributed as dist_ops

            with dist_ops.collective("sending rank 0's shift"):
                torch.distributed.broadcast(shift, src=0)
        return shift

    # ------------------------------------------------------------------ batch EM
    def _run_source(self, source: DataSource, desc: str) -> EMResult:
        if self.stochastic:
            return self._run_stochastic(source, desc)
        return self._run_batch(source, desc)

    def _run_batch(self, source: DataSource, desc: str) -> EMResult:
        """EM iterations from the model's current parameters (the loop lives here only)."""
        model, family, closed = self.model, self.family, self._closed_form()
        if not closed and not source.in_memory:
            raise ValueError(
                "EM over chunks needs the closed-form M-step; the gradient M-step needs the "
                "data in memory as one tensor (or use m_step='auto')."
                if self.m_step == "gradient"
                else f"EM over chunks needs a closed-form M-step, and {type(model).__name__} "
                "has none; register its sufficient statistics (register_statistics) or pass "
                "the data in memory for the gradient M-step."
            )
        if self.callback is not None:
            self.callback(0, model)
        e = self._e_pass(source, "the E-step pass at the start")
        lls, lbs = [(e.log_lik + family.bound_offset(self, e)) / e.weight], []
        previous, converged, it = lls[0], False, 0  # after an E-step, bound = ll (EM-TIGHT)
        recorded = None
        if closed and source.in_memory and RecordedStep.applies(self, source.x):
            recorded = self._recorded_step = RecordedStep(self, source.x, source.w)
        with progress_bar(self.progress, desc) as bar:
            for it in range(1, self.max_iter + 1):
                step = None if recorded is None else recorded(e)  # the same, replayed
                if step is not None:
                    q, e_next = step
                else:
                    # the M-step (EM-MIX.2/3, LG-EM, HMM-M), and Q(theta_t, theta_t+1)
                    q = family.maximize(self, e.stats, e.rows)
                    self._check_finite()
                    e_next = self._e_pass(source, f"the E-step pass of iteration {it}")
                # LB(q_t, theta_t+1) = Q(theta_t, theta_t+1) + H(q_t)    (LB-1, EM-MIX.LB)
                bound = (q + e.entropy) / e.weight
                e = e_next
                lbs.append(bound)
                lls.append((e.log_lik + family.bound_offset(self, e)) / e.weight)
                if self.callback is not None:
                    self.callback(it, model)
                report(bar, abs(bound - previous), self.tol, bound=bound)
                if abs(bound - previous) < self.tol:
                    converged = True
                    break
                previous = bound
        return EMResult(lls, lbs, converged, it, family.kind, n_passes=it + 1)

    # ------------------------------------------------------------------ stochastic EM
    def _minibatches(self, source: DataSource, generator: torch.Generator):
        """Minibatches of ``batch_size`` rows drawn at random from all the data where any row
        can be read (in memory, a list of chunks, a ``.npy`` file); otherwise (a
        ``DataLoader``, a stream) in the order given, shuffled within each chunk."""
        B = self.batch_size
        if self.family.sequences:
            yield from self._sequence_minibatches(source, generator)
            return
        if source.in_memory:
            order = torch.randperm(source.x.shape[0], generator=generator)
            for start in range(0, order.shape[0], B):
                idx = order[start : start + B]
                yield Chunk(source.x[idx], None if source.w is None else source.w[idx])
            return
        if source.n_rows is not None:
            order = torch.randperm(source.n_rows, generator=generator).numpy()
            for start in range(0, order.shape[0], B):
                idx = np.sort(order[start : start + B])  # sorted: one sweep over the file
                rows = source.rows(idx)
                yield Chunk(*self._check_chunk(start // B, int(idx[0]), *rows, reset=False))
            return
        for chunk in self._chunks(source):
            order = torch.randperm(chunk.rows, generator=generator)
            for start in range(0, chunk.rows, B):
                idx = order[start : start + B]
                yield Chunk(chunk.x[idx], None if chunk.w is None else chunk.w[idx])

    def _sequence_minibatches(self, source: DataSource, generator: torch.Generator):
        """Minibatches of whole sequences, drawn at random (within each chunk of a file),
        each of at least ``batch_size`` frames (or one sequence longer than that)."""
        for chunk in self._chunks(source):
            ends = chunk.lengths.cumsum(0)
            starts = ends - chunk.lengths
            order = torch.randperm(len(chunk.lengths), generator=generator)
            picked, rows = [], 0
            for i in order.tolist():
                picked.append(i)
                rows += int(chunk.lengths[i])
                if rows >= self.batch_size or i == int(order[-1]):
                    index = torch.cat([torch.arange(starts[j], ends[j]) for j in picked])
                    yield Chunk(chunk.x[index], None, chunk.lengths[picked])
                    picked, rows = [], 0

    def _run_stochastic(self, source: DataSource, desc: str) -> EMResult:
        """Cappe & Moulines online EM, or minibatch SVI without closed-form sums."""
        model, family = self.model, self.family
        closed = self._closed_form()
        if closed and not family.additive:
            family.combine({}, {}, 0.5, 0.5)  # raises the error that says what to do
        optimizer = None
        plate, total_weight = {}, None
        if not closed:
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
        with progress_bar(self.progress, desc, unit="pass") as bar:
            for epoch in range(1, passes + 1):
                ll_sum, weight_sum = 0.0, 0.0
                for chunk in self._minibatches(source, generator):
                    if chunk.rows == 0:  # every row of it had weight 0
                        continue
                    t += 1
                    seen += chunk.rows
                    if not closed:
                        e = family.e_step(self, chunk, **plate)  # at theta_{t-1}
                        self._svi_step(
                            optimizer, chunk.x, chunk.w, total_weight if plate else e.weight, plate
                        )
                    else:
                        if family.summarises:
                            shift = chunk.x.mean(0)
                            chunk = Chunk(
                                None,
                                summary=family.summarize(self, chunk, shift),
                                n_rows=chunk.rows,
                            )
                        e = family.e_step(self, chunk)  # at theta_{t-1}
                        sbar = family.scaled(e.stats, 1.0 / e.weight)  # the sums per unit weight
                        gamma = float(self._gamma(t))
                        if not 0 < gamma <= 1:
                            raise ValueError(
                                f"step_size gave gamma_{t} = {gamma}; keep it in (0, 1]"
                            )
                        # s_t = (1 - gamma_t) s_{t-1} + gamma_t sbar_t
                        running = (
                            sbar
                            if running is None
                            else family.combine(running, sbar, 1 - gamma, gamma)
                        )
                        family.m_step(self, running, n_total or seen)  # theta_t = theta(s_t)
                    ll_sum += e.log_lik
                    weight_sum += e.weight
                    self._check_finite()
                if weight_sum == 0:
                    raise ValueError("the data have no rows; pass at least one non-empty chunk.")
                lls.append(ll_sum / weight_sum)
                if self.callback is not None:
                    self.callback(epoch, model)
                change = abs(lls[-1] - lls[-2]) if len(lls) > 1 else float("inf")
                report(bar, change, self.tol, loglik=lls[-1])
                # the pass averages of log p(x_d) (each at the theta of its minibatch) settle
                if change < self.tol:
                    converged = True
                    break
        return EMResult(
            lls,
            [],
            converged,
            len(lls),
            "stochastic" if closed else "minibatch SVI",
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
