"""Bernoulli, Poisson and categorical mixtures with conjugate priors (variational Bayes).

Each is a :class:`~elbolab.models.conjugate.ConjugateMixture`: the weights' prior is the
Dirichlet (or the Dirichlet process's sticks), and each component's parameters have the
conjugate prior of its family, the same as the weak priors of :mod:`.priors`:

- Bernoulli: mu_kj ~ Beta(a0, b0); q = Beta(a0 + S_kj, b0 + N_k - S_kj); plug-in
  sigmoid(psi(a) - psi(b)), offset sum_j ln(exp E ln mu + exp E ln(1 - mu)).
- Poisson: lambda_kj ~ Gamma(a0, b0_j) of mean mean_j(x) + 1; q = Gamma(a0 + S_kj, b0_j + N_k);
  plug-in exp E[ln lambda] = exp(psi(a)) / b, offset sum_j (exp E ln lambda - a / b).
- categorical: theta_kj ~ Dir(c0 1_C); q = Dir(c0 + counts_kj); plug-in softmax E[ln theta],
  offset sum_j logsumexp_c E[ln theta].

S_kj = sum_d r_dk x_dj and N_k are EM's sums for the family
(:mod:`elbolab.inference.em.mixture`).
The divergences KL(q || p) are torch's closed forms (``torch.distributions.kl_divergence``).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence

from .base import MixtureModel
from .bernoulli import BernoulliMixture
from .categorical import CategoricalMixture
from .conjugate import ConjugateMixture, _positive
from .poisson import PoissonMixture


def _pair(name: str, value, example: str) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be two positive numbers, got {value!r}; e.g. {example}")
    return tuple(_positive(name, v, example) for v in value)


class BayesianBernoulliMixture(ConjugateMixture):
    """Binary vectors: mu_kj ~ Beta(a0, b0), x_dj | z_d = k ~ Bernoulli(mu_kj).

    ``beta_prior``: (a0, b0), default (1, 1) (uniform). Fitted attributes of the guide:
    ``probs_`` E_q[mu] (K, D), ``concentration1_`` and ``concentration0_`` (a, b of q).
    """

    plugin_class = BernoulliMixture

    def __init__(
        self,
        n_components: int = 1,
        weight_concentration_prior_type: str = "dirichlet_process",
        weight_concentration_prior: float | None = None,
        beta_prior: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        super().__init__(n_components, weight_concentration_prior_type, weight_concentration_prior)
        self.beta_prior = _pair("beta_prior", beta_prior, "(1.0, 1.0)")

    def _build_priors(self, x):
        self.beta_prior_ = self.beta_prior

    def _prior_sites(self):
        a0, b0 = (torch.full((self.n_features_in_,), c, dtype=self.dtype) for c in self.beta_prior_)
        return {"probs": pyro.sample("probs", dist.Beta(a0, b0).to_event(1))}

    def _observation(self, theta, k):
        return dist.Bernoulli(probs=theta["probs"][k]).to_event(1)

    def _fresh_predictive(self):
        a0, b0 = self.beta_prior_
        p = torch.full((self.n_features_in_,), a0 / (a0 + b0), dtype=self.dtype)
        return dist.Bernoulli(probs=p).to_event(1)

    def q_init(self):
        K, D, dtype = self.n_components, self.n_features_in_, self.dtype
        return {
            "concentration1": torch.ones(K, D, dtype=dtype),
            "concentration0": torch.ones(K, D, dtype=dtype),
        }

    def plugin_values(self, q):
        a, b = q["concentration1"], q["concentration0"]
        total = torch.digamma(a + b)
        log_mu, log_1m = torch.digamma(a) - total, torch.digamma(b) - total
        norm = torch.logaddexp(log_mu, log_1m)  # (K, D)
        return {"probs": (log_mu - log_1m, True)}, norm.sum(-1)  # (the logit: unconstrained)

    def kl_components(self, q):
        a0, b0 = self.beta_prior_
        prior = dist.Beta(
            torch.full_like(q["concentration1"], a0), torch.full_like(q["concentration0"], b0)
        )
        return kl_divergence(dist.Beta(q["concentration1"], q["concentration0"]), prior).sum(-1)

    def guide_sites(self, q):
        pyro.sample("probs", dist.Beta(q["concentration1"], q["concentration0"]).to_event(1))

    def draw_components(self, q, n):
        return {"probs": dist.Beta(q["concentration1"], q["concentration0"]).sample((n,))}

    def predictive(self, q):
        a, b = q["concentration1"], q["concentration0"]
        return dist.Bernoulli(probs=a / (a + b)).to_event(1)

    def q_attributes(self, q):
        a, b = q["concentration1"], q["concentration0"]
        return {"probs": a / (a + b), "concentration1": a, "concentration0": b}


class BayesianPoissonMixture(ConjugateMixture):
    """Counts: lambda_kj ~ Gamma(a0, a0 / (mean_j(x) + 1)), x_dj | z_d = k ~ Poisson(lambda_kj).

    ``rate_shape_prior``: a0 (default 1: an exponential prior of mean mean(x) + 1, the weak
    prior of :mod:`.priors`). Guide attributes: ``rates_`` E_q[lambda] (K, D),
    ``rate_shape_`` and ``rate_rate_`` (a, b of q).
    """

    plugin_class = PoissonMixture

    def __init__(
        self,
        n_components: int = 1,
        weight_concentration_prior_type: str = "dirichlet_process",
        weight_concentration_prior: float | None = None,
        rate_shape_prior: float = 1.0,
    ) -> None:
        super().__init__(n_components, weight_concentration_prior_type, weight_concentration_prior)
        self.rate_shape_prior = _positive("rate_shape_prior", rate_shape_prior, "1.0")

    def _build_priors(self, x):
        self.rate_shape_prior_ = self.rate_shape_prior
        self.register_buffer("rate_rate_prior_", self.rate_shape_prior / (x.mean(0) + 1.0))

    def _prior(self):
        a0 = torch.full_like(self.rate_rate_prior_, self.rate_shape_prior_)
        return a0, self.rate_rate_prior_

    def _prior_sites(self):
        a0, b0 = self._prior()
        return {"rates": pyro.sample("rates", dist.Gamma(a0, b0).to_event(1))}

    def _observation(self, theta, k):
        return dist.Poisson(theta["rates"][k]).to_event(1)

    def _fresh_predictive(self):
        a0, b0 = self._prior()
        return dist.NegativeBinomial(total_count=a0, probs=1 / (1 + b0)).to_event(1)

    def q_init(self):
        K, D, dtype = self.n_components, self.n_features_in_, self.dtype
        return {
            "rate_shape": torch.ones(K, D, dtype=dtype),
            "rate_rate": torch.ones(K, D, dtype=dtype),
        }

    def plugin_values(self, q):
        a, b = q["rate_shape"], q["rate_rate"]
        log_rate = torch.digamma(a) - b.log()  # E[ln lambda]
        offset = (log_rate.exp() - a / b).sum(-1)
        return {"rates": (log_rate, True)}, offset  # (the log: unconstrained)

    def kl_components(self, q):
        a0, b0 = self._prior()
        return kl_divergence(
            dist.Gamma(q["rate_shape"], q["rate_rate"]),
            dist.Gamma(a0.expand_as(q["rate_shape"]), b0.expand_as(q["rate_rate"])),
        ).sum(-1)

    def guide_sites(self, q):
        pyro.sample("rates", dist.Gamma(q["rate_shape"], q["rate_rate"]).to_event(1))

    def draw_components(self, q, n):
        return {"rates": dist.Gamma(q["rate_shape"], q["rate_rate"]).sample((n,))}

    def predictive(self, q):
        a, b = q["rate_shape"], q["rate_rate"]
        return dist.NegativeBinomial(total_count=a, probs=1 / (1 + b)).to_event(1)

    def q_attributes(self, q):
        a, b = q["rate_shape"], q["rate_rate"]
        return {"rates": a / b, "rate_shape": a, "rate_rate": b}


class BayesianCategoricalMixture(ConjugateMixture):
    """One category per feature: theta_kj ~ Dir(c0 1_C), x_dj | z_d = k ~ Categorical(theta_kj).

    ``n_categories``: C (default max(x) + 1); ``probs_concentration_prior``: c0 (default 1).
    Guide attributes: ``probs_`` E_q[theta] (K, D, C), ``probs_concentration_`` (q's).
    """

    plugin_class = CategoricalMixture

    def __init__(
        self,
        n_components: int = 1,
        n_categories: int | None = None,
        weight_concentration_prior_type: str = "dirichlet_process",
        weight_concentration_prior: float | None = None,
        probs_concentration_prior: float = 1.0,
    ) -> None:
        super().__init__(n_components, weight_concentration_prior_type, weight_concentration_prior)
        CategoricalMixture(1, n_categories)  # its checks of n_categories
        self.n_categories = n_categories
        self.probs_concentration_prior = _positive(
            "probs_concentration_prior", probs_concentration_prior, "1.0"
        )

    def _template(self) -> MixtureModel:
        C = getattr(self, "n_categories_", None) or self.n_categories
        return CategoricalMixture(self.n_components, C)

    def _check_support(self, x, fitted):
        template = self._template()
        template._check_support(x, False)
        C = getattr(self, "n_categories_", None) if fitted else self.n_categories
        if C is not None and bool((x >= C).any()):
            raise ValueError(
                f"x has category codes up to {int(x.max())} and the model has n_categories={C}; "
                "recode the data to 0..C-1 or create the model with more categories"
            )

    def plugin(self) -> MixtureModel:
        return CategoricalMixture(self.n_components, self.n_categories_).build(
            self.n_features_in_, self.dtype
        )

    def _build_priors(self, x):
        self.n_categories_ = int(self.n_categories or int(x.max()) + 1)
        self.probs_concentration_prior_ = self.probs_concentration_prior

    def _prior_concentration(self):
        D, C = self.n_features_in_, self.n_categories_
        return torch.full((D, C), self.probs_concentration_prior_, dtype=self.dtype)

    def _prior_sites(self):
        return {
            "probs": pyro.sample("probs", dist.Dirichlet(self._prior_concentration()).to_event(1))
        }

    def _observation(self, theta, k):
        return dist.Categorical(probs=theta["probs"][k]).to_event(1)

    def _fresh_predictive(self):
        c0 = self._prior_concentration()
        return dist.Categorical(probs=c0 / c0.sum(-1, keepdim=True)).to_event(1)

    def q_init(self):
        K, D, C, dtype = self.n_components, self.n_features_in_, self.n_categories_, self.dtype
        return {"probs_concentration": torch.ones(K, D, C, dtype=dtype)}

    def plugin_values(self, q):
        c = q["probs_concentration"]
        log_theta = torch.digamma(c) - torch.digamma(c.sum(-1, keepdim=True))  # E[ln theta]
        norm = log_theta.logsumexp(-1, keepdim=True)
        return {"probs": ((log_theta - norm).exp(), False)}, norm.squeeze(-1).sum(-1)

    def kl_components(self, q):
        c = q["probs_concentration"]
        prior = dist.Dirichlet(self._prior_concentration().expand_as(c))
        return kl_divergence(dist.Dirichlet(c), prior).sum(-1)

    def guide_sites(self, q):
        pyro.sample("probs", dist.Dirichlet(q["probs_concentration"]).to_event(1))

    def draw_components(self, q, n):
        return {"probs": dist.Dirichlet(q["probs_concentration"]).sample((n,))}

    def predictive(self, q):
        c = q["probs_concentration"]
        return dist.Categorical(probs=c / c.sum(-1, keepdim=True)).to_event(1)

    def q_attributes(self, q):
        c = q["probs_concentration"]
        return {"probs": c / c.sum(-1, keepdim=True), "probs_concentration": c}
