"""The schemes :func:`~elbolab.inference.compare` runs on a mixture, registered for MixtureModel.

===============  ==============================================================  ===========
scheme           what                                                            theta_hat
===============  ==============================================================  ===========
``em``           EM, closed-form M-step (EM-1, EM-MIX.2/3)                       MLE
``em-gradient``  EM, gradient M-step: Pyro's ELBO with the exact guide frozen    MLE
``direct``       log p(x) maximised by L-BFGS, z summed out (no guide)           MLE
``map``          ``AutoDelta`` under the family's weak prior, z enumerated       MAP
``mean-field``   ``AutoNormal`` under the same prior (VI-MF)                     E_q[theta]
``nuts``         NUTS under the same prior, z summed out                         E[theta|x]
===============  ==============================================================  ===========

``em`` needs a registered closed-form M-step; the last three need a registered prior
(:mod:`.priors`: Gaussian, Bernoulli, Poisson, categorical).

Every scheme starts from the same point: the EM start for ``seed`` (``init``, k-means++
seeding by default, then one M-step on those responsibilities). NUTS chain c starts from
the start drawn with ``seed + c``, so chains begin in different places and may land in
different labellings (:func:`.posterior.relabel` reports it).

Every option of every scheme is checked by the scheme's ``validate`` before anything is
fitted (an ``init`` dict is tried on a copy of the model built for the data). A Gaussian
fit that ends on a numerically singular covariance -- a component on duplicated points,
where the density grows without bound -- is flagged ``"collapsed: ..."``
(:func:`collapse_flags`); the Bayesian schemes refuse a feature that does not vary, since
their prior scales with each feature's standard deviation.

With ``ELBOLAB_FAST=1`` in the environment (read at import) the sampling defaults are
smaller.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from types import SimpleNamespace

import numpy as np
import torch

from ...guides import ExactPosterior
from ...models.base import MixtureModel
from ...models.gaussian import GaussianMixture
from ...models.priors import MixturePrior, lookup_prior, prior_for
from ..direct import DirectML
from ..em.init import INIT_METHODS
from ..em.loop import EM
from ..em.mixture import lookup_m_step
from .bayesian import (
    BayesianMixture,
    fit_map,
    fit_mean_field,
    left_support,
    refused_parameters,
    sample_nuts,
    torch_threads,
)
from .posterior import (
    RHAT_MAX,
    component_key,
    nuts_flags,
    permute_components,
    posterior_lppd,
    relabel,
    to_inference_data,
)
from .schemes import (
    SchemeFit,
    check_bool_option,
    check_choice_option,
    check_number_option,
    check_positive_int_option,
    register_scheme,
)

_FAST = os.environ.get("ELBOLAB_FAST", "") not in ("", "0")

#: defaults of the sampling schemes (smaller under ELBOLAB_FAST=1)
SVI_STEPS = 300 if _FAST else 500
NUM_SAMPLES = 100 if _FAST else 400
WARMUP_STEPS = 100 if _FAST else 200
NUM_CHAINS = 2


# ---------------------------------------------------------------------------- shared pieces
def has_closed_form(model) -> bool:
    """Whether ``model``'s family has a registered closed-form M-step."""
    return lookup_m_step(type(model)) is not None


def has_prior(model) -> bool:
    """Whether ``model``'s family has a registered prior (the Bayesian schemes need one)."""
    return lookup_prior(type(model)) is not None


def initialize(model: MixtureModel, x: torch.Tensor, *, init, seed, reg_covar: float) -> None:
    """Build ``model`` and set the EM start for ``seed`` (what EM's first iteration sees)."""
    fitter = EM(
        model, ExactPosterior(model), init=init, seed=seed, reg_covar=reg_covar, progress=False
    )
    fitter._initialize(x, None, np.random.default_rng(seed))


