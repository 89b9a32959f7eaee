"""Summing discrete latent sites out of a Pyro program with Pyro's parallel enumeration.

This is the one place where "z is summed out" happens. The exact-posterior guide
(EM-MIX.1) and every model's exact ``log_likelihood`` are built on it, with no
model-specific code: the program is run once under ``poutine.enum``; every discrete
latent site gets its own tensor dimension to the left of the plates, and the
log-probabilities of all sites are added by broadcasting into one table.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import _ENUM_ALLOCATOR
from pyro.poutine.util import site_is_subsample


@contextmanager
def _own_enum_dims():
    """Leave Pyro's (single, global) enumeration-dim allocator as we found it.

    A guide that enumerates its model while an ELBO is enumerating the guide itself would
    otherwise push the outer program's enumeration dims to the left.
    """
    saved = {k: (v.copy() if isinstance(v, dict) else v) for k, v in vars(_ENUM_ALLOCATOR).items()}
    try:
        yield
    finally:
        vars(_ENUM_ALLOCATOR).clear()
        vars(_ENUM_ALLOCATOR).update(saved)


@dataclass
class EnumeratedJoint:
    """log p(x, z_1..z_m) for every joint value of the discrete latent sites.

    Attributes
    ----------
    log_joint:
        Tensor of shape ``(K_m, ..., K_1, *plate_shape)``: site ``j`` (in program order,
        ``j = 1..m``) owns dimension ``-(max_plate_nesting + j)``.
    sites:
        Names of the enumerated latent sites, in program order.
    cardinalities:
        Number of values of each latent site.
    frames:
        The plates each latent site sits in (to rebuild them in a guide).
    scales:
        The ``poutine.scale`` factor of each latent site (1.0 or a tensor).
    max_plate_nesting:
        Number of plate dimensions the table was built with.
    """

    log_joint: torch.Tensor
    sites: list[str]
    cardinalities: list[int]
    frames: list[tuple[CondIndepStackFrame, ...]]
    scales: list
    max_plate_nesting: int

    def enum_dim(self, j: int) -> int:
        """Tensor dimension of latent site number ``j`` (0-based, program order)."""
        return -(self.max_plate_nesting + 1 + j)

    def log_marginal(self) -> torch.Tensor:
        """log p(x) with every latent site summed out; shape ``plate_shape``."""
        out = self.log_joint
        for _ in self.sites:
            out = out.logsumexp(dim=-(self.max_plate_nesting + 1))
        return out


def enumerate_joint(model, *args, max_plate_nesting: int = 1, **kwargs) -> EnumeratedJoint:
    """Run ``model(*args, **kwargs)`` with its discrete latent sites enumerated in parallel.

    Every latent site must have finite support (``enumerate_support``) and sit inside the
    same plates as the observations it explains; the returned table is then the exact joint
    log p(x_d, z_d) per data point, from which both log p(x_d) and p(z_d | x_d) follow.

    Raises ``ValueError`` (with the fix) for latent sites that cannot be enumerated.
    """
    enum_model = poutine.enum(
        config_enumerate(model, default="parallel"), first_available_dim=-(max_plate_nesting + 1)
    )
    # block(): the inner run must not leak sites into an outer trace (e.g. an ELBO's guide trace)
    with _own_enum_dims(), poutine.block():
        trace = poutine.trace(enum_model).get_trace(*args, **kwargs)
    sites, cards, frames, scales, log_probs = [], [], [], [], []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        fn = site["fn"]
        if not site["is_observed"]:
            if site["infer"].get("enumerate") != "parallel":
                raise ValueError(
                    f"latent site {name!r} ({type(fn).__name__}) cannot be summed out: the exact "
                    "posterior needs discrete latent sites with finite support. Use an amortized "
                    "or mean-field guide for continuous latent variables."
                )
            sites.append(name)
            cards.append(int(site["value"].shape[0]) if site["value"].dim() else 1)
            frames.append(tuple(f for f in site["cond_indep_stack"] if f.vectorized))
            scales.append(site["scale"])
        log_p = fn.log_prob(site["value"])
        if site["mask"] is not None:
            log_p = log_p.masked_fill(~site["mask"], 0.0)
        log_probs.append(log_p)
    if not sites:
        raise ValueError("the model has no latent sample site to sum out")
    log_joint = log_probs[0]
    for log_p in log_probs[1:]:
        log_joint = log_joint + log_p
    width = max_plate_nesting + len(sites)
    if log_joint.dim() < width:
        log_joint = log_joint.reshape((1,) * (width - log_joint.dim()) + log_joint.shape)
    return EnumeratedJoint(log_joint, sites, cards, frames, scales, max_plate_nesting)
