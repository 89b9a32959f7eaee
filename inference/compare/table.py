"""One call that fits a model every way it can be fitted, and one table that compares them.

::

    from elbolab.inference import compare
    table = compare(GaussianMixture(2), x, schemes=["em", "direct", "map", "mean-field", "nuts"])
    print(table)                 # a text table (an HTML one in Jupyter)
    table[0]["loglik"]           # a plain list of dicts, one per scheme
    table.to_pandas()            # the same as a DataFrame (pandas comes with ArviZ)
    table.idata["nuts"]          # arviz.InferenceData of each posterior scheme
    table.models["em"]           # each fitted copy; table.fits[name] for everything else

Each scheme (:mod:`.schemes`; the mixture ones are in :mod:`.mixture_schemes`) fits its
own deep copy of the unfitted model, so the model passed in is never changed. Columns:

==================  ==================================================================
``scheme``          the scheme's name
``estimate``        what theta_hat is: MLE, MAP, posterior mean, posterior mean (q)
``loglik``          mean_d log p(x_d; theta_hat), exact (z summed out); for a VAE the
                    importance-weighted estimate (K = 1000), marked ``~`` in the text
``loglik_se``       its Monte Carlo standard error (0: exact)
``loglik_exact``    whether ``loglik`` is exact
``lppd``            posterior schemes: mean_d log mean_s p(x_d | theta_s)
``bound``           mean per-datum bound the scheme maximised (EM's LB, Pyro's ELBO)
``bound_se``        its Monte Carlo standard error (0: exact)
``gap``             ``loglik - bound``: ~0 for EM after convergence (EM-TIGHT); for MAP
                    minus the log prior per datum; for mean-field positive in practice,
                    as VI-MF with BASIC gives ELBO <= log p(x) <= max_theta log p(x; theta)
``n_iter``          iterations (EM steps, optimiser steps, MCMC transitions)
``converged``       the scheme's stopping rule was met (None: it has none)
``time_s``          wall time of the fit
``loglik_vs_ref``   ``loglik`` minus the reference scheme's (default: ``em``)
``theta_vs_ref``    max |theta_hat - theta_ref| over all parameters, components in one order
``flags``           non-convergence, divergences, R-hat, label switching, collapsed
                    components, failures
==================  ==================================================================

:func:`select_k` fits the same schemes for several numbers of components and adds BIC and
AIC (maximum-likelihood fits) and ArviZ's LOO and WAIC with ``az.compare`` ranks and
weights (posterior schemes).
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from ...models.base import as_data_tensor
from . import amortized, linear_gaussian, mixture  # noqa: F401  (register their schemes)
from .posterior import arviz, loo_flags
from .schemes import Scheme, SchemeFit, default_schemes_for, resolve_schemes, schemes_for

if TYPE_CHECKING:
    import arviz as az

COLUMNS = (
    "scheme",
    "estimate",
    "loglik",
    "loglik_se",
    "loglik_exact",
    "lppd",
    "bound",
    "bound_se",
    "gap",
    "n_iter",
    "converged",
    "time_s",
    "loglik_vs_ref",
    "theta_vs_ref",
    "flags",
)

ON_ERROR = ("flag", "raise")


# ---------------------------------------------------------------------------- tables
class Table(list):
    """A list of dict records with a text view, an HTML view and ``to_pandas()``."""

    #: (column, header, format) of the text view
    _view: tuple[tuple[str, str, str], ...] = ()

    def to_pandas(self):
        """The records as a ``pandas.DataFrame`` (pandas is installed with ArviZ)."""
        import pandas as pd

        return pd.DataFrame(list(self))

    def to_string(self) -> str:
        """The table as fixed-width text."""
        cells = [[h for _, h, _ in self._view]]
        for row in self:
            cells.append([self._cell(row, c, f) for c, _, f in self._view])
        widths = [max(len(r[i]) for r in cells) for i in range(len(self._view))]
        lines = []
        for j, r in enumerate(cells):
            parts = [
                v.ljust(w) if i == 0 or self._view[i][2] == "s" else v.rjust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            ]
            lines.append("  ".join(parts).rstrip())
            if j == 0:
                lines.append("-" * len(lines[0]))
        return "\n".join(lines)

    def _cell(self, row: dict, column: str, spec: str) -> str:
        return _fmt(row.get(column), spec)

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return self.to_string()

    def _repr_html_(self) -> str:
        return self.to_pandas().to_html(index=False, na_rep="")


def _fmt(value, spec: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if spec == "s":
        return str(value)
    return format(value, spec)


class Comparison(Table):
    """What :func:`compare` returns: one dict per scheme, in the order asked for.

    A plain ``list`` of records (``table[0]["loglik"]``, ``pandas.DataFrame(table)``), with

    Attributes
    ----------
    fits:
        ``{scheme: SchemeFit}`` -- everything each scheme returned.
    idata:
        ``{scheme: arviz.InferenceData}`` for the posterior schemes (``mean-field``,
        ``nuts``): groups ``posterior``, ``log_likelihood`` (per-datum log p(x_d | theta_s),
        z summed out), ``observed_data``, and for NUTS ``sample_stats``.
    models:
        ``{scheme: fitted model}`` (the copy each scheme fitted; posterior schemes hold the
        posterior mean).
    reference:
        The scheme the ``*_vs_ref`` columns compare with, or ``None``.
    """

    _view = (
        ("scheme", "scheme", "s"),
        ("estimate", "estimate", "s"),
        ("loglik", "log p(x)", ".6f"),
        ("lppd", "lppd", ".6f"),
        ("bound", "bound", ".6f"),
        ("gap", "gap", ".1e"),
        ("n_iter", "iter", "d"),
        ("time_s", "time (s)", ".2f"),
        ("loglik_vs_ref", "dlogp ref", ".1e"),
        ("theta_vs_ref", "dtheta ref", ".1e"),
        ("flags", "flags", "s"),
    )

    def __init__(self, rows=(), *, fits=None, reference=None) -> None:
        super().__init__(rows)
        self.fits: dict[str, SchemeFit] = dict(fits or {})
        self.reference: str | None = reference

    @property
    def idata(self) -> dict[str, az.InferenceData]:
        return {k: f.idata for k, f in self.fits.items() if f.idata is not None}

    @property
    def models(self) -> dict[str, Any]:
        return {k: f.model for k, f in self.fits.items() if f.model is not None}

    def row(self, scheme: str) -> dict:
        """The record of ``scheme``."""
        for r in self:
            if r["scheme"] == scheme:
                return r
        raise KeyError(f"no row for scheme {scheme!r}; the table has {[r['scheme'] for r in self]}")

    def _cell(self, row: dict, column: str, spec: str) -> str:
        if column == "loglik" and not row.get("loglik_exact", True):  # an estimate, marked
            return f"~{row['loglik']:.4f} +- {row['loglik_se']:.4f}"
        return super()._cell(row, column, spec)

    def to_string(self) -> str:
        ref = f" (reference: {self.reference})" if self.reference else ""
        note = ""
        if any(not r.get("loglik_exact", True) for r in self):
            note = "; ~: importance-weighted estimate of log p(x) +- its standard error"
        return super().to_string() + f"\nmean per datum; dlogp/dtheta vs reference{ref}{note}"


# ---------------------------------------------------------------------------- compare
class _DefaultReference(str):
    """``compare``'s default ``reference``: ``"em"``, or none where the model has no em."""


