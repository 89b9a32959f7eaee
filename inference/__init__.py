"""Inference: EM with the exact-posterior guide, direct maximum likelihood, and SVI (the VAE)."""

from sklearn.exceptions import ConvergenceWarning

from . import closed_form  # noqa: F401  (registers the closed-form M-steps)
from .compiled import CompiledELBO, TracingFailed, is_compilable
from .direct import DirectML, marginal_log_likelihood
from .em import EM
from .evaluate import elbo_per_datapoint, iwae_log_likelihood, latent_means, reconstruct
from .fitting import EMResult, MixtureFitter
from .gradient_m_step import elbo_loss, gradient_m_step
from .registry import lookup_m_step, register_m_step, registered_families, weights_m_step
from .svi import SVITrainer, TrainingDiverged, TrainResult

__all__ = [
    "EM",
    "CompiledELBO",
    "ConvergenceWarning",
    "DirectML",
    "EMResult",
    "SVITrainer",
    "TrainResult",
    "TrainingDiverged",
    "TracingFailed",
    "elbo_per_datapoint",
    "iwae_log_likelihood",
    "latent_means",
    "reconstruct",
    "MixtureFitter",
    "elbo_loss",
    "gradient_m_step",
    "is_compilable",
    "lookup_m_step",
    "marginal_log_likelihood",
    "register_m_step",
    "registered_families",
    "weights_m_step",
]
