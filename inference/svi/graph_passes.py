"""Two small rewrites of a traced graph of ATen ops that keep every value it computes.

A Pyro ELBO traced into ATen ops (see ``compiled.py``) carries the bookkeeping of its
generality: ``zeros``/``ones`` for a standard-normal prior, ``x / 1`` for a unit scale,
``x - 0`` for a zero mean, ``expand`` to the shape a tensor already has, ``+ 0.0`` for
the loss accumulator. On small networks every such op (and its node in the backward
pass) costs about as much as a matrix product, so they are removed:

``fold_constants``
    evaluates once, at trace time, every op whose inputs are known then: factory ops
    (``zeros``, ``ones``, ``full``, tensor literals), ``ones_like``-style ops (their
    values depend only on the shape, fixed in a traced graph), and pure ops on those.
``drop_identities``
    replaces ``a + 0``, ``a - 0``, ``a * 1``, ``a / 1``, ``a ** 1`` and same-shape
    ``expand``/``view`` by ``a`` itself, when the result has ``a``'s shape and dtype.
``fold_negations``
    turns ``(-a) / c`` and ``(-a) * c``, for a constant c that is one power of two,
    into ``a * (-1/c)`` and ``a * (-c)``: one op instead of two (a Gaussian log-density's
    ``-(x - mu)^2 / (2 sigma^2)`` with sigma = 1).

Parameters and buffers are never folded (they change between calls); random ops and ops
that write into their inputs are never folded or removed. The values and gradients the
graph computes are unchanged: ``a * 1``, ``a / 1``, ``a - 0`` are ``a`` exactly in IEEE
arithmetic, and a folded op computes what it computed before, once.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

aten = torch.ops.aten

# ops whose values depend only on their (constant) arguments
FACTORIES = frozenset(
    {
        aten.zeros.default,
        aten.ones.default,
        aten.full.default,
        aten.scalar_tensor.default,
        aten.arange.default,
        aten.arange.start,
        aten.arange.start_step,
    }
)
# ops whose values depend only on the *shape* of their tensor argument
SHAPE_ONLY = frozenset({aten.zeros_like.default, aten.ones_like.default, aten.full_like.default})
FOLDED_PREFIX = "_folded_"


def _is_pure(target) -> bool:
    """An ATen op that neither writes into an argument nor draws random numbers."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


def _is_literal(node: Node) -> bool:
    """``lift_fresh_copy(constant)``: a tensor literal created while the program ran."""
    return (
        node.op == "call_function"
        and node.target is aten.lift_fresh_copy.default
        and node.args[0].op == "get_attr"
    )


def fold_constants(gm: GraphModule) -> int:
    """Evaluate the ops whose inputs are all known at trace time; returns how many remain.

    The values used by the rest of the graph become non-persistent buffers named
    ``_folded_<i>``; everything only they depended on is removed.
    """
    graph = gm.graph
    known: dict[Node, object] = {}
    for node in graph.nodes:
        if node.op != "call_function" or not _is_pure(node.target):
            continue
        if node.target in SHAPE_ONLY:
            like = node.meta["val"]
            template = torch.empty(like.shape, dtype=like.dtype, device=like.device)
            known[node] = node.target(template, *node.args[1:], **node.kwargs)
        elif _is_literal(node):
            known[node] = getattr(gm, node.args[0].target).clone()
        elif (node.all_input_nodes or node.target in FACTORIES) and all(
            a in known for a in node.all_input_nodes
        ):
            args = map_arg(node.args, known.__getitem__)
            kwargs = map_arg(node.kwargs, known.__getitem__)
            known[node] = node.target(*args, **kwargs)
    kept = 0
    for node, value in known.items():
        if all(user in known for user in node.users):
            continue  # only other constants need it
        name = f"{FOLDED_PREFIX}{kept}"
        kept += 1
        gm.register_buffer(name, value, persistent=False)
        with graph.inserting_before(node):
            attr = graph.get_attr(name)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
    graph.eliminate_dead_code()
    return kept


def _equals(value, number: float) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value == number
    if isinstance(value, torch.Tensor):
        return bool((value == number).all())
    return False


def _writes_only_fresh_tensors(graph: torch.fx.Graph) -> bool:
    """Every in-place op in the graph fills a tensor made by ``empty`` (a random draw)."""
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target._schema.is_mutable:
                target = node.args[0] if node.args else None
                if not (
                    isinstance(target, Node)
                    and target.target in (aten.empty.memory_format, aten.empty_like.default)
                    and len(target.users) == 1
                ):
                    return False
    return True


