"""Hidden Markov models: the exact posterior of a chain, Baum-Welch through the one EM loop.

Exact paths in float64. Marginals and log-likelihoods are compared with brute-force
enumeration of all K^T paths (1e-12: a few hundred terms), with the generic path (Pyro's
enumeration of the pyro.markov program; DiscreteHMM's parallel scan differentiated) to
1e-10, and fits with hmmlearn from identical starts (1e-8 relative on the log-likelihood,
1e-6 on parameters after 25 iterations: the same update, other rounding).
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.nn import PyroModule, PyroParam
from sklearn.exceptions import ConvergenceWarning
from torch.distributions import constraints

from elbolab.guides import ExactPosterior
from elbolab.guides.forward_backward import forward_backward
from elbolab.inference import EM
from elbolab.models import (
    BernoulliHMM,
    CategoricalHMM,
    GaussianHMM,
    GaussianMixture,
    PoissonHMM,
)

KINDS = ("full", "tied", "diag", "spherical")


def gaussian_hmm(kind: str = "diag", K: int = 3, D: int = 2, seed: int = 0) -> GaussianHMM:
    """A GaussianHMM with distinct, well-separated states."""
    g = torch.Generator().manual_seed(seed)
    model = GaussianHMM(K, kind).build(D, torch.float64)
    trans = torch.rand(K, K, generator=g, dtype=torch.float64) + 2 * torch.eye(K)
    cov = {
        "full": torch.eye(D, dtype=torch.float64).expand(K, D, D) * 0.5,
        "tied": torch.eye(D, dtype=torch.float64) * 0.5,
        "diag": torch.full((K, D), 0.5, dtype=torch.float64),
        "spherical": torch.full((K,), 0.5, dtype=torch.float64),
    }[kind]
    model.set_params(
        startprob=torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0),
        transmat=trans / trans.sum(-1, keepdim=True),
        means=3.0 * torch.randn(K, D, generator=g, dtype=torch.float64),
        covariances=cov,
    )
    return model


def sequences(model, lengths, seed: int = 0) -> torch.Tensor:
    """Frames of sequences of the given lengths from ``model``, concatenated."""
    return torch.cat([model.sample(L, seed=seed + i)[0] for i, L in enumerate(lengths)])


def fit(model, x, lengths=None, **options):
    options = {"progress": False, "seed": 0} | options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return EM(model, ExactPosterior(model), **options).fit(x, lengths=lengths)


def brute_force(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(x), gamma (T, K), xi (T, K, K) of one sequence by summing all K^T paths."""
    log_pi, log_a, log_e = (t.detach() for t in model.log_potentials(x))
    T, K = log_e.shape
    paths = list(itertools.product(range(K), repeat=T))
    scores = torch.stack(
        [
            log_pi[p[0]]
            + sum(log_a[p[t - 1], p[t]] for t in range(1, T))
            + sum(log_e[t, p[t]] for t in range(T))
            for p in paths
        ]
    )
    log_z = scores.logsumexp(0)
    post = (scores - log_z).exp()
    gamma, xi = torch.zeros(T, K, dtype=x.dtype), torch.zeros(T, K, K, dtype=x.dtype)
    for p, w in zip(paths, post, strict=True):
        for t in range(T):
            gamma[t, p[t]] += w
            if t:
                xi[t, p[t - 1], p[t]] += w
    return log_z, gamma, xi


