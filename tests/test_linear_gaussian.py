"""The linear-Gaussian bridge: PPCA and factor analysis, where EM, the VAE and the closed
form can all be computed and must agree.

Exact identities (LG-MARG, LG-POST, EM-TIGHT, BASIC in closed form) are compared at 1e-10
in float64. Fits are compared with each other on scikit-learn's wine data (178 x 13,
standardised): EM run to tol=1e-10 against the closed form at 1e-6 relative; the linear
VAE, trained by SGD with one-sample gradients, at the tolerance its noise allows (stated
at each test).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from scipy.linalg import subspace_angles
from sklearn.datasets import load_wine
from torch.distributions import MultivariateNormal, kl_divergence

from elbolab.guides import AmortizedNormal, ExactGaussianPosterior
from elbolab.inference import EM, SVITrainer, ppca_closed_form
from elbolab.models import PPCA, FactorAnalysis, GaussianMixture, gaussian_bound

TIGHT = 1e-10


@pytest.fixture(scope="module")
def wine() -> torch.Tensor:
    x = torch.tensor(load_wine().data)
    return (x - x.mean(0)) / x.std(0)


def random_model(cls=PPCA, d=5, k=2, seed=0):
    torch.manual_seed(seed)
    model = cls(d, k).double()
    model.set_params(
        weight=torch.randn(d, k, dtype=torch.float64),
        mean=torch.randn(d, dtype=torch.float64),
        noise=0.3 + torch.rand(d, dtype=torch.float64) if cls is FactorAnalysis else 0.4,
    )
    return model


def dense_covariance(model) -> torch.Tensor:
    w = model.weight.detach()
    return w @ w.T + torch.diag(model.noise_variances().detach())


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_lg_marg_log_likelihood_is_the_gaussian_marginal(cls):
    """LG-MARG: log p(x) = log N(x; mu, W W^T + Psi), against a dense covariance."""
    model = random_model(cls)
    x = torch.randn(7, 5, dtype=torch.float64)
    dense = MultivariateNormal(model.mean.detach(), dense_covariance(model)).log_prob(x)
    assert torch.allclose(model.log_likelihood(x).detach(), dense, rtol=0, atol=TIGHT)


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_lg_post_posterior_is_gaussian_conditioning(cls):
    """LG-POST: (m, S) equal conditioning the joint Gaussian of (z, x) on x."""
    model = random_model(cls)
    x = torch.randn(6, 5, dtype=torch.float64)
    w, c = model.weight.detach(), dense_covariance(model)
    gain = w.T @ torch.linalg.inv(c)  # Cov(z, x) Cov(x)^-1
    loc_ref = (x - model.mean.detach()) @ gain.T
    cov_ref = torch.eye(2, dtype=torch.float64) - gain @ w
    loc, cov = model.posterior(x)
    assert torch.allclose(loc, loc_ref, atol=TIGHT) and torch.allclose(cov, cov_ref, atol=TIGHT)


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_em_tight_with_the_exact_gaussian_guide(cls):
    """EM-TIGHT: after refresh, the closed-form bound is log p(x) exactly; Pyro's
    TraceMeanField_ELBO with the guide agrees within 5 standard errors (4,000 particles:
    its KL term is the closed form registered for MVN against N(0, I), its likelihood term
    Monte Carlo)."""
    model = random_model(cls)
    x = torch.randn(6, 5, dtype=torch.float64)
    guide = ExactGaussianPosterior(model).refresh(x)
    log_px = model.log_likelihood(x).detach()
    assert torch.allclose(guide.bound(x).detach(), log_px, atol=TIGHT)
    pyro.set_rng_seed(0)
    elbo = TraceMeanField_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        estimate = -elbo.loss(model, guide, x)
        draws = torch.tensor([-TraceMeanField_ELBO().loss(model, guide, x) for _ in range(200)])
    standard_error = float(draws.std()) / math.sqrt(4000)
    assert abs(estimate - float(log_px.sum())) < 5 * standard_error


def test_registered_kl_matches_the_full_covariance_formula():
    """The closed-form KL(N(m, S) || N(mu, diag s^2)) the guide registers, against torch's
    MVN-to-MVN formula."""
    torch.manual_seed(1)
    a = torch.randn(3, 3, dtype=torch.float64)
    p = MultivariateNormal(torch.randn(4, 3, dtype=torch.float64), a @ a.T + torch.eye(3))
    loc, scale = torch.randn(3, dtype=torch.float64), 0.5 + torch.rand(3, dtype=torch.float64)
    q = pyro.distributions.Normal(loc, scale).to_event(1)
    dense = MultivariateNormal(loc, torch.diag(scale.square()))
    assert torch.allclose(kl_divergence(p, q), kl_divergence(p, dense), atol=TIGHT)


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_basic_gap_is_the_kl_to_the_exact_posterior(cls):
    """BASIC in closed form: for any Gaussian q_d, log p(x_d) - LB(q_d) = KL(q_d || p(z | x_d))."""
    model = random_model(cls)
    x = torch.randn(6, 5, dtype=torch.float64)
    loc = torch.randn(6, 2, dtype=torch.float64)
    a = torch.randn(6, 2, 2, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) + 0.1 * torch.eye(2, dtype=torch.float64)
    with torch.no_grad():
        gap = model.log_likelihood(x) - gaussian_bound(model, x, loc, cov)
        post_loc, post_cov = model.posterior(x)
    kl = kl_divergence(MultivariateNormal(loc, cov), MultivariateNormal(post_loc, post_cov))
    assert torch.allclose(gap, kl, atol=TIGHT)
    assert bool((gap > 0).all())


def test_ppca_em_reaches_the_closed_form(wine):
    """LG-EM and LG-ML: EM from a random start (tol=1e-10) reaches the eigen-decomposition
    solution's log-likelihood to 1e-6 relative and its subspace; EM-MONO at every step."""
    model = PPCA(data_dim=13, latent_dim=3)
    result = EM(model, ExactGaussianPosterior(model), tol=1e-10, max_iter=5000, seed=0).fit(wine)
    closed = ppca_closed_form(PPCA(13, 3), wine)
    assert result.converged
    assert result.log_likelihood == pytest.approx(closed.score(wine), rel=1e-6)
    assert model.noise_variance_ == pytest.approx(closed.noise_variance_, rel=1e-5)
    angles = subspace_angles(model.weight.detach().numpy(), closed.weight.detach().numpy())
    assert angles.max() < 1e-4
    ll, lb = np.array(result.log_likelihoods), np.array(result.lower_bounds)
    assert (ll[:-1] <= lb + TIGHT).all() and (lb <= ll[1:] + TIGHT).all()  # EM-MONO


