"""Summing discrete latent sites out of a Pyro program with Pyro's parallel enumeration.

This is the one place where "z is summed out" happens. The exact-posterior guide
(EM-MIX.1) and every model's exact ``log_likelihood`` are built on it, with no
model-specific code: the program is run once under ``poutine.enum``; every discrete
latent site gets its own tensor dimension to the left of the plates, and the
log-probabilities of all sites are added by broadcasting into one table.

:class:`RecordedJoint` is the same enumeration recorded once per input signature as a graph
of torch ops and replayed (the E-step of EM on small data, where Pyro's bookkeeping costs
more than the arithmetic).
"""

from __future__ import annotations

import functools
import math
import operator
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple

import pyro
import torch
from opt_einsum import contract
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import _ENUM_ALLOCATOR, am_i_wrapped
from pyro.poutine.util import prune_subsample_sites, site_is_subsample


@contextmanager
def _own_enum_dims():
    """Leave Pyro's (single, global) enumeration-dim allocator as we found it.

    A guide that enumerates its model while an ELBO is enumerating the guide itself would
    otherwise push the outer program's enumeration dims to the left.
    """
    saved = {k: (v.copy() if isinstance(v, dict) else v) for k, v in vars(_ENUM_ALLOCATOR).items()}
    try:
        yield
    finally:
        vars(_ENUM_ALLOCATOR).clear()
        vars(_ENUM_ALLOCATOR).update(saved)


@dataclass
class EnumeratedJoint:
    """log p(x, z_1..z_m) for every joint value of the discrete latent sites.

    Attributes
    ----------
    log_joint:
        Tensor of shape ``(K_m, ..., K_1, *plate_shape)``: site ``j`` (in program order,
        ``j = 1..m``) owns dimension ``-(max_plate_nesting + j)``.
    sites:
        Names of the enumerated latent sites, in program order.
    cardinalities:
        Number of values of each latent site.
    frames:
        The plates each latent site sits in (to rebuild them in a guide).
    scales:
        The ``poutine.scale`` factor of each latent site (1.0 or a tensor).
    max_plate_nesting:
        Number of plate dimensions the table was built with.
    """

    log_joint: torch.Tensor
    sites: list[str]
    cardinalities: list[int]
    frames: list[tuple[CondIndepStackFrame, ...]]
    scales: list
    max_plate_nesting: int

    def enum_dim(self, j: int) -> int:
        """Tensor dimension of latent site number ``j`` (0-based, program order)."""
        return -(self.max_plate_nesting + 1 + j)

    def log_joint_normaliser(self) -> torch.Tensor:
        """log p(x) broadcastable against ``log_joint`` (every latent site summed out)."""
        out = self.log_joint
        for j in range(len(self.sites)):
            out = out.logsumexp(dim=self.enum_dim(j), keepdim=True)
        return out

    def log_marginal(self) -> torch.Tensor:
        """log p(x) with every latent site summed out; shape ``plate_shape``."""
        out = self.log_joint
        for _ in self.sites:
            out = out.logsumexp(dim=-(self.max_plate_nesting + 1))
        return out


def enumerate_joint(model, *args, max_plate_nesting: int = 1, **kwargs) -> EnumeratedJoint:
    """Run ``model(*args, **kwargs)`` with its discrete latent sites enumerated in parallel.

    Every latent site must have finite support (``enumerate_support``) and sit inside the
    same plates as the observations it explains; the returned table is then the exact joint
    log p(x_d, z_d) per data point, from which both log p(x_d) and p(z_d | x_d) follow.

    Raises ``ValueError`` (with the fix) for latent sites that cannot be enumerated.
    """
    enum_model = poutine.enum(
        config_enumerate(model, default="parallel"), first_available_dim=-(max_plate_nesting + 1)
    )
    # block(): the inner run must not leak sites into an outer trace (e.g. an ELBO's guide trace)
    with _own_enum_dims(), poutine.block():
        trace = poutine.trace(enum_model).get_trace(*args, **kwargs)
    sites, cards, frames, scales, log_probs = [], [], [], [], []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        fn = site["fn"]
        if not site["is_observed"]:
            if site["infer"].get("enumerate") != "parallel":
                raise ValueError(
                    f"latent site {name!r} ({type(fn).__name__}) cannot be summed out: the exact "
                    "posterior needs discrete latent sites with finite support. Use an amortized "
                    "or mean-field guide for continuous latent variables."
                )
            sites.append(name)
            cards.append(int(site["value"].shape[0]) if site["value"].dim() else 1)
            frames.append(tuple(f for f in site["cond_indep_stack"] if f.vectorized))
            scales.append(site["scale"])
        log_p = fn.log_prob(site["value"])
        if site["mask"] is not None:
            log_p = log_p.masked_fill(~site["mask"], 0.0)
        log_probs.append(log_p)
    if not sites:
        raise ValueError("the model has no latent sample site to sum out")
    log_joint = log_probs[0]
    for log_p in log_probs[1:]:
        log_joint = log_joint + log_p
    width = max_plate_nesting + len(sites)
    if log_joint.dim() < width:
        log_joint = log_joint.reshape((1,) * (width - log_joint.dim()) + log_joint.shape)
    return EnumeratedJoint(log_joint, sites, cards, frames, scales, max_plate_nesting)


