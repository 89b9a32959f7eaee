"""Linear-Gaussian latent models: probabilistic PCA and factor analysis (LG-MODEL).

    z ~ N(0, I_k),   x | z ~ N(W z + mu, Psi)

with Psi = sigma^2 I (``PPCA``, Tipping & Bishop 1999) or Psi = diag(psi) (``FactorAnalysis``).
Everything about them is Gaussian and exact, which is why they bridge the two halves of
the lecture: EM with the exact posterior, the VAE with an amortized guide and the
closed-form maximum-likelihood solution can all be computed and compared on one model.

    p(x)     = N(x; mu, C),        C = W W^T + Psi                                (LG-MARG)
    p(z | x) = N(z; m, S),         S = (I + W^T Psi^-1 W)^-1,
                                   m = S W^T Psi^-1 (x - mu)                      (LG-POST)

Shapes: x (N, D), z (N, k), W (D, k), mu (D,), Psi (D,) (its diagonal).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import constraints

from .base import (
    ancestral_sample,
    as_data_tensor,
    as_tensor,
    check_data_matrix,
    check_positive_int,
    check_squares,
)


class LinearGaussian(PyroModule):
    """Base class: z ~ N(0, I_k), x | z ~ N(W z + mu, diag(Psi)); see :class:`PPCA`.

    Subclasses say how the noise is parametrised (:meth:`noise_variances`).

    Parameters
    ----------
    data_dim:
        Number of observed features D.
    latent_dim:
        Number of latent dimensions k (1 <= k).
    """

    latent_site = "z"
    observed_site = "x"

    def __init__(self, data_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.data_dim = check_positive_int("data_dim", data_dim, "pass the number of features")
        self.latent_dim = check_positive_int(
            "latent_dim", latent_dim, "a latent space needs at least one dimension"
        )
        # Any valid start; EM and the closed form set these from data.
        self.weight = nn.Parameter(0.1 * torch.randn(self.data_dim, self.latent_dim))
        self.mean = nn.Parameter(torch.zeros(self.data_dim))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The starting point of gradient training, drawn from torch's generator in place:
        W ~ N(0, 0.1^2), mu = 0, noise variances 1 (``SVITrainer(seed=...)`` calls this)."""
        self.weight.copy_(0.1 * torch.randn(self.weight.shape, dtype=self.dtype))
        self.mean.zero_()
        self.set_noise(torch.ones(self.data_dim, dtype=self.dtype))

    # ------------------------------------------------------------------ parameters
    def noise_variances(self) -> torch.Tensor:
        """The diagonal of Psi, shape (D,)."""
        raise NotImplementedError

    def set_noise(self, variances: torch.Tensor) -> None:
        """Set Psi from its diagonal (D,) (PPCA: from sigma^2, a scalar)."""
        raise NotImplementedError

    @torch.no_grad()
    def _assign_positive(self, name: str, value: torch.Tensor) -> None:
        """Set a positive ``PyroParam`` in place (the same tensor object stays the parameter)."""
        if not bool((value > 0).all()) or not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"{name} must be positive and finite, got {value}; a noise variance of 0 "
                "means the data lie in a subspace: use fewer latent dimensions or add noise."
            )
        getattr(self, name + "_unconstrained").copy_(value.log())

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def is_built(self) -> bool:
        """Always: the parameters exist from construction (EM sets them from the data)."""
        return True

    @property
    def components_(self) -> torch.Tensor:
        """W^T, shape (k, D) (scikit-learn's layout)."""
        return self.weight.detach().T

    @property
    def mean_(self) -> torch.Tensor:
        """mu, shape (D,)."""
        return self.mean.detach()

    def param_names(self) -> tuple[str, ...]:
        """Names ``set_params`` and ``init=`` dicts take."""
        return ("weight", "mean", "noise")

    def noise_shape(self) -> tuple[int, ...]:
        """Shape of the ``noise`` that :meth:`set_params` takes."""
        return (self.data_dim,)

    @torch.no_grad()
    def set_params(self, weight=None, mean=None, noise=None) -> LinearGaussian:
        """Set W (D, k), mu (D,) and the noise (PPCA: sigma^2; FA: psi (D,)) in place.

        Every value is checked (shape, finite, noise positive) before any is set.
        """
        D, k = self.data_dim, self.latent_dim
        given = {}
        for name, value, shape in (
            ("weight", weight, (D, k)),
            ("mean", mean, (D,)),
            ("noise", noise, self.noise_shape()),
        ):
            if value is None:
                continue
            t = as_tensor(value, self.dtype, name)
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{name} must have shape {shape} for {type(self).__name__}"
                    f"(data_dim={D}, latent_dim={k}), got {tuple(t.shape)}"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or inf; pass finite values")
            if name == "noise" and not bool((t > 0).all()):
                raise ValueError(
                    f"noise must be positive (a variance), got {t.tolist()}; e.g. the data's "
                    "variance x.var(0)"
                )
            given[name] = t
        if "weight" in given:
            self.weight.copy_(given["weight"])
        if "mean" in given:
            self.mean.copy_(given["mean"])
        if "noise" in given:
            self.set_noise(given["noise"])
        return self

    # ------------------------------------------------------------------ the Pyro program
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The Pyro program: z ~ N(0, I) and x | z inside ``pyro.plate("data", N)``."""
        return self._program(x.shape[0], x)

    def _program(self, n: int, x: torch.Tensor | None):
        weight, mean, psi = self.weight, self.mean, self.noise_variances()
        k = self.latent_dim
        with pyro.plate("data", n, dim=-1):
            prior = dist.Normal(weight.new_zeros(k), weight.new_ones(k)).to_event(1)
            z = pyro.sample(self.latent_site, prior)
            loc = z @ weight.T + mean
            return pyro.sample(self.observed_site, dist.Normal(loc, psi.sqrt()).to_event(1), obs=x)

    # ------------------------------------------------------------------ exact quantities
    def marginal(self) -> dist.LowRankMultivariateNormal:
        """p(x) = N(mu, W W^T + Psi) (LG-MARG), event shape (D,)."""
        return dist.LowRankMultivariateNormal(self.mean, self.weight, self.noise_variances())

    def log_likelihood(self, x) -> torch.Tensor:
        """Exact log p(x_d) per sample, shape (N,) (LG-MARG)."""
        x = self.validate_data(x)
        return self.marginal().log_prob(x)

    def score(self, x) -> float:
        """Mean log-likelihood per sample."""
        with torch.no_grad():
            return float(self.log_likelihood(x).mean())

    def posterior(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact p(z | x_d) = N(m_d, S) (LG-POST): ``(m (N, k), S (k, k))``.

        S is the same for every data point.
        """
        x = self.validate_data(x)
        A, cov = self.posterior_map()
        return (x - self.mean) @ A.T, cov

    def posterior_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (k, D), S (k, k))`` with p(z | x_d) = N(A (x_d - mu), S) (LG-POST):
        S = (I + W^T Psi^-1 W)^-1 and A = S W^T Psi^-1, the same for every data point."""
        weight, psi = self.weight, self.noise_variances()
        scaled = weight / psi.unsqueeze(-1)  # Psi^-1 W, (D, k)
        precision = torch.eye(self.latent_dim, dtype=weight.dtype) + weight.T @ scaled
        cov = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        return cov @ scaled.T, cov

    def n_parameters(self) -> int:
        """Free parameters: D k - k (k - 1) / 2 (W up to rotation) + D (mu) + the noise."""
        d, k = self.data_dim, self.latent_dim
        return d * k - k * (k - 1) // 2 + d + self.noise_variances().numel()

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` samples by ancestral sampling; returns ``(x, z)``, shapes (n, D), (n, k)."""
        return ancestral_sample(self._program, n, seed)

    # ------------------------------------------------------------------ data
    def validate_data(self, x, *, name: str = "x", reset: bool = False) -> torch.Tensor:
        """Check ``x`` (N, data_dim) and return it as a tensor of the model's dtype.

        With ``reset=True`` (a fresh fit) a floating ``x`` of another dtype converts the
        model to it instead, as the mixtures do. ``ValueError`` with the fix for: not
        2-D, empty, wrong feature count, NaN/inf.
        """
        t = as_data_tensor(x, name=name)
        if reset and t.dtype != self.dtype:
            self.to(t.dtype)
        t = check_data_matrix(t.to(self.dtype), self.data_dim, name)
        check_squares(t, type(self).__name__)
        return t

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}, latent_dim={self.latent_dim}"


