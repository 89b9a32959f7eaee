"""What every way of fitting a model shares: options, data checks, starts, best-of-n.

A scheme (EM, direct maximisation) subclasses :class:`Fitter` and writes only its own
loop, ``_run_source``; validation, the family (:mod:`.family`: the model's statistics and
start), initialisation, ``n_init`` restarts, keeping the best bound, and the convergence
warning live here once.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from torch.distributions import constraints

from ...guides import ExactGaussianPosterior, ExactPosterior, MeanFieldPosterior
from ...models.base import MixtureModel, as_data_tensor, as_tensor, check_seed
from ...models.conjugate import ConjugateMixture
from ...models.enumeration import holds
from ...models.hmm import HiddenMarkovModel, check_lengths
from ...models.linear_gaussian import LinearGaussian
from .data import (
    DEFAULT_CHUNK_SIZE,
    DataSource,
    InMemory,
    SequenceFile,
    chunked_source,
    is_chunked,
)
from .family import Chunk, Family, lookup_family
from .gradient import GradientFamily
from .init import INIT_METHODS


@dataclass
class EMResult:
    """What one EM fit did.

    Attributes
    ----------
    log_likelihoods:
        Mean per-sample log p(x; theta_t) after each E-step, t = 0..n_iter
        (``n_iter + 1`` values: the E-step before each M-step and the one after the last).
    lower_bounds:
        Mean per-sample bound LB(q_t, theta_{t+1}) after each M-step (``n_iter`` values).
    converged:
        True only if the change of the bound fell below ``tol`` (never because
        ``max_iter`` was reached).
    n_iter:
        Number of M-steps taken.
    m_step:
        ``"closed-form"`` or ``"gradient"``.
    init_lower_bounds:
        Final bound of every initialisation; the best one is kept.
    best_init:
        Index of the kept initialisation.
    fit_time:
        Seconds spent in ``fit``, initialisations included.
    n_passes:
        Passes over the data (E-steps over every chunk) of the kept run.
    approximate:
        True for stochastic EM: ``log_likelihoods`` are then running averages of
        log p(x_b) over each pass's minibatches, and ``lower_bounds`` is empty.
    """

    log_likelihoods: list[float]
    lower_bounds: list[float]
    converged: bool
    n_iter: int
    m_step: str
    init_lower_bounds: list[float] = field(default_factory=list)
    best_init: int = 0
    fit_time: float = 0.0
    n_passes: int = 0
    approximate: bool = False

    @property
    def log_likelihood(self) -> float:
        """Mean per-sample log-likelihood at the returned parameters."""
        return self.log_likelihoods[-1]

    @property
    def lower_bound(self) -> float:
        """Final mean per-sample bound (the log-likelihood if no M-step was taken)."""
        return self.lower_bounds[-1] if self.lower_bounds else self.log_likelihoods[-1]


def check_sample_weight(
    sample_weight, n: int, dtype: torch.dtype, positive_sum: bool = True
) -> torch.Tensor | None:
    """``sample_weight`` as a tensor of shape (n,), or a ``ValueError`` with the fix.

    ``positive_sum=False`` for one chunk: only the whole data need a positive total.
    """
    if sample_weight is None:
        return None
    w = as_tensor(sample_weight, torch.float64, "sample_weight")
    if w.shape != (n,):
        raise ValueError(
            f"sample_weight must have shape ({n},), one weight per sample, got {tuple(w.shape)}"
        )
    if (
        not bool(torch.isfinite(w).all())
        or bool((w < 0).any())
        or (positive_sum and not bool((w > 0).any()))
    ):
        raise ValueError("sample_weight must be finite and non-negative with a positive sum")
    cast = w.to(dtype)
    if not bool(torch.isfinite(cast).all()) or bool(((cast == 0) & (w > 0)).any()):
        raise ValueError(
            f"sample_weight has values that {dtype} (the data's dtype) cannot hold (largest "
            f"{float(w.max()):.3g}, smallest positive {float(w[w > 0].min()):.3g}); only their "
            "ratios matter, so divide them by their mean, or pass float64 data"
        )
    return cast


def drop_zero_weights(x: torch.Tensor, w: torch.Tensor | None) -> tuple:
    """Rows of weight 0 contribute nothing to any sum or bound: leave them out.

    (Pyro's ``poutine.scale`` takes positive scales only.)
    """
    if w is None or bool((w > 0).all()):
        return x, w
    keep = w > 0
    return x[keep], w[keep]


def real_number(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_fit_options(*, tol, max_iter: int, n_init: int, reg_covar) -> None:
    """``ValueError`` with the fix for options every EM-like fitter shares."""
    for name, value in (("max_iter", max_iter), ("n_init", n_init)):
        if (
            isinstance(value, (bool, np.bool_))
            or not isinstance(value, (int, np.integer))
            or value < 1
        ):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not real_number("tol", tol) >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    reg = real_number("reg_covar", reg_covar)
    if not 0 <= reg < math.inf:
        raise ValueError(
            f"reg_covar must be finite and >= 0, got {reg_covar!r}; it is added to the "
            "covariances (or used as a pseudo-count), e.g. reg_covar=1e-6"
        )


#: the init methods each kind of model takes (a dict of parameters always works)
LINEAR_GAUSSIAN_INIT = ("random",)


def family_for(model, m_step: str = "auto") -> Family:
    """The EM family of ``model``: its registered one, or :class:`GradientFamily` for
    ``m_step="gradient"`` or a model with none (``ValueError`` with the fix where a closed
    form is asked for and none exists, or where the model needs its own)."""
    if isinstance(model, HiddenMarkovModel):
        from .hmm import hmm_family

        return hmm_family(model, m_step)
    family = lookup_family(type(model))
    if isinstance(model, ConjugateMixture):
        if m_step == "gradient":
            raise ValueError(
                "variational Bayes' M-step is the closed-form update of q(theta) (VB-THETA); "
                "pass m_step='auto' or 'closed-form'"
            )
        return family
    if isinstance(model, LinearGaussian):
        if m_step == "gradient":
            raise ValueError(
                "linear-Gaussian models use the closed-form M-step (LG-EM); pass "
                "m_step='auto' or 'closed-form'"
            )
        return family
    if m_step == "gradient":
        return GradientFamily()
    if family is None:
        if m_step == "closed-form":
            raise ValueError(
                f"no closed-form M-step is registered for {type(model).__name__}; use "
                "m_step='gradient' or register one with elbolab.inference.register_m_step"
            )
        return GradientFamily()
    return family


class Fitter:
    """Shared machinery of the fitting schemes; see :class:`~elbolab.inference.EM`.

    Parameters
    ----------
    model:
        A :class:`~elbolab.models.MixtureModel`, or (EM) ``PPCA``/``FactorAnalysis``.
    guide:
        The model's exact posterior: ``ExactPosterior(model)`` for discrete latents,
        ``ExactGaussianPosterior(model)`` for PPCA and factor analysis.
    tol, max_iter:
        Stop when the monitored mean per-sample objective changes by less than ``tol``, or
        after ``max_iter`` iterations per start.
    n_init:
        Number of starts; the one with the highest final bound is kept.
    init:
        Mixtures: ``"kmeans++"`` (default), ``"kmeans"``, ``"random_from_data"``,
        ``"random"``; PPCA and factor analysis: ``"random"`` (the default there); or a
        dict of parameters (``model.param_names()``; a partial dict is completed from the
        default start).
    reg_covar:
        Regulariser of the closed-form M-step, in the data's units; 0 gives the plain
        maximum-likelihood update.
    seed:
        Seed of the initialisations.
    warm_start:
        Start from the model's current parameters if it already has some.
    progress:
        Show a progress bar (:mod:`.progress`: iterations and the last change against
        ``tol``), for fits longer than a second, on a terminal or in a notebook; nothing
        is written where stderr is not a terminal.
    callback:
        ``callback(iteration, model)`` after the start (0) and each iteration.
    """

    #: name used in messages
    scheme = "fitting"
    #: L-BFGS iterations of a gradient M-step (starts of families with no closed form)
    gradient_max_iter = 20
    #: whether ``fit`` accepts chunked data (lists of chunks, DataLoaders, .npy paths)
    reads_chunks = False
    #: rows per chunk read from a .npy file
    chunk_size = DEFAULT_CHUNK_SIZE
    #: whether one pass over the data is enough (a one-shot iterator is then accepted)
    _single_pass = False
    #: whether the last start came entirely from an ``init`` dict
    _init_complete = False

    def __init__(
        self,
        model: MixtureModel,
        guide: ExactPosterior,
        *,
        tol: float,
        max_iter: int,
        n_init: int = 1,
        init: str | dict = "kmeans++",
        reg_covar: float = 1e-6,
        seed: int | None = None,
        warm_start: bool = False,
        progress: bool = True,
        callback: Callable[[int, MixtureModel], None] | None = None,
        m_step: str = "auto",
    ) -> None:
        if isinstance(model, LinearGaussian):
            if not isinstance(guide, ExactGaussianPosterior) or guide.model is not model:
                raise ValueError("guide must be ExactGaussianPosterior(model) for this same model")
            if init == "kmeans++":  # the mixtures' default
                init = "random"
            methods = LINEAR_GAUSSIAN_INIT
        elif isinstance(model, ConjugateMixture):
            if not isinstance(guide, MeanFieldPosterior) or guide.model is not model:
                raise ValueError(
                    "guide must be MeanFieldPosterior(model) for this same model: variational "
                    "Bayes needs q(theta) as well as q(z)"
                )
            methods = INIT_METHODS
        elif isinstance(model, (MixtureModel, HiddenMarkovModel)):
            if not isinstance(guide, ExactPosterior) or guide.model is not model:
                raise ValueError("guide must be ExactPosterior(model) for this same model")
            methods = INIT_METHODS
        elif isinstance(guide, ExactPosterior) and guide.model is model:
            # any other program whose latents Pyro can enumerate: the gradient M-step
            if init not in ("kmeans++", None) or m_step == "closed-form":
                raise ValueError(
                    f"{type(model).__name__} has no init methods or closed form of its own: "
                    "EM starts it from its current parameters and takes gradient M-steps "
                    "(m_step='auto' or 'gradient', no init)"
                )
            init, methods = "kmeans++", ("kmeans++",)
        else:
            raise ValueError(
                f"{type(self).__name__} fits mixtures (a MixtureModel), PPCA and factor "
                f"analysis, hidden Markov models, and any program whose latents Pyro can "
                f"enumerate (with ExactPosterior(model)); got {type(model).__name__}. PPCA "
                "and factor analysis: EM(model, ExactGaussianPosterior(model)); a VAE: "
                "SVITrainer(model, AmortizedNormal(...))"
            )
        if callback is not None and not callable(callback):
            raise ValueError(
                f"callback must be a function callback(iteration, model) or None, got {callback!r}"
            )
        if not isinstance(init, dict) and not (isinstance(init, str) and init in methods):
            raise ValueError(f"init must be one of {methods} or a dict, got {init!r}")
        check_fit_options(tol=tol, max_iter=max_iter, n_init=n_init, reg_covar=reg_covar)
        if isinstance(init, dict) and isinstance(model, LinearGaussian):
            unknown = sorted(set(init) - set(model.param_names()))
            if unknown:  # (a mixture's dict is checked when it is built for the data)
                raise ValueError(
                    f"unknown init entr{'y' if len(unknown) == 1 else 'ies'} {unknown} for "
                    f"{type(model).__name__}; use {', '.join(model.param_names())}"
                )
            copy.deepcopy(model).set_params(**init)  # shapes are known now: check a copy
        self.model, self.guide = model, guide
        self.family = family_for(model, m_step)
        self.tol, self.max_iter, self.n_init = float(tol), int(max_iter), int(n_init)
        self.init, self.reg_covar, self.seed = init, float(reg_covar), check_seed(seed)
        self.warm_start, self.progress, self.callback = warm_start, progress, callback
        self.result_: EMResult | None = None

    # ------------------------------------------------------------------ to override
    def _run_source(self, source: DataSource, desc: str) -> EMResult:
        """Iterate from the model's current parameters; the scheme's own loop."""
        raise NotImplementedError

    def _closed_form(self) -> bool:
        """Whether M-steps (and the start) use a registered closed form."""
        return self.family.kind in ("closed-form", "cavi")

    # ------------------------------------------------------------------ public
    def fit(self, x, sample_weight=None, lengths=None) -> EMResult:
        """Fit the model to ``x``; returns an :class:`EMResult` (also ``result_``).

        ``x`` is a tensor or array (N, D), or -- for schemes that read data in chunks (EM) --
        a list of 2-D chunks, a ``DataLoader``, or a path to a ``.npy`` file (see
        :mod:`.data`). Sequence models (hidden Markov models) take the frames of several
        sequences concatenated with their ``lengths`` (S,) as hmmlearn does, a list of
        (T_i, D) sequences, or a ``.npy`` path with ``lengths`` (read a few whole sequences
        at a time). On an error the parameters of a model fitted before are restored.
        """
        start = time.perf_counter()
        model = self.model
        built = getattr(model, "is_built", True)
        saved = self._snapshot() if built else None
        try:
            best = self._fit(x, sample_weight, lengths)
        except BaseException:
            if saved is not None and getattr(model, "is_built", True):
                self._restore(saved)  # nothing half-fitted is left behind
            elif saved is None:
                model.unbuild()  # a model without parameters before stays without them
                if self._holds_theta():
                    self.guide.unbuild()
            raise
        best.fit_time = time.perf_counter() - start
        if not best.converged and not best.approximate:
            warnings.warn(
                f"{self.scheme} did not converge in max_iter={self.max_iter} iterations (last "
                f"change above tol={self.tol:g}); raise max_iter or tol, or check the data.",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.result_ = best
        return best

    def _holds_theta(self) -> bool:
        """Whether the guide holds part of the fit (q(theta) of variational Bayes)."""
        return isinstance(self.guide, MeanFieldPosterior)

    def _snapshot(self) -> dict:
        """Copies of the model's state (and of the guide's, where it holds q(theta))."""
        state = {"model": copy.deepcopy(self.model.state_dict())}
        if self._holds_theta() and self.guide.is_built:
            state["guide"] = copy.deepcopy(self.guide.state_dict())
        return state

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if "guide" in state:
            self.guide.load_state_dict(state["guide"])

    def _fit(self, x, sample_weight, lengths=None) -> EMResult:
        model, guide = self.model, self.guide
        warm = self.warm_start and getattr(model, "is_built", True)
        self._weight_scale = 1.0 if getattr(self, "distributed", False) else None
        if self.family.sequences or getattr(model, "validate_sequences", None) is not None:
            source = self._sequence_source(x, sample_weight, lengths, reset=not warm)
        elif lengths is not None:
            raise ValueError(
                f"lengths goes with sequence models (hidden Markov models); a "
                f"{type(model).__name__} treats every row as its own sample: drop lengths"
            )
        else:
            source = self._source(x, sample_weight, reset=not warm)
        rng = np.random.default_rng(self.seed)
        # a complete init dict (or a warm start) is one start; more would repeat it
        n_init = 1 if warm or not source.reiterable else self.n_init
        best, best_state, finals = None, None, []
        i = 0
        while i < n_init:
            if not warm:
                self._initialize_from(source, rng)
                if i == 0 and self._init_complete:
                    n_init = 1
            desc = f"{self.scheme} {i + 1}/{n_init}" if n_init > 1 else self.scheme
            result = self._run_source(source, desc)
            finals.append(result.lower_bound)
            if best is None or result.lower_bound > best.lower_bound:
                best, best_state = result, self._snapshot()
                best.best_init = i
            i += 1
        # the guide ends as the posterior at the returned parameters
        if best.best_init != n_init - 1:
            self._restore(best_state)
            if source.in_memory and source.lengths is None:
                guide.refresh(source.x, source.w)
            else:
                guide.refresh()
        elif source.in_memory and source.lengths is None:
            self._after_last_run(source.x, source.w)
        best.init_lower_bounds = finals
        return best

    def _after_last_run(self, x, w) -> None:
        """Bring the guide to the final parameters (EM's loop already did)."""
        self.guide.refresh(x, w)

    def _source(self, x, sample_weight, reset: bool) -> DataSource:
        """The data as a :class:`~.chunks.DataSource`; in-memory data are checked here."""
        if not is_chunked(x):
            x = _validated(self.model, x, reset)
            w = self._scale_weights(check_sample_weight(sample_weight, x.shape[0], x.dtype))
            x, w = drop_zero_weights(x, w)
            self._check_samples(x.shape[0])
            return InMemory(x, w)
        if not self.reads_chunks:
            raise ValueError(
                f"{self.scheme} needs the data in memory as one (N, D) tensor or array; "
                "EM reads lists of chunks, DataLoaders and .npy files."
            )
        if sample_weight is not None:
            raise ValueError(
                "sample_weight goes with in-memory data; give chunked data as "
                "(x_chunk, weight_chunk) pairs instead."
            )
        source = chunked_source(x, self.chunk_size)
        if not source.reiterable and not self._single_pass:
            raise ValueError(
                f"{self.scheme} passes over the data once per iteration, so chunks must be "
                "re-iterable: a list of arrays, a DataLoader or a .npy path, not a generator."
                + (
                    ""
                    if getattr(self, "distributed", False)
                    else " For data seen only once use stochastic=True."
                )
            )
        n_init = 1 if isinstance(self.init, dict) else self.n_init
        if not source.reiterable and n_init > 1:
            raise ValueError(
                f"a one-shot iterator can be read once, and n_init={n_init} asks for a pass "
                "per start; pass n_init=1, or re-iterable chunks (a list, a .npy path)."
            )
        return source

    def _sequence_source(self, x, sample_weight, lengths, reset: bool) -> DataSource:
        """Sequences in memory (frames and lengths, or a list of sequences) or in a ``.npy``
        file with ``lengths``; every check before any work."""
        if sample_weight is not None:
            raise ValueError(
                "hidden Markov models take no sample_weight (a weight per frame would break "
                "the chain); repeat a sequence to count it more"
            )
        model = self.model
        if isinstance(x, (str, os.PathLike, np.memmap)):
            if not self.reads_chunks:
                raise ValueError(f"{self.scheme} needs the sequences in memory")
            if lengths is None:
                raise ValueError(
                    "a .npy file of frames needs their lengths (one per sequence), so that "
                    "chunks hold whole sequences: fit(path, lengths=lengths)"
                )
            array = np.load(x, mmap_mode="r") if not isinstance(x, np.memmap) else x
            lengths = check_lengths(lengths, len(array))
            source = SequenceFile(x, self.chunk_size, lengths)
            first = next(source.sequence_chunks())
            model.validate_sequences(first[0], first[1], reset=reset)  # decides the dtype
            return source
        frames, lengths = model.validate_sequences(x, lengths, reset=reset)
        return InMemory(frames, None, lengths)

    def _scale_weights(self, w: torch.Tensor | None) -> torch.Tensor | None:
        """Weights times one power of two per fit (chosen on the first weights seen).

        Exact (a power of two only moves the exponent), so every sum is the same up to that
        factor, but weights of any size (1e-300 or 1e300) keep the sums of products with
        responsibilities clear of underflow and overflow. The M-steps read the sums per unit
        of mean weight (the families' ``m_step``), so the factor cancels. One process only:
        ranks of a distributed fit keep their weights (their sums must add up as given).
        """
        if w is None:
            return None
        if self._weight_scale is None:
            largest = float(w.max()) if w.numel() else 0.0
            if not largest > 0:
                return w
            self._weight_scale = 2.0 ** -round(np.log2(largest))
        return w if self._weight_scale == 1.0 else w * self._weight_scale

    def _check_samples(self, n: int) -> None:
        K = getattr(self.model, "n_components", 1)
        if n < K:
            raise ValueError(
                f"x has {n} samples but the model has {K} components; "
                f"pass at least {K} samples or use fewer components."
            )

    def _chunks(self, source: DataSource, first: tuple | None = None) -> Iterator[Chunk]:
        """One pass of validated chunks; ``first`` replaces the first one read.

        Errors name the chunk and its first row, and keep the message's fix.
        """
        if source.in_memory:
            yield Chunk(source.x, source.w, source.lengths)
            return
        if isinstance(source, SequenceFile):
            row = 0
            for i, (xc, lc) in enumerate(source.sequence_chunks()):
                try:
                    xc, lc = self.model.validate_sequences(xc, lc)
                except ValueError as error:
                    raise ValueError(f"chunk {i} (from row {row}): {error}") from None
                yield Chunk(xc, None, lc)
                row += xc.shape[0]
            return
        row = 0
        for i, (xc, wc) in enumerate(source.chunks()):
            rows = len(xc) if hasattr(xc, "__len__") else 0
            if i == 0 and first is not None:
                xc, wc = first
            else:
                xc, wc = self._check_chunk(i, row, xc, wc, reset=False)
            if xc.shape[0] > 0:  # (a chunk of weight 0 throughout is left out whole)
                yield Chunk(xc, wc)
            row += rows

    def _check_chunk(self, i: int, row: int, xc, wc, reset: bool) -> tuple:
        try:
            xc = self.model.validate_data(xc, reset=reset)
            if wc is not None and not _is_floating(wc):
                raise ValueError(
                    f"the second item of each chunk is read as sample weights, and this one "
                    f"holds {getattr(wc, 'dtype', type(wc).__name__)} values (class labels?). "
                    "EM is unsupervised: give chunks of x alone, e.g. "
                    "DataLoader(TensorDataset(x)), or float weights."
                )
            wc = check_sample_weight(wc, xc.shape[0], xc.dtype, positive_sum=False)
            wc = self._scale_weights(wc)
        except ValueError as error:
            raise ValueError(f"chunk {i} (from row {row}): {error}") from None
        return drop_zero_weights(xc, wc)

    def _first_chunk(self, source: DataSource, reset: bool) -> tuple:
        """The first chunk, checked (``reset``: it decides the feature count and dtype)."""
        if source.in_memory:
            return source.x, source.w
        if isinstance(source, SequenceFile):
            x0, l0 = next(source.sequence_chunks())
            return self.model.validate_sequences(x0, l0, reset=reset)[0], None
        first = source.first()  # a one-shot iterator keeps it for the first pass
        if first is None:
            raise ValueError("the data have no chunks; pass at least one non-empty chunk.")
        return self._check_chunk(0, 0, *first, reset=reset)

    def _initialize_from(self, source: DataSource, rng) -> None:
        """Start on the first chunk (all the data when in memory)."""
        x0, w0 = self._first_chunk(source, reset=True)
        K = getattr(self.model, "n_components", 1)
        if x0.shape[0] < K and not isinstance(self.init, dict):
            raise ValueError(
                f"the first chunk has {x0.shape[0]} rows but the model has {K} components, and "
                f"the start is computed on the first chunk: make chunks of at least {K} rows "
                "(chunk_size for a .npy file), or use fewer components."
            )
        self._initialize(x0, w0, rng)

    def _initialize(self, x, w, rng) -> None:
        """Build the parameters and set the family's start (``init``) on data ``x``."""
        self.family.start(self, Chunk(x, w), rng)
        self._check_finite(restore=False)

    def _check_finite(self, restore: bool = True) -> None:
        if self._holds_theta():
            if all(bool(torch.isfinite(b).all()) for b in self.guide.buffers()):
                return
            raise ValueError(
                f"{self.scheme} produced a non-finite q(theta); raise reg_covar or scale the data."
            )
        if holds(finite_flag(self.model)):
            return
        if restore and self.guide.frozen:
            self.model.load_state_dict(self.guide.twin.state_dict())
        raise ValueError(
            f"{self.scheme} produced non-finite parameters; the last finite parameters were "
            "kept. Raise reg_covar or scale the data."
        )


def parameters_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter is finite; -inf is allowed where a simplex's unconstrained
    logits hold an exact zero probability (a forbidden transition stays forbidden)."""
    return bool(finite_flag(module))


def finite_flag(module: torch.nn.Module) -> torch.Tensor:
    """:func:`parameters_finite` as a boolean tensor (read once, or checked later)."""
    flags = []
    for sub in module.modules():
        simplex = {
            name + "_unconstrained"
            for name, (constraint, _) in getattr(sub, "_pyro_params", {}).items()
            if constraint is constraints.simplex
        }
        for name, p in sub.named_parameters(recurse=False):
            if name in simplex:
                flags.append((~torch.isnan(p) & (p < math.inf)).all())
            else:
                flags.append(torch.isfinite(p).all())
    if not flags:
        return torch.tensor(True)
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def _is_floating(values) -> bool:
    """Whether weights given in a chunk are floating point (not labels or counts of a loader)."""
    dtype = getattr(values, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return np.issubdtype(np.asarray(values).dtype if dtype is None else dtype, np.floating)


def _validated(model, x, reset: bool) -> torch.Tensor:
    """``x`` checked by the model's own ``validate_data`` (``reset`` where it takes it)."""
    validate = getattr(model, "validate_data", None)
    if validate is None:
        return _checked_tensor(x)
    if "reset" in inspect.signature(validate).parameters:
        return validate(x, reset=reset)
    return validate(x)


def _checked_tensor(x) -> torch.Tensor:
    """Data for a program with no checks of its own: real numbers, finite, a tensor."""
    t = as_data_tensor(x)
    if t.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(t.shape)}); pass at least one sample.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("x contains NaN or inf; remove or impute those entries before fitting.")
    return t


#: the name this class had when it fitted mixtures only
MixtureFitter = Fitter
