"""Reliability of the mixture fit path: data of any location, scale and weight fit as well
as standardised data; input that cannot be fitted is refused before any work, with a
``ValueError`` that names the fix; a refusal leaves the model as it was.

Each test states the outcome exactly: the error type and the words that name the fix, or
the number the fit must reach. Tolerances on fits of shifted data follow from the data's
own rounding: x + 1e8 holds x to ulp(1e8) = 1.5e-8, so mean log-likelihoods may differ
from those of x by a few 1e-8; the tests allow 1e-6.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from elbolab.guides import ExactGaussianPosterior, ExactPosterior
from elbolab.inference import EM, DirectML, ppca_closed_form
from elbolab.models import (
    PPCA,
    VAE,
    BernoulliMixture,
    CategoricalMixture,
    FactorAnalysis,
    GaussianMixture,
    NotFittedError,
    PoissonMixture,
)
from families import ExponentialMixture

KINDS = ("full", "tied", "diag", "spherical")


def em(model, **options):
    return EM(model, ExactPosterior(model), progress=False, **options)


def fit(model, x, sample_weight=None, **options):
    options = {"seed": 0, "tol": 1e-10, "max_iter": 1000} | options
    return em(model, **options).fit(x, sample_weight)


def refused(*fragments: str):
    """pytest.raises(ValueError) whose message contains every fragment, in order."""
    return pytest.raises(ValueError, match=".*".join(re.escape(f) for f in fragments))


def params(model) -> dict[str, np.ndarray]:
    return {n: getattr(model, n + "_").numpy() for n in model.param_names()}


def two_clusters(n: int = 100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(-5, 1, (n, 2)), rng.normal(5, 1, (n, 2))])


# ---------------------------------------------------------------------------- far from 0
@pytest.mark.parametrize("kind", ["full", "diag"])
@pytest.mark.parametrize("K", [1, 2])
def test_data_far_from_the_origin_fit_as_the_data_near_it(faithful, kind, K):
    """x + 1e8: EM in memory, EM over chunks and direct maximisation reach the fit of x
    (mean log-likelihood within 1e-6; x + 1e8 rounds x to 1.5e-8). It used to raise
    SingularCovarianceError from the start (sums about 0 of numbers near 1e8)."""
    x = faithful
    reference = fit(GaussianMixture(K, kind), x).log_likelihood
    far = x + 1e8
    assert abs(fit(GaussianMixture(K, kind), far).log_likelihood - reference) < 1e-6
    chunks = [far[:100], far[100:]]
    assert abs(fit(GaussianMixture(K, kind), chunks).log_likelihood - reference) < 1e-6
    direct = DirectML(GaussianMixture(K, kind), seed=0, tol=1e-12, progress=False).fit(far)
    assert abs(direct.log_likelihood - reference) < 1e-6


def test_far_data_agree_with_scikit_learn(faithful):
    """scikit-learn fits x + 1e8 with full covariances to -1.41714; so does EM."""
    far = (faithful + 1e8).numpy()
    sk = SkGaussianMixture(2, tol=1e-10, max_iter=1000, random_state=0).fit(far)
    model = GaussianMixture(2)
    fit(model, far)
    assert abs(model.score(far) - sk.score(far)) < 1e-6
    assert abs(model.score(far) - -1.41714) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_scores_of_far_components_keep_their_digits(faithful, kind):
    """log p(x_d) of a fitted model and of the same model moved (with its data) by 1e8:
    equal to 1e-6 per datum (the Gaussian log-density is computed about the components'
    centre, not as x P - mu P of two numbers near 1e8)."""
    model = GaussianMixture(2, kind)
    fit(model, faithful)
    moved = GaussianMixture(2, kind).build(2, torch.float64)
    moved.set_params(**(params(model) | {"means": model.means_ + 1e8}))
    gap = moved.log_likelihood(faithful + 1e8) - model.log_likelihood(faithful)
    assert float(gap.detach().abs().max()) < 1e-6


def test_spans_that_cannot_be_squared_are_refused():
    """Variances need the spread squared: 1e300 overflows and 1e-200 underflows float64."""
    x = np.random.default_rng(0).normal(size=(50, 2))
    for factor, word in ((1e300, "overflow"), (1e-200, "underflow")):
        y = x.copy()
        y[:, 1] *= factor
        with refused("feature 1 of x spans", f"of {word}", "rescale the data first"):
            fit(GaussianMixture(2), y)
        m = FactorAnalysis(2, 1)
        with refused("feature 1 of x spans", f"of {word}", "rescale"):
            EM(m, ExactGaussianPosterior(m), progress=False).fit(y)


# ---------------------------------------------------------------------------- weights
@pytest.mark.parametrize("c", [1e-300, 1e-20, 1e-3, 7.0, 1e20, 1e300])
def test_constant_weights_of_any_size_give_the_unweighted_fit(faithful, c):
    """sample_weight = c for every point: the unweighted fit, parameters to 1e-10, for the
    Gaussian and Bernoulli families and stochastic EM. (Before: c = 1e-20 gave a mean
    log-likelihood of -808.8 with converged=True, c = 1e-300 -999988.)"""
    x = faithful
    w = np.full(len(x), c)
    for model_of, data, options in (
        (lambda: GaussianMixture(2), x, {}),
        (lambda: BernoulliMixture(2), (x > 0).double(), {}),
        (lambda: GaussianMixture(2), x, {"stochastic": True, "batch_size": 50, "max_iter": 5}),
    ):
        plain, weighted = model_of(), model_of()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            a = fit(plain, data, **options)
            b = fit(weighted, data, w, **options)
        assert abs(a.log_likelihood - b.log_likelihood) < 1e-10
        assert a.n_iter == b.n_iter
        for name, value in params(plain).items():
            np.testing.assert_allclose(params(weighted)[name], value, rtol=0, atol=1e-10)


def test_weights_scale_cancels_over_chunks(faithful):
    """(x, w) chunks with w = 1e-250: the fit of the same chunks with w = 1 (1e-10)."""
    x, ones = faithful, torch.ones(len(faithful), dtype=torch.float64)
    plain, tiny = GaussianMixture(2), GaussianMixture(2)
    fit(plain, [(x[:150], ones[:150]), (x[150:], ones[150:])])
    fit(tiny, [(x[:150], 1e-250 * ones[:150]), (x[150:], 1e-250 * ones[150:])])
    for name, value in params(plain).items():
        np.testing.assert_allclose(params(tiny)[name], value, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------- dtypes
def _bad_inputs(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 2))
    yield "complex", x + 1j, "is complex (complex128); pass real numbers"
    yield "complex tensor", torch.as_tensor(x) * (1 + 1j), "is complex (torch.complex128)"
    yield "float16", x.astype(np.float16), "is float16, which has too few digits"
    yield "half tensor", torch.as_tensor(x).half(), "is float16, which has too few digits"
    yield "bfloat16", torch.as_tensor(x).bfloat16(), "is bfloat16, which has too few digits"
    yield "strings", x.astype(str), "holds text, not numbers"
    yield "objects", x.astype(object), "holds object values, not numbers"
    yield "ragged", [[1.0, 2.0], [3.0]], "cannot be read as an array of numbers"
    path = tmp_path / "complex.npy"
    np.save(path, x + 1j)
    yield "complex .npy", str(path), "chunk 0 (from row 0): x is complex"


def test_input_that_is_not_real_numbers_is_refused(tmp_path):
    """Complex input used to be cast to real with only torch's warning; float16 failed in
    Cholesky; strings and ragged lists failed deep in numpy or torch."""
    for what, x, message in _bad_inputs(tmp_path):
        model = GaussianMixture(2)
        with refused(message), warnings.catch_warnings():
            warnings.simplefilter("error")  # no ComplexWarning on the way
            fit(model, x)
        assert not model.is_built, what


def test_dataframe_with_a_text_column_is_refused():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": ["x", "y", "x", "y"]})
    with refused("holds object values, not numbers", "encode text columns as integers"):
        fit(GaussianMixture(2), frame)
    numeric = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.5], "b": [0.0, 1.0, 0.5, 2.0]})
    assert np.isfinite(fit(GaussianMixture(1), numeric).log_likelihood)


def test_integers_become_float64():
    """Integer data keep every digit: counts near 1e8 + k are not rounded (float32 would
    round them to multiples of 8)."""
    x = (10**8 + np.random.default_rng(0).integers(0, 5, size=(40, 1))).astype(np.int64)
    model = GaussianMixture(1)
    fit(model, x)
    assert model.dtype == torch.float64
    assert abs(float(model.means_[0, 0]) - x.mean()) < 1e-6


# ---------------------------------------------------------------------------- parameters
def test_non_symmetric_and_non_positive_definite_covariances_are_refused(faithful):
    """The given value is named, at the start; it used to be taken (upper triangle ignored)
    or reported as 'became singular during fitting'."""
    means = np.array([[-1.0, -1.0], [1.0, 1.0]])
    asym = np.array([[[1.0, 0.5], [0.0, 1.0]]] * 2)
    not_pd = np.array([[[1.0, 2.0], [2.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    start = {"weights": [0.5, 0.5], "means": means}
    with refused("covariances[0] is not symmetric", "pass symmetric matrices"):
        fit(GaussianMixture(2), faithful, init=start | {"covariances": asym})
    with refused("covariances[0] is not positive definite", "smallest eigenvalue is -1"):
        fit(GaussianMixture(2), faithful, init=start | {"covariances": not_pd})
    with refused("the tied covariance is not symmetric"):
        fit(GaussianMixture(2, "tied"), faithful, init=start | {"covariances": asym[0]})
    with refused("the given diag covariances must be positive", "component 1 has -1"):
        fit(GaussianMixture(2, "diag"), faithful, init=start | {"covariances": [[1, 1], [1, -1]]})
    model = GaussianMixture(2)
    fit(model, faithful)
    before = params(model)
    with refused("covariances[0] is not symmetric"):
        model.set_params(means=means, covariances=asym)
    for name, value in before.items():  # nothing half-set: the means are unchanged too
        np.testing.assert_array_equal(params(model)[name], value)


@pytest.mark.parametrize(
    "partial",
    [{"weights": [0.5, 0.5]}, {"covariances": np.stack([np.eye(2)] * 2)}, {"means": None}],
)
def test_a_partial_init_dict_is_completed_from_the_data(partial):
    """Two clusters at -5 and +5: a dict with only weights (or only covariances) used to
    leave both means at the data mean with converged=True. What the dict leaves out is
    estimated from k-means++ responsibilities, as scikit-learn does."""
    x = two_clusters()
    if "means" in partial:
        partial = {"means": [[-4.0, -4.0], [4.0, 4.0]]}
    model = GaussianMixture(2)
    fit(model, x, init=partial)
    means = model.means_.numpy()
    order = np.argsort(means[:, 0])
    np.testing.assert_allclose(means[order], [[-5, -5], [5, 5]], atol=0.3)
    assert not np.allclose(means[0], means[1])


def test_init_dict_with_unknown_or_misshapen_entries_is_refused():
    x = two_clusters()
    with refused("unknown parameter(s) ['mean'] for GaussianMixture", "use weights, means"):
        fit(GaussianMixture(2), x, init={"mean": [[0, 0], [1, 1]]})
    with refused("parameter 'means' must have shape (2, 2), got (3, 2)"):
        fit(GaussianMixture(2), x, init={"means": np.zeros((3, 2))})
    with refused("weights must be a probability vector of length 2"):
        fit(GaussianMixture(2), x, init={"weights": [0.5, np.nan]})


# ---------------------------------------------------------------------------- options
def test_direct_ml_learning_rate_is_checked_at_construction():
    """lr=0 with Adam used to report converged=True at the start point."""
    for lr in (0, -1.0, float("nan"), float("inf"), "0.1", True):
        with refused("lr must be a positive, finite number", "e.g. lr=0.05"):
            DirectML(GaussianMixture(2), optimizer="adam", lr=lr)


def test_weighted_direct_ml_reaches_the_weighted_em_optimum():
    """DirectML used to fail with any sample_weight (Pyro: 'enumeration only supports
    scalar poutine.scale'). Both reach the weighted maximum (1e-8: direct stops at
    tol=1e-12 on the objective, EM at tol=1e-12 on the bound)."""
    x = two_clusters(40)
    w = np.random.default_rng(1).uniform(0.2, 3.0, len(x))
    direct = DirectML(GaussianMixture(2), seed=0, tol=1e-12, progress=False).fit(x, w)
    m = GaussianMixture(2)
    exact = fit(m, x, w, tol=1e-12, reg_covar=0.0)
    assert abs(direct.log_likelihood - exact.log_likelihood) < 1e-8
    ones = DirectML(GaussianMixture(2), seed=0, tol=1e-12, progress=False).fit(x, np.ones(80))
    plain = DirectML(GaussianMixture(2), seed=0, tol=1e-12, progress=False).fit(x)
    assert abs(ones.log_likelihood - plain.log_likelihood) < 1e-10


@pytest.mark.parametrize(
    "options, fragments",
    [
        ({"seed": "abc"}, ("seed must be a non-negative integer or None, got 'abc'",)),
        ({"seed": -1}, ("seed must be a non-negative integer or None",)),
        ({"reg_covar": float("inf")}, ("reg_covar must be finite and >= 0, got inf",)),
        ({"reg_covar": "1e-6"}, ("reg_covar must be a number, got '1e-6'",)),
        ({"tol": None}, ("tol must be a number, got None",)),
        ({"init": np.zeros((2, 2))}, ("init must be one of",)),
    ],
)
def test_bad_options_are_refused_at_construction(options, fragments):
    with refused(*fragments):
        em(GaussianMixture(2), **options)


def test_empty_list_says_empty():
    """fit([]) used to suggest reshape(-1, 1)."""
    with refused("x is empty (shape (0,)); pass at least one sample."):
        fit(GaussianMixture(2), [])


def test_huge_category_codes_are_refused_before_allocating():
    """A code of 1e9 used to ask for a (K, D, 1e9 + 1) table (64 GB)."""
    x = np.array([[0, 1], [2, 10**9], [1, 1], [0, 2]])
    model = CategoricalMixture(2)
    with refused("the largest category code in x is 1000000000", "re-encode each feature"):
        fit(model, x)
    assert not model.is_built and model.n_categories is None
    with refused("is too large", "re-encode the codes densely"):
        fit(CategoricalMixture(2, n_categories=10**9), x % 3)


def test_fitted_attributes_before_fitting_say_how_to_fit():
    """model.weights_ used to be a bare AttributeError from torch.nn.Module."""
    model = GaussianMixture(2)
    for read in (lambda: model.weights_, lambda: model.covariances_, lambda: model.means_):
        with pytest.raises(NotFittedError, match="has no parameters yet: fit it with"):
            read()
    assert not hasattr(model, "weights_")  # an AttributeError too, as in scikit-learn
    with pytest.raises(NotFittedError, match="has no parameters yet"):
        ExactPosterior(model).probs(np.zeros((3, 2)))  # used to say "no attribute 'means'"


def test_guide_checks_the_data_it_is_given():
    """probs on data of another width used to fail inside Pyro."""
    model = GaussianMixture(2)
    fit(model, two_clusters())
    guide = ExactPosterior(model)
    with refused("x has 3 features but the model was built for 2"):
        guide.probs(np.zeros((4, 3)))
    with refused("x contains NaN or inf"):
        guide.probs(np.full((4, 2), np.nan))


class _ForgetsTheEvent(ExponentialMixture):
    """A user's family whose ``_component_dist`` forgets ``.to_event(1)``."""

    def _component_dist(self, rates):
        return dist.Exponential(rates)


