"""Posterior draws of a mixture: label switching, ArviZ ``InferenceData``, quality flags.

A mixture's likelihood is the same under every permutation of its K components, so a
sampler may visit the K! relabelled copies of each mode -- within a chain (label
switching) or with different chains in different copies. Averages over such draws
mean nothing. :func:`relabel` puts every draw in one canonical order (components sorted
on the first coordinate of a per-component site, e.g. ``means[:, 0]``) and reports what
it had to change. :func:`to_inference_data` turns relabelled draws into ``InferenceData``
with a ``log_likelihood`` group of per-datum log p(x_d | theta_s), z summed out, so
``az.summary``, ``az.plot_trace``, ``az.rhat``, ``az.ess``, ``az.loo`` and ``az.waic`` work.
:func:`nuts_flags` and :func:`loo_flags` turn ArviZ's diagnostics into flags for a table.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ...models.bayesian import BayesianMixture
from ...models.priors import MixturePrior

if TYPE_CHECKING:
    import arviz as az

#: R-hat above this flags a run (Vehtari et al. 2021 recommend 1.01)
RHAT_MAX = 1.01
#: bulk effective sample size below this flags a run
ESS_MIN = 100
#: Pareto k above this flags a LOO estimate as unreliable
PARETO_K_MAX = 0.7


def arviz():
    """ArviZ, imported on first use.

    Its import issues a once-a-day ``FutureWarning`` announcing its next major version.
    That notice concerns ArviZ's own future API, not this code, so it is silenced here
    rather than surfacing (as an error under strict warning filters) wherever
    ``elbolab.inference`` is used.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


@dataclass
class LabelReport:
    """What :func:`relabel` found.

    Attributes
    ----------
    key:
        What the components were sorted on, e.g. ``"means[:, 0]"``.
    n_draws:
        Number of draws (all chains).
    n_permuted:
        Draws whose components were reordered (also when every draw was reordered the
        same way, which changes names only).
    n_switched:
        Draws whose order differs from their chain's most common order.
    switching_chains:
        Chains whose draws were not all in one order (label switching within a chain).
    chain_orders:
        The most common order of each chain before relabelling (a tuple per chain).
    """

    key: str
    n_draws: int
    n_permuted: int
    n_switched: int = 0
    switching_chains: list[int] = field(default_factory=list)
    chain_orders: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def chains_disagree(self) -> bool:
        """Whether chains sat in different labellings before relabelling."""
        return len(set(self.chain_orders)) > 1

    @property
    def changed(self) -> bool:
        """Whether relabelling changed the draws beyond renaming the components once."""
        return bool(self.switching_chains) or self.chains_disagree

    def flags(self) -> list[str]:
        """Short messages for a table; empty when all draws shared one labelling."""
        out = []
        if self.switching_chains:
            out.append(
                f"label switching within chain(s) {self.switching_chains}: "
                f"{self.n_switched}/{self.n_draws} draws relabelled by {self.key}"
            )
        if self.chains_disagree:
            out.append(f"chains disagree on labels: relabelled by {self.key}")
        return out


def component_key(values: dict[str, torch.Tensor], prior: MixturePrior, site: str | None = None):
    """The sorting key of each component: the first coordinate of its slice of ``site``.

    ``site`` defaults to the prior's key site; ``values[site]`` has shape (*sample, K, ...)
    and the key has shape (*sample, K).
    """
    site = site or prior.key
    v = values[site]
    n_event = len(prior.sites[site].event_shape)  # K plus the per-component dims
    return v.flatten(start_dim=v.dim() - n_event + 1)[..., 0] if n_event > 1 else v


