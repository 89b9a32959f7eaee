"""The compiled ELBO: the same loss, gradients and random draws as Pyro's, recorded once.

``CompiledELBO`` replays the ATen ops of Pyro's own surrogate loss, with constants folded
and exact identities (``a * 1``, ``a - 0``, same-shape ``expand``) removed. The ops that
remain are those Pyro runs, in the same order, on the same random draws, so values and
gradients are compared at 1e-12 relative in float64: the rounding of a handful of ops,
far below any modelling difference, and far above nothing (a wrong op or draw order
moves them by 1e-3 or more).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from torch import nn

from elbolab.guides import AmortizedNormal
from elbolab.inference import CompiledELBO, SVITrainer, TracingFailed, is_compilable
from elbolab.inference.svi import Term
from elbolab.inference.svi.graph_passes import (
    drop_identities,
    fold_constants,
    fold_negations,
    fresh_outputs,
    lift_attributes,
    simplify,
)
from elbolab.models import VAE
from elbolab.models.vae import LogitBinomial

RTOL = 1e-12  # float64; same ops in the same order, so only rounding can differ


def pair(likelihood: str = "binomial", scale: str = "learned", seed: int = 0):
    torch.manual_seed(seed)
    count = 16 if likelihood == "binomial" else None
    model = VAE(6, 2, hidden=(5,), likelihood=likelihood, count=count).double()
    guide = AmortizedNormal(6, 2, hidden=(4,), scale=scale).double()
    return model, guide


def data(likelihood: str, n: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if likelihood == "binomial":
        return torch.randint(0, 17, (n, 6), generator=g).double()
    if likelihood == "bernoulli":
        return torch.randint(0, 2, (n, 6), generator=g).double()
    return torch.randn(n, 6, generator=g, dtype=torch.float64)


def loss_and_grads(fn, params, x, seed: int = 5):
    pyro.set_rng_seed(seed)
    loss = fn(x)
    return loss.detach(), torch.autograd.grad(loss, params)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= RTOL * scale, (a, b)


@pytest.mark.parametrize(
    "elbo",
    [TraceMeanField_ELBO(), Trace_ELBO(), Trace_ELBO(num_particles=3)],
    ids=["mean-field", "trace", "trace-3-particles"],
)
@pytest.mark.parametrize(
    "likelihood,scale",
    [
        ("gaussian-unit", "unit"),
        ("gaussian", "learned"),
        ("bernoulli", "learned"),
        ("binomial", "learned"),
    ],
)
def test_compiled_loss_and_gradients_equal_pyros(elbo, likelihood, scale):
    """Loss and every parameter gradient equal the eager ELBO's for the same seed."""
    model, guide = pair(likelihood, scale)
    x = data(likelihood)
    params = [*model.parameters(), *guide.parameters()]
    compiled = CompiledELBO(elbo, model, guide)
    with pyro.validation_enabled(False):
        loss, grads = loss_and_grads(compiled, params, x)
        ref_loss, ref_grads = loss_and_grads(elbo(model, guide), params, x)
    assert len(compiled.graphs) == 1 and None not in compiled.graphs.values()
    assert_close(loss, ref_loss)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert_close(g, ref)


@pytest.mark.parametrize(
    "elbo", [TraceMeanField_ELBO(), Trace_ELBO(num_particles=2)], ids=["mean-field", "trace-2"]
)
@pytest.mark.parametrize(
    "likelihood,scale",
    [("gaussian-unit", "unit"), ("gaussian", "learned"), ("binomial", "learned")],
)
def test_loss_and_grads_equals_scaled_backward(elbo, likelihood, scale):
    """One recorded graph of forward and backward ops gives what autograd gives for
    (scale * loss).backward(), and adds to gradients already there."""
    model, guide = pair(likelihood, scale)
    x = data(likelihood)
    compiled = CompiledELBO(elbo, model, guide)
    params = list(compiled.parameters())
    with pyro.validation_enabled(False):
        pyro.set_rng_seed(5)
        ref = elbo(model, guide)(x) * 0.25
        ref.backward()
        ref_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        pyro.set_rng_seed(5)
        loss = compiled.loss_and_grads(x, scale=0.25)
        assert loss == pytest.approx(float(ref.detach()), rel=RTOL)
        for p, g in zip(params, ref_grads, strict=True):
            assert_close(p.grad, g)
        pyro.set_rng_seed(5)
        compiled.loss_and_grads(x, scale=0.25)  # replayed: accumulates
        for p, g in zip(params, ref_grads, strict=True):
            assert_close(p.grad, 2 * g)
    assert len(compiled.graphs) == 1


