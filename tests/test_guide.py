"""The exact-posterior guide: frozen theta~, no parameters of its own, discrete latents only."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab.guides import ExactPosterior
from families import fitted_model, sample_data


def test_refresh_freezes_theta_until_the_next_refresh():
    """EM-1: the M-step moves theta while q stays p(z | x; theta~)."""
    model, x = fitted_model("gaussian-full"), sample_data("gaussian-full", 50)
    guide = ExactPosterior(model).refresh(x)
    before = guide.probs(x).clone()
    other = x.clone()  # not the cached tensor: answered from the frozen twin
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    assert torch.equal(guide.probs(x), before)
    assert torch.allclose(guide.probs(other), before, atol=1e-12)
    assert not torch.allclose(model.predict_proba(x), before)
    guide.refresh(x)
    assert torch.allclose(guide.probs(x), model.predict_proba(x), atol=1e-12)
    guide.release()  # following the live model again
    with torch.no_grad():
        model.means_unconstrained.add_(0.1)
    assert torch.allclose(guide.probs(x), model.predict_proba(x), atol=1e-12)


def test_guide_has_no_parameters_and_blocks_no_gradient():
    model, x = fitted_model("poisson"), sample_data("poisson", 20)
    guide = ExactPosterior(model).refresh(x)
    assert list(guide.parameters()) == [] and list(guide.state_dict()) == []
    assert not guide.probs(x).requires_grad


def test_continuous_latent_sites_are_refused_with_the_fix():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match="latent site 'z' \\(Normal\\) cannot be summed out"):
        ExactPosterior(model).probs(torch.zeros(3))


def test_two_discrete_latent_sites_get_sequential_conditionals():
    """Beyond mixtures: z1 -> z2 -> x. q(z1) is the marginal posterior and q(z2 | z1)
    the conditional, so Pyro's ELBO with the guide is exactly log p(x) (EM-TIGHT)."""
    p1 = torch.tensor([0.3, 0.7], dtype=torch.float64)
    p2 = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=torch.float64)
    locs = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Categorical(p1))
            z2 = pyro.sample("z2", dist.Categorical(p2[z1]))
            pyro.sample("x", dist.Normal(locs[z2] + 0.5 * z1, 1.0), obs=x)

    x = torch.tensor([-2.1, 0.3, 2.9, 1.0], dtype=torch.float64)
    joint = torch.stack(
        [
            torch.stack(
                [
                    p1[a].log() + p2[a, b].log() + dist.Normal(locs[b] + 0.5 * a, 1.0).log_prob(x)
                    for b in range(3)
                ]
            )
            for a in range(2)
        ]
    )  # (2, 3, N)
    log_px = joint.logsumexp(0).logsumexp(0)
    guide = ExactPosterior(model)
    marginal_z1 = joint.logsumexp(1) - log_px  # (2, N)
    assert torch.allclose(guide.log_probs(x), marginal_z1.T, atol=1e-12)
    elbo = -pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, x)
    assert elbo == pytest.approx(float(log_px.sum()), abs=1e-10)