# ---------------------------------------------------------------------------- checks
_DEFERRED: list[list[torch.Tensor]] = []  # the open deferred_checks() scopes


def holds(flag: torch.Tensor) -> bool:
    """Whether the boolean tensor ``flag`` is true: a check that may be deferred.

    Run as usual, ``bool(flag)``. Inside :func:`deferred_checks` (while a computation is
    recorded to be replayed), the flag is collected instead and ``True`` returned: the
    code follows its usual path, and whoever replays it reads every flag at once
    afterwards, running the computation again as usual when one fails (so that the error,
    or the other path, is that of an ordinary run).
    """
    if not _DEFERRED:
        return bool(flag)
    _DEFERRED[-1].append(flag)
    return True


@contextmanager
def deferred_checks():
    """Collect the flags of :func:`holds` instead of reading them; yields their list."""
    flags: list[torch.Tensor] = []
    _DEFERRED.append(flags)
    try:
        yield flags
    finally:
        _DEFERRED.pop()


# ---------------------------------------------------------------------------- recorded
#: input signatures recorded per :class:`RecordedJoint`; further ones run eagerly
MAX_RECORDINGS = 16
#: argument values a signature may hold as they are (anything else runs eagerly)
_PLAIN = (type(None), bool, int, float, str)


def tensor_state(module: torch.nn.Module) -> tuple:
    """What a graph recorded from ``module`` depends on besides its tensors' values.

    The state ``CompiledELBO`` keys on (every submodule's train/eval flag, every parameter
    and buffer slot's identity, dtype, device, ``requires_grad``), and every tensor's shape:
    a tensor given new data of another shape in place (``p.data = ...``) keeps its identity.
    """
    from ..inference.svi.compiled import _module_state  # (inference imports models)

    shapes, stack = [], [module]
    while stack:
        m = stack.pop()
        for t in chain(m._parameters.values(), m._buffers.values()):
            shapes.append(None if t is None else t.shape)
        stack.extend(m._modules.values())
    return _module_state(module), tuple(shapes)


class _Recording(NamedTuple):
    """A recorded :func:`enumerate_joint`: the graph with its tensors bound, and the table's
    description (which of the site scales are tensors the graph returns after the table)."""

    forward: functools.partial
    sites: list[str]
    cardinalities: list[int]
    frames: list
    scales: list  # a float, or None where the graph returns the scale (a tensor)
    max_plate_nesting: int

    def joint(self, tensors: tuple) -> EnumeratedJoint:
        log_joint, *tensor_scales = self.forward(*tensors)
        returned = iter(tensor_scales)
        scales = [next(returned) if s is None else s for s in self.scales]
        return EnumeratedJoint(
            log_joint,
            list(self.sites),
            list(self.cardinalities),
            list(self.frames),
            scales,
            self.max_plate_nesting,
        )


