"""Guides q(z | x): variational families for the models in :mod:`elbolab.models`."""

from .exact import ExactPosterior

__all__ = ["ExactPosterior"]
