"""The mixture models as Pyro programs: sites, sampling, parameter counts, extension."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from elbolab.guides import ExactPosterior
from elbolab.inference import EM, gradient_m_step, lookup_m_step, register_m_step
from families import FAMILIES, ExponentialMixture, fitted_model, sample_data, true_params


@pytest.mark.parametrize("family", FAMILIES)
def test_program_has_latent_z_and_observed_x_in_a_data_plate(family):
    model, x = fitted_model(family), sample_data(family, 10)
    trace = poutine.trace(model).get_trace(x)
    z, obs = trace.nodes["z"], trace.nodes["x"]
    assert not z["is_observed"] and obs["is_observed"]
    assert isinstance(
        z["fn"].base_dist if hasattr(z["fn"], "base_dist") else z["fn"], dist.Categorical
    )
    assert [f.name for f in z["cond_indep_stack"]] == ["data"]
    assert z["value"].shape == (10,)
    assert set(trace.param_nodes) <= {n for n in trace.nodes}  # params are local, no globals
    assert len(pyro.get_param_store()) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_guide_mirrors_the_model(family):
    """Same signature, the same plate, an enumerated "z" site."""
    model, x = fitted_model(family), sample_data(family, 10)
    guide = ExactPosterior(model)
    trace = poutine.trace(guide).get_trace(x)
    z = trace.nodes["z"]
    assert z["infer"]["enumerate"] == "parallel"
    assert [(f.name, f.size) for f in z["cond_indep_stack"]] == [("data", 10)]


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_recovers_the_weights(family):
    """Ancestral sampling: with n = 20,000 the empirical frequency of each z is within
    5 standard errors (sqrt(pi(1-pi)/n) <= 0.0036) of pi."""
    model = fitted_model(family)
    x, z = model.sample(20_000, seed=0)
    assert x.shape == (20_000, 3) and x.dtype == torch.float64
    freq = torch.bincount(z, minlength=3).double() / 20_000
    assert torch.allclose(freq, model.weights_, atol=5 * 0.0036)
    model.validate_data(x)  # samples are in the support


def test_sample_is_reproducible_with_a_seed():
    model = fitted_model("gaussian-full")
    assert torch.equal(model.sample(5, seed=3)[0], model.sample(5, seed=3)[0])


@pytest.mark.parametrize(
    "family,expected",
    [
        ("gaussian-full", 3 * 3 + 3 * 6 + 2),
        ("gaussian-tied", 9 + 6 + 2),
        ("gaussian-diag", 9 + 9 + 2),
        ("gaussian-spherical", 9 + 3 + 2),
        ("bernoulli", 9 + 2),
        ("poisson", 9 + 2),
        ("categorical", 3 * 3 * 3 + 2),
    ],
)
def test_n_parameters(family, expected):
    assert fitted_model(family).n_parameters() == expected


def test_set_params_round_trips():
    model = fitted_model("gaussian-full")
    truth = true_params("gaussian-full")
    assert torch.allclose(model.covariances_, truth["covariances"], atol=1e-12)
    assert torch.allclose(model.weights_, truth["weights"], atol=1e-12)
    with pytest.raises(ValueError, match="must have shape"):
        model.set_params(means=torch.zeros(2, 3))


# ---------------------------------------------------------------- extending the collection
class ExponentialMixtureClosedForm(ExponentialMixture):
    pass


@register_m_step(ExponentialMixtureClosedForm)
def _m_step_exponential(model, x, resp, nk, reg_covar):
    """rate_kj = N_k / sum_d r_dk x_dj (EM-MIX.3 for an exponential component)."""
    model.assign("rates", nk.unsqueeze(-1) / (resp.T @ x))


def exponential_data(n=2000):
    g = torch.Generator().manual_seed(0)
    z = (torch.rand(n, generator=g) < 0.4).long()
    rates = torch.tensor([[0.5, 4.0], [5.0, 0.3]], dtype=torch.float64)[z]
    return -torch.log(torch.rand(n, 2, generator=g, dtype=torch.float64)) / rates


def test_a_new_family_gets_em_from_the_gradient_m_step():
    """EM-MIX.3 with no closed form: the generic gradient M-step does it. n = 2000, so
    the fitted rates are within ~10% of the truth (standard error ~ rate / sqrt(n pi))."""
    x = exponential_data()
    model = ExponentialMixture(2)
    assert lookup_m_step(ExponentialMixture) is None
    result = EM(model, ExactPosterior(model), seed=0, tol=1e-6, max_iter=200, progress=False).fit(x)
    assert result.m_step == "gradient" and result.converged
    rates = model.rates.detach()[torch.argsort(model.weights_)]  # smaller weight first
    expected = torch.tensor([[5.0, 0.3], [0.5, 4.0]], dtype=torch.float64)  # pi = 0.4, 0.6
    assert torch.allclose(rates, expected, rtol=0.15)
    lls = result.log_likelihoods
    assert all(b >= a - 1e-10 for a, b in zip(lls, lls[1:], strict=False))  # EM-MONO holds for GEM


def test_registering_a_closed_form_m_step_agrees_with_the_gradient_one():
    """(EM-MIX.3) the registered closed form equals the gradient M-step's optimum."""
    x = exponential_data(500)
    log_r = torch.randn(
        500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    ).log_softmax(-1)
    closed = ExponentialMixtureClosedForm(2).build(2, torch.float64)
    lookup_m_step(type(closed))(closed, x, log_r.exp(), log_r.exp().sum(0), 0.0)
    by_gradient = ExponentialMixture(2).build(2, torch.float64)
    gradient_m_step(
        by_gradient,
        ExactPosterior(by_gradient).fix(log_r, x),
        x,
        max_iter=500,
        tolerance_grad=1e-12,
    )
    assert torch.allclose(by_gradient.rates, closed.rates, rtol=1e-6)
    model = ExponentialMixtureClosedForm(2)
    assert EM(model, ExactPosterior(model), seed=0, progress=False).fit(x).m_step == "closed-form"