def canonical_params(model: MixtureModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fitted parameters in the model's layout, components sorted on the prior's key.

    Empty for a family without a prior (nothing then defines the order).
    """
    if not has_prior(model):
        return {}
    prior = prior_for(model, x)
    values = prior.site_values(model)
    order = component_key(values, prior).argsort(-1)
    return {
        k: v.detach()
        for k, v in prior.model_params(permute_components(values, prior, order)).items()
    }


def _check_samples(model: MixtureModel, x: torch.Tensor) -> None:
    if x.shape[0] < model.n_components:
        raise ValueError(
            f"x has {x.shape[0]} samples but the model has {model.n_components} components; "
            f"pass at least {model.n_components} samples or use fewer components."
        )


def _check_init(model: MixtureModel, x: torch.Tensor, init) -> None:
    """``init`` is a method name, or a dict that ``set_params`` takes for this model and data.

    A dict is tried on a built copy: ``build_for(x)``, ``set_params(**init)``, then
    log p(x) at those parameters (which the families' own checks may refuse).
    """
    if not isinstance(init, dict):
        if not isinstance(init, str) or init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS} or a dict, got {init!r}")
        return
    probe = copy.deepcopy(model)
    probe.build_for(x)
    what = f"{type(model).__name__} with {model.n_components} components on {x.shape[1]} features"
    try:
        probe.set_params(**init)
        probe.log_likelihood(x)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(
            f"init does not fit this {what}: {error}; pass the start in the layout "
            f"model.set_params takes, for {model.n_components} components and "
            f"{x.shape[1]} features"
        ) from None


def _check_start_options(model, x, *, init, reg_covar) -> None:
    _check_samples(model, x)
    check_number_option("reg_covar", reg_covar, low=0, example=1e-6)
    _check_init(model, x, init)


def _validate_point(model, x, *, init, n_init, tol, max_iter, reg_covar, **_) -> None:
    """Data and options of the maximum-likelihood schemes (EM's own checks, nothing fitted)."""
    _check_start_options(model, x, init=init, reg_covar=reg_covar)
    check_positive_int_option("n_init", n_init, example=1)
    check_number_option("tol", tol, low=0, example=1e-8)
    check_positive_int_option("max_iter", max_iter, example=1000)
    probe = copy.deepcopy(model)
    EM(
        probe,
        ExactPosterior(probe),
        init=init,
        n_init=n_init,
        tol=tol,
        max_iter=max_iter,
        reg_covar=reg_covar,
        progress=False,
    )


def constant_features(x: torch.Tensor) -> list[int]:
    """Columns of ``x`` that do not vary (standard deviation 0, up to rounding)."""
    spread = x.std(0, correction=0) if x.shape[0] > 1 else torch.zeros(x.shape[1], dtype=x.dtype)
    size = x.abs().amax(0)
    return [int(j) for j in torch.nonzero(spread <= torch.finfo(x.dtype).eps * size).flatten()]


def _check_spread(model, x: torch.Tensor) -> None:
    """Gaussian priors scale with each feature's spread: a constant feature is refused."""
    if not isinstance(model, GaussianMixture):
        return
    constant = constant_features(x)
    if not constant:
        return
    if len(constant) == x.shape[1]:
        what = (
            f"every row of x is the same point (all {x.shape[0]} rows equal), so no feature varies"
        )
    else:
        what = f"feature(s) {constant} of x do not vary (the same value in every row)"
    raise ValueError(
        f"{what}; the Bayesian schemes scale the prior of each feature's means and scales "
        "by its standard deviation, which is 0 there, and a Gaussian component on constant "
        "values collapses to a spike whose density grows without bound. Drop the constant "
        "column(s) or pass data with more distinct rows; the maximum-likelihood schemes "
        "(em, direct) stop at their reg_covar floor instead."
    )


def _positive_number(value) -> bool:
    try:
        check_number_option("value", value, low=0, low_open=True)
    except ValueError:
        return False
    return True


def _check_prior(model, x: torch.Tensor, prior) -> None:
    """Hyperparameters: known names, and positive numbers where the default is a number."""
    if prior is None:
        return
    if not isinstance(prior, dict):
        raise ValueError(
            f"prior must be a dict of hyperparameters or None, got {prior!r}; "
            "e.g. prior={'mean_scale': 5.0}"
        )
    probe = copy.deepcopy(model)
    probe.build_for(x)
    kind = prior.get("type", "weak")
    factory = lookup_prior(type(model), kind) if isinstance(kind, str) else None
    defaults = {}
    if factory is not None:
        defaults = {
            p.name: p.default
            for p in inspect.signature(factory).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
    for name, value in prior.items():
        if name == "type":
            continue
        default = defaults.get(name)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if not _positive_number(value):
                raise ValueError(
                    f"prior[{name!r}] must be a positive number, got {value!r}; e.g. "
                    f"prior={{{name!r}: {default!r}}} (the default)"
                )
        elif isinstance(default, tuple) and all(_positive_number(v) for v in default):
            ok = isinstance(value, (tuple, list)) and len(value) == len(default)
            if not ok or not all(_positive_number(v) for v in value):
                raise ValueError(
                    f"prior[{name!r}] must be {len(default)} positive numbers, got {value!r}; "
                    f"e.g. prior={{{name!r}: {default!r}}} (the default)"
                )
    try:
        prior_for(probe, x, **prior)
    except ValueError as error:
        if str(error).startswith(
            ("unknown prior option", "no prior is registered", "unknown prior type")
        ):
            raise
        raise ValueError(
            f"prior={prior!r} does not give a valid prior for {type(model).__name__} "
            f"({' '.join(str(error).split())[:300]}); pass positive hyperparameters"
        ) from None
    except TypeError as error:
        raise ValueError(
            f"prior={prior!r} does not give a valid prior for {type(model).__name__} "
            f"({error}); pass numbers as its hyperparameters"
        ) from None


def _validate_bayesian(model, x, *, init, reg_covar, prior, num_threads, **_) -> None:
    """Data, start options and prior hyperparameters of the Bayesian schemes, nothing fitted."""
    _check_start_options(model, x, init=init, reg_covar=reg_covar)
    _check_spread(model, x)
    probe = copy.deepcopy(model)
    EM(probe, ExactPosterior(probe), init=init, reg_covar=reg_covar, progress=False)
    _check_prior(model, x, prior)
    if num_threads is not None:
        check_positive_int_option("num_threads", num_threads, example=1)


def _validate_map(model, x, *, tol, max_iter, **options) -> None:
    """Options of ``map``: those of :func:`_validate_bayesian`, L-BFGS's tol and max_iter."""
    _validate_bayesian(model, x, **options)
    check_number_option("tol", tol, low=0, example=1e-10)
    check_positive_int_option("max_iter", max_iter, example=500)


def _validate_mean_field(
    model, x, *, svi_steps, lr, init_scale, elbo_particles, num_samples, elbo, **options
) -> None:
    """Options of ``mean-field``: SVI's steps, learning rate, start scale and sample sizes."""
    _validate_bayesian(model, x, **options)
    check_positive_int_option("svi_steps", svi_steps, example=SVI_STEPS)
    check_number_option("lr", lr, low=0, low_open=True, example=0.05)
    check_number_option("init_scale", init_scale, low=0, low_open=True, example=0.05)
    check_positive_int_option("elbo_particles", elbo_particles, example=100)
    check_positive_int_option("num_samples", num_samples, example=1000)
    check_choice_option("elbo", elbo, ("vectorized", "pyro"))


def _validate_nuts(
    model,
    x,
    *,
    num_samples,
    warmup_steps,
    num_chains,
    target_accept_prob,
    max_tree_depth,
    potential,
    rhat_max,
    progress,
    parallel_chains,
    full_mass,
    **options,
) -> None:
    """Options of ``nuts``: chain sizes, the sampler's settings and the R-hat threshold."""
    _validate_bayesian(model, x, **options)
    check_positive_int_option("num_samples", num_samples, example=NUM_SAMPLES)
    if num_samples < 4:
        raise ValueError(
            f"num_samples must be at least 4 for NUTS (its R-hat splits each chain in two "
            f"halves of at least 2 draws), got {num_samples}; e.g. num_samples={NUM_SAMPLES}"
        )
    check_positive_int_option("warmup_steps", warmup_steps, example=WARMUP_STEPS)
    check_positive_int_option("num_chains", num_chains, example=NUM_CHAINS)
    check_number_option(
        "target_accept_prob",
        target_accept_prob,
        low=0,
        low_open=True,
        high=1,
        high_open=True,
        example=0.8,
    )
    check_positive_int_option("max_tree_depth", max_tree_depth, example=10)
    check_choice_option("potential", potential, ("recorded", "vectorized", "enumerated"))
    check_number_option("rhat_max", rhat_max, low=1, low_open=True, example=RHAT_MAX)
    check_bool_option("progress", progress)
    if parallel_chains is not None:
        check_bool_option("parallel_chains", parallel_chains)
    if full_mass is not None:
        check_bool_option("full_mass", full_mass)


# ---------------------------------------------------------------------------- collapse
def smallest_variances(model) -> torch.Tensor | None:
    """Smallest variance of each Gaussian component's covariance (K,), or None.

    Full and tied covariances: the smallest squared singular value of the Cholesky factor
    (accurate even when it is far below the largest); diagonal and spherical: the smallest
    variance. ``None`` for a family that is not Gaussian or a model without parameters.
    """
    if not isinstance(model, GaussianMixture) or not model.is_built:
        return None
    kind = model.covariance_type
    if kind in ("full", "tied"):
        tril = model.scale_tril.detach()
        values = torch.linalg.svdvals(tril).amin(-1).square()
        return values.expand(model.n_components) if kind == "tied" else values
    variances = model.scales.detach().square()
    return variances.amin(-1) if kind == "diag" else variances


def collapse_flags(model, x: torch.Tensor, floor: float = 0.0, fix: str = "") -> list[str]:
    """Flags for Gaussian components that collapsed onto duplicated points (a spike).

    A component is flagged when its smallest variance exceeds ``floor`` (EM's reg_covar,
    the least its M-step gives) by no more than rounding: 16 machine epsilons times the
    larger of the data's largest feature variance and ``floor``. Its density then grows
    without bound as the variance shrinks, so log p(x) and the bound measure the floor
    (or how far the optimiser went), not the fit. ``fix`` says what to do.
    """
    smallest = smallest_variances(model)
    if smallest is None:
        return []
    scale = float(x.var(0, correction=0).amax()) if x.shape[0] > 1 else 0.0
    eps = torch.finfo(smallest.dtype).eps
    tolerance = 16 * eps * max(scale, floor)
    values = smallest.tolist()
    collapsed = [k for k, v in enumerate(values) if not math.isfinite(v) or v - floor <= tolerance]
    if not collapsed:
        return []
    value = min(values[k] for k in collapsed)
    where = ", the reg_covar floor" if floor > 0 else ""
    return [
        f"collapsed: the covariance of component(s) {collapsed} is numerically singular "
        f"(smallest variance {value:.1e}{where}, against the data's largest feature variance "
        f"{scale:.1e}): a spike on duplicated points or a lower-dimensional subset, where the "
        "density grows without bound, so log p(x) and the bound are not comparable with "
        "other fits; use fewer components or data with more distinct rows"
        + (f", {fix}" if fix else "")
    ]


def _point_fit(model, x, result, floor: float = 0.0) -> SchemeFit:
    return SchemeFit(
        model=model,
        loglik=model.score(x),
        estimate="MLE",
        n_iter=result.n_iter,
        converged=result.converged,
        params=canonical_params(model, x),
        flags=collapse_flags(model, x, floor),
        result=result,
    )


def _set_posterior_mean(model: MixtureModel, prior: MixturePrior, values) -> None:
    """Set ``model`` to the mean of the (relabelled) draws of its parameters."""
    params = prior.model_params(values)
    sample_dims = tuple(range(values["weights"].dim() - 1))
    model.set_params(**{k: v.mean(sample_dims) for k, v in params.items()})


def _posterior_fit(model, x, program, relabelled, idata, estimate, flags, result, **kw):
    _set_posterior_mean(model, program.prior, relabelled)
    log_lik = torch.as_tensor(idata.log_likelihood["x"].values)
    return SchemeFit(
        model=model,
        loglik=model.score(x),
        estimate=estimate,
        params=canonical_params(model, x),
        lppd=posterior_lppd(log_lik),
        idata=idata,
        flags=flags + collapse_flags(model, x),
        result=result,
        **kw,
    )


def _q_fit(model, x, program, draws, result, flags=(), **kw) -> SchemeFit:
    """A fit from draws of q(theta) (site values (S, ...), one "chain"): relabelled,
    exported to ArviZ, theta_hat their mean ("posterior mean (q)")."""
    relabelled, report = relabel({k: v.unsqueeze(0) for k, v in draws.items()}, program.prior)
    idata = to_inference_data(program, relabelled, x)
    flags = report.flags() + list(flags)
    return _posterior_fit(
        model, x, program, relabelled, idata, "posterior mean (q)", flags, result, **kw
    )


# ---------------------------------------------------------------------------- maximum likelihood
def _undefined_is_clear(what: str, fit):
    """``fit()``, with a distribution's refusal of its parameters said plainly.

    A gradient step that drives a Gaussian scale to 0 (a component on duplicated points)
    makes Pyro's validation refuse the parameters, in words about tensors and constraints.
    """
    try:
        return fit()
    except ValueError as error:
        if not refused_parameters(error):
            raise
        raise left_support(
            what,
            error,
            "use fewer components or data with more distinct rows, or scheme 'em', whose "
            "closed-form M-step keeps every covariance above reg_covar",
        ) from error


def _em(model, x, m_step: str, **options) -> SchemeFit:
    """EM with ``m_step``; bound = LB after the last M-step (exact: EM-TIGHT).

    The closed-form M-step adds ``reg_covar`` to every covariance: that is the floor a
    collapsed component stops at (see :func:`collapse_flags`).
    """
    fitter = EM(model, ExactPosterior(model), m_step=m_step, progress=False, **options)
    result = _undefined_is_clear(f"EM ({m_step} M-step)", lambda: fitter.fit(x))
    floor = options["reg_covar"] if m_step == "closed-form" else 0.0
    fit = _point_fit(model, x, result, floor)
    fit.bound, fit.bound_se = result.lower_bound, 0.0
    return fit


@register_scheme("em", MixtureModel, applies=has_closed_form, validate=_validate_point)
def em_closed_form(
    model, x, *, seed, init="kmeans++", n_init=1, tol=1e-8, max_iter=1000, reg_covar=1e-6
) -> SchemeFit:
    """EM with the closed-form M-step (EM-MIX.2/3); bound = LB after the last M-step."""
    return _em(
        model,
        x,
        "closed-form",
        init=init,
        n_init=n_init,
        tol=tol,
        max_iter=max_iter,
        reg_covar=reg_covar,
        seed=seed,
    )


@register_scheme("em-gradient", MixtureModel, validate=_validate_point)
def em_gradient(
    model, x, *, seed, init="kmeans++", n_init=1, tol=1e-8, max_iter=1000, reg_covar=1e-6
) -> SchemeFit:
    """EM with the gradient M-step: Pyro's ELBO maximised with the exact guide frozen."""
    return _em(
        model,
        x,
        "gradient",
        init=init,
        n_init=n_init,
        tol=tol,
        max_iter=max_iter,
        reg_covar=reg_covar,
        seed=seed,
    )


@register_scheme("direct", MixtureModel, validate=_validate_point)
def direct(
    model, x, *, seed, init="kmeans++", n_init=1, tol=1e-10, max_iter=500, reg_covar=1e-6
) -> SchemeFit:
    """log p(x) maximised by L-BFGS with z summed out; no guide, so no bound."""
    fitter = DirectML(
        model,
        init=init,
        n_init=n_init,
        tol=tol,
        max_iter=max_iter,
        reg_covar=reg_covar,
        seed=seed,
        progress=False,
    )
    return _point_fit(model, x, _undefined_is_clear("L-BFGS on log p(x)", lambda: fitter.fit(x)))


# ---------------------------------------------------------------------------- Bayesian
@register_scheme("map", MixtureModel, applies=has_prior, validate=_validate_map)
def map_estimate(
    model,
    x,
    *,
    seed,
    init="kmeans++",
    reg_covar=1e-6,
    prior=None,
    tol=1e-10,
    max_iter=500,
    num_threads=1,
) -> SchemeFit:
    """MAP under the weak prior: AutoDelta, z enumerated, L-BFGS; bound = log p(x, theta)/N."""
    initialize(model, x, init=init, seed=seed, reg_covar=reg_covar)
    program = BayesianMixture(model, x, prior)
    with torch_threads(num_threads):
        fit = fit_map(program, x, program.prior.site_values(model), max_iter=max_iter, tol=tol)
    model.set_params(**program.prior.model_params(fit.values))
    flags = [] if fit.converged else [f"L-BFGS stopped at max_iter={max_iter}"]
    flags += collapse_flags(model, x)
    return SchemeFit(
        model=model,
        loglik=model.score(x),
        estimate="MAP",
        bound=fit.log_joint,
        bound_se=0.0,
        n_iter=fit.n_iter,
        converged=fit.converged,
        params=canonical_params(model, x),
        flags=flags,
        result=fit,
    )


@register_scheme("mean-field", MixtureModel, applies=has_prior, validate=_validate_mean_field)
def mean_field(
    model,
    x,
    *,
    seed,
    init="kmeans++",
    reg_covar=1e-6,
    prior=None,
    svi_steps=SVI_STEPS,
    lr=0.05,
    init_scale=0.05,
    elbo_particles=100,
    num_samples=1000,
    elbo="vectorized",
    num_threads=1,
) -> SchemeFit:
    """Mean-field VI (VI-MF): AutoNormal under the weak prior, z summed out; bound = ELBO/N."""
    initialize(model, x, init=init, seed=seed, reg_covar=reg_covar)
    program = BayesianMixture(model, x, prior)
    with torch_threads(num_threads):
        fit = fit_mean_field(
            program,
            x,
            program.prior.site_values(model),
            steps=svi_steps,
            lr=lr,
            init_scale=init_scale,
            elbo_particles=elbo_particles,
            num_samples=num_samples,
            elbo=elbo,
        )
    return _q_fit(
        model, x, program, fit.draws, fit, bound=fit.elbo, bound_se=fit.elbo_se, n_iter=svi_steps
    )


@register_scheme("nuts", MixtureModel, applies=has_prior, validate=_validate_nuts)
def nuts(
    model,
    x,
    *,
    seed,
    init="kmeans++",
    reg_covar=1e-6,
    prior=None,
    num_samples=NUM_SAMPLES,
    warmup_steps=WARMUP_STEPS,
    num_chains=NUM_CHAINS,
    target_accept_prob=0.8,
    max_tree_depth=10,
    potential="recorded",
    rhat_max=RHAT_MAX,
    progress=False,
    num_threads=1,
    parallel_chains=None,
    full_mass=None,
) -> SchemeFit:
    """NUTS under the weak prior, z summed out; draws relabelled, R-hat and divergences flagged.

    ``parallel_chains``: run the chains in processes side by side (``None``: where two
    cores are free; the draws are the same either way, :mod:`.chains`). ``full_mass``:
    adapt a dense mass matrix; ``None`` (default) does so under the conjugate prior, whose
    non-centred sites (C_k, e_k) are correlated a posteriori (it halves the time there),
    and keeps the diagonal one otherwise.
    """
    starts = []
    for c in range(num_chains):
        start = copy.deepcopy(model)
        initialize(start, x, init=init, seed=seed + c, reg_covar=reg_covar)
        starts.append(start)
    model = starts[0]
    program = BayesianMixture(model, x, prior)
    with torch_threads(num_threads):
        fit = sample_nuts(
            program,
            x,
            [program.prior.site_values(s) for s in starts],
            num_samples=num_samples,
            warmup_steps=warmup_steps,
            target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth,
            potential=potential,
            seed=seed,
            progress=progress,
            parallel=parallel_chains,
            full_mass=_conjugate_type(prior) if full_mass is None else bool(full_mass),
        )
    relabelled, report = relabel(fit.draws, program.prior)
    idata = to_inference_data(program, relabelled, x, diverging=fit.diverging)
    flags = report.flags() + nuts_flags(idata, rhat_max=rhat_max)
    return _posterior_fit(
        model, x, program, relabelled, idata, "posterior mean", flags, fit, n_iter=fit.n_iter
    )


# ---------------------------------------------------------------------------- variational Bayes
def _conjugate_type(prior) -> bool:
    """Whether the ``prior`` option asks for the conjugate prior."""
    return isinstance(prior, dict) and prior.get("type") == "conjugate"


def _conjugate(prior) -> dict:
    """The conjugate prior's hyperparameters from a scheme's ``prior`` option."""
    return {k: v for k, v in (prior or {}).items() if k != "type"}


def _conjugate_pair(model, prior) -> tuple:
    """The conjugate mixture CAVI fits for ``model`` under ``prior``, and the prior dict
    of the program (``BayesianMixture``) the other Bayesian schemes use for the same prior.

    The Gaussian takes the conjugate prior (``{"type": "conjugate", ...}``, scikit-learn's
    names); Bernoulli, Poisson and categorical mixtures take their weak prior, which is
    conjugate already (Dirichlet weights; Beta, Gamma, Dirichlet components).
    """
    from ...models import BernoulliMixture, PoissonMixture
    from ...models.conjugate import BayesianGaussianMixture
    from ...models.conjugate_discrete import (
        BayesianBernoulliMixture,
        BayesianCategoricalMixture,
        BayesianPoissonMixture,
    )

    K, hyper = model.n_components, _conjugate(prior)
    dirichlet = "dirichlet_distribution"
    if isinstance(model, GaussianMixture):
        vb = BayesianGaussianMixture(K, "full", dirichlet, **hyper)
        return vb, {"type": "conjugate", **hyper}
    weights = hyper.get("weight_concentration", 1.0)
    if isinstance(model, BernoulliMixture):
        vb = BayesianBernoulliMixture(
            K, dirichlet, weights, beta_prior=tuple(hyper.get("beta", (1.0, 1.0)))
        )
    elif isinstance(model, PoissonMixture):
        vb = BayesianPoissonMixture(K, dirichlet, weights, hyper.get("rate_shape", 1.0))
    else:
        vb = BayesianCategoricalMixture(
            K,
            model.n_categories,
            dirichlet,
            weights,
            probs_concentration_prior=hyper.get("probs_concentration", 1.0),
        )
    return vb, hyper


def _has_conjugate(model) -> bool:
    from ...models import BernoulliMixture, CategoricalMixture, PoissonMixture

    if isinstance(model, GaussianMixture):
        return model.covariance_type == "full"
    return type(model) in (BernoulliMixture, PoissonMixture, CategoricalMixture)


def _validate_vb(model, x, *, init, reg_covar, prior, tol, max_iter, num_samples) -> None:
    """``vb``'s prior is the one CAVI has closed forms for: the Gaussian's conjugate prior
    (``prior=None`` or ``{"type": "conjugate", ...}``), the other families' weak prior."""
    gaussian = isinstance(model, GaussianMixture)
    if gaussian and prior is not None:
        if not isinstance(prior, dict) or prior.get("type") != "conjugate":
            raise ValueError(
                f"scheme 'vb' fits under the conjugate prior, got prior={prior!r}; pass "
                "prior={'type': 'conjugate', ...} (scikit-learn's BayesianGaussianMixture "
                "names) to compare map, mean-field and nuts with it on one posterior, or "
                "leave 'vb' out"
            )
    _validate_bayesian(
        model,
        x,
        init=init,
        reg_covar=reg_covar,
        prior={"type": "conjugate", **_conjugate(prior)} if gaussian else prior,
        num_threads=1,
    )
    check_number_option("tol", tol, low=0, example=1e-8)
    check_positive_int_option("max_iter", max_iter, example=1000)
    check_positive_int_option("num_samples", num_samples, example=1000)


@register_scheme(
    "vb",
    MixtureModel,
    applies=_has_conjugate,
    validate=_validate_vb,
    default=False,
    description="variational Bayes (CAVI: VB-Z, VB-THETA) under a conjugate prior",
)
def variational_bayes(
    model,
    x,
    *,
    seed,
    init="kmeans++",
    reg_covar=1e-6,
    prior=None,
    tol=1e-8,
    max_iter=1000,
    num_samples=1000,
) -> SchemeFit:
    """CAVI from the EM start's responsibilities; bound = VB-ELBO / N (exact).

    The prior: for a full-covariance Gaussian mixture the conjugate one (scikit-learn's
    ``BayesianGaussianMixture`` priors with Dirichlet weights), for Bernoulli, Poisson and
    categorical mixtures their weak prior (conjugate already) -- the prior ``map``,
    ``mean-field`` and ``nuts`` use given the same ``prior`` option. theta_hat is the mean
    of ``num_samples`` draws from q(theta), relabelled and exported to ArviZ as the other
    posterior schemes' draws are.
    """
    from ...guides.mean_field import MeanFieldPosterior

    initialize(model, x, init=init, seed=seed, reg_covar=reg_covar)
    vb, program_prior = _conjugate_pair(model, prior)
    guide = MeanFieldPosterior(vb)
    fitter = EM(
        vb,
        guide,
        tol=tol,
        max_iter=max_iter,
        init={"responsibilities": model.predict_proba(x)},
        reg_covar=reg_covar,
        progress=False,
    )
    result = fitter.fit(x)
    program = BayesianMixture(model, x, program_prior)
    drawn = guide.draw(num_samples)
    # site_values reads a fitted model's weights_, means_, ...: the draws stand in for it
    values = program.prior.site_values(SimpleNamespace(**{f"{k}_": v for k, v in drawn.items()}))
    flags = [] if result.converged else [f"CAVI stopped at max_iter={max_iter}"]
    return _q_fit(
        model,
        x,
        program,
        values,
        result,
        flags,
        bound=result.lower_bound,
        bound_se=0.0,
        n_iter=result.n_iter,
        converged=result.converged,
    )