# ---------------------------------------------------------------------------- HMM-FB
def test_hmm_fb_marginals_equal_brute_force_through_the_guide():
    """guide.marginals (the generic factor graph of the pyro.markov program), the model's
    predict_proba (forward-backward) and brute force agree to 1e-12 on short sequences of
    several lengths."""
    model = gaussian_hmm("full", K=3)
    lengths = [5, 1, 4]
    x = sequences(model, lengths)
    guide = ExactPosterior(model)
    marginals = guide.marginals(x, torch.tensor(lengths))
    gamma_fast = model.predict_proba(x, lengths)
    starts = np.cumsum([0] + lengths)
    for s, L in enumerate(lengths):
        xs = x[starts[s] : starts[s + 1]]
        log_z, gamma, _ = brute_force(model, xs)
        assert abs(float(model.log_likelihood(x, lengths)[s]) - float(log_z)) < 1e-12
        assert torch.allclose(gamma_fast[starts[s] : starts[s + 1]], gamma, atol=1e-12)
        for t in range(L):
            assert torch.allclose(marginals[f"z_{t}"][s], gamma[t], atol=1e-12)
    assert abs(guide.log_likelihood(x, torch.tensor(lengths)) - model.score(x, lengths)) < 1e-10


class _Table(dist.TorchDistribution):
    """An observation "distribution" whose log-density is a given (T, K) table: with it,
    Pyro's DiscreteHMM computes log p(x) from any log-emissions, differentiably."""

    arg_constraints = {}
    support = constraints.real

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        super().__init__(batch_shape=table.shape, validate_args=False)

    def log_prob(self, value):
        return self.table


def test_forward_backward_equals_the_derivative_of_pyros_parallel_scan():
    """HMM-FB as derivatives: gamma_t = d log p(x) / d log p_k(x_t) and xi_t = d log p(x) /
    d log A_t of Pyro's DiscreteHMM (its parallel scan, differentiated), on one sequence of
    T = 10^4 frames with sharply peaked emissions: to 1e-10, with no underflow. DiscreteHMM
    starts from a state before the first frame, so its first transition is rank one, every
    row log pi: then its first state is distributed as pi."""
    model = gaussian_hmm("diag", K=3, D=2)
    x = model.sample(10_000, seed=3)[0] * 3.0  # emissions spanning hundreds of nats
    log_pi, log_a, log_e = (t.detach() for t in model.log_potentials(x))
    T, K = log_e.shape
    table = log_e.clone().requires_grad_()
    trans = torch.cat([log_pi.expand(1, K, K), log_a.expand(T - 1, K, K)]).requires_grad_()
    hmm = dist.DiscreteHMM(torch.zeros(K, dtype=torch.float64), trans, _Table(table))
    log_z = hmm.log_prob(torch.zeros(T, dtype=torch.float64))
    gamma, d_trans = torch.autograd.grad(log_z, [table, trans])
    # DiscreteHMM normalises its transition logits: d/d log A_t = xi_t - gamma_{t-1} (x) A
    xi = d_trans[1:] + gamma[:-1, :, None] * log_a.exp()
    fast = forward_backward(log_pi, log_a, log_e, None, per_step_xi=True)
    assert torch.isfinite(fast.gamma).all() and torch.isfinite(fast.xi).all()
    log_z = float(log_z.detach())
    assert abs(log_z - float(fast.log_likelihood[0])) < 1e-10 * abs(log_z)
    assert torch.allclose(fast.gamma, gamma, atol=1e-10)
    assert torch.allclose(fast.xi[1:], xi, atol=1e-10)
    assert torch.allclose(fast.xi_sum, xi.sum(0), atol=1e-8)  # a sum of 10^4 terms


def test_generic_path_equals_forward_backward_on_a_longer_chain():
    """Pyro's enumeration of the pyro.markov program (variable elimination, marginals by
    autodiff) gives forward-backward's gamma on several sequences of up to 60 frames."""
    model = gaussian_hmm("tied", K=3)
    lengths = [60, 35, 17]
    x = sequences(model, lengths, seed=5)
    marginals = ExactPosterior(model).marginals(x, torch.tensor(lengths))
    gamma = model.predict_proba(x, lengths)
    starts = np.cumsum([0] + lengths)
    for t in range(60):
        for s, L in enumerate(lengths):
            if t < L:
                assert torch.allclose(marginals[f"z_{t}"][s], gamma[starts[s] + t], atol=1e-10)


