"""Weak priors p(theta) for the mixture families, looked up by model class.

A Bayesian mixture puts a distribution on the parameters a :class:`MixtureModel` otherwise
estimates: p(theta) prod_d sum_k pi_k p_k(x_d; theta_k). Each family says, once,

- which parameter *sites* it samples and from which prior (``sites``: name -> distribution,
  every site a single event, so a site's value has exactly the parameter's shape);
- which sites carry one slice per component (``component_sites``: their first parameter
  dimension is K, and relabelling permutes it);
- how site values become the keyword arguments of the family's own
  ``model._component_dist`` (``component_params``), the model's ``set_params`` layout
  (``model_params``), and back from a fitted model (``site_values``).

Every map accepts leading sample dimensions (S, ...) in front of the parameter shapes, so
the same code serves one value and a stack of posterior draws.

The defaults are weak and scaled to the data, so they stay weak whatever its units:

==================  =============================================================
weights             Dirichlet(1, ..., 1) (uniform on the simplex)
Gaussian means      Normal(mean(x), 10 std(x)) per feature
Gaussian scales     HalfNormal(2 std(x)) per feature (``spherical``: 2 mean std)
Gaussian ``full``   LKJCholesky(D, 2) correlations per component (``tied``: one)
Bernoulli probs     Beta(1, 1) (uniform)
Poisson rates       Gamma(1, 1 / (mean(x) + 1)) (exponential, mean mean(x) + 1)
Categorical probs   Dirichlet(1, ..., 1) per component and feature
==================  =============================================================

Register a new family with::

    @register_prior(MyMixture)
    def _my_prior(model, x, **hyper) -> MixturePrior: ...

A family may have more than one kind of prior; ``prior={"type": "conjugate", ...}`` picks
one by name (``"weak"``, the table above, by default). The Gaussian mixture with full
covariances has ``"conjugate"``: scikit-learn's ``BayesianGaussianMixture`` priors (a
Dirichlet on the weights, a Normal-Wishart on each component), the prior under which
variational Bayes (:mod:`elbolab.models.conjugate`) has its closed forms, so that MAP,
mean-field SVI and NUTS can be compared with it on one posterior. Its sites are
non-centred: ``covariance_tril`` C_k with C_k C_k^T ~ IW(W_0^-1, nu_0) and
``mean_offsets`` e_k ~ N(0, I), mu_k = m_0 + C_k e_k / sqrt(beta_0): the same prior on
(mu_k, Sigma_k), with sites that are independent a priori.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro.distributions as dist
import torch

from .base import MixtureModel
from .bernoulli import BernoulliMixture
from .categorical import CategoricalMixture
from .gaussian import GaussianMixture
from .poisson import PoissonMixture

#: site values (leading sample dims allowed) -> tensors
ValueMap = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class MixturePrior:
    """p(theta) for one mixture family, and the maps between its sites and the model.

    Attributes
    ----------
    sites:
        Prior of each parameter site, in program order; each has batch shape ``()`` and
        event shape equal to the parameter's shape. ``"weights"`` (K,) is always first.
    component_sites:
        Sites whose first parameter dimension indexes the K components.
    component_params:
        Site values -> keyword arguments of ``model._component_dist``, each of shape
        ``(..., K, *event)``.
    event_dims:
        Number of event dimensions of each of those keyword arguments (``loc``: 1,
        ``scale_tril``: 2, ...).
    model_params:
        Site values -> ``model.set_params`` keyword arguments (the user-facing layout:
        ``weights``, ``means``, ``covariances``, ``probs``, ``rates``), sample dims kept.
    site_values:
        A built model -> its parameters as site values (a start for the samplers).
    key:
        The site that orders components when relabelling draws: components are sorted on
        the first coordinate of this site's per-component slice.
    description:
        One line naming the priors.
    """

    sites: dict[str, dist.Distribution]
    component_sites: tuple[str, ...]
    component_params: ValueMap
    event_dims: dict[str, int]
    model_params: ValueMap
    site_values: Callable[[MixtureModel], dict[str, torch.Tensor]]
    key: str
    description: str = ""
    hyper: dict = field(default_factory=dict)

    def sample_shape(self, name: str, value: torch.Tensor) -> torch.Size:
        """The leading sample dimensions of ``value`` for site ``name``."""
        event = self.sites[name].event_shape
        return value.shape[: value.dim() - len(event)]


PriorFactory = Callable[..., MixturePrior]

_PRIORS: dict[tuple[type, str], PriorFactory] = {}


def register_prior(model_class: type, kind: str = "weak") -> Callable[[PriorFactory], PriorFactory]:
    """Decorator registering ``factory(model, x, **hyper) -> MixturePrior`` for a family
    (``kind``: the name ``prior={"type": kind}`` selects it by; ``"weak"`` by default)."""
    if not isinstance(model_class, type):
        raise TypeError(f"register_prior expects a class, got {model_class!r}")

    def decorator(fn: PriorFactory) -> PriorFactory:
        _PRIORS[(model_class, kind)] = fn
        return fn

    return decorator


def lookup_prior(model_class: type, kind: str = "weak") -> PriorFactory | None:
    """The ``kind`` prior factory for ``model_class`` or its nearest registered base."""
    for cls in model_class.__mro__:
        if (cls, kind) in _PRIORS:
            return _PRIORS[(cls, kind)]
    return None


def prior_kinds(model_class: type) -> list[str]:
    """The kinds of prior registered for ``model_class`` (and its bases)."""
    kinds = [k for cls in model_class.__mro__ for (c, k) in _PRIORS if c is cls]
    return list(dict.fromkeys(kinds))


def prior_for(model: MixtureModel, x: torch.Tensor, **hyper) -> MixturePrior:
    """The registered prior of ``model``'s family, scaled to ``x`` (N, D); built model needed.

    Raises ``ValueError`` naming the fix when the family has none.
    """
    hyper = dict(hyper)
    kind = hyper.pop("type", "weak")
    factory = lookup_prior(type(model), kind) if isinstance(kind, str) else None
    if factory is None:
        kinds = prior_kinds(type(model))
        if kinds:
            raise ValueError(
                f"unknown prior type {kind!r} for {type(model).__name__}; use one of {kinds}"
            )
        raise ValueError(
            f"no prior is registered for {type(model).__name__}; register one with "
            "elbolab.inference.register_prior to use the Bayesian schemes"
        )
    allowed = prior_options(factory)
    unknown = sorted(set(hyper) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown prior option(s) {unknown} for {type(model).__name__}; "
            f"its prior takes {allowed}"
        )
    return factory(model, x, **hyper)


def prior_options(factory: PriorFactory) -> list[str]:
    """Names of the hyperparameters a prior factory takes (its keyword-only arguments)."""
    return [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]


def _weights_prior(K: int, concentration: float, dtype) -> dist.Distribution:
    return dist.Dirichlet(torch.full((K,), float(concentration), dtype=dtype))


# ---------------------------------------------------------------------------- Gaussian


def _corr_cholesky(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard deviations (..., D) and the Cholesky factor of the correlation (..., D, D)."""
    std = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    corr = cov / (std.unsqueeze(-1) * std.unsqueeze(-2))
    return std, torch.linalg.cholesky(corr)