def test_factor_analysis_em_matches_scikit_learn(wine):
    """Factor analysis by EM reaches scikit-learn's FactorAnalysis log-likelihood (1e-6
    relative: both converged far below that) with EM-MONO at every step."""
    from sklearn.decomposition import FactorAnalysis as SkFactorAnalysis

    model = FactorAnalysis(13, 3)
    result = EM(model, ExactGaussianPosterior(model), tol=1e-10, max_iter=5000, seed=0).fit(wine)
    reference = SkFactorAnalysis(3, tol=1e-12, max_iter=10_000).fit(wine.numpy())
    assert result.log_likelihood == pytest.approx(reference.score(wine.numpy()), rel=1e-6)
    ll, lb = np.array(result.log_likelihoods), np.array(result.lower_bounds)
    assert (ll[:-1] <= lb + TIGHT).all() and (lb <= ll[1:] + TIGHT).all()


def test_closed_form_is_a_maximum_up_to_rotation(wine):
    """LG-ML: sigma^2 is the mean discarded eigenvalue; W R (R orthogonal) has the same
    likelihood; moving W or sigma^2 off the solution lowers it."""
    model = ppca_closed_form(PPCA(13, 3), wine)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(wine.T, correction=0)).flip(0)
    assert model.noise_variance_ == pytest.approx(float(eigenvalues[3:].mean()), rel=TIGHT)
    best = model.score(wine)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    w = model.weight.detach().clone()
    model.set_params(weight=w @ q)
    assert model.score(wine) == pytest.approx(best, rel=TIGHT)
    model.set_params(weight=1.05 * w)
    assert model.score(wine) < best
    model.set_params(weight=w, noise=1.05 * model.noise_variance_)
    assert model.score(wine) < best


