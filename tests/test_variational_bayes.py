"""Section 6 of DERIVATIONS.md: variational Bayes for the Gaussian mixture, through EM's loop.

- VB-Z / VB-THETA: parity with scikit-learn's ``BayesianGaussianMixture`` from the same
  starting responsibilities, to 1e-8 relative after 40 iterations (both are the same closed
  forms in float64; what differs is the order of the sums, ~1e-13 here).
- VB-ELBO: the closed-form bound (every term of PRML (10.70)-(10.77)) against Pyro's Monte
  Carlo ``Trace_ELBO`` of the model and guide programs, within 5 standard errors of 200
  particles; and it never decreases (CAVI, with ``reg_covar=0``: the regulariser is not part
  of the coordinate update's optimum, so only the plain update is monotone to round-off).
- VB-EM: with the data repeated m times the prior's weight falls as 1/m, and VB's
  parameters tend to EM's from the same start.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pytest
import torch
from sklearn.mixture import BayesianGaussianMixture as SklearnBGM

from elbolab.datasets import load_faithful
from elbolab.guides import ExactPosterior, MeanFieldPosterior
from elbolab.inference import EM
from elbolab.models import (
    BayesianBernoulliMixture,
    BayesianCategoricalMixture,
    BayesianGaussianMixture,
    BayesianPoissonMixture,
    GaussianMixture,
)

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
WEIGHT_PRIORS = ("dirichlet_process", "dirichlet_distribution")
ATTRIBUTES = (
    "weight_concentration_",
    "mean_precision_",
    "means_",
    "degrees_of_freedom_",
    "covariances_",
    "precisions_",
    "weights_",
)


class FromResponsibilities(SklearnBGM):
    """scikit-learn's variational mixture started from given responsibilities."""

    def _initialize_parameters(self, X, random_state, xp=None):
        self._initialize(X, self.resp_init)


def faithful(standardized: bool = False) -> torch.Tensor:
    data = load_faithful()
    return (data.standardized() if standardized else data).data


def start(n: int, K: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(K), size=n)


def fit_vb(x, K=4, covariance_type="full", prior="dirichlet_process", **options):
    model = BayesianGaussianMixture(K, covariance_type, prior)
    guide = MeanFieldPosterior(model)
    options.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0: the not-converged warning is expected
        result = EM(model, guide, **options).fit(x)
    return model, guide, result


def as_array(value) -> np.ndarray:
    if isinstance(value, tuple):
        return np.concatenate([np.asarray(v, dtype=float).ravel() for v in value])
    return np.asarray(value, dtype=float)


@pytest.mark.parametrize("prior", WEIGHT_PRIORS)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_vb_matches_sklearn_from_the_same_start(covariance_type, prior):
    """VB-Z + VB-THETA = scikit-learn's E- and M-steps (its defaults for every prior,
    reg_covar 1e-6 in both, tol=0 so that both take exactly 40 iterations)."""
    x = faithful()
    resp = start(x.shape[0], 4)
    sk = FromResponsibilities(
        n_components=4,
        covariance_type=covariance_type,
        weight_concentration_prior_type=prior,
        tol=0,
        max_iter=40,
        reg_covar=1e-6,
    )
    sk.resp_init = resp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.fit(x.numpy())
    model, guide, result = fit_vb(
        x, 4, covariance_type, prior, tol=0, max_iter=40, init={"responsibilities": resp}
    )
    assert result.n_iter == 40 and result.m_step == "cavi"
    for name in ATTRIBUTES:
        ours, theirs = as_array(getattr(guide, name)), as_array(getattr(sk, name))
        np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=0, err_msg=name)
    np.testing.assert_allclose(model.mean_prior_.numpy(), sk.mean_prior_, rtol=1e-12)
    np.testing.assert_allclose(
        as_array(model.covariance_prior_), as_array(sk.covariance_prior_), rtol=1e-12
    )
    np.testing.assert_array_equal(guide.predict(x).numpy(), sk.predict(x.numpy()))


