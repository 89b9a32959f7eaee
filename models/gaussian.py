"""Gaussian components: p_k(x) = N(x; mu_k, Sigma_k), with scikit-learn's four covariance types.

==============  ===========================  =====================================
covariance_type  parameter (constrained)     ``covariances_`` (scikit-learn shape)
==============  ===========================  =====================================
``"full"``       ``scale_tril`` (K, D, D)     Sigma_k = L_k L_k^T, shape (K, D, D)
``"tied"``       ``scale_tril`` (D, D)        Sigma = L L^T shared, shape (D, D)
``"diag"``       ``scales`` (K, D)            diagonal variances, shape (K, D)
``"spherical"``  ``scales`` (K,)              one variance per component, shape (K,)
==============  ===========================  =====================================

Covariances are stored through their Cholesky factor (or standard deviations), so every
value the optimiser can reach is a valid covariance.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from torch.distributions import constraints

from .base import MixtureModel, as_tensor, check_squares

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


class SingularCovarianceError(ValueError):
    """A component's covariance lost positive definiteness during fitting."""


def singular_covariance_error(covariance_type: str) -> SingularCovarianceError:
    return SingularCovarianceError(
        f"a {covariance_type} covariance became singular (not positive definite) during "
        "fitting, usually because a component collapsed onto too few or duplicated points; "
        "raise reg_covar (e.g. reg_covar=1e-4) or scale the data (standardise each feature)."
    )


def cholesky_or_raise(cov: torch.Tensor, covariance_type: str, floor: float = 0.0) -> torch.Tensor:
    """Cholesky factor of ``cov`` (..., D, D), or the singular-covariance error.

    ``floor``: a variance scale below which a pivot counts as numerically singular.
    """
    L, info = torch.linalg.cholesky_ex(cov)
    if (
        bool((info != 0).any())
        or not bool(torch.isfinite(L).all())
        or bool((torch.diagonal(L, dim1=-2, dim2=-1) ** 2 <= floor).any())
    ):
        raise singular_covariance_error(covariance_type)
    return L


#: Rows per block in the blocked computations below: (K, BLOCK, D) temporaries stay a few MB.
BLOCK = 4096
#: At most this many rows, the (K, N, D) differences are formed directly: fewer, larger
#: operations, which is what counts when a sampler calls log_prob thousands of times.
SMALL = 1024