@pytest.mark.parametrize("D", [1, 3])
def test_a_family_that_forgets_to_event_is_told_the_event_shape_rule(D):
    """One error naming the rule (before: a plate shape mismatch, or with D = 1 a size
    error inside the enumeration), raised when the model is built, before any work."""
    model = _ForgetsTheEvent(2)
    x = np.abs(np.random.default_rng(0).normal(size=(30, D))) + 0.1
    with refused(
        "_ForgetsTheEvent._component_dist must return a distribution with batch shape",
        f"event shape (n_features,) = ({D},)",
        "add .to_event(1)",
    ):
        fit(model, x)
    assert not model.is_built


def test_fitted_attributes_are_detached():
    """Every parameter p of a family is also p_, detached: float() on it does not warn."""
    model = ExponentialMixture(1)
    x = np.random.default_rng(0).exponential(2.0, size=(200, 1))
    fit(model, x, m_step="gradient", max_iter=50, tol=1e-8)
    assert model.rates.grad_fn is not None  # the live parameter, for Pyro
    for value in (model.rates_, model.weights_):
        assert value.grad_fn is None and not value.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert abs(float(model.rates_[0, 0]) - 1 / x.mean()) < 1e-4


# ---------------------------------------------------------------------------- PPCA / FA
def test_linear_gaussian_options_and_init_are_checked():
    x = np.random.default_rng(0).normal(size=(60, 4))
    model = PPCA(4, 2)
    guide = ExactGaussianPosterior(model)
    with refused("weight must have shape (4, 2) for PPCA(data_dim=4, latent_dim=2), got (2, 2)"):
        EM(model, guide, init={"weight": np.zeros((2, 2))})
    with refused("unknown init entry ['W'] for PPCA; use weight, mean, noise"):
        EM(model, guide, init={"W": np.zeros((4, 2))})
    with refused("seed must be a non-negative integer or None"):
        EM(model, guide, seed="abc")
    # a partial dict takes the rest from the "random" start: the fit of a full start
    fitter = EM(model, guide, init={"noise": 0.5}, tol=1e-12, max_iter=20000, progress=False)
    closed = ppca_closed_form(PPCA(4, 2), x)
    assert abs(fitter.fit(x).log_likelihood - closed.score(x)) < 1e-6