class DecoderPenalty:
    """A differentiable scalar of the model's parameters that is not an ELBO (a Term's loss)."""

    def __init__(self, model: VAE) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(x[:, :2]).square().mean()


def test_sum_loss_and_grads_is_one_graph_of_scaled_terms():
    """Two ELBO batches and a non-ELBO loss, summed with their scales, recorded as one
    graph: each term's value and the gradient of the sum equal what autograd gives for
    the eager terms in the same order (the draws made in that order), replays accumulate,
    and a second call with the same shapes and scales records nothing new."""
    model, guide = pair("binomial", "learned")
    decoder_penalty = DecoderPenalty(model)
    x_a, x_b = data("binomial", n=9), data("binomial", n=4, seed=2)
    elbo = TraceMeanField_ELBO()
    compiled = CompiledELBO(elbo, model, guide)
    params = list(compiled.parameters())
    terms = [Term((x_a,), 0.5), Term((x_b,), 0.125), Term((x_b,), 3.0, decoder_penalty)]
    with pyro.validation_enabled(False):
        pyro.set_rng_seed(5)
        scaled = [elbo(model, guide)(x_a) * 0.5, elbo(model, guide)(x_b) * 0.125]
        scaled.append(decoder_penalty(x_b) * 3.0)
        sum(scaled).backward()
        ref_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        for calls in (1, 2):
            pyro.set_rng_seed(5)
            losses = compiled.sum_loss_and_grads(terms)
            for loss, ref in zip(losses, scaled, strict=True):
                assert loss == pytest.approx(float(ref.detach()), rel=RTOL)
            for p, g in zip(params, ref_grads, strict=True):
                assert_close(p.grad, calls * g)
    assert len(compiled.graphs) == 1 and None not in compiled.graphs.values()


@pytest.mark.parametrize("elbo", [TraceMeanField_ELBO(), Trace_ELBO()], ids=["mean-field", "trace"])
def test_replays_traced_into_torchscript_give_autograds_values(elbo):
    """From its TRACE_AFTER-th call a loss-and-gradient graph runs as TorchScript: every
    call before and after gives autograd's loss and gradients for the same seed (1e-12),
    and tracing, which runs the graph once, consumes no random draw."""
    from elbolab.inference.svi import compiled as compiled_module

    model, guide = pair("binomial", "learned")
    x = data("binomial")
    compiled = CompiledELBO(elbo, model, guide)
    params = list(compiled.parameters())
    with pyro.validation_enabled(False):
        for call in range(compiled_module.TRACE_AFTER + 2):
            pyro.set_rng_seed(call)
            ref = elbo(model, guide)(x) * 0.5
            ref_grads = torch.autograd.grad(ref, params)
            for p in params:
                p.grad = None
            pyro.set_rng_seed(call)
            loss = compiled.loss_and_grads(x, scale=0.5)
            after = torch.randn(())  # the next draw: the same as eager's only if none was used
            pyro.set_rng_seed(call)
            elbo(model, guide)(x)
            assert float(after) == float(torch.randn(()))
            assert loss == pytest.approx(float(ref.detach()), rel=RTOL)
            for p, g in zip(params, ref_grads, strict=True):
                assert_close(p.grad, g)
    (replay,) = compiled._replays.values()
    assert isinstance(replay.forward.func, torch.jit.ScriptModule)