class RecordedJoint:
    """:func:`enumerate_joint`, recorded once per input signature and replayed.

    A signature's first calls run Pyro's enumeration as usual (with Pyro's validation as
    configured); the ``record_after``-th also records the torch operations that run
    computed (:func:`record_ops`, what ``make_fx`` records, as
    :class:`~elbolab.inference.CompiledELBO` records an ELBO); later calls
    replay that graph, which computes the very same table (the same ATen operations on the
    same tensors: equal to the eager table, checked in ``tests/test_em_recorded.py``)
    without Pyro's handlers, traces and distribution objects. The graph reads the module's
    parameters and buffers themselves, so values written into them in place are seen.

    The signature is everything else the enumeration may depend on: the shapes, dtypes and
    devices of the tensor arguments, the values of the others, grad mode, and
    :func:`tensor_state` of the module (each parameter's and buffer's identity, dtype,
    shape, device). A new parameter object, shape or dtype is recorded afresh.

    Rules, as for ``CompiledELBO``: a graph replays tensor operations only, so a program
    whose structure depends on values (``if x.sum() > 0``) cannot be recorded (recording
    fails and that signature runs eagerly; ``fallbacks`` says why), nor one whose forward
    pass changes a buffer; Python side effects of the program happen once per recording.
    Pyro's validation checks arguments and observed values on each eager run; a replay
    makes them once, on the recording run, and, with validation enabled, runs eagerly
    again when the replayed table holds a NaN, so that Pyro's own error is raised (or its
    NaN table returned). Calls inside other Pyro handlers run eagerly.
    """

    def __init__(self, max_recordings: int = MAX_RECORDINGS, record_after: int = 2) -> None:
        self.max_recordings, self.record_after = int(max_recordings), int(record_after)
        self.recordings: dict[tuple, _Recording | None] = {}
        self.fallbacks: dict[tuple, str] = {}
        self._seen: dict[tuple, int] = {}  # eager calls of signatures not recorded yet

    def clear(self) -> None:
        """Forget every recording (and the tensors they hold)."""
        self.recordings.clear()
        self.fallbacks.clear()
        self._seen.clear()

    # a copy (of a guide holding one) records afresh for its own module
    def __deepcopy__(self, memo) -> RecordedJoint:
        return type(self)(self.max_recordings, self.record_after)

    def __getstate__(self) -> dict:
        return {"max_recordings": self.max_recordings, "record_after": self.record_after}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_recordings"], state.get("record_after", 2))

    def __call__(self, module, *args, max_plate_nesting: int = 1, **kwargs) -> EnumeratedJoint:
        key = self._key(module, args, kwargs, max_plate_nesting)
        if key is None:
            return enumerate_joint(module, *args, max_plate_nesting=max_plate_nesting, **kwargs)
        recording = self.recordings.get(key, key)  # (the key itself: not seen yet)
        if recording is key:
            joint = enumerate_joint(module, *args, max_plate_nesting=max_plate_nesting, **kwargs)
            if len(self._seen) > 4 * self.max_recordings:
                self._seen.clear()
            calls = self._seen[key] = self._seen.get(key, 0) + 1
            # (inside another recording, the ops of this run are that recording's)
            if (
                calls >= self.record_after
                and len(self.recordings) < self.max_recordings
                and not _ACTIVE[0]
            ):
                del self._seen[key]
                self._record(key, module, args, kwargs, max_plate_nesting)
            return joint
        if recording is None:
            return enumerate_joint(module, *args, max_plate_nesting=max_plate_nesting, **kwargs)
        joint = recording.joint(_tensors(args, kwargs))
        if pyro.infer.util.is_validation_enabled() and not holds(~joint.log_joint.isnan().any()):
            # Pyro's checks of the arguments are made on an eager run: its error, or its table
            return enumerate_joint(module, *args, max_plate_nesting=max_plate_nesting, **kwargs)
        return joint

    @staticmethod
    def _key(module, args, kwargs, max_plate_nesting: int) -> tuple | None:
        if am_i_wrapped():
            return None
        items = list(args) + [kwargs[k] for k in sorted(kwargs)]
        signature = []
        for a in items:
            if isinstance(a, torch.Tensor):
                signature.append((a.shape, a.dtype, a.device, a.requires_grad))
            elif isinstance(a, _PLAIN) and not (isinstance(a, float) and math.isnan(a)):
                signature.append((type(a), a))
            else:
                return None
        return (
            id(module),
            tuple(sorted(kwargs)),
            tuple(signature),
            max_plate_nesting,
            torch.is_grad_enabled(),
            tensor_state(module),
        )

    def _record(self, key, module, args, kwargs, max_plate_nesting: int) -> None:
        """Record one run of the enumeration (:func:`record_ops`); simplify, bind, cache."""
        from ..inference.svi.compiled import _restore_buffers, _snapshot_buffers
        from ..inference.svi.graph_passes import lift_attributes, simplify

        names = sorted(kwargs)
        positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        keywords = [k for k in names if isinstance(kwargs[k], torch.Tensor)]
        described = {}

        def enumerate_from(*tensors):
            given = iter(tensors)
            call_args = list(args)
            for i in positions:
                call_args[i] = next(given)
            call_kwargs = dict(kwargs)
            for k in keywords:
                call_kwargs[k] = next(given)
            joint = enumerate_joint(
                module, *call_args, max_plate_nesting=max_plate_nesting, **call_kwargs
            )
            described["joint"] = joint
            return (joint.log_joint, *(s for s in joint.scales if isinstance(s, torch.Tensor)))

        buffers = _snapshot_buffers(module, torch.nn.Module())
        try:
            with pyro.validation_enabled(False):
                graph, _ = record_ops(enumerate_from, _tensors(args, kwargs))
        except Exception as error:  # the program reads a value, or cannot be recorded
            _restore_buffers(buffers)
            self.recordings[key] = None
            self.fallbacks[key] = f"{type(error).__name__}: {error}"
            return
        changed = _restore_buffers(buffers)
        if changed:
            self.recordings[key] = None
            self.fallbacks[key] = (
                f"the program changes buffers ({', '.join(changed[:4])}) as it runs; a "
                "replayed graph would not, so calls with these inputs run eagerly"
            )
            return
        joint = described["joint"]
        if writes_constant(graph):
            self.recordings[key] = None
            self.fallbacks[key] = "the program writes in place into a tensor of constants"
            return
        tidy(graph)
        simplify(graph)
        bound = lift_attributes(graph)
        graph.compile()  # (the passes above only marked it)
        for node in graph.graph.nodes:  # the values seen while recording are not kept
            node.meta.pop("val", None)
        self.recordings[key] = _Recording(
            functools.partial(graph.forward, *bound),
            list(joint.sites),
            list(joint.cardinalities),
            list(joint.frames),
            [None if isinstance(s, torch.Tensor) else s for s in joint.scales],
            joint.max_plate_nesting,
        )