def drop_identities(gm: GraphModule) -> int:
    """Replace ``a + 0``, ``a * 1``, same-shape ``expand``, ... by ``a``; returns how many.

    Skipped entirely when the graph writes into a tensor other than a fresh ``empty``
    one: replacing a copy by its source would then change what the write touches.
    """
    graph = gm.graph
    if not _writes_only_fresh_tensors(graph):
        return 0

    def constant(arg):
        if isinstance(arg, Node):
            if arg.op == "get_attr" and arg.target.startswith(FOLDED_PREFIX):
                return getattr(gm, arg.target)
            return None
        return arg

    removed = 0
    for node in list(graph.nodes):
        out = node.meta.get("val")
        if node.op != "call_function" or not isinstance(out, torch.Tensor):
            continue
        target, args = node.target, node.args
        keep = None
        if target in (aten.add.Tensor, aten.sub.Tensor) and node.kwargs.get("alpha", 1) == 1:
            if _equals(constant(args[1]), 0):
                keep = args[0]  # a + 0, a - 0
            elif target is aten.add.Tensor and _equals(constant(args[0]), 0):
                keep = args[1]  # 0 + a
        elif target is aten.mul.Tensor:
            if _equals(constant(args[1]), 1):
                keep = args[0]  # a * 1
            elif _equals(constant(args[0]), 1):
                keep = args[1]  # 1 * a
        elif target is aten.div.Tensor and _equals(constant(args[1]), 1):
            keep = args[0]  # a / 1
        elif target is aten.pow.Tensor_Scalar and _equals(args[1], 1):
            keep = args[0]  # a ** 1
        elif target in (aten.expand.default, aten.view.default):
            keep = args[0]  # kept only if the shape is unchanged (below)
        if not isinstance(keep, Node):
            continue
        kept = keep.meta.get("val")
        if isinstance(kept, torch.Tensor) and kept.shape == out.shape and kept.dtype == out.dtype:
            node.replace_all_uses_with(keep)
            removed += 1
    graph.eliminate_dead_code()
    return removed


def _power_of_two(value) -> float | None:
    """The number a constant holds everywhere, if it is a (signed) power of two."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0 or not value.dtype.is_floating_point:
            return None
        first = value.reshape(-1)[0]
        if not bool((value == first).all()):
            return None
        value = float(first)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value == 0:
        return None
    mantissa, _ = math.frexp(value)
    return float(value) if abs(mantissa) == 0.5 and math.isfinite(value) else None


def fold_negations(gm: GraphModule) -> int:
    """``(-a) / c`` -> ``a * (-1/c)`` and ``(-a) * c`` -> ``a * (-c)``; returns how many.

    Exact: negation is exact, and dividing by a power of two is multiplying by its
    reciprocal (both give the correctly rounded a / c). Only when the negation has no
    other user and the constant does not broadcast ``a`` to a larger shape.
    """
    graph = gm.graph
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.div.Tensor, aten.mul.Tensor):
            continue
        neg, const = node.args[0], node.args[1]
        if not (
            isinstance(neg, Node)
            and neg.target is aten.neg.default
            and len(neg.users) == 1
            and not node.kwargs
        ):
            continue
        if isinstance(const, Node):
            if not (const.op == "get_attr" and const.target.startswith(FOLDED_PREFIX)):
                continue
            const = getattr(gm, const.target)
        c = _power_of_two(const)
        a, out = neg.args[0], node.meta.get("val")
        a_val = a.meta.get("val") if isinstance(a, Node) else None
        if c is None or not isinstance(out, torch.Tensor) or not isinstance(a_val, torch.Tensor):
            continue
        if a_val.shape != out.shape or a_val.dtype != out.dtype:
            continue
        factor = -1.0 / c if node.target is aten.div.Tensor else -c
        with graph.inserting_before(node):
            scaled = graph.call_function(aten.mul.Tensor, (a, factor))
        scaled.meta = dict(node.meta)
        node.replace_all_uses_with(scaled)
        folded += 1
    graph.eliminate_dead_code()
    return folded


def simplify(gm: GraphModule) -> GraphModule:
    """Dead-code elimination, constant folding, identities and negations, then recompile."""
    gm.graph.eliminate_dead_code()
    fold_constants(gm)
    drop_identities(gm)
    fold_negations(gm)
    gm.recompile()
    return gm


def lift_attributes(gm: GraphModule) -> tuple[torch.Tensor, ...]:
    """Turn every attribute the graph reads into a leading input; returns their values.

    ``gm.forward(*values, *args)`` then computes what ``gm(*args)`` did, without a
    ``Module.__getattr__`` per parameter and constant on every call (bind the values once
    with ``functools.partial``). The values are the very tensors the graph read: the
    model's parameters stay shared, so in-place updates are seen.
    """
    graph = gm.graph
    first = next((n for n in graph.nodes if n.op == "placeholder"), None)
    values = []
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        if first is None:
            first = next(iter(graph.nodes))
        with graph.inserting_before(first):
            placeholder = graph.placeholder(f"const_{len(values)}")
        placeholder.meta = dict(node.meta)
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
        values.append(_attribute(gm, node.target))
    lifted = [n.target for n in graph.nodes if n.op == "placeholder"][: len(values)]
    assert lifted == [f"const_{i}" for i in range(len(values))], lifted  # inputs in order
    gm.recompile()
    return tuple(values)


def _attribute(gm: GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _aliases_input(node: Node) -> bool:
    """Whether the op's result is a view of its first argument (``view``, ``t``, ``detach``)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or not target._schema.returns:
        return False
    return target._schema.returns[0].alias_info is not None


def fresh_outputs(gm: GraphModule) -> tuple[bool, ...]:
    """For each output, whether it lives in memory the graph allocated on this call.

    False when it is (a view of) an input or a stored tensor: a caller that keeps it and
    later writes into it (a ``.grad`` accumulated in place) must copy it first.
    """
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    values = output.args[0]
    values = list(values) if isinstance(values, (tuple, list)) else [values]
    fresh = []
    for value in values:
        node = value
        while isinstance(node, Node) and node.op == "call_function" and _aliases_input(node):
            node = node.args[0]
        fresh.append(not (isinstance(node, Node) and node.op in ("placeholder", "get_attr")))
    return tuple(fresh)