# ---------------------------------------------------------------------------- EM-TIGHT
def test_em_tight_with_pyros_elbos():
    """With the guide refreshed, TraceEnum_ELBO (z summed exactly in the guide) and one
    sample of Trace_ELBO (each z_t drawn from its exact conditional) both equal log p(x):
    KL = 0 (BASIC, EM-TIGHT), to 1e-10."""
    model = gaussian_hmm("diag", K=2)
    lengths = torch.tensor([6, 3])
    x = sequences(model, lengths.tolist())
    guide = ExactPosterior(model).refresh(x, lengths)
    log_px = model.score(x, lengths)
    assert abs(-TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, x, lengths) - log_px) < 1e-10
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*configured for enumeration")
        for _ in range(3):
            assert abs(-Trace_ELBO().loss(model, guide, x, lengths) - log_px) < 1e-10
    # at another theta the frozen guide's ELBO is Q + H (LB-1, HMM-Q)
    with torch.no_grad():
        model.emission.means.add_(0.3)
    q_plus_h = float(guide.expected_log_joint(x, lengths).detach()) + guide.entropy(x, lengths)
    elbo = -TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, x, lengths)
    assert abs(q_plus_h - elbo) < 1e-10 and elbo < model.score(x, lengths)


# ---------------------------------------------------------------------------- EM
def _families():
    yield from ((f"gaussian-{k}", lambda k=k: GaussianHMM(3, k)) for k in KINDS)
    yield "poisson", lambda: PoissonHMM(3)
    yield "categorical", lambda: CategoricalHMM(3, n_categories=4)
    yield "bernoulli", lambda: BernoulliHMM(3)


def _data(name: str) -> tuple[torch.Tensor, list[int]]:
    lengths = [120, 80, 60]
    if name.startswith("gaussian"):
        return sequences(gaussian_hmm(name.split("-")[1]), lengths), lengths
    g = torch.Generator().manual_seed(1)
    states = torch.randint(0, 3, (sum(lengths),), generator=g)
    if name == "poisson":
        rates = torch.tensor([[1.0, 6.0], [5.0, 1.0], [10.0, 10.0]], dtype=torch.float64)
        return torch.poisson(rates[states], generator=g), lengths
    if name == "categorical":
        return torch.randint(0, 4, (sum(lengths), 2), generator=g).double(), lengths
    return (
        torch.rand(sum(lengths), 3, generator=g) < 0.3 + 0.2 * states[:, None]
    ).double(), lengths


@pytest.mark.parametrize("name, make", list(_families()))
def test_em_mono_for_every_family(name, make):
    """EM-MONO: log p(x; theta_t) <= LB(q_t, theta_t+1) <= log p(x; theta_t+1), with the
    bound from the sums (HMM-Q plus H), for every emission family (slack 1e-12 relative)."""
    x, lengths = _data(name)
    result = fit(make(), x, lengths, tol=0.0, max_iter=15, reg_covar=1e-6)
    lls, lbs = result.log_likelihoods, result.lower_bounds
    slack = 1e-12 * abs(lls[0])
    assert len(lbs) == 15
    for t, lb in enumerate(lbs):
        assert lls[t] <= lb + slack and lb <= lls[t + 1] + slack, (t, lls[t], lb, lls[t + 1])
    assert lls[-1] > lls[0]