class ReadsValue(RuntimeError):
    """A recorded program read a tensor's value (or drew a random number)."""


def record_ops(fn, inputs: tuple) -> tuple[_RecordedGraph, tuple]:
    """Run ``fn(*inputs)`` once; return the ATen operations it ran as a ``GraphModule``,
    and what this run returned.

    What ``make_fx`` records in its ``"real"`` mode, with Python dispatch only: every
    operation below autograd (run under ``torch.no_grad``), on the real tensors, as it runs.
    Tensors the program reads that are neither inputs nor made by a recorded operation
    (parameters, buffers, literals) become attributes of the graph -- the very objects,
    so that values written into them in place are seen by a replay. ``fn`` returns a tuple
    of tensors; call the graph's ``compile()`` after any passes, before running it.
    :class:`ReadsValue` when the program reads a value (``.item()``, ``bool(t)``) or
    draws random numbers: a replay could not follow it.

    (``make_fx`` records the same operations, but its first call in a process costs about
    2 s, and each recording about 0.2 s, more than a whole EM fit on a few hundred rows.)
    """
    from torch.fx import Graph
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.weak import WeakIdKeyDictionary

    graph, constants = Graph(), {}
    # tensor -> the node that made it, by identity (each node's meta keeps its tensor alive,
    # so no identity is reused while recording)
    nodes = WeakIdKeyDictionary()
    for i, t in enumerate(inputs):
        nodes[t] = node = graph.placeholder(f"input_{i}")
        node.meta["val"] = t

    def node_of(value):
        if isinstance(value, (tuple, list)):
            return type(value)(node_of(v) for v in value)
        if not isinstance(value, torch.Tensor):
            return value
        node = nodes.get(value)
        if node is None:  # read from outside: a parameter, a buffer, a literal
            name = f"_constant_{len(constants)}"
            constants[name] = value
            nodes[value] = node = graph.get_attr(name)
            node.meta["val"] = value
        return node

    class Recorder(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            return False  # nothing here is compiled: no need to import torch._dynamo (~2 s)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in _VALUE_READS or torch.Tag.nondeterministic_seeded in func.tags:
                raise ReadsValue(
                    f"the program calls {func} (it reads a tensor's value or draws random "
                    "numbers), which a replayed graph cannot follow"
                )
            out = func(*args, **kwargs)
            node = graph.call_function(
                func, node_of(args), {k: node_of(v) for k, v in kwargs.items()}
            )
            if isinstance(out, torch.Tensor):
                nodes[out] = node
                node.meta["val"] = out
            elif isinstance(out, (tuple, list)):
                for j, item in enumerate(out):
                    if isinstance(item, torch.Tensor):
                        part = graph.call_function(operator.getitem, (node, j))
                        nodes[item] = part
                        part.meta["val"] = item
            return out

    _ACTIVE[0] += 1
    try:
        with torch.no_grad(), Recorder():
            outputs = fn(*inputs)
    finally:
        _ACTIVE[0] -= 1
    graph.output(tuple(node_of(t) for t in outputs))
    return _RecordedGraph(constants, graph), tuple(outputs)


#: how many record_ops runs are under way (a recording inside one records nothing itself)
_ACTIVE = [0]


def as_torchscript(graph: torch.fx.GraphModule, example: tuple):
    """A compiled recorded graph as TorchScript, run by TorchScript's interpreter.

    ``torch.jit.trace`` of the graph on copies of ``example`` (so that tracing, which runs
    the graph once, writes into none of the real tensors): the same ATen operations in the
    same order, about twice as fast as the graph's Python code for a graph of a few hundred
    small operations. Where tracing fails, the graph itself is returned.
    """
    import warnings

    copies = tuple(t.detach().clone() for t in example)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's notes on tracing
            return torch.jit.trace(graph, copies, check_trace=False)
    except Exception:  # noqa: BLE001 - the graph's own Python code is the fallback
        return graph


def tidy(gm: torch.fx.GraphModule) -> int:
    """Rewrites of a recorded graph (run without autograd) that keep every value it
    computes; returns how many operations they removed.

    - ``detach(a)`` is ``a`` (a replay records no gradients);
    - a ``slice`` of a whole dimension, an ``expand``/``view`` to ``a``'s own shape (and
      strides), and a chain of views that ends as it began, are ``a``;
    - ``cat([a])`` of a tensor nothing else reads is ``a``;
    - ``eye(n)`` (and pure operations on it) is computed once;
    - ``index(a, [z])`` with ``z`` a recorded constant holding ``arange(K)`` laid out
      along the first dimension (the enumerated values of a latent site picking every
      component's parameters) is a view of ``a``, where nothing writes into the result.

    Views alias their input where the operations they replace made copies, so a view
    replaces an operation only when no in-place operation reads the result.
    """
    aten = torch.ops.aten
    graph = gm.graph
    views = {
        aten.detach.default,
        aten.slice.Tensor,
        aten.expand.default,
        aten.view.default,
        aten._unsafe_view.default,
    }

    def val(node):
        return node.meta.get("val") if isinstance(node, torch.fx.Node) else None

    def written(node) -> bool:  # whether an in-place operation reads node (or a view of it)
        stack = [node]
        while stack:
            n = stack.pop()
            for user in n.users:
                target = user.target
                if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
                    return True
                if isinstance(target, torch._ops.OpOverload) and any(
                    r.alias_info is not None for r in target._schema.returns
                ):
                    stack.append(user)
        return False

    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        target, args = node.target, node.args
        out = val(node)
        keep = None
        if target in views and isinstance(args[0], torch.fx.Node):
            source = val(args[0])
            if (
                isinstance(out, torch.Tensor)
                and isinstance(source, torch.Tensor)
                and out.shape == source.shape
                and out.stride() == source.stride()
                and out.storage_offset() == source.storage_offset()
                and out.dtype == source.dtype
                and (target is not aten._unsafe_view.default or not written(node))
            ):
                keep = args[0]
        elif target is aten.cat.default and len(args[0]) == 1:
            (single,) = args[0]
            if (
                isinstance(single, torch.fx.Node)
                and single.op == "call_function"
                and len(single.users) == 1
                and not written(node)
            ):
                keep = single
        elif target is aten.index.Tensor and len(args[1]) == 1 and not written(node):
            base, (index,) = args[0], args[1]
            z, a = val(index), val(base)
            if (
                isinstance(index, torch.fx.Node)
                and index.op == "get_attr"
                and isinstance(z, torch.Tensor)
                and isinstance(a, torch.Tensor)
                and not z.dtype.is_floating_point
                and z.numel() == a.shape[0]
                and all(s == 1 for s in z.shape[1:])
                and torch.equal(z.reshape(-1).cpu(), torch.arange(a.shape[0]))
            ):
                with graph.inserting_before(node):
                    shaped = graph.call_function(aten.view.default, (base, list(out.shape)))
                shaped.meta = dict(node.meta)
                keep = shaped
        elif target is aten.eye.default and not node.all_input_nodes:
            name = f"_eye_{removed}"
            gm.register_buffer(name, target(*args, **node.kwargs), persistent=False)
            with graph.inserting_before(node):
                constant = graph.get_attr(name)
            constant.meta = dict(node.meta)
            keep = constant
        if keep is None and _aliases(node) and isinstance(out, torch.Tensor):
            # a chain of views that ends where it began (expand, then select the expanded
            # dimension) is its first tensor
            root = node.args[0]
            while isinstance(root, torch.fx.Node) and root.op == "call_function" and _aliases(root):
                root = root.args[0]
            base = val(root)
            if (
                root is not node.args[0]
                and isinstance(base, torch.Tensor)
                and base.shape == out.shape
                and base.stride() == out.stride()
                and base.storage_offset() == out.storage_offset()
                and base.dtype == out.dtype
            ):
                keep = root
        if keep is not None:
            node.replace_all_uses_with(keep)
            graph.erase_node(node)
            removed += 1
    graph.eliminate_dead_code()
    removed += _merge_repeats(graph)
    gm.recompile()
    return removed


def writes_constant(gm: torch.fx.GraphModule) -> bool:
    """Whether an in-place operation writes into a tensor that constant folding would
    compute once (``zeros`` filled in place): folded, it would keep what every replay
    wrote into it. Such graphs are not replayed."""
    from ..inference.svi.graph_passes import FACTORIES, SHAPE_ONLY, _is_literal, _is_pure

    known = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or not _is_pure(node.target):
            continue
        if (
            node.target in SHAPE_ONLY
            or _is_literal(node)
            or (
                (node.all_input_nodes or node.target in FACTORIES)
                and all(a in known for a in node.all_input_nodes)
            )
        ):
            known.add(node)
    for node in gm.graph.nodes:
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            first = node.args[0] if node.args else None
            for t in first if isinstance(first, (list, tuple)) else [first]:
                while isinstance(t, torch.fx.Node) and t not in known and _returns_alias(t):
                    t = t.args[0]
                if t in known:
                    return True
    return False


def _returns_alias(node: torch.fx.Node) -> bool:
    """Whether ``node`` returns (a view of) its first argument: a view, or in place."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and any(
        r.alias_info is not None for r in target._schema.returns
    )


def _aliases(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a view of its first argument (an in-place operation is not)."""
    target = node.target
    return (
        isinstance(target, torch._ops.OpOverload)
        and not target._schema.is_mutable
        and any(r.alias_info is not None for r in target._schema.returns)
    )


def _merge_repeats(graph: torch.fx.Graph) -> int:
    """Compute once what a graph computes twice: a pure operation on the same inputs
    (reading no tensor that an in-place operation writes, whose value could differ
    between the two)."""
    aten = torch.ops.aten

    def is_view(node) -> bool:
        target = node.target
        return isinstance(target, torch._ops.OpOverload) and any(
            r.alias_info is not None for r in target._schema.returns
        )

    def root(node):
        while isinstance(node, torch.fx.Node) and node.op == "call_function" and is_view(node):
            node = node.args[0]
        return node

    written = set()
    for node in graph.nodes:
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            first = node.args[0]
            for t in first if isinstance(first, (list, tuple)) else [first]:
                written.add(root(t))

    def key_of(value):
        if isinstance(value, (list, tuple)):
            return (type(value).__name__,) + tuple(key_of(v) for v in value)
        if isinstance(value, torch.fx.Node):
            return ("node", value)
        if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device)):
            return (type(value).__name__, value)
        if isinstance(value, torch.memory_format | torch.layout):
            return (type(value).__name__, str(value))
        raise TypeError  # (anything else: not merged)

    seen, merged = {}, 0
    for node in list(graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
            continue
        if target in (aten.empty.memory_format, aten.empty_like.default):
            continue
        if root(node) in written or any(root(a) in written for a in node.all_input_nodes):
            continue  # (its value, or a copy of it written later, could differ)
        try:
            key = (target, key_of(node.args), key_of(tuple(sorted(node.kwargs.items()))))
        except TypeError:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(first)
        graph.erase_node(node)
        merged += 1
    return merged


class _RecordedGraph(torch.fx.GraphModule):
    """A ``GraphModule`` whose Python code is generated once, by :meth:`compile`, after
    every pass (each ``recompile`` of a pass only marks it; generating and compiling the
    code of a graph of a hundred operations costs several milliseconds)."""

    def recompile(self):
        self._stale = True

    def compile(self) -> None:
        if getattr(self, "_stale", True):
            torch.fx.GraphModule.recompile(self)
            self._stale = False


#: operations that read a tensor's value into Python
_VALUE_READS = frozenset(
    {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.equal.default,
    }
)


def _tensors(args: tuple, kwargs: dict) -> tuple:
    """The tensor arguments, positional ones first, then keyword ones by name."""
    return tuple(a for a in args if isinstance(a, torch.Tensor)) + tuple(
        kwargs[k] for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)
    )


