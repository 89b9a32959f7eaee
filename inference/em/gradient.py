"""The generic M-step: maximise Pyro's ELBO over theta with the guide frozen (generalised EM).

With q_d = p(z | x_d; theta~) held fixed by the guide, ``TraceEnum_ELBO`` returns
sum_d LB_d(q_d, theta) exactly (z is enumerated, not sampled), and

    argmax_theta sum_d LB_d(q_d, theta) = argmax_theta Q(theta~, theta)   (EM-1 step 2, EM-2)

because the entropy of q does not depend on theta. Any component family gets EM this way,
with no code of its own. L-BFGS on the unconstrained parameters; each call at least
does not decrease the bound, which is all EM-MONO needs.
"""

from __future__ import annotations

import torch
from pyro.infer import TraceEnum_ELBO

from ...models.base import MixtureModel
from .family import Chunk, EChunk, Family, Stats


def elbo_loss(
    model, guide, x, sample_weight=None, max_plate_nesting: int = 1, **plate
) -> torch.Tensor:
    """-sum_d w_d LB_d(q_d, theta) from Pyro's ``TraceEnum_ELBO`` (differentiable in theta).

    ``plate``: ``total_size=N`` when ``x`` is a minibatch of B rows; the model's subsampled
    plate then scales the sum by N / B.
    """
    elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting)
    return elbo.differentiable_loss(model, guide, x, sample_weight, **plate)


def gradient_m_step(
    model,
    guide,
    x: torch.Tensor,
    sample_weight: torch.Tensor | None = None,
    *,
    max_iter: int = 50,
    tolerance_grad: float | None = None,
) -> float:
    """Maximise Pyro's ELBO over the model's parameters with ``guide`` frozen.

    Parameters
    ----------
    model, guide:
        The Pyro program and a guide holding q fixed (an :class:`ExactPosterior` after
        ``refresh`` or ``fix``).
    x:
        Data, shape (N, D).
    sample_weight:
        Optional weights, shape (N,).
    max_iter:
        L-BFGS iterations.

    Returns
    -------
    The bound after the step, per unit weight: sum_d w_d LB_d / sum_d w_d.
    """
    total = float(x.shape[0] if sample_weight is None else sample_weight.sum())
    params = [p for p in model.parameters() if p.requires_grad]
    if tolerance_grad is None:
        tolerance_grad = 1e-10 if x.dtype == torch.float64 else 1e-6
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=1e-15 if x.dtype == torch.float64 else 1e-9,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    start = [p.detach().clone() for p in params]

    def closure():
        optimizer.zero_grad()
        loss = elbo_loss(model, guide, x, sample_weight) / total
        loss.backward()
        return loss

    # (Pyro refuses to build a differentiable loss under no_grad, so evaluate with grad on.)
    before = float(elbo_loss(model, guide, x, sample_weight).detach()) / total
    optimizer.step(closure)
    after = float(elbo_loss(model, guide, x, sample_weight).detach()) / total
    with torch.no_grad():
        if not (after <= before) or any(not bool(torch.isfinite(p).all()) for p in params):
            # never worse than where we started (generalised EM), never NaN
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
            after = before
    return -after


# ---------------------------------------------------------------------------- the family
class GradientFamily(Family):
    """Generalised EM for any model with an exact guide: the M-step maximises Pyro's ELBO
    with the guide frozen (:func:`gradient_m_step`), so a family needs no code of its own.

    The "statistics" are the data themselves (one chunk in memory) and the entropy of the
    frozen q; Q(theta~, theta) = LB(q~, theta) - H(q~) is Pyro's ELBO less that entropy.
    """

    additive = False
    kind = "gradient"

    def start(self, em, chunk: Chunk, rng) -> None:
        """Mixtures: the parameters that maximise the bound for initial responsibilities
        (``em.init``), by one gradient M-step; other programs start where they are."""
        from .mixture import start_responsibilities  # (mixture imports this module's loss)

        if not isinstance(em.model, MixtureModel):
            return
        resp = start_responsibilities(em, chunk, rng)
        if resp is None:
            return
        log_resp = resp.clamp_min(torch.finfo(chunk.x.dtype).tiny).log()
        em.guide.fix(log_resp, chunk.x, chunk.w)
        gradient_m_step(em.model, em.guide, chunk.x, chunk.w, max_iter=em.gradient_max_iter)
        em._check_finite(restore=False)
        if isinstance(em.init, dict):
            em.model.set_params(**em.init)

    def e_step(self, em, chunk: Chunk, **plate) -> EChunk:
        """Refresh the guide on the chunk; keep it with the entropy of q."""
        from .mixture import responsibilities

        log_px, log_resp = responsibilities(em.guide, chunk.x, chunk.w, **plate)
        q = log_resp.exp()
        wq = q if chunk.w is None else q * chunk.w.unsqueeze(-1)
        entropy = -float(torch.where(q > 0, wq * log_resp, 0.0).sum())
        w = chunk.w
        stats = {"x": chunk.x, "entropy": torch.tensor(entropy, dtype=torch.float64)}
        stats |= {} if w is None else {"w": w}
        log_lik = float(log_px.sum() if w is None else (log_px * w).sum())
        return EChunk(stats, log_lik, entropy, chunk.weight, chunk.rows)

    def m_step(self, em, stats: Stats, rows: float) -> None:
        gradient_m_step(
            em.model, em.guide, stats["x"], stats.get("w"), max_iter=em.gradient_max_iter
        )

    def expected_log_joint(self, em, stats: Stats) -> float:
        """Q(theta~, theta) = -(Pyro's ELBO loss with the frozen guide) - H(q~)."""
        loss = elbo_loss(em.model, em.guide, stats["x"], stats.get("w"))
        return -float(loss.detach()) - float(stats["entropy"])

    def total_weight(self, stats: Stats) -> float:
        w = stats.get("w")
        return float(stats["x"].shape[0] if w is None else w.sum())

    def combine(self, a, b, alpha=1.0, beta=1.0):
        raise ValueError(
            "the gradient M-step needs the data in memory as one tensor; pass it so, or "
            "register sufficient statistics for the family (register_statistics)."
        )
