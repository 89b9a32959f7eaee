"""The schemes :func:`~elbolab.inference.compare` runs on models with a continuous latent.

One amortized guide q(z | x; phi) = N(mu_E, diag sigma_E^2) (``AmortizedNormal``), trained
with the model by ``SVITrainer`` on three objectives:

==========  ===========================================  ======================================
scheme      objective it maximises                       Pyro's ELBO
==========  ===========================================  ======================================
``vae``     the ELBO, KL term in closed form (VAE-KL)    ``TraceMeanField_ELBO()``
``vae-mc``  the ELBO, C draws of z per datum (VAE-MC)    ``Trace_ELBO(num_particles=C)``
``iwae``    the importance-weighted bound with K draws   ``ImportanceWeightedELBO(K)``
==========  ===========================================  ======================================

Registered for :class:`~elbolab.models.VAE` (the encoder takes the decoder's hidden sizes)
and for PPCA and factor analysis (a linear encoder), where the ``em`` and ``closed-form``
rows of :mod:`.linear_gaussian` sit beside them.

Columns: ``bound`` is the objective each scheme maximised, evaluated on the data after
training (Monte Carlo, with ``bound_se``; the ELBO in closed form for the linear-Gaussian
models); ``loglik`` is exact where the model has a marginal in closed form (PPCA, factor
analysis) and otherwise the importance-weighted estimate with K = ``eval_samples`` (1000)
draws per datum, with its standard error (``SchemeFit.loglik_exact`` is False and the
table marks the value with ``~``). The gap log p(x) - bound is then KL(q || p(z | x)) on
average for the ELBO, and smaller for the IWAE bound (Burda et al., 2016).
"""

from __future__ import annotations

import math

import pyro
import torch

from ...guides import AmortizedNormal
from ...models.linear_gaussian import LinearGaussian, gaussian_bound
from ...models.vae import VAE, check_hidden
from ..svi.evaluate import elbo_per_datapoint, iwae_log_likelihood
from ..svi.iwae import ImportanceWeightedELBO
from ..svi.trainer import SVITrainer
from .linear_gaussian import canonical
from .schemes import SchemeFit, check_number_option, check_positive_int_option, register_scheme

#: repeats of the bound's evaluation, for its Monte Carlo standard error
BOUND_REPEATS = 10


def _defaults(model) -> dict:
    """Training defaults: the linear models full batch at a high rate, the VAE minibatches."""
    if isinstance(model, LinearGaussian):
        return {"epochs": 600, "lr": 3e-2, "batch_size": None}
    return {"epochs": 50, "lr": 3e-3, "batch_size": 128}


def _validate(model, x, *, epochs, lr, batch_size, hidden, eval_samples, num_particles=2):
    """Options of the three schemes, checked before anything is fitted."""
    if epochs is not None:
        check_positive_int_option("epochs", epochs, example=100)
    if lr is not None:
        check_number_option("lr", lr, low=0, low_open=True, example=3e-3)
    if batch_size is not None:
        check_positive_int_option("batch_size", batch_size, example=128)
    if hidden is not None:
        check_hidden(hidden)
    check_positive_int_option("eval_samples", eval_samples, example=1000)
    check_positive_int_option("num_particles", num_particles, example=8)
    if eval_samples < 2:
        raise ValueError(
            "eval_samples must be at least 2: the standard error of the importance-weighted "
            "estimate needs two draws per datum; e.g. eval_samples=1000"
        )


def _train(model, x, loss, *, seed, epochs, lr, batch_size, hidden):
    """Train ``model`` with a fresh ``AmortizedNormal`` on ``loss``; returns (x, guide, result)."""
    linear = isinstance(model, LinearGaussian)
    if linear:
        x = model.validate_data(x, reset=True)  # the model takes the data's dtype
    defaults = _defaults(model)
    epochs = defaults["epochs"] if epochs is None else epochs
    lr = defaults["lr"] if lr is None else lr
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    if hidden is None:
        hidden = () if linear else model.hidden
    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    guide = AmortizedNormal(model.data_dim, model.latent_dim, hidden=hidden, scale="learned")
    guide.to(dtype)
    trainer = SVITrainer(
        model,
        guide,
        loss=loss,
        lr=lr,
        batch_size=len(x) if batch_size is None else batch_size,
        seed=seed,
        progress=False,
    )
    return x.to(dtype), guide, trainer.fit(x, epochs=epochs)


def _repeated(estimate) -> tuple[float, float]:
    """Mean and standard error of ``BOUND_REPEATS`` independent estimates of a mean bound."""
    values = torch.tensor([float(estimate().mean()) for _ in range(BOUND_REPEATS)])
    return float(values.mean()), float(values.std() / math.sqrt(BOUND_REPEATS))


