"""Section 3 of DERIVATIONS.md: the VAE, checked against Pyro's ELBO and gradients.

Exact identities (one fixed epsilon, closed forms) are compared to 1e-10 in float64;
Monte Carlo statements state their sample counts and use 5 standard errors.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

from elbolab.guides import AmortizedNormal
from elbolab.inference import SVITrainer
from elbolab.inference.svi.evaluate import _log_weights
from elbolab.models import VAE

EXACT = 1e-10
N, n, k = 7, 6, 2


def close(a, b, tol=EXACT):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return bool(((a - b).abs() <= tol * (1 + b.abs())).all())


def unit_pair(seed=0):
    """The lecture's pair: gaussian-unit model (DEC) and unit-scale guide (ENC), float64."""
    torch.manual_seed(seed)
    model = VAE(n, k, hidden=(5,), likelihood="gaussian-unit").double()
    guide = AmortizedNormal(n, k, hidden=(4,), scale="unit").double()
    x = torch.randn(N, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return model, guide, x


def fixed_epsilon(guide, x):
    """A guide trace (so Pyro replays one z = mu_E + eps) and that eps."""
    trace = poutine.trace(guide).get_trace(x)
    return trace, (trace.nodes["z"]["value"] - guide.encoder(x)).detach()


def test_DEC_and_ENC_programs():
    """(DEC) p(z) = N(0, I), x | z ~ N(F_mu(z), I); (ENC) q(z | x) = N(G_mu(x), I)."""
    model, guide, x = unit_pair()
    g = poutine.trace(guide).get_trace(x).nodes["z"]
    m = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(x))).get_trace(x)
    z = m.nodes["z"]
    assert torch.equal(z["fn"].base_dist.loc, torch.zeros(N, k, dtype=torch.float64))
    assert torch.equal(z["fn"].base_dist.scale, torch.ones(N, k, dtype=torch.float64))
    assert torch.allclose(m.nodes["x"]["fn"].base_dist.loc, model.decoder(z["value"]))
    assert torch.allclose(m.nodes["x"]["fn"].base_dist.scale, torch.ones(N, n, dtype=torch.float64))
    assert torch.allclose(g["fn"].base_dist.loc, guide.encoder(x))
    assert torch.equal(g["fn"].base_dist.scale, torch.ones(N, k, dtype=torch.float64))


def test_VAE_LB():
    """(VAE-LB) For one fixed eps, Pyro's ELBO (analytic KL) equals
    sum_d [-(n/2) log 2 pi + LB1 + LB2], LB1 = -1/2 |x - mu_D|^2, LB2 = -1/2 mu_E^T mu_E."""
    model, guide, x = unit_pair()
    trace, eps = fixed_epsilon(guide, x)
    loss = TraceMeanField_ELBO().loss(model, poutine.replay(guide, trace=trace), x)
    mu_E = guide.encoder(x)
    mu_D = model.decoder(mu_E + eps)
    lb1 = -0.5 * ((x - mu_D) ** 2).sum(-1)
    lb2 = -0.5 * (mu_E**2).sum(-1)
    assert close(-loss, (-(n / 2) * math.log(2 * math.pi) + lb1 + lb2).sum().detach())


def test_VAE_KL():
    """(VAE-KL) -KL(N(mu_E, I) || N(0, I)) = -1/2 mu_E^T mu_E, exactly; and the analytic-KL
    ELBO agrees in expectation with the fully sampled one.

    Expectation check: C = 20,000 particles each, tolerance 5 standard errors from the
    per-particle spread of both estimators."""
    model, guide, x = unit_pair()
    trace, _ = fixed_epsilon(guide, x)
    replayed = poutine.trace(poutine.replay(model, trace=trace)).get_trace(x)
    kl = kl_divergence(trace.nodes["z"]["fn"], replayed.nodes["z"]["fn"])
    assert close(kl, (0.5 * (guide.encoder(x) ** 2).sum(-1)).detach())

    C = 20_000
    pyro.set_rng_seed(1)
    with torch.no_grad():
        sampled = _log_weights(model, guide, x, C, "z").sum(-1)  # (C,) per-particle ELBO
        analytic = _log_weights(model, guide, x, C, "z", analytic_kl=True).sum(-1)
    se = math.sqrt((sampled.var() + analytic.var()) / C)
    assert abs(float(sampled.mean() - analytic.mean())) < 5 * se
    # and Pyro's own estimators, at the same particle count
    pyro.set_rng_seed(2)
    mf = -TraceMeanField_ELBO(num_particles=C, vectorize_particles=True, max_plate_nesting=1).loss(
        model, guide, x
    )
    tr = -Trace_ELBO(num_particles=C, vectorize_particles=True, max_plate_nesting=1).loss(
        model, guide, x
    )
    assert abs(mf - tr) < 5 * se


