"""Evaluating a model with an amortized guide: per-datapoint bound, log p(x), codes.

- :func:`elbo_per_datapoint` -- LB_d = E_q[log p(x_d, z) - log q(z | x_d)], Monte Carlo
  (VAE-MC), or with the KL term in closed form (VAE-KL);
- :func:`iwae_log_likelihood` -- the importance-weighted estimate
  log (1/K) sum_k p(x_d, z_k) / q(z_k | x_d), z_k ~ q(z | x_d); K = 1 is the ELBO
  estimator, and it increases towards log p(x_d) as K grows (Burda et al., 2016);
- :func:`reconstruct`, :func:`latent_means` -- decoder(mu_E) and mu_E, for plots.

Each draws K samples per datapoint in one vectorised pass (an outer ``pyro.plate`` of
particles), in chunks of data and of samples to bound memory.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from ...models.base import check_positive_int

_PARTICLES = "draws of z per datapoint, e.g. num_particles=10"
_BATCH = "datapoints per pass, e.g. batch_size=256"


def _log_weights(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int,
    latent_site: str,
    analytic_kl: bool = False,
    *labels: torch.Tensor,
) -> torch.Tensor:
    """log p(x_d, z_k) - log q(z_k | x_d) for K samples, shape (K, N).

    With ``analytic_kl`` the prior and entropy terms are replaced by -KL(q || p(z)), so
    each entry is log p(x_d | z_k) - KL_d. ``labels``: passed to model and guide after x
    (a model with a class site: the class observed, log p(x_d, y_d, z_k) - log q(z_k | x_d, y_d)).
    """
    with pyro.plate("particles", num_samples, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x, *labels)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, *labels)
    out = torch.zeros(num_samples, x.shape[0], dtype=x.dtype)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if analytic_kl and name == latent_site:
            continue
        out = out + site["fn"].log_prob(site["value"])
    if analytic_kl:
        q, p = guide_trace.nodes[latent_site]["fn"], model_trace.nodes[latent_site]["fn"]
        return out - kl_divergence(q, p)
    for name, site in guide_trace.nodes.items():
        if (
            site["type"] == "sample"
            and name not in ("particles", "data")
            and not site["is_observed"]
        ):
            out = out - site["fn"].log_prob(site["value"])
    return out


@torch.no_grad()
def elbo_per_datapoint(
    model,
    guide,
    x,
    num_particles: int = 1,
    analytic_kl: bool = False,
    batch_size: int = 1024,
    latent_site: str = "z",
) -> torch.Tensor:
    """Monte Carlo estimate of LB_d for every datapoint, shape (N,).

    For a model with a class site (M2) it is the unlabelled bound -U(x_d) (M2-U): the
    labelled bound -L(x_d, c) of every class c (``num_particles`` draws of z each),
    weighted by q(c | x_d), plus the entropy of q(y | x_d).

    ``analytic_kl=True`` computes -KL(q(z | x_d) || p(z)) in closed form (VAE-KL) and only
    the reconstruction term by sampling. ``num_particles`` and ``batch_size`` are positive
    integers (NumPy integers too); anything else is a ``ValueError``.
    """
    num_particles = check_positive_int("num_particles", num_particles, _PARTICLES)
    batch_size = check_positive_int("batch_size", batch_size, _BATCH)
    x = _validate(model, x)
    chunks = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        if _has_class(model):  # -U(x_d) (M2-U): each class's bound weighted by q(y | x_d)
            log_q = guide.class_logits(xb)  # (B, C)
            bounds = torch.stack(
                [
                    _log_weights(
                        model, guide, xb, num_particles, latent_site, analytic_kl, _full(xb, c)
                    ).mean(0)
                    for c in range(model.n_classes)
                ],
                dim=-1,
            )  # -L(x_d, c), (B, C)
            chunks.append((log_q.exp() * (bounds - log_q)).sum(-1))
            continue
        lw = _log_weights(model, guide, xb, num_particles, latent_site, analytic_kl)
        chunks.append(lw.mean(0))
    return torch.cat(chunks)


def _has_class(model) -> bool:
    """Whether ``model`` has a discrete class site that evaluation sums (M2)."""
    return isinstance(getattr(model, "label_site", None), str) and isinstance(
        getattr(model, "n_classes", None), int
    )


def _full(x: torch.Tensor, c: int) -> torch.Tensor:
    """The label ``c`` for every row of ``x``, shape (N,)."""
    return torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)


@torch.no_grad()
def iwae_log_likelihood(
    model,
    guide,
    x,
    num_samples: int = 1000,
    batch_size: int = 256,
    sample_chunk: int = 100,
    latent_site: str = "z",
    return_se: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted estimate of log p(x_d) with ``num_samples`` samples, shape (N,).

    log p(x_d) ~= log (1/K) sum_k exp(log p(x_d, z_k) - log q(z_k | x_d)), z_k ~ q(z | x_d).
    A lower bound in expectation for every K, equal to the ELBO estimator at K = 1, and
    tight as K -> infinity. For a model with a class site (M2) the class is summed
    exactly: log p(x_d) ~= logsumexp_y log (1/K) sum_k p(x_d, y, z_k) / q(z_k | x_d, y),
    z_k ~ q(z | x_d, y), K draws per class. ``num_samples``, ``batch_size`` (datapoints
    per pass) and ``sample_chunk`` (samples per pass) are positive integers (NumPy
    integers too); anything else is a ``ValueError``.

    ``return_se=True`` also returns each estimate's Monte Carlo standard error, (N,): by
    the delta method, se(log p_hat) = sd(p_hat) / p_hat with var(p_hat) = var(w) / K for
    the importance weights w (summed over the classes where the class is summed). It is a
    first-order estimate from the same K draws: where the weights are heavy-tailed (a
    guide far from the posterior) it reads low.
    """
    num_samples = check_positive_int(
        "num_samples", num_samples, "the number of importance samples K, e.g. num_samples=1000"
    )
    batch_size = check_positive_int("batch_size", batch_size, _BATCH)
    sample_chunk = check_positive_int(
        "sample_chunk", sample_chunk, "samples drawn per pass, e.g. sample_chunk=100"
    )
    x = _validate(model, x)
    out, ses = [], []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        classes = [_full(xb, c) for c in range(model.n_classes)] if _has_class(model) else [None]
        per_class = []
        for labels in classes:
            extra = () if labels is None else (labels,)
            pieces = []
            for k0 in range(0, num_samples, sample_chunk):
                k = min(sample_chunk, num_samples - k0)
                pieces.append(_log_weights(model, guide, xb, k, latent_site, False, *extra))
            per_class.append(torch.cat(pieces))  # (K, B)
        log_w = torch.stack(per_class)  # (classes, K, B)
        estimate = (log_w.logsumexp(1) - math.log(num_samples)).logsumexp(0)
        out.append(estimate)
        if return_se:  # weights relative to p_hat: mean over K, summed over classes, is 1
            w = (log_w - estimate).exp()
            if num_samples > 1:
                ses.append((w.var(1).sum(0) / num_samples).sqrt())
            else:  # one draw: no spread to read
                ses.append(torch.full_like(estimate, math.inf))
    if return_se:
        return torch.cat(out), torch.cat(ses)
    return torch.cat(out)