def _default_reference(reference) -> bool:
    return isinstance(reference, _DefaultReference)


def compare(
    model,
    data,
    schemes: Iterable[str] | str | None = None,
    *,
    seed: int = 0,
    reference: str | None = _DefaultReference("em"),
    options: dict[str, dict] | None = None,
    on_error: str = "flag",
    **scheme_options,
) -> Comparison:
    """Fit fresh copies of ``model`` to ``data`` with each scheme; one row per scheme.

    Parameters
    ----------
    model:
        An unfitted model, e.g. ``GaussianMixture(n_components=2)``; never modified (each
        scheme fits its own ``copy.deepcopy``).
    data:
        Array-like (N, D).
    schemes:
        Scheme names, e.g. ``["em", "em-gradient", "direct", "map", "mean-field", "nuts"]``;
        ``None``: every default scheme that fits the model (``default_schemes_for(model)``;
        ``schemes_for(model)`` lists them all, e.g. ``"vb"`` for a full-covariance
        ``GaussianMixture``).
    seed:
        Every scheme starts from the same point for this seed; random draws (SVI, NUTS)
        are seeded from it too, inside ``torch.random.fork_rng`` (the caller's random state
        is left as it was).
    reference:
        The scheme whose fit the ``loglik_vs_ref`` and ``theta_vs_ref`` columns compare
        with (default ``"em"``, the closed form; for a model without an ``em`` scheme, such
        as the VAE, the default is no reference); NaN there if it is not among ``schemes``.
    options:
        Per-scheme options, e.g. ``{"nuts": {"num_chains": 4}}``; they override
        ``scheme_options``. Entries for schemes not in ``schemes`` are ignored.
    on_error:
        ``"flag"`` (default): a scheme that fails gets a row of NaNs and its error in
        ``flags``; ``"raise"``: the error propagates.
    **scheme_options:
        Options given to every scheme that takes them (``init``, ``tol``, ``max_iter``,
        ``num_samples``, ``warmup_steps``, ``num_chains``, ``svi_steps``, ``prior``, ...);
        each must be taken by at least one of the schemes.

    Returns
    -------
    :class:`Comparison`: a list of dicts (columns in :data:`COLUMNS`) with ``.idata``,
    ``.models``, ``.fits`` and ``.to_pandas()``.

    Raises
    ------
    ValueError
        Before anything is fitted: a scheme that is unknown or does not fit the model (the
        message names those that do), an option no scheme takes, a bad value of any option
        of any scheme (each scheme's ``validate``; an ``init`` dict is tried on a copy of
        the model built for the data), a seed outside [0, 2**63), bad data (for the
        Bayesian schemes of a Gaussian mixture also a feature that does not vary).

    A fit that ends on a collapsed Gaussian component (a covariance numerically singular:
    a spike on duplicated points) keeps its numbers and says so in ``flags``
    (``"collapsed: ..."``), as does one whose log p(x) is not finite (``"non-finite: ..."``).
    """
    names = default_schemes_for(model) if schemes is None else schemes
    if not isinstance(names, (str, dict)) and isinstance(names, Iterable):
        names = [*names]  # read once: an iterator is checked, then fitted
    resolve_schemes(model, names)  # first: a bad scheme name is the likeliest mistake
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    _check_seed(seed)
    if reference == "em" and "em" not in schemes_for(model) and _default_reference(reference):
        reference = None  # (a VAE: no closed form to compare with)
    if reference is not None and reference not in schemes_for(model):
        raise ValueError(
            f"reference {reference!r} is not a scheme for {type(model).__name__}; "
            f"use one of {schemes_for(model)} or None"
        )
    x, resolved, per_scheme = _prepare(model, data, names, scheme_options, options)

    fits, times = {}, {}
    for scheme in resolved:
        fit, elapsed = _run(scheme, model, x, int(seed), per_scheme[scheme.name], on_error)
        fits[scheme.name], times[scheme.name] = fit, elapsed
    ref = fits.get(reference) if reference is not None else None
    if ref is not None and not math.isfinite(ref.loglik):
        ref = None
    rows = [_row(name, fit, times[name], ref) for name, fit in fits.items()]
    return Comparison(rows, fits=fits, reference=reference if ref is not None else None)


