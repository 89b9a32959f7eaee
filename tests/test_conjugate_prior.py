"""The conjugate prior as a choice for the Bayesian schemes, and ``compare``'s ``"vb"``.

The conjugate prior (scikit-learn's ``BayesianGaussianMixture`` priors) is written with
non-centred sites, C_k (Sigma_k = C_k C_k^T) and e_k ~ N(0, I), mu_k = m_0 + C_k e_k / sqrt(beta_0).
The tests check, exactly (1e-10 in float64), that these sites carry the Normal-Wishart
prior on (mu_k, Sigma_k) -- densities by the change of variables, with scipy's inverse
Wishart as the reference -- and that ``vb`` in ``compare`` is the CAVI fit of
``EM(BayesianGaussianMixture, MeanFieldPosterior)``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import invwishart, multivariate_normal
from torch.distributions import biject_to

from elbolab.datasets import load_faithful
from elbolab.guides import MeanFieldPosterior
from elbolab.inference import EM, compare, schemes_for
from elbolab.inference.compare.mixture import initialize
from elbolab.models import BayesianGaussianMixture, BayesianMixture, GaussianMixture
from elbolab.models.conjugate import CholeskyVectorTransform, InverseWishartCholesky


def faithful() -> torch.Tensor:
    return load_faithful().standardized().data


def log_jacobian_cholesky(C: torch.Tensor) -> float:
    """ln |d(C C^T) / dC| over the free entries of a (D, D) factor, by autograd."""
    D = C.shape[-1]
    rows, cols = torch.tril_indices(D, D)

    def f(v):
        L = torch.zeros(D, D, dtype=v.dtype).index_put((rows, cols), v)
        return (L @ L.T)[rows, cols]

    J = torch.autograd.functional.jacobian(f, C[rows, cols])
    return float(torch.linalg.slogdet(J)[1])


def test_inverse_wishart_cholesky_density_is_the_change_of_variables():
    psi = torch.tensor([[2.0, 0.3, 0.1], [0.3, 1.0, 0.2], [0.1, 0.2, 0.5]], dtype=torch.float64)
    nu = 5.5
    d = InverseWishartCholesky(torch.tensor(nu, dtype=torch.float64), psi)
    torch.manual_seed(0)
    C = d.sample((5,))
    for c, lp in zip(C, d.log_prob(C), strict=True):
        sigma = (c @ c.T).numpy()
        ref = invwishart.logpdf(sigma, df=nu, scale=psi.numpy()) + log_jacobian_cholesky(c)
        assert float(lp) == pytest.approx(ref, abs=1e-10)


def test_cholesky_vector_transform_is_a_bijection_with_its_log_det():
    t = biject_to(InverseWishartCholesky(torch.tensor(3.0), torch.eye(2)).support)
    assert isinstance(t, CholeskyVectorTransform)
    u = torch.randn(4, 6, dtype=torch.float64)
    L = t(u)
    assert L.shape == (4, 3, 3) and torch.equal(L, L.tril()) and (L.diagonal(0, -2, -1) > 0).all()
    torch.testing.assert_close(t.inv(L), u, rtol=1e-12, atol=1e-12)
    rows, cols = torch.tril_indices(3, 3)
    for i in range(4):
        J = torch.autograd.functional.jacobian(lambda v: t(v)[rows, cols], u[i])
        assert float(t.log_abs_det_jacobian(u[i], L[i])) == pytest.approx(
            float(torch.linalg.slogdet(J)[1]), abs=1e-10
        )


def test_the_non_centred_sites_carry_the_normal_wishart_prior():
    """ln p(C, e) = ln IW(Sigma) + ln|dSigma/dC| + ln N(mu | m_0, Sigma / beta_0) + ln|dmu/de|,
    with scikit-learn's default hyperparameters and beta_0 = 2."""
    x = faithful()
    model = GaussianMixture(2, "full")
    initialize(model, x, init="kmeans++", seed=0, reg_covar=1e-6)
    program = BayesianMixture(model, x, {"type": "conjugate", "mean_precision_prior": 2.0})
    values = program.prior.site_values(model)
    log_prior = float(program.log_prior(values))
    D, beta0 = 2, 2.0
    m0, psi0 = x.mean(0).numpy(), np.cov(x.numpy().T)
    expected = math.log(math.gamma(1.0)) - 2 * math.log(math.gamma(0.5))  # Dir(1/2, 1/2)
    expected += sum(-0.5 * math.log(float(w)) for w in model.weights_)
    for C, mu in zip(values["covariance_tril"], model.means_, strict=True):
        sigma = (C @ C.T).numpy()
        expected += invwishart.logpdf(sigma, df=D, scale=psi0) + log_jacobian_cholesky(C)
        expected += multivariate_normal.logpdf(mu.numpy(), m0, sigma / beta0)
        expected += float(torch.linalg.slogdet(C)[1]) - 0.5 * D * math.log(beta0)
    assert log_prior == pytest.approx(expected, abs=1e-10)
    # and the sites give back the model's parameters
    params = program.prior.model_params(values)
    torch.testing.assert_close(params["means"], model.means_, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(params["covariances"], model.covariances_, rtol=1e-12, atol=0)


def test_vb_in_compare_is_cavi_from_the_em_start():
    """compare's "vb" (not a default scheme) = EM(BayesianGaussianMixture(K, "full",
    "dirichlet_distribution"), MeanFieldPosterior) from the responsibilities of the EM
    start for the seed: the same bound to 1e-12."""
    x = faithful()
    model = GaussianMixture(2, "full")
    assert "vb" in schemes_for(model) and "vb" not in schemes_for(GaussianMixture(2, "diag"))
    prior = {"type": "conjugate", "mean_precision_prior": 2.0}
    table = compare(model, x, ["vb"], seed=3, prior=prior, num_samples=200, on_error="raise")
    fit = table.fits["vb"]
    start = GaussianMixture(2, "full")
    initialize(start, x, init="kmeans++", seed=3, reg_covar=1e-6)
    vb = BayesianGaussianMixture(2, "full", "dirichlet_distribution", mean_precision_prior=2.0)
    guide = MeanFieldPosterior(vb)
    result = EM(
        vb, guide, tol=1e-8, max_iter=1000, init={"responsibilities": start.predict_proba(x)}
    ).fit(x)
    assert fit.bound == pytest.approx(result.lower_bound, abs=1e-12) and fit.bound_se == 0.0
    assert fit.estimate == "posterior mean (q)" and fit.idata is not None
    assert fit.bound < fit.loglik  # a bound on log p(x) under the prior, below the plug-in's
    # theta_hat: the mean of 200 draws from q, within 5 standard errors of q's means
    draws = fit.idata.posterior["means"].values.reshape(-1, 2, 2)
    se = draws.std(0) / math.sqrt(draws.shape[0])
    order = torch.argsort(guide.means_[:, 0]).numpy()
    assert (np.abs(draws.mean(0) - guide.means_.numpy()[order]) < 5 * se).all()


def test_the_bayesian_schemes_take_the_conjugate_prior():
    """map, mean-field and nuts under prior={"type": "conjugate"}: the program's prior is
    the conjugate one (its sites), and every scheme returns a finite fit."""
    x = faithful()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = compare(
            GaussianMixture(2, "full"),
            x,
            ["map", "mean-field", "nuts"],
            seed=0,
            prior={"type": "conjugate"},
            options={
                "mean-field": {"svi_steps": 50, "num_samples": 50},
                "nuts": {"num_samples": 20, "warmup_steps": 20},
            },
            on_error="raise",
        )
    for name in ("map", "mean-field", "nuts"):
        assert math.isfinite(table.fits[name].loglik)
    assert "covariance_tril" in table.fits["map"].result.values
    # NUTS adapts a dense mass matrix under the conjugate prior (its non-centred sites are
    # correlated a posteriori), a diagonal one under the weak prior
    assert table.fits["nuts"].result.full_mass
    weak = compare(
        GaussianMixture(2, "full"),
        x,
        ["nuts"],
        seed=0,
        options={"nuts": {"num_samples": 8, "warmup_steps": 8}},
        on_error="raise",
    )
    assert not weak.fits["nuts"].result.full_mass


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schemes": ["vb"], "prior": {"mean_scale": 5.0}}, "scheme 'vb' fits under the conjugate"),
        ({"schemes": ["map"], "prior": {"type": "flat"}}, "unknown prior type 'flat'"),
        (
            {"schemes": ["map"], "prior": {"type": "conjugate", "mean_scale": 5.0}},
            "unknown prior option",
        ),
        (
            {"schemes": ["map"], "prior": {"type": "conjugate", "degrees_of_freedom_prior": 0.5}},
            "greater than n_features - 1",
        ),
    ],
)
def test_bad_conjugate_options_raise_before_fitting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare(GaussianMixture(2, "full"), faithful(), **kwargs)


