"""EM and the closed-form maximum likelihood for PPCA and factor analysis (LG-EM, LG-ML).

EM is the same two steps as for the mixtures (EM-1), with the exact Gaussian posterior as
the guide:

1. E-step -- ``guide.refresh()``: q_d(z) = N(m_d, S) = p(z | x_d; theta) (LG-POST), so the
   bound touches log p(x) (EM-TIGHT).
2. M-step -- maximise E_q[log p(x, z; theta)] over theta = (W, mu, Psi). With
   z~ = (z, 1) and W~ = [W, mu] (D, k + 1) the expected complete-data log-likelihood is a
   weighted least-squares problem (Tipping & Bishop 1999; Bishop PRML 12.54-12.57, 12.69-12.70):

       W~   := (sum_d x_d E[z~_d]^T) (sum_d E[z~_d z~_d^T])^-1                        (LG-EM.W)
       Psi  := diag( (1/N) sum_d (x_d x_d^T - W~ E[z~_d] x_d^T) )     (factor analysis)
       sigma^2 := (1/(N D)) tr( sum_d (x_d x_d^T - W~ E[z~_d] x_d^T) )  (PPCA)      (LG-EM.PSI)

   with E[z~] = (m, 1) and E[z~ z~^T] = [[S + m m^T, m], [m^T, 1]].

For PPCA the maximum is also known in closed form (Tipping & Bishop 1999, eq. 7-8): with
the eigen-decomposition of the sample covariance, eigenvalues l_1 >= ... >= l_D,

       sigma^2 = mean(l_{k+1}, ..., l_D),   W = U_k (L_k - sigma^2 I)^{1/2} R         (LG-ML)

for any rotation R (here R = I), and mu = the sample mean.

m_d is affine in x_d, so every sum over the data in both steps is a function of n, the
mean and the scatter of the data (:mod:`.gaussian_moments`): :class:`LinearGaussianEM`
reads the data once, in memory or in chunks, and iterates on those alone.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from tqdm.auto import tqdm

from ...guides.exact_gaussian import ExactGaussianPosterior
from ...models.base import check_positive_int
from ...models.linear_gaussian import PPCA, LinearGaussian
from .data import DEFAULT_CHUNK_SIZE, chunked_source, is_chunked
from .fitter import EMResult, check_fit_options, check_seed
from .gaussian_moments import (
    Moments,
    bound_sum,
    log_likelihood_sum,
    m_step_sums,
)
from .loop import EM

INIT_METHODS = ("random",)


@torch.no_grad()
def linear_gaussian_m_step(
    model: LinearGaussian, x: torch.Tensor, loc: torch.Tensor, cov: torch.Tensor, floor: float
) -> None:
    """Set W, mu and Psi to argmax E_q[log p(x, z)] (LG-EM.W, LG-EM.PSI).

    ``x`` (N, D), ``loc`` = E[z_d] (N, k), ``cov`` = Cov[z_d] (k, k). Computed on data
    centred at the sample mean (exact: the model is translation-equivariant in mu).
    Noise variances are floored at ``floor``.
    """
    n = x.shape[0]
    centre = x.mean(0)
    xc = x - centre
    ez = torch.cat([loc, loc.new_ones(n, 1)], dim=1)  # E[z~] (N, k + 1)
    ezz = ez.T @ ez  # sum_d E[z~] E[z~]^T, (k + 1, k + 1)
    k = loc.shape[1]
    ezz[:k, :k] += n * cov  # + sum_d Cov[z_d]
    xez = xc.T @ ez  # sum_d x_d E[z~_d]^T, (D, k + 1)
    m_step_from_sums(model, n, centre, xc.square().sum(0), ezz, xez, floor)


@torch.no_grad()
def m_step_from_sums(
    model: LinearGaussian,
    n: float,
    centre: torch.Tensor,
    sxx: torch.Tensor,
    ezz: torch.Tensor,
    xez: torch.Tensor,
    floor: float,
) -> None:
    """LG-EM.W and LG-EM.PSI from the sums: ``sxx`` = sum_d (x_d - c)^2 (D,), ``ezz`` =
    sum_d E[z~ z~^T] (k + 1, k + 1), ``xez`` = sum_d (x_d - c) E[z~_d]^T (D, k + 1), with c
    = ``centre``, the data mean."""
    k = ezz.shape[0] - 1
    w_tilde = torch.linalg.solve(ezz, xez.T).T  # (LG-EM.W); ezz is symmetric
    # diag (1/N) sum_d (x x^T - W~ E[z~] x^T)                                 (LG-EM.PSI)
    psi = (sxx - (w_tilde * xez).sum(1)) / n
    model.weight.copy_(w_tilde[:, :k])
    model.mean.copy_(centre + w_tilde[:, k])
    noise = psi.mean() if isinstance(model, PPCA) else psi  # PPCA: sigma^2 = tr / (N D)
    model.set_noise(noise.clamp_min(floor))


@torch.no_grad()
def ppca_closed_form(model: PPCA, x) -> PPCA:
    """Set a :class:`~elbolab.models.PPCA` to its maximum-likelihood parameters (LG-ML)."""
    if not isinstance(model, PPCA):
        raise ValueError(
            f"the closed-form maximum likelihood exists for PPCA, got {type(model).__name__}; "
            "fit factor analysis with EM(model, ExactGaussianPosterior(model))."
        )
    x = model.validate_data(x, reset=True)
    k = model.latent_dim
    centre = x.mean(0)
    xc = x - centre
    sample_cov = xc.T @ xc / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(sample_cov)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    sigma2 = eigenvalues[k:].mean()
    weight = eigenvectors[:, :k] * (eigenvalues[:k] - sigma2).clamp_min(0).sqrt()
    model.set_params(weight=weight, mean=centre, noise=sigma2)
    return model


class LinearGaussianEM(EM):
    """EM for a linear-Gaussian model with :class:`ExactGaussianPosterior`.

    ``EM(model, ExactGaussianPosterior(model), ...)`` builds one of these. Options as for
    the mixtures: ``tol`` (on the change of the mean per-sample bound), ``max_iter``,
    ``init`` (``"random"``: W ~ N(0, s^2 / k) with s^2 the mean data variance, mu the
    sample mean, Psi the data variances; or a dict ``{"weight", "mean", "noise"}``),
    ``n_init`` (the best final bound is kept), ``reg_covar`` (a floor on the noise
    variances), ``seed``, ``warm_start``, ``progress``, ``callback(iteration, model)``.
    The M-step is always the closed form (LG-EM).
    """

    scheme = "EM"

    def __init__(
        self,
        model: LinearGaussian,
        guide: ExactGaussianPosterior,
        *,
        m_step: str = "auto",
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        init: str | dict = "random",
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
        callback: Callable[[int, LinearGaussian], None] | None = None,
    ) -> None:
        if stochastic:
            raise ValueError(
                "stochastic EM is not needed for PPCA and factor analysis: their EM reads the "
                "data once, to n, the mean and the scatter, and iterates on those; pass "
                "stochastic=False (chunks of data, a DataLoader or a .npy path work as they are)"
            )
        if distributed:
            raise ValueError(
                "distributed=True is not available for PPCA and factor analysis; fit on one "
                "process (data in chunks, a DataLoader or a .npy path keep memory bounded)"
            )
        if not isinstance(guide, ExactGaussianPosterior) or guide.model is not model:
            raise ValueError("guide must be ExactGaussianPosterior(model) for this same model")
        if m_step == "gradient":
            raise ValueError(
                "linear-Gaussian models use the closed-form M-step (LG-EM); pass "
                "m_step='auto' or 'closed-form'"
            )
        if m_step not in ("auto", "closed-form"):
            raise ValueError(f"m_step must be 'auto' or 'closed-form', got {m_step!r}")
        if init == "kmeans++":  # EM's default for the mixtures
            init = "random"
        if not isinstance(init, dict) and not (isinstance(init, str) and init in INIT_METHODS):
            raise ValueError(f"init must be one of {INIT_METHODS} or a dict, got {init!r}")
        check_fit_options(tol=tol, max_iter=max_iter, n_init=n_init, reg_covar=reg_covar)
        self.model, self.guide, self.m_step = model, guide, "closed-form"
        self.tol, self.max_iter, self.n_init = float(tol), max_iter, n_init
        self.init, self.reg_covar, self.seed = init, float(reg_covar), check_seed(seed)
        self.warm_start, self.progress, self.callback = warm_start, progress, callback
        self.gradient_max_iter = gradient_max_iter
        self.chunk_size = check_positive_int("chunk_size", chunk_size, "rows read at a time")
        if isinstance(init, dict):  # every given value checked now, on a copy
            unknown = sorted(set(init) - set(model.param_names()))
            if unknown:
                raise ValueError(
                    f"unknown init entr{'y' if len(unknown) == 1 else 'ies'} {unknown} for "
                    f"{type(model).__name__}; use {', '.join(model.param_names())}"
                )
            copy.deepcopy(model).set_params(**init)
        self.result_: EMResult | None = None

    def fit(self, x, sample_weight=None) -> EMResult:
        """Fit to ``x`` (N, D), or to chunks of it (a list of 2-D chunks, a ``DataLoader``,
        a ``.npy`` path); returns an :class:`EMResult` (also ``result_``).

        One pass reduces the data to n, their mean and scatter (:mod:`.gaussian_moments`);
        the EM iterations then read only those, so chunked and in-memory data give the same
        fit (to rounding).
        """
        if sample_weight is not None:
            raise ValueError(
                "sample_weight is not supported for linear-Gaussian models; "
                "repeat or subsample rows instead"
            )
        start = time.perf_counter()
        model = self.model
        x, mom = self._moments(x, reset=not self.warm_start)
        rng = np.random.default_rng(self.seed)
        n_init = 1 if self.warm_start or isinstance(self.init, dict) else self.n_init
        best, best_state, finals = None, None, []
        for i in range(n_init):
            if not self.warm_start:
                self._start(mom, rng)
            result = self._run(mom, f"{self.scheme} {i + 1}/{n_init}" if n_init > 1 else "EM")
            finals.append(result.lower_bound)
            if best is None or result.lower_bound > best.lower_bound:
                best, best_state = result, {k: v.clone() for k, v in model.state_dict().items()}
                best.best_init = i
        model.load_state_dict(best_state)
        self.guide.refresh(x)  # the posterior of the data in memory (None: theta~ only)
        best.init_lower_bounds, best.fit_time = finals, time.perf_counter() - start
        if not best.converged:
            warnings.warn(
                f"EM did not converge in max_iter={self.max_iter} iterations (last change "
                f"above tol={self.tol:g}); raise max_iter or tol.",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.result_ = best
        return best

    @torch.no_grad()
    def _moments(self, x, reset: bool) -> tuple[torch.Tensor | None, Moments]:
        """``(x or None, Moments)``: data in memory, or one pass over chunks (checked)."""
        model = self.model
        if not is_chunked(x):
            x = model.validate_data(x, reset=reset)
            return x, Moments.of(x)
        source = chunked_source(x, self.chunk_size)
        if not source.reiterable:
            raise ValueError(
                "EM reads the data once here, but a generator cannot be checked and fitted "
                "again; pass a list of chunks, a DataLoader or a .npy path."
            )
        mom, row = None, 0
        for i, (xc, wc) in enumerate(source.chunks()):
            try:
                if wc is not None:
                    raise ValueError(
                        "sample_weight is not supported for linear-Gaussian models; give "
                        "chunks of x alone"
                    )
                xc = model.validate_data(xc, reset=reset and i == 0)
            except ValueError as error:
                raise ValueError(f"chunk {i} (from row {row}): {error}") from None
            mom = Moments.of(xc) if mom is None else mom.combine(Moments.of(xc))
            row += xc.shape[0]
        if mom is None:
            raise ValueError("the data have no chunks; pass at least one non-empty chunk.")
        return None, mom

    @torch.no_grad()
    def _start(self, mom: Moments, rng: np.random.Generator) -> None:
        """The ``"random"`` start, with the entries of an ``init`` dict in place of its own.

        A partial dict (say ``{"weight": W}``) takes the rest from the ``"random"`` start,
        so nothing is left at the values the model was built with.
        """
        model = self.model
        given = dict(self.init) if isinstance(self.init, dict) else {}  # checked in __init__
        variances = (mom.scatter.diagonal() / mom.n).clamp_min(max(self.reg_covar, 1e-12))
        scale = float(variances.mean().sqrt()) / np.sqrt(model.latent_dim)
        start = {"weight": None, "mean": mom.mean, "noise": variances}
        if isinstance(model, PPCA):
            start["noise"] = variances.mean()
        if "weight" not in given:
            start["weight"] = rng.normal(scale=scale, size=(model.data_dim, model.latent_dim))
        model.set_params(**(start | given))

    @torch.no_grad()
    def _run(self, mom: Moments, desc: str) -> EMResult:
        """EM iterations from the model's current parameters, on the moments of the data."""
        model, guide, n = self.model, self.guide, mom.n
        if self.callback is not None:
            self.callback(0, model)
        guide.refresh()  # E-step (EM-1 step 1): theta~ := theta
        A, cov = model.posterior_map()  # q_d = N(A (x_d - mu~), S_z)
        mu = model.mean.clone()
        lls, lbs = [log_likelihood_sum(model, mom) / n], []
        previous, converged, it = lls[0], False, 0  # after an E-step, bound = ll (EM-TIGHT)
        bar = tqdm(
            total=self.max_iter, desc=desc, delay=1.0, disable=not self.progress, leave=False
        )
        sxx = mom.scatter.diagonal()
        for it in range(1, self.max_iter + 1):
            ezz, xez = m_step_sums(mom, A, mu, cov)
            m_step_from_sums(model, n, mom.mean, sxx, ezz, xez, self.reg_covar)  # theta_{t+1}
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                model.load_state_dict(guide.twin.state_dict())
                raise ValueError(
                    "EM produced non-finite parameters; the last finite ones were kept. "
                    "Scale the data or raise reg_covar."
                )
            bound = bound_sum(model, mom, A, mu, cov) / n  # LB(q_t, theta_{t+1})
            guide.refresh()  # E-step: q_{t+1}
            A, cov = model.posterior_map()
            mu = model.mean.clone()
            lls.append(log_likelihood_sum(model, mom) / n)
            lbs.append(bound)
            if self.callback is not None:
                self.callback(it, model)
            bar.update(1)
            bar.set_postfix(bound=f"{bound:.6g}", refresh=False)
            if abs(bound - previous) < self.tol:
                converged = True
                break
            previous = bound
        bar.close()
        return EMResult(lls, lbs, converged, it, "closed-form")