#: seeds go to torch.manual_seed (64-bit) as seed + chain: below 2**63 leaves room
SEED_LIMIT = 2**63


def _check_seed(seed) -> None:
    if (
        isinstance(seed, (bool, np.bool_))
        or not isinstance(seed, (int, np.integer))
        or not 0 <= seed < SEED_LIMIT
    ):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}; e.g. seed=0")


def _prepare(
    model, data, names, flat: dict, per_scheme: dict | None
) -> tuple[torch.Tensor, list[Scheme], dict[str, dict]]:
    """Every check before the first fit: schemes, data, and each scheme's options.

    Returns the validated data, the schemes and each scheme's resolved options. Each
    scheme's ``validate`` sees the options it will be called with, so a bad value raises
    here instead of becoming a failed row after other schemes have run.
    """
    resolved = resolve_schemes(model, names)
    x = _validate_data(model, data)
    options = _resolve_options(model, resolved, flat, {} if per_scheme is None else per_scheme)
    for scheme in resolved:
        if scheme.validate is not None:
            scheme.validate(model, x, **options[scheme.name])
    return x, resolved, options


def _validate_data(model, data) -> torch.Tensor:
    """Data checked by the model's own ``validate_data`` (on a copy), as a tensor."""
    check = getattr(model, "validate_data", None)
    if check is None:
        return as_data_tensor(data)
    takes_reset = "reset" in inspect.signature(check).parameters
    probe = copy.deepcopy(model)
    return probe.validate_data(data, reset=True) if takes_reset else probe.validate_data(data)