def test_hmm_m_is_the_hand_written_update():
    """One Baum-Welch iteration from a given start equals HMM-M written out: pi = gamma_1
    averaged over sequences, A from the summed xi row-normalised, and the Gaussian means and
    covariances weighted by gamma (to 1e-10)."""
    start = gaussian_hmm("full", K=2, D=2, seed=2)
    lengths = [30, 20]
    x = sequences(gaussian_hmm("full", K=2, D=2, seed=4), lengths)
    post = forward_backward(*(t.detach() for t in start.log_potentials(x)), torch.tensor(lengths))
    g = post.gamma
    nk = g.sum(0)
    means = (g.T @ x) / nk[:, None]
    covs = torch.stack(
        [((g[:, k, None] * (x - means[k])).T @ (x - means[k])) / nk[k] for k in range(2)]
    )
    init = {
        "startprob": start.startprob_,
        "transmat": start.transmat_,
        "means": start.means_,
        "covariances": start.covariances_,
    }
    model = GaussianHMM(2, "full")
    fit(model, x, lengths, init=init, max_iter=1, tol=0.0, reg_covar=0.0)
    assert torch.allclose(model.startprob_, post.start.mean(0), atol=1e-10)
    assert torch.allclose(
        model.transmat_, post.xi_sum / post.xi_sum.sum(-1, keepdim=True), atol=1e-10
    )
    assert torch.allclose(model.means_, means, atol=1e-10)
    assert torch.allclose(model.covariances_, covs, atol=1e-10)


def test_hmm_vit_equals_brute_force():
    """HMM-VIT: the Viterbi path and its log-probability are the best of all K^T paths."""
    model = gaussian_hmm("spherical", K=3)
    x = sequences(model, [6], seed=9)
    log_pi, log_a, log_e = (t.detach() for t in model.log_potentials(x))
    best, best_path = -math.inf, None
    for p in itertools.product(range(3), repeat=6):
        score = float(
            log_pi[p[0]]
            + sum(log_a[p[t - 1], p[t]] for t in range(1, 6))
            + sum(log_e[t, p[t]] for t in range(6))
        )
        if score > best:
            best, best_path = score, list(p)
    log_prob, path = model.decode(x)
    assert path.tolist() == best_path and abs(log_prob - best) < 1e-12
    assert model.predict(x).tolist() == best_path


def test_wikipedia_examples_of_hmmlearn():
    """The examples hmmlearn tests against. Forward-backward (Wikipedia's umbrella world:
    p(umbrella | rain) = 0.9, p(umbrella | no rain) = 0.2, five days): log p(x) = -3.3725
    and the Viterbi path [0, 0, 1, 0, 0]. Viterbi (rainy/sunny, walk/shop/clean): the path
    [1, 0, 0] with probability 0.01344, and hmmlearn's posteriors to 1e-6."""
    umbrella = CategoricalHMM(2, n_categories=2).build(1, torch.float64)
    umbrella.set_params(
        startprob=[0.5, 0.5],
        transmat=[[0.7, 0.3], [0.3, 0.7]],
        probs=[[[0.1, 0.9]], [[0.8, 0.2]]],
    )
    days = torch.tensor([[1], [1], [0], [1], [1]], dtype=torch.float64)
    assert round(umbrella.score(days), 4) == -3.3725
    assert umbrella.predict(days).tolist() == [0, 0, 1, 0, 0]
    weather = CategoricalHMM(2, n_categories=3).build(1, torch.float64)
    weather.set_params(
        startprob=[0.6, 0.4],
        transmat=[[0.7, 0.3], [0.4, 0.6]],
        probs=[[[0.1, 0.4, 0.5]], [[0.6, 0.3, 0.1]]],
    )
    walk_shop_clean = torch.tensor([[0], [1], [2]], dtype=torch.float64)
    log_prob, path = weather.decode(walk_shop_clean)
    assert round(math.exp(log_prob), 5) == 0.01344 and path.tolist() == [1, 0, 0]
    expected = [[0.23170303, 0.76829697], [0.62406281, 0.37593719], [0.86397706, 0.13602294]]
    np.testing.assert_allclose(
        weather.predict_proba(walk_shop_clean).numpy(), expected, rtol=0, atol=1e-6
    )


# ---------------------------------------------------------------------------- hmmlearn
def _hmmlearn_start(K, D, x, kind, rng):
    means = x[rng.choice(len(x), K, replace=False)].numpy()
    var = x.var(0).numpy()
    cov = {
        "full": np.stack([np.diag(var)] * K),
        "tied": np.diag(var),
        "diag": np.stack([var] * K),
        "spherical": np.full(K, var.mean()),
    }[kind]
    return {
        "startprob": np.full(K, 1.0 / K),
        "transmat": np.full((K, K), 1.0 / K) * 0.5 + np.eye(K) * 0.5,
        "means": means,
        "covariances": cov,
    }