def test_tracing_draws_nothing_and_replays_fresh_draws():
    """Recording runs the program once under a forked RNG; every replay draws anew."""
    model, guide = pair("gaussian-unit", "unit")
    x = data("gaussian-unit")
    compiled = CompiledELBO(Trace_ELBO(), model, guide)
    eager = Trace_ELBO()(model, guide)
    with pyro.validation_enabled(False), torch.no_grad():
        pyro.set_rng_seed(7)
        first, second = compiled(x), compiled(x)  # the first call records, then replays
        state = torch.get_rng_state()
        pyro.set_rng_seed(7)
        ref_first, ref_second = eager(x), eager(x)
        assert torch.equal(state, torch.get_rng_state())
    assert_close(first, ref_first)
    assert_close(second, ref_second)
    assert float(first) != float(second)  # a new z each call (Trace_ELBO has no analytic KL)


def test_one_graph_per_shape_and_grad_mode_and_parameter_updates_are_seen():
    model, guide = pair()
    compiled = CompiledELBO(TraceMeanField_ELBO(), model, guide)
    eager = TraceMeanField_ELBO()(model, guide)
    x = data("binomial", n=12)
    optimizer = torch.optim.Adam(compiled.parameters(), lr=0.1)
    with pyro.validation_enabled(False):
        for _ in range(3):  # in-place updates of the same parameter objects
            optimizer.zero_grad()
            compiled(x).backward()
            optimizer.step()
        assert len(compiled.graphs) == 1
        compiled(x[:5])
        with torch.no_grad():
            compiled(x)
        assert len(compiled.graphs) == 3
        pyro.set_rng_seed(0)
        after = compiled(x)
        pyro.set_rng_seed(0)
        assert_close(after.detach(), eager(x).detach())


def test_replaced_networks_and_dtype_changes_are_recorded_again():
    """The key holds the identity of every parameter: a new decoder means a new graph."""
    model, guide = pair("gaussian-unit", "unit")
    compiled = CompiledELBO(TraceMeanField_ELBO(), model, guide)
    x = data("gaussian-unit")
    with pyro.validation_enabled(False), torch.no_grad():
        compiled(x)
        model.decoder = nn.Sequential(nn.Linear(2, 6)).double()
        pyro.set_rng_seed(3)
        replaced = compiled(x)
        pyro.set_rng_seed(3)
        expected = TraceMeanField_ELBO()(model, guide)(x)
        assert len(compiled.graphs) == 2
        assert_close(replaced, expected)
        model.float(), guide.float()
        assert compiled(x.float()).dtype == torch.float32
    assert len(compiled.graphs) == 3


def test_frozen_parameters_and_eval_submodules_are_recorded_again():
    """Freezing the decoder after a step: its gradients stay None (not the recorded
    ones); switching a submodule to eval mode records a new graph."""
    model, guide = pair()
    compiled = CompiledELBO(TraceMeanField_ELBO(), model, guide)
    x = data("binomial")
    with pyro.validation_enabled(False):
        compiled.loss_and_grads(x)
        model.decoder.requires_grad_(False)
        for p in compiled.parameters():
            p.grad = None
        compiled.loss_and_grads(x)
        assert all(p.grad is None for p in model.decoder.parameters())
        assert all(p.grad is not None for p in guide.encoder.parameters())
        guide.encoder.eval()
        compiled.loss_and_grads(x)
    assert len(compiled.graphs) == 3


def test_validation_and_enclosing_handlers_run_eagerly():
    """Pyro's checks read values (not recordable), and an outer handler changes the
    program: both run through Pyro as usual, with the same result."""
    model, guide = pair("gaussian-unit", "unit")
    compiled = CompiledELBO(TraceMeanField_ELBO(), model, guide)
    x = data("gaussian-unit")
    with torch.no_grad():
        with pyro.validation_enabled(True):
            compiled(x)
        with pyro.validation_enabled(False), poutine.scale(scale=0.5):
            pyro.set_rng_seed(0)
            halved = compiled(x)
        with pyro.validation_enabled(False):
            pyro.set_rng_seed(0)
            full = compiled(x)
    assert len(compiled.graphs) == 1  # only the last, unvalidated and unwrapped call
    assert_close(halved, 0.5 * full)


class BranchingModel(nn.Module):
    """A program whose structure depends on a data value: it cannot be recorded."""

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(()), 1.0))
            loc = z if float(x.sum()) > 0 else -z
            pyro.sample("x", dist.Normal(loc.unsqueeze(-1), 1.0).to_event(1), obs=x)


