"""PPCA and factor analysis in the one EM loop (LG-EM), and their closed-form maximum (LG-ML).

EM is the same two steps as for the mixtures (EM-1), with the exact Gaussian posterior as
the guide:

1. E-step -- q_d(z) = N(m_d, S) = p(z | x_d; theta~) (LG-POST), so the bound touches
   log p(x) (EM-TIGHT).
2. M-step -- maximise E_q[log p(x, z; theta)] over theta = (W, mu, Psi). With
   z~ = (z, 1) and W~ = [W, mu - c] (D, k + 1), c any fixed centre, the expected
   complete-data log-likelihood is a weighted least-squares problem (Tipping & Bishop 1999;
   Bishop PRML 12.54-12.57, 12.69-12.70):

       W~   := (sum_d (x_d - c) E[z~_d]^T) (sum_d E[z~_d z~_d^T])^-1                  (LG-EM.W)
       Psi  := diag( (1/N) sum_d ((x_d - c)^2 - W~ E[z~_d] (x_d - c)^T) )  (factor analysis)
       sigma^2 := the mean of that diagonal                                (PPCA) (LG-EM.PSI)

   with E[z~] = (m, 1) and E[z~ z~^T] = [[S + m m^T, m], [m^T, 1]].

m_d is affine in x_d (LG-POST), so every sum over the data in both steps depends on x
only through n, its sum and its scatter: the family summarises the data once (sums about a
fixed shift, which add up over chunks and ranks), and each E-step turns that summary into
ezz = sum_d E[z~ z~^T], xez = sum_d (x_d - c) E[z~_d]^T and sxx = sum_d (x_d - c)^2, from
which the M-step, Q and the bound follow. So PPCA and factor analysis take chunks, sample
weights, several processes and minibatches (stochastic EM) through the same loop as the
mixtures.

For PPCA the maximum is also known in closed form (Tipping & Bishop 1999, eq. 7-8): with
the eigen-decomposition of the sample covariance, eigenvalues l_1 >= ... >= l_D,

       sigma^2 = mean(l_{k+1}, ..., l_D),   W = U_k (L_k - sigma^2 I)^{1/2} R         (LG-ML)

for any rotation R (here R = I), and mu = the sample mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...models.linear_gaussian import PPCA, LinearGaussian
from .family import Chunk, EChunk, Family, Stats, register_family
from .mixture import GaussianStatistics


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


@torch.no_grad()
def linear_gaussian_m_step(
    model: LinearGaussian, x: torch.Tensor, loc: torch.Tensor, cov: torch.Tensor, floor: float
) -> None:
    """Set W, mu and Psi to argmax E_q[log p(x, z)] (LG-EM.W, LG-EM.PSI).

    ``x`` (N, D), ``loc`` = E[z_d] (N, k), ``cov`` = Cov[z_d] (k, k). Computed on data
    centred at the sample mean (exact: the model is translation-equivariant in mu).
    Noise variances are floored at ``floor``.
    """
    n = x.shape[0]
    centre = x.mean(0)
    xc = x - centre
    ez = torch.cat([loc, loc.new_ones(n, 1)], dim=1)  # E[z~] (N, k + 1)
    ezz = ez.T @ ez  # sum_d E[z~] E[z~]^T, (k + 1, k + 1)
    k = loc.shape[1]
    ezz[:k, :k] += n * cov  # + sum_d Cov[z_d]
    xez = xc.T @ ez  # sum_d x_d E[z~_d]^T, (D, k + 1)
    m_step_from_sums(model, n, centre, xc.square().sum(0), ezz, xez, floor)


@torch.no_grad()
def m_step_from_sums(
    model: LinearGaussian,
    n: float,
    centre: torch.Tensor,
    sxx: torch.Tensor,
    ezz: torch.Tensor,
    xez: torch.Tensor,
    floor: float,
) -> None:
    """LG-EM.W and LG-EM.PSI from the sums: ``sxx`` = sum_d (x_d - c)^2 (D,), ``ezz`` =
    sum_d E[z~ z~^T] (k + 1, k + 1), ``xez`` = sum_d (x_d - c) E[z~_d]^T (D, k + 1), with c
    = ``centre`` any fixed point (the data mean keeps the most digits)."""
    k = ezz.shape[0] - 1
    w_tilde = torch.linalg.solve(ezz, xez.T).T  # (LG-EM.W); ezz is symmetric
    # diag (1/N) sum_d (x x^T - W~ E[z~] x^T)                                 (LG-EM.PSI)
    psi = (sxx - (w_tilde * xez).sum(1)) / n
    model.weight.copy_(w_tilde[:, :k])
    model.mean.copy_(centre + w_tilde[:, k])
    noise = psi.mean() if isinstance(model, PPCA) else psi  # PPCA: sigma^2 = tr / (N D)
    model.set_noise(noise.clamp_min(floor))


# ---------------------------------------------------------------------------- the family
def summary_of(x: torch.Tensor, w: torch.Tensor | None, shift: torch.Tensor) -> Stats:
    """n, sum_d w_d (x_d - c) and sum_d w_d (x_d - c)(x_d - c)^T about the shift c (D,),
    in the Gaussian mixture's layout with one component (so sums recentre exactly)."""
    diff = x - shift
    wdiff = diff if w is None else diff * w.unsqueeze(-1)
    n = torch.tensor([float(x.shape[0] if w is None else w.sum())], dtype=x.dtype)
    return {
        "nk": n,
        "shift": shift.unsqueeze(0),
        "s1": wdiff.sum(0, keepdim=True),
        "s2": (wdiff.T @ diff).unsqueeze(0),
    }


