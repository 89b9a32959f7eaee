"""Guides q(z | x): variational families for the models in :mod:`elbolab.models`."""

from .amortized import AmortizedNormal, GaussianEncoder
from .exact import ExactPosterior

__all__ = ["AmortizedNormal", "ExactPosterior", "GaussianEncoder"]
