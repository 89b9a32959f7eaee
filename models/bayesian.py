"""The Bayesian mixture as a Pyro program: a mixture whose parameters are drawn from a prior.

:class:`BayesianMixture` is the program of :class:`~elbolab.models.MixtureModel` with its
parameters drawn from a prior (:mod:`.priors`) instead of held as point values::

    theta ~ p(theta)                                  (global sites: weights, means, ...)
    z_d ~ Categorical(pi),  x_d ~ p_{z_d}(x; theta)   (plate "data"; z enumerated)

The discrete ``"z"`` is marked for parallel enumeration, so every fit of it sums z out
exactly (EM-MIX.1's sum over k) and only theta is approximated (MAP, mean-field VI and
NUTS: :mod:`elbolab.inference.compare.bayesian`). :meth:`BayesianMixture.potential` is the
potential -log p(theta, x) with z summed out, written directly.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch.distributions import biject_to

from .base import MixtureModel
from .priors import MixturePrior, prior_for

#: draws scored per block when evaluating log p(x_d | theta_s) for many draws
DRAW_BLOCK = 256


class BayesianMixture(PyroModule):
    """The mixture ``model`` with a prior on its parameters, as a Pyro program.

    Parameters
    ----------
    model:
        A built :class:`~elbolab.models.MixtureModel`; only its family (component
        distribution) is used, never its parameter values.
    x:
        Data (N, D), to scale the prior (see :mod:`.priors`).
    prior:
        Hyperparameters of the family's prior, e.g. ``{"mean_scale": 5.0}``.

    ``program(x)`` samples the prior's sites, then ``"z"`` (Categorical, marked for
    parallel enumeration) and the observed ``"x"`` inside ``pyro.plate("data", N)``,
    like :meth:`MixtureModel.forward`. It returns the site values.
    """

    latent_site = "z"
    observed_site = "x"

    def __init__(self, model: MixtureModel, x: torch.Tensor, prior: dict | None = None) -> None:
        super().__init__()
        model._require_built()
        self._model_ref = (model,)  # a tuple keeps the model out of this module's parameters
        self._hyper = dict(prior or {})
        self.prior: MixturePrior = prior_for(model, x, **self._hyper)

    @property
    def model(self) -> MixtureModel:
        return self._model_ref[0]

    @property
    def sites(self) -> list[str]:
        """Names of the parameter sites, in program order."""
        return list(self.prior.sites)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        values = {name: pyro.sample(name, d) for name, d in self.prior.sites.items()}
        params = self.prior.component_params(values)  # each (K, ...)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample(
                self.latent_site,
                dist.Categorical(logits=values["weights"].log()),
                infer={"enumerate": "parallel"},
            )
            component = self.model._component_dist(**{k: v[z] for k, v in params.items()})
            pyro.sample(self.observed_site, component, obs=x)
        return values

    def without_z(self):
        """The program with ``"z"`` hidden: what an autoguide for theta is built from."""
        return poutine.block(self, hide=[self.latent_site])

    # ------------------------------------------------------------------ densities
    def log_components(self, values: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """log p_k(x_d; theta_k) for site values with leading sample dims: (..., K, N)."""
        params = self.prior.component_params(values)
        params = {k: v.unsqueeze(-(self.prior.event_dims[k] + 1)) for k, v in params.items()}
        return self.model._component_dist(**params).log_prob(x)

    def log_likelihood(self, values: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """log p(x_d | theta) = log sum_k pi_k p_k(x_d; theta_k), z summed out: (..., N).

        ``values`` may carry leading sample dims (S, ...); they are scored in blocks of
        :data:`DRAW_BLOCK` draws.
        """
        weights = values["weights"]
        batch = weights.shape[:-1]
        if len(batch) == 0:
            log_w = weights.log().unsqueeze(-1)
            return (log_w + self.log_components(values, x)).logsumexp(-2)
        flat = {k: v.reshape(-1, *v.shape[len(batch) :]) for k, v in values.items()}  # (S, ...)
        n = flat["weights"].shape[0]
        out = []
        for start in range(0, n, DRAW_BLOCK):
            block = {k: v[start : start + DRAW_BLOCK] for k, v in flat.items()}
            log_w = block["weights"].log().unsqueeze(-1)
            out.append((log_w + self.log_components(block, x)).logsumexp(-2))
        return torch.cat(out).reshape(*batch, x.shape[0])

    def log_prior(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(theta), summed over the sites; shape: the values' sample dims."""
        return sum(d.log_prob(values[name]) for name, d in self.prior.sites.items())

    def transforms(self) -> dict[str, torch.distributions.Transform]:
        """Unconstrained -> constrained bijection of each site (``biject_to(support)``)."""
        return {name: biject_to(d.support) for name, d in self.prior.sites.items()}

    def potential(self, x: torch.Tensor):
        """U(u) = -log p(theta(u), x) - log |d theta / d u|, z summed out, on unconstrained u.

        Returns a function of a dict of unconstrained site values (no sample dims), the
        potential energy Pyro's HMC/NUTS expect; equal to the one Pyro derives from this
        program under enumeration (``pyro.infer.mcmc.util.initialize_model``).
        """
        transforms = self.transforms()
        # the support checks are left out: every value is a transform's output, in support
        with pyro.validation_enabled(False):
            sites = prior_for(self.model, x, **self._hyper).sites

        def potential_fn(unconstrained: dict[str, torch.Tensor]) -> torch.Tensor:
            with pyro.validation_enabled(False):
                values, log_det = {}, 0.0
                for name, t in transforms.items():
                    u = unconstrained[name]
                    values[name] = v = t(u)
                    log_det = log_det + t.log_abs_det_jacobian(u, v).sum()
                log_prior = sum(d.log_prob(values[name]) for name, d in sites.items())
                return -(log_prior + log_det + self.log_likelihood(values, x).sum())

        return potential_fn
