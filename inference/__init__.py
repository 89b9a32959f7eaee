"""Inference: EM with the exact-posterior guide, and direct maximum likelihood."""

from sklearn.exceptions import ConvergenceWarning

from . import closed_form  # noqa: F401  (registers the closed-form M-steps)
from .direct import DirectML, marginal_log_likelihood
from .em import EM
from .fitting import EMResult, MixtureFitter
from .gradient_m_step import elbo_loss, gradient_m_step
from .registry import lookup_m_step, register_m_step, registered_families, weights_m_step

__all__ = [
    "EM",
    "ConvergenceWarning",
    "DirectML",
    "EMResult",
    "MixtureFitter",
    "elbo_loss",
    "gradient_m_step",
    "lookup_m_step",
    "marginal_log_likelihood",
    "register_m_step",
    "registered_families",
    "weights_m_step",
]
