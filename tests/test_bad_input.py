"""Bad input: a ValueError naming the problem and the fix, raised before any work,
and nothing lost (parameters stay finite and unchanged)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elbolab.guides import ExactPosterior
from elbolab.inference import EM
from elbolab.models import (
    BernoulliMixture,
    CategoricalMixture,
    GaussianMixture,
    PoissonMixture,
    SingularCovarianceError,
)


def fit(model, x, sample_weight=None, **kwargs):
    return EM(model, ExactPosterior(model), progress=False, **kwargs).fit(x, sample_weight)


def raises_exactly(message: str):
    """pytest.raises(ValueError) whose message must equal ``message`` in full."""
    return pytest.raises(ValueError, match="^" + __import__("re").escape(message) + "$")


def test_nan_and_inf():
    x = np.random.default_rng(0).normal(size=(20, 2))
    msg = "x contains NaN or inf; remove or impute those entries before fitting."
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[3, 1] = bad
        with raises_exactly(msg):
            fit(GaussianMixture(2), y)


def test_not_2d():
    with raises_exactly(
        "x must be 2-D with shape (n_samples, n_features), got shape (20,); reshape it, "
        "e.g. x.reshape(-1, 1) for a single feature."
    ):
        fit(GaussianMixture(2), np.zeros(20))


def test_empty():
    with raises_exactly("x is empty (shape (0, 2)); pass at least one sample."):
        fit(GaussianMixture(2), np.zeros((0, 2)))


def test_fewer_samples_than_components():
    with raises_exactly(
        "x has 3 samples but the model has 4 components; pass at least 4 samples or use "
        "fewer components."
    ):
        fit(GaussianMixture(4), np.random.default_rng(0).normal(size=(3, 2)))


@pytest.mark.parametrize("k", [0, -1])
def test_n_components_below_one(k):
    with raises_exactly(
        f"n_components must be >= 1, got {k}; a mixture needs at least one component."
    ):
        GaussianMixture(k)


def test_n_components_not_an_integer():
    with raises_exactly(
        "n_components must be a positive integer, got 2.5; pass the number of mixture "
        "components, e.g. n_components=3."
    ):
        GaussianMixture(2.5)


def test_feature_count_differs_from_fitted():
    model = GaussianMixture(2)
    fit(model, np.random.default_rng(0).normal(size=(50, 2)))
    with raises_exactly(
        "x has 3 features but the model was built for 2; pass data with 2 columns or "
        "create a new model."
    ):
        model.log_likelihood(np.zeros((5, 3)))


def test_bernoulli_needs_binary():
    with raises_exactly(
        "BernoulliMixture needs binary data (every entry 0 or 1); threshold or binarise "
        "the data first, e.g. (x > 0.5)."
    ):
        fit(BernoulliMixture(2), np.array([[0, 1], [1, 0.5], [1, 1]]))


@pytest.mark.parametrize("bad", [-1.0, 2.5])
def test_poisson_needs_counts(bad):
    with raises_exactly(
        "PoissonMixture needs counts (non-negative integers); round or drop the other "
        "entries, or use a GaussianMixture for real values."
    ):
        fit(PoissonMixture(2), np.array([[0, 1], [3, bad], [1, 1]]))


def test_categorical_out_of_range():
    with raises_exactly(
        "category 5 is out of range for n_categories=4 (codes must be 0..3); create the "
        "model with a larger n_categories."
    ):
        fit(CategoricalMixture(2, n_categories=4), np.array([[0, 1], [3, 5], [1, 2]]))


def test_categorical_not_codes():
    with raises_exactly(
        "CategoricalMixture needs category codes (integers 0, 1, ..., C-1); encode the "
        "categories as integers first."
    ):
        fit(CategoricalMixture(2), np.array([[0, 1], [3, -1], [1, 2]]))


@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
def test_singular_covariance_raises_one_clear_error_and_keeps_finite_parameters(kind):
    """Three distinct points, each repeated: with reg_covar=0 every component collapses."""
    points = np.array([[0.0, 0.0], [5.0, 1.0], [1.0, 6.0]])
    x = np.repeat(points, 10, axis=0)
    model = GaussianMixture(3, covariance_type=kind)
    with pytest.raises(SingularCovarianceError) as info:
        fit(model, x, reg_covar=0.0, init="kmeans++", seed=0)
    assert str(info.value) == (
        f"a {kind} covariance became singular (not positive definite) during fitting, "
        "usually because a component collapsed onto too few or duplicated points; raise "
        "reg_covar (e.g. reg_covar=1e-4) or scale the data (standardise each feature)."
    )
    assert isinstance(info.value, ValueError)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # the advice works: the same fit with a regulariser succeeds
    result = fit(GaussianMixture(3, covariance_type=kind), x, reg_covar=1e-3, seed=0)
    assert np.isfinite(result.log_likelihood)


def test_empty_component_is_handled():
    """A component that receives no responsibility keeps weight ~0 and finite parameters
    (its mean and covariance fall back to the regularised empty estimate, as in
    scikit-learn); the fit goes on and says so through ``weights_``."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 0.5, (100, 2)), rng.normal(2, 0.5, (100, 2))])
    start = {
        "weights": np.array([0.45, 0.45, 0.10]),
        "means": np.array([[-2.0, -2.0], [2.0, 2.0], [1e3, 1e3]]),  # third one far away
        "covariances": np.stack([np.eye(2)] * 3),
    }
    model = GaussianMixture(3)
    result = fit(model, x, init=start, reg_covar=1e-6, max_iter=50)
    assert model.weights_[2] < 1e-10
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert np.isfinite(result.log_likelihoods).all()


def test_bad_sample_weight():
    x = np.random.default_rng(0).normal(size=(10, 2))
    with raises_exactly("sample_weight must have shape (10,), one weight per sample, got (9,)"):
        fit(GaussianMixture(2), x, sample_weight=np.ones(9))
    with raises_exactly("sample_weight must be finite and non-negative with a positive sum"):
        fit(GaussianMixture(2), x, sample_weight=-np.ones(10))


def test_bad_options():
    m = GaussianMixture(2)
    g = ExactPosterior(m)
    with raises_exactly("m_step must be one of ('auto', 'closed-form', 'gradient'), got 'fast'"):
        EM(m, g, m_step="fast")
    with raises_exactly(
        "init must be one of ('kmeans++', 'kmeans', 'random_from_data', 'random') or a dict, "
        "got 'k-means'"
    ):
        EM(m, g, init="k-means")
    with raises_exactly("max_iter must be an integer >= 1, got 0"):
        EM(m, g, max_iter=0)
    with raises_exactly("guide must be ExactPosterior(model) for this same model"):
        EM(GaussianMixture(2), g)


def test_unfitted_model_says_how_to_fit():
    with pytest.raises(ValueError, match="has no parameters yet: fit it with"):
        GaussianMixture(2).log_likelihood(np.zeros((3, 2)))
