"""Pyro's ELBO, traced once per batch shape into a graph of torch ops (the fast SVI path).

Each call of a Pyro ELBO runs the model and the guide under Pyro's effect handlers: it
builds two traces, walks plates and messengers, broadcasts and scales every site, looks
up the analytic KL, and only then reaches the few tensor ops that make up the loss. For
a small VAE that bookkeeping costs more than the networks (about 1 ms per step on 2 CPU
cores). Like Pyro's ``JitTrace_ELBO``, ``CompiledELBO`` records the ops once per batch
shape and replays them; unlike it, parameters stay module-local (the recorded graph
holds the very ``nn.Parameter`` objects of the model and the guide, never the global
param store), and the graph is a plain ``torch.fx`` program of ATen ops that runs under
ordinary autograd, simplified by ``graph_passes.simplify``.

The loss is exactly Pyro's: the recorded ops are those of the ELBO's own
``_differentiable_loss_particle`` (the surrogate whose gradient is the ELBO gradient),
averaged over ``num_particles`` as Pyro does; random draws are fresh on every call and
come from torch's global generator in the same order as Pyro's, so a seeded run gives
the same numbers compiled or not (checked in ``tests/test_compiled.py``).

What a graph cannot see, it does not record: a program whose *structure* depends on the
data's values (``if x.sum() > 0``) cannot be traced; tracing fails, and the call runs
eagerly instead (``fallbacks`` says why). The cache key is everything else a program
may depend on: argument shapes, dtypes and devices, grad mode, train/eval mode and the
identity of every parameter and buffer. Pyro's validation checks data-dependent
conditions, so with validation enabled every call runs eagerly (``SVITrainer`` checks
the first step of each fit and compiles the rest); so do calls made inside other Pyro
handlers (e.g. a KL warm-up's site scale).
"""

from __future__ import annotations

import functools
import sys

import pyro
import torch
from pyro.poutine.runtime import am_i_wrapped
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode

from .graph_passes import lift_attributes, simplify

# ELBOs whose loss is sum over particles of ``_differentiable_loss_particle``
COMPILABLE = (pyro.infer.Trace_ELBO, pyro.infer.TraceMeanField_ELBO)
MAX_GRAPHS = 16  # batch shapes x grad modes per module; further shapes run eagerly


class TracingFailed(RuntimeError):
    """The ELBO could not be traced (``CompiledELBO(strict=True)``)."""


def is_compilable(elbo: pyro.infer.ELBO) -> bool:
    """Whether ``CompiledELBO`` can trace this ELBO: ``Trace_ELBO`` or ``TraceMeanField_ELBO``.

    Subclasses (Pyro's own JIT variants among them) bring their own machinery and are
    run eagerly.
    """
    return type(elbo) in COMPILABLE


def _own_tensors(module: torch.nn.Module) -> list:
    """Every parameter and buffer slot of ``module`` and its submodules (``None`` kept).

    A plain walk of ``_parameters``/``_buffers``/``_modules``: ``named_parameters()``
    costs about 100 microseconds per call on a small VAE, as much as its forward pass.
    """
    tensors, stack = [], [module]
    while stack:
        m = stack.pop()
        tensors.extend(m._parameters.values())
        tensors.extend(m._buffers.values())
        stack.extend(m._modules.values())
    return tensors


class _PyroLossValueAsNaN(TorchFunctionMode):
    """While tracing, Pyro's ``.item()`` of the loss value gives NaN instead of failing.

    ``_differentiable_loss_particle`` returns ``(float loss, surrogate tensor)``; only the
    surrogate is recorded. Any other ``.item()`` (a value read by user code) is left
    alone, so tracing fails and the call runs eagerly.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.item:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("pyro.infer."):
                return float("nan")
        return func(*args, **(kwargs or {}))


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
    surrogate, a scalar tensor), like ``elbo(model, guide)(*tensors)``.

    Attributes
    ----------
    graphs:
        The recorded ``torch.fx.GraphModule`` per cache key (``None``: runs eagerly); its
        inputs are the tensors it reads (parameters, folded constants), then the
        arguments.
    fallbacks:
        Why a key runs eagerly: the tracing error, by key.
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
        self._replays: dict[tuple, functools.partial] = {}  # forward with its tensors bound
        self.fallbacks: dict[tuple, str] = {}

    # ------------------------------------------------------------------ calls
    def eager(self, *args: torch.Tensor) -> torch.Tensor:
        """Pyro's ELBO run as usual (what ``elbo(model, guide)(*args)`` does)."""
        return self.elbo.differentiable_loss(self.model, self.guide, *args)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if not self._may_compile(args):
            return self.eager(*args)
        key = self._key(args)
        replay = self._replays.get(key)
        if replay is not None:
            return replay(*args)
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:
                return self.eager(*args)
            graph = self.graphs[key] = self._trace(key, args)
            if graph is not None:
                tensors = lift_attributes(graph)  # recompiles: take forward after it
                replay = self._replays[key] = functools.partial(graph.forward, *tensors)
                return replay(*args)
        return self.eager(*args)

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
        tensors = _own_tensors(self.model) + _own_tensors(self.guide)
        first = next((t for t in tensors if t is not None), None)
        return (
            tuple((a.shape, a.dtype, a.device, a.requires_grad) for a in args),
            torch.is_grad_enabled(),
            self.model.training,
            self.guide.training,
            tuple(map(id, tensors)),
            None if first is None else (first.dtype, first.device),
        )

    # ------------------------------------------------------------------ tracing
    def surrogate(self, *args: torch.Tensor) -> torch.Tensor:
        """The loss Pyro differentiates: mean over particles of the surrogate -ELBO."""
        loss = 0.0
        for model_trace, guide_trace in self.elbo._get_traces(self.model, self.guide, args, {}):
            with _PyroLossValueAsNaN():
                _, particle = self.elbo._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + particle / self.elbo.num_particles
        return loss

    def _trace(self, key: tuple, args) -> GraphModule | None:
        cuda = sorted({a.device.index or 0 for a in args if a.device.type == "cuda"})
        try:
            # tracing runs the program once: fork the RNG so that no draw is consumed
            with torch.random.fork_rng(devices=cuda), pyro.validation_enabled(False):
                graph = make_fx(lambda *tensors: self.surrogate(*tensors))(*args)
        except Exception as error:  # the program reads a value, or cannot run at all
            if self.strict:
                raise TracingFailed(
                    f"cannot trace {type(self.elbo).__name__} for inputs of shape "
                    f"{[tuple(a.shape) for a in args]}: {type(error).__name__}: {error}. "
                    "Programs must not branch on tensor values; use strict=False to run "
                    "such calls eagerly."
                ) from error
            self.fallbacks[key] = f"{type(error).__name__}: {error}"
            return None
        return simplify(graph)
