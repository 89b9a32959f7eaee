"""Inference: EM with the exact-posterior guide, direct maximum likelihood, and SVI (the VAE)."""

from sklearn.exceptions import ConvergenceWarning

from . import closed_form  # noqa: F401  (registers the closed-form M-steps)
from .bayesian import BayesianMixture
from .compare import Comparison, Selection, compare, select_k
from .compiled import CompiledELBO, TracingFailed, is_compilable
from .direct import DirectML, marginal_log_likelihood
from .em import EM
from .evaluate import (
    bound_terms,
    elbo_per_datapoint,
    iwae_log_likelihood,
    latent_means,
    reconstruct,
)
from .fitting import EMResult, MixtureFitter
from .gradient_m_step import elbo_loss, gradient_m_step
from .linear_gaussian import LinearGaussianEM, linear_gaussian_m_step, ppca_closed_form
from .posterior import LabelReport, nuts_flags, relabel, to_inference_data
from .priors import MixturePrior, lookup_prior, prior_for, register_prior
from .registry import lookup_m_step, register_m_step, registered_families, weights_m_step
from .schemes import SchemeFit, lookup_scheme, register_scheme, schemes_for
from .statistics import SufficientStatistics, lookup_statistics, register_statistics
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
    "bound_terms",
    "elbo_per_datapoint",
    "iwae_log_likelihood",
    "latent_means",
    "reconstruct",
    "MixtureFitter",
    "elbo_loss",
    "gradient_m_step",
    "LinearGaussianEM",
    "linear_gaussian_m_step",
    "ppca_closed_form",
    "is_compilable",
    "lookup_m_step",
    "marginal_log_likelihood",
    "register_m_step",
    "register_statistics",
    "lookup_statistics",
    "SufficientStatistics",
    "registered_families",
    "weights_m_step",
    "BayesianMixture",
    "Comparison",
    "LabelReport",
    "MixturePrior",
    "SchemeFit",
    "Selection",
    "compare",
    "lookup_prior",
    "lookup_scheme",
    "nuts_flags",
    "prior_for",
    "register_prior",
    "register_scheme",
    "relabel",
    "schemes_for",
    "select_k",
    "to_inference_data",
]
