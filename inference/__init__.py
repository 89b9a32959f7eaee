"""Inference: EM with the exact-posterior guide, direct maximum likelihood, and SVI (the VAE)."""

from sklearn.exceptions import ConvergenceWarning

from ..models.bayesian import BayesianMixture
from ..models.priors import MixturePrior, lookup_prior, prior_for, register_prior
from .compare.posterior import LabelReport, nuts_flags, relabel, to_inference_data
from .compare.schemes import SchemeFit, lookup_scheme, register_scheme, schemes_for
from .compare.table import Comparison, Selection, compare, select_k
from .direct import DirectML, marginal_log_likelihood
from .em import hmm, linear_gaussian, variational  # noqa: F401  (register their families)
from .em.family import Family, register_family
from .em.fitter import EMResult, Fitter, MixtureFitter
from .em.gradient import elbo_loss, gradient_m_step
from .em.linear_gaussian import linear_gaussian_m_step, ppca_closed_form
from .em.loop import EM
from .em.mixture import (
    SufficientStatistics,
    lookup_m_step,
    lookup_statistics,
    register_m_step,
    register_statistics,
    registered_families,
    weights_m_step,
)
from .svi.compiled import CompiledELBO, TracingFailed, is_compilable
from .svi.evaluate import (
    bound_terms,
    elbo_per_datapoint,
    iwae_log_likelihood,
    latent_means,
    reconstruct,
)
from .svi.iwae import ImportanceWeightedELBO
from .svi.trainer import SVITrainer, TrainingDiverged, TrainResult

__all__ = [
    "EM",
    "CompiledELBO",
    "ConvergenceWarning",
    "DirectML",
    "EMResult",
    "ImportanceWeightedELBO",
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
    "Family",
    "Fitter",
    "register_family",
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

#: the name of EM for PPCA and factor analysis when it was a class of its own
LinearGaussianEM = EM
