"""Section 1 of DERIVATIONS.md: the lower bound, checked with Pyro's ELBO.

All identities here are exact (z is enumerated, nothing is sampled), so they are checked
in float64 to 1e-10 relative to the size of the summed log-likelihood.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro import poutine
from torch.distributions import Categorical, kl_divergence

from elbolab.guides import ExactPosterior
from elbolab.inference import elbo_loss
from families import FAMILIES, fitted_model, sample_data

EXACT = 1e-10  # float64, exact enumeration: only round-off separates the two sides


def pyro_elbo(model, guide, x) -> torch.Tensor:
    """sum_d LB_d(q_d, theta) from Pyro's TraceEnum_ELBO."""
    return -elbo_loss(model, guide, x).detach()


def random_q(n: int, K: int, seed: int) -> torch.Tensor:
    """Random log q_d(z) for every data point, shape (n, K)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, generator=g, dtype=torch.float64).mul(2).log_softmax(-1)


def guide_with_q(model, x, log_q):
    return ExactPosterior(model).fix(log_q, x)


def close(a, b, tol=EXACT):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return bool(((a - b).abs() <= tol * (1 + b.abs())).all())


def explicit_log_joint(model, x) -> torch.Tensor:
    """log p(x_d, z = k) by conditioning the Pyro program on z = k, one k at a time."""
    cols = []
    for k in range(model.n_components):
        z = torch.full((x.shape[0],), k, dtype=torch.long)
        trace = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(x)
        trace.compute_log_prob()
        cols.append(trace.nodes["z"]["log_prob"] + trace.nodes["x"]["log_prob"])
    return torch.stack(cols, -1).detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_LB_DEF(family):
    """(LB-DEF) LB(q, theta) = E_q[log p(x, z; theta) - log q(z)], summed over d.

    The right side is built without the enumeration code: the Pyro program is conditioned
    on z = k for each k and the expectation is an explicit sum.
    """
    model, x = fitted_model(family), sample_data(family, 50)
    log_q = random_q(50, 3, seed=1)
    by_hand = (log_q.exp() * (explicit_log_joint(model, x) - log_q)).sum()
    assert close(pyro_elbo(model, guide_with_q(model, x, log_q), x), by_hand)


@settings(max_examples=10, deadline=None)
@given(family=st.sampled_from(FAMILIES), seed=st.integers(0, 10_000))
def test_BASIC(family, seed):
    """(BASIC) log p(x; theta) = LB(q, theta) + KL(q || p(z | x; theta)) for every q.

    q is random (drawn per example by hypothesis); KL is computed by torch's closed form
    between the random q and the exact posterior.
    """
    model, x = fitted_model(family), sample_data(family, 40, seed=seed % 7)
    log_q = random_q(40, 3, seed)
    lb = pyro_elbo(model, guide_with_q(model, x, log_q), x)
    posterior = Categorical(logits=ExactPosterior(model).log_probs(x))  # probs= would clamp at eps
    kl = kl_divergence(Categorical(logits=log_q), posterior).sum()
    log_px = model.log_likelihood(x).sum()
    assert close(lb + kl, log_px)
    assert lb <= log_px  # the bound is below log p, KL >= 0


@pytest.mark.parametrize("family", FAMILIES)
def test_LB_1(family):
    """(LB-1) LB(q, theta) = E_q[log p(x, z; theta)] + H(q)."""
    model, x = fitted_model(family), sample_data(family, 50)
    log_q = random_q(50, 3, seed=2)
    expected_joint = (log_q.exp() * model.log_joint(x)).sum()
    entropy = Categorical(logits=log_q).entropy().sum()
    assert close(pyro_elbo(model, guide_with_q(model, x, log_q), x), expected_joint + entropy)


@pytest.mark.parametrize("family", FAMILIES)
def test_LB_2(family):
    """(LB-2) LB(q, theta) = E_q[log p(x | z; theta2)] - KL(q(z) || p(z; theta1)).

    theta1 = pi (the prior of z), theta2 = the component parameters.
    """
    model, x = fitted_model(family), sample_data(family, 50)
    log_q = random_q(50, 3, seed=3)
    log_px_given_z = model.log_joint(x) - model.weights_.log()  # log p_k(x_d)
    reconstruction = (log_q.exp() * log_px_given_z).sum()
    kl_prior = kl_divergence(
        Categorical(logits=log_q), Categorical(logits=model.weights_.log())
    ).sum()
    assert close(pyro_elbo(model, guide_with_q(model, x, log_q), x), reconstruction - kl_prior)


@pytest.mark.parametrize("family", FAMILIES)
def test_MLE(family):
    """(MLE) sum_d log p(x_d) = sum_d [LB_d(q_d) + KL(q_d || p(z | x_d))] >= sum_d LB_d.

    Checked per data point, each with its own q_d; the bound is strict for q_d away from
    the posterior and tight at the posterior.
    """
    model, x = fitted_model(family), sample_data(family, 60)
    log_q = random_q(60, 3, seed=4)
    q = log_q.exp()
    lb_d = (q * (model.log_joint(x) - log_q)).sum(-1)
    log_post = ExactPosterior(model).log_probs(x)
    kl_d = (q * (log_q - log_post)).sum(-1)
    log_px = model.log_likelihood(x)
    assert close(lb_d + kl_d, log_px)
    assert bool((lb_d < log_px).all())
    tight = (log_post.exp() * (model.log_joint(x) - log_post)).sum(-1)
    assert close(tight, log_px)
    # and the per-datum sum is what Pyro's ELBO returns
    assert close(pyro_elbo(model, guide_with_q(model, x, log_q), x), lb_d.sum())
