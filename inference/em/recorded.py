"""One EM iteration of a mixture, recorded once and replayed: EM on small data.

On a few hundred rows the arithmetic of an EM iteration is a few microseconds per
operation, and what costs is everything around it: Python calls, the module lookups of
every parameter, one read of a value per check. :class:`RecordedStep` records the whole
iteration of :meth:`EM._run_batch <elbolab.inference.em.loop.EM>` -- the closed-form
M-step, the bound, the check of the parameters, and the E-step at the new parameters
(the guide's refresh, Pyro's enumeration as the guide replays it, the sums) -- as one
graph of torch operations (:func:`~elbolab.models.enumeration.record_ops`), and replays it:
the same operations on the same tensors, so the same numbers as the iteration run
eagerly (checked in ``tests/test_em_recorded.py``).

What a replay cannot do, it leaves to an ordinary iteration:

- every check of the iteration (a covariance that lost positive definiteness, a
  non-finite parameter, a NaN in the enumerated table) is a flag the graph returns
  (:func:`~elbolab.models.enumeration.holds`); the flags are read once, after the replay,
  and when one fails the parameters are put back as they were before it and the
  iteration runs eagerly, raising its own error (or taking its other path);
- an iteration that reads a value, or a family whose statistics are not marked
  ``recordable`` (a user's, unless it says so), is never recorded;
- a new parameter object, shape or dtype, new data, or other options record afresh.

Recording costs a few tens of milliseconds, so it happens from the third iteration of
a fit on (after two ordinary ones): fits that stop sooner never pay it.
"""

from __future__ import annotations

import functools
import math

import pyro
import torch

from ...models.enumeration import (
    deferred_checks,
    record_ops,
    tensor_state,
    tidy,
    writes_constant,
)
from .family import Chunk, EChunk

#: ordinary iterations of a fit before its iteration is recorded
WARMUP = 2
#: rows x components of the data up to which the iteration is recorded (above, the
#: arithmetic dominates and the E-step's blocks would make the graph long)
MAX_ELEMENTS = 1 << 20


def _signature(t: torch.Tensor | None):
    return None if t is None else (t.shape, t.dtype, t.device, t.stride())


def _named_tensors(module: torch.nn.Module) -> dict[int, str]:
    """id -> name of every parameter and buffer of ``module``."""
    named = dict(module.named_parameters())
    named.update(module.named_buffers())
    return {id(t): name for name, t in named.items()}