@register_prior(GaussianMixture)
def gaussian_prior(
    model: GaussianMixture,
    x: torch.Tensor,
    *,
    weight_concentration: float = 1.0,
    mean_scale: float = 10.0,
    scale_scale: float = 2.0,
    lkj_concentration: float = 2.0,
) -> MixturePrior:
    """Dirichlet weights, Normal means, HalfNormal scales, LKJ correlations (``full``/``tied``).

    ``mean_scale`` and ``scale_scale`` are multiples of the data's per-feature standard
    deviation; the means' prior is centred on the data mean.

    Sites: ``weights`` (K,), ``means`` (K, D), then by covariance type
    ``full``: ``corr_cholesky`` (K, D, D) (D >= 2) and ``scales`` (K, D);
    ``tied``: ``corr_cholesky`` (D, D) (D >= 2) and ``scales`` (D,);
    ``diag``: ``scales`` (K, D); ``spherical``: ``scales`` (K,).
    Sigma_k = diag(s_k) L_k L_k^T diag(s_k) for ``full`` and ``tied``.
    """
    K, D, dtype, kind = model.n_components, x.shape[1], x.dtype, model.covariance_type
    centre, spread = x.mean(0), x.std(0).clamp_min(torch.finfo(dtype).eps)
    sites: dict[str, dist.Distribution] = {
        "weights": _weights_prior(K, weight_concentration, dtype),
        "means": dist.Normal(centre.expand(K, D), mean_scale * spread.expand(K, D)).to_event(2),
    }
    lkj = torch.tensor(float(lkj_concentration), dtype=dtype)
    correlated = kind in ("full", "tied") and D >= 2
    if kind == "full":
        if correlated:
            sites["corr_cholesky"] = dist.LKJCholesky(D, lkj).expand([K]).to_event(1)
        sites["scales"] = dist.HalfNormal(scale_scale * spread.expand(K, D)).to_event(2)
    elif kind == "tied":
        if correlated:
            sites["corr_cholesky"] = dist.LKJCholesky(D, lkj)
        sites["scales"] = dist.HalfNormal(scale_scale * spread).to_event(1)
    elif kind == "diag":
        sites["scales"] = dist.HalfNormal(scale_scale * spread.expand(K, D)).to_event(2)
    else:
        sites["scales"] = dist.HalfNormal(scale_scale * spread.mean().expand(K)).to_event(1)

    def scale_tril(v):
        s = v["scales"]
        if correlated:
            return s.unsqueeze(-1) * v["corr_cholesky"]  # diag(s) L
        return torch.diag_embed(s)

    def component_params(v):
        if kind == "full":
            return {"loc": v["means"], "scale_tril": scale_tril(v)}
        if kind == "tied":
            L = scale_tril(v)
            return {"loc": v["means"], "scale_tril": L.unsqueeze(-3).expand(*L.shape[:-2], K, D, D)}
        if kind == "diag":
            return {"loc": v["means"], "scale": v["scales"]}
        s = v["scales"]
        return {"loc": v["means"], "scale": s.unsqueeze(-1).expand(*s.shape, D)}

    def model_params(v):
        if kind in ("full", "tied"):
            L = scale_tril(v)
            cov = L @ L.transpose(-1, -2)
        else:
            cov = v["scales"] ** 2
        return {"weights": v["weights"], "means": v["means"], "covariances": cov}

    def site_values(m: GaussianMixture):
        out = {"weights": m.weights_, "means": m.means_}
        if kind in ("full", "tied"):
            std, corr = _corr_cholesky(m.covariances_)
            out["scales"] = std
            if correlated:
                out["corr_cholesky"] = corr
        else:
            out["scales"] = m.scales.detach()
        return {k: out[k] for k in sites}

    event_dims = {"loc": 1, "scale_tril": 2, "scale": 1}
    cov_tril = kind in ("full", "tied")
    per_component = ("weights", "means") + (() if kind == "tied" else tuple(sites)[2:])
    return MixturePrior(
        sites=sites,
        component_sites=per_component,
        component_params=component_params,
        event_dims={
            k: event_dims[k] for k in (("loc", "scale_tril") if cov_tril else ("loc", "scale"))
        },
        model_params=model_params,
        site_values=site_values,
        key="means",
        description=(
            f"weights ~ Dirichlet({weight_concentration:g}); means ~ Normal(mean(x), "
            f"{mean_scale:g} std(x)); scales ~ HalfNormal({scale_scale:g} std(x))"
            + (f"; correlations ~ LKJCholesky({lkj_concentration:g})" if correlated else "")
        ),
        hyper={
            "weight_concentration": weight_concentration,
            "mean_scale": mean_scale,
            "scale_scale": scale_scale,
            "lkj_concentration": lkj_concentration,
        },
    )


