"""Ground-truth mixtures of every family, and a family a user adds, shared by the tests."""

from __future__ import annotations

import numpy as np
import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from torch.distributions import constraints

from elbolab.models import (
    BernoulliMixture,
    CategoricalMixture,
    GaussianMixture,
    MixtureModel,
    PoissonMixture,
)

FAMILIES = [
    "gaussian-full",
    "gaussian-tied",
    "gaussian-diag",
    "gaussian-spherical",
    "bernoulli",
    "poisson",
    "categorical",
]


def make_model(family: str, K: int = 3):
    """A fresh, unbuilt model of the given family."""
    if family.startswith("gaussian"):
        return GaussianMixture(K, covariance_type=family.split("-")[1])
    if family == "bernoulli":
        return BernoulliMixture(K)
    if family == "poisson":
        return PoissonMixture(K)
    if family == "categorical":
        return CategoricalMixture(K, n_categories=4)
    raise ValueError(family)


def true_params(family: str, K: int = 3, D: int = 3) -> dict:
    """Well-separated ground-truth parameters for a family (float64)."""
    g = torch.Generator().manual_seed(1)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)[:K]
    w = w / w.sum()
    if family.startswith("gaussian"):
        kind = family.split("-")[1]
        means = 4.0 * torch.randn(K, D, generator=g, dtype=torch.float64)
        A = torch.randn(K, D, D, generator=g, dtype=torch.float64) * 0.4
        full = A @ A.transpose(-1, -2) + 0.5 * torch.eye(D, dtype=torch.float64)
        cov = {
            "full": full,
            "tied": full[0],
            "diag": torch.diagonal(full, dim1=-2, dim2=-1),
            "spherical": torch.diagonal(full, dim1=-2, dim2=-1).mean(-1),
        }[kind]
        return {"weights": w, "means": means, "covariances": cov}
    if family == "bernoulli":
        return {
            "weights": w,
            "probs": torch.rand(K, D, generator=g, dtype=torch.float64) * 0.8 + 0.1,
        }
    if family == "poisson":
        return {"weights": w, "rates": torch.rand(K, D, generator=g, dtype=torch.float64) * 8 + 0.5}
    if family == "categorical":
        p = torch.rand(K, D, 4, generator=g, dtype=torch.float64) + 0.2
        return {"weights": w, "probs": p / p.sum(-1, keepdim=True)}
    raise ValueError(family)


def fitted_model(family: str, K: int = 3, D: int = 3):
    """A model built with the ground-truth parameters of ``family``."""
    model = make_model(family, K)
    model.build(D, torch.float64)
    model.set_params(**true_params(family, K, D))
    return model


def sample_data(family: str, n: int = 300, K: int = 3, D: int = 3, seed: int = 0) -> torch.Tensor:
    """``n`` samples (n, D) from the ground-truth mixture of ``family``."""
    x, _ = fitted_model(family, K, D).sample(n, seed=seed)
    return x


class ExponentialMixture(MixtureModel):
    """A new family in a few lines: p_k(x) = prod_j rate_kj exp(-rate_kj x_j)."""

    def _build(self, n_features, dtype):
        self.rates = PyroParam(
            torch.ones(self.n_components, n_features, dtype=dtype), constraints.positive
        )

    def _component_params(self):
        return {"rates": self.rates}

    def _component_dist(self, rates):
        return dist.Exponential(rates).to_event(1)

    def _check_support(self, x, fitted):
        if bool((x < 0).any()):
            raise ValueError("ExponentialMixture needs non-negative data")


def vb_setup(n_features: int, chunk_rows: int = 64):
    """A BayesianGaussianMixture with priors that do not depend on the data, and its start
    from fixed responsibilities of the first chunk (the same on every rank)."""
    from elbolab.models import BayesianGaussianMixture

    model = BayesianGaussianMixture(
        3, mean_prior=np.zeros(n_features), covariance_prior=np.eye(n_features)
    )
    resp = np.random.default_rng(0).dirichlet(np.ones(3), size=chunk_rows)
    return model, {"responsibilities": resp}


def hmm_start(x) -> dict:
    """A complete start for a 3-state diagonal GaussianHMM (the same on every rank)."""
    return {
        "startprob": np.full(3, 1 / 3),
        "transmat": np.full((3, 3), 1 / 6) + np.eye(3) / 2,
        "means": np.asarray(x[:3]) + 0.5,
        "covariances": np.ones((3, x.shape[1])),
    }