@pytest.mark.parametrize("kind", KINDS)
def test_gaussian_parity_with_hmmlearn(kind):
    """hmmlearn with covars_prior=0, covars_weight=1 (and means_weight=0, startprob_prior=1,
    transmat_prior=1) takes the plain maximum-likelihood update; from the same start, after
    25 iterations on 3 sequences: log-likelihood to 1e-8 relative, parameters to 1e-6."""
    hmm = pytest.importorskip("hmmlearn.hmm")
    lengths = [150, 100, 80]
    x = sequences(gaussian_hmm(kind, K=3), lengths)
    start = _hmmlearn_start(3, 2, x, kind, np.random.default_rng(0))
    theirs = hmm.GaussianHMM(
        3,
        kind,
        n_iter=25,
        tol=0,
        init_params="",
        covars_prior=0,
        covars_weight=1,
        min_covar=0,
        implementation="log",
    )
    theirs.startprob_, theirs.transmat_ = start["startprob"], start["transmat"]
    theirs.means_ = start["means"]
    theirs.covars_ = start["covariances"] if kind != "spherical" else start["covariances"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.fit(x.numpy(), lengths)
    ours = GaussianHMM(3, kind)
    result = fit(ours, x, lengths, init=start, max_iter=25, tol=0.0, reg_covar=0.0)
    assert result.n_iter == 25
    score = theirs.score(x.numpy(), lengths)
    assert abs(ours.score(x, lengths) - score) <= 1e-8 * abs(score)
    np.testing.assert_allclose(ours.startprob_.numpy(), theirs.startprob_, atol=1e-6)
    np.testing.assert_allclose(ours.transmat_.numpy(), theirs.transmat_, atol=1e-6)
    np.testing.assert_allclose(ours.means_.numpy(), theirs.means_, atol=1e-6)
    covars = theirs._covars_[:, 0] if kind == "spherical" else theirs._covars_
    np.testing.assert_allclose(ours.covariances_.numpy(), covars, atol=1e-6)


def test_poisson_and_categorical_parity_with_hmmlearn():
    """PoissonHMM (lambdas_prior=0) and CategoricalHMM (emissionprob_prior=1) take the
    plain updates; the same figures after 25 iterations."""
    hmm = pytest.importorskip("hmmlearn.hmm")
    x, lengths = _data("poisson")
    start = {
        "startprob": np.full(3, 1 / 3),
        "transmat": np.full((3, 3), 1 / 6) + np.eye(3) / 2,
        "rates": np.array([[1.0, 5.0], [4.0, 2.0], [8.0, 8.0]]),
    }
    theirs = hmm.PoissonHMM(3, n_iter=25, tol=0, init_params="", lambdas_prior=0)
    theirs.startprob_, theirs.transmat_, theirs.lambdas_ = start.values()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.fit(x.numpy().astype(int), lengths)
    ours = PoissonHMM(3)
    fit(ours, x, lengths, init=start, max_iter=25, tol=0.0, reg_covar=0.0)
    score = theirs.score(x.numpy().astype(int), lengths)
    assert abs(ours.score(x, lengths) - score) <= 1e-8 * abs(score)
    np.testing.assert_allclose(ours.rates_.numpy(), theirs.lambdas_, atol=1e-6)
    np.testing.assert_allclose(ours.transmat_.numpy(), theirs.transmat_, atol=1e-6)

    codes = torch.randint(0, 4, (300, 1), generator=torch.Generator().manual_seed(2)).double()
    lengths = [120, 100, 80]
    probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    start = {"startprob": np.full(3, 1 / 3), "transmat": np.full((3, 3), 1 / 3)}
    theirs = hmm.CategoricalHMM(3, n_features=4, n_iter=25, tol=0, init_params="")
    theirs.startprob_, theirs.transmat_, theirs.emissionprob_ = (
        start["startprob"],
        start["transmat"],
        probs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.fit(codes.numpy().astype(int), lengths)
    ours = CategoricalHMM(3, n_categories=4)
    fit(
        ours,
        codes,
        lengths,
        init=start | {"probs": probs[:, None, :]},
        max_iter=25,
        tol=0.0,
        reg_covar=0.0,
    )
    score = theirs.score(codes.numpy().astype(int), lengths)
    assert abs(ours.score(codes, lengths) - score) <= 1e-8 * abs(score)
    np.testing.assert_allclose(ours.probs_[:, 0].numpy(), theirs.emissionprob_, atol=1e-6)


# ---------------------------------------------------------------------------- properties
def test_uniform_chain_gives_the_mixtures_posteriors():
    """With a uniform pi and uniform transitions the frames are independent: gamma equals
    the responsibilities of the mixture of the same components with uniform weights."""
    model = gaussian_hmm("full", K=3)
    model.set_params(startprob=np.full(3, 1 / 3), transmat=np.full((3, 3), 1 / 3))
    x = sequences(model, [40, 25])
    mixture = GaussianMixture(3).build(2, torch.float64)
    mixture.set_params(
        weights=np.full(3, 1 / 3), means=model.means_, covariances=model.covariances_
    )
    assert torch.allclose(model.predict_proba(x, [40, 25]), mixture.predict_proba(x), atol=1e-12)


def test_the_order_of_the_sequences_does_not_change_the_fit():
    x, lengths = _data("gaussian-diag")
    pieces = torch.split(x, lengths)
    start = _hmmlearn_start(3, 2, x, "diag", np.random.default_rng(1))
    a, b = GaussianHMM(3, "diag"), GaussianHMM(3, "diag")
    fit(a, list(pieces), init=start, max_iter=10, tol=0.0)
    fit(b, list(pieces[::-1]), init=start, max_iter=10, tol=0.0)
    for name in ("startprob_", "transmat_", "means_", "covariances_"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-10), name


def test_chunked_sequences_equal_full_batch(tmp_path):
    """A .npy file read a few whole sequences at a time (chunk_size rows) gives the
    in-memory fit: parameters and every log-likelihood and bound to 1e-10."""
    x, lengths = _data("gaussian-full")
    path = tmp_path / "frames.npy"
    np.save(path, x.numpy())
    start = _hmmlearn_start(3, 2, x, "full", np.random.default_rng(2))
    whole, chunked = GaussianHMM(3), GaussianHMM(3)
    a = fit(whole, x, lengths, init=start, max_iter=8, tol=0.0)
    b = fit(chunked, str(path), lengths, init=start, max_iter=8, tol=0.0, chunk_size=100)
    for name in ("startprob_", "transmat_", "means_", "covariances_"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), atol=1e-10), name
    assert np.allclose(a.log_likelihoods, b.log_likelihoods, rtol=0, atol=1e-10)
    assert np.allclose(a.lower_bounds, b.lower_bounds, rtol=0, atol=1e-10)


def test_zeros_stay_zeros_and_unvisited_states_stay_finite():
    """A left-right chain (A upper triangular, pi = e_0) keeps its zeros through EM; a state
    that no frame visits keeps finite parameters, with a warning that names it."""
    x, lengths = _data("gaussian-diag")
    K = 3
    start = {
        "startprob": [1.0, 0.0, 0.0],
        "transmat": [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]],
        "means": [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]],
        "covariances": np.ones((K, 2)),
    }
    model = GaussianHMM(K, "diag")
    fit(model, x, lengths, init=start, max_iter=5, tol=0.0)
    assert float(model.startprob_[1]) == 0.0 and float(model.startprob_[2]) == 0.0
    assert float(model.transmat_[0, 2]) == 0.0 and float(model.transmat_[1, 0]) == 0.0
    never = start | {"startprob": [1.0, 0.0, 0.0], "transmat": np.eye(K)}
    stuck = GaussianHMM(K, "diag")
    with pytest.warns(
        UserWarning, match=r"state\(s\) \[1, 2\] of the hidden Markov model are never visited"
    ):
        fit(stuck, x, lengths, init=never, max_iter=2, tol=0.0)
    assert all(bool(torch.isfinite(getattr(stuck, n)).all()) for n in ("means_", "covariances_"))