def linear_pair(seed=0):
    """gaussian-unit model with a linear decoder F(z) = W z + b (LB1 then has a closed form)."""
    torch.manual_seed(seed)
    model = VAE(n, k, decoder=nn.Linear(k, n).double())
    guide = AmortizedNormal(n, k, hidden=(4,)).double()
    x = torch.randn(N, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return model, guide, x


def test_VAE_MC():
    """(VAE-MC) The C-sample estimator -(1/2C) sum_c |x - mu_Dc|^2 is unbiased for LB1 and
    its variance falls as 1/C.

    Linear decoder: LB1 = -1/2 (|x - F(mu_E)|^2 + |W|_F^2) exactly. R = 2,000 replicate
    estimates for C = 1 and C = 10: each mean within 5 standard errors of LB1; the variance
    ratio within [7, 14.5] around 10 (its relative standard error is about 4.5%)."""
    model, guide, x = linear_pair()
    W = model.decoder.weight
    with torch.no_grad():
        exact = (-0.5 * (((x - model.decoder(guide.encoder(x))) ** 2).sum(-1) + (W**2).sum())).sum()
        kl = (0.5 * guide.encoder(x) ** 2).sum()
        const = N * (n / 2) * math.log(2 * math.pi)
        R = 2000
        var = {}
        for C in (1, 10):
            pyro.set_rng_seed(C)
            lw = _log_weights(model, guide, x, R * C, "z", analytic_kl=True)  # log p(x|z) - KL
            lb1 = (lw.sum(-1) + kl + const).reshape(R, C).mean(1)  # R replicates of the estimator
            assert abs(float(lb1.mean() - exact)) < 5 * float(lb1.std()) / math.sqrt(R)
            var[C] = float(lb1.var())
    assert 7.0 < var[1] / var[10] < 14.5


def test_GRAD_DEC_and_GRAD_ENC():
    """(GRAD-DEC) dLB1/dtheta = (x - mu_D)^T dF/dtheta, dLB2/dtheta = 0;
    (GRAD-ENC) dLB/dphi = (x - mu_D)^T dF/dz . I . dG/dphi - mu_E^T dG/dphi.

    Pyro's gradients (autograd through its loss, one fixed eps) against the hand formulas
    built from explicit vector-Jacobian products of F and G alone."""
    model, guide, x = unit_pair(3)
    trace, eps = fixed_epsilon(guide, x)
    theta, phi = list(model.decoder.parameters()), list(guide.encoder.parameters())
    bound = -TraceMeanField_ELBO().differentiable_loss(model, poutine.replay(guide, trace=trace), x)
    pyro_theta = torch.autograd.grad(bound, theta, retain_graph=True)
    pyro_phi = torch.autograd.grad(bound, phi)

    mu_E = guide.encoder(x)
    z = (mu_E.detach() + eps).requires_grad_()
    mu_D = model.decoder(z)
    residual = (x - mu_D).detach()
    hand_theta = torch.autograd.grad(mu_D, theta, grad_outputs=residual, retain_graph=True)
    dF_dz = torch.autograd.grad(mu_D, z, grad_outputs=residual)[0]  # (x - mu_D)^T dF/dz
    hand_phi = torch.autograd.grad(mu_E, phi, grad_outputs=dF_dz - mu_E.detach())
    for a, b in zip(pyro_theta, hand_theta, strict=True):
        assert close(a, b)
    for a, b in zip(pyro_phi, hand_phi, strict=True):
        assert close(a, b)


def test_SGD():
    """(SGD) One training step moves the bound up.

    The slide writes theta := theta - alpha d_theta; LB is *maximised*, so the step goes up
    the gradient (the minus sign is a slip): the trainer descends the loss -LB. The bound is
    measured before and after with the same 4,000 draws of eps per datum (common random
    numbers), and the step uses 200 particles so its direction is an ascent direction."""
    model, guide, x = unit_pair(4)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(4000, N, k, dtype=torch.float64, generator=g)

    def bound():
        with torch.no_grad():
            mu_E = guide.encoder(x)
            mu_D = model.decoder(mu_E + eps)
            lb1 = -0.5 * ((x - mu_D) ** 2).sum(-1).mean(0)
            return float((-(n / 2) * math.log(2 * math.pi) + lb1 - 0.5 * (mu_E**2).sum(-1)).sum())

    before = bound()
    trainer = SVITrainer(
        model,
        guide,
        loss=TraceMeanField_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1),
        optimizer=torch.optim.SGD,
        lr=1e-2,
        batch_size=N,
        seed=0,
        progress=False,
    )
    trainer.step(x)
    assert bound() > before


def test_VAE_OBJ_trains_theta_and_phi_together():
    """(VAE-OBJ) One problem over (theta, phi): a step changes both decoder and encoder."""
    model, guide, x = unit_pair(5)
    before = [p.detach().clone() for p in [*model.parameters(), *guide.parameters()]]
    SVITrainer(model, guide, lr=1e-2, batch_size=N, seed=0, progress=False).step(x)
    after = [*model.parameters(), *guide.parameters()]
    n_model = len(list(model.parameters()))
    assert any(
        not torch.equal(a, b) for a, b in zip(before[:n_model], after[:n_model], strict=True)
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(before[n_model:], after[n_model:], strict=True)
    )


