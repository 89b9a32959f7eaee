"""``compare`` and ``select_k``: one model, every scheme, one table (sections 2 and 4).

Tolerances, and why:

- Exact identities (a potential written two ways, a bound that is a log-density) are
  compared to 1e-10 in float64.
- The three maximum-likelihood schemes start from one point and stop on a change of
  1e-8 (EM) or 1e-10 (direct) in the mean log-likelihood; as in ``test_em_options.py``
  their log-likelihoods agree to 1e-8 (EM, gradient M-step) and 1e-6 (direct), and
  parameters to 1e-5 and 1e-4 (an objective flat to 1e-10 leaves parameters ~1e-5 off).
- Posterior means differ from the MLE by O(1/N) while posterior standard deviations are
  O(1/sqrt(N)) (Bernstein-von Mises), so on Old Faithful (about 100 points per cluster)
  they lie well within one posterior standard deviation of the EM solution, up to Monte
  Carlo error sd / sqrt(ESS) (< 0.3 sd here). Mean-field's E_q[Sigma] is pulled up
  further by the spread of q over the log-scales, hence 1.5 sd for it.
- Monte Carlo bounds are compared with 3 standard errors of their particle average.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from pyro.infer.mcmc.util import initialize_model
from pyro.nn import PyroParam

from elbolab.inference import (
    BayesianMixture,
    Comparison,
    SchemeFit,
    compare,
    nuts_flags,
    prior_for,
    register_scheme,
    relabel,
    schemes_for,
    select_k,
)
from elbolab.inference.compare.bayesian import (
    RecordedPotential,
    elbo_estimate,
    mean_field_loss,
    mean_field_losses,
    sample_nuts,
)
from elbolab.inference.compare.chains import run_chains
from elbolab.inference.compare.mixture import initialize
from elbolab.inference.compare.posterior import arviz, loo_flags, to_inference_data
from elbolab.inference.compare.schemes import _SCHEMES
from elbolab.inference.compare.table import COLUMNS
from elbolab.models import (
    VAE,
    BernoulliMixture,
    GaussianHMM,
    GaussianMixture,
    MixtureModel,
    PoissonMixture,
)
from families import FAMILIES, fitted_model, make_model, sample_data

EXACT = 1e-10
ALL = ["em", "em-gradient", "direct", "map", "mean-field", "nuts"]
#: small enough for a test, large enough for the statements below (see the module docstring)
OPTIONS = {
    "nuts": {"num_samples": 100, "warmup_steps": 100, "num_chains": 2},
    "mean-field": {"svi_steps": 300, "num_samples": 1000, "elbo_particles": 100},
}

az = arviz()


@pytest.fixture(scope="module")
def table(faithful) -> Comparison:
    """Every scheme on standardised Old Faithful, K = 2, full covariances, seed 0."""
    return compare(GaussianMixture(n_components=2), faithful, schemes=ALL, options=OPTIONS)


def posterior_sd(table: Comparison, scheme: str) -> dict[str, np.ndarray]:
    post = table.idata[scheme].posterior
    return {k: post[k].std(("chain", "draw")).values for k in ("weights", "means", "covariances")}


def z_scores(fit: SchemeFit, reference: SchemeFit, sd: dict) -> float:
    """max_i |theta_i - theta_ref_i| / sd_i, components in canonical order."""
    return max(
        float(np.max(np.abs(fit.params[k].numpy() - reference.params[k].numpy()) / sd[k]))
        for k in sd
    )


# ---------------------------------------------------------------------------- the table
def test_table_is_a_list_of_records(table, faithful):
    assert len(pyro.get_param_store()) == 0  # every guide keeps its parameters
    assert isinstance(table, list) and [r["scheme"] for r in table] == ALL
    assert all(list(r) == list(COLUMNS) for r in table)
    assert table.row("nuts") is table[-1]
    frame = table.to_pandas()
    assert list(frame.columns) == list(COLUMNS) and len(frame) == len(ALL)
    text = str(table)
    assert all(name in text for name in ALL)
    assert set(table.idata) == {"mean-field", "nuts"}
    assert set(table.models) == set(ALL)
    for name, model in table.models.items():
        assert model.score(faithful) == pytest.approx(table.row(name)["loglik"], abs=EXACT)


def test_the_model_passed_in_is_not_fitted(faithful):
    model = GaussianMixture(2)
    compare(model, faithful, ["em", "map"])
    assert not model.is_built
    assert len(pyro.get_param_store()) == 0  # parameters stay in the modules


def test_ml_schemes_reach_the_same_optimum(table):
    """EM (both M-steps) and direct maximisation from one start: one maximum."""
    em, grad, direct = (table.row(s) for s in ("em", "em-gradient", "direct"))
    assert em["loglik"] == pytest.approx(-1.4171349, abs=1e-6)  # the known answer
    assert em["converged"] and grad["converged"] and direct["converged"]
    assert abs(grad["loglik_vs_ref"]) <= 1e-8 and grad["theta_vs_ref"] <= 1e-5
    assert abs(direct["loglik_vs_ref"]) <= 1e-6 and direct["theta_vs_ref"] <= 1e-4
    assert em["loglik_vs_ref"] == 0 and em["theta_vs_ref"] == 0


def test_EM_TIGHT_bound_gap_vanishes(table):
    """(EM-TIGHT) The bound after the last M-step is within tol of log p(x) (and below it:
    BASIC). Direct maximisation has no guide and so no bound."""
    for scheme in ("em", "em-gradient"):
        row = table.row(scheme)
        assert -1e-12 <= row["gap"] <= 1e-8
        assert row["bound_se"] == 0
    assert math.isnan(table.row("direct")["bound"]) and math.isnan(table.row("direct")["gap"])


def test_VI_MF_elbo_below_log_likelihood(table):
    """(VI-MF, BASIC) ELBO <= log p(x) = log int p(theta) p(x | theta) <= max_theta log
    p(x; theta), the EM optimum; here also below log p(x) at q's own mean. The ELBO is
    an average of 100 single-particle estimates: 3 standard errors of slack."""
    mf, em = table.row("mean-field"), table.row("em")
    assert 0 < mf["bound_se"] < 1e-3
    assert mf["bound"] + 3 * mf["bound_se"] < em["loglik"]
    assert mf["bound"] + 3 * mf["bound_se"] < mf["loglik"]
    assert mf["gap"] > 0


def test_map_bound_is_the_log_joint(table, faithful):
    """MAP's bound (Pyro's ELBO with a point-mass guide) is log p(x, theta_MAP) / N, so its
    gap to log p(x; theta_MAP) is minus the log prior per datum, exactly."""
    fit = table.fits["map"]
    program = BayesianMixture(fit.model, faithful)
    log_prior = float(program.log_prior(fit.result.values))
    assert table.row("map")["gap"] == pytest.approx(-log_prior / len(faithful), abs=EXACT)


def test_posteriors_are_near_the_em_solution(table):
    """MAP, the NUTS posterior mean and q's mean against EM, in posterior sds (relabelled)."""
    em, sd = table.fits["em"], posterior_sd(table, "nuts")
    assert z_scores(table.fits["map"], em, sd) < 0.25  # prior pull O(1/N): ~0.07 sd
    assert z_scores(table.fits["nuts"], em, sd) < 1.0
    assert z_scores(table.fits["mean-field"], em, posterior_sd(table, "mean-field")) < 1.5
    for scheme in ("mean-field", "nuts"):
        row = table.row(scheme)
        # log mean_s p(x_d | theta_s) and log p(x_d | mean_s theta_s) differ by terms of the
        # order of the posterior variance, O(1/N) per datum (measured: below 1e-3)
        assert abs(row["lppd"] - row["loglik"]) < 5e-3
        # and no parameter value beats the maximum-likelihood estimate
        assert row["loglik"] <= table.row("em")["loglik"] + 1e-9


