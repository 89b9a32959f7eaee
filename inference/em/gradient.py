"""The generic M-step: maximise Q(theta~, theta) with the exact guide frozen (generalised EM).

With q = p(z | x; theta~) held fixed by the guide, the bound of every datum is

    LB(q, theta) = Q(theta~, theta) + H(q),   Q(theta~, theta) = E_q[log p(x, z; theta)]

(LB-1), and H(q) does not depend on theta, so

    argmax_theta LB(q, theta) = argmax_theta Q(theta~, theta)        (EM-1 step 2, EM-2, HMM-Q)

``ExactPosterior.expected_log_joint`` computes Q exactly from the frozen marginals and the
live model's enumerated log-probabilities: a mixture's from its joint table, a chain's
(``pyro.markov``) from its factors. Q + H is Pyro's ``TraceEnum_ELBO`` with the guide
frozen (tests check it to 1e-10), so this is "Pyro's ELBO maximised over theta", with the
constant entropy left out. Any component family, and any program whose latents Pyro can
enumerate, gets EM this way with no code of its own. L-BFGS on the unconstrained
parameters; each call at least does not decrease the bound, which is all EM-MONO needs.
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
    *args,
    max_iter: int = 50,
    tolerance_grad: float | None = None,
) -> float:
    """Maximise Q(theta~, theta) over the model's parameters with ``guide`` frozen.

    Parameters
    ----------
    model, guide:
        The Pyro program and its :class:`~elbolab.guides.ExactPosterior` holding q fixed
        (after ``refresh`` or ``fix`` on the same arguments).
    *args:
        The program's arguments: ``x`` (N, D) and ``sample_weight`` (N,) or None for a
        mixture; ``x`` and ``lengths`` for a hidden Markov model; whatever a user's
        program takes.
    max_iter:
        L-BFGS iterations.

    Returns
    -------
    The bound after the step, per unit weight: (Q + H(q)) / sum_d w_d.
    """
    x = args[0]
    weight = args[1] if len(args) > 1 and isinstance(model, MixtureModel) else None
    total = float(x.shape[0] if weight is None else weight.sum())
    entropy = guide.entropy(*args)
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    if tolerance_grad is None:
        tolerance_grad = 1e-10 if dtype == torch.float64 else 1e-6
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=1e-15 if dtype == torch.float64 else 1e-9,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    start = [p.detach().clone() for p in params]

    def loss_now() -> torch.Tensor:
        return -guide.expected_log_joint(*args) / total

    def closure():
        optimizer.zero_grad()
        loss = loss_now()
        loss.backward()
        return loss

    before = float(loss_now().detach())
    optimizer.step(closure)
    after = float(loss_now().detach())
    with torch.no_grad():
        if not (after <= before) or any(not bool(torch.isfinite(p).all()) for p in params):
            # never worse than where we started (generalised EM), never NaN
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
            after = before
    return -after + entropy / total


# ---------------------------------------------------------------------------- the family
class GradientFamily(Family):
    """Generalised EM for any model with an exact guide: the M-step maximises Q(theta~,
    theta) with the guide frozen (:func:`gradient_m_step`), so a family needs no code of
    its own. The "statistics" are the data themselves (one chunk in memory) and the entropy
    of the frozen q."""

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

    @staticmethod
    def program_args(em, chunk: Chunk) -> tuple:
        """The arguments the program takes for a chunk: (x, w) for a mixture, (x, lengths)
        for a sequence model, (x,) for any other program."""
        if isinstance(em.model, MixtureModel):
            return (chunk.x, chunk.w)
        if chunk.lengths is not None:
            return (chunk.x, chunk.lengths)
        return (chunk.x,)

    def e_step(self, em, chunk: Chunk, **plate) -> EChunk:
        """Refresh the guide on the chunk; keep the chunk with the entropy of q."""
        from .mixture import responsibilities

        if plate or isinstance(em.model, MixtureModel):
            log_px, log_resp = responsibilities(em.guide, chunk.x, chunk.w, **plate)
            q = log_resp.exp()
            wq = q if chunk.w is None else q * chunk.w.unsqueeze(-1)
            entropy = -float(torch.where(q > 0, wq * log_resp, 0.0).sum())
            w = chunk.w
            log_lik = float(log_px.sum() if w is None else (log_px * w).sum())
        else:
            args = self.program_args(em, chunk)
            em.guide.refresh(*args)
            log_lik, entropy = em.guide.log_likelihood(*args), em.guide.entropy(*args)
        return EChunk({"chunk": chunk}, log_lik, entropy, chunk.weight, chunk.rows)

    def m_step(self, em, stats: Stats, rows: float) -> None:
        args = self.program_args(em, stats["chunk"])
        gradient_m_step(em.model, em.guide, *args, max_iter=em.gradient_max_iter)

    def expected_log_joint(self, em, stats: Stats) -> float:
        """Q(theta~, theta) from the frozen guide."""
        args = self.program_args(em, stats["chunk"])
        return float(em.guide.expected_log_joint(*args).detach())

    def total_weight(self, stats: Stats) -> float:
        return stats["chunk"].weight

    def combine(self, a, b, alpha=1.0, beta=1.0):
        raise ValueError(
            "the gradient M-step needs the data in memory as one tensor; pass it so, or "
            "register sufficient statistics for the family (register_statistics)."
        )