@pytest.mark.parametrize(
    ("covariance_type", "prior"),
    [("full", "dirichlet_process"), ("tied", "dirichlet_distribution")],
)
def test_closed_form_elbo_equals_pyros_monte_carlo_elbo(covariance_type, prior):
    """VB-ELBO: guide.elbo(x) (closed form, constants included) against -Trace_ELBO.loss of
    the model and guide programs: 200 single-particle estimates, within 5 standard errors
    (here about 0.03 and 0.25 nats of ~440)."""
    x = faithful(standardized=True)
    model, guide, result = fit_vb(x, 3, covariance_type, prior, tol=1e-8, max_iter=300, seed=0)
    closed = guide.elbo(x)
    assert closed == pytest.approx(result.log_likelihoods[-1] * x.shape[0], rel=1e-12)
    pyro.set_rng_seed(0)
    elbo = pyro.infer.Trace_ELBO()
    with warnings.catch_warnings():
        # torch's Wishart sampler warns on valid draws (its first support check is the
        # wrong way round) and replaces them by fresh draws: still Wishart draws
        warnings.filterwarnings("ignore", message="Singular sample detected")
        draws = np.array([-elbo.loss(model, guide, x) for _ in range(200)])
    se = draws.std(ddof=1) / math.sqrt(len(draws))
    assert abs(draws.mean() - closed) < 5 * se, (draws.mean(), closed, se)


@pytest.mark.parametrize("prior", WEIGHT_PRIORS)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_the_bound_never_decreases(covariance_type, prior):
    """CAVI: every step maximises the bound in one block of q (reg_covar=0, the plain
    update), so log_likelihoods[t] <= lower_bounds[t] <= log_likelihoods[t + 1] to 1e-12."""
    x = faithful(standardized=True)
    _, _, result = fit_vb(x, 5, covariance_type, prior, tol=0, max_iter=60, reg_covar=0.0, seed=1)
    lls, lbs = np.array(result.log_likelihoods), np.array(result.lower_bounds)
    assert (lbs - lls[:-1] >= -1e-12).all()
    assert (lls[1:] - lbs >= -1e-12).all()


def test_the_dirichlet_process_prunes_old_faithful_to_two_components():
    """K = 10 under the Dirichlet-process prior: two components carry the data (about
    0.64 and 0.36), and each of the other eight keeps under 1% of the weight ("negligible":
    less than 3 of the 272 eruptions), for several starts."""
    x = faithful(standardized=True)
    for seed in range(3):
        _, guide, result = fit_vb(x, 10, tol=1e-6, max_iter=500, seed=seed)
        assert result.converged
        weights = torch.sort(guide.weights_, descending=True).values
        assert (weights[2:] < 0.01).all(), weights
        assert weights[:2].sum() > 0.97
        assert 0.6 < float(weights[0]) < 0.68


def test_vb_tends_to_em_as_the_data_are_repeated():
    """VB-EM: with the data repeated m times, the prior counts 1/m as much, and q(theta)
    concentrates on EM's fixed point from the same start: the distance of VB's means,
    covariances and weights to EM's falls about as 1/m (here by 8-12x per factor 10)."""
    x = faithful(standardized=True)
    resp = torch.as_tensor(start(x.shape[0], 2, seed=3))
    em_model = GaussianMixture(2, "full")
    EM(em_model, ExactPosterior(em_model), tol=1e-12, max_iter=500, progress=False).fit(x)
    gaps = []
    for m in (10, 100, 1000):
        _, guide, _ = fit_vb(
            x.repeat(m, 1),
            2,
            "full",
            "dirichlet_distribution",
            tol=1e-12,
            max_iter=500,
            init={"responsibilities": resp.repeat(m, 1)},
        )
        order = torch.argsort(guide.means_[:, 0])
        ref = torch.argsort(em_model.means_[:, 0])
        gap = max(
            float((guide.means_[order] - em_model.means_[ref]).abs().max()),
            float((guide.covariances_[order] - em_model.covariances_[ref]).abs().max()),
            float((guide.weights_[order] - em_model.weights_[ref]).abs().max()),
        )
        gaps.append(gap)
    assert 6 < gaps[0] / gaps[1] < 14 and 6 < gaps[1] / gaps[2] < 14, gaps
    assert gaps[-1] < 1e-3