class PPCA(LinearGaussian):
    """Probabilistic PCA: x | z ~ N(W z + mu, sigma^2 I) (Tipping & Bishop 1999).

    ``noise_variance_`` is sigma^2 (a float, as in scikit-learn's ``PCA``).
    """

    def __init__(self, data_dim: int, latent_dim: int) -> None:
        super().__init__(data_dim, latent_dim)
        if self.latent_dim >= self.data_dim:
            raise ValueError(
                f"latent_dim must be below data_dim for PPCA, got latent_dim={latent_dim} "
                f"and data_dim={data_dim}; use at most {data_dim - 1} latent dimensions."
            )
        self.sigma2 = PyroParam(torch.tensor(1.0), constraints.positive)

    def noise_variances(self) -> torch.Tensor:
        return self.sigma2.expand(self.data_dim)

    def noise_shape(self) -> tuple[int, ...]:
        return ()

    @torch.no_grad()
    def set_noise(self, variances: torch.Tensor) -> None:
        value = variances.mean() if variances.dim() else variances  # sigma^2 = mean of psi
        self._assign_positive("sigma2", value)

    @property
    def noise_variance_(self) -> float:
        return float(self.sigma2.detach())


class FactorAnalysis(LinearGaussian):
    """Factor analysis: x | z ~ N(W z + mu, diag(psi)).

    ``noise_variance_`` is psi, shape (D,) (as in scikit-learn's ``FactorAnalysis``).
    """

    def __init__(self, data_dim: int, latent_dim: int) -> None:
        super().__init__(data_dim, latent_dim)
        self.psi = PyroParam(torch.ones(self.data_dim), constraints.positive)

    def noise_variances(self) -> torch.Tensor:
        return self.psi

    @torch.no_grad()
    def set_noise(self, variances: torch.Tensor) -> None:
        self._assign_positive("psi", variances.expand(self.data_dim))

    @property
    def noise_variance_(self) -> torch.Tensor:
        return self.psi.detach()