def test_poisson_and_categorical_keep_their_support_checks():
    with refused("PoissonMixture needs counts"):
        fit(PoissonMixture(2), np.array([[0.5, 1], [1, 2], [3, 1]]))
    with refused("CategoricalMixture needs category codes"):
        fit(CategoricalMixture(2), np.array([[0.5, 1], [1, 2], [3, 1]]))


@pytest.mark.parametrize(
    "options, fragments",
    [
        ({"callback": "print"}, ("callback must be a function callback(iteration, model)",)),
        ({"learning_rate": "1e-3"}, ("learning_rate must be a number, got '1e-3'",)),
        ({"learning_rate": float("inf")}, ("learning_rate must be positive and finite",)),
        ({"gradient_max_iter": 0}, ("gradient_max_iter must be a positive integer, got 0",)),
    ],
)
def test_more_options_are_refused_at_construction(options, fragments):
    """A callback that is not callable used to fail after the start; a string learning
    rate with a TypeError; gradient_max_iter=0 was taken (M-steps that never move)."""
    with refused(*fragments):
        em(GaussianMixture(2), **options)


def test_em_on_a_model_that_is_not_a_mixture_names_the_right_guide():
    """EM(PPCA, ExactPosterior(PPCA)) used to fail with an AttributeError inside fit; a VAE
    is told where it belongs."""
    model = PPCA(2, 1)
    with refused("guide must be ExactGaussianPosterior(model) for this same model"):
        EM(model, ExactPosterior(model))
    vae = VAE(4, 2)
    with refused("latent site 'z' (Independent) cannot be summed out", "amortized"):
        EM(vae, ExactPosterior(vae), progress=False).fit(torch.zeros(5, 4))


def test_sampling_with_a_seed_repeats_and_leaves_the_global_state_alone():
    """sample(n, seed) used to reseed Pyro's global generators (and seed='a' gave
    'invalid literal for int()'). Now: the same draws for the same seed, the caller's
    torch state untouched, and a clear refusal of a bad seed."""
    model = GaussianMixture(2)
    fit(model, two_clusters())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = model.sample(5, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b, _ = model.sample(5, seed=7)
    assert torch.equal(a, b)
    for seed in ("a", -1, 2.5):
        with refused("seed must be a non-negative integer or None"):
            model.sample(5, seed=seed)
