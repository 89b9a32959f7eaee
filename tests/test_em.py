"""Section 2 of DERIVATIONS.md: EM, checked against Pyro's ELBO and the closed forms.

Exact paths (enumeration, closed-form updates) are compared to 1e-10 in float64.
Comparisons with a numerical optimum (L-BFGS in the gradient M-step) use 1e-6: the
optimiser stops at a gradient norm of 1e-10 on a per-sample objective, which leaves
parameters within ~1e-7 of the optimum for these well-conditioned problems.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from torch.distributions import Bernoulli, Categorical, MultivariateNormal, Poisson

from elbolab.guides import ExactPosterior
from elbolab.inference import (
    EM,
    ConvergenceWarning,
    elbo_loss,
    gradient_m_step,
    lookup_m_step,
    registered_families,
    weights_m_step,
)
from elbolab.models import GaussianMixture
from families import FAMILIES, fitted_model, make_model, sample_data, true_params

EXACT = 1e-10
OPTIMUM = 1e-6


def close(a, b, tol=EXACT):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return bool(((a - b).abs() <= tol * (1 + b.abs())).all())


def component_params(model) -> dict[str, torch.Tensor]:
    """The constrained parameters in their user-facing layout."""
    out = {"weights": model.weights_}
    for name in ("means_", "covariances_", "probs_", "rates_"):
        if hasattr(type(model), name):
            out[name] = getattr(model, name)
    return out


def perturbed(family: str):
    """A model away from the truth (so EM has work to do)."""
    model = fitted_model(family)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def closed_form_step(model, x, resp, reg_covar=0.0):
    nk = resp.sum(0)
    lookup_m_step(type(model))(model, x, resp, nk, reg_covar)
    model.assign("weights", weights_m_step(nk))


@pytest.mark.parametrize("family", FAMILIES)
def test_EM_TIGHT(family):
    """(EM-TIGHT) With the exact guide, Pyro's ELBO equals sum_d log p(x_d; theta)."""
    model, x = perturbed(family), sample_data(family, 80)
    loglik = model.log_likelihood(x).sum().detach()
    refreshed = ExactPosterior(model).refresh(x)  # posterior cached by the E-step
    assert close(-TraceEnum_ELBO(max_plate_nesting=1).loss(model, refreshed, x), loglik)
    # and computed inside the ELBO's own trace, with no E-step beforehand
    following = ExactPosterior(model)
    assert close(-TraceEnum_ELBO(max_plate_nesting=1).loss(model, following, x), loglik)


@pytest.mark.parametrize("family", FAMILIES)
def test_EM_MIX_1(family):
    """(EM-MIX.1) r_dk = pi_k p_k(x_d) / sum_k' pi_k' p_k'(x_d), from torch's densities."""
    model, x = fitted_model(family), sample_data(family, 80)
    p = component_params(model)
    xk = x.unsqueeze(-2)  # (N, 1, D) against K components
    if family.startswith("gaussian"):
        cov = p["covariances_"]
        D = x.shape[1]
        kind = family.split("-")[1]
        full = {
            "full": cov,
            "tied": cov.expand(3, D, D),
            "diag": torch.diag_embed(cov),
            "spherical": cov[:, None, None] * torch.eye(D, dtype=x.dtype),
        }[kind]
        log_pk = MultivariateNormal(p["means_"], covariance_matrix=full).log_prob(xk)
    elif family == "bernoulli":
        log_pk = Bernoulli(probs=p["probs_"]).log_prob(xk).sum(-1)
    elif family == "poisson":
        log_pk = Poisson(p["rates_"]).log_prob(xk).sum(-1)
    else:
        log_pk = Categorical(probs=p["probs_"]).log_prob(xk).sum(-1)
    numerator = p["weights"].log() + log_pk
    r = (numerator - numerator.logsumexp(-1, keepdim=True)).exp()
    assert close(ExactPosterior(model).probs(x), r)


@pytest.mark.parametrize("family", FAMILIES)
def test_EM_1(family):
    """(EM-1) One EM iteration: E-step q := p(z | x; theta), M-step theta := argmax LB.

    After the closed-form M-step the gradient of Pyro's ELBO (guide frozen) vanishes:
    the M-step is the maximiser of sum_d LB_d(q_d, theta) over theta.
    """
    model, x = perturbed(family), sample_data(family, 200)
    guide = ExactPosterior(model).refresh(x)  # step 1
    closed_form_step(model, x, guide.probs(x))  # step 2
    loss = elbo_loss(model, guide, x) / x.shape[0]
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    assert max(float(g.abs().max()) for g in grads) < 1e-8