def test_relabelled_draws_are_in_canonical_order(table):
    for scheme in ("mean-field", "nuts"):
        means = table.idata[scheme].posterior["means"].values  # (C, S, K, D)
        assert np.all(np.diff(means[..., 0], axis=-1) > 0)


# ---------------------------------------------------------------------------- InferenceData
def test_inference_data_groups_shapes_and_arviz(table, faithful):
    N, D, K = faithful.shape[0], faithful.shape[1], 2
    for scheme, (C, S) in (("nuts", (2, 100)), ("mean-field", (1, 1000))):
        idata = table.idata[scheme]
        assert {"posterior", "log_likelihood", "observed_data"} <= set(idata.groups())
        post = idata.posterior
        assert post["weights"].shape == (C, S, K)
        assert post["means"].shape == (C, S, K, D)
        assert post["covariances"].shape == (C, S, K, D, D)
        assert idata.log_likelihood["x"].shape == (C, S, N)
        assert idata.observed_data["x"].shape == (N, D)
        summary = az.summary(idata, var_names=["weights", "means"])
        assert len(summary) == K + K * D and np.isfinite(summary["mean"]).all()
        loo, _ = loo_flags(idata)
        assert loo.n_data_points == N and np.isfinite(loo.elpd_loo)
    assert "diverging" in table.idata["nuts"].sample_stats


