"""Pyro's ELBO, recorded once per batch shape as a graph of torch ops (the fast SVI path).

Each call of a Pyro ELBO runs the model and the guide under Pyro's effect handlers: it
builds two traces, walks plates and messengers, broadcasts and scales every site, looks
up the analytic KL, and only then reaches the few tensor ops that make up the loss. For
a small VAE that bookkeeping costs more than the networks (about 1 ms per step on 2 CPU
cores). Like Pyro's ``JitTrace_ELBO``, ``CompiledELBO`` records the ops once per batch
shape and replays them; unlike it, parameters stay module-local (the recorded graph
holds the very ``nn.Parameter`` objects of the model and the guide, never the global
param store), and the graph is a plain ``torch.fx`` program of ATen ops
(``make_fx``), simplified by ``graph_passes.simplify``.

Two recordings:

``module(*args)``
    the loss, replayed under ordinary autograd (``.backward()`` works as usual);
``module.loss_and_grads(*args, scale=s)``
    the loss *and* its gradients, one graph of forward and backward ops (autograd run
    once, while recording), traced into TorchScript once it has been replayed a few
    times (``torch.jit.trace``, the same ops in the same order, run by TorchScript's
    interpreter instead of the graph's Python code); the replay skips autograd's
    per-op bookkeeping, and adds the gradients to ``.grad`` -- what ``SVITrainer.step``
    calls;
``module.sum_loss_and_grads([Term(args, s), ...])``
    the same for a sum of scaled terms -- ELBOs on several batches, and other losses of
    the same parameters -- as one graph: M2's step (an unlabelled batch, a labelled one
    and the classifier term of M2-J) replays once.

The loss is exactly Pyro's: the recorded ops are those of the ELBO's own
``_differentiable_loss_particle`` (the surrogate whose gradient is the ELBO gradient),
averaged over ``num_particles`` as Pyro does; random draws are fresh on every call and
come from torch's global generator in the same order as Pyro's, so a seeded run gives
the same numbers compiled or not, to rounding (checked in ``tests/test_compiled.py``).

What a graph cannot see, it does not record: a program whose *structure* depends on the
data's values (``if x.sum() > 0``) cannot be traced; tracing fails, and the call runs
eagerly instead (``fallbacks`` says why). The cache key is everything else a program
may depend on: argument shapes, dtypes and devices, grad mode, every submodule's
train/eval mode, and every parameter's and buffer's identity, dtype, device and
``requires_grad``. Pyro's validation checks data-dependent
conditions, so with validation enabled every call runs eagerly (``SVITrainer`` checks
the first step of each fit and compiles the rest); so do calls made inside other Pyro
handlers (e.g. a KL warm-up's site scale).

Module state. The recorded graph replays *tensor operations only*; whatever else the
model's or the guide's ``forward`` does in Python (incrementing a call counter,
appending to a list, reading a flag) happens once per recording, not once per call.
Programs whose forward pass has such side effects should be run with ``compile=False``
(or keep that state in tensors they do not change in the forward pass). What can be
detected is detected: a forward pass that changes a buffer (in place, like
``BatchNorm`` in training mode updating its running statistics and
``num_batches_tracked``, or by assigning a new tensor) is found by comparing every
buffer before and after the recording; the recording's change is undone, and calls
with that key run eagerly, with the reason in ``fallbacks``. So compiled and eager
training leave the same buffers (checked in ``tests/test_svi_reliability.py``). In eval
mode such modules do not change their buffers and are compiled as usual.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from itertools import chain
from typing import NamedTuple

import pyro
import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer.traceenum_elbo import _compute_dice_elbo
from pyro.poutine.runtime import am_i_wrapped
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode

from ...models.enumeration import as_torchscript
from .graph_passes import fresh_outputs, lift_attributes, simplify
from .iwae import ImportanceWeightedELBO

# ELBOs whose loss is the mean over particles of ``_differentiable_loss_particle``;
# TraceEnum_ELBO, whose particle is ``_compute_dice_elbo`` (discrete guide sites summed);
# and the importance-weighted bound, whose loss is its own ``differentiable_loss``
COMPILABLE = (
    pyro.infer.Trace_ELBO,
    pyro.infer.TraceMeanField_ELBO,
    pyro.infer.TraceEnum_ELBO,
    ImportanceWeightedELBO,
)
MAX_GRAPHS = 16  # batch shapes x grad modes per module; further shapes run eagerly
TRACE_AFTER = 8  # a loss-and-gradient graph runs as TorchScript from this call on


class TracingFailed(RuntimeError):
    """The ELBO could not be traced (``CompiledELBO(strict=True)``)."""


def is_compilable(elbo: pyro.infer.ELBO) -> bool:
    """Whether ``CompiledELBO`` can trace this ELBO: ``Trace_ELBO``, ``TraceMeanField_ELBO``,
    ``TraceEnum_ELBO`` or :class:`~elbolab.inference.ImportanceWeightedELBO`.

    Subclasses (Pyro's own JIT variants among them) bring their own machinery and are
    run eagerly.
    """
    return type(elbo) in COMPILABLE


def _module_state(module: torch.nn.Module) -> tuple:
    """What a recorded graph of ``module`` depends on besides the values of its tensors.

    For every submodule its train/eval flag, and for every parameter and buffer slot its
    identity, dtype, device and whether it requires grad (``None`` slots kept). A plain
    walk of ``_parameters``/``_buffers``/``_modules``: ``named_parameters()`` costs about
    100 microseconds per call on a small VAE, as much as its forward pass.
    """
    state, stack = [], [module]
    while stack:
        m = stack.pop()
        state.append(m.training)
        for t in chain(m._parameters.values(), m._buffers.values()):
            state.append(None if t is None else (id(t), t.dtype, t.device, t.requires_grad))
        stack.extend(m._modules.values())
    return tuple(state)


class _Buffer(NamedTuple):
    name: str  # "model.decoder.1.running_mean"
    module: torch.nn.Module
    key: str  # its name in module._buffers
    tensor: torch.Tensor
    version: int
    value: torch.Tensor  # a copy of its values


def _snapshot_buffers(model: torch.nn.Module, guide: torch.nn.Module) -> list[_Buffer]:
    """Every buffer of ``model`` and ``guide``: its object, version counter and values."""
    out = []
    for prefix, root in (("model", model), ("guide", guide)):
        for path, m in root.named_modules():
            for key, t in m._buffers.items():
                if t is not None:
                    name = ".".join(p for p in (prefix, path, key) if p)
                    out.append(_Buffer(name, m, key, t, t._version, t.detach().clone()))
    return out


def _restore_buffers(buffers: list[_Buffer]) -> list[str]:
    """Put every buffer back as snapshotted; returns the names of those that had changed.

    A buffer changed if its module holds another tensor now, or its version counter moved
    (an in-place write), or its values differ.
    """
    changed = []
    with torch.no_grad():
        for b in buffers:
            now = b.module._buffers.get(b.key)
            moved = now is not b.tensor or b.tensor._version != b.version
            if b.tensor.shape != b.value.shape:
                b.tensor.data = b.value
                moved = True
            elif not torch.equal(b.tensor, b.value):
                b.tensor.copy_(b.value)
                moved = True
            b.module._buffers[b.key] = b.tensor
            if moved:
                changed.append(b.name)
    return changed


class _PyroValueReads(TorchFunctionMode):
    """While tracing, the two values Pyro's ELBOs read into Python are answered without reading.

    - ``.item()`` of the loss value gives NaN: ``_differentiable_loss_particle`` returns
      ``(float loss, surrogate tensor)``, and only the surrogate is recorded;
    - ``mask.all()`` in ``Dice.compute_expectation`` (whether every enumerated value has
      positive probability) is True: the recorded graph weights each value's cost by its
      probability without dropping the zero ones, which is the same sum unless a value of
      probability 0 has an infinite cost. That case makes the replayed loss non-finite, and
      :meth:`CompiledELBO.loss_and_grads` then reruns the step through Pyro, which drops it.

    Any other read (a value read by user code) is left alone, so tracing fails and the
    call runs eagerly.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.item or func is torch.Tensor.all:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("pyro.infer."):
                return float("nan") if func is torch.Tensor.item else True
        return func(*args, **(kwargs or {}))


def _with_elbo_value(surrogate: torch.Tensor, model_trace, guide_trace) -> torch.Tensor:
    """Trace_ELBO's surrogate with the value of -ELBO, where a guide site is not reparametrised.

    A score-function term (a discrete y sampled, not enumerated) makes the surrogate's value
    differ from the loss; Pyro adds ``loss - surrogate`` as a Python float, which a recording
    cannot read (``_PyroValueReads``). Here the same correction is a detached tensor:
    -ELBO = -(sum_model log p - sum_guide log q) (BASIC), the gradient still the surrogate's.
    """
    sites = [s for s in guide_trace.nodes.values() if s["type"] == "sample"]
    if all(is_identically_zero(s["score_parts"].score_function) for s in sites):
        return surrogate  # fully reparametrised: the surrogate's value is the loss
    elbo = sum(s["log_prob_sum"] for s in model_trace.nodes.values() if s["type"] == "sample")
    elbo = elbo - sum(s["log_prob_sum"] for s in sites)
    return surrogate + (-elbo - surrogate).detach()


class Term(NamedTuple):
    """One summand of :meth:`CompiledELBO.sum_loss_and_grads`: ``scale`` times a loss of ``args``.

    ``loss`` None: the ELBO's loss (the negative ELBO surrogate) on ``args``. Otherwise a
    callable returning a differentiable scalar of the model's and the guide's parameters
    (a classifier's negative log-likelihood, say), which must be hashable and keep its
    meaning (a bound method, a module-level function): it is part of the cache key, and
    tensors it reads other than those parameters and ``args`` are recorded as constants.
    """

    args: tuple
    scale: float = 1.0
    loss: Callable[..., torch.Tensor] | None = None


def eager_sum_loss_and_grads(
    elbo: Callable[..., torch.Tensor], terms: Sequence[Term]
) -> list[float]:
    """:meth:`CompiledELBO.sum_loss_and_grads` through autograd: ``elbo(*args)`` for the
    terms without a ``loss``; one backward pass of the sum, none if a term is non-finite."""
    scaled = [(elbo if t.loss is None else t.loss)(*t.args) * t.scale for t in terms]
    losses = [float(v.detach()) for v in scaled]
    if all(map(math.isfinite, losses)):
        sum(scaled).backward()
    return losses


class CompiledELBO(torch.nn.Module):
    """``elbo(model, guide)`` as a module whose calls replay a recorded graph per shape.

    Parameters
    ----------
    elbo:
        ``pyro.infer.Trace_ELBO(num_particles=C, ...)`` or ``TraceMeanField_ELBO(...)``;
        any other ELBO runs eagerly (``is_compilable``).
    model, guide:
        Pyro programs that are ``nn.Module`` s, called as ``f(*tensors)``.
    strict:
        Raise :class:`TracingFailed` when a program cannot be traced, instead of running
        that shape eagerly.

    ``module(*tensors)`` returns Pyro's differentiable loss (the negative ELBO
    surrogate, a scalar tensor), like ``elbo(model, guide)(*tensors)``;
    ``module.loss_and_grads(*tensors, scale=s)`` returns s times its value and adds the
    gradient of that to the parameters' ``.grad``.

    The rule for module state: a recorded graph replays tensor operations only. Python
    side effects of the programs' ``forward`` (a call counter, a list appended to) happen
    once per recording, not once per call; keep such programs eager (``SVITrainer(...,
    compile=False)``). Buffers that a forward pass changes (BatchNorm in training mode)
    are detected while recording: that key runs eagerly, its reason in ``fallbacks``,
    and the recording's changes are undone, so the buffers end as eager calls leave them.

    Attributes
    ----------
    graphs:
        The recorded ``torch.fx.GraphModule`` per cache key (``None``: runs eagerly); its
        inputs are the tensors it reads (parameters, folded constants), then the
        arguments.
    fallbacks:
        Why a key runs eagerly, by key: the tracing error, or the buffers the forward
        pass changes (see the module docstring: the graph replays tensor operations
        only, and Python side effects of ``forward`` happen once per recording).
    """

    def __init__(
        self,
        elbo: pyro.infer.ELBO,
        model: torch.nn.Module,
        guide: torch.nn.Module,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.elbo, self.model, self.guide, self.strict = elbo, model, guide, strict
        self.graphs: dict[tuple, GraphModule | None] = {}
        self.fallbacks: dict[tuple, str] = {}
        self._replays: dict[tuple, _Replay] = {}

    # ------------------------------------------------------------------ calls
    def eager(self, *args: torch.Tensor) -> torch.Tensor:
        """Pyro's ELBO run as usual (what ``elbo(model, guide)(*args)`` does)."""
        if not torch.is_grad_enabled() and isinstance(self.elbo, pyro.infer.TraceEnum_ELBO):
            # its differentiable_loss refuses a loss without a gradient: the value is loss()
            value = self.elbo.loss(self.model, self.guide, *args)
            return torch.tensor(value, dtype=args[0].dtype if args else None)
        return self.elbo.differentiable_loss(self.model, self.guide, *args)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        replay = self._replay(args, self._record_loss) if self._may_compile(args) else None
        return self.eager(*args) if replay is None else replay.call(args)

    def loss_and_grads(self, *args: torch.Tensor, scale: float = 1.0) -> float:
        """``scale`` times the loss, as a float; adds the gradient of that to every ``.grad``.

        What ``(scale * module(*args)).backward()`` does (and what Pyro's
        ``ELBO.loss_and_grads`` does with scale 1), but recorded as *one* graph of forward
        and backward ops per batch shape and scale: the replay runs without autograd's
        bookkeeping, which on a small VAE costs as much as the arithmetic. Gradients are
        those autograd computes, summed in its order up to rounding. A non-finite loss
        adds no gradient (the caller decides what to do; ``SVITrainer`` stops).
        """
        return self.sum_loss_and_grads([Term(args, scale)])[0]

    def sum_loss_and_grads(self, terms: Sequence[Term]) -> list[float]:
        """Each term's scaled loss, as floats; adds the gradient of their sum to every ``.grad``.

        ``terms``: :class:`Term` s, each ``scale`` times the ELBO's loss on ``args`` or,
        where ``loss`` is given, ``scale * loss(*args)``. The sum is recorded as one graph
        per combination of shapes, scales and losses, so a step made of several batches
        (M2's unlabelled and labelled ones, and its classifier term) replays once, as
        :meth:`loss_and_grads` does for one. Draws are made in the order of the terms, as
        eager calls in that order make them. If any term is non-finite, no gradient is
        added.
        """
        flat = tuple(a for t in terms for a in t.args)
        if self._may_compile(flat):
            layout = tuple((len(t.args), t.scale, t.loss) for t in terms)
            replay = self._replay(flat, self._record_loss_and_grads, terms=layout)
            if replay is not None:
                enumerated = isinstance(self.elbo, pyro.infer.TraceEnum_ELBO)
                state = torch.random.get_rng_state() if enumerated else None
                with torch.no_grad():
                    outputs = replay.call(flat)
                losses = [float(v) for v in outputs[: len(terms)]]
                if not all(map(math.isfinite, losses)):
                    if enumerated:
                        # a value of probability 0 with infinite cost (_PyroValueReads):
                        # Pyro's own contraction drops it; the same draws, through Pyro
                        torch.random.set_rng_state(state)
                        return self._eager_loss_and_grads(terms)
                    return losses
                grads = outputs[len(terms) :]
                for param, grad, fresh in zip(replay.params, grads, replay.fresh, strict=True):
                    if grad is None:
                        continue
                    if param.grad is None:
                        param.grad = grad if fresh else grad.clone()
                    else:
                        param.grad.add_(grad)
                return losses
        return self._eager_loss_and_grads(terms)

    def _eager_loss_and_grads(self, terms: list[Term]) -> list[float]:
        return eager_sum_loss_and_grads(self.eager, terms)

    def _replay(self, args, record, **options) -> _Replay | None:
        """The recorded graph for these arguments and options, recording it if new."""
        key = (self._key(args), record.__name__, tuple(sorted(options.items())))
        replay = self._replays.get(key)
        if replay is None and key not in self.graphs and len(self.graphs) < MAX_GRAPHS:
            replay = self._record(key, args, record, options)
        return replay

    def _may_compile(self, args) -> bool:
        return (
            is_compilable(self.elbo)
            and len(args) > 0
            and all(isinstance(a, torch.Tensor) for a in args)
            and not pyro.infer.util.is_validation_enabled()
            and not am_i_wrapped()
            and pyro.settings.get("module_local_params")
        )

    def _key(self, args) -> tuple:
        return (
            tuple((a.shape, a.dtype, a.device, a.requires_grad) for a in args),
            torch.is_grad_enabled(),
            _module_state(self.model),
            _module_state(self.guide),
        )

    # ------------------------------------------------------------------ tracing
    def surrogate(self, *args: torch.Tensor) -> torch.Tensor:
        """The loss Pyro differentiates: mean over particles of the surrogate -ELBO."""
        if isinstance(self.elbo, ImportanceWeightedELBO):  # not a mean over particles
            return self.elbo.differentiable_loss(self.model, self.guide, *args)
        loss = 0.0
        enumerated = isinstance(self.elbo, pyro.infer.TraceEnum_ELBO)
        for model_trace, guide_trace in self.elbo._get_traces(self.model, self.guide, args, {}):
            with _PyroValueReads():
                if enumerated:  # what TraceEnum_ELBO.differentiable_loss sums
                    particle = -_compute_dice_elbo(model_trace, guide_trace)
                else:
                    _, particle = self.elbo._differentiable_loss_particle(model_trace, guide_trace)
                    if not isinstance(self.elbo, pyro.infer.TraceMeanField_ELBO):
                        particle = _with_elbo_value(particle, model_trace, guide_trace)
            loss = loss + particle / self.elbo.num_particles
        return loss

    def _record_loss(self, options):
        return self.surrogate

    def _record_loss_and_grads(self, options):
        layout, params = options["terms"], [p for p in self.parameters() if p.requires_grad]

        def sum_loss_and_grads(*flat):
            scaled, start = [], 0
            for n_args, scale, loss in layout:
                args, start = flat[start : start + n_args], start + n_args
                scaled.append((self.surrogate if loss is None else loss)(*args) * scale)
            grads = torch.autograd.grad(sum(scaled), params, allow_unused=True)
            return (*(v.detach() for v in scaled), *grads)

        return sum_loss_and_grads, params, len(layout)

    def _record(self, key: tuple, args, record, options) -> _Replay | None:
        """Run ``record``'s function once under ``make_fx``; simplify, bind, cache."""
        made = record(options)
        fn, params, n_values = made if isinstance(made, tuple) else (made, [], 1)
        cuda = sorted({a.device.index or 0 for a in args if a.device.type == "cuda"})
        buffers = _snapshot_buffers(self.model, self.guide)
        try:
            # recording runs the program once: fork the RNG so that no draw is consumed
            with torch.random.fork_rng(devices=cuda), pyro.validation_enabled(False):
                graph = make_fx(lambda *tensors: fn(*tensors))(*args)
        except Exception as error:  # the program reads a value, or cannot run at all
            _restore_buffers(buffers)
            if self.strict:
                raise TracingFailed(
                    f"cannot trace {type(self.elbo).__name__} for inputs of shape "
                    f"{[tuple(a.shape) for a in args]}: {type(error).__name__}: {error}. "
                    "Programs must not branch on tensor values; use strict=False to run "
                    "such calls eagerly."
                ) from error
            self.graphs[key] = None
            self.fallbacks[key] = f"{type(error).__name__}: {error}"
            return None
        changed = _restore_buffers(buffers)  # undo what the recording's run changed
        if changed:
            shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
            reason = (
                f"the forward pass changes buffers ({shown}), e.g. BatchNorm's running "
                "statistics in training mode: a replayed graph would not update them as "
                "the program does, so calls with these inputs run eagerly (put such "
                "modules in eval mode to compile them)"
            )
            if self.strict:
                raise TracingFailed(
                    f"cannot compile {type(self.elbo).__name__} for inputs of shape "
                    f"{[tuple(a.shape) for a in args]}: {reason}; use strict=False to run "
                    "such calls eagerly."
                )
            self.graphs[key] = None
            self.fallbacks[key] = reason
            return None
        self.graphs[key] = simplify(graph)
        fresh = fresh_outputs(graph)[n_values:]  # the gradients (the losses come first)
        tensors = lift_attributes(graph)  # recompiles: bind forward after it
        replay = self._replays[key] = _Replay(graph, tensors, params, fresh, cuda)
        return replay


class _Replay:
    """A recorded graph with its tensors bound, and what its outputs are.

    A graph of loss and gradients (``params`` not empty) is traced into TorchScript at its
    ``TRACE_AFTER``-th call (``torch.jit.trace``: the same ops in the same order, run by
    TorchScript's interpreter instead of the graph's Python code); a short fit, which
    replays a graph a few times, does not pay for the trace.
    """

    def __init__(self, graph: GraphModule, tensors: tuple, params: list, fresh, cuda) -> None:
        self.graph, self.tensors, self.cuda = graph, tensors, cuda
        self.forward = functools.partial(graph.forward, *tensors)
        self.params = params  # the parameters whose gradients follow the losses, in order
        self.fresh = fresh  # gradients computed into new memory (not views of inputs)
        self.calls = 0

    def call(self, args):
        self.calls += 1
        if self.calls == TRACE_AFTER and self.params:
            with torch.random.fork_rng(devices=self.cuda):  # tracing runs it: no draw used
                run = as_torchscript(self.graph, (*self.tensors, *args))
            self.forward = functools.partial(run, *self.tensors)
        return self.forward(*args)
