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

Parameters and buffers are never folded (they change between calls); random ops and ops
that write into their inputs are never folded or removed. The values and gradients the
graph computes are unchanged: ``a * 1``, ``a / 1``, ``a - 0`` are ``a`` exactly in IEEE
arithmetic, and a folded op computes what it computed before, once.
"""

from __future__ import annotations

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


def simplify(gm: GraphModule) -> GraphModule:
    """Dead-code elimination, constant folding and identity removal, then recompile."""
    gm.graph.eliminate_dead_code()
    fold_constants(gm)
    drop_identities(gm)
    gm.recompile()
    return gm