@torch.no_grad()
def latent_means(guide, x) -> torch.Tensor:
    """mu_E for every datapoint, shape (N, k) (for latent-space maps)."""
    return guide.encode(torch.as_tensor(x, dtype=_dtype(guide)))[0]


@torch.no_grad()
def reconstruct(model, guide, x) -> torch.Tensor:
    """The mean of p(x | z = mu_E(x)), shape (N, n)."""
    return model.decode(latent_means(guide, x))


def _dtype(module) -> torch.dtype:
    return next(module.parameters(), torch.zeros(())).dtype


def _validate(model, x) -> torch.Tensor:
    validate = getattr(model, "validate_data", None)
    return validate(x) if validate is not None else torch.as_tensor(x)


@torch.no_grad()
def bound_terms(
    model,
    guide,
    x,
    num_particles: int = 1,
    analytic_kl: bool = True,
    batch_size: int = 1024,
    latent_site: str = "z",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bound of every datapoint in its two parts (LB-2, VAE-LB): ``(lb1, lb2)``, each (N,).

    - ``lb1`` = E_q[log p(x_d | z)], the reconstruction term, by Monte Carlo with
      ``num_particles`` draws z ~ q(z | x_d) per datapoint (VAE-MC);
    - ``lb2`` = -KL(q(z | x_d) || p(z)): in closed form with ``analytic_kl=True`` (VAE-KL),
      else E_q[log p(z) - log q(z | x_d)] on the same draws.

    lb1 + lb2 is :func:`elbo_per_datapoint` with the same ``analytic_kl``: from the same
    random state both use the same draws, so the sums agree to rounding. For the lecture's
    N(mu_D, I) decoder, lb1 = -(n/2) log 2 pi + LB1 of VAE-LB (the constant included).
    ``num_particles`` and ``batch_size`` are positive integers (NumPy integers too);
    anything else is a ``ValueError``.
    """
    num_particles = check_positive_int("num_particles", num_particles, _PARTICLES)
    batch_size = check_positive_int("batch_size", batch_size, _BATCH)
    x = _validate(model, x)
    lb1, lb2 = [], []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        log_lik, minus_kl = _split_log_weights(
            model, guide, xb, num_particles, latent_site, analytic_kl
        )
        lb1.append(log_lik.mean(0))
        lb2.append(minus_kl)
    return torch.cat(lb1), torch.cat(lb2)


def _split_log_weights(
    model, guide, x: torch.Tensor, num_samples: int, latent_site: str, analytic_kl: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_d | z_k) for K draws, shape (K, N), and -KL_d, shape (N,).

    The draws are those of :func:`_log_weights` from the same random state. The first
    part sums the model's observed sites, the second its latent sites minus the guide's
    (in closed form for ``latent_site`` with ``analytic_kl``; else averaged over the draws).
    """
    with pyro.plate("particles", num_samples, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    shape = (num_samples, x.shape[0])
    log_lik = torch.zeros(shape, dtype=x.dtype)
    latent = torch.zeros(shape, dtype=x.dtype)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["is_observed"]:
            log_lik = log_lik + site["fn"].log_prob(site["value"])
        elif not (analytic_kl and name == latent_site):
            latent = latent + site["fn"].log_prob(site["value"])
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or site["is_observed"]:
            continue
        if not (analytic_kl and name == latent_site):
            latent = latent - site["fn"].log_prob(site["value"])
    minus_kl = latent.mean(0)
    if analytic_kl:
        q, p = guide_trace.nodes[latent_site]["fn"], model_trace.nodes[latent_site]["fn"]
        try:
            kl = kl_divergence(q, p)
        except NotImplementedError:
            raise ValueError(
                f"no closed-form KL between {type(q).__name__} and {type(p).__name__}; "
                "use analytic_kl=False (a Monte Carlo estimate on the same draws)"
            ) from None
        # q and p carry the particles plate's batch shape; every particle has the same KL
        minus_kl = minus_kl - torch.broadcast_to(kl, shape)[0]
    return log_lik, minus_kl