# ---------------------------------------------------------------------------- Bernoulli
@register_prior(BernoulliMixture)
def bernoulli_prior(
    model: BernoulliMixture,
    x: torch.Tensor,
    *,
    weight_concentration: float = 1.0,
    beta: tuple[float, float] = (1.0, 1.0),
) -> MixturePrior:
    """Dirichlet weights and Beta(a, b) probabilities. Sites ``weights`` (K,), ``probs`` (K, D)."""
    K, D, dtype = model.n_components, x.shape[1], x.dtype
    a, b = (torch.full((K, D), float(c), dtype=dtype) for c in beta)
    sites = {
        "weights": _weights_prior(K, weight_concentration, dtype),
        "probs": dist.Beta(a, b).to_event(2),
    }
    return MixturePrior(
        sites=sites,
        component_sites=("weights", "probs"),
        component_params=lambda v: {"probs": v["probs"]},
        event_dims={"probs": 1},
        model_params=lambda v: {"weights": v["weights"], "probs": v["probs"]},
        site_values=lambda m: {"weights": m.weights_, "probs": m.probs_},
        key="probs",
        description=f"weights ~ Dirichlet({weight_concentration:g}); probs ~ Beta{tuple(beta)}",
        hyper={"weight_concentration": weight_concentration, "beta": tuple(beta)},
    )


