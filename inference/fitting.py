"""What every way of fitting a mixture shares: options, data checks, starts, best-of-n.

A scheme (EM, direct maximisation) subclasses :class:`MixtureFitter` and writes only its
own loop, ``_run``; validation, initialisation, ``n_init`` restarts, keeping the best
bound, and the convergence warning live here once.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from ..guides import ExactPosterior
from ..models.base import MixtureModel
from .gradient_m_step import gradient_m_step
from .init import INIT_METHODS, initial_responsibilities
from .registry import lookup_m_step, weights_m_step


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
    """

    log_likelihoods: list[float]
    lower_bounds: list[float]
    converged: bool
    n_iter: int
    m_step: str
    init_lower_bounds: list[float] = field(default_factory=list)
    best_init: int = 0
    fit_time: float = 0.0

    @property
    def log_likelihood(self) -> float:
        """Mean per-sample log-likelihood at the returned parameters."""
        return self.log_likelihoods[-1]

    @property
    def lower_bound(self) -> float:
        """Final mean per-sample bound (the log-likelihood if no M-step was taken)."""
        return self.lower_bounds[-1] if self.lower_bounds else self.log_likelihoods[-1]


def check_sample_weight(sample_weight, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``sample_weight`` as a tensor of shape (n,), or a ``ValueError`` with the fix."""
    if sample_weight is None:
        return None
    w = torch.as_tensor(
        np.asarray(sample_weight)
        if not isinstance(sample_weight, torch.Tensor)
        else sample_weight.detach(),
        dtype=dtype,
    )
    if w.shape != (n,):
        raise ValueError(
            f"sample_weight must have shape ({n},), one weight per sample, got {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("sample_weight must be finite and non-negative with a positive sum")
    return w


def check_fit_options(*, tol, max_iter: int, n_init: int, reg_covar) -> None:
    """``ValueError`` with the fix for options every EM-like fitter shares."""
    for name, value in (("max_iter", max_iter), ("n_init", n_init)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if not reg_covar >= 0:
        raise ValueError(f"reg_covar must be >= 0, got {reg_covar!r}")


class MixtureFitter:
    """Shared machinery of the fitting schemes; see :class:`~elbolab.inference.EM`.

    Parameters
    ----------
    model:
        A :class:`~elbolab.models.MixtureModel`.
    guide:
        ``ExactPosterior(model)`` (used by EM, and to start any scheme from responsibilities).
    tol, max_iter:
        Stop when the monitored mean per-sample objective changes by less than ``tol``, or
        after ``max_iter`` iterations per start.
    n_init:
        Number of starts; the one with the highest final bound is kept.
    init:
        ``"kmeans++"`` (default), ``"kmeans"``, ``"random_from_data"``, ``"random"``, or a
        dict of parameters (e.g. ``{"weights": w, "means": m, "covariances": c}``).
    reg_covar:
        Regulariser of the closed-form M-step (see :mod:`.closed_form`); 0 gives the plain
        maximum-likelihood update.
    seed:
        Seed of the initialisations.
    warm_start:
        Start from the model's current parameters if it already has some.
    progress:
        Show a progress bar (it appears only for fits longer than a second).
    callback:
        ``callback(iteration, model)`` after the start (0) and each iteration.
    """

    #: name used in messages
    scheme = "fitting"
    #: L-BFGS iterations of a gradient M-step (starts of families with no closed form)
    gradient_max_iter = 20

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
    ) -> None:
        if not isinstance(guide, ExactPosterior) or guide.model is not model:
            raise ValueError("guide must be ExactPosterior(model) for this same model")
        if not isinstance(init, dict) and init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS} or a dict, got {init!r}")
        check_fit_options(tol=tol, max_iter=max_iter, n_init=n_init, reg_covar=reg_covar)
        self.model, self.guide = model, guide
        self.tol, self.max_iter, self.n_init = float(tol), max_iter, n_init
        self.init, self.reg_covar, self.seed = init, float(reg_covar), seed
        self.warm_start, self.progress, self.callback = warm_start, progress, callback
        self.result_: EMResult | None = None

    # ------------------------------------------------------------------ to override
    def _run(self, x: torch.Tensor, w: torch.Tensor | None, desc: str) -> EMResult:
        """Iterate from the model's current parameters; the scheme's own loop."""
        raise NotImplementedError

    def _closed_form(self) -> bool:
        """Whether M-steps (and the start) use the registered closed form."""
        return lookup_m_step(type(self.model)) is not None

    # ------------------------------------------------------------------ public
    def fit(self, x, sample_weight=None) -> EMResult:
        """Fit the model to ``x`` (N, D); returns an :class:`EMResult` (also ``result_``)."""
        start = time.perf_counter()
        model, guide = self.model, self.guide
        warm = self.warm_start and model.is_built
        x = model.validate_data(x, reset=not warm)
        n, K = x.shape[0], model.n_components
        if n < K:
            raise ValueError(
                f"x has {n} samples but the model has {K} components; "
                f"pass at least {K} samples or use fewer components."
            )
        w = check_sample_weight(sample_weight, n, x.dtype)
        rng = np.random.default_rng(self.seed)
        n_init = 1 if warm or isinstance(self.init, dict) else self.n_init
        best, best_state, finals = None, None, []
        for i in range(n_init):
            if not warm:
                self._initialize(x, w, rng)
            desc = f"{self.scheme} {i + 1}/{n_init}" if n_init > 1 else self.scheme
            result = self._run(x, w, desc)
            finals.append(result.lower_bound)
            if best is None or result.lower_bound > best.lower_bound:
                best, best_state = result, copy.deepcopy(model.state_dict())
                best.best_init = i
        # the guide ends as the posterior at the returned parameters
        if best.best_init != n_init - 1:
            model.load_state_dict(best_state)
            guide.refresh(x, w)
        else:
            self._after_last_run(x, w)
        best.init_lower_bounds = finals
        best.fit_time = time.perf_counter() - start
        if not best.converged:
            warnings.warn(
                f"{self.scheme} did not converge in max_iter={self.max_iter} iterations (last "
                f"change above tol={self.tol:g}); raise max_iter or tol, or check the data.",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.result_ = best
        return best

    def _after_last_run(self, x, w) -> None:
        """Bring the guide to the final parameters (EM's loop already did)."""
        self.guide.refresh(x, w)

    # ------------------------------------------------------------------ shared pieces
    def _initialize(self, x, w, rng) -> None:
        """Build the parameters and set them: from ``init`` or one M-step on responsibilities."""
        model = self.model
        model.build_for(x)
        if isinstance(self.init, dict):
            model.set_params(**self.init)
            return
        resp = initial_responsibilities(x, model.n_components, self.init, rng, w)
        if self._closed_form():
            self._closed_form_m_step(x, w, resp)
        else:
            log_resp = resp.clamp_min(torch.finfo(x.dtype).tiny).log()
            self.guide.fix(log_resp, x, w)
            gradient_m_step(model, self.guide, x, w, max_iter=self.gradient_max_iter)
            self._check_finite(restore=False)

    def _closed_form_m_step(self, x, w, resp) -> None:
        """EM-MIX.3 for the components, then EM-MIX.2 for the weights."""
        if w is not None:
            resp = resp * w.unsqueeze(-1)
        nk = resp.sum(0) + 10 * torch.finfo(x.dtype).eps  # keeps an empty component finite
        lookup_m_step(type(self.model))(self.model, x, resp, nk, self.reg_covar)
        self.model.assign("weights", weights_m_step(nk))

    def _check_finite(self, restore: bool = True) -> None:
        if all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            return
        if restore and self.guide.frozen:
            self.model.load_state_dict(self.guide.twin.state_dict())
        raise ValueError(
            f"{self.scheme} produced non-finite parameters; the last finite parameters were "
            "kept. Raise reg_covar or scale the data."
        )