def test_chunks_give_the_in_memory_fit():
    """The sums add up over chunks: VB over three chunks = VB in memory (1e-10), from the
    same q(theta) (a warm start) and with priors that do not depend on the first chunk."""
    x = faithful(standardized=True)
    priors = {"mean_prior": [0.0, 0.0], "covariance_prior": [[1.0, 0.5], [0.5, 1.0]]}
    resp = start(x.shape[0], 3)
    fits = []
    for data in (x, [x[:100], x[100:200], x[200:]]):
        model = BayesianGaussianMixture(3, **priors)
        guide = MeanFieldPosterior(model)
        fit_vb_on = EM(model, guide, tol=0, max_iter=1, init={"responsibilities": resp})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit_vb_on.progress = False
            fit_vb_on.fit(x)
            again = EM(model, guide, tol=0, max_iter=25, warm_start=True, progress=False)
            fits.append((guide, again.fit(data)))
    (a, ra), (b, rb) = fits
    for name in ("means_", "covariances_", "mean_precision_", "degrees_of_freedom_"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-12)
    assert ra.lower_bound == pytest.approx(rb.lower_bound, rel=1e-10)


def test_cavi_is_a_natural_gradient_step_of_size_one():
    """Stochastic VB with one minibatch of all the data and gamma_t = 1 takes the running
    sums to this pass's sums: each step is then batch CAVI (1e-10)."""
    x = faithful(standardized=True)
    resp = start(x.shape[0], 3)
    _, batch, _ = fit_vb(x, 3, tol=0, max_iter=5, init={"responsibilities": resp})
    _, online, _ = fit_vb(
        x,
        3,
        tol=0,
        max_iter=5,
        init={"responsibilities": resp},
        stochastic=True,
        batch_size=x.shape[0],
        step_size=lambda t: 1.0,
    )
    for name in ("means_", "covariances_", "mean_precision_", "degrees_of_freedom_"):
        torch.testing.assert_close(getattr(batch, name), getattr(online, name), rtol=1e-10, atol=0)


def test_sampling_and_predictions():
    """model.sample draws from the posterior predictive once fitted (seeded); predict_proba
    rows are q(z_d) (summing to 1)."""
    x = faithful(standardized=True)
    model, guide, _ = fit_vb(x, 3, tol=1e-6, max_iter=300, seed=0)
    a, za = model.sample(2000, seed=4)
    b, zb = model.sample(2000, seed=4)
    assert torch.equal(a, b) and torch.equal(za, zb) and a.shape == (2000, 2)
    # the predictive's mean is the mixture of the m_k with weights E[pi_k] (and the prior's
    # mean for the sticks' remainder): 2,000 draws, each coordinate within 5 standard errors
    se = a.std(0) / math.sqrt(2000)
    assert ((a.mean(0) - x.mean(0)).abs() < 5 * se + 0.02).all()
    probs = guide.predict_proba(x)
    torch.testing.assert_close(probs.sum(1), torch.ones(x.shape[0], dtype=probs.dtype))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weight_concentration_prior": -1.0}, "weight_concentration_prior must be positive"),
        ({"mean_precision_prior": 0.0}, "mean_precision_prior must be positive"),
        ({"covariance_type": "banded"}, "covariance_type must be one of"),
        ({"weight_concentration_prior_type": "pitman_yor"}, "weight_concentration_prior_type"),
    ],
)
def test_bad_priors_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        BayesianGaussianMixture(3, **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"degrees_of_freedom_prior": 0.5}, "greater than n_features - 1"),
        ({"mean_prior": [0.0, 0.0, 0.0]}, "mean_prior must be a finite vector of n_features"),
        ({"covariance_prior": [[1.0, 2.0], [2.0, 1.0]]}, "symmetric positive definite"),
        ({"covariance_type": "diag", "covariance_prior": [1.0, -1.0]}, "positive variances"),
        ({"covariance_type": "spherical", "covariance_prior": [1.0, 1.0]}, "one positive number"),
    ],
)
def test_priors_of_the_wrong_shape_or_sign_are_refused_before_work(options, message):
    x = faithful(standardized=True)
    model = BayesianGaussianMixture(3, **options)
    guide = MeanFieldPosterior(model)
    with pytest.raises(ValueError, match=message):
        EM(model, guide, progress=False).fit(x)
    assert not model.is_built and not guide.is_built  # nothing half-built is left


