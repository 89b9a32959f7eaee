"""EM as maximisation of Pyro's ELBO with the exact-posterior guide (EM-1).

One iteration:

1. E-step -- ``guide.refresh(x)``: q_d(z) := p(z | x_d; theta), theta~ := theta.
   The bound now touches the log-likelihood (EM-TIGHT).
2. M-step -- theta := argmax_theta sum_d LB_d(q_d, theta), either in closed form
   (registry, EM-MIX.2/3) or by maximising Pyro's ELBO with the guide frozen.
3. Stop when the per-sample bound changes by less than ``tol``.

By BASIC and EM-TIGHT the log-likelihood never decreases (EM-MONO):
``log_likelihoods[t] <= lower_bounds[t] <= log_likelihoods[t + 1]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..guides import ExactPosterior
from ..models.base import MixtureModel
from .fitting import EMResult, MixtureFitter
from .gradient_m_step import gradient_m_step
from .registry import lookup_m_step

M_STEPS = ("auto", "closed-form", "gradient")


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
        Stop when the mean per-sample bound changes by less than ``tol``.
    max_iter:
        Maximum number of EM iterations per initialisation.
    gradient_max_iter:
        L-BFGS iterations of each gradient M-step.

    ``n_init``, ``init``, ``reg_covar``, ``seed``, ``warm_start``, ``progress`` and
    ``callback`` are described in :class:`~elbolab.inference.fitting.MixtureFitter`.
    """

    scheme = "EM"

    def __new__(cls, model=None, guide=None, *args, **kwargs):
        # A Gaussian latent has its own E- and M-steps (LG-EM): EM(model, guide) picks them.
        from ..guides.exact_gaussian import ExactGaussianPosterior
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
        self.m_step, self.gradient_max_iter = m_step, gradient_max_iter

    def _closed_form(self) -> bool:
        if self.m_step == "gradient":
            return False
        return lookup_m_step(type(self.model)) is not None

    def _after_last_run(self, x, w) -> None:
        """Nothing to do: the loop ends with an E-step at the final parameters."""

    def _run(self, x, w, desc: str) -> EMResult:
        """EM iterations from the model's current parameters (the loop lives here only)."""
        model, guide, closed = self.model, self.guide, self._closed_form()

        def wmean(v: torch.Tensor) -> float:
            return float(v.mean() if w is None else (v * w).sum() / w.sum())

        def e_step() -> tuple[torch.Tensor, torch.Tensor]:
            guide.refresh(x, w)  # (EM-1 step 1)
            log_joint = guide.joint(x, w).log_joint.transpose(-1, -2)  # (N, K)
            return log_joint, log_joint.logsumexp(-1)  # log p(x_d, z = k), log p(x_d)

        if self.callback is not None:
            self.callback(0, model)
        log_joint, log_px = e_step()
        lls, lbs = [wmean(log_px)], []
        previous, converged, it = lls[0], False, 0  # after an E-step, bound = ll (EM-TIGHT)
        bar = tqdm(
            total=self.max_iter, desc=desc, delay=1.0, disable=not self.progress, leave=False
        )
        for it in range(1, self.max_iter + 1):
            log_resp = log_joint - log_px.unsqueeze(-1)  # r_dk (EM-MIX.1)
            if closed:
                resp = log_resp.exp()
                self._closed_form_m_step(x, w, resp)  # (EM-MIX.2/3)
            else:
                bound = gradient_m_step(model, guide, x, w, max_iter=self.gradient_max_iter)
            self._check_finite()
            log_joint, log_px = e_step()
            if closed:
                # sum_k r_dk log(pi_k p_k(x_d) / r_dk) at the new theta (EM-MIX.LB)
                terms = torch.where(resp > 0, resp * (log_joint - log_resp), 0.0)
                bound = wmean(terms.sum(-1))
            lbs.append(bound)
            lls.append(wmean(log_px))
            if self.callback is not None:
                self.callback(it, model)
            bar.update(1)
            bar.set_postfix(bound=f"{bound:.6g}", refresh=False)
            if abs(bound - previous) < self.tol:
                converged = True
                break
            previous = bound
        bar.close()
        return EMResult(lls, lbs, converged, it, "closed-form" if closed else "gradient")