def _block_ones(K: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """(K D, K) matrix with ones where row j belongs to component j // D: y @ it sums blocks."""
    rows = torch.arange(K * D, device=like.device) // D
    return (rows.unsqueeze(1) == torch.arange(K, device=like.device)).to(like.dtype)


class ComponentMultivariateNormal(dist.MultivariateNormal):
    """``MultivariateNormal`` whose ``log_prob`` scores K components against N points in blocks.

    Under enumeration of ``"z"`` the component distribution has ``loc`` (K, 1, D) and
    ``scale_tril`` (K, 1, D, D) and is scored against x (N, D). torch's generic
    ``log_prob`` then materialises several (K, N, D) tensors; here

        (x - mu_k)^T Sigma_k^{-1} (x - mu_k) = || x P_k - mu_k P_k ||^2,   P_k = L_k^{-T},

    is computed for all k at once with one (B, D) x (D, K D) product per block of B rows,
    so memory stays O(K B D). Any other shape falls back to torch's implementation.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        L, loc = self._unbroadcasted_scale_tril, self.loc
        enumerated = (
            value.dim() == 2
            and L.dim() == 4
            and L.shape[1] == 1
            and loc.dim() == 3
            and (loc.shape[1] == 1 or loc.stride(1) == 0)
            and self.batch_shape[-1] in (1, value.shape[0])
        )
        if not enumerated:
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        K, D = L.shape[0], L.shape[-1]
        L = L[:, 0]  # (K, D, D)
        half_log_det = L.diagonal(dim1=-2, dim2=-1).log().sum(-1, keepdim=True)  # (K, 1)
        if value.shape[0] <= SMALL:
            # few rows: y = L_k^{-1} (x - mu_k) for all k in one triangular solve, (K, D, N)
            y = torch.linalg.solve_triangular(L, (value - loc).mT, upper=False)
            maha = y.square().sum(-2)  # (K, N)
            return -0.5 * (D * math.log(2 * math.pi) + maha) - half_log_det
        # (x - c) P_k - (mu_k - c) P_k about a centre c near the data: without it, data far
        # from the origin lose their digits in x P_k - mu_k P_k (two large, equal numbers)
        centre = loc[:, 0].detach().mean(0)  # (D,)
        mu = loc[:, 0] - centre  # (K, D)
        value = value - centre
        eye = torch.eye(D, dtype=L.dtype, device=L.device).expand(K, D, D)
        P = torch.linalg.solve_triangular(L, eye, upper=False).mT  # L_k^{-T}, (K, D, D)
        W = P.permute(1, 0, 2).reshape(D, K * D)  # [P_1 | ... | P_K]
        b = (mu.unsqueeze(1) @ P).reshape(1, K * D)  # [mu_1 P_1 | ... | mu_K P_K]
        # sum over each component's D coordinates; for D < 4 torch's reduction over so short
        # an axis is several times slower than a product with a (K D, K) block of ones
        ones = _block_ones(K, D, L) if D < 4 else None
        blocks = []
        for start in range(0, value.shape[0], BLOCK):
            y = value[start : start + BLOCK] @ W - b  # (B, K D)
            y = y.square_() if not y.requires_grad else y.square()
            blocks.append(y @ ones if ones is not None else y.view(-1, K, D).sum(-1))
        maha = torch.cat(blocks).T  # (K, N)
        return -0.5 * (D * math.log(2 * math.pi) + maha) - half_log_det


class ComponentDiagonalNormal(dist.Independent):
    """``Normal(loc, scale).to_event(1)`` whose ``log_prob`` scores K components against N
    points as a table with two matrix products.

    When every component meets every point -- ``loc`` (K, D) against ``value`` (N, 1, D),
    as a hidden Markov model's emissions are scored, or ``loc`` (K, 1, D) against (N, D)
    under the mixture's enumeration -- torch's generic ``log_prob`` builds (N, K, D)
    temporaries; here, about a centre c of the components (so that data far from the
    origin keep their digits),

        sum_j (x_j - mu_kj)^2 / s_kj^2 = (x - c)^2 . s_k^-2 - 2 (x - c) . (mu_k - c) s_k^-2
                                         + sum_j (mu_kj - c_j)^2 / s_kj^2.

    Any other shape falls back to torch's implementation.
    """

    def __init__(
        self, loc: torch.Tensor, scale: torch.Tensor, validate_args: bool | None = None
    ) -> None:
        super().__init__(dist.Normal(loc, scale), 1, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> ComponentDiagonalNormal:
        shape = torch.Size(batch_shape) + self.event_shape
        return ComponentDiagonalNormal(
            self.base_dist.loc.expand(shape),
            self.base_dist.scale.expand(shape),
            validate_args=self._validate_args if "_validate_args" in vars(self) else None,
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        loc, scale = self.base_dist.loc, self.base_dist.scale
        if self._validate_args:
            self._validate_sample(value)
        if value.dim() == 3 and value.shape[1] == 1 and loc.dim() == 2 and scale.dim() == 2:
            return self._table(value[:, 0], loc, scale)  # (N, K)
        if (
            value.dim() == 2
            and loc.dim() == 3
            and scale.dim() == 3
            and (loc.shape[1] == 1 or loc.stride(1) == 0)  # (K, 1, D), or broadcast over N
            and (scale.shape[1] == 1 or scale.stride(1) == 0)
            and self.batch_shape[-1] in (1, value.shape[0])
        ):
            return self._table(value, loc[:, 0], scale[:, 0]).T  # (K, N)
        return super().log_prob(value)

    def _table(self, x: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        centre = mu.detach().mean(0)
        xc, mc = x - centre, mu - centre
        precision = s.pow(-2)  # (K, D)
        quad = xc.square() @ precision.T - 2 * xc @ (mc * precision).T
        quad = quad + (mc.square() * precision).sum(-1)
        D = x.shape[-1]
        return -0.5 * quad - s.log().sum(-1) - 0.5 * D * math.log(2 * math.pi)


class GaussianMixture(MixtureModel):
    """Mixture of Gaussians, p(x) = sum_k pi_k N(x; mu_k, Sigma_k).

    Parameters
    ----------
    n_components:
        Number of components K.
    covariance_type:
        ``"full"`` (default), ``"tied"``, ``"diag"`` or ``"spherical"``, as in scikit-learn.

    Fitted attributes: ``weights_`` (K,), ``means_`` (K, D), ``covariances_`` (shape by type,
    see the module docstring). ``init=`` dicts and :meth:`set_params` take the keys
    ``weights``, ``means``, ``covariances`` with those shapes.
    """

    def __init__(self, n_components: int, covariance_type: str = "full") -> None:
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(
                f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}"
            )
        super().__init__(n_components)
        self.covariance_type = covariance_type

    def param_names(self) -> tuple[str, ...]:
        return ("weights", "means", "covariances")

    def build_for(self, x: torch.Tensor) -> GaussianMixture:
        """Build for data like ``x``, every mean at the data's centre.

        The first sums of a fit are then taken about the centre of the data (see
        :class:`~elbolab.inference.statistics.GaussianStatistics`), so data far from the
        origin keep their digits.
        """
        super().build_for(x)
        with torch.no_grad():
            self.means.copy_(x.mean(0).expand_as(self.means))
        return self

    def _check_support(self, x: torch.Tensor, fitted: bool) -> None:
        check_squares(x, "GaussianMixture")

    def _build(self, n_features: int, dtype: torch.dtype) -> None:
        K, D = self.n_components, n_features
        self.means = PyroParam(torch.zeros(K, D, dtype=dtype))
        eye = torch.eye(D, dtype=dtype)
        if self.covariance_type == "full":
            self.scale_tril = PyroParam(eye.expand(K, D, D).clone(), constraints.lower_cholesky)
        elif self.covariance_type == "tied":
            self.scale_tril = PyroParam(eye, constraints.lower_cholesky)
        elif self.covariance_type == "diag":
            self.scales = PyroParam(torch.ones(K, D, dtype=dtype), constraints.positive)
        else:
            self.scales = PyroParam(torch.ones(K, dtype=dtype), constraints.positive)

    def _component_params(self) -> dict[str, torch.Tensor]:
        K, D = self.n_components, self.n_features_in_
        if self.covariance_type == "full":
            return {"loc": self.means, "scale_tril": self.scale_tril}
        if self.covariance_type == "tied":
            return {"loc": self.means, "scale_tril": self.scale_tril.expand(K, D, D)}
        if self.covariance_type == "diag":
            return {"loc": self.means, "scale": self.scales}
        return {"loc": self.means, "scale": self.scales.unsqueeze(-1).expand(K, D)}

    def _component_dist(self, loc, scale_tril=None, scale=None) -> dist.TorchDistribution:
        if scale_tril is not None:
            return ComponentMultivariateNormal(loc, scale_tril=scale_tril)
        return ComponentDiagonalNormal(loc, scale)

    def _n_component_parameters(self) -> int:
        K, D = self.n_components, self.n_features_in_
        cov = {
            "full": K * D * (D + 1) // 2,
            "tied": D * (D + 1) // 2,
            "diag": K * D,
            "spherical": K,
        }[self.covariance_type]
        return K * D + cov

    # ---------------------------------------------------------------- scikit-learn view
    @property
    def means_(self) -> torch.Tensor:
        """Component means, shape (K, D)."""
        self._require_built()
        return self.means.detach()

    @property
    def covariances_(self) -> torch.Tensor:
        """Covariances in scikit-learn's layout for ``covariance_type``."""
        self._require_built()
        if self.covariance_type in ("full", "tied"):
            L = self.scale_tril.detach()
            return L @ L.transpose(-1, -2)
        return self.scales.detach() ** 2

    def set_covariances(self, covariances) -> None:
        """Set covariances given in scikit-learn's layout (see ``covariances_``).

        ``ValueError`` naming the component when a given matrix is not symmetric (to
        1e-8 relative) or not positive definite, or a given variance is not positive.
        """
        cov = as_tensor(covariances, self.dtype, "covariances")
        K, D = self.n_components, self.n_features_in_
        expected = {"full": (K, D, D), "tied": (D, D), "diag": (K, D), "spherical": (K,)}
        shape = expected[self.covariance_type]
        if tuple(cov.shape) != shape:
            raise ValueError(
                f"covariances for covariance_type={self.covariance_type!r} must have shape "
                f"{shape}, got {tuple(cov.shape)}"
            )
        if not bool(torch.isfinite(cov).all()):
            raise ValueError("the given covariances contain NaN or inf; pass finite values")
        if self.covariance_type in ("full", "tied"):
            self.assign("scale_tril", self._given_cholesky(cov))
            return
        bad = (cov <= 0).nonzero()
        if len(bad):
            where = "component " + str(int(bad[0, 0])) if cov.dim() else ""
            raise ValueError(
                f"the given {self.covariance_type} covariances must be positive; {where} has "
                f"{float(cov[tuple(bad[0])]):g}. Pass variances > 0, e.g. x.var(0) + 1e-6."
            )
        self.assign("scales", cov.sqrt())

    def _given_cholesky(self, cov: torch.Tensor) -> torch.Tensor:
        """Cholesky factor of user-given covariances (D, D) or (K, D, D), checked."""
        batched = cov.unsqueeze(0) if cov.dim() == 2 else cov
        scale = batched.abs().amax((-2, -1)).clamp_min(torch.finfo(cov.dtype).tiny)
        asym = (batched - batched.mT).abs().amax((-2, -1)) / scale
        for k in range(batched.shape[0]):
            what = "the tied covariance" if cov.dim() == 2 else f"covariances[{k}]"
            if float(asym[k]) > 1e-8:
                raise ValueError(
                    f"{what} is not symmetric (largest |C - C^T| is {float(asym[k]):.2g} of its "
                    "largest entry); pass symmetric matrices, e.g. (C + C.T) / 2"
                )
        L, info = torch.linalg.cholesky_ex((batched + batched.mT) / 2)
        for k in range(batched.shape[0]):
            if int(info[k]) != 0:
                what = "the tied covariance" if cov.dim() == 2 else f"covariances[{k}]"
                smallest = float(torch.linalg.eigvalsh(batched[k]).min())
                raise ValueError(
                    f"{what} is not positive definite (its smallest eigenvalue is "
                    f"{smallest:.3g}); pass positive-definite matrices, e.g. np.cov(x.T) + "
                    "1e-6 * np.eye(D)"
                )
        return L[0] if cov.dim() == 2 else L

    def _set_component_params(self, means=None, covariances=None) -> None:
        if means is not None:
            self.assign("means", means)
        if covariances is not None:
            self.set_covariances(covariances)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", covariance_type={self.covariance_type!r}"
