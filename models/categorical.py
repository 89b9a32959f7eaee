"""Categorical components, one category per feature: p_k(x) = prod_j theta_kj[x_j].

Each feature takes values in {0, ..., n_categories - 1} (latent class analysis).
"""

from __future__ import annotations

import numpy as np
import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from torch.distributions import constraints

from .base import MixtureModel

#: largest n_categories taken from the data (codes above it are refused as not dense)
MAX_INFERRED_CATEGORIES = 1 << 16
#: largest K x D x C table of probabilities (2 GiB in float64)
MAX_TABLE = 1 << 28


class CategoricalMixture(MixtureModel):
    """Mixture of independent categorical features.

    Parameters
    ----------
    n_components:
        Number of components K.
    n_categories:
        Number of categories C shared by all features; ``None`` takes ``max(x) + 1`` from
        the data at the first fit.

    Fitted attributes: ``weights_`` (K,), ``probs_`` (K, D, C). ``init=`` dicts take
    ``weights`` and ``probs``.
    """

    def __init__(self, n_components: int, n_categories: int | None = None) -> None:
        super().__init__(n_components)
        if n_categories is not None and (
            isinstance(n_categories, bool)
            or not isinstance(n_categories, (int, np.integer))
            or n_categories < 1
        ):
            raise ValueError(f"n_categories must be a positive integer, got {n_categories!r}")
        self.n_categories = None if n_categories is None else int(n_categories)
        self._fixed_categories = n_categories is not None

    def _build(self, n_features: int, dtype: torch.dtype) -> None:
        if self.n_categories is None:
            raise ValueError(
                "n_categories is unknown: pass CategoricalMixture(K, n_categories=C) "
                "or fit on data first"
            )
        self._check_table_size(n_features)
        K, D, C = self.n_components, n_features, self.n_categories
        self.probs = PyroParam(torch.full((K, D, C), 1.0 / C, dtype=dtype), constraints.simplex)

    def _prepare(self, x: torch.Tensor) -> None:
        """Take ``n_categories = max(x) + 1`` if it was not given."""
        if not self._fixed_categories:
            largest = int(x.max())
            if largest + 1 > MAX_INFERRED_CATEGORIES:
                raise ValueError(
                    f"the largest category code in x is {largest}, so n_categories would be "
                    f"{largest + 1}, most of them never seen; codes must be 0..C-1: re-encode "
                    "each feature, e.g. np.unique(column, return_inverse=True)[1], or pass "
                    "CategoricalMixture(K, n_categories=C) if there really are that many"
                )
            self.n_categories = largest + 1

    def _unprepare(self) -> None:
        if not self._fixed_categories:
            self.n_categories = None

    def _check_table_size(self, n_features: int) -> None:
        K, C = self.n_components, self.n_categories
        if K * n_features * C > MAX_TABLE:
            raise ValueError(
                f"a table of K x D x C = {K} x {n_features} x {C} category probabilities is "
                f"too large ({K * n_features * C:.3g} values, more than {MAX_TABLE:.3g}); "
                "re-encode the codes densely (0..C-1 with C the number of distinct values) "
                "or use fewer components"
            )

    def _component_params(self) -> dict[str, torch.Tensor]:
        return {"probs": self.probs}

    def _component_dist(self, probs) -> dist.TorchDistribution:
        return dist.Categorical(probs=probs).to_event(1)

    def _check_support(self, x: torch.Tensor, fitted: bool) -> None:
        if not bool(((x >= 0) & (x == x.round())).all()):
            raise ValueError(
                "CategoricalMixture needs category codes (integers 0, 1, ..., C-1); "
                "encode the categories as integers first."
            )
        if (
            self.n_categories is not None
            and (fitted or self._fixed_categories)
            and bool((x >= self.n_categories).any())
        ):
            seen = "" if self._fixed_categories else ", counted on the first data (chunk) seen"
            raise ValueError(
                f"category {int(x.max())} is out of range for n_categories="
                f"{self.n_categories} (codes must be 0..{self.n_categories - 1}{seen}); "
                + (
                    "create the model with a larger n_categories."
                    if self._fixed_categories
                    else "create the model with n_categories set to the number of categories."
                )
            )

    def _n_component_parameters(self) -> int:
        return self.n_components * self.n_features_in_ * (self.n_categories - 1)

    @property
    def probs_(self) -> torch.Tensor:
        """Category probabilities, shape (K, D, C)."""
        self._require_built()
        return self.probs.detach()
