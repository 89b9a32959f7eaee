"""Inference schemes looked up by (name, model class), the pattern of ``register_kl``.

A scheme fits one model one way and reports what :func:`~elbolab.inference.compare`
tabulates. It is a function

    fn(model, x, *, seed, **options) -> SchemeFit

that receives a fresh copy of the user's model (it may build and change it), the
validated data ``x`` (N, D), the seed, and its own keyword-only options, whose defaults
are read from its signature. Registering one for a model class is one decorator::

    @register_scheme("closed-form", PPCA, description="maximum likelihood in closed form")
    def _ppca_closed_form(model, x, *, seed, centre=True):
        ...
        return SchemeFit(model=model, loglik=..., estimate="MLE", params={"W": ...})

Lookup walks the model's class hierarchy (a subclass inherits its parents' schemes), and a
scheme may also say it ``applies`` to some instances only (e.g. families with a prior)
and ``validate`` its options and the data before anything is fitted.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: fn(model, x, *, seed, **options) -> SchemeFit
SchemeFn = Callable[..., "SchemeFit"]


@dataclass
class SchemeFit:
    """What one scheme produced.

    Attributes
    ----------
    model:
        The fitted copy, holding the point estimate theta_hat (for posterior schemes the
        posterior mean, or the MAP).
    loglik:
        Mean per-datum log p(x_d; theta_hat): exact (z summed out) where the model has it in
        closed form, else an estimate (``loglik_exact`` False), e.g. the importance-weighted
        one of a VAE.
    loglik_exact:
        Whether ``loglik`` is exact.
    loglik_se:
        Monte Carlo standard error of ``loglik`` (0 where it is exact).
    estimate:
        What theta_hat is: ``"MLE"``, ``"MAP"``, ``"posterior mean"``, ...
    bound:
        Mean per-datum lower bound the scheme maximised (EM's LB, an ELBO); NaN if none.
    bound_se:
        Monte Carlo standard error of ``bound`` (0 for an exact bound, NaN if none).
    n_iter:
        Iterations (EM steps, optimiser steps, or MCMC transitions over all chains).
    converged:
        The scheme's own stopping rule was met; ``None`` where it has none.
    params:
        theta_hat in a canonical layout (components in a fixed order), to compare schemes.
    lppd:
        Posterior schemes: mean_d log mean_s p(x_d | theta_s), the posterior-averaged
        log-likelihood per datum (ArviZ's lppd / N); NaN for point estimates.
    idata:
        ``arviz.InferenceData`` of posterior schemes, else ``None``.
    flags:
        Anything a reader should know: non-convergence, divergences, R-hat, relabelling.
    result:
        The scheme's own record (``EMResult``, a fit object from :mod:`.bayesian`).
    """

    model: Any
    loglik: float
    estimate: str
    bound: float = math.nan
    bound_se: float = math.nan
    n_iter: int = 0
    converged: bool | None = None
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    lppd: float = math.nan
    idata: Any = None
    loglik_exact: bool = True
    loglik_se: float = 0.0
    flags: list[str] = field(default_factory=list)
    result: Any = None


@dataclass
class Scheme:
    """A registered scheme: its function, where it applies, and its options."""

    name: str
    model_class: type
    fn: SchemeFn
    description: str = ""
    applies: Callable[[Any], bool] | None = None
    validate: Callable[..., None] | None = None
    default: bool = True

    @property
    def options(self) -> dict[str, Any]:
        """Keyword-only options of the scheme and their defaults (``seed`` excluded)."""
        return {
            p.name: p.default
            for p in inspect.signature(self.fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "seed"
        }

    def fits(self, model) -> bool:
        """Whether this scheme fits ``model`` (its class, and ``applies`` if given)."""
        return isinstance(model, self.model_class) and (
            self.applies is None or bool(self.applies(model))
        )


# name -> model class -> Scheme; names keep their first registration order
_SCHEMES: dict[str, dict[type, Scheme]] = {}


def register_scheme(
    name: str,
    model_class: type,
    *,
    description: str = "",
    applies: Callable[[Any], bool] | None = None,
    validate: Callable[..., None] | None = None,
    default: bool = True,
) -> Callable[[SchemeFn], SchemeFn]:
    """Decorator registering scheme ``name`` for ``model_class`` (and its subclasses).

    ``fn(model, x, *, seed, **options) -> SchemeFit``; its keyword-only arguments other
    than ``seed`` are its options. ``applies(model) -> bool`` narrows it to some instances;
    ``validate(model, x, **options)`` raises ``ValueError`` for bad options or data before
    any scheme is fitted. ``default=False``: run only when named (``compare``'s
    ``schemes=None`` runs :func:`default_schemes_for`). Registering the same (name, class)
    again replaces the scheme.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a scheme name must be a non-empty string, got {name!r}")
    if not isinstance(model_class, type):
        raise TypeError(f"register_scheme expects a class, got {model_class!r}")

    def decorator(fn: SchemeFn) -> SchemeFn:
        params = inspect.signature(fn).parameters
        if "seed" not in params or params["seed"].kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"scheme {name!r}: {fn.__name__} must take a keyword-only 'seed'")
        _SCHEMES.setdefault(name, {})[model_class] = Scheme(
            name,
            model_class,
            fn,
            description or (fn.__doc__ or "").strip().split("\n")[0],
            applies,
            validate,
            default,
        )
        return fn

    return decorator


def lookup_scheme(name: str, model) -> Scheme | None:
    """Scheme ``name`` for ``model`` (nearest registered class in its MRO), else None."""
    by_class = _SCHEMES.get(name, {})
    for cls in type(model).__mro__:
        if cls in by_class:
            scheme = by_class[cls]
            return scheme if scheme.fits(model) else None
    return None


def schemes_for(model) -> list[str]:
    """Names of the schemes that fit ``model``, in registration order."""
    return [name for name in _SCHEMES if lookup_scheme(name, model) is not None]


def default_schemes_for(model) -> list[str]:
    """The schemes ``compare`` runs when none are named: those registered as default."""
    return [name for name in schemes_for(model) if lookup_scheme(name, model).default]


def resolve_schemes(model, names: Iterable[str] | str) -> list[Scheme]:
    """The schemes ``names`` for ``model``; ``ValueError`` naming those that fit otherwise."""
    available = schemes_for(model)
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, Iterable) or isinstance(names, (dict, bytes)):
        raise ValueError(
            f"schemes must be a scheme name or a list of names, got {names!r}; "
            f"e.g. schemes={available[:2]} (the schemes that fit this model are {available})"
        )
    names = list(names)
    if not names:
        raise ValueError(f"no schemes given; the schemes that fit this model are {available}")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"scheme(s) {duplicated} given more than once; list each once")
    bad = [n for n in names if lookup_scheme(n, model) is None]
    if bad:
        what = type(model).__name__
        detail = (
            f"the schemes that fit this {what} are {available}"
            if available
            else f"no scheme is registered for {what}; register one with "
            "elbolab.inference.register_scheme"
        )
        unknown = [n for n in bad if n not in _SCHEMES]
        unfit = [n for n in bad if n in _SCHEMES]
        parts = [f"unknown scheme(s) {unknown}"] if unknown else []
        parts += [f"scheme(s) {unfit} do not fit {what}"] if unfit else []
        raise ValueError("; ".join(parts) + f"; {detail}")
    return [lookup_scheme(n, model) for n in names]


