"""The exact-posterior guide q_d(z) = p(z | x_d; theta~): with it, maximising the ELBO is EM.

Nothing here knows which model it serves. The guide runs the model once under Pyro's
parallel enumeration (:func:`elbolab.models.enumeration.enumerate_joint`), which gives
log p(x_d, z; theta~) for every value of every discrete latent site, and normalises:

    r_dk = pi_k p_k(x_d) / sum_k' pi_k' p_k'(x_d)                     (EM-MIX.1)

It is a valid Pyro guide: the same signature as the model, the same plates and scales,
and a ``"z"`` site marked for parallel enumeration, so ``TraceEnum_ELBO`` with it sums
over z exactly and returns sum_d LB_d(q_d, theta), which at theta = theta~ equals
sum_d log p(x_d; theta~) (EM-TIGHT).

theta~ is held fixed for the M-step: :meth:`ExactPosterior.refresh` (the E-step, EM-1
step 1) copies the model's current parameters into a frozen twin; until the next refresh
the guide answers from that twin, whatever the optimiser does to the model. Before the
first refresh the guide follows the live model (without gradients).

The twin's enumeration is recorded once per data shape and replayed
(:class:`~elbolab.models.enumeration.RecordedJoint`): the same torch operations on the same
tensors, without Pyro's handlers. ``ExactPosterior(model, record=False)`` runs Pyro's
enumeration on every call.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from opt_einsum import contract
from pyro import poutine
from pyro.nn import PyroModule

from ..models.base import MixtureModel
from ..models.enumeration import (
    EnumeratedJoint,
    FactorGraph,
    RecordedJoint,
    enumerate_factors,
    enumerate_joint,
    tensor_state,
)

#: calls with one data shape before the twin's enumeration is recorded: recording costs as
#: much as ten to twenty eager calls on a few hundred rows, so short fits never pay it
RECORD_AFTER = 8


class ExactPosterior(PyroModule):
    """q_d(z) = p(z | x_d; theta~) computed from ``model`` by enumeration.

    Parameters
    ----------
    model:
        A Pyro program (usually a :class:`~elbolab.models.MixtureModel`) whose latent sites
        are discrete with finite support, each inside the plates of the data.
    max_plate_nesting:
        Number of plates around the latent sites (1 for the mixtures).
    record:
        Record the frozen twin's enumeration once per data shape (at its
        ``RECORD_AFTER``-th call) and replay it
        (:class:`~elbolab.models.enumeration.RecordedJoint`; the same table, computed
        without Pyro's bookkeeping); ``False`` runs Pyro's enumeration on every call.

    Call it exactly like the model: ``guide(x)`` / ``guide(x, sample_weight)``.
    """

    def __init__(self, model, max_plate_nesting: int = 1, record: bool = True) -> None:
        super().__init__()
        # A tuple keeps the model out of this module's parameters and state_dict.
        self._model_ref = (model,)
        self.max_plate_nesting = max_plate_nesting
        self._frozen: tuple = ()  # (frozen copy of the model holding theta~,) or ()
        self._cache: tuple[tuple, EnumeratedJoint] | None = None
        self.record = bool(record)
        self.recorded = RecordedJoint(record_after=RECORD_AFTER)
        # (the model's tensor_state, its tensors, the twin's): theta~ := theta by copies
        self._pairs: tuple | None = None

    @property
    def model(self):
        return self._model_ref[0]

    # ------------------------------------------------------------------ E-step
    @torch.no_grad()
    def refresh(self, *args, **kwargs) -> ExactPosterior:
        """E-step (EM-1 step 1): freeze theta~ := theta, and q_d(z) := p(z | x_d; theta~).

        With data arguments, the posterior for them is computed now and cached, so the
        M-step that follows reuses it.
        """
        self._freeze()
        self._cache = None
        if args or kwargs:
            self._cache = (self._key(args, kwargs), self._enumerate(args, kwargs))
        return self

    def _freeze(self) -> None:
        """theta~ := theta: the model's state copied into the twin (made on first use, and
        again when the model's tensors change shape)."""
        model, twin = self.model, self.twin
        pairs, state = self._pairs, tensor_state(model)
        if twin is not None and pairs is not None and pairs[0] == state:
            torch._foreach_copy_(pairs[2], pairs[1])  # what load_state_dict copies
            return
        live = model.state_dict(keep_vars=True)
        if twin is None or {k: v.shape for k, v in twin.state_dict().items()} != {
            k: v.shape for k, v in live.items()
        }:
            twin = copy.deepcopy(model)
            for p in twin.parameters():
                p.requires_grad_(False)
            self._frozen = (twin,)  # a tuple keeps it out of this module's submodules
            self.recorded.clear()  # its recordings read the old twin's tensors
        else:
            twin.load_state_dict(live)
        mine = twin.state_dict(keep_vars=True)
        self._pairs = None
        if set(mine) == set(live) and all(
            isinstance(v, torch.Tensor) and mine[k].dtype == v.dtype for k, v in live.items()
        ):
            names = sorted(live)
            self._pairs = (state, [live[k] for k in names], [mine[k] for k in names])

    @torch.no_grad()
    def fix(self, log_probs: torch.Tensor, *args, **kwargs) -> ExactPosterior:
        """Hold q at given log-probabilities (N, K) for these data (one latent site).

        Used to start EM from initial responsibilities, as scikit-learn does: the first
        M-step then fits the parameters to them.
        """
        joint = self.refresh(*args, **kwargs)._cache[1]
        if len(joint.sites) != 1:
            raise ValueError("fix() supports models with a single latent site")
        table = log_probs.to(joint.log_joint.dtype).movedim(-1, joint.enum_dim(0))
        joint = EnumeratedJoint(
            table,
            joint.sites,
            joint.cardinalities,
            joint.frames,
            joint.scales,
            joint.max_plate_nesting,
        )
        self._cache = (self._cache[0], joint)
        return self

    def release(self) -> ExactPosterior:
        """Drop theta~: the guide follows the live model again."""
        self._frozen, self._cache, self._pairs = (), None, None
        self.recorded.clear()
        return self

    @property
    def twin(self):
        """The frozen copy of the model holding theta~, or None before :meth:`refresh`."""
        return self._frozen[0] if self._frozen else None

    @property
    def frozen(self) -> bool:
        """Whether a theta~ is held (after :meth:`refresh`)."""
        return bool(self._frozen)

    @staticmethod
    def _key(args, kwargs) -> tuple:
        # ``guide(x)`` and ``guide(x, None)`` are the same call
        items = list(args) + [(k, kwargs[k]) for k in sorted(kwargs)]
        return tuple(
            (id(a), tuple(a.shape), a._version) if isinstance(a, torch.Tensor) else id(a)
            for a in items
            if a is not None
        )

    def _joint_path(self) -> bool:
        """Whether the posterior is tabulated jointly per datum: a mixture's one site. Any
        other program takes the factor graph (variable elimination, per-factor marginals)."""
        return isinstance(self.model, MixtureModel)

    @torch.no_grad()
    def _enumerate(self, args, kwargs) -> EnumeratedJoint | FactorGraph:
        source = self.twin if self.frozen else self.model
        if self._joint_path():
            # the twin changes only by refresh (the live model may be inside an optimiser's
            # step, and is enumerated as it is)
            enumerate_fn = self.recorded if self.record and self.frozen else enumerate_joint
            return enumerate_fn(source, *args, max_plate_nesting=self.max_plate_nesting, **kwargs)
        return enumerate_factors(source, *args, max_plate_nesting=self.max_plate_nesting, **kwargs)

    def replays(self, *args, **kwargs) -> bool:
        """Whether the twin's enumeration for these arguments is replayed from a recording
        (a refresh with them has recorded it)."""
        if not (self.record and self.frozen and self._joint_path()):
            return False
        with torch.no_grad():  # (as a refresh enumerates)
            key = self.recorded._key(self.twin, args, kwargs, self.max_plate_nesting)
        return key is not None and self.recorded.recordings.get(key) is not None

    def _posterior(self, args, kwargs) -> EnumeratedJoint | FactorGraph:
        if self._cache is not None and self._cache[0] == self._key(args, kwargs):
            return self._cache[1]
        return self._enumerate(args, kwargs)

    def joint(self, *args, **kwargs) -> EnumeratedJoint:
        """The enumerated log p(x, z; theta~) for these data (cached after :meth:`refresh`)."""
        posterior = self._posterior(args, kwargs)
        if isinstance(posterior, FactorGraph):
            source = self.twin if self.frozen else self.model
            return enumerate_joint(
                source, *args, max_plate_nesting=self.max_plate_nesting, **kwargs
            )
        return posterior

    def factor_graph(self, *args, **kwargs) -> FactorGraph:
        """The program's factors at theta~ for these data (cached after :meth:`refresh`)."""
        posterior = self._posterior(args, kwargs)
        if isinstance(posterior, FactorGraph):
            return posterior
        source = self.twin if self.frozen else self.model
        return enumerate_factors(source, *args, max_plate_nesting=self.max_plate_nesting, **kwargs)

    # ------------------------------------------------------------------ what EM reads
    def marginals(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Each latent site's posterior marginal p(z_j | x; theta~), by site name, each of
        shape (plate..., K_j) (a mixture: {"z": r (N, K)}; a chain: one entry per step)."""
        posterior = self._posterior(self._checked(args), kwargs)
        if isinstance(posterior, EnumeratedJoint):
            return {
                name: _marginal_of_joint(posterior, j).exp()
                for j, name in enumerate(posterior.sites)
            }
        return {name: posterior.site_marginal(name) for name in posterior.sites}

    def log_likelihood(self, *args, **kwargs) -> float:
        """sum_d log p(x_d; theta~), z summed out (unweighted)."""
        posterior = self._posterior(args, kwargs)
        if isinstance(posterior, EnumeratedJoint):
            return float(posterior.log_marginal().sum())
        return float(posterior.log_partition.detach())

    def expected_log_joint(self, *args, **kwargs) -> torch.Tensor:
        """Q(theta~, theta) = E_q~[log p(x, z; theta)] at the live model's theta, z summed
        exactly under the frozen q (HMM-Q, EM-2); differentiable in theta.

        Plus the entropy H(q~) this is Pyro's ELBO with the guide frozen (LB-1), so
        maximising it is the M-step of EM for any program (generalised EM).
        """
        posterior = self._posterior(args, kwargs)
        if isinstance(posterior, EnumeratedJoint):
            live = enumerate_joint(
                self.model, *args, max_plate_nesting=self.max_plate_nesting, **kwargs
            )
            q = _joint_probs(posterior)
            scale = _joint_scale(posterior)
            return (torch.where(q > 0, q * live.log_joint, 0.0) * scale).sum()
        return _expected_log_factors(self.model, posterior, args, kwargs, self.max_plate_nesting)

    def entropy(self, *args, **kwargs) -> float:
        """H(q~) = log p(x; theta~) - Q(theta~, theta~) summed over the data (EM-TIGHT,
        LB-1); for a mixture -sum_d sum_k r_dk log r_dk, taken directly."""
        posterior = self._posterior(args, kwargs)
        if isinstance(posterior, EnumeratedJoint):
            q = _joint_probs(posterior)
            log_q = posterior.log_joint - posterior.log_joint_normaliser()
            scale = _joint_scale(posterior)
            return -float((torch.where(q > 0, q * log_q, 0.0) * scale).sum())
        q_tilde = _expected_log_factors(None, posterior, args, kwargs, self.max_plate_nesting)
        return float(posterior.log_partition.detach() - q_tilde.detach())

    # ------------------------------------------------------------------ posterior
    @staticmethod
    def _site_logits(joint: EnumeratedJoint, j: int) -> torch.Tensor:
        """log q(z_j | z_<j, x): sum out later sites, normalise over z_j, put z_j last."""
        table = joint.log_joint
        for later in range(len(joint.sites) - 1, j, -1):
            table = table.logsumexp(dim=joint.enum_dim(later), keepdim=True)
        dim = joint.enum_dim(j)
        table = table - table.logsumexp(dim=dim, keepdim=True)
        table = table.movedim(dim, -1)
        # drop the size-1 dims left by later sites
        extra = len(joint.sites) - 1 - j
        return table.reshape(table.shape[extra:])

    def _checked(self, args: tuple) -> tuple:
        """The data argument checked by the model (fitted? right width? finite?), if it can."""
        model = self.model
        require = getattr(model, "_require_built", None)
        if require is not None:
            require()
        validate = getattr(model, "validate_data", None)
        if validate is not None and args and args[0] is not None:
            args = (validate(args[0]),) + tuple(args[1:])
        return args

    def log_probs(self, *args, site: str | None = None, **kwargs) -> torch.Tensor:
        """log q_d(z = k) for the first latent site (or ``site``), shape (N, K).

        The data are checked by the model first (``ValueError`` naming the fix for an
        unfitted model, another feature count, NaN, ...).
        """
        args = self._checked(args)
        joint = self.joint(*args, **kwargs)
        j = 0 if site is None else joint.sites.index(site)
        return self._site_logits(joint, j)

    def probs(self, *args, site: str | None = None, **kwargs) -> torch.Tensor:
        """Responsibilities r_dk = p(z_d = k | x_d; theta~), shape (N, K) (EM-MIX.1)."""
        return self.log_probs(*args, site=site, **kwargs).exp()

    # ------------------------------------------------------------------ the Pyro program
    def forward(self, *args, **kwargs):
        """Sample (or, under ``TraceEnum_ELBO``, enumerate) every latent site from q.

        Each site is drawn from its exact conditional given the sites before it,
        q(z_j | z_<j, x) = p(z_j | z_<j, x; theta~), so the estimate of one sample is
        log p(x) exactly (KL = 0: BASIC). A mixture's conditionals come from its joint
        table; a chain's (or tree's) from the pairwise marginals of its factors,
        p(z_j | z_pa, x) = p(z_j, z_pa | x) / p(z_pa | x), the chain run under
        ``pyro.markov`` so that enumerating it needs a few tensor dimensions only.
        """
        posterior = self._posterior(args, kwargs)
        if isinstance(posterior, FactorGraph):
            return self._chain_program(posterior)
        joint = posterior
        values = {}
        with ExitStack() as plates:
            opened = set()
            for j, name in enumerate(joint.sites):
                for frame in sorted(joint.frames[j], key=lambda f: -f.dim):
                    if frame.name not in opened:  # each plate once, shared by the sites
                        plates.enter_context(pyro.plate(frame.name, frame.size, dim=frame.dim))
                        opened.add(frame.name)
                with poutine.scale(scale=joint.scales[j]):
                    values[name] = pyro.sample(
                        name,
                        dist.Categorical(logits=self._site_logits(joint, j)),
                        infer={"enumerate": "parallel"},
                    )
        return values

    def _chain_program(self, graph: FactorGraph) -> dict[str, torch.Tensor]:
        """The guide program of a factor graph whose sites each have at most one parent."""
        conditionals = _conditionals(graph)
        order = {name: j for j, name in enumerate(graph.sites)}
        history = max(
            [order[n] - order[p] for n, (p, _) in conditionals.items() if p is not None],
            default=1,
        )
        values, frames = {}, {}
        for name in graph.sites:  # every plate opened once, outside the chain
            for frame in graph.trace.nodes[name]["cond_indep_stack"]:
                if frame.vectorized:
                    frames[frame.name] = frame
        with ExitStack() as plates:
            for frame in sorted(frames.values(), key=lambda f: -f.dim):
                plates.enter_context(pyro.plate(frame.name, frame.size, dim=frame.dim))
            # a model run under pyro.markov is enumerated with recycled dimensions, and the
            # guide's draws must be too; any other model keeps one dimension per site
            markov = any("_markov_scope" in graph.trace.nodes[n]["infer"] for n in graph.sites)
            steps = range(len(graph.sites))
            for j in pyro.markov(steps, history=max(history, 1)) if markov else steps:
                name = graph.sites[j]
                site = graph.trace.nodes[name]
                parent, logits = conditionals[name]
                if parent is not None:
                    index = values[parent]
                    if logits.dim() == 3:  # (plate, K_parent, K): pick each element's row
                        logits = logits[torch.arange(logits.shape[0]), index]
                    else:
                        logits = logits[index]
                mask = site["mask"] if site["mask"] is not None else True
                with poutine.mask(mask=mask):
                    values[name] = pyro.sample(
                        name, dist.Categorical(logits=logits), infer={"enumerate": "parallel"}
                    )
        return values


def _conditionals(graph: FactorGraph) -> dict[str, tuple[str | None, torch.Tensor]]:
    """log q(z_j | z_parent, x) of every site: ``(parent or None, logits)`` with logits of
    shape (plate..., K_parent, K_j) (or (plate..., K_j) without a parent).

    Exact when each site's earlier neighbours in the factor graph are its own factor's
    (chains and trees in program order); ``ValueError`` naming the fix otherwise.
    """
    scopes, order = graph.scopes(), {n: j for j, n in enumerate(graph.sites)}
    out = {}
    for name in graph.sites:
        earlier = set().union(*(s for s in scopes.values() if name in s)) - {name}
        earlier = {n for n in earlier if order[n] < order[name]}
        parents = graph.parents(name)
        if not earlier <= set(parents) or len(parents) > 1:
            raise ValueError(
                f"latent site {name!r} depends on {sorted(earlier)} through other factors "
                "than its own; the exact guide draws each site given one parent (a chain or "
                "a tree in program order). Reorder the program so that each site's "
                "distribution names the earlier site it depends on, or use a mixture's "
                "single latent site."
            )
        m = graph.factor_marginals()[name]
        symbol = graph.symbols[name]
        plates = "".join(d for d in m._pyro_dims if d not in graph._sum_dims)
        pa = graph.symbols[parents[0]] if parents else ""
        table = contract(f"{m._pyro_dims}->{plates}{pa}{symbol}", m)
        norm = table.sum(-1, keepdim=True)
        uniform = torch.full_like(table, 1.0 / table.shape[-1])
        probs = torch.where(
            norm > 0, table / norm.clamp_min(torch.finfo(table.dtype).tiny), uniform
        )
        out[name] = (parents[0] if parents else None, probs.log())
    return out


def _expected_log_factors(model, graph: FactorGraph, args, kwargs, nesting: int) -> torch.Tensor:
    """sum_f sum m_f log phi_f(theta) with the factors of ``model`` (None: theta~, the
    graph's own), masked and with sample scales applied as in Pyro's ELBO."""
    live = (
        graph
        if model is None
        else enumerate_factors(model, *args, max_plate_nesting=nesting, partition=False, **kwargs)
    )
    total = 0.0
    for name, m in graph.factor_marginals().items():
        log_phi = live.trace.nodes[name]["packed"]["log_prob"]  # scaled and masked
        if not isinstance(log_phi, torch.Tensor):
            total = total + m.sum() * float(log_phi)
            continue
        log_phi = _aligned(log_phi, m._pyro_dims)
        # 0 log 0 = 0, and no gradient through configurations q gives no mass
        total = total + (m * torch.where(m > 0, log_phi, 0.0)).sum()
    return total


def _aligned(t: torch.Tensor, dims: str) -> torch.Tensor:
    """A packed tensor laid out on ``dims`` (a superset of its own), size 1 where absent."""
    own = t._pyro_dims
    if own == dims:
        return t
    order = [own.index(d) for d in dims if d in own]
    t = t.permute(order) if order != list(range(len(order))) else t
    shape, present = [], iter(t.shape)
    for d in dims:
        shape.append(next(present) if d in own else 1)
    return t.reshape(shape)


def _joint_probs(joint: EnumeratedJoint) -> torch.Tensor:
    """q(z | x) of a joint table: the table normalised over every latent site."""
    return (joint.log_joint - joint.log_joint_normaliser()).exp()


def _joint_scale(joint: EnumeratedJoint):
    """The sample weights of a joint table (the scale of its first site), or 1."""
    scale = joint.scales[0]
    return scale if isinstance(scale, torch.Tensor) else float(scale)


def _marginal_of_joint(joint: EnumeratedJoint, j: int) -> torch.Tensor:
    """log p(z_j | x) of a joint table, shape (plate..., K_j)."""
    table = joint.log_joint - joint.log_joint_normaliser()
    for other in range(len(joint.sites) - 1, -1, -1):
        if other != j:
            table = table.logsumexp(dim=joint.enum_dim(other), keepdim=True)
    table = table.movedim(joint.enum_dim(j), -1)
    return table.reshape(table.shape[len(joint.sites) - 1 :])