class UserChain(PyroModule):
    """A chain a user writes with pyro.markov: K states, Normal emissions."""

    def __init__(self, K: int) -> None:
        super().__init__()
        self.startprob = PyroParam(
            torch.full((K,), 1.0 / K, dtype=torch.float64), constraints.simplex
        )
        self.transmat = PyroParam(
            torch.full((K, K), 1.0 / K, dtype=torch.float64), constraints.simplex
        )
        self.locs = PyroParam(torch.linspace(-1.0, 1.0, K, dtype=torch.float64))
        self.scales = PyroParam(torch.ones(K, dtype=torch.float64), constraints.positive)

    def forward(self, x):
        startprob, transmat, locs, scales = self.startprob, self.transmat, self.locs, self.scales
        z = None
        for t in pyro.markov(range(len(x))):
            probs = startprob if t == 0 else transmat[z]
            z = pyro.sample(f"z_{t}", dist.Categorical(probs))
            pyro.sample(f"x_{t}", dist.Normal(locs[z], scales[z]), obs=x[t])


def test_a_users_chain_trains_by_em_with_the_gradient_m_step():
    """A user's pyro.markov model (T = 200) with no code for EM: its generalised-EM step (Q
    maximised by L-BFGS from the frozen marginals, each evaluation a trace of the program)
    is the closed-form Baum-Welch step of the built-in GaussianHMM from the same start: the
    same bound and parameters to 1e-8 (L-BFGS run to convergence), so it follows Baum-Welch
    to the closed-form fit."""
    truth = GaussianHMM(2, "diag").build(1)
    truth.set_params(
        startprob=[0.5, 0.5],
        transmat=[[0.9, 0.1], [0.1, 0.9]],
        means=[[-2.0], [2.0]],
        covariances=[[1.0], [1.0]],
    )
    x = truth.sample(200, seed=0)[0]
    user = UserChain(2)
    mine = fit(user, x[:, 0], max_iter=1, tol=0.0, gradient_max_iter=60)
    builtin = GaussianHMM(2, "diag")
    start = {
        "startprob": [0.5, 0.5],
        "transmat": [[0.5, 0.5], [0.5, 0.5]],
        "means": [[-1.0], [1.0]],
        "covariances": [[1.0], [1.0]],
    }
    theirs = fit(builtin, x, init=start, max_iter=1, tol=0.0, reg_covar=0.0)
    assert mine.m_step == "gradient" and theirs.m_step == "closed-form"
    assert abs(mine.lower_bounds[0] - theirs.lower_bounds[0]) < 1e-8
    assert np.allclose(mine.log_likelihoods, theirs.log_likelihoods, rtol=0, atol=1e-8)
    assert torch.allclose(user.locs.detach(), builtin.means_[:, 0], atol=1e-6)
    assert torch.allclose(user.scales.detach() ** 2, builtin.covariances_[:, 0], atol=1e-6)
    assert torch.allclose(user.transmat.detach(), builtin.transmat_, atol=1e-6)


