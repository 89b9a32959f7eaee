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

With ``ELBOLAB_FAST=1`` in the environment (read at import) the sampling defaults are
smaller.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

from ..guides import ExactPosterior
from ..models.base import MixtureModel
from .bayesian import BayesianMixture, fit_map, fit_mean_field, sample_nuts, torch_threads
from .direct import DirectML
from .em import EM
from .posterior import (
    RHAT_MAX,
    component_key,
    nuts_flags,
    permute_components,
    posterior_lppd,
    relabel,
    to_inference_data,
)
from .priors import MixturePrior, lookup_prior, prior_for
from .registry import lookup_m_step
from .schemes import SchemeFit, register_scheme

_FAST = os.environ.get("ELBOLAB_FAST", "") not in ("", "0")

#: defaults of the sampling schemes (smaller under ELBOLAB_FAST=1)
SVI_STEPS = 300 if _FAST else 500
NUM_SAMPLES = 100 if _FAST else 400
WARMUP_STEPS = 100 if _FAST else 300
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


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_samples(model: MixtureModel, x: torch.Tensor) -> None:
    if x.shape[0] < model.n_components:
        raise ValueError(
            f"x has {x.shape[0]} samples but the model has {model.n_components} components; "
            f"pass at least {model.n_components} samples or use fewer components."
        )


def _validate_point(model, x, *, init, n_init, tol, max_iter, reg_covar, **_) -> None:
    """Data and options of the maximum-likelihood schemes (EM's own checks, nothing fitted)."""
    _check_samples(model, x)
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


def _validate_bayesian(model, x, *, init, reg_covar, prior, **options) -> None:
    """Data, start options, prior hyperparameters and sampler sizes, nothing fitted."""
    _check_samples(model, x)
    probe = copy.deepcopy(model)
    EM(probe, ExactPosterior(probe), init=init, reg_covar=reg_covar, progress=False)
    if prior is not None and not isinstance(prior, dict):
        raise ValueError(f"prior must be a dict of hyperparameters or None, got {prior!r}")
    probe.build_for(x)
    prior_for(probe, x, **(prior or {}))
    for name in (
        "num_samples",
        "warmup_steps",
        "num_chains",
        "svi_steps",
        "elbo_particles",
        "max_iter",
    ):
        if name in options:
            _positive_int(name, options[name])
    if options.get("num_threads") is not None:
        _positive_int("num_threads", options["num_threads"])
    for name, allowed in (
        ("potential", ("vectorized", "enumerated")),
        ("elbo", ("vectorized", "pyro")),
    ):
        if name in options and options[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {options[name]!r}")


def _point_fit(model, x, result, flags=()) -> SchemeFit:
    return SchemeFit(
        model=model,
        loglik=model.score(x),
        estimate="MLE",
        n_iter=result.n_iter,
        converged=result.converged,
        params=canonical_params(model, x),
        flags=list(flags),
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
        flags=flags,
        result=result,
        **kw,
    )


# ---------------------------------------------------------------------------- maximum likelihood
def _em(model, x, m_step: str, **options) -> SchemeFit:
    """EM with ``m_step``; bound = LB after the last M-step (exact: EM-TIGHT)."""
    result = EM(model, ExactPosterior(model), m_step=m_step, progress=False, **options).fit(x)
    fit = _point_fit(model, x, result)
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
    return _point_fit(model, x, fitter.fit(x))


# ---------------------------------------------------------------------------- Bayesian
@register_scheme("map", MixtureModel, applies=has_prior, validate=_validate_bayesian)
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


@register_scheme("mean-field", MixtureModel, applies=has_prior, validate=_validate_bayesian)
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
    elbo="pyro",
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
    draws = {k: v.unsqueeze(0) for k, v in fit.draws.items()}  # one "chain" of draws from q
    relabelled, report = relabel(draws, program.prior)
    idata = to_inference_data(program, relabelled, x)
    return _posterior_fit(
        model,
        x,
        program,
        relabelled,
        idata,
        "posterior mean (q)",
        report.flags(),
        fit,
        bound=fit.elbo,
        bound_se=fit.elbo_se,
        n_iter=svi_steps,
    )


@register_scheme("nuts", MixtureModel, applies=has_prior, validate=_validate_bayesian)
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
    potential="enumerated",
    rhat_max=RHAT_MAX,
    progress=False,
    num_threads=1,
) -> SchemeFit:
    """NUTS under the weak prior, z summed out; draws relabelled, R-hat and divergences flagged."""
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
        )
    relabelled, report = relabel(fit.draws, program.prior)
    idata = to_inference_data(program, relabelled, x, diverging=fit.diverging)
    flags = report.flags() + nuts_flags(idata, rhat_max=rhat_max)
    return _posterior_fit(
        model, x, program, relabelled, idata, "posterior mean", flags, fit, n_iter=fit.n_iter
    )
