"""Summing discrete latent sites out of a Pyro program with Pyro's parallel enumeration.

This is the one place where "z is summed out" happens. The exact-posterior guide
(EM-MIX.1) and every model's exact ``log_likelihood`` are built on it, with no
model-specific code: the program is run once under ``poutine.enum``; every discrete
latent site gets its own tensor dimension to the left of the plates, and the
log-probabilities of all sites are added by broadcasting into one table.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from opt_einsum import contract
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import _ENUM_ALLOCATOR
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