# ---------------------------------------------------------------------------- factor graphs
@dataclass
class FactorGraph:
    """Every sample site of a program as a factor log phi_f over enumerated latent values.

    Built by :func:`enumerate_factors`. The posterior is never tabulated jointly: log p(x)
    is Pyro's variable elimination over the factors (``contract_to_tensor``, O(T K^2) for a
    chain of T sites), and the posterior marginal of each factor's variables is the
    derivative of log p(x) with respect to that factor's log-table (HMM-FB):

        p(vars of f | x) = d log Z / d log phi_f(vars),   Z = sum_z prod_f phi_f(z).

    Attributes
    ----------
    trace:
        The program's trace under parallel enumeration, its tensors packed (``_pyro_dims``).
    sites:
        Latent site names in program order.
    symbols:
        The enumeration symbol of each latent site.
    cardinalities:
        Number of values of each latent site.
    """

    trace: object
    sites: list[str]
    symbols: dict[str, str]
    cardinalities: dict[str, int]
    _factors: OrderedDict = field(repr=False)
    _leaves: dict = field(repr=False)
    _sum_dims: set = field(repr=False)
    log_partition: torch.Tensor = None  # sum over the data of log p(x_d), a 0-d tensor
    _marginals: dict | None = field(default=None, repr=False)

    def factor_marginals(self) -> dict[str, torch.Tensor]:
        """p(vars of f | x) of every site's factor, packed (``_pyro_dims`` as the factor's),
        with every plate of the site present (one marginal per plate element)."""
        if self._marginals is None:
            names = list(self._leaves)
            grads = torch.autograd.grad(self.log_partition, [self._leaves[n] for n in names])
            self._marginals = {}
            for name, grad in zip(names, grads, strict=True):
                grad._pyro_dims = self._leaves[name]._pyro_dims
                self._marginals[name] = grad
        return self._marginals

    def unpacked(self, name: str) -> torch.Tensor:
        """The marginal of site ``name``'s factor in Pyro's layout (enumeration dims left)."""
        return packed.unpack(self.factor_marginals()[name], self.trace.symbol_to_dim)

    def site_marginal(self, name: str) -> torch.Tensor:
        """p(z_j | x) of latent site ``name``, shape (plate..., K_j)."""
        m = self.factor_marginals()[name]
        keep = self.symbols[name]
        plates = [d for d in m._pyro_dims if d not in self._sum_dims]
        out_dims = "".join(plates) + keep
        table = contract(f"{m._pyro_dims}->{out_dims}", m)
        return table

    def parents(self, name: str) -> list[str]:
        """The earlier latent sites in site ``name``'s own factor (its parents)."""
        dims = self._leaves[name]._pyro_dims
        by_symbol = {s: n for n, s in self.symbols.items()}
        return [by_symbol[d] for d in dims if d in by_symbol and by_symbol[d] != name]

    def scopes(self) -> dict[str, set[str]]:
        """The latent sites each factor involves."""
        by_symbol = {s: n for n, s in self.symbols.items()}
        return {
            name: {by_symbol[d] for d in leaf._pyro_dims if d in by_symbol}
            for name, leaf in self._leaves.items()
        }


