"""Direct maximum likelihood: maximise log p(x; theta) by gradient, with z summed out.

No guide for z: the model's latent site is enumerated inside ``TraceEnum_ELBO`` with an
empty guide, so the "ELBO" is exactly sum_d log p(x_d; theta) and its gradient is the
gradient of the log-likelihood. This is the baseline EM is compared with: it reaches the
same maximum by a different road (compare ``EM(...).fit`` with ``DirectML(...).fit``).
"""

from __future__ import annotations

import copy
import time
import warnings

import numpy as np
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from sklearn.exceptions import ConvergenceWarning
from tqdm.auto import tqdm

from ..guides import ExactPosterior
from ..models.base import MixtureModel
from .em import EM, EMResult, check_sample_weight
from .init import INIT_METHODS


def _no_guide(*args, **kwargs) -> None:
    """The empty guide: every latent site is enumerated in the model."""


def marginal_log_likelihood(model, x, sample_weight=None) -> torch.Tensor:
    """sum_d w_d log p(x_d; theta), differentiable, from ``TraceEnum_ELBO`` with no guide."""
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    return -elbo.differentiable_loss(
        config_enumerate(model, "parallel"), _no_guide, x, sample_weight
    )


class DirectML:
    """Maximum likelihood by L-BFGS (or Adam) on log p(x; theta) with z summed out.

    Parameters mirror :class:`~elbolab.inference.EM` where they mean the same:
    ``tol`` (on the change of the mean log-likelihood), ``max_iter`` (optimiser steps),
    ``init``, ``n_init``, ``reg_covar`` (used by the initialisation only), ``seed``,
    ``warm_start``, ``progress``. ``optimizer`` is ``"lbfgs"`` (default) or ``"adam"``
    with learning rate ``lr``.

    ``fit`` returns an :class:`EMResult` whose ``log_likelihoods`` has one value per step
    and whose ``lower_bounds`` equal them (no guide, no gap).
    """

    def __init__(
        self,
        model: MixtureModel,
        *,
        optimizer: str = "lbfgs",
        lr: float = 0.05,
        tol: float = 1e-6,
        max_iter: int = 500,
        n_init: int = 1,
        init: str | dict = "kmeans++",
        reg_covar: float = 1e-6,
        seed: int | None = None,
        warm_start: bool = False,
        progress: bool = True,
    ) -> None:
        if optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
        if not isinstance(init, dict) and init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS} or a dict, got {init!r}")
        self.model, self.optimizer, self.lr = model, optimizer, lr
        self.tol, self.max_iter, self.n_init = tol, max_iter, n_init
        self.init, self.reg_covar, self.seed = init, reg_covar, seed
        self.warm_start, self.progress = warm_start, progress
        # initialisation is shared with EM: one M-step from initial responsibilities
        self._em = EM(model, ExactPosterior(model), init=init, reg_covar=reg_covar, progress=False)
        self.result_: EMResult | None = None

    def fit(self, x, sample_weight=None) -> EMResult:
        """Maximise the log-likelihood of ``x`` (N, D); returns an :class:`EMResult`."""
        start = time.perf_counter()
        model = self.model
        warm = self.warm_start and model.is_built
        x = model.validate_data(x, reset=not warm)
        if x.shape[0] < model.n_components:
            raise ValueError(
                f"x has {x.shape[0]} samples but the model has {model.n_components} "
                "components; pass more samples or use fewer components."
            )
        w = check_sample_weight(sample_weight, x.shape[0], x.dtype)
        total = float(x.shape[0] if w is None else w.sum())
        rng = np.random.default_rng(self.seed)
        closed = self._em.m_step != "gradient" and _has_closed_form(model)
        n_init = 1 if warm or isinstance(self.init, dict) else self.n_init
        best, best_state = None, None
        for i in range(n_init):
            if not warm:
                self._em._initialize(x, w, rng, closed)
            result = self._run(x, w, total, desc=f"direct {i + 1}/{n_init}")
            if best is None or result.log_likelihood > best.log_likelihood:
                best, best_state = result, copy.deepcopy(model.state_dict())
                best.best_init = i
        model.load_state_dict(best_state)
        best.fit_time = time.perf_counter() - start
        if not best.converged:
            warnings.warn(
                f"direct maximisation did not converge in max_iter={self.max_iter} steps; "
                "raise max_iter or tol.",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.result_ = best
        return best

    def _run(self, x, w, total: float, desc: str) -> EMResult:
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "lbfgs":
            opt = torch.optim.LBFGS(
                params,
                lr=1.0,
                max_iter=1,
                max_eval=25,
                history_size=20,
                line_search_fn="strong_wolfe",
            )
        else:
            opt = torch.optim.Adam(params, lr=self.lr)

        def closure():
            opt.zero_grad()
            loss = -marginal_log_likelihood(model, x, w) / total
            loss.backward()
            return loss

        lls = [float(marginal_log_likelihood(model, x, w).detach()) / total]
        converged = False
        last_good = [p.detach().clone() for p in params]
        bar = tqdm(
            total=self.max_iter, desc=desc, delay=1.0, disable=not self.progress, leave=False
        )
        for _ in range(self.max_iter):
            opt.step(closure)
            ll = float(marginal_log_likelihood(model, x, w).detach()) / total
            with torch.no_grad():
                if not np.isfinite(ll) or any(not bool(torch.isfinite(p).all()) for p in params):
                    for p, p0 in zip(params, last_good, strict=True):
                        p.copy_(p0)
                    raise ValueError(
                        "direct maximisation produced non-finite parameters; the last finite "
                        "parameters were kept. Lower lr, raise reg_covar or scale the data."
                    )
                last_good = [p.detach().clone() for p in params]
            lls.append(ll)
            bar.update(1)
            bar.set_postfix(loglik=f"{ll:.6g}", refresh=False)
            if abs(lls[-1] - lls[-2]) < self.tol:
                converged = True
                break
        bar.close()
        return EMResult(lls, lls[1:], converged, len(lls) - 1, "direct")


def _has_closed_form(model) -> bool:
    from .registry import lookup_m_step

    return lookup_m_step(type(model)) is not None