def test_guide_and_start_are_checked():
    x = faithful(standardized=True)
    model = BayesianGaussianMixture(3)
    with pytest.raises(ValueError, match="guide must be MeanFieldPosterior"):
        EM(model, ExactPosterior(model))
    with pytest.raises(ValueError, match="closed-form update of q"):
        EM(model, MeanFieldPosterior(model), m_step="gradient")
    guide = MeanFieldPosterior(model)
    with pytest.raises(ValueError, match=r"shape \(n_samples, n_components\) = \(272, 3\)"):
        EM(model, guide, init={"responsibilities": np.ones((10, 3)) / 3}, progress=False).fit(x)
    with pytest.raises(ValueError, match="starts from responsibilities"):
        EM(model, guide, init={"means": np.zeros((3, 2))}, progress=False).fit(x)
    with pytest.raises(ValueError, match="MeanFieldPosterior approximates the posterior"):
        MeanFieldPosterior(GaussianMixture(2))


def discrete_data(family: str) -> torch.Tensor:
    """300 rows (float64) from a two-component mixture of the family (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randint(0, 2, (300,), generator=g)
    if family == "bernoulli":
        p = torch.where(z[:, None] == 0, 0.2, 0.8).double().expand(300, 6)
        return torch.bernoulli(p, generator=g)
    if family == "poisson":
        rate = torch.where(z[:, None] == 0, 2.0, 9.0).double().expand(300, 3)
        return torch.poisson(rate, generator=g)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]], dtype=torch.float64)[z]  # (300, 3)
    return torch.multinomial(probs, 4, replacement=True, generator=g).double()


DISCRETE = {
    "bernoulli": BayesianBernoulliMixture,
    "poisson": BayesianPoissonMixture,
    "categorical": BayesianCategoricalMixture,
}


@pytest.mark.parametrize("prior", WEIGHT_PRIORS)
@pytest.mark.parametrize("family", sorted(DISCRETE))
def test_conjugate_discrete_families_run_the_same_loop(family, prior):
    """Bernoulli-Beta, Poisson-Gamma and categorical-Dirichlet mixtures through the same
    family code: the bound never decreases (1e-12), and the closed-form ELBO equals Pyro's
    Monte Carlo Trace_ELBO of the two programs within 5 standard errors of 200 particles."""
    x = discrete_data(family)
    model = DISCRETE[family](5, weight_concentration_prior_type=prior)
    guide = MeanFieldPosterior(model)
    result = EM(model, guide, tol=1e-10, max_iter=500, seed=0, reg_covar=0.0, progress=False).fit(x)
    assert result.converged and result.m_step == "cavi"
    lls, lbs = np.array(result.log_likelihoods), np.array(result.lower_bounds)
    assert (lbs - lls[:-1] >= -1e-12).all() and (lls[1:] - lbs >= -1e-12).all()
    closed = guide.elbo(x)
    pyro.set_rng_seed(0)
    draws = np.array([-pyro.infer.Trace_ELBO().loss(model, guide, x) for _ in range(200)])
    se = draws.std(ddof=1) / math.sqrt(len(draws))
    assert abs(draws.mean() - closed) < 5 * se, (draws.mean(), closed, se)
    # the fitted means of q sit on the two true components (the others nearly empty)
    kept = guide.weights_ > 0.05
    assert int(kept.sum()) >= 2
    sample, z = model.sample(50, seed=0)
    assert sample.shape == (50, x.shape[1]) and sample.dtype == x.dtype and z.shape == (50,)


def test_best_of_several_starts_keeps_its_q():
    """n_init = 4 from different k-means++ seeds: the start with the highest final bound is
    kept, and the guide ends at that start's q(theta) (its closed-form ELBO is that run's
    last bound after the E-step, 1e-12)."""
    x = faithful(standardized=True)
    model, guide, result = fit_vb(x, 6, tol=1e-8, max_iter=300, n_init=4, seed=0)
    assert len(result.init_lower_bounds) == 4
    assert result.lower_bound == max(result.init_lower_bounds)
    assert guide.elbo(x) / x.shape[0] == pytest.approx(result.log_likelihoods[-1], abs=1e-12)


def test_a_failed_fit_leaves_the_fitted_q_as_it_was():
    """Bad data on a second fit: the error is raised before any work and q(theta) is the
    first fit's, unchanged."""
    x = faithful(standardized=True)
    model, guide, _ = fit_vb(x, 3, tol=1e-6, max_iter=200, seed=0)
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    bad = x.clone()
    bad[5, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        EM(model, guide, progress=False).fit(bad)
    for name, value in guide.state_dict().items():
        assert torch.equal(value, before[name]), name
