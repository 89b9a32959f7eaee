"""Bernoulli components for binary vectors: p_k(x) = prod_j mu_kj^x_j (1 - mu_kj)^(1 - x_j)."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from torch.distributions import constraints

from .base import MixtureModel


class BernoulliMixture(MixtureModel):
    """Mixture of independent Bernoulli vectors (PRML section 9.3.3).

    Fitted attributes: ``weights_`` (K,), ``probs_`` (K, D) with p(x_j = 1 | z = k).
    ``init=`` dicts take ``weights`` and ``probs``.
    """

    def _build(self, n_features: int, dtype: torch.dtype) -> None:
        K, D = self.n_components, n_features
        self.probs = PyroParam(torch.full((K, D), 0.5, dtype=dtype), constraints.unit_interval)

    def _component_params(self) -> dict[str, torch.Tensor]:
        return {"probs": self.probs}

    def _component_dist(self, probs) -> dist.TorchDistribution:
        return dist.Bernoulli(probs=probs).to_event(1)

    def _check_support(self, x: torch.Tensor, fitted: bool) -> None:
        if not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(
                "BernoulliMixture needs binary data (every entry 0 or 1); "
                "threshold or binarise the data first, e.g. (x > 0.5)."
            )

    @property
    def probs_(self) -> torch.Tensor:
        """p(x_j = 1 | z = k), shape (K, D)."""
        self._require_built()
        return self.probs.detach()