class BranchingGuide(nn.Module):
    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc, 1.0))


def test_value_dependent_programs_fall_back_or_raise_when_strict():
    model, guide, x = BranchingModel(), BranchingGuide(), torch.ones(4, 3)
    compiled = CompiledELBO(TraceMeanField_ELBO(), model, guide)
    with pyro.validation_enabled(False):
        pyro.set_rng_seed(0)
        loss = compiled(x)
        pyro.set_rng_seed(0)
        assert_close(loss.detach(), TraceMeanField_ELBO()(model, guide)(x).detach())
        assert list(compiled.graphs.values()) == [None]
        (reason,) = compiled.fallbacks.values()
        assert "_local_scalar_dense" in reason  # float(x.sum()): a value read while recording
        strict = CompiledELBO(TraceMeanField_ELBO(), model, guide, strict=True)
        with pytest.raises(TracingFailed, match="must not branch on tensor values"):
            strict(x)


def test_which_elbos_are_compiled():
    """Trace_ELBO, TraceMeanField_ELBO and TraceEnum_ELBO are recorded (the last is checked
    on a model with an enumerated site in tests/test_semi_supervised.py); subclasses that
    bring their own machinery, like Pyro's JIT variants, run as they are."""
    model, guide = pair("gaussian-unit", "unit")
    assert is_compilable(Trace_ELBO()) and is_compilable(TraceMeanField_ELBO())
    assert is_compilable(TraceEnum_ELBO()) and not is_compilable(JitTrace_ELBO())
    trainer = SVITrainer(model, guide, loss=JitTrace_ELBO(), progress=False)
    assert not isinstance(trainer.elbo, CompiledELBO)
    assert isinstance(SVITrainer(model, guide, progress=False).elbo, CompiledELBO)
    assert not isinstance(
        SVITrainer(model, guide, compile=False, progress=False).elbo, CompiledELBO
    )


def test_trainer_compiled_and_eager_runs_are_the_same_run():
    """Seeded fits with and without compiling: equal bounds and parameters (float64)."""
    x = data("binomial", n=40)
    runs = []
    for compile_ in (True, False):
        model, guide = pair(seed=2)
        trainer = SVITrainer(
            model, guide, lr=1e-2, batch_size=16, seed=0, progress=False, compile=compile_
        )
        result = trainer.fit(x, epochs=3, x_val=x[:10])
        params = torch.cat([p.detach().flatten() for p in trainer.elbo.parameters()])
        runs.append((result.train_bounds, result.val_bounds, params))
        if compile_:  # full batch, last batch of 8, validation under no_grad
            assert len(trainer.elbo.graphs) == 3
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1], strict=True):
        assert a == pytest.approx(b, rel=RTOL)
    assert_close(runs[0][2], runs[1][2])
    assert len(pyro.get_param_store()) == 0  # parameters stayed module-local


