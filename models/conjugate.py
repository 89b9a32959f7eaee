"""The Gaussian mixture with conjugate priors: variational Bayes' model (PRML section 10.2).

The Pyro program, with scikit-learn's ``BayesianGaussianMixture`` priors::

    pi ~ Dir(alpha_0 1_K)        or the stick-breaking Dirichlet process, truncated at K:
                                 v_k ~ Beta(1, gamma), pi_k = v_k prod_{j<k} (1 - v_j)
    Lambda_k ~ W(W_0, nu_0),  mu_k | Lambda_k ~ N(m_0, (beta_0 Lambda_k)^-1)   (plate K)
    z_d ~ Categorical(pi),    x_d | z_d ~ N(mu_{z_d}, Lambda_{z_d}^-1)        (plate N)

Under the truncated Dirichlet process the sticks leave the mass prod_k (1 - v_k) to the
components beyond the K-th; the program gives it to one more category, K, whose point is
drawn from the prior predictive of a fresh component (a Student t, PRML (10.81) at the
prior): the Dirichlet process's "new table". A mean-field guide never puts z there.

The prior is the same for every ``covariance_type``: a full-precision Normal-Wishart. The
covariance type restricts the mean-field posterior q(Lambda_k) = W(W_k, nu_k) instead, as
scikit-learn does: ``"full"`` leaves W_k free, ``"diag"`` makes W_k diagonal,
``"spherical"`` a multiple of I, and ``"tied"`` gives every component the same (W, nu)
(:mod:`elbolab.guides.mean_field`, VB-THETA).

The functions below are the closed-form expectations and divergences of these
distributions that VB-Z, VB-THETA and VB-ELBO read (PRML (10.64)-(10.77)).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from contextlib import nullcontext

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from .base import (
    MixtureModel,
    NotFittedError,
    as_tensor,
    check_positive_int,
    check_seed,
)
from .gaussian import COVARIANCE_TYPES, GaussianMixture

WEIGHT_PRIOR_TYPES = ("dirichlet_process", "dirichlet_distribution")


# ---------------------------------------------------------------------------- the maths
def log_det_psd(psi: torch.Tensor) -> torch.Tensor:
    """log |Psi| of symmetric positive definite matrices (..., D, D), by Cholesky."""
    return 2 * torch.linalg.cholesky(psi).diagonal(dim1=-2, dim2=-1).log().sum(-1)


def wishart_log_norm(log_det_psi: torch.Tensor, nu: torch.Tensor, D: int) -> torch.Tensor:
    """ln B(W, nu) of PRML (B.79) with W^-1 = Psi given through ln |Psi|:

    ln B = (nu / 2) ln |Psi| - (nu D / 2) ln 2 - (D (D - 1) / 4) ln pi
           - sum_i ln Gamma((nu + 1 - i) / 2).
    """
    i = torch.arange(D, dtype=nu.dtype)
    return (
        0.5 * nu * log_det_psi
        - 0.5 * nu * D * math.log(2)
        - 0.25 * D * (D - 1) * math.log(math.pi)
        - torch.lgamma(0.5 * (nu.unsqueeze(-1) - i)).sum(-1)
    )


def expected_log_det(log_det_psi: torch.Tensor, nu: torch.Tensor, D: int) -> torch.Tensor:
    """E[ln |Lambda|] = sum_i psi((nu + 1 - i) / 2) + D ln 2 - ln |Psi|   (PRML (10.65))."""
    i = torch.arange(D, dtype=nu.dtype)
    return torch.digamma(0.5 * (nu.unsqueeze(-1) - i)).sum(-1) + D * math.log(2) - log_det_psi


def expected_log_weights(prior_type: str, concentration: torch.Tensor) -> torch.Tensor:
    """E[ln pi_k] under q(pi), shape (K,)   (PRML (10.66); sticks: Blei & Jordan 2006).

    ``concentration``: alpha (K,) of q(pi) = Dir(alpha), or (a, b) stacked (2, K) of the
    sticks q(v_k) = Beta(a_k, b_k): E ln pi_k = E ln v_k + sum_{j<k} E ln(1 - v_j).
    """
    if prior_type == "dirichlet_distribution":
        return torch.digamma(concentration) - torch.digamma(concentration.sum())
    a, b = concentration
    total = torch.digamma(a + b)
    log_v, log_1mv = torch.digamma(a) - total, torch.digamma(b) - total
    return log_v + torch.cumsum(log_1mv, 0) - log_1mv


def kl_weights(prior_type: str, concentration: torch.Tensor, prior: float) -> torch.Tensor:
    """KL(q(pi) || p(pi)) (0-d): Dirichlets, or K Beta sticks against Beta(1, gamma)."""
    if prior_type == "dirichlet_distribution":
        alpha, K = concentration, concentration.shape[0]

        def log_c(a, total):  # ln C(alpha) of PRML (B.23)
            return torch.lgamma(total) - torch.lgamma(a).sum()

        e_log_pi = expected_log_weights(prior_type, alpha)
        alpha0 = torch.full_like(alpha, prior)
        return (
            log_c(alpha, alpha.sum())
            - log_c(alpha0, torch.tensor(K * prior, dtype=alpha.dtype))
            + ((alpha - prior) * e_log_pi).sum()
        )
    a, b = concentration
    total = torch.digamma(a + b)
    log_v, log_1mv = torch.digamma(a) - total, torch.digamma(b) - total
    log_beta = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    # E_q ln Beta(v | a, b) - E_q ln Beta(v | 1, gamma), ln B(1, gamma) = -ln gamma
    return (
        -log_beta + (a - 1) * log_v + (b - 1) * log_1mv - (math.log(prior) + (prior - 1) * log_1mv)
    ).sum()


def kl_normal_wishart(
    beta: torch.Tensor,
    m: torch.Tensor,
    psi: torch.Tensor,
    nu: torch.Tensor,
    beta0: float,
    m0: torch.Tensor,
    psi0: torch.Tensor,
    nu0: float,
) -> torch.Tensor:
    """KL(q(mu_k, Lambda_k) || p(mu_k, Lambda_k)) for every k, shape (K,)   (PRML (10.74), (10.77)).

    q = N(m_k, (beta_k Lambda)^-1) W(Psi_k^-1, nu_k),
    p = N(m_0, (beta_0 Lambda)^-1) W(Psi_0^-1, nu_0):

        KL_W = ln B(W_k, nu_k) - ln B(W_0, nu_0) + (nu_k - nu_0)/2 E ln|Lambda| - nu_k D/2
               + nu_k/2 tr(Psi_0 W_k)
        KL_N = 1/2 [D beta_0/beta_k - D + D ln(beta_k/beta_0)
                    + beta_0 nu_k (m_k - m_0)^T W_k (m_k - m_0)]
    """
    D = m.shape[-1]
    chol = torch.linalg.cholesky(psi)  # Psi_k = C C^T, W_k = C^-T C^-1
    log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    nu0_t = torch.as_tensor(nu0, dtype=nu.dtype)
    log_det0 = log_det_psd(psi0)
    e_log_det = expected_log_det(log_det, nu, D)
    # tr(Psi_0 W_k) = || C^-1 L_0 ||_F^2 with Psi_0 = L_0 L_0^T
    a = torch.linalg.solve_triangular(
        chol, torch.linalg.cholesky(psi0).expand_as(chol), upper=False
    )
    trace = (a * a).sum((-2, -1))
    diff = torch.linalg.solve_triangular(chol, (m - m0).unsqueeze(-1), upper=False).squeeze(-1)
    maha = (diff * diff).sum(-1)  # (m - m0)^T W_k (m - m0)
    kl_w = (
        wishart_log_norm(log_det, nu, D)
        - wishart_log_norm(log_det0, nu0_t, D)
        + 0.5 * (nu - nu0) * e_log_det
        - 0.5 * nu * D
        + 0.5 * nu * trace
    )
    kl_n = 0.5 * (D * beta0 / beta - D + D * torch.log(beta / beta0) + beta0 * nu * maha)
    return kl_w + kl_n


def stick_breaking(v: torch.Tensor) -> torch.Tensor:
    """pi_k = v_k prod_{j<k} (1 - v_j) for the K sticks ``v`` (..., K), and the mass left,
    prod_k (1 - v_k), last: shape (..., K + 1)."""
    left = torch.cumprod(1 - v, -1)
    before = torch.cat([torch.ones_like(v[..., :1]), left[..., :-1]], -1)
    return torch.cat([v * before, left[..., -1:]], -1)


def stick_weights(concentration: torch.Tensor) -> torch.Tensor:
    """E[pi_k] = E[v_k] prod_{j<k} E[1 - v_j] for k < K, and the mass left, shape (K + 1,)
    (the sticks are independent under q, so the expectation of the product is the product)."""
    a, b = concentration
    return stick_breaking(a / (a + b))


class _CholeskyFactor(type(dist.constraints.lower_cholesky)):
    """Lower-triangular matrices with a positive diagonal, reached from R^(D (D + 1) / 2)."""


#: the support of :class:`InverseWishartCholesky`: ``biject_to`` finds
#: :class:`CholeskyVectorTransform` for it
cholesky_factor = _CholeskyFactor()


class CholeskyVectorTransform(torch.distributions.Transform):
    """A bijection from R^(D (D + 1) / 2) to Cholesky factors: the vector fills the lower
    triangle row by row, and the diagonal is exponentiated (log |J| = the sum of the
    diagonal's unconstrained entries)."""

    domain = dist.constraints.real_vector
    codomain = cholesky_factor
    bijective = True

    def __eq__(self, other):
        return isinstance(other, CholeskyVectorTransform)

    @staticmethod
    def _size(n: int) -> int:
        D = int(round((math.sqrt(8 * n + 1) - 1) / 2))
        if D * (D + 1) // 2 != n:
            raise ValueError(f"a vector of {n} entries fills no lower triangle")
        return D

    def _call(self, v: torch.Tensor) -> torch.Tensor:
        D = self._size(v.shape[-1])
        rows, cols = torch.tril_indices(D, D)
        out = v.new_zeros(v.shape[:-1] + (D, D))
        on_diag = rows == cols
        values = torch.where(on_diag, v.exp(), v)
        out[..., rows, cols] = values
        return out

    def _inverse(self, L: torch.Tensor) -> torch.Tensor:
        D = L.shape[-1]
        rows, cols = torch.tril_indices(D, D)
        v = L[..., rows, cols]
        return torch.where(rows == cols, v.log(), v)

    def log_abs_det_jacobian(self, v: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        return L.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    def forward_shape(self, shape):
        D = self._size(shape[-1])
        return torch.Size(shape[:-1]) + (D, D)

    def inverse_shape(self, shape):
        D = shape[-1]
        return torch.Size(shape[:-2]) + (D * (D + 1) // 2,)


torch.distributions.biject_to.register(_CholeskyFactor)(
    lambda constraint: CholeskyVectorTransform()
)
torch.distributions.transform_to.register(_CholeskyFactor)(
    lambda constraint: CholeskyVectorTransform()
)


class InverseWishartCholesky(dist.TorchDistribution):
    """The Cholesky factor C of Sigma = C C^T ~ IW(Psi, nu), i.e. Sigma^-1 ~ W(Psi^-1, nu).

    The conjugate prior on a covariance, as a density on its Cholesky factor (support
    ``lower_cholesky``, so samplers and autoguides reach it through ``biject_to``):

        ln p(C) = ln IW(C C^T | Psi, nu) + D ln 2 + sum_i (D + 1 - i) ln C_ii,
        ln IW(Sigma) = nu/2 ln|Psi| - nu D/2 ln 2 - ln Gamma_D(nu/2)
                       - (nu + D + 1)/2 ln|Sigma| - 1/2 tr(Psi Sigma^-1)

    (the second term is ln |d Sigma / d C| over the free entries of C).
    """

    arg_constraints = {"df": dist.constraints.positive}
    support = cholesky_factor
    has_rsample = False

    def __init__(self, df: torch.Tensor, scale: torch.Tensor, validate_args=None) -> None:
        self.df = torch.as_tensor(df, dtype=scale.dtype)
        self.scale = scale  # Psi (D, D)
        self._scale_tril = torch.linalg.cholesky(scale)
        D = scale.shape[-1]
        # the constant terms: nu/2 ln|Psi| - nu D/2 ln 2 - ln Gamma_D(nu/2)
        half = 0.5 * self.df - 0.5 * torch.arange(D, dtype=scale.dtype)
        self._log_norm = (
            self.df * self._scale_tril.diagonal().log().sum()
            - 0.5 * self.df * D * math.log(2)
            - 0.25 * D * (D - 1) * math.log(math.pi)
            - torch.lgamma(half).sum()
        )
        super().__init__(torch.Size(), torch.Size((D, D)), validate_args=validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        D = value.shape[-1]
        diag = value.diagonal(dim1=-2, dim2=-1)
        log_det_sigma = 2 * diag.log().sum(-1)
        # tr(Psi Sigma^-1) = || C^-1 L_Psi ||_F^2
        a = torch.linalg.solve_triangular(value, self._scale_tril.expand(value.shape), upper=False)
        trace = (a * a).sum((-2, -1))
        log_iw = self._log_norm - 0.5 * (self.df + D + 1) * log_det_sigma - 0.5 * trace
        powers = torch.arange(D, 0, -1, dtype=value.dtype)  # D + 1 - i for i = 1..D
        log_jacobian = D * math.log(2) + (powers * diag.log()).sum(-1)
        return log_iw + log_jacobian

    def sample(self, sample_shape=()) -> torch.Tensor:
        with torch.no_grad():
            # Sigma^-1 ~ W(Psi^-1, nu)
            precision = wishart_sample(self.df, sample_shape, precision_matrix=self.scale)
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(precision)))

    def expand(self, batch_shape, _instance=None):
        return dist.ExpandedDistribution(self, batch_shape)


def wishart_sample(df: torch.Tensor, sample_shape=(), **matrix: torch.Tensor) -> torch.Tensor:
    """Draws of ``torch.distributions.Wishart(df, **matrix)``, without its warning.

    torch's sampler tests its first draws with the support check the wrong way round, so it
    warns "Singular sample detected" on valid draws and replaces them by fresh ones; the
    draws are still Wishart draws, and the warning says nothing about them.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Singular sample detected")
        return torch.distributions.Wishart(df, validate_args=False, **matrix).sample(sample_shape)


# ---------------------------------------------------------------------------- checks
def _positive(name: str, value, example: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number or None, got {value!r}; e.g. {example}")
    if not 0 < float(value) < math.inf:
        raise ValueError(f"{name} must be positive and finite, got {value!r}; e.g. {example}")
    return float(value)


class ConjugateMixture(PyroModule):
    """A mixture whose weights and component parameters have conjugate priors.

    What every conjugate mixture shares: the weights' prior (a Dirichlet, or the
    Dirichlet process's sticks), the data checks of its point-parameter family, and the
    program's frame; a family adds its component priors and the closed forms the
    mean-field guide reads (each method below says which). VB-Z for every such family is
    EM-MIX.1 of a *plug-in* mixture of the same family (``plugin_class``) whose
    parameters are E_q-moments of q(theta), up to a per-component offset that depends on
    q only:

        ln rho_dk = E[ln pi_k] + E_q[ln p(x_d | theta_k)] = ln w~_k + ln p_plugin,k(x_d).
    """

    latent_site = "z"
    observed_site = "x"
    #: the mixture family of point parameters whose E-step VB-Z is
    plugin_class: type = MixtureModel

    def __init__(
        self,
        n_components: int,
        weight_concentration_prior_type: str = "dirichlet_process",
        weight_concentration_prior: float | None = None,
    ) -> None:
        check_positive_int("n_components", n_components, "the number of mixture components")
        if weight_concentration_prior_type not in WEIGHT_PRIOR_TYPES:
            raise ValueError(
                f"weight_concentration_prior_type must be one of {WEIGHT_PRIOR_TYPES}, got "
                f"{weight_concentration_prior_type!r}"
            )
        super().__init__()
        self.n_components = int(n_components)
        self.weight_concentration_prior_type = weight_concentration_prior_type
        self.weight_concentration_prior = _positive(
            "weight_concentration_prior", weight_concentration_prior, "1 / n_components"
        )
        self.n_features_in_: int | None = None
        self._posterior_ref = None  # weakref to the MeanFieldPosterior fitted to it

    # ------------------------------------------------------------------ priors
    @property
    def is_built(self) -> bool:
        return self.n_features_in_ is not None

    @property
    def dtype(self) -> torch.dtype:
        self._require_built()
        return self._dtype

    def _require_built(self) -> None:
        if not self.is_built:
            raise NotFittedError(
                f"this {type(self).__name__} has no priors yet: fit it with "
                "elbolab.inference.EM(model, MeanFieldPosterior(model)).fit(x), or call "
                "model.build_for(x)."
            )

    def build_for(self, x: torch.Tensor):
        """Set the priors for data like ``x`` (N, D): every check before anything is set."""
        K = self.n_components
        self._build_priors(x)  # the family's, checked (raises before anything is kept)
        self.weight_concentration_prior_ = float(self.weight_concentration_prior or 1.0 / K)
        self.n_features_in_, self._dtype = int(x.shape[1]), x.dtype
        return self

    def unbuild(self):
        for name in list(self._buffers):
            self._buffers.pop(name)
        self.n_features_in_ = None
        return self

    def _build_priors(self, x: torch.Tensor) -> None:
        """The family's priors for data ``x`` (buffers and numbers ending in ``_``)."""
        raise NotImplementedError  # pragma: no cover - interface

    # ------------------------------------------------------------------ data
    def _template(self) -> MixtureModel:
        """An unbuilt mixture of the point-parameter family (its data checks)."""
        return self.plugin_class(self.n_components)

    def validate_data(self, x, *, name: str = "x", reset: bool = False) -> torch.Tensor:
        """(N, D) data in the family's support, checked as for its point-parameter mixture."""
        return MixtureModel.validate_data(self, x, name=name, reset=reset)

    def _check_support(self, x: torch.Tensor, fitted: bool) -> None:
        self._template()._check_support(x, False)

    def plugin(self) -> MixtureModel:
        """A new plug-in mixture built for the model's data dimensions."""
        return self.plugin_class(self.n_components).build(self.n_features_in_, self.dtype)

    # ------------------------------------------------------------------ the Pyro program
    def forward(self, x: torch.Tensor, sample_weight: torch.Tensor | None = None):
        """p(pi) p(theta) prod_d p(z_d | pi) p(x_d | z_d, theta) for ``x`` (N, D)."""
        return self._program(x.shape[0], x, sample_weight)

    def _program(self, n: int, x: torch.Tensor | None, sample_weight=None):
        self._require_built()
        K, dtype = self.n_components, self.dtype
        gamma = torch.tensor(self.weight_concentration_prior_, dtype=dtype)
        dp = self.weight_concentration_prior_type == "dirichlet_process"
        if dp:
            with pyro.plate("stick_plate", K):
                v = pyro.sample("sticks", dist.Beta(torch.ones((), dtype=dtype), gamma))
            pi = stick_breaking(v)  # (K + 1,): the rest last
        else:
            pi = pyro.sample("weights", dist.Dirichlet(gamma.expand(K)))
        with pyro.plate("components", K):
            theta = self._prior_sites()
        with pyro.plate("data", n):
            with poutine.scale(scale=1.0 if sample_weight is None else sample_weight):
                z = pyro.sample(self.latent_site, dist.Categorical(probs=pi))
                component = self._observation(theta, z.clamp(max=K - 1))
                if dp:  # category K: a fresh component's prior predictive
                    fresh = self._fresh_predictive().expand(component.batch_shape)
                    component = dist.MaskedMixture(z == K, component, fresh)
                return pyro.sample(self.observed_site, component, obs=x)

    def _prior_sites(self) -> dict[str, torch.Tensor]:
        """pyro.sample the component parameters from their prior (inside plate K)."""
        raise NotImplementedError  # pragma: no cover - interface

    def _observation(self, theta: dict, k: torch.Tensor) -> dist.TorchDistribution:
        """p(x_d | theta_{k_d}) for component indices ``k`` (N,): event (D,)."""
        raise NotImplementedError  # pragma: no cover - interface

    def _fresh_predictive(self) -> dist.TorchDistribution:
        """The prior predictive of one fresh component (event (D,))."""
        raise NotImplementedError  # pragma: no cover - interface

    # ------------------------------------------------------------------ closed forms of q
    def q_init(self) -> dict[str, torch.Tensor]:
        """Buffers of the components' q (any valid values; VB-THETA sets them)."""
        raise NotImplementedError  # pragma: no cover - interface

    def plugin_values(self, q: dict) -> tuple[dict, torch.Tensor]:
        """The plug-in's parameters ``{name: (value, unconstrained)}`` and the offsets
        ln w~_k - E[ln pi_k] (K,) that VB-Z adds to each component."""
        raise NotImplementedError  # pragma: no cover - interface

    def kl_components(self, q: dict) -> torch.Tensor:
        """KL(q(theta_k) || p(theta_k)) for every component, shape (K,)."""
        raise NotImplementedError  # pragma: no cover - interface

    def guide_sites(self, q: dict) -> None:
        """pyro.sample the component parameters from q (inside plate K)."""
        raise NotImplementedError  # pragma: no cover - interface

    def draw_components(self, q: dict, n: int) -> dict[str, torch.Tensor]:
        """``n`` draws of the component parameters from q, in the plug-in's layout."""
        raise NotImplementedError  # pragma: no cover - interface

    def predictive(self, q: dict) -> dist.TorchDistribution:
        """The posterior predictive of each component, batch (K,), event (D,)."""
        raise NotImplementedError  # pragma: no cover - interface

    def q_attributes(self, q: dict) -> dict[str, torch.Tensor]:
        """Fitted attributes of the components' q (names without the trailing ``_``)."""
        raise NotImplementedError  # pragma: no cover - interface

    # ------------------------------------------------------------------ sampling
    @property
    def posterior(self):
        """The :class:`~elbolab.guides.MeanFieldPosterior` fitted to this model, or None."""
        return None if self._posterior_ref is None else self._posterior_ref()

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws ``(x, z)`` from the posterior predictive once fitted (z ~ E_q[pi],
        x from component z's predictive; under the Dirichlet process z = K with the
        sticks' remaining mass, a fresh component's prior predictive); from the prior
        predictive before."""
        self._require_built()
        check_positive_int("n", n, "the number of samples to draw")
        seed = check_seed(seed)
        q = self.posterior
        with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            if q is None or not q.is_built:
                trace = poutine.trace(self._program).get_trace(int(n), None)
                return trace.nodes["x"]["value"], trace.nodes["z"]["value"]
            return q.sample_predictive(int(n))

    def extra_repr(self) -> str:
        return (
            f"n_components={self.n_components}, "
            f"weight_concentration_prior_type={self.weight_concentration_prior_type!r}"
        )


class BayesianGaussianMixture(ConjugateMixture):
    """A Gaussian mixture with conjugate priors on its weights, means and precisions.

    Parameters (scikit-learn's names, meanings and defaults)
    ----------
    n_components:
        K, the number of components (an upper bound under the Dirichlet process).
    covariance_type:
        ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``: the form of the mean-field
        posterior q(Lambda_k) (the prior is always a full Wishart); see the module docstring.
    weight_concentration_prior_type:
        ``"dirichlet_process"`` (default: stick-breaking, truncated at K) or
        ``"dirichlet_distribution"``.
    weight_concentration_prior:
        gamma of the sticks' Beta(1, gamma), or alpha_0 of Dir(alpha_0 1_K); default 1 / K.
    mean_precision_prior:
        beta_0 (default 1).
    mean_prior:
        m_0, shape (D,); default the mean of the data.
    degrees_of_freedom_prior:
        nu_0 > D - 1; default D.
    covariance_prior:
        W_0^-1: (D, D) positive definite for ``"full"`` and ``"tied"``, (D,) positive for
        ``"diag"`` (a diagonal W_0^-1), a positive number for ``"spherical"`` (a multiple of
        I); default the data's covariance (its variances, their mean).

    The priors that depend on the data are set when the model is built for them (the
    first chunk a fit reads); fitted priors end in ``_`` (``mean_prior_``, ...). Fit it by
    CAVI with ``EM(model, MeanFieldPosterior(model)).fit(x)``; the posterior q is the guide's.
    """

    plugin_class = GaussianMixture

    def __init__(
        self,
        n_components: int = 1,
        covariance_type: str = "full",
        weight_concentration_prior_type: str = "dirichlet_process",
        weight_concentration_prior: float | None = None,
        mean_precision_prior: float | None = None,
        mean_prior=None,
        degrees_of_freedom_prior: float | None = None,
        covariance_prior=None,
    ) -> None:
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(
                f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}"
            )
        super().__init__(n_components, weight_concentration_prior_type, weight_concentration_prior)
        self.covariance_type = covariance_type
        self.mean_precision_prior = _positive("mean_precision_prior", mean_precision_prior, "1.0")
        self.degrees_of_freedom_prior = _positive(
            "degrees_of_freedom_prior", degrees_of_freedom_prior, "n_features"
        )
        self.mean_prior = mean_prior
        self.covariance_prior = covariance_prior

    def _template(self) -> MixtureModel:
        return GaussianMixture(self.n_components, self.covariance_type)

    def plugin(self) -> MixtureModel:
        return GaussianMixture(self.n_components, self.covariance_type).build(
            self.n_features_in_, self.dtype
        )

    # ------------------------------------------------------------------ priors
    def _build_priors(self, x: torch.Tensor) -> None:
        D, dtype = x.shape[1], x.dtype
        beta0 = self.mean_precision_prior or 1.0
        nu0 = float(D) if self.degrees_of_freedom_prior is None else self.degrees_of_freedom_prior
        if not nu0 > D - 1:
            raise ValueError(
                f"degrees_of_freedom_prior must be greater than n_features - 1 = {D - 1}, got "
                f"{nu0}; e.g. degrees_of_freedom_prior={D} (the default)"
            )
        if self.mean_prior is None:
            m0 = x.mean(0)
        else:
            m0 = as_tensor(self.mean_prior, dtype, "mean_prior").reshape(-1)
            if m0.shape != (D,) or not bool(torch.isfinite(m0).all()):
                raise ValueError(
                    f"mean_prior must be a finite vector of n_features = {D} values, got shape "
                    f"{tuple(as_tensor(self.mean_prior, dtype, 'mean_prior').shape)}"
                )
        psi0 = self._covariance_prior(x, D, dtype)
        self.mean_precision_prior_ = float(beta0)
        self.degrees_of_freedom_prior_ = float(nu0)
        self.register_buffer("mean_prior_", m0.clone())
        self.register_buffer("precision_scale_prior_", psi0)  # W_0^-1, always (D, D)

    def _covariance_prior(self, x: torch.Tensor, D: int, dtype) -> torch.Tensor:
        """W_0^-1 as a (D, D) matrix, from ``covariance_prior`` or the data."""
        kind, given = self.covariance_type, self.covariance_prior
        if given is None:
            if x.shape[0] < 2:
                raise ValueError(
                    "the default covariance_prior is the data's covariance, which needs at "
                    "least 2 rows; pass more data or covariance_prior"
                )
            if kind in ("full", "tied"):
                return torch.atleast_2d(torch.cov(x.T)).to(dtype)
            var = x.var(0)  # (unbiased, as numpy's ddof=1)
            return torch.diag(var if kind == "diag" else var.mean().expand(D)).to(dtype)
        value = as_tensor(given, dtype, "covariance_prior")
        if kind in ("full", "tied"):
            ok = value.shape == (D, D) and bool(torch.isfinite(value).all())
            ok = ok and bool(torch.allclose(value, value.T))
            ok = ok and bool(torch.linalg.cholesky_ex(value)[1] == 0)
            if not ok:
                raise ValueError(
                    f"covariance_prior for covariance_type={kind!r} must be a symmetric "
                    f"positive definite ({D}, {D}) matrix, got shape {tuple(value.shape)}; "
                    "e.g. numpy.cov(x.T)"
                )
            return value.clone()
        if kind == "diag":
            if value.shape != (D,) or not bool((value > 0).all() & torch.isfinite(value).all()):
                raise ValueError(
                    f"covariance_prior for covariance_type='diag' must be {D} positive "
                    f"variances, got shape {tuple(value.shape)}; e.g. x.var(0)"
                )
            return torch.diag(value)
        if value.numel() != 1 or not (0 < float(value) < math.inf):
            raise ValueError(
                "covariance_prior for covariance_type='spherical' must be one positive number, "
                f"got {given!r}; e.g. float(x.var(0).mean())"
            )
        return float(value) * torch.eye(D, dtype=dtype)

    @property
    def covariance_prior_(self) -> torch.Tensor:
        """W_0^-1 in scikit-learn's layout: (D, D) full/tied, (D,) diag, () spherical."""
        self._require_built()
        psi0 = self.precision_scale_prior_
        if self.covariance_type in ("full", "tied"):
            return psi0
        if self.covariance_type == "diag":
            return psi0.diagonal()
        return psi0[0, 0]

    # ------------------------------------------------------------------ the program
    def _prior_sites(self):
        dtype = self.dtype
        w0 = torch.cholesky_inverse(torch.linalg.cholesky(self.precision_scale_prior_))  # W_0
        precisions = pyro.sample(
            "precisions",
            dist.Wishart(
                torch.tensor(self.degrees_of_freedom_prior_, dtype=dtype), covariance_matrix=w0
            ),
        )
        means = pyro.sample(
            "means",
            dist.MultivariateNormal(
                self.mean_prior_, precision_matrix=self.mean_precision_prior_ * precisions
            ),
        )
        return {"means": means, "precisions": precisions}

    def _observation(self, theta, k):
        return dist.MultivariateNormal(theta["means"][k], precision_matrix=theta["precisions"][k])

    def _student(self, beta, nu, m, psi) -> dist.TorchDistribution:
        """St(m, (1 + beta) / ((nu + 1 - D) beta) Psi, nu + 1 - D): PRML (10.81)."""
        df = nu + 1 - self.n_features_in_
        scale = ((1 + beta) / (df * beta)).unsqueeze(-1).unsqueeze(-1) * psi
        return dist.MultivariateStudentT(df, m, torch.linalg.cholesky(scale))

    def _fresh_predictive(self):
        dtype = self.dtype
        return self._student(
            torch.tensor(self.mean_precision_prior_, dtype=dtype),
            torch.tensor(self.degrees_of_freedom_prior_, dtype=dtype),
            self.mean_prior_,
            self.precision_scale_prior_,
        )

    # ------------------------------------------------------------------ closed forms of q
    def q_init(self):
        K, D, dtype = self.n_components, self.n_features_in_, self.dtype
        return {
            "mean_precision": torch.ones(K, dtype=dtype),
            "means": torch.zeros(K, D, dtype=dtype),
            "degrees_of_freedom": torch.full((K,), float(D), dtype=dtype),
            "precision_scale": torch.eye(D, dtype=dtype).repeat(K, 1, 1),
        }

    def plugin_values(self, q):
        """Means m_k, covariances W_k^-1 / nu_k; offsets 1/2 sum_i psi((nu_k + 1 - i) / 2)
        + D/2 ln(2 / nu_k) - D / (2 beta_k), which is (VB-Z)
        ln rho_dk - E ln pi_k - ln N(x_d | m_k, W_k^-1 / nu_k)."""
        D, kind = self.n_features_in_, self.covariance_type
        nu, beta = q["degrees_of_freedom"], q["mean_precision"]
        values = {"means": (q["means"], True)}
        if kind in ("full", "tied"):
            chol = torch.linalg.cholesky(q["precision_scale"])  # of Psi_k = W_k^-1
            log_diag = chol.diagonal(dim1=-2, dim2=-1).log() - 0.5 * nu.log().unsqueeze(-1)
            tril = chol.tril(-1) / nu.sqrt()[:, None, None] + log_diag.diag_embed()
            values["scale_tril"] = (tril if kind == "full" else tril[0], True)
        else:
            var = q["precision_scale"].diagonal(dim1=-2, dim2=-1) / nu.unsqueeze(-1)
            var = var if kind == "diag" else var[:, 0]
            values["scales"] = (0.5 * var.log(), True)
        i = torch.arange(D, dtype=nu.dtype)
        half_digamma = 0.5 * torch.digamma(0.5 * (nu.unsqueeze(-1) - i)).sum(-1)
        offset = half_digamma + 0.5 * D * (math.log(2) - nu.log()) - 0.5 * D / beta
        return values, offset

    def kl_components(self, q):
        return kl_normal_wishart(
            q["mean_precision"],
            q["means"],
            q["precision_scale"],
            q["degrees_of_freedom"],
            self.mean_precision_prior_,
            self.mean_prior_,
            self.precision_scale_prior_,
            self.degrees_of_freedom_prior_,
        )

    def guide_sites(self, q):
        scale = torch.cholesky_inverse(torch.linalg.cholesky(q["precision_scale"]))  # W_k
        precisions = pyro.sample(
            "precisions", dist.Wishart(q["degrees_of_freedom"], covariance_matrix=scale)
        )
        pyro.sample(
            "means",
            dist.MultivariateNormal(
                q["means"], precision_matrix=q["mean_precision"][:, None, None] * precisions
            ),
        )

    def draw_components(self, q, n):
        scale = torch.cholesky_inverse(torch.linalg.cholesky(q["precision_scale"]))  # W_k
        precisions = wishart_sample(q["degrees_of_freedom"], (n,), covariance_matrix=scale)
        means = dist.MultivariateNormal(
            q["means"], precision_matrix=q["mean_precision"][:, None, None] * precisions
        ).sample()
        covariances = torch.cholesky_inverse(torch.linalg.cholesky(precisions))
        return {"means": means, "covariances": covariances}

    def predictive(self, q):
        return self._student(
            q["mean_precision"], q["degrees_of_freedom"], q["means"], q["precision_scale"]
        )

    def q_attributes(self, q):
        """scikit-learn's: ``mean_precision``, ``means``, ``degrees_of_freedom`` (one value
        when tied), ``covariances`` W_k^-1 / nu_k and ``precisions`` in its layouts."""
        kind = self.covariance_type
        cov = q["precision_scale"] / q["degrees_of_freedom"][:, None, None]
        if kind == "full":
            covariances = cov
        elif kind == "tied":
            covariances = cov[0]
        else:
            diag = cov.diagonal(dim1=-2, dim2=-1)
            covariances = diag if kind == "diag" else diag[:, 0]
        if kind in ("full", "tied"):
            precisions = torch.cholesky_inverse(torch.linalg.cholesky(covariances))
        else:
            precisions = covariances.reciprocal()
        nu = q["degrees_of_freedom"]
        return {
            "mean_precision": q["mean_precision"],
            "means": q["means"],
            "degrees_of_freedom": nu[0] if kind == "tied" else nu,
            "covariances": covariances,
            "precisions": precisions,
        }

    def extra_repr(self) -> str:
        return f"covariance_type={self.covariance_type!r}, " + super().extra_repr()


def link_posterior(model: ConjugateMixture, guide) -> None:
    """Let ``model.sample`` and ``model.posterior`` find the guide (a weak reference)."""
    model._posterior_ref = weakref.ref(guide)
