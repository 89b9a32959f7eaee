"""Closed-form M-steps, looked up by model class (the pattern of ``torch.distributions.kl``).

A closed-form M-step solves EM-MIX.3 for one component family:

    theta_k := argmax_theta_k  sum_d r_dk log p_k(x_d; theta_k)

and is registered for the family's model class::

    @register_m_step(MyMixture)
    def _m_step_my_mixture(model, x, resp, nk, reg_covar):
        ...  # set model's component parameters from the weighted data

Lookup walks the model's class hierarchy, so a subclass inherits its parent's M-step.
Families with nothing registered get the generic gradient M-step
(:mod:`elbolab.inference.gradient_m_step`), which maximises Pyro's ELBO instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: signature of a closed-form M-step: (model, x (N, D), resp (N, K), nk (K,), reg_covar) -> None
MStep = Callable[..., None]

_M_STEPS: dict[type, MStep] = {}


def register_m_step(model_class: type) -> Callable[[MStep], MStep]:
    """Decorator registering a closed-form component M-step for ``model_class``.

    The function receives ``(model, x, resp, nk, reg_covar)``: data ``x`` (N, D), weighted
    responsibilities ``resp`` (N, K), their column sums ``nk`` (K,) and the regulariser,
    and sets the model's component parameters. The weights pi are set by EM itself
    (EM-MIX.2), the same for every family.
    """
    if not isinstance(model_class, type):
        raise TypeError(f"register_m_step expects a class, got {model_class!r}")

    def decorator(fn: MStep) -> MStep:
        _M_STEPS[model_class] = fn
        return fn

    return decorator


def lookup_m_step(model_class: type) -> MStep | None:
    """The closed-form M-step for ``model_class`` or its nearest registered base, else None."""
    for cls in model_class.__mro__:
        if cls in _M_STEPS:
            return _M_STEPS[cls]
    return None


def registered_families() -> list[type]:
    """Model classes with a registered closed-form M-step."""
    return list(_M_STEPS)


def weights_m_step(nk: torch.Tensor) -> torch.Tensor:
    """pi_k := N_k / sum_k' N_k', N_k = sum_d r_dk (EM-MIX.2), shape (K,)."""
    return nk / nk.sum()
