"""Latent-variable models written as Pyro programs p(z) p(x | z; theta)."""

from .base import MixtureModel, NotFittedError, as_data_tensor
from .bayesian import BayesianMixture  # noqa: E402  (after the families it reads)
from .bernoulli import BernoulliMixture
from .categorical import CategoricalMixture
from .conjugate import BayesianGaussianMixture, ConjugateMixture
from .conjugate_discrete import (
    BayesianBernoulliMixture,
    BayesianCategoricalMixture,
    BayesianPoissonMixture,
)
from .enumeration import EnumeratedJoint, enumerate_joint
from .gaussian import GaussianMixture, SingularCovarianceError
from .hmm import (
    BernoulliHMM,
    CategoricalHMM,
    GaussianHMM,
    HiddenMarkovModel,
    PoissonHMM,
)
from .linear_gaussian import PPCA, FactorAnalysis, LinearGaussian, gaussian_bound
from .poisson import PoissonMixture
from .semi_supervised import SemiSupervisedVAE
from .vae import VAE

__all__ = [
    "BernoulliHMM",
    "CategoricalHMM",
    "GaussianHMM",
    "HiddenMarkovModel",
    "PoissonHMM",
    "BayesianBernoulliMixture",
    "BayesianCategoricalMixture",
    "BayesianGaussianMixture",
    "BayesianPoissonMixture",
    "ConjugateMixture",
    "BayesianMixture",
    "BernoulliMixture",
    "CategoricalMixture",
    "EnumeratedJoint",
    "FactorAnalysis",
    "GaussianMixture",
    "LinearGaussian",
    "MixtureModel",
    "NotFittedError",
    "PPCA",
    "PoissonMixture",
    "SemiSupervisedVAE",
    "SingularCovarianceError",
    "VAE",
    "as_data_tensor",
    "enumerate_joint",
    "gaussian_bound",
]
