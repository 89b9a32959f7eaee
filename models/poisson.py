"""Poisson components for count vectors: p_k(x) = prod_j Poisson(x_j; lambda_kj)."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from torch.distributions import constraints

from .base import MixtureModel


class PoissonMixture(MixtureModel):
    """Mixture of independent Poisson counts.

    Fitted attributes: ``weights_`` (K,), ``rates_`` (K, D). ``init=`` dicts take
    ``weights`` and ``rates``.
    """

    def _build(self, n_features: int, dtype: torch.dtype) -> None:
        K, D = self.n_components, n_features
        self.rates = PyroParam(torch.ones(K, D, dtype=dtype), constraints.positive)

    def _component_params(self) -> dict[str, torch.Tensor]:
        return {"rates": self.rates}

    def _component_dist(self, rates) -> dist.TorchDistribution:
        return dist.Poisson(rates).to_event(1)

    def _check_support(self, x: torch.Tensor, fitted: bool) -> None:
        if not bool(((x >= 0) & (x == x.round())).all()):
            raise ValueError(
                "PoissonMixture needs counts (non-negative integers); "
                "round or drop the other entries, or use a GaussianMixture for real values."
            )

    @property
    def rates_(self) -> torch.Tensor:
        """Poisson rates lambda_kj, shape (K, D)."""
        self._require_built()
        return self.rates.detach()