def gaussian_bound(
    model: LinearGaussian, x: torch.Tensor, loc: torch.Tensor, cov: torch.Tensor
) -> torch.Tensor:
    """LB(q, theta) per sample in closed form for q_d(z) = N(loc_d, cov), shape (N,).

        LB = E_q[log p(x | z)] - KL(q || N(0, I))                               (LB-DEF)
        E_q[log p(x | z)] = -1/2 sum_j [ log 2 pi psi_j
                                         + ((x - mu - W m)_j^2 + (W S W^T)_jj) / psi_j ]
        KL = 1/2 [ tr S + m^T m - k - log det S ]

    ``loc`` (N, k), ``cov`` (k, k) or (N, k, k). With q the exact posterior at theta the
    bound equals log p(x) (EM-TIGHT); for any q, log p(x) - LB = KL(q || p(z | x)) (BASIC).
    """
    weight, mean, psi = model.weight, model.mean, model.noise_variances()
    k = loc.shape[-1]
    resid = x - mean - loc @ weight.T  # (N, D)
    spread = ((weight @ cov) * weight).sum(-1)  # diag(W S W^T), (D,) or (N, D)
    expected = -0.5 * (
        torch.log(2 * math.pi * psi).sum() + ((resid.square() + spread) / psi).sum(-1)
    )
    trace = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
    kl = 0.5 * (trace + loc.square().sum(-1) - k - torch.logdet(cov))
    return expected - kl
