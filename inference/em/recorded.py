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

Recording costs a few tens of milliseconds, as much as ten to twenty ordinary iterations
on a few hundred rows, so it happens at iteration ``WARMUP + 1`` of a fit: fits that stop
sooner never pay it. The recording is the iteration itself (its results are used), and
the starts of ``n_init`` replay one recording, each with its own parameters.
"""

from __future__ import annotations

import functools
import math

import pyro
import torch

from ...models.enumeration import (
    as_torchscript,
    deferred_checks,
    record_ops,
    tensor_state,
    tidy,
    writes_constant,
)
from .family import Chunk, EChunk

#: ordinary iterations of a fit before its iteration is recorded
WARMUP = 8
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
    """A recorded iteration: the graph, and where each tensor it reads comes from.

    ``slots[i]`` says what the graph's i-th bound tensor is: ``("model", name)`` or
    ``("twin", name)`` (the fit's own, bound by name), ``("backup", j)`` (the fit's own
    copy of theta_t), or None (a constant of the graph). One replay may serve several fits
    (of models of the same structure), each binding its own tensors.
    """

    def __init__(self, graph, bound: tuple, slots: list, names, blocks: int, live_names):
        self.graph, self.bound, self.slots = graph, tuple(bound), slots
        self.names, self.blocks, self.live_names = names, blocks, live_names
        self.traced = None  # the graph as TorchScript, made at the first replay

    def run(self, bound: tuple, *inputs: torch.Tensor):
        """One replay: the graph on this fit's tensors ``bound`` and the iteration's inputs,
        run as TorchScript (:func:`~elbolab.models.enumeration.as_torchscript`)."""
        if self.traced is None:
            self.traced = as_torchscript(self.graph, (*bound, *inputs))
        return self.traced(*bound, *inputs)

    def bind(self, model, twin, backup: list) -> tuple:
        """(forward, live): the graph with this fit's tensors, and the model's tensors in
        the order of the backup."""
        current = {"model": _by_name(model), "twin": _by_name(twin)}
        bound = list(self.bound)
        for i, slot in enumerate(self.slots):
            if slot is not None:
                owner, name = slot
                bound[i] = backup[name] if owner == "backup" else current[owner][name]
        live = [current["model"][k] for k in self.live_names]
        return functools.partial(self.run, tuple(bound)), live


#: recordings of the built-in families, shared by every fit of the same structure
_SHARED: dict[tuple, _Replay | None] = {}
MAX_SHARED = 32


class RecordedStep:
    """The iterations of one batch fit of a mixture on data in memory, recorded and replayed.

    ``step(e)`` does what one iteration of the batch loop does after the E-step ``e``:
    the M-step from ``e.stats``, the bound's Q, the check of the parameters and the next
    E-step, and returns ``(Q, next e)``; or None, and changes nothing, where the caller
    is to run the iteration itself. Recordings of the built-in families (the model's
    class exactly ``GaussianMixture``, ``BernoulliMixture``, ``PoissonMixture`` or
    ``CategoricalMixture``) are shared by all fits in the process with the same model
    structure, data shape and options; others belong to this fit.
    """

    def __init__(self, em, x: torch.Tensor, w: torch.Tensor | None) -> None:
        self.em, self.x, self.w = em, x, w
        self.calls = 0
        shared = _shareable(em.model)
        self.replays: dict[tuple, _Replay | None] = _SHARED if shared else {}
        self.fallbacks: dict[tuple, str] = {}
        self.replayed = 0  # iterations replayed (for tests and benchmarks)
        self._structures: tuple | None = None  # (tensor states, structures) of model, twin
        self._bound: tuple | None = None  # (replay, states, forward, live, backup)

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
        family = em.family
        return (
            self._structures[1],
            type(family),
            type(family.component),
            _signature(self.x),
            _signature(self.w),
            stats,
            e.rows,
            em.reg_covar,
            em.guide.max_plate_nesting,
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
                if self.calls <= WARMUP or not self.em.guide.replays(self.x, self.w):
                    return None  # (the E-step inside is the guide's replay, once recorded)
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
        checked = live
        if getattr(family.component, "checks_finite", False):
            checked = [_by_name(em.model)["weights_unconstrained"]]

        def step(*tensors):
            x = tensors[0]
            w = tensors[1] if has_w else None
            stats = dict(zip(names, tensors[2 if has_w else 1 :], strict=True))
            torch._foreach_copy_(backup, live)  # theta_t, should a check fail
            with deferred_checks() as flags:
                q = family.maximize_tensor(em, stats, e.rows)  # M-step, Q(theta_t, theta_t+1)
                new, log_liks, entropies = family.e_sums(em, Chunk(x, w))
            # the parameters finite: the sum of all their entries is (a NaN or an infinity
            # makes it not; one that only overflows runs the iteration eagerly). Families
            # whose update checks its own parameters leave the weights only.
            total = None
            for t in checked:
                total = t.sum() if total is None else total + t.sum()
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
        live_names = sorted(live_named)
        live = [live_named[k] for k in live_names]
        backup = [t.detach().clone() for t in live]
        step, blocks = self._step_function(e, names, backup, live)
        try:
            graph, outputs = record_ops(step, inputs)
        except Exception as error:  # reads a value, or cannot be recorded: run eagerly
            self._restore(backup, live)
            self._remember(key, None, f"{type(error).__name__}: {error}")
            return None
        # the recording ran the iteration: its results stand, if its checks held
        result = self._results(outputs, e, names, blocks[0], backup, live)
        if writes_constant(graph):
            self._remember(key, None, "the iteration writes in place into a tensor of constants")
            return result
        tidy(graph)
        simplify(graph)
        bound = lift_attributes(graph)
        graph.compile()
        owners = {id(t): ("backup", j) for j, t in enumerate(backup)}
        owners.update({i: ("twin", n) for i, n in _named_tensors(twin).items()})
        owners.update({i: ("model", n) for i, n in _named_tensors(model).items()})
        slots = [owners.get(id(t)) for t in bound]
        pairs = zip(bound, slots, strict=True)
        template = tuple(None if slot is not None else t for t, slot in pairs)
        for node in graph.graph.nodes:
            node.meta.pop("val", None)
        self._remember(key, _Replay(graph, template, slots, names, blocks[0], live_names))
        return result

    def _remember(self, key: tuple, replay: _Replay | None, why: str | None = None) -> None:
        if self.replays is _SHARED and len(_SHARED) >= MAX_SHARED:
            _SHARED.pop(next(iter(_SHARED)))  # the oldest
        self.replays[key] = replay
        if why is not None:
            self.fallbacks[key] = why

    def _replay(self, replay: _Replay, e: EChunk) -> tuple[float, EChunk] | None:
        em = self.em
        states = self._structures[0]
        bound = self._bound
        if bound is None or bound[0] is not replay or bound[1] != states:
            backup = bound[4] if bound is not None and bound[0] is replay else None
            if backup is None:
                named = _by_name(em.model)
                backup = [named[k].detach().clone() for k in replay.live_names]
            forward, live = replay.bind(em.model, em.guide.twin, backup)
            bound = self._bound = (replay, states, forward, live, backup)
        _, forward, live, backup = bound[1:]
        _, inputs = self._inputs(e)
        result = self._results(forward(*inputs), e, replay.names, replay.blocks, backup, live)
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


def _shareable(model) -> bool:
    """Whether the model is of a built-in family whose program its structure determines."""
    from ...models import BernoulliMixture, CategoricalMixture, GaussianMixture, PoissonMixture

    return type(model) in (GaussianMixture, BernoulliMixture, PoissonMixture, CategoricalMixture)


#: what a built-in family's program reads besides its tensors
_ATTRIBUTES = ("n_components", "n_features_in_", "covariance_type", "n_categories")


def _structure(module: torch.nn.Module) -> tuple:
    """What a recording of ``module`` depends on, its tensors' identities aside: the class
    and, for the built-in families, the attributes their programs read (any other model:
    the module itself), and each parameter's and buffer's name, shape, stride, dtype,
    device and grad flag."""
    tensors = _by_name(module)
    if _shareable(module):
        which = tuple(getattr(module, a, None) for a in _ATTRIBUTES)
    else:
        which = (id(module),)
    return (type(module), which) + tuple(
        (k, t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
        for k, t in sorted(tensors.items())
    )