def test_log_likelihood_group_is_log_p_x_with_z_summed_out(table, faithful):
    """Entry (c, s, d) is log p(x_d | theta_cs): the model's exact log-likelihood there."""
    idata = table.idata["nuts"]
    post = idata.posterior
    model = GaussianMixture(2).build(2)
    for c, s in ((0, 0), (1, 57)):
        model.set_params(
            weights=post["weights"].values[c, s],
            means=post["means"].values[c, s],
            covariances=post["covariances"].values[c, s],
        )
        expected = model.log_likelihood(faithful).detach().numpy()
        np.testing.assert_allclose(idata.log_likelihood["x"].values[c, s], expected, atol=1e-9)


# ---------------------------------------------------------------------------- label switching
def swapped_draws(C=2, S=60):
    """Well-separated two-component draws, and a copy with components swapped in some."""
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    values = {
        "weights": torch.tensor([0.4, 0.6], dtype=torch.float64).expand(C, S, 2).clone(),
        "means": means + 0.05 * torch.randn(C, S, 2, 2, generator=g, dtype=torch.float64),
        "corr_cholesky": torch.eye(2, dtype=torch.float64).expand(C, S, 2, 2, 2).clone(),
        "scales": 0.5 + 0.01 * torch.rand(C, S, 2, 2, generator=g, dtype=torch.float64),
    }
    swap = torch.zeros(C, S, dtype=torch.bool)
    swap[0, :20] = True  # a minority of chain 0: label switching within the chain
    swap[1, :] = True  # all of chain 1: the chains sit in different labellings
    swapped = {
        k: torch.where(swap.reshape(C, S, *([1] * (v.dim() - 2))), v.flip(2), v)
        for k, v in values.items()
    }
    return values, swapped


def gaussian_prior(faithful):
    model = GaussianMixture(2).build(2)
    return prior_for(model, faithful), model


def test_label_switching_is_detected_and_undone(faithful):
    prior, _ = gaussian_prior(faithful)
    values, swapped = swapped_draws()
    relabelled, report = relabel(swapped, prior)
    assert report.switching_chains == [0] and report.n_switched == 20
    assert report.chains_disagree and report.changed
    assert report.n_permuted == 20 + 60 and report.n_draws == 120
    flags = "; ".join(report.flags())
    assert "label switching within chain(s) [0]" in flags and "chains disagree" in flags
    for k in values:
        torch.testing.assert_close(relabelled[k], values[k], rtol=0, atol=0)
    # draws already in one order: nothing to report
    clean, quiet = relabel(values, prior)
    assert quiet.flags() == [] and quiet.n_permuted == 0 and not quiet.changed