def test_the_conjugate_prior_needs_full_covariances():
    with pytest.raises(ValueError, match="full precisions"):
        compare(GaussianMixture(2, "diag"), faithful(), ["map"], prior={"type": "conjugate"})


def test_vb_in_compare_for_a_family_whose_weak_prior_is_conjugate():
    """A Bernoulli mixture's weak prior (Dirichlet weights, Beta(1, 1) probabilities) is
    conjugate: "vb" fits under it, the prior "map", "mean-field" and "nuts" use, and equals
    EM(BayesianBernoulliMixture(K, "dirichlet_distribution", 1.0), ...) from the EM start
    (1e-12)."""
    from elbolab.models import BayesianBernoulliMixture, BernoulliMixture

    g = torch.Generator().manual_seed(1)
    z = torch.randint(0, 2, (200,), generator=g)
    x = torch.bernoulli(
        torch.where(z[:, None] == 0, 0.15, 0.85).double().expand(200, 5), generator=g
    )
    prior = {"beta": (2.0, 2.0)}
    table = compare(BernoulliMixture(2), x, ["vb"], seed=0, prior=prior, num_samples=200)
    fit = table.fits["vb"]
    start = BernoulliMixture(2)
    initialize(start, x, init="kmeans++", seed=0, reg_covar=1e-6)
    vb = BayesianBernoulliMixture(2, "dirichlet_distribution", 1.0, beta_prior=(2.0, 2.0))
    result = EM(
        vb,
        MeanFieldPosterior(vb),
        tol=1e-8,
        max_iter=1000,
        init={"responsibilities": start.predict_proba(x)},
    ).fit(x)
    assert fit.bound == pytest.approx(result.lower_bound, abs=1e-12)
    assert set(fit.idata.posterior.data_vars) == {"weights", "probs"}