# ---------------------------------------------------------------------------- option checks
# Shared by the schemes' ``validate`` functions: each raises ``ValueError`` naming the option,
# the value given and a valid example.


def _example(name: str, example) -> str:
    if example is None:
        return ""
    return (
        f"; e.g. {name}={example:g}" if isinstance(example, float) else f"; e.g. {name}={example!r}"
    )


def check_positive_int_option(name: str, value, example: int | None = None) -> int:
    """``value`` as an int >= 1, else ``ValueError`` naming ``name`` and an example."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer, got {value!r}{_example(name, example)}"
        )
    return int(value)


def check_number_option(
    name: str,
    value,
    *,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
    finite: bool = True,
    example: float | None = None,
) -> float:
    """``value`` as a float in the given interval, else ``ValueError`` with an example.

    ``low``/``high`` bound it (``*_open``: the bound itself excluded); ``finite`` refuses
    inf. NaN, booleans, strings and other non-numbers are always refused.
    """
    real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    number = float(value) if real else math.nan
    ok = real and not math.isnan(number) and (math.isfinite(number) or not finite)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        if low is not None and high is not None:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            what = f"a number in {left}{low:g}, {high:g}{right}"
        elif low == 0 and low_open:
            what = "a positive number"
        elif low is not None:
            what = f"a number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            what = f"a number {'<' if high_open else '<='} {high:g}"
        else:
            what = "a finite number" if finite else "a number"
        raise ValueError(f"{name} must be {what}, got {value!r}{_example(name, example)}")
    return number


def check_choice_option(name: str, value, allowed: tuple) -> None:
    """``ValueError`` unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_bool_option(name: str, value) -> None:
    """``ValueError`` unless ``value`` is True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