def _resolve_options(
    model, resolved: list[Scheme], flat: dict, per_scheme: dict
) -> dict[str, dict]:
    """Each scheme's options: its defaults, then ``flat`` where it takes them, then its own.

    Options for a scheme of this model that is not being fitted are ignored (one options
    dict can serve several calls); options for a name that is no scheme of it are an error.
    """
    names = [s.name for s in resolved]
    if not isinstance(per_scheme, dict):
        raise ValueError(
            f"options must be a dict {{scheme: {{option: value}}}}, got {per_scheme!r}"
        )
    unknown_schemes = sorted(set(per_scheme) - set(schemes_for(model)))
    if unknown_schemes:
        raise ValueError(
            f"options given for scheme(s) {unknown_schemes}, which are not schemes for "
            f"{type(model).__name__}; its schemes are {schemes_for(model)}"
        )
    taken = set().union(*(s.options for s in resolved))
    unused = sorted(set(flat) - taken)
    if unused:
        raise ValueError(
            f"option(s) {unused} are taken by none of the schemes {names}; "
            f"they take {sorted(taken)}"
        )
    for name, given in per_scheme.items():
        if given is not None and not isinstance(given, dict):
            raise ValueError(
                f"options[{name!r}] must be a dict {{option: value}}, got {given!r}; "
                f"e.g. options={{{name!r}: {{...}}}}"
            )
    out = {}
    for s in resolved:
        mine = dict(per_scheme.get(s.name) or {})
        bad = sorted(set(mine) - set(s.options))
        if bad:
            raise ValueError(
                f"scheme {s.name!r} takes no option(s) {bad}; it takes {sorted(s.options)}"
            )
        out[s.name] = s.options | {k: v for k, v in flat.items() if k in s.options} | mine
    return out


def _run(scheme: Scheme, model, x, seed: int, opts: dict, on_error: str):
    """Fit a fresh copy with one scheme; ConvergenceWarnings become flags."""
    fresh = copy.deepcopy(model)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, torch.random.fork_rng(devices=[]):
        warnings.simplefilter("always", ConvergenceWarning)
        torch.manual_seed(seed)
        try:
            fit = scheme.fn(fresh, x, seed=seed, **opts)
        except Exception as error:  # a failed scheme is a row of the table, not the end
            if on_error == "raise":
                raise
            last = traceback.extract_tb(error.__traceback__)[-1]
            fit = SchemeFit(
                model=None,
                loglik=math.nan,
                estimate="",
                flags=[f"failed: {type(error).__name__}: {error} ({last.name})"],
            )
    elapsed = time.perf_counter() - start
    if fit.model is not None and not math.isfinite(fit.loglik):
        fit.flags.append(
            f"non-finite: log p(x) at the fitted parameters is {fit.loglik}; the fit left "
            "the region where the model is defined (check the flags above, scale the data, "
            "or use fewer components)"
        )
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            fit.flags.append(f"not converged: {w.message}")
        else:  # anything else goes on to the caller's filters
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return fit, elapsed