def test_relabelling_leaves_shared_parameters_alone(faithful):
    """Tied covariances belong to no component: relabelling permutes only the rest."""
    model = GaussianMixture(2, "tied").build(2)
    prior = prior_for(model, faithful)
    assert prior.component_sites == ("weights", "means")
    _, swapped = swapped_draws()
    swapped["corr_cholesky"] = swapped["corr_cholesky"][:, :, 0]  # (C, S, D, D), shared
    swapped["scales"] = swapped["scales"][:, :, 0]  # (C, S, D)
    relabelled, report = relabel(swapped, prior)
    assert report.chains_disagree
    assert torch.equal(relabelled["scales"], swapped["scales"])
    assert torch.equal(relabelled["corr_cholesky"], swapped["corr_cholesky"])
    assert bool((relabelled["means"][..., 1, 0] > relabelled["means"][..., 0, 0]).all())


def test_relabelling_is_what_brings_r_hat_down(faithful):
    """R-hat on swapped draws is huge; on the relabelled ones it is fine."""
    prior, model = gaussian_prior(faithful)
    program = BayesianMixture(model, faithful)
    values, swapped = swapped_draws(S=200)
    raw = to_inference_data(program, swapped, faithful)
    assert any(f.startswith("R-hat") for f in nuts_flags(raw, ess_min=0))
    fixed = to_inference_data(program, relabel(swapped, prior)[0], faithful)
    assert not any(f.startswith("R-hat") for f in nuts_flags(fixed, ess_min=0))


# ---------------------------------------------------------------------------- NUTS flags
def fake_idata(shift=0.0, diverging=0, S=1000):
    """Two chains of iid N(0, 1) draws; chain 1 shifted by ``shift``."""
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(2, S, 3))
    draws[1] += shift
    stats = np.zeros((2, S), dtype=bool)
    stats[0, :diverging] = True
    return az.from_dict(posterior={"theta": draws}, sample_stats={"diverging": stats})


def test_nuts_flags_trigger_on_a_bad_run():
    assert nuts_flags(fake_idata()) == []  # 2 x 1000 iid draws: R-hat ~1.00, ESS ~2000
    flags = nuts_flags(fake_idata(shift=0.5, diverging=3))
    assert "3/2000 divergent transitions" in flags
    assert any(f.startswith("R-hat") and "> 1.01" in f for f in flags)
    few = nuts_flags(fake_idata(S=30))
    assert any(f.startswith("bulk ESS") for f in few)


def test_nuts_runs_on_pyros_own_enumerated_potential(faithful):
    """``potential="enumerated"``: NUTS on the program itself (Pyro sums z out each step)."""
    out = compare(
        GaussianMixture(2),
        faithful,
        ["nuts"],
        reference=None,
        num_samples=15,
        warmup_steps=15,
        num_chains=1,
        potential="enumerated",
    )
    assert out.idata["nuts"].posterior["means"].shape == (1, 15, 2, 2)
    assert out.row("nuts")["loglik"] == pytest.approx(-1.4171349, abs=0.05)


def test_nuts_row_reports_its_diagnostics(table):
    """The short test run is flagged honestly: whatever R-hat and ESS say is in the row."""
    idata = table.idata["nuts"]
    rhat = max(float(v.max()) for v in az.rhat(idata).data_vars.values())
    flags = table.row("nuts")["flags"]
    assert ("R-hat" in flags) == (rhat > 1.01)
    n_div = int(idata.sample_stats["diverging"].sum())
    assert ("divergent" in flags) == (n_div > 0)


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def spy():
    """A scheme for every mixture that records its calls (removed afterwards)."""
    calls = []

    @register_scheme("spy", MixtureModel)
    def _spy(model, x, *, seed, level=1):
        calls.append(level)
        initialize(model, x, init="kmeans++", seed=seed, reg_covar=1e-6)
        return SchemeFit(model=model, loglik=model.score(x), estimate="start")

    yield calls
    del _SCHEMES["spy"]


class Plain(MixtureModel):
    """A family with neither a closed-form M-step nor a prior."""

    def _build(self, n_features, dtype):
        self.loc = PyroParam(torch.zeros(self.n_components, n_features, dtype=dtype))

    def _component_params(self):
        return {"loc": self.loc}

    def _component_dist(self, loc):
        return dist.Normal(loc, 1.0).to_event(1)