def test_linear_vae_reaches_the_maximum_likelihood_and_its_gap_is_the_kl(wine):
    """The PPCA model trained with the amortized guide and a linear encoder (a linear VAE)
    reaches the maximum-likelihood solution: log-likelihood within 2e-3 relative and the
    same subspace within 0.1 rad (SGD with one-sample gradients, 600 full-batch Adam steps
    at lr 0.03, stops in a noise ball around the optimum: 5e-4 and 0.05 rad here). Its
    bound gap equals the KL from its q to the exact posterior, in closed form (BASIC,
    1e-10)."""
    torch.manual_seed(0)
    model = PPCA(13, 3).double()
    guide = AmortizedNormal(13, 3, hidden=(), scale="learned").double()
    trainer = SVITrainer(
        model, guide, loss=TraceMeanField_ELBO(), lr=3e-2, batch_size=178, seed=0, progress=False
    )
    trainer.fit(wine, epochs=600)
    closed = ppca_closed_form(PPCA(13, 3), wine)
    assert model.score(wine) == pytest.approx(closed.score(wine), rel=2e-3)
    angles = subspace_angles(model.weight.detach().numpy(), closed.weight.detach().numpy())
    assert angles.max() < 0.1
    with torch.no_grad():
        loc, scale = guide.encode(wine)
        cov = torch.diag_embed(scale.square())
        gap = model.log_likelihood(wine) - gaussian_bound(model, wine, loc, cov)
        post_loc, post_cov = model.posterior(wine)
    kl = kl_divergence(MultivariateNormal(loc, cov), MultivariateNormal(post_loc, post_cov))
    assert torch.allclose(gap, kl, atol=TIGHT)


def test_sampling_has_the_model_covariance():
    """Ancestral samples (20,000) have covariance W W^T + Psi within 5% of its scale."""
    model = random_model(FactorAnalysis)
    x, z = model.sample(20_000, seed=0)
    assert x.shape == (20_000, 5) and z.shape == (20_000, 2)
    c = dense_covariance(model)
    assert float((torch.cov(x.T) - c).abs().max()) < 0.05 * float(c.abs().max())


def test_bad_input_errors(wine):
    model = PPCA(13, 3)
    with pytest.raises(ValueError, match="has 12 features but the model has data_dim=13"):
        model.log_likelihood(wine[:, :12])
    bad = wine.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or inf"):
        EM(model, ExactGaussianPosterior(model)).fit(bad)
    with pytest.raises(ValueError, match="latent_dim must be below data_dim"):
        PPCA(3, 3)
    with pytest.raises(ValueError, match="needs a linear-Gaussian model"):
        ExactGaussianPosterior(GaussianMixture(2))
    with pytest.raises(ValueError, match="closed-form M-step"):
        EM(model, ExactGaussianPosterior(model), m_step="gradient")
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(178,\)"):
        EM(model, ExactGaussianPosterior(model)).fit(wine, sample_weight=np.ones(177))
    with pytest.raises(ValueError, match="closed-form maximum likelihood exists for PPCA"):
        ppca_closed_form(FactorAnalysis(13, 3), wine)
    with pytest.raises(ValueError, match="must be positive"):
        model.set_params(noise=0.0)


def test_compare_runs_the_three_routes_on_one_table(wine):
    """compare() on PPCA: EM reaches the closed form (1e-8 relative, tol=1e-10) with a zero
    gap (EM-TIGHT); the linear VAE's gap is positive (BASIC) and its log-likelihood within
    2e-3 relative (as above). Schemes that do not fit refuse before any fitting."""
    from elbolab.inference import compare
    from elbolab.models import VAE

    table = compare(
        PPCA(13, 3), wine, schemes=["closed-form", "em", "vae"], reference="closed-form"
    )
    rows = {r["scheme"]: r for r in table}
    best = rows["closed-form"]["loglik"]
    assert abs(rows["em"]["loglik_vs_ref"]) < 1e-8 * abs(best)
    assert 0 <= rows["em"]["gap"] < 1e-8
    assert rows["vae"]["gap"] > 0
    assert rows["vae"]["loglik"] == pytest.approx(best, rel=2e-3)
    assert rows["em"]["theta_vs_ref"] < 1e-3  # W W^T, mu, sigma^2: rotation-free
    with pytest.raises(ValueError, match=r"\['nuts'\] do not fit PPCA.*'closed-form'"):
        compare(PPCA(13, 3), wine, schemes=["nuts"])
    with pytest.raises(ValueError, match=r"\['closed-form'\] do not fit FactorAnalysis"):
        compare(FactorAnalysis(13, 3), wine, schemes=["closed-form"])
    with pytest.raises(ValueError, match=r"\['em'\] do not fit VAE.*\['vae', 'vae-mc', 'iwae'\]"):
        compare(VAE(13, 2), wine, schemes=["em"])