def _fit(model, x, guide, result, *, seed, objective, eval_samples, n_iter) -> SchemeFit:
    """The row: the maximised bound with its standard error, and log p(x) (exact or IWAE)."""
    pyro.set_rng_seed(seed)
    linear = isinstance(model, LinearGaussian)
    with torch.no_grad():
        if objective == "elbo" and linear:  # the ELBO of the trained q in closed form
            loc, scale = guide.encode(x)
            bound = float(gaussian_bound(model, x, loc, torch.diag_embed(scale.square())).mean())
            bound_se = 0.0
        elif objective == "elbo":
            bound, bound_se = _repeated(
                lambda: elbo_per_datapoint(model, guide, x, num_particles=10, analytic_kl=True)
            )
        else:  # the IWAE bound at the K it was trained with
            bound, bound_se = _repeated(
                lambda: iwae_log_likelihood(model, guide, x, num_samples=objective)
            )
        if linear:
            loglik, loglik_se, exact, params = float(model.score(x)), 0.0, True, canonical(model)
        else:
            per_datum, se = iwae_log_likelihood(
                model, guide, x, num_samples=eval_samples, return_se=True
            )
            loglik = float(per_datum.mean())
            loglik_se = float(se.square().sum().sqrt() / len(x))
            exact, params = False, {}
    return SchemeFit(
        model=model,
        loglik=loglik,
        loglik_se=loglik_se,
        loglik_exact=exact,
        estimate="MLE (SGD)",
        bound=bound,
        bound_se=bound_se,
        n_iter=n_iter,
        params=params,
        result=result,
    )


def _scheme(model, x, loss, *, seed, objective, epochs, lr, batch_size, hidden, eval_samples):
    """Train with ``loss``, then the row (:func:`_fit`): what the three schemes share."""
    x, guide, result = _train(
        model, x, loss, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size, hidden=hidden
    )
    return _fit(
        model,
        x,
        guide,
        result,
        seed=seed,
        objective=objective,
        eval_samples=eval_samples,
        n_iter=result.epochs,
    )


def _register(name: str, description: str, validate):
    def decorator(fn):
        for cls in (VAE, LinearGaussian):
            register_scheme(name, cls, description=description, validate=validate)(fn)
        return fn

    return decorator


@_register("vae", "the VAE: the ELBO with its KL term in closed form", _validate)
def vae(
    model, x, *, seed, epochs=None, lr=None, batch_size=None, hidden=None, eval_samples=1000
) -> SchemeFit:
    """``TraceMeanField_ELBO``: the ELBO with the KL term in closed form (VAE-KL).

    Defaults: 50 epochs at lr 3e-3 in batches of 128 for a VAE; 600 full-batch epochs at
    lr 3e-2 for PPCA and factor analysis (a linear encoder).
    """
    loss = pyro.infer.TraceMeanField_ELBO()
    return _scheme(
        model,
        x,
        loss,
        seed=seed,
        objective="elbo",
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        hidden=hidden,
        eval_samples=eval_samples,
    )


@_register("vae-mc", "the VAE: the ELBO by Monte Carlo, C draws per datum", _validate)
def vae_mc(
    model,
    x,
    *,
    seed,
    num_particles=8,
    epochs=None,
    lr=None,
    batch_size=None,
    hidden=None,
    eval_samples=1000,
) -> SchemeFit:
    """``Trace_ELBO(num_particles=C)``: every term of the ELBO by Monte Carlo (VAE-MC)."""
    loss = pyro.infer.Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    return _scheme(
        model,
        x,
        loss,
        seed=seed,
        objective="elbo",
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        hidden=hidden,
        eval_samples=eval_samples,
    )


@_register("iwae", "the importance-weighted bound with K draws (IWAE)", _validate)
def iwae(
    model,
    x,
    *,
    seed,
    num_particles=8,
    epochs=None,
    lr=None,
    batch_size=None,
    hidden=None,
    eval_samples=1000,
) -> SchemeFit:
    """``ImportanceWeightedELBO(K)`` (Pyro's ``RenyiELBO(alpha=0)`` with a differentiable
    loss): log (1/K) sum_k p(x, z_k) / q(z_k | x), the importance-weighted bound (Burda et
    al., 2016), tighter than the ELBO for K > 1."""
    loss = ImportanceWeightedELBO(num_particles)
    return _scheme(
        model,
        x,
        loss,
        seed=seed,
        objective=num_particles,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        hidden=hidden,
        eval_samples=eval_samples,
    )