class LinearGaussianEncoder(nn.Module):
    """x -> (A x + c, sigma): can represent the exact posterior of the linear model below."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Linear(n, k).double()
        self.raw_scale = nn.Parameter(torch.zeros(k, dtype=torch.float64))

    def forward(self, x):
        loc = self.loc(x)
        return loc, nn.functional.softplus(self.raw_scale).expand_as(loc)


def linear_gaussian_model():
    """F(z) = W z + b with orthogonal columns: the posterior N(m, S) has a diagonal S."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g))
    decoder = nn.Linear(k, n).double()
    with torch.no_grad():
        decoder.weight.copy_(Q * torch.tensor([2.0, 0.7], dtype=torch.float64))
        decoder.bias.copy_(torch.randn(n, dtype=torch.float64, generator=g))
    for p in decoder.parameters():
        p.requires_grad_(False)
    model = VAE(n, k, decoder=decoder)
    W, b = decoder.weight, decoder.bias
    x = MultivariateNormal(b, W @ W.T + torch.eye(n, dtype=torch.float64)).sample((400,))
    S = torch.linalg.inv(torch.eye(k, dtype=torch.float64) + W.T @ W)
    return model, x, W, b, S


def closed_form_terms(model, guide, x, W, b, S):
    """log p(x), LB(q) and KL(q || p(z | x)) per datapoint, all in closed form."""
    n_ = x.shape[1]
    log_px = MultivariateNormal(b, W @ W.T + torch.eye(n_, dtype=x.dtype)).log_prob(x)
    m_q, s_q = guide.encode(x)
    expected_loglik = -0.5 * n_ * math.log(2 * math.pi) - 0.5 * (
        ((x - m_q @ W.T - b) ** 2).sum(-1) + ((W**2).sum(0) * s_q**2).sum(-1)
    )
    q = MultivariateNormal(m_q, torch.diag_embed(s_q**2))
    prior = MultivariateNormal(torch.zeros(k, dtype=x.dtype), torch.eye(k, dtype=x.dtype))
    lb = expected_loglik - kl_divergence(q, prior)
    posterior = MultivariateNormal((x - b) @ W @ S.T, S)
    return log_px, lb, kl_divergence(q, posterior)


def test_BASIC_for_the_linear_gaussian_vae():
    """(BASIC) LB(q) + KL(q || p(z | x)) = log p(x) for an arbitrary amortized q (closed
    forms of a linear decoder with Gaussian noise, 1e-10)."""
    model, x, W, b, S = linear_gaussian_model()
    guide = AmortizedNormal(n, k, scale="learned", encoder=LinearGaussianEncoder())
    with torch.no_grad():
        log_px, lb, kl = closed_form_terms(model, guide, x, W, b, S)
    assert close(lb + kl, log_px)
    assert bool((lb < log_px).all())


def test_AMORT_trained_guide_approaches_the_exact_posterior():
    """(AMORT) max_phi sum_d LB_d = min_phi sum_d KL(q(z | x_d; phi) || p(z | x_d)):
    training only the encoder (decoder frozen) drives the bound to log p(x).

    300 epochs of Adam on 400 points; the mean gap (= KL) falls below 0.01 nats from
    about 0.9 at the start, and the encoder's mean approaches the posterior mean."""
    model, x, W, b, S = linear_gaussian_model()
    torch.manual_seed(0)
    guide = AmortizedNormal(n, k, scale="learned", encoder=LinearGaussianEncoder())
    with torch.no_grad():
        gap_before = float((closed_form_terms(model, guide, x, W, b, S)[2]).mean())
    trainer = SVITrainer(
        model,
        guide,
        loss=TraceMeanField_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1),
        lr=0.05,
        batch_size=400,
        seed=0,
        progress=False,
    )
    trainer.fit(x, epochs=300)
    with torch.no_grad():
        log_px, lb, kl = closed_form_terms(model, guide, x, W, b, S)
        posterior_mean = (x - b) @ W @ S.T
        assert gap_before > 0.5
        assert float(kl.mean()) < 0.01
        assert close(lb + kl, log_px)
        assert torch.allclose(guide.encode(x)[0], posterior_mean, atol=0.1)


@pytest.mark.parametrize(
    "likelihood,count", [("gaussian", None), ("bernoulli", None), ("binomial", 16)]
)
def test_other_likelihoods_run_through_the_same_elbo(likelihood, count):
    model = VAE(n, k, hidden=(5,), likelihood=likelihood, count=count).double()
    guide = AmortizedNormal(n, k, hidden=(4,), scale="learned").double()
    x, _ = model.sample(20, seed=0)
    model.validate_data(x)  # samples lie in the support
    loss = TraceMeanField_ELBO().loss(model, guide, x)
    assert math.isfinite(loss)
    assert model.decode(torch.zeros(3, k, dtype=torch.float64)).shape == (3, n)