# ---------------------------------------------------------------------------- Poisson
@register_prior(PoissonMixture)
def poisson_prior(
    model: PoissonMixture,
    x: torch.Tensor,
    *,
    weight_concentration: float = 1.0,
    rate_shape: float = 1.0,
) -> MixturePrior:
    """Dirichlet weights and Gamma(a, a / (mean(x) + 1)) rates (prior mean: mean(x) + 1).

    Sites ``weights`` (K,), ``rates`` (K, D).
    """
    K, D, dtype = model.n_components, x.shape[1], x.dtype
    shape = torch.full((K, D), float(rate_shape), dtype=dtype)
    rate = (rate_shape / (x.mean(0) + 1.0)).expand(K, D)
    sites = {
        "weights": _weights_prior(K, weight_concentration, dtype),
        "rates": dist.Gamma(shape, rate).to_event(2),
    }
    return MixturePrior(
        sites=sites,
        component_sites=("weights", "rates"),
        component_params=lambda v: {"rates": v["rates"]},
        event_dims={"rates": 1},
        model_params=lambda v: {"weights": v["weights"], "rates": v["rates"]},
        site_values=lambda m: {"weights": m.weights_, "rates": m.rates_},
        key="rates",
        description=(
            f"weights ~ Dirichlet({weight_concentration:g}); "
            f"rates ~ Gamma({rate_shape:g}, {rate_shape:g} / (mean(x) + 1))"
        ),
        hyper={"weight_concentration": weight_concentration, "rate_shape": rate_shape},
    )


# ---------------------------------------------------------------------------- categorical
@register_prior(CategoricalMixture)
def categorical_prior(
    model: CategoricalMixture,
    x: torch.Tensor,
    *,
    weight_concentration: float = 1.0,
    probs_concentration: float = 1.0,
) -> MixturePrior:
    """Dirichlet weights and category probabilities. Sites ``weights`` (K,), ``probs`` (K, D, C)."""
    K, D, C, dtype = model.n_components, x.shape[1], model.n_categories, x.dtype
    sites = {
        "weights": _weights_prior(K, weight_concentration, dtype),
        "probs": dist.Dirichlet(
            torch.full((K, D, C), float(probs_concentration), dtype=dtype)
        ).to_event(2),
    }
    return MixturePrior(
        sites=sites,
        component_sites=("weights", "probs"),
        component_params=lambda v: {"probs": v["probs"]},
        event_dims={"probs": 2},
        model_params=lambda v: {"weights": v["weights"], "probs": v["probs"]},
        site_values=lambda m: {"weights": m.weights_, "probs": m.probs_},
        key="probs",
        description=(
            f"weights ~ Dirichlet({weight_concentration:g}); "
            f"probs ~ Dirichlet({probs_concentration:g})"
        ),
        hyper={
            "weight_concentration": weight_concentration,
            "probs_concentration": probs_concentration,
        },
    )


