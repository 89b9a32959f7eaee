"""Closed-form component M-steps (EM-MIX.3), one small function per family.

Each receives weighted responsibilities ``resp`` (N, K) -- r_dk times the sample weight --
and ``nk = resp.sum(0)`` (K,), and sets the component parameters of the model.
``reg_covar`` keeps estimates away from the boundary of the parameter space:
added to covariance diagonals (Gaussian), as a pseudo-count (Bernoulli, categorical),
added to rates (Poisson). With ``reg_covar=0`` each update is the exact weighted MLE.
"""

from __future__ import annotations

import torch

from ..models import BernoulliMixture, CategoricalMixture, GaussianMixture, PoissonMixture
from ..models.gaussian import (
    BLOCK,
    cholesky_or_raise,
    singular_covariance_error,
    singular_floor,
)
from .registry import register_m_step


def _weighted_means(x: torch.Tensor, resp: torch.Tensor, nk: torch.Tensor) -> torch.Tensor:
    """mu_k = (1 / N_k) sum_d r_dk x_d, shape (K, D) (PRML 9.24)."""
    return (resp.T @ x) / nk.unsqueeze(-1)


def _clamp_probs(p: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(p.dtype).eps
    return p.clamp(eps, 1 - eps)


@register_m_step(GaussianMixture)
def _m_step_gaussian(model: GaussianMixture, x, resp, nk, reg_covar: float) -> None:
    """N_k, mu_k, Sigma_k of PRML (9.24)-(9.27), for each covariance type (EM-MIX.3)."""
    means = _weighted_means(x, resp, nk)  # (K, D)
    kind = model.covariance_type
    # centred sums, as PRML (9.25) writes them (the E[x x^T] - mu mu^T shortcut loses
    # every digit when a component shrinks onto a few points)
    if kind in ("full", "tied"):
        scatter = _centred_scatter(x, resp, means, full=True)  # (K, D, D)
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        if kind == "full":
            cov = scatter / nk[:, None, None] + reg_covar * eye  # Sigma_k
        else:
            cov = scatter.sum(0) / nk.sum() + reg_covar * eye  # one Sigma for all k
        scale_tril = cholesky_or_raise(cov, kind, singular_floor(x))
        model.assign("means", means)
        model.assign("scale_tril", scale_tril)
        return
    # sigma_kj^2 = (1 / N_k) sum_d r_dk (x_dj - mu_kj)^2 + reg
    var = _centred_scatter(x, resp, means, full=False) / nk.unsqueeze(-1) + reg_covar
    if kind == "spherical":
        var = var.mean(-1)  # one variance per component: the mean of the diagonal
    if not bool((var > singular_floor(x)).all()) or not bool(torch.isfinite(var).all()):
        raise singular_covariance_error(kind)
    model.assign("means", means)
    model.assign("scales", var.sqrt())


def _centred_scatter(x, resp, means, full: bool) -> torch.Tensor:
    """sum_d r_dk (x_d - mu_k)(x_d - mu_k)^T, shape (K, D, D), or its diagonal (K, D).

    Accumulated over blocks of rows so the (K, B, D) temporaries stay small.
    """
    K, D = means.shape
    out = torch.zeros((K, D, D) if full else (K, D), dtype=x.dtype)
    for start in range(0, x.shape[0], BLOCK):
        diff = x[start : start + BLOCK].unsqueeze(0) - means.unsqueeze(1)  # (K, B, D)
        weighted = diff * resp[start : start + BLOCK].T.unsqueeze(-1)  # r_dk (x_d - mu_k)
        if full:
            out.baddbmm_(weighted.mT, diff)
        else:
            out += (weighted * diff).sum(1)
    return out


@register_m_step(BernoulliMixture)
def _m_step_bernoulli(model: BernoulliMixture, x, resp, nk, reg_covar: float) -> None:
    """mu_kj = (sum_d r_dk x_dj + reg) / (N_k + 2 reg) (PRML 9.59; EM-MIX.3)."""
    probs = (resp.T @ x + reg_covar) / (nk.unsqueeze(-1) + 2 * reg_covar)
    model.assign("probs", _clamp_probs(probs))


@register_m_step(PoissonMixture)
def _m_step_poisson(model: PoissonMixture, x, resp, nk, reg_covar: float) -> None:
    """lambda_kj = (1 / N_k) sum_d r_dk x_dj + reg (EM-MIX.3)."""
    rates = (resp.T @ x) / nk.unsqueeze(-1) + reg_covar
    model.assign("rates", rates.clamp_min(torch.finfo(x.dtype).tiny))


@register_m_step(CategoricalMixture)
def _m_step_categorical(model: CategoricalMixture, x, resp, nk, reg_covar: float) -> None:
    """theta_kjc = (sum_d r_dk [x_dj = c] + reg) / (N_k + C reg) (EM-MIX.3)."""
    C = model.n_categories
    onehot = torch.nn.functional.one_hot(x.long(), C).to(x.dtype)  # (N, D, C)
    counts = torch.einsum("nk,ndc->kdc", resp, onehot)
    probs = (counts + reg_covar) / (nk[:, None, None] + C * reg_covar)
    probs = _clamp_probs(probs)
    model.assign("probs", probs / probs.sum(-1, keepdim=True))
