"""Guides q(z | x): variational families for the models in :mod:`elbolab.models`."""

from .amortized import AmortizedNormal, GaussianEncoder
from .exact import ExactPosterior
from .exact_gaussian import ExactGaussianPosterior
from .mean_field import MeanFieldPosterior
from .semi_supervised import SemiSupervisedGuide

__all__ = [
    "AmortizedNormal",
    "ExactGaussianPosterior",
    "ExactPosterior",
    "GaussianEncoder",
    "MeanFieldPosterior",
    "SemiSupervisedGuide",
]