# ---------------------------------------------------------------------------- bad input
def test_bad_sequences_are_refused_before_work():
    model = GaussianHMM(2)
    x = torch.randn(10, 2, dtype=torch.float64)
    cases = [
        ([4, 5], "lengths sum to 9 but x has 10 rows"),
        ([4, 0, 6], "lengths[1] is 0: every sequence needs at least one frame"),
        ([[4, 6]], "lengths must be a 1-D list of positive integers"),
    ]
    for lengths, message in cases:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            EM(model, ExactPosterior(model), progress=False).fit(x, lengths=lengths)
        assert not model.is_built
    with pytest.raises(ValueError, match="sequence 1 has 3 features but sequence 0 has 2"):
        EM(model, ExactPosterior(model), progress=False).fit([x, torch.randn(4, 3)])
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or inf"):
        EM(model, ExactPosterior(model), progress=False).fit(bad, lengths=[5, 5])
    with pytest.raises(ValueError, match="hidden Markov models take no sample_weight"):
        EM(model, ExactPosterior(model), progress=False).fit(x, np.ones(10))
    with pytest.raises(ValueError, match="lengths goes with sequence models"):
        mixture = GaussianMixture(2)
        EM(mixture, ExactPosterior(mixture), progress=False).fit(x, lengths=[5, 5])