def permute_components(
    values: dict[str, torch.Tensor], prior: MixturePrior, order: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Reorder the components of every per-component site: ``order`` (*sample, K)."""
    out = dict(values)
    sample_ndim = order.dim() - 1
    for name in prior.component_sites:
        v = values[name]
        index = order.reshape(order.shape + (1,) * (v.dim() - sample_ndim - 1)).expand(v.shape)
        out[name] = v.gather(sample_ndim, index)
    return out


def relabel(
    values: dict[str, torch.Tensor], prior: MixturePrior, key: str | None = None
) -> tuple[dict[str, torch.Tensor], LabelReport]:
    """Sort every draw's components on ``key`` (default: the prior's key site).

    Parameters
    ----------
    values:
        Site values of shape (C, S, *site shape): C chains of S draws.
    prior:
        The prior of the program the draws came from (``BayesianMixture.prior``): which
        sites are per component.

    Returns
    -------
    The relabelled values (same shapes) and a :class:`LabelReport`.
    """
    site = key or prior.key
    keys = component_key(values, prior, site)  # (C, S, K)
    order = keys.argsort(-1)  # (C, S, K)
    K = order.shape[-1]
    identity = torch.arange(K)
    permuted = (order != identity).any(-1)  # (C, S)
    switching, chain_orders, n_switched = [], [], 0
    for c in range(order.shape[0]):
        orders, counts = order[c].unique(dim=0, return_counts=True)
        if len(orders) > 1:
            switching.append(c)
        majority = orders[counts.argmax()]
        n_switched += int((order[c] != majority).any(-1).sum())
        chain_orders.append(tuple(int(i) for i in majority))
    first = f"{site}[:, 0]" if len(prior.sites[site].event_shape) > 1 else site
    report = LabelReport(
        key=first,
        n_draws=int(permuted.numel()),
        n_permuted=int(permuted.sum()),
        n_switched=n_switched,
        switching_chains=switching,
        chain_orders=chain_orders,
    )
    return permute_components(values, prior, order), report


def _dims(name: str, ndim: int, per_component: bool) -> list[str]:
    """ArviZ dimension names of a parameter with ``ndim`` dims (sample dims excluded)."""
    if per_component:
        return ["component"] + [f"{name}_dim_{i}" for i in range(1, ndim)]
    return [f"{name}_dim_{i}" for i in range(ndim)]


def to_inference_data(
    program: BayesianMixture,
    values: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    diverging: torch.Tensor | None = None,
) -> az.InferenceData:
    """``InferenceData`` from site values (C, S, *site shape), relabelled already.

    Groups: ``posterior`` (the model's parameters in its own layout: ``weights``
    (chain, draw, component), ``means``, ``covariances``, ``probs``, ``rates`` as the
    family has them), ``log_likelihood`` (``x``: (chain, draw, obs), log p(x_d | theta_s)
    with z summed out), ``observed_data`` (``x``: (obs, ...)) and, given ``diverging``
    (C, S), ``sample_stats``.
    """
    with torch.no_grad():
        params = program.prior.model_params(values)
        log_lik = program.log_likelihood(values, x)  # (C, S, N)
    K = program.model.n_components
    posterior, dims = {}, {}
    for name, v in params.items():
        arr = v.detach().cpu().numpy()
        ndim = arr.ndim - 2
        per_component = ndim >= 1 and not _is_shared(program, name)
        posterior[name] = arr
        dims[name] = _dims(name, ndim, per_component)
    obs = x.detach().cpu().numpy()
    dims["x"] = ["obs"] + [f"x_dim_{i}" for i in range(1, obs.ndim)]
    kwargs = {
        "posterior": posterior,
        "log_likelihood": {"x": log_lik.cpu().numpy()},
        "observed_data": {"x": obs},
        "dims": dims,
        "coords": {"component": np.arange(K), "obs": np.arange(obs.shape[0])},
    }
    if diverging is not None:
        kwargs["sample_stats"] = {"diverging": diverging.cpu().numpy().astype(bool)}
    return arviz().from_dict(**kwargs)


def _is_shared(program: BayesianMixture, name: str) -> bool:
    """Whether model parameter ``name`` is shared by all components (tied covariances)."""
    return name == "covariances" and getattr(program.model, "covariance_type", None) == "tied"


def nuts_flags(
    idata: az.InferenceData, *, rhat_max: float = RHAT_MAX, ess_min: float = ESS_MIN
) -> list[str]:
    """Flags for a NUTS run: divergences, R-hat above ``rhat_max``, bulk ESS below ``ess_min``.

    R-hat is ArviZ's rank-normalised split R-hat (so a single chain is split in two) and
    ESS the bulk effective sample size, both over every posterior variable -- which must
    be relabelled first, or label switching alone drives R-hat up. Variables constant
    across draws (NaN R-hat) are skipped.
    """
    out = []
    if "sample_stats" in idata.groups() and "diverging" in idata.sample_stats:
        n_div = int(idata.sample_stats["diverging"].sum())
        if n_div:
            n = int(idata.sample_stats["diverging"].size)
            out.append(f"{n_div}/{n} divergent transitions")
    # a variable constant across draws has 0/0 for R-hat: NaN, skipped below
    with _quiet_shape_check(), np.errstate(invalid="ignore", divide="ignore"):
        rhat = arviz().rhat(idata)
        ess = arviz().ess(idata, method="bulk")
    worst_rhat, worst_var = _extreme(rhat, max)
    if worst_rhat is not None and worst_rhat > rhat_max:
        out.append(f"R-hat {worst_rhat:.3f} > {rhat_max} ({worst_var})")
    lowest_ess, ess_var = _extreme(ess, min)
    if lowest_ess is not None and lowest_ess < ess_min:
        out.append(f"bulk ESS {lowest_ess:.0f} < {ess_min:g} ({ess_var})")
    return out


@contextmanager
def _quiet_shape_check():
    """Hide ArviZ's log line about fewer than 2 chains: R-hat is then split-chain R-hat,
    which is what the flags report on (and one chain is a choice, not an accident)."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Shape validation failed")

    # ArviZ logs through its own ``arviz._log`` (not registered with ``logging``)
    logger = getattr(arviz(), "_log", None) or logging.getLogger("arviz")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _extreme(dataset, pick) -> tuple[float | None, str | None]:
    """The largest (``pick=max``) or smallest finite value over a dataset's variables."""
    best, where = None, None
    for name, da in dataset.data_vars.items():
        values = np.asarray(da.values, dtype=float).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        v = float(pick(values))
        if best is None or (v > best if pick is max else v < best):
            best, where = v, name
    return best, where


def posterior_lppd(log_lik: torch.Tensor) -> float:
    """mean_d log mean_s p(x_d | theta_s) from log p(x_d | theta_s) of shape (C, S, N)."""
    flat = log_lik.reshape(-1, log_lik.shape[-1])
    return float((flat.logsumexp(0) - math.log(flat.shape[0])).mean())


def loo_flags(idata: az.InferenceData) -> tuple[object, list[str]]:
    """``az.loo`` with its Pareto-k warning turned into a flag: (ELPDData, flags).

    The threshold is ArviZ's own for the number of draws (``good_k``, at most
    :data:`PARETO_K_MAX`); above it the importance-sampling estimate of that datum's
    leave-one-out density is unreliable.
    """
    with warnings.catch_warnings():
        # the Pareto-k warning is reported as a flag below, with the count of bad points
        warnings.simplefilter("ignore", UserWarning)
        loo = arviz().loo(idata, pointwise=True)
    k_max = float(getattr(loo, "good_k", PARETO_K_MAX))
    flags = []
    bad = int((np.asarray(loo.pareto_k) > k_max).sum())
    if bad:
        flags.append(f"LOO: {bad} Pareto k > {k_max:.2f}")
    return loo, flags
