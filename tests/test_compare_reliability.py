"""``compare`` and ``select_k`` refuse what they cannot do well, before anything is fitted.

Every refusal is a ``ValueError`` raised before the first scheme runs (the ``ran`` fixture
records every scheme call), naming the problem and the fix. Fits that end on a collapsed
Gaussian component (a spike on duplicated points) are flagged in their row.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from elbolab.inference import SchemeFit, compare, register_scheme, select_k
from elbolab.inference.compare.bayesian import fit_map
from elbolab.inference.compare.mixture import collapse_flags, initialize
from elbolab.inference.compare.schemes import _SCHEMES, lookup_scheme
from elbolab.models import PPCA, BayesianMixture, GaussianMixture

#: a mixture's schemes and their options small enough for a test
FAST = {
    "mean-field": {"svi_steps": 5, "num_samples": 10, "elbo_particles": 2},
    "nuts": {"num_samples": 4, "warmup_steps": 2, "num_chains": 1},
}


@pytest.fixture
def ran(monkeypatch):
    """The names of the schemes called, in order (every registered scheme is watched)."""
    calls: list[str] = []
    for name, by_class in _SCHEMES.items():
        for scheme in by_class.values():

            def watched(*args, _fn=scheme.fn, _name=name, **kwargs):
                calls.append(_name)
                return _fn(*args, **kwargs)

            monkeypatch.setattr(scheme, "fn", functools.wraps(scheme.fn)(watched))
    return calls


def two_points(faithful: torch.Tensor) -> torch.Tensor:
    """15 copies of each of two rows: two components each sit on one repeated point."""
    return torch.cat([faithful[:1].repeat(15, 1), faithful[1:2].repeat(15, 1)])


# ---------------------------------------------------------------------------- select_k
def test_select_k_refuses_a_factory_that_ignores_k(faithful, ran):
    with pytest.raises(ValueError) as info:
        select_k(lambda k: GaussianMixture(2), faithful, ks=[1, 2, 3], schemes=["em"])
    message = str(info.value)
    assert "make_model(1) returned a model with n_components=2, not 1" in message
    assert "the factory ignores k" in message
    assert "make_model=lambda k: GaussianMixture(k)" in message
    assert ran == []


@pytest.mark.parametrize("returned", [None, "GaussianMixture", 3, torch.zeros(2)])
def test_select_k_refuses_a_factory_that_returns_no_model(faithful, ran, returned):
    with pytest.raises(ValueError) as info:
        select_k(lambda k: returned, faithful, ks=[1, 2], schemes=["em"])
    message = str(info.value)
    assert message.startswith(f"make_model(1) returned {returned!r}, which is not a model")
    assert "make_model must return a new unfitted model with k components" in message
    assert ran == []


def test_select_k_checks_every_k_before_the_first_fit(faithful, ran):
    """An init for K=2 does not fit K=3: refused before K=2 is fitted."""
    init = {
        "weights": [0.5, 0.5],
        "means": np.zeros((2, 2)),
        "covariances": np.stack([np.eye(2)] * 2),
    }
    with pytest.raises(ValueError, match="init does not fit this GaussianMixture with 3 comp"):
        select_k(lambda k: GaussianMixture(k), faithful, ks=[2, 3], schemes=["em"], init=init)
    assert ran == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ks": 3}, r"ks must be a list of numbers of components, got 3; e.g. ks=range\(1, 5\)"),
        ({"make_model": GaussianMixture(2)}, "make_model must be a function k -> unfitted model"),
        ({"schemes": 5}, "schemes must be a scheme name or a list of names, got 5"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\), got -1"),
        ({"on_error": "skip"}, "on_error must be one of"),
    ],
)
def test_select_k_bad_arguments_raise_before_fitting(faithful, ran, kwargs, message):
    arguments = {"make_model": lambda k: GaussianMixture(k), "ks": [1, 2], "schemes": ["em"]}
    arguments |= kwargs
    make_model = arguments.pop("make_model")
    with pytest.raises(ValueError, match=message):
        select_k(make_model, faithful, **arguments)
    assert ran == []


def test_select_k_takes_schemes_from_a_generator(faithful):
    out = select_k(lambda k: GaussianMixture(k), faithful, ks=[1, 2], schemes=iter(["em"]))
    assert [(r["k"], r["scheme"]) for r in out] == [(1, "em"), (2, "em")]


# ---------------------------------------------------------------------------- collapse
def test_identical_rows_are_refused_for_the_bayesian_schemes(faithful, ran):
    """The prior scales with std(x) = 0: refused, before EM runs either."""
    x = faithful[:1].repeat(30, 1)
    with pytest.raises(ValueError) as info:
        compare(GaussianMixture(2), x, schemes=["em", "map"])
    message = str(info.value)
    assert message.startswith("every row of x is the same point (all 30 rows equal)")
    assert "Drop the constant column(s) or pass data with more distinct rows" in message
    assert ran == []


def test_a_constant_feature_is_refused_for_the_bayesian_schemes(faithful, ran):
    x = torch.stack([faithful[:40, 0], torch.full((40,), 3.0, dtype=faithful.dtype)], 1)
    with pytest.raises(ValueError, match=r"feature\(s\) \[1\] of x do not vary"):
        compare(GaussianMixture(2), x, schemes=["mean-field"], **FAST["mean-field"])
    assert ran == []


def test_em_on_identical_rows_is_flagged_at_its_reg_covar_floor(faithful):
    x = faithful[:1].repeat(30, 1)
    out = compare(GaussianMixture(2), x, schemes=["em"])
    row = out.row("em")
    assert math.isfinite(row["loglik"])
    assert row["flags"].startswith(
        "collapsed: the covariance of component(s) [0, 1] is numerically singular (smallest "
        "variance 1.0e-06, the reg_covar floor"
    )
    assert "use fewer components or data with more distinct rows" in row["flags"]
    # without the floor EM itself refuses (a failed row, as before)
    bare = compare(GaussianMixture(2), x, schemes=["em"], reg_covar=0.0).row("em")
    assert bare["flags"].startswith("failed: SingularCovarianceError")


def test_map_spike_on_duplicated_points_is_flagged(faithful):
    """Each component on 15 copies of one point: MAP's scales go to 0 (bound ~ +70 per
    datum, not a fit) and the row says so; EM stops at reg_covar and is flagged too."""
    out = compare(GaussianMixture(2), two_points(faithful), schemes=["em", "map"])
    for scheme in ("em", "map"):
        flags = out.row(scheme)["flags"]
        assert "collapsed: the covariance of component(s) [0, 1] is numerically singular" in (
            flags
        ) or ("reached parameters where the model is not defined" in flags)
    assert "collapsed: the covariance of component(s) [0, 1]" in out.row("em")["flags"]
    fit = out.fits["map"]
    if fit.model is not None:  # L-BFGS stopped on the spike rather than beyond it
        assert float(fit.model.covariances_.diagonal(dim1=-2, dim2=-1).min()) < 1e-15


def test_direct_and_gradient_em_say_plainly_where_they_failed(faithful):
    out = compare(GaussianMixture(2), faithful[:1].repeat(30, 1), schemes=["direct"])
    flags = out.row("direct")["flags"]
    assert flags.startswith(
        "failed: ValueError: L-BFGS on log p(x) reached parameters where the model is not "
        "defined (scale_tril outside LowerCholesky())"
    )
    assert "use fewer components or data with more distinct rows" in flags
    assert "Tensor of shape" not in flags


def test_map_from_a_zero_scale_start_names_the_problem(faithful):
    model = GaussianMixture(2)
    initialize(model, faithful, init="kmeans++", seed=0, reg_covar=1e-6)
    program = BayesianMixture(model, faithful)
    start = program.prior.site_values(model)
    start["scales"] = torch.zeros_like(start["scales"])
    with pytest.raises(ValueError) as info:
        fit_map(program, faithful, start, max_iter=5)
    message = str(info.value)
    assert message.startswith(
        "the MAP search (L-BFGS) reached parameters where the model is not defined"
    )
    assert "use fewer components or data with more distinct rows" in message


@pytest.mark.parametrize(
    "covariance_type, tiny, expected",
    [
        ("full", np.stack([np.eye(2), np.diag([1.0, 1e-20])]), [1]),
        ("tied", np.diag([1.0, 1e-20]), [0, 1]),
        ("diag", np.array([[1.0, 1.0], [1e-20, 1.0]]), [1]),
        ("spherical", np.array([1e-20, 1.0]), [0]),
        ("full", np.stack([np.eye(2), 1e-3 * np.eye(2)]), []),
    ],
)
def test_collapse_flags_for_every_covariance_type(faithful, covariance_type, tiny, expected):
    model = GaussianMixture(2, covariance_type).build(2)
    model.set_params(weights=[0.5, 0.5], means=np.zeros((2, 2)), covariances=tiny)
    flags = collapse_flags(model, faithful)
    if not expected:
        assert flags == []
    else:
        assert len(flags) == 1
        assert flags[0].startswith(
            f"collapsed: the covariance of component(s) {expected} is numerically singular"
        )


def test_a_non_finite_log_likelihood_is_flagged_not_silent(faithful):
    @register_scheme("nan-fit", GaussianMixture)
    def _nan_fit(model, x, *, seed):
        initialize(model, x, init="kmeans++", seed=seed, reg_covar=1e-6)
        return SchemeFit(model=model, loglik=math.nan, estimate="MLE")

    try:
        row = compare(GaussianMixture(2), faithful, ["nan-fit"], reference=None).row("nan-fit")
    finally:
        del _SCHEMES["nan-fit"]
    assert row["flags"].startswith("non-finite: log p(x) at the fitted parameters is nan")


# ---------------------------------------------------------------------------- options
BAD_INIT = {
    "weights": [0.5, 0.5],
    "means": np.zeros((3, 2)),
    "covariances": np.stack([np.eye(2), np.eye(2)]),
}


@pytest.mark.parametrize(
    "scheme, options, message",
    [
        ("mean-field", {"lr": -1}, "lr must be a positive number, got -1; e.g. lr=0.05"),
        ("mean-field", {"lr": 0}, "lr must be a positive number, got 0"),
        ("mean-field", {"lr": "fast"}, "lr must be a positive number, got 'fast'"),
        ("mean-field", {"lr": float("nan")}, "lr must be a positive number, got nan"),
        ("mean-field", {"init_scale": 0}, "init_scale must be a positive number, got 0"),
        ("mean-field", {"init_scale": -0.1}, "init_scale must be a positive number"),
        ("mean-field", {"svi_steps": 2.5}, "svi_steps must be a positive integer"),
        ("em", {"init": BAD_INIT}, "init does not fit this GaussianMixture with 2 components"),
        ("map", {"init": BAD_INIT}, r"parameter 'means' must have shape \(2, 2\), got \(3, 2\)"),
        ("em", {"init": {"mean": np.zeros((2, 2))}}, r"unknown parameter\(s\) \['mean'\]"),
        ("em", {"tol": "1e-3"}, "tol must be a number >= 0, got '1e-3'"),
        ("direct", {"tol": -1.0}, "tol must be a number >= 0, got -1.0"),
        ("em", {"max_iter": 2.0}, "max_iter must be a positive integer, got 2.0"),
        ("map", {"max_iter": "5"}, "max_iter must be a positive integer, got '5'"),
        ("em", {"reg_covar": "a"}, "reg_covar must be a number >= 0, got 'a'"),
        ("em", {"n_init": 0}, "n_init must be a positive integer, got 0"),
        ("nuts", {"target_accept_prob": 1.5}, r"target_accept_prob must be a number in \(0, 1\)"),
        ("nuts", {"max_tree_depth": 0}, "max_tree_depth must be a positive integer, got 0"),
        ("nuts", {"num_samples": 3}, "num_samples must be at least 4 for NUTS"),
        ("nuts", {"rhat_max": 0.5}, "rhat_max must be a number > 1, got 0.5"),
        ("nuts", {"progress": "yes"}, "progress must be True or False, got 'yes'"),
        ("map", {"prior": {"scale_scale": -1}}, r"prior\['scale_scale'\] must be a positive"),
        ("map", {"prior": {"mean_scale": "a"}}, r"prior\['mean_scale'\] must be a positive"),
        ("map", {"prior": {"lkj_concentration": 0}}, r"e.g. prior=\{'lkj_concentration': 2.0\}"),
    ],
)
def test_bad_scheme_options_raise_before_any_scheme_runs(faithful, ran, scheme, options, message):
    """The bad option's scheme comes second: the first does not run either."""
    per_scheme = {scheme: FAST.get(scheme, {}) | options}
    first = "direct" if scheme == "em" else "em"
    with pytest.raises(ValueError, match=message):
        compare(GaussianMixture(2), faithful, [first, scheme], options=per_scheme)
    assert ran == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\), got -1; e.g. seed=0"),
        ({"seed": 2**70}, r"seed must be an integer in \[0, 2\*\*63\)"),
        ({"schemes": 5}, "schemes must be a scheme name or a list of names, got 5"),
        ({"options": {"em": 5}}, r"options\['em'\] must be a dict \{option: value\}, got 5"),
    ],
)
def test_bad_call_arguments_raise_before_fitting(faithful, ran, kwargs, message):
    arguments = {"schemes": ["em"]} | kwargs
    with pytest.raises(ValueError, match=message):
        compare(GaussianMixture(2), faithful, **arguments)
    assert ran == []


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tol": -1}, "tol must be a number >= 0, got -1"),
        ({"max_iter": 0}, "max_iter must be a positive integer, got 0"),
        ({"lr": -1}, "lr must be a positive number, got -1"),
        ({"epochs": 2.5}, "epochs must be a positive integer, got 2.5"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ],
)
def test_bad_linear_gaussian_options_raise_before_fitting(ran, options, message):
    y = torch.randn(30, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=message):
        compare(PPCA(4, 1), y, ["closed-form", "em", "vae"], **options)
    assert ran == []


class _NotAValue:
    def __repr__(self) -> str:
        return "<not a value>"


@pytest.mark.parametrize(
    "model",
    [GaussianMixture(2), PPCA(2, 1)],
    ids=["GaussianMixture", "PPCA"],
)
def test_every_option_of_every_scheme_is_checked_up_front(faithful, ran, model):
    """No option of a registered scheme reaches the fit unchecked: a value of no valid type
    for any of them is refused before anything runs, naming the option."""
    for name in _SCHEMES:
        scheme = lookup_scheme(name, model)
        if scheme is None:
            continue
        for option in scheme.options:
            with pytest.raises(ValueError, match=rf"\b{option}\b.*<not a value>"):
                compare(
                    model, faithful, [name], reference=None, options={name: {option: _NotAValue()}}
                )
    assert ran == []
