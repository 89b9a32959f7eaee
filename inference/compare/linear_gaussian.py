"""The schemes :func:`~elbolab.inference.compare` runs on PPCA and factor analysis.

===============  =================================================================  =====
scheme           what                                                               for
===============  =================================================================  =====
``em``           EM with the exact Gaussian posterior (LG-EM, EM-TIGHT)             both
``closed-form``  the eigen-decomposition maximum (LG-ML)                            PPCA
===============  =================================================================  =====

Beside them, :mod:`.amortized` registers ``vae``, ``vae-mc`` and ``iwae`` for both: the
same model with ``AmortizedNormal`` and a linear encoder, trained by SGD on Pyro's ELBO.

Every row reports the exact log-likelihood (LG-MARG) and the bound of the scheme's own q in
closed form (``gaussian_bound``): 0 gap for EM's exact posterior, KL(q || p(z | x)) for
the VAE's (BASIC). W is identified only up to rotation, so the parameters compared across
schemes are W W^T, mu and the noise variances.
"""

from __future__ import annotations

import torch

from ...guides import ExactGaussianPosterior
from ...models.linear_gaussian import PPCA, LinearGaussian
from ..em.linear_gaussian import ppca_closed_form
from ..em.loop import EM
from .schemes import (
    SchemeFit,
    check_number_option,
    check_positive_int_option,
    register_scheme,
)


def canonical(model: LinearGaussian) -> dict[str, torch.Tensor]:
    """Rotation-free parameters: W W^T (D, D), mu (D,), Psi (D,)."""
    w = model.weight.detach()
    return {
        "WWt": w @ w.T,
        "mean": model.mean.detach().clone(),
        "noise": model.noise_variances().detach().clone(),
    }


def _fit(model: LinearGaussian, x: torch.Tensor, estimate: str, bound, **fields) -> SchemeFit:
    return SchemeFit(
        model=model,
        loglik=model.score(x),
        estimate=estimate,
        bound=float(bound),
        bound_se=0.0,
        params=canonical(model),
        **fields,
    )


def _validate_em(model, x, *, tol, max_iter) -> None:
    """Options of ``em``: the tolerance and the iteration cap, nothing fitted."""
    check_number_option("tol", tol, low=0, example=1e-10)
    check_positive_int_option("max_iter", max_iter, example=5000)


@register_scheme(
    "em",
    LinearGaussian,
    description="EM with the exact Gaussian posterior",
    validate=_validate_em,
)
def em(model, x, *, seed, tol=1e-10, max_iter=5000) -> SchemeFit:
    """EM (LG-EM) from a random start for ``seed``; bound = EM's final LB (EM-TIGHT)."""
    guide = ExactGaussianPosterior(model)
    result = EM(model, guide, tol=tol, max_iter=max_iter, seed=seed, progress=False).fit(x)
    return _fit(
        model,
        x,
        "MLE",
        result.lower_bound,
        n_iter=result.n_iter,
        converged=result.converged,
        result=result,
    )


@register_scheme(
    "closed-form",
    LinearGaussian,
    description="maximum likelihood from the eigen-decomposition",
    applies=lambda model: isinstance(model, PPCA),
)
def closed_form(model, x, *, seed) -> SchemeFit:
    """LG-ML: sigma^2 the mean discarded eigenvalue, W = U_k (L_k - sigma^2 I)^1/2."""
    ppca_closed_form(model, x)
    return _fit(model, x, "MLE", model.score(x), n_iter=1, converged=True)