def enumerate_factors(
    model, *args, max_plate_nesting: int = 1, partition: bool = True, **kwargs
) -> FactorGraph:
    """Trace ``model`` with its discrete latent sites enumerated in parallel, as factors.

    ``pyro.markov`` contexts in the program recycle enumeration dimensions, so a chain of
    any length needs a few tensor dimensions only. The returned :class:`FactorGraph` has
    log p(x) (summed over the data) as a differentiable function of the factors' tables;
    :meth:`FactorGraph.factor_marginals` gives the posterior marginals by autodiff.
    ``partition=False`` skips the contraction (only the traced log-probabilities are read).
    ``ValueError`` (with the fix) for latent sites that cannot be enumerated.
    """
    enum_model = poutine.enum(
        config_enumerate(model, default="parallel"), first_available_dim=-(max_plate_nesting + 1)
    )
    with _own_enum_dims(), poutine.block():
        trace = poutine.trace(enum_model).get_trace(*args, **kwargs)
    trace = prune_subsample_sites(trace)
    trace.compute_log_prob()  # differentiable in the parameters (the M-step's Q needs it)
    trace.pack_tensors()
    sizes = {}
    for site in trace.nodes.values():
        if site["type"] == "sample":
            for f in site["cond_indep_stack"]:
                if f.vectorized:
                    sizes[trace.plate_to_symbol[f.name]] = f.size
    sites, symbols, cards, factors, leaves = [], {}, {}, OrderedDict(), {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"]:
            if site["infer"].get("_enumerate_dim") is None:
                raise ValueError(
                    f"latent site {name!r} ({type(site['fn']).__name__}) cannot be summed out: "
                    "the exact posterior needs discrete latent sites with finite support. Use "
                    "an amortized or mean-field guide for continuous latent variables."
                )
            sites.append(name)
            symbols[name] = site["infer"]["_enumerate_symbol"]
            cards[name] = int(site["fn"].enumerate_support(expand=False).shape[0])
        # as Pyro's TraceEnum_ELBO: a latent site's own table is never masked (summed over
        # its values it is 1 wherever it is masked out); observed sites are
        log_phi = site["packed"]["unscaled_log_prob"]
        if site["is_observed"]:
            log_phi = packed.scale_and_mask(log_phi, mask=site["packed"]["mask"])
        ordinal = frozenset(
            trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
        )
        leaves[name] = leaf = _expanded_leaf(log_phi, ordinal, sizes)
        factors.setdefault(ordinal, []).append(leaf)
    if not sites:
        raise ValueError("the model has no latent sample site to sum out")
    sum_dims = set(symbols.values())
    log_z = None
    if partition:
        with torch.enable_grad():
            log_z = contract_to_tensor(factors, sum_dims, target_ordinal=frozenset())
    return FactorGraph(trace, sites, symbols, cards, factors, leaves, sum_dims, log_z)


def _expanded_leaf(log_phi, ordinal: frozenset, sizes: dict) -> torch.Tensor:
    """A packed log-table with every plate of its site present, as a leaf needing grad (so
    that its gradient is the marginal of each plate element)."""
    t = log_phi.detach() if isinstance(log_phi, torch.Tensor) else torch.tensor(float(log_phi))
    dims = getattr(log_phi, "_pyro_dims", "")
    for symbol in sorted(ordinal):
        if symbol not in dims:
            t = t.unsqueeze(-1).expand(*t.shape, sizes[symbol])
            dims += symbol
    leaf = t.contiguous().requires_grad_()
    leaf._pyro_dims = dims
    return leaf