def _row(name: str, fit: SchemeFit, elapsed: float, ref: SchemeFit | None) -> dict:
    loglik_vs_ref = theta_vs_ref = math.nan
    if ref is not None and math.isfinite(fit.loglik):
        loglik_vs_ref = fit.loglik - ref.loglik
        theta_vs_ref = params_gap(fit.params, ref.params)
    return {
        "scheme": name,
        "estimate": fit.estimate,
        "loglik": float(fit.loglik),
        "loglik_se": float(fit.loglik_se),
        "loglik_exact": bool(fit.loglik_exact),
        "lppd": float(fit.lppd),
        "bound": float(fit.bound),
        "bound_se": float(fit.bound_se),
        "gap": float(fit.loglik - fit.bound),
        "n_iter": int(fit.n_iter),
        "converged": fit.converged,
        "time_s": float(elapsed),
        "loglik_vs_ref": float(loglik_vs_ref),
        "theta_vs_ref": float(theta_vs_ref),
        "flags": "; ".join(fit.flags),
    }


def params_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over the parameters both have with the same shape; NaN if none."""
    gaps = [
        float((a[k] - b[k]).abs().max())
        for k in a.keys() & b.keys()
        if torch.as_tensor(a[k]).shape == torch.as_tensor(b[k]).shape
    ]
    return max(gaps) if gaps else math.nan


# ---------------------------------------------------------------------------- select_k
class Selection(Table):
    """What :func:`select_k` returns: one dict per (number of components, scheme).

    Attributes
    ----------
    comparisons:
        ``{k: Comparison}`` -- the fits behind each row (``.idata``, ``.models``).
    az_compare:
        ``{scheme: pandas.DataFrame}`` -- ``az.compare`` over k for each posterior scheme.
    best:
        ``{criterion: k}``, e.g. ``{"bic (em)": 2, "aic (em)": 2, "loo (nuts)": 2}``.
    """

    _view = (
        ("k", "K", "d"),
        ("scheme", "scheme", "s"),
        ("n_parameters", "params", "d"),
        ("loglik", "log p(x)", ".4f"),
        ("bic", "BIC", ".1f"),
        ("aic", "AIC", ".1f"),
        ("elpd_loo", "elpd_loo", ".1f"),
        ("se_loo", "se", ".1f"),
        ("p_loo", "p_loo", ".1f"),
        ("elpd_waic", "elpd_waic", ".1f"),
        ("rank", "rank", "d"),
        ("weight", "weight", ".2f"),
        ("flags", "flags", "s"),
    )

    def __init__(self, rows=(), *, comparisons=None, az_compare=None, best=None) -> None:
        super().__init__(rows)
        self.comparisons: dict[int, Comparison] = dict(comparisons or {})
        self.az_compare: dict = dict(az_compare or {})
        self.best: dict[str, int] = dict(best or {})

    def to_string(self) -> str:
        best = ", ".join(f"{c}: K={k}" for c, k in self.best.items())
        return super().to_string() + (f"\nbest -- {best}" if best else "")


def select_k(
    make_model: Callable[[int], Any],
    data,
    ks: Iterable[int] = range(1, 5),
    schemes: Iterable[str] | str = ("em", "mean-field"),
    *,
    seed: int = 0,
    ic: str = "loo",
    options: dict[str, dict] | None = None,
    on_error: str = "flag",
    **scheme_options,
) -> Selection:
    """Compare numbers of components: BIC/AIC from ML fits, LOO/WAIC from posterior fits.

    Parameters
    ----------
    make_model:
        ``k -> unfitted model``, e.g. ``lambda k: GaussianMixture(k)``.
    data:
        Array-like (N, D).
    ks:
        Numbers of components to try (positive integers, each once).
    schemes:
        Schemes to fit for every k (see :func:`compare`). Maximum-likelihood schemes
        (estimate ``"MLE"``) get ``bic``/``aic`` (``model.bic(x)``, ``model.aic(x)``: lower is
        better); posterior schemes get ArviZ's ``elpd_loo``, ``p_loo``, ``elpd_waic``,
        ``p_waic`` (sums over the data, log scale: higher is better).
    ic:
        ``"loo"`` or ``"waic"``: what ``az.compare`` ranks the posterior fits by.
    seed, options, on_error, **scheme_options:
        As in :func:`compare`.

    Returns
    -------
    :class:`Selection`: one dict per (k, scheme) with ``rank`` (1 = best: by BIC for
    maximum-likelihood rows, by ``az.compare`` for posterior rows) and ``weight`` (the
    stacking weight from ``az.compare``), plus ``.best``, ``.comparisons``, ``.az_compare``.

    Raises
    ------
    ValueError
        Before anything is fitted: bad ``ks`` or ``ic``; a ``make_model`` that is not a
        function, or whose ``make_model(k)`` is not a model with ``k`` components (a
        factory that ignores k would fit one model for every row); and everything
        :func:`compare` refuses, checked for every k.
    """
    if isinstance(ks, (str, bytes, dict)) or not isinstance(ks, Iterable):
        raise ValueError(
            f"ks must be a list of numbers of components, got {ks!r}; e.g. ks=range(1, 5)"
        )
    ks = list(ks)
    if not ks:
        raise ValueError("ks is empty; pass the numbers of components to try, e.g. range(1, 5)")
    for k in ks:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every k must be a positive integer, got {k!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks has repeated values {ks}; list each number of components once")
    if ic not in ("loo", "waic"):
        raise ValueError(f"ic must be 'loo' or 'waic', got {ic!r}")
    if not callable(make_model) or isinstance(make_model, torch.nn.Module):
        raise ValueError(
            f"make_model must be a function k -> unfitted model, got {make_model!r}; "
            "e.g. make_model=lambda k: GaussianMixture(k)"
        )
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    _check_seed(seed)
    names = schemes
    if not isinstance(names, (str, dict)) and isinstance(names, Iterable):
        names = [*names]  # read once: an iterator is checked for every k, then fitted
    models = {int(k): _model_for(make_model, int(k)) for k in ks}
    for m in models.values():  # every check before the first fit
        x, _, _ = _prepare(m, data, names, scheme_options, options)
    names = [s.name for s in resolve_schemes(next(iter(models.values())), names)]

    comparisons = {
        k: compare(
            m,
            data,
            names,
            seed=seed,
            reference=None,
            options=options,
            on_error=on_error,
            **scheme_options,
        )
        for k, m in models.items()
    }
    rows = []
    for k, comparison in comparisons.items():
        for name in names:
            fit = comparison.fits[name]
            rows.append(_selection_row(k, name, fit, x))
    az_tables = _rank(rows, comparisons, names, ic)
    return Selection(rows, comparisons=comparisons, az_compare=az_tables, best=_best(rows, ic))


def _model_for(make_model: Callable[[int], Any], k: int):
    """``make_model(k)``, refused unless it is a model with ``k`` components."""
    model = make_model(k)
    if model is None or not hasattr(model, "n_components"):
        raise ValueError(
            f"make_model({k}) returned {model!r}, which is not a model with components; "
            "make_model must return a new unfitted model with k components, e.g. "
            "make_model=lambda k: GaussianMixture(k)"
        )
    if model.n_components != k:
        raise ValueError(
            f"make_model({k}) returned a model with n_components={model.n_components!r}, "
            f"not {k}: the factory ignores k, so every row would fit the same model; "
            "pass k on, e.g. make_model=lambda k: GaussianMixture(k)"
        )
    return model


def _selection_row(k: int, name: str, fit: SchemeFit, x: torch.Tensor) -> dict:
    nan = math.nan
    row = {
        "k": k,
        "scheme": name,
        "estimate": fit.estimate,
        "n_parameters": nan,
        "loglik": float(fit.loglik),
        "bic": nan,
        "aic": nan,
        "elpd_loo": nan,
        "se_loo": nan,
        "p_loo": nan,
        "elpd_waic": nan,
        "se_waic": nan,
        "p_waic": nan,
        "pareto_k_max": nan,
        "rank": None,
        "weight": nan,
        "flags": list(fit.flags),
    }
    model = fit.model
    if model is not None and hasattr(model, "n_parameters"):
        row["n_parameters"] = int(model.n_parameters())
    if fit.estimate == "MLE" and model is not None and hasattr(model, "bic"):
        row["bic"], row["aic"] = float(model.bic(x)), float(model.aic(x))
    if fit.idata is not None:
        loo, flags = loo_flags(fit.idata)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            waic = arviz().waic(fit.idata)
        flags += [_waic_flag(str(w.message)) for w in caught]
        row.update(
            elpd_loo=float(loo.elpd_loo),
            se_loo=float(loo.se),
            p_loo=float(loo.p_loo),
            elpd_waic=float(waic.elpd_waic),
            se_waic=float(waic.se),
            p_waic=float(waic.p_waic),
            pareto_k_max=float(np.max(loo.pareto_k)),
        )
        row["flags"] += flags
    return row


def _waic_flag(message: str) -> str:
    """A short flag for ArviZ's WAIC warnings."""
    if "posterior variance of the log predictive densities exceeds" in message:
        return "WAIC: var log p(x_d | theta) > 0.4 for some d (WAIC may fail; prefer LOO)"
    return "WAIC: " + message.strip().split("\n")[0]