# ---------------------------------------------------------------------------- conjugate
@register_prior(GaussianMixture, kind="conjugate")
def conjugate_gaussian_prior(
    model: GaussianMixture,
    x: torch.Tensor,
    *,
    weight_concentration_prior: float | None = None,
    mean_precision_prior: float | None = None,
    mean_prior=None,
    degrees_of_freedom_prior: float | None = None,
    covariance_prior=None,
) -> MixturePrior:
    """scikit-learn's ``BayesianGaussianMixture`` priors, with its names and defaults:
    weights ~ Dir(alpha_0 1_K) (alpha_0 = 1 / K), Sigma_k^-1 ~ W(W_0, nu_0) (W_0^-1 = the
    data's covariance, nu_0 = D), mu_k | Sigma_k ~ N(m_0, Sigma_k / beta_0) (m_0 = the data's
    mean, beta_0 = 1). Full covariances only (the Wishart is on full precisions).

    Sites: ``weights`` (K,), ``covariance_tril`` (K, D, D), ``mean_offsets`` (K, D);
    mu_k = m_0 + C_k e_k / sqrt(beta_0), Sigma_k = C_k C_k^T.
    """
    from .conjugate import BayesianGaussianMixture, InverseWishartCholesky

    if model.covariance_type != "full":
        raise ValueError(
            f"the conjugate prior is a Normal-Wishart on full precisions; use "
            f"GaussianMixture(K, 'full') with it, not covariance_type="
            f"{model.covariance_type!r}"
        )
    K, D, dtype = model.n_components, x.shape[1], x.dtype
    priors = BayesianGaussianMixture(
        K,
        "full",
        "dirichlet_distribution",
        weight_concentration_prior=weight_concentration_prior,
        mean_precision_prior=mean_precision_prior,
        mean_prior=mean_prior,
        degrees_of_freedom_prior=degrees_of_freedom_prior,
        covariance_prior=covariance_prior,
    ).build_for(x)  # every default and check in one place
    alpha0, beta0 = priors.weight_concentration_prior_, priors.mean_precision_prior_
    m0, psi0 = priors.mean_prior_, priors.precision_scale_prior_
    nu0 = priors.degrees_of_freedom_prior_
    root = beta0**0.5
    sites = {
        "weights": _weights_prior(K, alpha0, dtype),
        "covariance_tril": InverseWishartCholesky(torch.tensor(nu0, dtype=dtype), psi0)
        .expand([K])
        .to_event(1),
        "mean_offsets": dist.Normal(torch.zeros(K, D, dtype=dtype), 1.0).to_event(2),
    }

    def means(v):  # mu_k = m_0 + C_k e_k / sqrt(beta_0)
        return m0 + (v["covariance_tril"] @ v["mean_offsets"].unsqueeze(-1)).squeeze(-1) / root

    def site_values(m: GaussianMixture):
        C = torch.linalg.cholesky(m.covariances_)
        e = torch.linalg.solve_triangular(C, (m.means_ - m0).unsqueeze(-1), upper=False)
        return {"weights": m.weights_, "covariance_tril": C, "mean_offsets": root * e.squeeze(-1)}

    return MixturePrior(
        sites=sites,
        component_sites=("weights", "covariance_tril", "mean_offsets"),
        component_params=lambda v: {"loc": means(v), "scale_tril": v["covariance_tril"]},
        event_dims={"loc": 1, "scale_tril": 2},
        model_params=lambda v: {
            "weights": v["weights"],
            "means": means(v),
            "covariances": v["covariance_tril"] @ v["covariance_tril"].transpose(-1, -2),
        },
        site_values=site_values,
        key="mean_offsets",
        description=(
            f"weights ~ Dirichlet({alpha0:g}); Sigma_k^-1 ~ Wishart(nu_0 = {nu0:g}, W_0 = "
            f"cov(x)^-1); means ~ Normal(m_0, Sigma_k / {beta0:g}) (scikit-learn's "
            "BayesianGaussianMixture priors)"
        ),
        hyper={
            "type": "conjugate",
            "weight_concentration_prior": alpha0,
            "mean_precision_prior": beta0,
            "degrees_of_freedom_prior": nu0,
        },
    )
