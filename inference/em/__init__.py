"""EM with an exact posterior: the loop, its data sources, starts and sufficient statistics."""

from .fitter import EMResult, MixtureFitter
from .loop import EM

__all__ = ["EM", "EMResult", "MixtureFitter"]