def _rank(rows: list[dict], comparisons, names, ic: str) -> dict:
    """Fill ``rank`` and ``weight``; returns ``az.compare``'s table per posterior scheme."""
    tables = {}
    for name in names:
        mine = [r for r in rows if r["scheme"] == name]
        if all(math.isfinite(r["bic"]) for r in mine):
            for rank, r in enumerate(sorted(mine, key=lambda r: r["bic"]), start=1):
                r["rank"] = rank
        idatas = {
            f"K={r['k']}": comparisons[r["k"]].fits[name].idata
            for r in mine
            if comparisons[r["k"]].fits[name].idata is not None
        }
        if len(idatas) == len(mine) and idatas:
            with warnings.catch_warnings():
                # the Pareto-k and WAIC warnings are already in each row's flags
                warnings.simplefilter("ignore", UserWarning)
                # ArviZ's own use of pandas' deprecated ``inplace=``: not ours to change
                warnings.filterwarnings("ignore", message="The inplace keyword in DataFrame")
                table = arviz().compare(idatas, ic=ic)
            tables[name] = table
            for r in mine:
                r["rank"] = int(table.loc[f"K={r['k']}", "rank"]) + 1
                r["weight"] = float(table.loc[f"K={r['k']}", "weight"])
    for r in rows:
        r["flags"] = "; ".join(r["flags"])
    return tables


def _best(rows: list[dict], ic: str) -> dict[str, int]:
    best = {}
    for name in dict.fromkeys(r["scheme"] for r in rows):
        mine = [r for r in rows if r["scheme"] == name]
        criteria = (("bic", "bic", 1), ("aic", "aic", 1), (ic, f"elpd_{ic}", -1))
        for criterion, column, sign in criteria:
            values = [(sign * r[column], r["k"]) for r in mine if math.isfinite(r[column])]
            if len(values) == len(mine) and values:
                best[f"{criterion} ({name})"] = min(values)[1]
    return best