def _by_name(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = dict(module.named_parameters())
    named.update(module.named_buffers())
    return named


class _Replay:
    """A recorded iteration: the graph, and where its tensors come from."""

    def __init__(self, graph, bound: tuple, slots: list, names: list[str], blocks: int):
        self.graph, self.bound, self.slots = graph, list(bound), slots
        self.names, self.blocks = names, blocks
        self.states: tuple | None = None  # tensor_state of (model, twin) bound now
        self.forward = functools.partial(graph.forward, *bound)

    def bind(self, model, twin, states: tuple) -> None:
        """Bind the model's and the twin's tensors of now (by name; the same structure)."""
        if states == self.states:
            return
        current = {"model": _by_name(model), "twin": _by_name(twin)}
        for i, slot in enumerate(self.slots):
            if slot is not None:
                owner, name = slot
                self.bound[i] = current[owner][name]
        self.forward = functools.partial(self.graph.forward, *self.bound)
        self.live = [current["model"][k] for k in self.live_names]
        self.states = states


class RecordedStep:
    """The iterations of one batch fit of a mixture on data in memory, recorded and replayed.

    ``step(e)`` does what one iteration of the batch loop does after the E-step ``e``:
    the M-step from ``e.stats``, the bound's Q, the check of the parameters and the next
    E-step, and returns ``(Q, next e)``; or None, and changes nothing, where the caller
    is to run the iteration itself.
    """

    def __init__(self, em, x: torch.Tensor, w: torch.Tensor | None) -> None:
        self.em, self.x, self.w = em, x, w
        self.calls = 0
        self.replays: dict[tuple, _Replay | None] = {}
        self.fallbacks: dict[tuple, str] = {}
        self.replayed = 0  # iterations replayed (for tests and benchmarks)
        self._structures: tuple | None = None  # (tensor states, structures) of model, twin

    @staticmethod
    def applies(em, x: torch.Tensor) -> bool:
        """Whether ``em``'s iterations on ``x`` may be recorded."""
        family, guide = em.family, em.guide
        component = getattr(family, "component", None)
        return (
            getattr(component, "recordable", False)
            and hasattr(family, "maximize_tensor")
            and getattr(guide, "record", False)
            and not em.distributed
            and not em.stochastic
            and x.shape[0] * em.model.n_components <= MAX_ELEMENTS
        )

    def _key(self, e: EChunk) -> tuple | None:
        em = self.em
        twin = em.guide.twin
        if twin is None or torch.is_grad_enabled():
            return None
        states = (tensor_state(em.model), tensor_state(twin))
        if self._structures is None or self._structures[0] != states:
            # (a module walk by name: made again only when a tensor is replaced)
            self._structures = (states, (_structure(em.model), _structure(twin)))
        stats = tuple((k, _signature(v)) for k, v in sorted(e.stats.items()))
        return (
            self._structures[1],
            _signature(self.x),
            _signature(self.w),
            stats,
            e.rows,
            e.weight,
            em.reg_covar,
            pyro.infer.util.is_validation_enabled(),
        )

    def __call__(self, e: EChunk) -> tuple[float, EChunk] | None:
        with torch.no_grad():
            key = self._key(e)
            if key is None:
                return None
            replay = self.replays.get(key, key)
            if replay is key:  # not recorded yet
                self.calls += 1
                if self.calls <= WARMUP:
                    return None
                return self._record(key, e)
            if replay is None:
                return None
            return self._replay(replay, e)

    # ------------------------------------------------------------------ the iteration
    def _inputs(self, e: EChunk) -> tuple:
        names = sorted(e.stats)
        tensors = (self.x,) + (() if self.w is None else (self.w,))
        return names, tensors + tuple(e.stats[k] for k in names)

    def _step_function(self, e: EChunk, names: list[str], backup: list, live: list):
        em, family, has_w = self.em, self.em.family, self.w is not None
        blocks = []

        def step(*tensors):
            x = tensors[0]
            w = tensors[1] if has_w else None
            stats = dict(zip(names, tensors[2 if has_w else 1 :], strict=True))
            torch._foreach_copy_(backup, live)  # theta_t, should a check fail
            with deferred_checks() as flags:
                q = family.maximize_tensor(em, stats, e.rows)  # M-step, Q(theta_t, theta_t+1)
                new, log_liks, entropies = family.e_sums(em, Chunk(x, w))
            # the parameters finite: the sum of all their entries is (a NaN or an infinity
            # makes it not; a sum that only overflows makes the iteration run eagerly)
            total = live[0].sum()
            for t in live[1:]:
                total = total + t.sum()
            ok = (total - total) == 0
            for flag in flags:
                ok = ok & flag
            blocks.append(len(log_liks))
            # Q is NaN where a check failed: one value says it all
            return (torch.where(ok, q, math.nan), *log_liks, *entropies, *(new[k] for k in names))

        return step, blocks

    def _record(self, key: tuple, e: EChunk) -> tuple[float, EChunk] | None:
        from ..svi.graph_passes import lift_attributes, simplify

        em = self.em
        model, twin = em.model, em.guide.twin
        names, inputs = self._inputs(e)
        live_named = _by_name(model)
        live = [live_named[k] for k in sorted(live_named)]
        backup = [t.detach().clone() for t in live]
        step, blocks = self._step_function(e, names, backup, live)
        try:
            graph, outputs = record_ops(step, inputs)
        except Exception as error:  # reads a value, or cannot be recorded: run eagerly
            self._restore(backup, live)
            self.replays[key] = None
            self.fallbacks[key] = f"{type(error).__name__}: {error}"
            return None
        # the recording ran the iteration: its results stand, if its checks held
        result = self._results(outputs, e, names, blocks[0], backup, live)
        if writes_constant(graph):
            self.replays[key] = None
            self.fallbacks[key] = "the iteration writes in place into a tensor of constants"
            return result
        tidy(graph)
        simplify(graph)
        bound = lift_attributes(graph)
        graph.compile()
        owners = {**{i: ("twin", n) for i, n in _named_tensors(twin).items()}}
        owners.update({i: ("model", n) for i, n in _named_tensors(model).items()})
        slots = [owners.get(id(t)) for t in bound]
        for node in graph.graph.nodes:
            node.meta.pop("val", None)
        replay = _Replay(graph, bound, slots, names, blocks[0])
        replay.states = (tensor_state(model), tensor_state(twin))
        replay.backup, replay.live_names, replay.live = backup, sorted(live_named), live
        self.replays[key] = replay
        return result

    def _replay(self, replay: _Replay, e: EChunk) -> tuple[float, EChunk] | None:
        em = self.em
        replay.bind(em.model, em.guide.twin, self._structures[0])
        _, inputs = self._inputs(e)
        outputs = replay.forward(*inputs)
        result = self._results(outputs, e, replay.names, replay.blocks, replay.backup, replay.live)
        if result is not None:
            self.replayed += 1
        return result

    def _results(self, outputs, e, names, blocks, backup, live) -> tuple[float, EChunk] | None:
        """(Q, the next E-step) from the graph's outputs, or None (parameters put back)
        when a check failed."""
        q = float(outputs[0])
        if not math.isfinite(q):  # a check failed: put theta_t back, run the iteration
            self._restore(backup, live)
            return None
        self.em.guide._cache = None  # (the table of the recording run is not kept)
        log_liks = [float(v) for v in outputs[1 : 1 + blocks]]
        entropies = [float(v) for v in outputs[1 + blocks : 1 + 2 * blocks]]
        return q, EChunk(
            dict(zip(names, outputs[1 + 2 * blocks :], strict=True)),
            sum(log_liks),
            sum(-v for v in entropies),
            e.weight,
            e.rows,
        )

    def _restore(self, backup: list, live: list) -> None:
        """theta_t back into the model and the guide's twin (their E-step's state)."""
        torch._foreach_copy_(live, backup)
        self.em.guide.refresh()


def _structure(module: torch.nn.Module) -> tuple:
    """What a recording of ``module`` depends on, its tensors' identities aside: the
    class, and each parameter's and buffer's name, shape, dtype, device and grad flag."""
    tensors = _by_name(module)
    return (type(module), id(module)) + tuple(
        (k, t.shape, t.dtype, t.device, t.requires_grad) for k, t in sorted(tensors.items())
    )
