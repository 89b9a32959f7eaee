"""Parity with scikit-learn's GaussianMixture from identical initial parameters.

Both run the same number of EM iterations (tol=0 so neither stops early) in float64 on
iris (150 x 4, K = 3). Same mean log-likelihood to 1e-8 relative and same parameters to
1e-6: the two implementations differ only in the order of floating-point operations.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from elbolab.datasets import load_iris
from elbolab.guides import ExactPosterior
from elbolab.inference import EM
from elbolab.models import GaussianMixture

N_ITER = 25


def initial_parameters(x: np.ndarray, kind: str):
    rng = np.random.default_rng(0)
    K, D = 3, x.shape[1]
    weights = np.array([0.3, 0.3, 0.4])
    means = x[rng.choice(len(x), K, replace=False)]
    var = x.var(0)
    cov = {
        "full": np.stack([np.diag(var) for _ in range(K)]),
        "tied": np.diag(var),
        "diag": np.stack([var for _ in range(K)]),
        "spherical": np.full(K, var.mean()),
    }[kind]
    precisions = np.linalg.inv(cov) if kind in ("full", "tied") else 1.0 / cov
    assert means.shape == (K, D)
    return weights, means, cov, precisions


@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
def test_same_trajectory_as_sklearn(kind):
    x = load_iris().data.numpy()
    weights, means, cov, precisions = initial_parameters(x, kind)
    sk = SkGaussianMixture(
        3,
        covariance_type=kind,
        tol=0.0,
        max_iter=N_ITER,
        reg_covar=1e-6,
        weights_init=weights,
        means_init=means,
        precisions_init=precisions,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk.fit(x)
    model = GaussianMixture(3, covariance_type=kind)
    em = EM(
        model,
        ExactPosterior(model),
        tol=0.0,
        max_iter=N_ITER,
        reg_covar=1e-6,
        init={"weights": weights, "means": means, "covariances": cov},
        progress=False,
    )
    with pytest.warns(ConvergenceWarning):
        result = em.fit(x)
    assert result.n_iter == sk.n_iter_ == N_ITER
    ours, theirs = model.score(x), sk.score(x)
    assert abs(ours - theirs) <= 1e-8 * abs(theirs)
    np.testing.assert_allclose(model.weights_.numpy(), sk.weights_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.means_.numpy(), sk.means_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.covariances_.numpy(), sk.covariances_, rtol=0, atol=1e-6)
    # exact per-sample log-likelihoods agree as well
    np.testing.assert_allclose(
        model.log_likelihood(x).detach().numpy(), sk.score_samples(x), rtol=1e-8
    )


@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
def test_log_likelihood_and_bic_match_sklearn(kind):
    """Given scikit-learn's fitted parameters, log p(x_d), n_parameters and BIC/AIC agree."""
    x = load_iris().data.numpy()
    sk = SkGaussianMixture(3, covariance_type=kind, random_state=0).fit(x)
    model = GaussianMixture(3, covariance_type=kind).build(4, torch.float64)
    model.set_params(weights=sk.weights_, means=sk.means_, covariances=sk.covariances_)
    np.testing.assert_allclose(
        model.log_likelihood(x).detach().numpy(), sk.score_samples(x), rtol=1e-10
    )
    assert model.n_parameters() == sk._n_parameters()
    assert model.bic(x) == pytest.approx(sk.bic(x), rel=1e-10)
    assert model.aic(x) == pytest.approx(sk.aic(x), rel=1e-10)
    np.testing.assert_allclose(model.predict_proba(x).numpy(), sk.predict_proba(x), atol=1e-10)
