"""EM's options, as a user of scikit-learn's GaussianMixture expects them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from elbolab.guides import ExactPosterior
from elbolab.inference import EM, ConvergenceWarning, DirectML
from elbolab.models import GaussianMixture
from families import sample_data

EXACT = 1e-10


def em(model, **kwargs):
    kwargs.setdefault("progress", False)
    return EM(model, ExactPosterior(model), **kwargs)


def test_public_surface(faithful):
    model = GaussianMixture(n_components=2, covariance_type="full")
    result = EM(
        model, ExactPosterior(model), tol=1e-6, max_iter=500, n_init=3, seed=0, progress=False
    ).fit(faithful)
    assert result.converged and 1 <= result.n_iter < 500
    assert isinstance(result.log_likelihoods, list) and isinstance(result.lower_bounds[0], float)
    assert model.log_likelihood(faithful).shape == (272,)
    assert ExactPosterior(model).probs(faithful).shape == (272, 2)
    # the guide ends as the posterior at the returned parameters (EM-MIX.1)
    assert torch.allclose(em(model).guide.probs(faithful), model.predict_proba(faithful))
    # the known answer on standardised Old Faithful
    assert result.log_likelihood == pytest.approx(-1.4171349, abs=1e-6)


def test_converged_only_when_tol_reached(faithful):
    model = GaussianMixture(2)
    with pytest.warns(ConvergenceWarning, match="did not converge in max_iter=2"):
        result = em(model, max_iter=2, tol=1e-12, seed=0).fit(faithful)
    assert not result.converged and result.n_iter == 2
    # the same fit with room to finish converges, and the change of the bound is < tol
    result = em(GaussianMixture(2), max_iter=500, tol=1e-8, seed=0).fit(faithful)
    assert result.converged
    assert abs(result.lower_bounds[-1] - result.lower_bounds[-2]) < 1e-8


def test_n_init_keeps_the_best_bound():
    x = sample_data("gaussian-full", 300)
    result = em(GaussianMixture(3), n_init=4, init="random_from_data", seed=1, tol=1e-4).fit(x)
    assert len(result.init_lower_bounds) == 4
    assert result.lower_bound == max(result.init_lower_bounds)
    assert result.init_lower_bounds[result.best_init] == result.lower_bound


def test_seed_reproducible():
    x = sample_data("gaussian-diag", 200)
    a, b = GaussianMixture(3, "diag"), GaussianMixture(3, "diag")
    ra = em(a, seed=7, init="random_from_data").fit(x)
    rb = em(b, seed=7, init="random_from_data").fit(x)
    assert ra.log_likelihoods == rb.log_likelihoods
    assert torch.equal(a.means_, b.means_)


@pytest.mark.parametrize("init", ["kmeans++", "kmeans", "random_from_data", "random"])
def test_every_init_method_reaches_the_optimum(init, faithful):
    result = em(GaussianMixture(2), init=init, seed=0, tol=1e-8, max_iter=500, n_init=3).fit(
        faithful
    )
    assert result.log_likelihood == pytest.approx(-1.4171349, abs=1e-6)


def test_explicit_init_is_the_starting_point(faithful):
    start = {
        "weights": [0.5, 0.5],
        "means": [[-1.0, 1.0], [1.0, -1.0]],
        "covariances": [np.eye(2), np.eye(2)],
    }
    seen = []
    em(
        GaussianMixture(2),
        init=start,
        max_iter=50,
        callback=lambda t, m: seen.append(m.means_.clone()) if t == 0 else None,
    ).fit(faithful)
    assert torch.equal(seen[0], torch.tensor(start["means"], dtype=torch.float64))


def test_integer_sample_weights_equal_repeated_rows():
    """Weighting a sample by 2 is the same as including it twice (exact path)."""
    x = sample_data("gaussian-full", 60)
    w = torch.randint(1, 4, (60,), generator=torch.Generator().manual_seed(0)).double()
    repeated = x.repeat_interleave(w.long(), dim=0)
    start = {
        "weights": [0.3, 0.3, 0.4],
        "means": x[:3].numpy(),
        "covariances": np.stack([np.eye(3)] * 3),
    }
    a, b = GaussianMixture(3), GaussianMixture(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ra = em(a, init=start, max_iter=10, tol=0).fit(x, sample_weight=w)
        rb = em(b, init=start, max_iter=10, tol=0).fit(repeated)
    np.testing.assert_allclose(ra.log_likelihoods, rb.log_likelihoods, rtol=EXACT)
    np.testing.assert_allclose(a.covariances_, b.covariances_, rtol=1e-9, atol=EXACT)


def test_sample_weight_with_the_gradient_m_step():
    """The gradient M-step sees the weights through poutine.scale and agrees."""
    x = sample_data("gaussian-diag", 60)
    w = torch.linspace(0.5, 2.0, 60, dtype=torch.float64)
    start = {"weights": [0.3, 0.3, 0.4], "means": x[:3].numpy(), "covariances": np.ones((3, 3))}
    a, b = GaussianMixture(3, "diag"), GaussianMixture(3, "diag")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        em(a, init=start, max_iter=3, tol=0, reg_covar=0).fit(x, sample_weight=w)
        em(b, init=start, max_iter=3, tol=0, m_step="gradient", gradient_max_iter=300).fit(
            x, sample_weight=w
        )
    np.testing.assert_allclose(a.means_, b.means_, atol=1e-6)


def test_warm_start_continues_from_the_fitted_parameters(faithful):
    model = GaussianMixture(2)
    first = em(model, seed=0, tol=1e-3).fit(faithful)
    second = em(model, warm_start=True, tol=1e-10, max_iter=500).fit(faithful)
    assert second.log_likelihoods[0] == pytest.approx(first.log_likelihood, abs=EXACT)
    assert second.log_likelihood >= first.log_likelihood


def test_two_models_in_one_session_do_not_share_parameters(faithful):
    import pyro

    a, b = GaussianMixture(2), GaussianMixture(3)
    em(a, seed=0).fit(faithful)
    em(b, seed=0).fit(faithful)
    assert a.means_.shape == (2, 2) and b.means_.shape == (3, 2)
    assert len(pyro.get_param_store()) == 0  # nothing in Pyro's global store


def test_direct_scheme_reaches_the_same_maximum(faithful):
    model = GaussianMixture(2)
    result = DirectML(model, seed=0, tol=1e-10, max_iter=500, progress=False).fit(faithful)
    assert result.converged
    assert result.log_likelihood == pytest.approx(-1.4171349, abs=1e-6)
    assert model.score(faithful) == pytest.approx(result.log_likelihood, abs=EXACT)
    assert all(
        b >= a - 1e-9
        for a, b in zip(result.log_likelihoods, result.log_likelihoods[1:], strict=False)
    )


def test_gradient_m_step_em_reaches_the_closed_form_optimum(faithful):
    a, b = GaussianMixture(2), GaussianMixture(2)
    ra = em(a, seed=0, tol=1e-10, max_iter=500).fit(faithful)
    rb = em(b, seed=0, tol=1e-10, max_iter=500, m_step="gradient").fit(faithful)
    assert rb.m_step == "gradient" and ra.m_step == "closed-form"
    assert rb.log_likelihood == pytest.approx(ra.log_likelihood, abs=1e-8)
    order = torch.argsort(a.means_[:, 0]), torch.argsort(b.means_[:, 0])
    np.testing.assert_allclose(a.means_[order[0]], b.means_[order[1]], atol=1e-5)