def moments_of(summary: Stats) -> Moments:
    """``Moments`` (n, mean, scatter about the mean) of a summary."""
    n = float(summary["nk"][0])
    offset = summary["s1"][0] / n
    scatter = summary["s2"][0] - n * torch.outer(offset, offset)
    return Moments(n, summary["shift"][0] + offset, scatter)


@register_family(LinearGaussian)
class LinearGaussianFamily(Family):
    """PPCA and factor analysis: E-step sums ezz, xez, sxx about a centre c (LG-EM).

    ``summarize`` reads each chunk once; ``e_step`` reads the summary at theta~. The
    statistics add up (``combine`` moves xez and sxx to a common centre), so minibatches
    and ranks average or sum them like any other family's.
    """

    fixed = ("centre",)
    summarises = True

    # ------------------------------------------------------------------ data
    def summarize(self, em, chunk: Chunk, shift: torch.Tensor) -> Stats:
        return summary_of(chunk.x, chunk.w, shift)

    def combine_summaries(self, a: Stats, b: Stats) -> Stats:
        return GaussianStatistics().combine(a, b)

    def empty_summary(self, em) -> Stats:
        D, dtype = em.model.data_dim, em.model.dtype
        zero = torch.zeros(0, D, dtype=dtype)
        return summary_of(zero, None, torch.zeros(D, dtype=dtype))

    # ------------------------------------------------------------------ start
    @torch.no_grad()
    def start(self, em, chunk: Chunk, rng: np.random.Generator) -> None:
        """The ``"random"`` start from the summary: W ~ N(0, s^2 / k) with s^2 the mean data
        variance, mu the data mean, Psi the data variances; an ``init`` dict's entries in
        place of these (a partial dict takes the rest from this start)."""
        model, mom = em.model, moments_of(chunk.summary)
        given = dict(em.init) if isinstance(em.init, dict) else {}
        em._init_complete = set(model.param_names()) <= set(given)
        variances = (mom.scatter.diagonal() / mom.n).clamp_min(max(em.reg_covar, 1e-12))
        scale = float(variances.mean().sqrt()) / np.sqrt(model.latent_dim)
        start = {"weight": None, "mean": mom.mean, "noise": variances}
        if isinstance(model, PPCA):
            start["noise"] = variances.mean()
        if "weight" not in given:
            start["weight"] = rng.normal(scale=scale, size=(model.data_dim, model.latent_dim))
        model.set_params(**(start | given))

    # ------------------------------------------------------------------ E-step
    @torch.no_grad()
    def e_step(self, em, chunk: Chunk, **_) -> EChunk:
        """ezz, xez and sxx about the data mean for q_d = N(A (x_d - mu~), S) (LG-POST)."""
        model = em.model
        summary = (
            chunk.summary
            if chunk.summary is not None
            else summary_of(chunk.x, chunk.w, chunk.x.mean(0))
        )
        mom = moments_of(summary)
        em.guide.refresh()  # theta~ := theta
        A, cov = model.posterior_map()
        ezz, xez = m_step_sums(mom, A, model.mean, cov)
        k = model.latent_dim
        # H(q_d) = (k/2) log(2 pi e) + (1/2) log det S, the same for every datum
        entropy = 0.5 * mom.n * (k * math.log(2 * math.pi * math.e) + float(torch.logdet(cov)))
        stats = {"ezz": ezz, "xez": xez, "sxx": mom.scatter.diagonal().clone(), "centre": mom.mean}
        return EChunk(stats, log_likelihood_sum(model, mom), entropy, mom.n, chunk.rows)

    def empty_stats(self, em) -> Stats:
        D, k, dtype = em.model.data_dim, em.model.latent_dim, em.model.dtype
        return {
            "ezz": torch.zeros(k + 1, k + 1, dtype=dtype),
            "xez": torch.zeros(D, k + 1, dtype=dtype),
            "sxx": torch.zeros(D, dtype=dtype),
            "centre": torch.zeros(D, dtype=dtype),
        }

    def total_weight(self, stats: Stats) -> float:
        return float(stats["ezz"][-1, -1])  # sum_d w_d E[z~_k z~_k] = sum_d w_d

    def combine(self, a: Stats, b: Stats, alpha: float = 1.0, beta: float = 1.0) -> Stats:
        b = self.recentre(b, a["centre"])
        return {k: a[k] if k == "centre" else alpha * a[k] + beta * b[k] for k in a}

    @staticmethod
    def recentre(stats: Stats, centre: torch.Tensor) -> Stats:
        """The same sums about another centre (exact: x - c' = (x - c) + (c - c'))."""
        if torch.equal(stats["centre"], centre):
            return stats
        delta = stats["centre"] - centre
        ezz, xez = stats["ezz"], stats["xez"]
        sum_x = xez[:, -1]  # sum_d w_d (x_d - c): the column of z~'s constant 1
        n = ezz[-1, -1]
        return {
            "ezz": ezz,
            "xez": xez + torch.outer(delta, ezz[-1]),
            "sxx": stats["sxx"] + 2 * delta * sum_x + n * delta.square(),
            "centre": centre.clone(),
        }

    # ------------------------------------------------------------------ M-step
    def m_step(self, em, stats: Stats, rows: float) -> None:
        """LG-EM.W and LG-EM.PSI from the sums; noise variances floored at ``reg_covar``."""
        m_step_from_sums(
            em.model,
            self.total_weight(stats),
            stats["centre"],
            stats["sxx"],
            stats["ezz"],
            stats["xez"],
            em.reg_covar,
        )

    @torch.no_grad()
    def expected_log_joint(self, em, stats: Stats) -> float:
        """Q(theta~, theta) = sum_d E_q[log p(x_d | z_d) + log p(z_d)] from the sums:

            E (x - c - W~ z~)_j^2 summed = sxx_j - 2 (W~ xez^T)_jj + (W~ ezz W~^T)_jj,
            E z^T z summed = tr(ezz[:k, :k]),

        with W~ = [W, mu - c] (LG-EM), Psi = diag(psi)."""
        model = em.model
        ezz, xez, sxx, centre = stats["ezz"], stats["xez"], stats["sxx"], stats["centre"]
        n, k = ezz[-1, -1], model.latent_dim
        w_tilde = torch.cat([model.weight, (model.mean - centre).unsqueeze(1)], dim=1)
        psi = model.noise_variances()
        resid = sxx - 2 * (w_tilde * xez).sum(1) + ((w_tilde @ ezz) * w_tilde).sum(1)
        log_px_z = -0.5 * (n * torch.log(2 * math.pi * psi).sum() + (resid / psi).sum())
        log_pz = -0.5 * (n * k * math.log(2 * math.pi) + ezz[:k, :k].diagonal().sum())
        return float(log_px_z + log_pz)


@torch.no_grad()
def ppca_closed_form(model: PPCA, x) -> PPCA:
    """Set a :class:`~elbolab.models.PPCA` to its maximum-likelihood parameters (LG-ML)."""
    if not isinstance(model, PPCA):
        raise ValueError(
            f"the closed-form maximum likelihood exists for PPCA, got {type(model).__name__}; "
            "fit factor analysis with EM(model, ExactGaussianPosterior(model))."
        )
    x = model.validate_data(x, reset=True)
    k = model.latent_dim
    centre = x.mean(0)
    xc = x - centre
    sample_cov = xc.T @ xc / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(sample_cov)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    sigma2 = eigenvalues[k:].mean()
    weight = eigenvectors[:, :k] * (eigenvalues[:k] - sigma2).clamp_min(0).sqrt()
    model.set_params(weight=weight, mean=centre, noise=sigma2)
    return model