@pytest.mark.parametrize(
    "count,lead",
    [(16, ()), (16, (3,)), ("per-row", (3,))],
    ids=["scalar", "scalar-enumerated", "per-row-enumerated"],
)
def test_logit_binomial_log_prob_equals_pyros_binomial(count, lead):
    """log(1 + e^l) as logaddexp(l, 0), log C(n, k) before broadcasting: Pyro's Binomial
    value, shape and gradient, to rounding -- with a scalar count, with logits that carry
    an enumeration dimension k lacks (M2's (C, N, n) against (N, n)), and with one count
    per row (a tensor, not a broadcast scalar)."""
    logits = (torch.randn(*lead, 40, 6, dtype=torch.float64) * 25).requires_grad_()
    logits.data[..., 0, :] = 0.0  # softplus's kink: gradient 1/2 in both
    k = torch.randint(0, 17, (40, 6)).double()
    if count == "per-row":
        count = torch.randint(16, 30, (40, 1)).double()
    ours = LogitBinomial(count, logits=logits).log_prob(k)
    ref = dist.Binomial(count, logits=logits).log_prob(k)
    assert ours.shape == ref.shape == (*lead, 40, 6)
    assert_close(ours.detach(), ref.detach())
    (g,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert_close(g, g_ref)
    with pytest.raises(ValueError):  # the parent's support check still applies
        LogitBinomial(count, logits=logits, validate_args=True).log_prob(k + 40)


# ----------------------------------------------------------------------------- passes
def record(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn)(*args)


def ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_fold_constants_folds_literals_and_shapes_but_not_parameters_or_draws():
    weight = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def fn(x):
        ones = torch.ones_like(x)  # depends on x's shape only
        scale = torch.tensor(2.0, dtype=torch.float64).log() * ones
        return (x * weight + torch.randn_like(x)) * scale

    x = torch.randn(4, 3, dtype=torch.float64)
    gm = record(fn, x)
    before = ops(gm)
    assert fold_constants(gm) == 1  # the product log(2) * ones, used by the last mul
    gm.recompile()
    after = ops(gm)
    assert "aten.log.default" in before and "aten.log.default" not in after
    assert "aten.ones_like.default" not in after
    assert "aten.randn_like.default" in after and "aten.mul.Tensor" in after
    torch.manual_seed(0)
    got = gm(x)
    torch.manual_seed(0)
    assert torch.equal(got, fn(x))


def test_drop_identities_removes_exact_no_ops_only():
    def fn(x, y):
        ones, zeros = torch.ones(3, dtype=x.dtype), torch.zeros(3, dtype=x.dtype)
        a = (x * ones) / 1.0 - zeros  # all three are x exactly
        b = (a + 0.0).expand(4, 3) ** 1
        c = x.expand(2, 4, 3)  # a real broadcast: kept
        return b * y, c

    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    gm = record(fn, x, y)
    fold_constants(gm)
    assert drop_identities(gm) == 6
    gm.recompile()
    assert sorted(ops(gm)) == ["aten.expand.default", "aten.mul.Tensor"]
    for got, want in zip(gm(x, y), fn(x, y), strict=True):
        assert torch.equal(got, want)


def test_drop_identities_leaves_graphs_that_write_into_copies_alone():
    def fn(x):
        y = x + 0.0  # a copy: replacing it by x would make the write below touch x
        y.mul_(2.0)
        return y + x

    x = torch.randn(3, dtype=torch.float64)
    gm = record(fn, x)
    assert ops(gm).count("aten.add.Tensor") == 2
    assert drop_identities(gm) == 0
    simplify(gm)
    assert ops(gm).count("aten.add.Tensor") == 2
    assert torch.equal(gm(x.clone()), fn(x.clone()))


def test_fold_negations_only_for_powers_of_two():
    """-(a) / 2 is a * -0.5 exactly; -(a) / 3 is not a * (-1/3), so it stays."""

    def fn(x):
        two, three = torch.full((4, 3), 2.0, dtype=x.dtype), torch.full((4, 3), 3.0, dtype=x.dtype)
        return -(x * x) / two, -(x + 1) / three, -(x - 1) * 0.25

    x = torch.randn(4, 3, dtype=torch.float64)
    gm = record(fn, x)
    fold_constants(gm)
    assert fold_negations(gm) == 2
    gm.recompile()
    assert ops(gm).count("aten.neg.default") == 1  # the one divided by three
    for got, want in zip(gm(x), fn(x), strict=True):
        assert torch.equal(got, want)


def test_lift_attributes_passes_the_very_parameters_as_inputs():
    """After lifting, the graph reads its parameters from leading inputs: the same
    objects, so an in-place update is seen without recording again."""
    import functools

    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    gm = record(lambda x: layer(x).sum(), x)
    values = lift_attributes(gm)
    assert {id(v) for v in values} == {id(layer.weight), id(layer.bias)}
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]
    replay = functools.partial(gm.forward, *values)
    assert torch.equal(replay(x), layer(x).sum())
    with torch.no_grad():
        layer.weight.mul_(2.0)
    assert torch.equal(replay(x), layer(x).sum())


def test_fresh_outputs_tells_new_memory_from_views_of_inputs():
    """A gradient that is a view of an input must be copied before being accumulated into."""
    weight = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def fn(x):
        return x * weight, x.t(), weight.detach(), x.sum()

    gm = record(fn, torch.randn(3, 3, dtype=torch.float64))
    assert fresh_outputs(gm) == (True, False, False, True)