def test_bad_scheme_raises_before_fitting(spy, faithful):
    with pytest.raises(ValueError, match=r"unknown scheme\(s\) \['bogus'\]") as info:
        compare(GaussianMixture(2), faithful, ["spy", "bogus"])
    assert "'em', 'em-gradient', 'direct', 'map', 'mean-field', 'nuts', 'vb', 'spy'" in str(
        info.value
    )
    # a family with no closed form and no prior: those schemes do not fit it
    with pytest.raises(ValueError, match=r"\['em', 'nuts'\] do not fit Plain") as info:
        compare(Plain(2), faithful, ["spy", "em", "nuts"])
    assert "['em-gradient', 'direct', 'spy']" in str(info.value)
    # a model no scheme is registered for
    with pytest.raises(ValueError, match="no scheme is registered for GaussianHMM"):
        compare(GaussianHMM(2), faithful, ["nuts"])
    with pytest.raises(ValueError, match=r"\['nuts'\] do not fit VAE.*\['vae', 'vae-mc', 'iwae'\]"):
        compare(VAE(2, 1, hidden=(3,)), faithful, ["nuts"])
    assert spy == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"levle": 2}, r"option\(s\) \['levle'\] are taken by none of the schemes"),
        ({"options": {"nutz": {"num_samples": 5}}}, r"scheme\(s\) \['nutz'\], which are not"),
        ({"options": {"spy": {"num_samples": 5}}}, "'spy' takes no option"),
        ({"reference": "closed-form"}, "reference 'closed-form' is not a scheme"),
        ({"on_error": "ignore"}, "on_error must be one of"),
        ({"seed": 0.5}, "seed must be an integer"),
    ],
)
def test_bad_options_raise_before_fitting(spy, faithful, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare(GaussianMixture(2), faithful, ["spy"], **kwargs)
    assert spy == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prior": {"mean_scal": 1.0}}, r"unknown prior option\(s\) \['mean_scal'\]"),
        ({"num_samples": 0}, "num_samples must be a positive integer"),
        ({"num_chains": 1.5}, "num_chains must be a positive integer"),
        ({"potential": "jit"}, "potential must be one of"),
        ({"init": "best"}, "init must be one of"),
    ],
)
def test_bad_bayesian_options_raise_before_fitting(spy, faithful, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare(GaussianMixture(2), faithful, ["spy", "nuts"], **kwargs)
    assert spy == []


def test_bad_data_raises_before_fitting(spy):
    with pytest.raises(ValueError, match="contains NaN"):
        compare(GaussianMixture(2), [[0.0, float("nan")], [1.0, 2.0]], ["spy"])
    with pytest.raises(ValueError, match="x has 2 samples but the model has 3 components"):
        compare(GaussianMixture(3), [[0.0, 1.0], [1.0, 2.0]], ["spy", "em"])
    assert spy == []


def test_schemes_are_found_along_the_class_hierarchy(spy):
    """Registered for MixtureModel: every family gets it; ``applies`` narrows the rest;
    a scheme registered with ``default=False`` ("vb") runs only when named."""
    from elbolab.inference.compare.schemes import default_schemes_for

    assert schemes_for(BernoulliMixture(2)) == ALL + ["vb", "spy"]
    assert default_schemes_for(BernoulliMixture(2)) == ALL + ["spy"]
    assert schemes_for(Plain(2)) == ["em-gradient", "direct", "spy"]
    assert schemes_for(VAE(2, 1, hidden=(3,))) == ["vae", "vae-mc", "iwae"]
    assert schemes_for(GaussianHMM(2)) == []


def test_a_failing_scheme_is_a_flagged_row(faithful):
    @register_scheme("boom", GaussianMixture)
    def _boom(model, x, *, seed):
        raise RuntimeError("no luck")

    try:
        out = compare(GaussianMixture(2), faithful, ["em", "boom"])
        row = out.row("boom")
        assert math.isnan(row["loglik"]) and "failed: RuntimeError: no luck" in row["flags"]
        assert out.row("em")["flags"] == ""
        with pytest.raises(RuntimeError, match="no luck"):
            compare(GaussianMixture(2), faithful, ["boom"], on_error="raise")
    finally:
        del _SCHEMES["boom"]


def test_non_convergence_is_a_flag_not_a_warning(faithful):
    out = compare(GaussianMixture(2), faithful, ["em"], max_iter=2)
    assert out.row("em")["converged"] is False
    assert "not converged" in out.row("em")["flags"]


def test_seeded_and_leaves_the_callers_random_state(faithful):
    opts = {"svi_steps": 20, "elbo_particles": 5, "num_samples": 10}
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = compare(GaussianMixture(2), faithful, ["mean-field"], seed=3, **opts)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = compare(GaussianMixture(2), faithful, ["mean-field"], seed=3, **opts)
    assert a.row("mean-field")["bound"] == b.row("mean-field")["bound"]
    c = compare(GaussianMixture(2), faithful, ["mean-field"], seed=4, **opts)
    assert a.row("mean-field")["bound"] != c.row("mean-field")["bound"]


# ---------------------------------------------------------------------------- the program
def program_for(family: str, n: int = 40):
    x = sample_data(family, n)
    model = make_model(family)
    initialize(model, x, init="kmeans++", seed=0, reg_covar=1e-6)
    return BayesianMixture(model, x), model, x


@pytest.mark.parametrize("family", FAMILIES)
def test_vectorized_potential_is_pyros_enumerated_potential(family):
    """NUTS's fast potential equals the one Pyro builds from the program by enumerating z,
    in value and gradient, at the start and at a random point."""
    program, model, x = program_for(family)
    _, pyro_potential, transforms, _ = initialize_model(
        program, model_args=(x,), max_plate_nesting=1
    )
    mine = program.potential(x)
    start = {k: transforms[k](v) for k, v in program.prior.site_values(model).items()}
    g = torch.Generator().manual_seed(1)
    moved = {
        k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in start.items()
    }
    for point in (start, moved):
        a = {k: v.clone().requires_grad_() for k, v in point.items()}
        b = {k: v.clone().requires_grad_() for k, v in point.items()}
        ua, ub = pyro_potential(a), mine(b)
        assert float(ua.detach()) == pytest.approx(float(ub.detach()), rel=EXACT, abs=EXACT)
        ga = torch.autograd.grad(ua, list(a.values()))
        gb = torch.autograd.grad(ub, list(b.values()))
        for u, v in zip(ga, gb, strict=True):
            torch.testing.assert_close(u, v, rtol=EXACT, atol=EXACT)


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_potential_is_the_potential(family):
    """The recorded replay of U and its gradient gives the values of the function itself
    (the same operations on the same tensors: exact path, 1e-10) at the point it was
    recorded at and at others, and under no_grad its value; NUTS on it draws the chains
    of the function itself."""
    program, model, x = program_for(family)
    plain = program.potential(x)
    recorded = RecordedPotential(plain)
    transforms = program.transforms()
    start = {k: transforms[k].inv(v) for k, v in program.prior.site_values(model).items()}
    g = torch.Generator().manual_seed(2)
    points = [start] + [
        {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in start.items()}
        for _ in range(2)
    ]
    for point in points:
        a = {k: v.clone().requires_grad_() for k, v in point.items()}
        b = {k: v.clone().requires_grad_() for k, v in point.items()}
        ua, ub = plain(a), recorded(b)
        assert float(ub.detach()) == pytest.approx(float(ua.detach()), rel=EXACT, abs=EXACT)
        for u, v in zip(
            torch.autograd.grad(ua, list(a.values())),
            torch.autograd.grad(ub, list(b.values())),
            strict=True,
        ):
            torch.testing.assert_close(v, u, rtol=EXACT, atol=EXACT)
        with torch.no_grad():
            assert float(recorded(point)) == pytest.approx(float(ua.detach()), rel=EXACT)
    assert recorded.run not in (None, False)  # it was recorded, not run as it is
    starts = [program.prior.site_values(model)]
    opts = {"num_samples": 6, "warmup_steps": 6, "seed": 1, "parallel": False}
    a = sample_nuts(program, x, starts, potential="recorded", **opts)
    b = sample_nuts(program, x, starts, potential="vectorized", **opts)
    for k in program.sites:
        torch.testing.assert_close(a.draws[k], b.draws[k], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_log_likelihood_of_draws_is_the_models(family):
    """BayesianMixture.log_likelihood on a stack of draws = model.log_likelihood per draw."""
    program, model, x = program_for(family)
    truth = fitted_model(family)
    values = program.prior.site_values(truth)
    stacked = {k: torch.stack([v, v]).unsqueeze(0) for k, v in values.items()}  # (1, 2, ...)
    expected = truth.log_likelihood(x).detach()
    got = program.log_likelihood(stacked, x)
    assert got.shape == (1, 2, x.shape[0])
    torch.testing.assert_close(got[0, 1], expected, rtol=EXACT, atol=EXACT)
    # and model_params inverts site_values
    for k, v in program.prior.model_params(values).items():
        torch.testing.assert_close(v, getattr(truth, k + "_"), rtol=0, atol=1e-12)


def test_mean_field_loss_is_pyros_elbo(faithful):
    """With the same random state, the vectorised -ELBO/N equals TraceEnum_ELBO's."""
    model = GaussianMixture(2)
    initialize(model, faithful, init="kmeans++", seed=0, reg_covar=1e-6)
    program = BayesianMixture(model, faithful)
    start = program.prior.site_values(model)
    guide = AutoNormal(program.without_z(), init_loc_fn=init_to_value(values=start), init_scale=0.1)
    guide(faithful)
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = TraceEnum_ELBO(max_plate_nesting=1).loss(program, guide, faithful)
        torch.manual_seed(seed)
        got = mean_field_loss(program, guide, program.potential(faithful), faithful)
        assert float(got.detach()) * len(faithful) == pytest.approx(expected, rel=EXACT)


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_field_losses_are_pyros_elbo_per_draw(family):
    """The batched -ELBO/N: one draw with the same random state is Pyro's TraceEnum_ELBO
    (exact path, 1e-10); S draws at once are S single draws with S seeds; the vectorized
    final estimate and Pyro's agree within their standard errors (100 particles each)."""
    program, model, x = program_for(family)
    start = program.prior.site_values(model)
    guide = AutoNormal(program.without_z(), init_loc_fn=init_to_value(values=start), init_scale=0.1)
    guide(x)
    singles = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        expected = TraceEnum_ELBO(max_plate_nesting=1).loss(program, guide, x)
        torch.manual_seed(seed)
        got = mean_field_losses(program, guide, x, 1).detach()
        assert got.shape == (1,)
        assert float(got[0]) * len(x) == pytest.approx(expected, rel=EXACT)
        singles.append(float(got[0]))
    # per draw, a batch of S evaluates each draw as the single-draw path does
    torch.manual_seed(5)
    batch = mean_field_losses(program, guide, x, 4).detach()
    torch.manual_seed(5)
    draws = {}
    for name in program.sites:
        loc, scale = guide._get_loc_and_scale(name)
        draws[name] = torch.distributions.Normal(loc, scale).sample((4,))
    potential = program.potential(x)
    for s in range(4):
        u = {k: v[s] for k, v in draws.items()}
        log_q = sum(
            torch.distributions.Normal(*guide._get_loc_and_scale(k)).log_prob(u[k]).sum() for k in u
        )
        single = float((potential(u) + log_q).detach()) / len(x)
        assert float(batch[s]) == pytest.approx(single, rel=EXACT)
    torch.manual_seed(0)
    fast = elbo_estimate(program, guide, x, 100, "vectorized")
    torch.manual_seed(0)
    slow = elbo_estimate(program, guide, x, 100, "pyro")
    assert abs(fast[0] - slow[0]) < 5 * math.hypot(fast[1], slow[1])


def test_parallel_chains_make_the_sequential_draws():
    """NUTS chains run in processes side by side draw exactly what they draw in turn (each
    chain seeds itself), and a chain's error comes back as the same exception."""
    program, model, x = program_for("gaussian-full")
    starts = [program.prior.site_values(model)] * 2
    opts = {"num_samples": 8, "warmup_steps": 8, "seed": 3}
    apart = sample_nuts(program, x, starts, parallel=True, **opts)
    in_turn = sample_nuts(program, x, starts, parallel=False, **opts)
    for k in program.sites:
        assert torch.equal(apart.draws[k], in_turn.draws[k])
    assert apart.step_size == in_turn.step_size
    assert torch.equal(apart.diverging, in_turn.diverging)
    assert not torch.equal(apart.draws["means"][0], apart.draws["means"][1])

    def fails_in_chain_1(c):
        if c == 1:
            raise KeyError("chain one")
        return c

    with pytest.raises(KeyError, match="chain one"):
        run_chains(fails_in_chain_1, 2, parallel=True)
    assert run_chains(lambda c: c * c, 3, parallel=True) == [0, 1, 4]


# ---------------------------------------------------------------------------- other families
def test_bernoulli_and_poisson_mixtures():
    for model, family in ((BernoulliMixture(2), "bernoulli"), (PoissonMixture(2), "poisson")):
        x = sample_data(family, 300, K=2, D=6)
        out = compare(
            model,
            x,
            ["em", "map", "mean-field"],
            options={"mean-field": {"svi_steps": 400, "num_samples": 500}},
        )
        em, mf = out.row("em"), out.row("mean-field")
        assert abs(out.row("map")["loglik_vs_ref"]) < 1e-2
        assert mf["bound"] + 3 * mf["bound_se"] < em["loglik"]  # VI-MF, BASIC
        post = out.idata["mean-field"].posterior
        sd = {k: post[k].std(("chain", "draw")).values for k in out.fits["em"].params}
        assert z_scores(out.fits["mean-field"], out.fits["em"], sd) < 1.5


# ---------------------------------------------------------------------------- select_k
def test_select_k(faithful):
    out = select_k(
        lambda k: GaussianMixture(k),
        faithful,
        ks=[1, 2, 3],
        schemes=["em", "mean-field"],
        options={"mean-field": {"svi_steps": 150, "num_samples": 500}},
    )
    assert [(r["k"], r["scheme"]) for r in out] == [
        (k, s) for k in (1, 2, 3) for s in ("em", "mean-field")
    ]
    em = [r for r in out if r["scheme"] == "em"]
    for r in em:
        model = out.comparisons[r["k"]].models["em"]
        assert r["bic"] == pytest.approx(model.bic(faithful), abs=1e-9)
        assert r["aic"] == pytest.approx(model.aic(faithful), abs=1e-9)
        assert math.isnan(r["elpd_loo"])
    assert sorted(r["rank"] for r in em) == [1, 2, 3]
    mf = [r for r in out if r["scheme"] == "mean-field"]
    assert all(np.isfinite(r["elpd_loo"]) and np.isfinite(r["elpd_waic"]) for r in mf)
    assert math.isnan(mf[0]["bic"])
    assert sum(r["weight"] for r in mf) == pytest.approx(1.0, abs=1e-6)
    assert sorted(r["rank"] for r in mf) == [1, 2, 3]
    # two clusters: one component is far worse on every criterion
    assert out.best["bic (em)"] >= 2 and out.best["loo (mean-field)"] >= 2
    assert set(out.az_compare) == {"mean-field"}
    assert "best" in str(out) and len(out.to_pandas()) == 6


def test_select_k_bad_input(faithful):
    with pytest.raises(ValueError, match="every k must be a positive integer"):
        select_k(lambda k: GaussianMixture(k), faithful, ks=[0, 1])
    with pytest.raises(ValueError, match="repeated"):
        select_k(lambda k: GaussianMixture(k), faithful, ks=[1, 1])
    with pytest.raises(ValueError, match="unknown scheme"):
        select_k(lambda k: GaussianMixture(k), faithful, ks=[1, 2], schemes=["emm"])
    with pytest.raises(ValueError, match="ic must be"):
        select_k(lambda k: GaussianMixture(k), faithful, ic="bic")