def test_sample_score_and_information_criteria():
    model = gaussian_hmm("diag", K=3, D=2)
    x, z = model.sample(50, seed=1)
    assert x.shape == (50, 2) and z.shape == (50,)
    again, _ = model.sample(50, seed=1)
    assert torch.equal(x, again)
    K, D = 3, 2
    assert model.n_parameters() == (K - 1) + K * (K - 1) + K * D + K * D
    ll = model.score(x)
    assert model.bic(x) == pytest.approx(-2 * ll + model.n_parameters() * math.log(50))
    assert model.aic(x) == pytest.approx(-2 * ll + 2 * model.n_parameters())


def test_stochastic_em_draws_whole_sequences():
    """Stochastic EM on a hidden Markov model: minibatches of whole sequences (never cut),
    running sums of their statistics; 10 passes over 40 sequences come within 0.02 nats
    per frame of batch Baum-Welch from the same start (approximate: checked, not exact)."""
    truth = gaussian_hmm("diag", K=3)
    lengths = [25] * 40
    x = sequences(truth, lengths, seed=11)
    start = _hmmlearn_start(3, 2, x, "diag", np.random.default_rng(3))
    batch = fit(GaussianHMM(3, "diag"), x, lengths, init=start, max_iter=100, tol=1e-8)
    model = GaussianHMM(3, "diag")
    seen = []
    em = EM(
        model,
        ExactPosterior(model),
        init=start,
        stochastic=True,
        batch_size=100,
        max_iter=10,
        tol=0.0,
        seed=0,
        progress=False,
    )
    original = em.family.e_step
    em.family.e_step = lambda em_, chunk, **kw: (
        seen.append(chunk.lengths.tolist()) or original(em_, chunk, **kw)
    )
    result = em.fit(x, lengths=lengths)
    assert result.approximate and all(set(b) == {25} for b in seen)
    assert all(sum(b) >= 100 for b in seen[:-1])
    assert abs(model.score(x, lengths) / len(x) - batch.log_likelihood) < 0.02


def test_stochastic_em_for_factor_analysis():
    """Factor analysis through the same stochastic schedule (minibatch summaries, running
    sums about a common centre): near the batch fit in a few passes."""
    from elbolab.guides import ExactGaussianPosterior
    from elbolab.models import FactorAnalysis

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 5, generator=g, dtype=torch.float64
    )
    x = x + 0.3 * torch.randn(2000, 5, generator=g, dtype=torch.float64) + 5.0
    batch_model = FactorAnalysis(5, 2).double()
    batch = EM(
        batch_model,
        ExactGaussianPosterior(batch_model),
        tol=1e-10,
        max_iter=3000,
        seed=0,
        progress=False,
    ).fit(x)
    model = FactorAnalysis(5, 2).double()
    result = EM(
        model,
        ExactGaussianPosterior(model),
        stochastic=True,
        batch_size=200,
        max_iter=20,
        tol=0.0,
        seed=0,
        progress=False,
    ).fit(x)
    assert result.approximate
    assert abs(model.score(x) - batch.log_likelihood) < 0.02
