"""Linear-Gaussian EM from three sums: n, the mean and the scatter of the data.

In PPCA and factor analysis the posterior mean is affine in x (LG-POST),

    m_d = A (x_d - mu~),   (A, S_z) = ``model.posterior_map()`` at theta~,

so the M-step (LG-EM.W, LG-EM.PSI), the bound (LB-DEF) and log p(x) (LG-MARG), each summed
over the data, are quadratic in x and depend on it only through

    n,    xbar = (1/n) sum_d x_d  (D,),    S = sum_d (x_d - xbar)(x_d - xbar)^T  (D, D).

One pass over the data (in chunks, combined exactly) gives them; EM then iterates without
reading the data again. The scatter is taken about the mean, so it keeps its digits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...models.linear_gaussian import LinearGaussian


@dataclass
class Moments:
    """``n``, ``mean`` (D,) and ``scatter`` (D, D) = sum_d (x_d - mean)(x_d - mean)^T."""

    n: float
    mean: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor) -> Moments:
        """The moments of one chunk ``x`` (n, D)."""
        mean = x.mean(0)
        centred = x - mean
        return cls(float(x.shape[0]), mean, centred.T @ centred)

    def combine(self, other: Moments) -> Moments:
        """The moments of both chunks together (Chan, Golub & LeVeque's pairwise update)."""
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        scatter = self.scatter + other.scatter + torch.outer(delta, delta) * (self.n * other.n / n)
        return Moments(n, mean, scatter)

    def about(self, centre: torch.Tensor) -> torch.Tensor:
        """sum_d (x_d - c)(x_d - c)^T = S + n (xbar - c)(xbar - c)^T, (D, D)."""
        offset = self.mean - centre
        return self.scatter + self.n * torch.outer(offset, offset)


def m_step_sums(
    mom: Moments, A: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ezz, xez)`` of LG-EM from the moments, for q_d = N(A (x_d - mu), cov).

    ezz = sum_d E[z~ z~^T] (k + 1, k + 1) and xez = sum_d (x_d - xbar) E[z~_d]^T (D, k + 1),
    with z~ = (z, 1); the second column block of xez is 0 since sum_d (x_d - xbar) = 0.
    """
    n, k = mom.n, A.shape[0]
    mbar = A @ (mom.mean - mu)  # (1/n) sum_d m_d, (k,)
    smm = A @ mom.scatter @ A.T + n * torch.outer(mbar, mbar)  # sum_d m_d m_d^T
    ezz = torch.empty(k + 1, k + 1, dtype=A.dtype)
    ezz[:k, :k] = smm + n * cov  # + sum_d Cov[z_d]
    ezz[:k, k] = ezz[k, :k] = n * mbar
    ezz[k, k] = n
    xez = torch.cat([mom.scatter @ A.T, A.new_zeros(A.shape[1], 1)], dim=1)  # S A^T | 0
    return ezz, xez


def log_likelihood_sum(model: LinearGaussian, mom: Moments) -> float:
    """sum_d log N(x_d; mu, W W^T + Psi) (LG-MARG) from the moments."""
    weight, psi = model.weight, model.noise_variances()
    C = weight @ weight.T + torch.diag(psi)
    L = torch.linalg.cholesky(C)
    quad = torch.cholesky_solve(mom.about(model.mean), L).diagonal().sum()  # tr(C^-1 M2)
    log_det = 2 * L.diagonal().log().sum()
    D = C.shape[0]
    return float(-0.5 * (mom.n * (D * math.log(2 * math.pi) + log_det) + quad))


def bound_sum(
    model: LinearGaussian, mom: Moments, A: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor
) -> float:
    """sum_d LB(q_d, theta) (LB-DEF, as ``gaussian_bound``) for q_d = N(A (x_d - mu), cov).

    The residual x_d - mu_theta - W m_d = B (x_d - xbar) + rbar with B = I - W A, so its
    squares sum to diag(B S B^T) + n rbar^2.
    """
    weight, mean, psi = model.weight, model.mean, model.noise_variances()
    n, k = mom.n, A.shape[0]
    B = torch.eye(weight.shape[0], dtype=weight.dtype) - weight @ A
    mbar = A @ (mom.mean - mu)
    rbar = mom.mean - mean - weight @ mbar
    resid_sq = (B @ mom.scatter * B).sum(1) + n * rbar.square()  # sum_d resid_d^2, (D,)
    spread = ((weight @ cov) * weight).sum(-1)  # diag(W S_z W^T)
    expected = -0.5 * (
        n * torch.log(2 * math.pi * psi).sum() + ((resid_sq + n * spread) / psi).sum()
    )
    sum_mm = (A @ mom.scatter * A).sum() + n * mbar.square().sum()  # sum_d m_d^T m_d
    kl = 0.5 * (n * cov.diagonal().sum() + sum_mm - n * k - n * torch.logdet(cov))
    return float(expected - kl)