@pytest.mark.parametrize("family", FAMILIES)
def test_EM_2(family):
    """(EM-2) argmax_theta Q(theta~, theta) gives the same theta as EM-1's M-step.

    Q is built by hand from the responsibilities, sum_d sum_k r_dk log p(x_d, z=k; theta);
    it differs from Pyro's ELBO only by the entropy of q (exactly, at any theta), and
    maximising it by L-BFGS lands on EM-1's closed-form update.
    """
    x = sample_data(family, 200)
    model = perturbed(family)
    guide = ExactPosterior(model).refresh(x)
    r = guide.probs(x)
    entropy = Categorical(probs=r).entropy().sum()

    def q_function(m):
        return (r * m.log_joint(x)).sum()

    for _ in range(2):  # at two different theta the gap is the same constant H(q)
        gap = -elbo_loss(model, guide, x).detach() - q_function(model).detach()
        assert close(gap, entropy)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)

    by_q = perturbed(family)
    params = list(by_q.parameters())
    opt = torch.optim.LBFGS(
        params,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
        history_size=50,
    )

    def closure():
        opt.zero_grad()
        loss = -q_function(by_q) / x.shape[0]
        loss.backward()
        return loss

    opt.step(closure)
    by_em1 = perturbed(family)
    closed_form_step(by_em1, x, r)
    for name, value in component_params(by_em1).items():
        assert close(component_params(by_q)[name], value, OPTIMUM), name


@pytest.mark.parametrize("m_step", ["closed-form", "gradient"])
@pytest.mark.parametrize("family", FAMILIES)
def test_EM_MONO(family, m_step):
    """(EM-MONO) log p never decreases: ll[t] <= LB[t] <= ll[t+1] at every iteration.

    reg_covar=0 (plain maximum likelihood). Slack 1e-12 relative for round-off.
    """
    x = sample_data(family, 300)
    model = make_model(family)
    em = EM(
        model,
        ExactPosterior(model),
        m_step=m_step,
        reg_covar=0.0,
        tol=1e-9,
        max_iter=40 if m_step == "closed-form" else 8,
        init="random",
        seed=0,
        gradient_max_iter=10,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = em.fit(x)
    lls, lbs = result.log_likelihoods, result.lower_bounds
    assert len(lls) == result.n_iter + 1 and len(lbs) == result.n_iter >= 3
    slack = 1e-12 * abs(lls[0])
    for t, lb in enumerate(lbs):
        assert lls[t] <= lb + slack, (t, lls[t], lb)
        assert lb <= lls[t + 1] + slack, (t, lb, lls[t + 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_EM_MIX_LB(family):
    """(EM-MIX.LB) The bound EM records, sum_k r log(pi p / r), equals Pyro's ELBO.

    One iteration from explicit parameters: ``lower_bounds[0]`` is LB(q_0, theta_1), and
    Pyro's TraceEnum_ELBO with the guide frozen at theta_0, evaluated at theta_1, agrees.
    """
    x = sample_data(family, 100)
    start = {k: v for k, v in true_params(family).items()}
    if "means" in start:
        start["means"] = start["means"] + 0.5
    model = make_model(family)
    with pytest.warns(ConvergenceWarning):
        result = EM(
            model,
            ExactPosterior(model),
            init=start,
            max_iter=1,
            tol=0.0,
            reg_covar=0.0,
            progress=False,
        ).fit(x)
    by_pyro = make_model(family)
    by_pyro.build(x.shape[1], x.dtype)
    by_pyro.set_params(**start)
    guide = ExactPosterior(by_pyro).refresh(x)  # theta~ = theta_0
    closed_form_step(by_pyro, x, guide.probs(x))  # theta_1
    lb = -elbo_loss(by_pyro, guide, x).detach() / x.shape[0]
    assert close(result.lower_bounds[0], lb)


@pytest.mark.parametrize("family", FAMILIES)
def test_EM_MIX_2_3(family):
    """(EM-MIX.2) pi_k = N_k / N and (EM-MIX.3) theta_k = weighted MLE, in closed form,
    equal the optimum that the generic gradient M-step finds by maximising Pyro's ELBO
    with the guide frozen -- for every registered family."""
    assert type(make_model(family)) in registered_families()
    x = sample_data(family, 400)
    g = torch.Generator().manual_seed(5)
    log_r = torch.randn(400, 3, generator=g, dtype=torch.float64).log_softmax(-1)
    closed = perturbed(family)
    guide = ExactPosterior(closed).fix(log_r, x)
    closed_form_step(closed, x, log_r.exp())
    assert close(closed.weights_, log_r.exp().mean(0))  # EM-MIX.2 by its formula

    by_gradient = perturbed(family)
    guide = ExactPosterior(by_gradient).fix(log_r, x)
    gradient_m_step(by_gradient, guide, x, max_iter=500, tolerance_grad=1e-12)
    for name, value in component_params(closed).items():
        assert close(component_params(by_gradient)[name], value, OPTIMUM), name


@pytest.mark.parametrize("family", FAMILIES)
def test_EM_MM(family):
    """(EM-MM) EM is majorize-minimize: theta -> LB(q_t, theta) is a minorizer of
    log p(x; theta), touching it at theta_t, so maximising it cannot decrease log p."""
    x = sample_data(family, 100)
    model = perturbed(family)
    guide = ExactPosterior(model).refresh(x)  # q_t at theta_t
    assert close(-elbo_loss(model, guide, x).detach(), model.log_likelihood(x).sum().detach())
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        lb = -elbo_loss(model, guide, x).detach()
        assert lb <= model.log_likelihood(x).sum().detach() + 1e-9


def test_closed_form_registry_is_keyed_by_family():
    """The registry resolves through the class hierarchy (as torch's register_kl)."""

    class MyGaussian(GaussianMixture):
        pass

    assert lookup_m_step(MyGaussian) is lookup_m_step(GaussianMixture) is not None
