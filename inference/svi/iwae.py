"""The importance-weighted bound as a differentiable loss (IWAE; Burda, Grosse & Salakhutdinov).

    L_K(x) = E[ log (1/K) sum_k p(x, z_k) / q(z_k | x) ],   z_1..z_K ~ q(z | x)

L_1 is the ELBO, L_K rises with K, and L_K -> log p(x) as K -> infinity. Pyro writes it as
``RenyiELBO(alpha=0, num_particles=K)``, whose ``loss`` is this bound; but its
``loss_and_grads`` backpropagates only when the traces hold ``param`` sites, which
module-local parameters (``pyro.settings.set(module_local_params=True)``, how elbolab keeps
parameters) never send, so it would train nothing. :class:`ImportanceWeightedELBO` is that
ELBO with the ``differentiable_loss`` it lacks: the same per-datum log weights from the same
traces (``RenyiELBO._get_traces``, particles in a vectorised plate or one after another),
``-sum_d [logsumexp_k log w_dk - log K]``, differentiated by autograd through the
reparameterised draws. It takes reparameterised guides only (a discrete or otherwise
non-reparameterised guide site is refused: use ``TraceEnum_ELBO`` or ``RenyiELBO`` there).
"""

from __future__ import annotations

import math

import torch
from pyro.infer import RenyiELBO
from pyro.infer.util import get_dependent_plate_dims, torch_sum


class ImportanceWeightedELBO(RenyiELBO):
    """``RenyiELBO(alpha=0, num_particles=K)`` with a ``differentiable_loss`` (module-local
    parameters train with it); ``loss`` is Pyro's own.

    Parameters
    ----------
    num_particles:
        K >= 1, the importance samples per datum (1: the ELBO).
    vectorize_particles, max_plate_nesting:
        As for Pyro's ELBOs (default: vectorised, one plate).
    """

    def __init__(
        self, num_particles: int = 8, vectorize_particles: bool = True, max_plate_nesting: int = 1
    ) -> None:
        super().__init__(
            alpha=0,
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            max_plate_nesting=max_plate_nesting,
        )

    def log_weights(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """log p(x, z_k) - log q(z_k | x) per particle and datum, shape (K, *data dims)."""
        particles = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            log_w = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    log_w = log_w + torch_sum(site["log_prob"], sum_dims)
            for name, site in guide_trace.nodes.items():
                if site["type"] != "sample":
                    continue
                if not site["fn"].has_rsample:
                    raise ValueError(
                        f"ImportanceWeightedELBO needs reparameterised guide sites, but "
                        f"{name!r} ({type(site['fn']).__name__}) has none; sum a discrete "
                        "site with TraceEnum_ELBO, or use Pyro's RenyiELBO with parameters "
                        "in its param store"
                    )
                log_w = log_w - torch_sum(site["log_prob"], sum_dims)
            particles.append(log_w)
        vectorized = self.vectorize_particles and self.num_particles > 1
        return particles[0] if vectorized else torch.stack(particles)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-sum_d L_K(x_d): minus the importance-weighted bound, summed over the data."""
        log_w = self.log_weights(model, guide, *args, **kwargs)
        return -(log_w.logsumexp(0) - math.log(self.num_particles)).sum()
