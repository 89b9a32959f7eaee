"""The recorded E-step and EM iteration: the same numbers as Pyro's eager run, recorded
afresh when what a recording depends on changes, and eager runs where a replay cannot go.

Tolerances: the replays run the very ATen operations of the eager run on the same
tensors, so tables and fits are compared to 1e-12 (float64; they are in fact equal), the
slack only for a different summation order if torch picked another kernel.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from pyro.nn import PyroParam
from sklearn.exceptions import ConvergenceWarning

import elbolab.guides.exact as exact
import elbolab.inference.em.recorded as recorded_module
import elbolab.models.enumeration as enumeration
from elbolab.guides import ExactPosterior
from elbolab.inference import EM, register_statistics
from elbolab.inference.em.mixture import GaussianStatistics
from elbolab.models import GaussianMixture, SingularCovarianceError
from elbolab.models.enumeration import (
    ReadsValue,
    RecordedJoint,
    deferred_checks,
    enumerate_joint,
    holds,
    record_ops,
    writes_constant,
)
from families import FAMILIES, ExponentialMixture, fitted_model, make_model, sample_data

TOL = 1e-12


@pytest.fixture(autouse=True)
def _record_early(monkeypatch):
    """EM records its iteration from the third (after two eager ones), as counted below,
    and every test starts with no recordings shared from another."""
    monkeypatch.setattr(recorded_module, "WARMUP", 2)
    monkeypatch.setattr(recorded_module, "_SHARED", {})
    monkeypatch.setattr(exact, "RECORD_AFTER", 2)


def _count_calls(monkeypatch, name: str, *modules) -> list:
    """Replace ``name`` in each of ``modules`` by a counting wrapper; the list of calls."""
    calls = []
    original = getattr(modules[0], name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for module in modules:
        monkeypatch.setattr(module, name, counted)
    return calls


def count_recordings(monkeypatch) -> list:
    return _count_calls(monkeypatch, "record_ops", recorded_module)


def eager_calls(monkeypatch) -> list:
    """Count the eager enumerations RecordedJoint makes (a replay makes none); the guide
    holds its own name for the function."""
    return _count_calls(monkeypatch, "enumerate_joint", enumeration, exact)


def assert_close(a, b, tol=TOL):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite)
    assert bool(((a - b).abs()[finite] <= tol * (1 + b.abs()[finite])).all()), (a - b).abs().max()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_table_equals_pyros_eager_table(family, weighted, monkeypatch):
    """Every family and covariance type: the replayed log p(x, z) is Pyro's, also after
    the parameters change in place (the graph reads the parameters themselves)."""
    model, x = fitted_model(family), sample_data(family, 60)
    w = torch.rand(60, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    args = (x, w) if weighted else (x,)
    recorded = RecordedJoint(record_after=1)
    with torch.no_grad():
        first = recorded(model, *args)  # eager (validated) and recorded
        calls = eager_calls(monkeypatch)
        again = recorded(model, *args)
        assert calls == [], "the second call must replay, not run Pyro"
        assert recorded.fallbacks == {}
        eager = enumerate_joint(model, *args)
        assert_close(first.log_joint, eager.log_joint)
        assert_close(again.log_joint, eager.log_joint)
        assert again.sites == eager.sites and again.cardinalities == eager.cardinalities
        if weighted:
            assert torch.equal(again.scales[0], eager.scales[0])
        for p in model.parameters():  # new values, same tensors: replayed, not recorded
            p.mul_(0.9)
        calls.clear()
        moved = recorded(model, *args)
        assert calls == [] and len(recorded.recordings) == 1
        assert_close(moved.log_joint, enumerate_joint(model, *args).log_joint)
        assert not torch.allclose(moved.log_joint, eager.log_joint)


def test_recording_waits_for_the_second_call_of_a_signature(monkeypatch):
    model, x = fitted_model("bernoulli"), sample_data("bernoulli", 30)
    recorded = RecordedJoint()  # record_after=2
    calls = eager_calls(monkeypatch)
    with torch.no_grad():
        recorded(model, x)
        assert recorded.recordings == {} and len(calls) == 1
        recorded(model, x)  # eager, and recorded
        assert len(recorded.recordings) == 1 and len(calls) == 3  # (the recording run too)
        recorded(model, x)
        assert len(calls) == 3


def test_a_new_parameter_object_shape_or_dtype_is_recorded_afresh():
    model, x = fitted_model("gaussian-full"), sample_data("gaussian-full", 40)
    recorded = RecordedJoint(record_after=1)
    with torch.no_grad():
        recorded(model, x)
        assert len(recorded.recordings) == 1
        # a new parameter object (same shape and dtype)
        model.means = PyroParam(model.means_.clone() + 0.25)
        assert_close(recorded(model, x).log_joint, enumerate_joint(model, x).log_joint)
        assert len(recorded.recordings) == 2
        # another shape of the same parameter object
        model.means_unconstrained.data = torch.zeros(3, 4, dtype=torch.float64)
        model.scale_tril_unconstrained.data = torch.zeros(3, 4, 4, dtype=torch.float64)
        x4 = torch.randn(40, 4, dtype=torch.float64)
        assert_close(recorded(model, x4).log_joint, enumerate_joint(model, x4).log_joint)
        assert len(recorded.recordings) == 3
        # another dtype (data and parameters)
        model32 = fitted_model("gaussian-full").to(torch.float32)
        x32 = x.to(torch.float32)
        out = recorded(model32, x32).log_joint
        assert out.dtype == torch.float32 and len(recorded.recordings) == 4
        assert_close(out, enumerate_joint(model32, x32).log_joint, 1e-6)
        # other data of another length
        assert_close(recorded(model, x4[:7]).log_joint, enumerate_joint(model, x4[:7]).log_joint)
        assert len(recorded.recordings) == 5


def test_the_guide_replays_its_twin_and_record_false_runs_pyro(monkeypatch):
    model, x = fitted_model("poisson"), sample_data("poisson", 50)
    guide = ExactPosterior(model).refresh(x).refresh(x)  # (recorded at the second)
    assert guide.replays(x) and not guide.replays(x[:10])
    calls = eager_calls(monkeypatch)
    guide.refresh(x)
    assert calls == [] and len(guide.recorded.recordings) == 1
    assert_close(guide.probs(x), model.predict_proba(x))
    eager = ExactPosterior(model, record=False)
    eager.refresh(x)
    eager.refresh(x)
    assert len(calls) == 2 and eager.recorded.recordings == {}


class ValueReadingMixture(ExponentialMixture):
    """A program whose structure depends on a value: it cannot be recorded."""

    def _component_dist(self, rates):
        if bool((rates > 0).all()):  # reads a value
            return super()._component_dist(rates)
        raise AssertionError  # pragma: no cover


def test_a_program_that_reads_a_value_runs_eagerly():
    model = ValueReadingMixture(2).build(3)
    x = torch.rand(30, 3, dtype=torch.float64)
    recorded = RecordedJoint(record_after=1)
    with torch.no_grad():
        recorded(model, x)
        out = recorded(model, x)
    (reason,) = recorded.fallbacks.values()
    assert "ReadsValue" in reason
    assert_close(out.log_joint, enumerate_joint(model, x).log_joint)


def test_record_ops_refuses_value_reads_and_holds_defers_checks():
    x = torch.ones(3)
    with pytest.raises(ReadsValue):
        record_ops(lambda t: (t * float(t.sum()),), (x,))
    assert holds(torch.tensor(True)) and not holds(torch.tensor(False))
    with deferred_checks() as flags:
        assert holds(torch.tensor(False))  # deferred: the usual path is taken
    assert len(flags) == 1 and not bool(flags[0])
    graph, outputs = record_ops(lambda t: (t * 2 + 1,), (x,))
    assert not writes_constant(graph)
    graph.compile()
    assert torch.equal(graph(torch.arange(3.0))[0], torch.tensor([1.0, 3.0, 5.0]))
    assert torch.equal(outputs[0], torch.full((3,), 3.0))
    # zeros filled in place: folded, they would keep every replay's writes
    filled, _ = record_ops(lambda t: (torch.zeros(3).add_(t),), (x,))
    assert writes_constant(filled)


def fit(family, record, x, w=None, model=None, **options):
    model = make_model(family) if model is None else model
    options = {"tol": 0.0, "max_iter": 12, "init": "random", "seed": 3, **options}
    em = EM(model, ExactPosterior(model, record=record), progress=False, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = em.fit(x, sample_weight=w)
    return em, model, result


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_em_iterations_equal_eager_ones(family, weighted):
    """The replayed iterations (M-step, bound, checks, E-step) give the fit of the eager
    loop: bounds, log-likelihoods and parameters, for every family and covariance type."""
    x = sample_data(family, 200)
    w = torch.rand(200, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    extra = {"w": w + 0.5} if weighted else {}
    em, model, result = fit(family, True, x=x, **extra)
    _, eager_model, eager = fit(family, False, x=x, **extra)
    assert em._recorded_step.replayed >= 12 - 3, em._recorded_step.fallbacks  # after warm-up
    assert_close(result.log_likelihoods, eager.log_likelihoods)
    assert_close(result.lower_bounds, eager.lower_bounds)
    for name, value in eager_model.state_dict().items():
        assert_close(model.state_dict()[name], value)
    # and the guide ends as the posterior at the returned parameters
    assert_close(em.guide.probs(x), eager_model.predict_proba(x))


@pytest.mark.parametrize("family", ["gaussian-full", "gaussian-diag", "poisson"])
def test_recorded_iterations_over_blocks_of_rows_equal_eager_ones(family):
    """9,000 rows: the log-densities and the sums are taken in blocks of 4,096 rows,
    the later blocks added in place; the replays add them as the eager loop does."""
    x = sample_data(family, 9_000)
    em, model, result = fit(family, True, x, max_iter=8)
    _, eager_model, eager = fit(family, False, x, max_iter=8)
    assert em._recorded_step.replayed == 8 - 3
    assert_close(result.lower_bounds, eager.lower_bounds)
    assert_close(result.log_likelihoods, eager.log_likelihoods)
    for name, value in eager_model.state_dict().items():
        assert_close(model.state_dict()[name], value)


def test_restarts_and_later_fits_replay_one_recording_with_their_own_parameters(monkeypatch):
    """One recording serves every start of n_init, and every later fit of a model of the
    same family and structure on data of the same shape (each binding its tensors)."""
    x = sample_data("gaussian-diag", 150)
    recordings = count_recordings(monkeypatch)
    em, model, result = fit("gaussian-diag", True, x, n_init=3, max_iter=8)
    # (the last start replays from its first iteration: the first start recorded it)
    assert len(recordings) == 1 and em._recorded_step.replayed == 8
    _, eager_model, eager = fit("gaussian-diag", False, x, n_init=3, max_iter=8)
    assert result.init_lower_bounds == pytest.approx(eager.init_lower_bounds, rel=TOL)
    assert_close(model.means_, eager_model.means_)
    other = x.flip(0) + 0.5  # other data, same shape: the same recording
    em, model, result = fit("gaussian-diag", True, other, seed=7)
    assert len(recordings) == 1 and em._recorded_step.replayed == 12
    _, eager_model, eager = fit("gaussian-diag", False, other, seed=7)
    assert_close(result.lower_bounds, eager.lower_bounds)
    assert_close(model.scales_, eager_model.scales_)
    fit("gaussian-diag", True, x[:100], max_iter=5)  # another shape: recorded afresh
    assert len(recordings) == 2


class CountingGaussian(GaussianMixture):
    """Counts its M-steps in a buffer; from the 8th on its scatter is zero (singular)."""

    def _build(self, n_features, dtype):
        super()._build(n_features, dtype)
        self.register_buffer("m_steps", torch.zeros((), dtype=dtype))


@register_statistics(CountingGaussian)
class CountingStatistics(GaussianStatistics):
    recordable = True
    scale_free = False  # (the plain m_step, then expected_log_lik)

    def m_step(self, model, stats, nk, reg_covar):
        model.m_steps.add_(1)  # a tensor operation: replayed as it runs
        keep = (model.m_steps < 8).to(stats["s2"].dtype)
        collapsed = {**stats, "s1": stats["s1"] * keep, "s2": stats["s2"] * keep}
        super().m_step(model, collapsed, nk, reg_covar)


def test_a_failed_check_in_a_replay_raises_the_eager_error_and_restores():
    """A covariance that becomes singular after the recording (the 8th M-step: two at
    the start, the recording at iteration 3): the replay's check fails, the parameters
    are put back, the iteration runs eagerly and raises what the eager loop raises."""
    x = sample_data("gaussian-full", 120)
    errors = {}
    for record in (True, False):
        model = CountingGaussian(3)
        em = EM(
            model,
            ExactPosterior(model, record=record),
            tol=0.0,
            max_iter=20,
            reg_covar=0.0,
            init="random",
            seed=3,
            progress=False,
        )
        with pytest.raises(SingularCovarianceError) as caught:
            em.fit(x)
        errors[record] = str(caught.value)
        assert not model.is_built  # nothing half-fitted is left behind
        if record:  # iterations 4 and 5 replayed, 6 failed in its replay and ran eagerly
            assert em._recorded_step.replayed == 2
            assert float(em.guide.twin.m_steps) == 7  # theta_t, put back after the replay
    assert errors[True] == errors[False]
