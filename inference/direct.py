"""Direct maximum likelihood: maximise log p(x; theta) by gradient, with z summed out.

No guide for z: the model's latent site is enumerated inside ``TraceEnum_ELBO`` with an
empty guide, so the "ELBO" is exactly sum_d log p(x_d; theta) and its gradient is the
gradient of the log-likelihood. This is the baseline EM is compared with: it reaches the
same maximum by a different road (compare ``EM(...).fit`` with ``DirectML(...).fit``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

from ..guides import ExactPosterior
from ..models.base import MixtureModel
from ..models.enumeration import enumerate_joint
from .em.fitter import EMResult, Fitter
from .em.progress import progress_bar, report


def _no_guide(*args, **kwargs) -> None:
    """The empty guide: every latent site is enumerated in the model."""


def marginal_log_likelihood(model, x, sample_weight=None) -> torch.Tensor:
    """sum_d w_d log p(x_d; theta), differentiable, z summed out by Pyro's enumeration.

    Unweighted: Pyro's ``TraceEnum_ELBO`` with no guide. Weighted: each datum's exact
    log p(x_d) from the same enumeration (:func:`~elbolab.models.enumerate_joint`), times
    w_d. (Scaling the program's sites by w_d under enumeration would give
    log sum_z p(x_d, z)^w_d instead, which is why Pyro refuses a tensor scale there.)
    """
    if sample_weight is not None:
        return (enumerate_joint(model, x).log_marginal() * sample_weight).sum()
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    return -elbo.differentiable_loss(config_enumerate(model, "parallel"), _no_guide, x)


class DirectML(Fitter):
    """Maximum likelihood by L-BFGS (or Adam) on log p(x; theta) with z summed out.

    ``optimizer`` is ``"lbfgs"`` (default; one quasi-Newton step with a strong-Wolfe line
    search per iteration) or ``"adam"`` with learning rate ``lr``. ``tol`` applies to the
    change of the mean log-likelihood. The other options are EM's
    (:class:`~elbolab.inference.fitting.MixtureFitter`); the start is EM's too (one
    M-step on initial responsibilities), so both schemes can begin at the same point.

    ``fit`` returns an :class:`EMResult` whose ``log_likelihoods`` has one value per step
    and whose ``lower_bounds`` equal them (no guide, no gap).
    """

    scheme = "direct maximisation"

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
        callback: Callable[[int, MixtureModel], None] | None = None,
    ) -> None:
        if optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
        if (
            isinstance(lr, (bool, np.bool_))
            or not isinstance(lr, numbers.Real)
            or not 0 < lr < math.inf
        ):
            raise ValueError(
                f"lr must be a positive, finite number, got {lr!r}; e.g. lr=0.05 "
                "(Adam's step size; L-BFGS ignores it)"
            )
        super().__init__(
            model,
            ExactPosterior(model),
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
        self.optimizer, self.lr = optimizer, lr

    def _run_source(self, source, desc: str) -> EMResult:
        return self._run(source.x, source.w, desc)

    def _run(self, x, w, desc: str) -> EMResult:
        """L-BFGS (or Adam) steps on log p(x; theta) from the current parameters."""
        model = self.model
        total = float(x.shape[0] if w is None else w.sum())
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

        if self.callback is not None:
            self.callback(0, model)
        lls = [float(marginal_log_likelihood(model, x, w).detach()) / total]
        converged = False
        last_good = [p.detach().clone() for p in params]
        with progress_bar(self.progress, desc) as bar:
            for _ in range(self.max_iter):
                opt.step(closure)
                ll = float(marginal_log_likelihood(model, x, w).detach()) / total
                with torch.no_grad():
                    finite = all(bool(torch.isfinite(p).all()) for p in params)
                    if not np.isfinite(ll) or not finite:
                        for p, p0 in zip(params, last_good, strict=True):
                            p.copy_(p0)
                        raise ValueError(
                            "direct maximisation produced non-finite parameters; the last finite "
                            "parameters were kept. Lower lr, raise reg_covar or scale the data."
                        )
                    last_good = [p.detach().clone() for p in params]
                lls.append(ll)
                if self.callback is not None:
                    self.callback(len(lls) - 1, model)
                report(bar, abs(lls[-1] - lls[-2]), self.tol, loglik=ll)
                if abs(lls[-1] - lls[-2]) < self.tol:
                    converged = True
                    break
        return EMResult(lls, lls[1:], converged, len(lls) - 1, "direct")
