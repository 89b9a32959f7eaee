"""Exact inference in hidden Markov chains: HMM-FB (forward-backward) and HMM-VIT (Viterbi).

References, each with the tolerance it is held to and why:

* brute force over all K^T paths (short chains): the enumeration sums a few hundred exact
  terms, so both sides agree to rounding, 1e-12 absolute in float64;
* a plain log-space forward-backward written here (sequential logsumexp, normalised every
  step) on long chains with sharp emissions and zeros in A: it has no underflow anywhere,
  and its rounding error stays ~1e-13, so 1e-10 relative is a strict test of ours;
* hmmlearn's C++ kernels (its own forward_log / backward_log / compute_log_xi_sum /
  viterbi): unnormalised log lattices, whose rounding grows with |log alpha|, so 1e-10
  relative on moderate chains (and on one chain of 10^5 frames, where the plain reference
  would be a Python loop of 2 * 10^5 steps);
* the Wikipedia example hmmlearn tests against, at the 4 decimals it is published with.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from elbolab.guides import forward_backward as fb
from elbolab.guides.forward_backward import ChainPosterior, forward_backward, viterbi

try:
    from hmmlearn import _hmmc as hmmc
except ImportError:  # the parity tests need it; the others do not
    hmmc = None
needs_hmmlearn = pytest.mark.skipif(hmmc is None, reason="hmmlearn is not installed")

F64 = torch.float64
INF = math.inf


# ============================================================================= helpers
def random_hmm(k: int, seed: int, *, sparse: bool = False):
    """log pi (K,), log A (K, K) in float64; sparse: banded A with zeros, pi with zeros."""
    g = torch.Generator().manual_seed(seed)
    log_pi = torch.log_softmax(torch.randn(k, generator=g, dtype=F64), 0)
    log_a = torch.log_softmax(torch.randn(k, k, generator=g, dtype=F64), 1)
    if sparse:
        j = torch.arange(k)
        band = (j[None, :] - j[:, None]).abs() <= 1
        log_a = torch.log_softmax(log_a.masked_fill(~band, -INF), 1)
        log_pi = torch.log_softmax(log_pi.masked_fill(j == k - 1, -INF), 0)
    return log_pi, log_a


def emissions(n: int, k: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=F64) * scale


def brute_force(log_pi, log_a, log_b, lengths):
    """Every K^T path of every sequence: log p, gamma, xi_sum, xi, best path and its log p."""
    k = log_a.shape[0]
    lls, gammas, xis, best_lp, best_path = [], [], [], [], []
    xi_sum = torch.zeros(k, k, dtype=F64)
    offset = 0
    for t_len in lengths:
        x = log_b[offset : offset + t_len]
        offset += t_len
        paths = torch.tensor(list(itertools.product(range(k), repeat=t_len)))
        joint = log_pi[paths[:, 0]] + x[torch.arange(t_len), paths].sum(1)
        if t_len > 1:
            joint = joint + log_a[paths[:, :-1], paths[:, 1:]].sum(1)
        ll = torch.logsumexp(joint, 0)
        w = (joint - ll).exp()
        gamma = torch.zeros(t_len, k, dtype=F64)
        xi = torch.zeros(t_len, k, k, dtype=F64)
        for t in range(t_len):
            gamma[t].index_add_(0, paths[:, t], w)
            if t:
                xi[t].view(-1).index_add_(0, paths[:, t - 1] * k + paths[:, t], w)
        lls.append(ll)
        gammas.append(gamma)
        xis.append(xi)
        xi_sum += xi.sum(0)
        best_lp.append(joint.max())
        best_path.append(paths[joint.argmax()])
    return (
        torch.stack(lls),
        torch.cat(gammas),
        xi_sum,
        torch.cat(xis),
        torch.stack(best_lp),
        torch.cat(best_path),
    )


def _lse(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    m[~np.isfinite(m)] = 0.0
    return (np.log(np.exp(a - m).sum(axis=axis, keepdims=True)) + m).squeeze(axis)


def log_space_reference(log_pi: np.ndarray, log_a: np.ndarray, log_b: np.ndarray):
    """Plain sequential log-space forward-backward of one sequence (PRML (13.36)-(13.43)).

    Normalised every step, so no value grows with T; returns log p, gamma, xi_sum.
    """
    t_len, k = log_b.shape
    la = np.empty((t_len, k))
    lb = np.empty((t_len, k))
    with np.errstate(divide="ignore", invalid="ignore"):
        a = log_pi + log_b[0]
        c = _lse(a, 0)
        la[0] = a - c
        loglik = float(c)
        for t in range(1, t_len):
            a = _lse(la[t - 1][:, None] + log_a, 0) + log_b[t]
            c = _lse(a, 0)
            la[t] = a - c
            loglik += float(c)
        lb[-1] = 0.0
        for t in range(t_len - 1, 0, -1):
            b = _lse(log_a + (log_b[t] + lb[t])[None, :], 1)
            lb[t - 1] = b - b.max()
        g = la + lb
        gamma = np.exp(g - _lse(g, 1)[:, None])
        lx = la[:-1, :, None] + log_a[None] + (log_b[1:] + lb[1:])[:, None, :]
        lx = lx - _lse(lx.reshape(t_len - 1, -1), 1)[:, None, None]
        xi_sum = np.exp(lx).sum(0)
    return loglik, gamma, xi_sum


def hmmlearn_posterior(log_pi, log_a, log_b, lengths):
    """log p, gamma, xi_sum from hmmlearn's own log-space kernels, sequence by sequence."""
    pi, a = log_pi.exp().numpy(), log_a.exp().numpy()
    lls, gammas, xi_sum = [], [], 0.0
    offset = 0
    for t_len in lengths:
        x = log_b[offset : offset + t_len].numpy()
        offset += t_len
        ll, fwd = hmmc.forward_log(pi, a, x)
        bwd = hmmc.backward_log(pi, a, x)
        g = fwd + bwd
        gammas.append(np.exp(g - _lse(g, 1)[:, None]))
        lls.append(ll)
        if t_len > 1:
            xi_sum = xi_sum + np.exp(hmmc.compute_log_xi_sum(fwd, a, bwd, x))
    return np.array(lls), np.concatenate(gammas), xi_sum


# every way of computing the same posterior: (layout, block length, arithmetic)
WAYS = [
    ("side_by_side", None, "scaled"),
    ("side_by_side", None, "log"),
    ("blocks", 2, "scaled"),
    ("blocks", 3, "log"),
    ("blocks", 5, "scaled"),
    ("blocks", 7, "log"),
]


def posterior(log_pi, log_a, log_b, lengths, way, per_step_xi=False) -> ChainPosterior:
    mode, length, arithmetic = way
    chain = fb._prepare(log_pi, log_a, log_b, lengths)
    return fb._forward_backward(
        chain, per_step_xi=per_step_xi, mode=mode, block_length=length, arithmetic=arithmetic
    )


def best_path(log_pi, log_a, log_b, lengths, mode, length):
    chain = fb._prepare(log_pi, log_a, log_b, lengths)
    return fb._viterbi(chain, mode=mode, block_length=length)


# ========================================================================= brute force
CASES = [(sparse, way) for sparse in (False, True) for way in WAYS]
CASES = [(sparse, way) for sparse, way in CASES if not (sparse and way[2] == "scaled")]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize(
    "sparse,way", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}" if isinstance(c, tuple) else None
)
def test_forward_backward_matches_brute_force(k, sparse, way):
    """HMM-FB = enumeration of all K^T paths: log p, gamma, xi_sum, xi, start (1e-12).

    Sequences of lengths 1 to 6 side by side; the zeros of the sparse case (banded A, a
    forbidden start; zeros in A take the log-space arithmetic) must come out exactly zero.
    """
    lengths = [1, 4, 6, 2, 1, 5]
    log_pi, log_a = random_hmm(k, seed=10 * k + sparse, sparse=sparse)
    log_b = emissions(sum(lengths), k, seed=k)
    ll, gamma, xi_sum, xi, _, _ = brute_force(log_pi, log_a, log_b, lengths)
    got = posterior(log_pi, log_a, log_b, lengths, way, per_step_xi=True)
    tol = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(got.log_likelihood, ll, **tol)
    torch.testing.assert_close(got.gamma, gamma, **tol)
    torch.testing.assert_close(got.xi_sum, xi_sum, **tol)
    torch.testing.assert_close(got.xi, xi, **tol)
    first = torch.tensor([0, 1, 5, 11, 13, 14])
    torch.testing.assert_close(got.start, gamma[first], **tol)
    assert torch.equal(got.start, got.gamma[first])
    if sparse:
        assert (got.xi_sum[log_a == -INF] == 0).all()
        assert (got.start[:, k - 1] == 0).all()


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode,length", [("side_by_side", None), ("blocks", 2), ("blocks", 4)])
def test_viterbi_matches_brute_force(k, sparse, mode, length):
    """HMM-VIT = the best of all K^T paths: same path, log p to 1e-12 (continuous random
    parameters, so no two paths tie)."""
    lengths = [3, 1, 6, 5, 2]
    log_pi, log_a = random_hmm(k, seed=7 + k + sparse, sparse=sparse)
    log_b = emissions(sum(lengths), k, seed=100 + k)
    _, _, _, _, best_lp, best = brute_force(log_pi, log_a, log_b, lengths)
    log_prob, path = best_path(log_pi, log_a, log_b, lengths, mode, length)
    assert torch.equal(path, best)
    torch.testing.assert_close(log_prob, best_lp, rtol=0, atol=1e-12)


def test_public_functions_and_defaults():
    """The public entry points pick a way on their own; lengths=None is one sequence."""
    log_pi, log_a = random_hmm(3, seed=1)
    log_b = emissions(6, 3, seed=2)
    ll, gamma, xi_sum, xi, best_lp, best = brute_force(log_pi, log_a, log_b, [6])
    got = forward_backward(log_pi, log_a, log_b)
    assert isinstance(got, ChainPosterior) and got.xi is None
    assert got.log_likelihood.shape == (1,) and got.start.shape == (1, 3)
    torch.testing.assert_close(got.log_likelihood, ll, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.gamma, gamma, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.xi_sum, xi_sum, rtol=0, atol=1e-12)
    same = forward_backward(log_pi, log_a, log_b, torch.tensor([6]), per_step_xi=True)
    torch.testing.assert_close(same.xi, xi, rtol=0, atol=1e-12)
    log_prob, path = viterbi(log_pi, log_a, log_b, [6])
    assert torch.equal(path, best) and path.dtype == torch.int64
    torch.testing.assert_close(log_prob, best_lp, rtol=0, atol=1e-12)


# ============================================================= long chains, log space
def _banded_sharp(t_len: int, k: int, seed: int):
    """Banded A with zeros and emissions N(0, 100^2) per entry: frames spread over ~500
    nats, so a state falls thousands of nats behind the best and later becomes needed."""
    rng = np.random.default_rng(seed)
    a = np.zeros((k, k))
    for j in range(k):
        lo, hi = max(0, j - 1), min(k, j + 2)
        a[j, lo:hi] = rng.uniform(0.1, 1.0, hi - lo)
    a /= a.sum(1, keepdims=True)
    with np.errstate(divide="ignore"):
        log_a = np.log(a)
    return np.full(k, -math.log(k)), log_a, rng.normal(size=(t_len, k)) * 100.0


def _left_right_sharp(t_len: int, k: int, seed: int):
    """Left-right A (stay or move one state on), start in state 0 only, and emissions that
    favour the states in order by ~200 nats: the past states sink without bound."""
    rng = np.random.default_rng(seed)
    a = np.triu(rng.uniform(0.1, 1.0, (k, k)))
    a[np.arange(k)[None, :] - np.arange(k)[:, None] > 1] = 0.0
    a /= a.sum(1, keepdims=True)
    pi = np.zeros(k)
    pi[0] = 1.0
    z = np.minimum(np.arange(t_len) * k // t_len, k - 1)
    log_b = rng.normal(size=(t_len, k)) * 30.0
    log_b[np.arange(t_len), z] += 200.0
    with np.errstate(divide="ignore"):
        return np.log(pi), np.log(a), log_b


def _dense_sharp(t_len: int, k: int, seed: int):
    """Dense random A, log-emissions uniform in [-300, 0] nats: the scaled arithmetic."""
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.ones(k))
    a = rng.dirichlet(np.ones(k), size=k)
    return np.log(pi), np.log(a), rng.uniform(-300.0, 0.0, size=(t_len, k))


def _check_against_reference(log_pi, log_a, log_b):
    ll, gamma, xi_sum = log_space_reference(log_pi, log_a, log_b)
    got = forward_backward(torch.tensor(log_pi), torch.tensor(log_a), torch.tensor(log_b))
    g = got.gamma.numpy()
    assert np.isfinite(g).all() and np.isfinite(got.xi_sum.numpy()).all()
    # log-likelihood (|log p| up to ~1e7): 1e-12 relative
    np.testing.assert_allclose(got.log_likelihood.item(), ll, rtol=1e-12, atol=0)
    # every gamma to 1e-10 relative (down to 1e-200), and all of them to 1e-12 absolute
    big = gamma > 1e-200
    np.testing.assert_allclose(g[big], gamma[big], rtol=1e-10, atol=0)
    np.testing.assert_allclose(g, gamma, rtol=0, atol=1e-12)
    # expected transition counts (up to T): 1e-10 relative, 1e-10 absolute
    np.testing.assert_allclose(got.xi_sum.numpy(), xi_sum, rtol=1e-10, atol=1e-10)
    zero = ~np.isfinite(log_a)
    assert (got.xi_sum.numpy()[zero] == 0).all()
    np.testing.assert_allclose(g.sum(1), 1.0, rtol=0, atol=1e-12)
    return got


@pytest.mark.parametrize("case", [_banded_sharp, _left_right_sharp, _dense_sharp])
def test_long_chain_matches_log_space_reference(case):
    """T = 10^4, K = 6, sharp emissions (hundreds of nats per frame) and zeros in A (or a
    dense A in the scaled arithmetic): equal to the sequential log-space reference to 1e-10
    relative, no NaN, no underflow to a wrong zero."""
    _check_against_reference(*case(10_000, 6, seed=3))


@needs_hmmlearn
def test_very_long_chain_matches_hmmlearn():
    """One chain of 10^5 frames from a banded model with zeros, emissions peaked by hundreds
    of nats on the sampled path: log p and gamma equal to hmmlearn's log-space kernels to
    1e-10 relative, xi_sum to its margins (1e-10) and to hmmlearn's own xi_sum (1e-7).

    (The plain reference above would take a Python loop of 2 * 10^5 steps; hmmlearn's
    unnormalised lattices still hold log p and gamma to ~1e-11 on this chain.)
    """
    k, t_len = 5, 100_000
    rng = np.random.default_rng(23)
    log_pi, log_a, _ = _banded_sharp(1, k, seed=24)
    a = np.exp(log_a)
    z = np.empty(t_len, dtype=np.int64)
    z[0] = rng.integers(k)
    u = rng.random(t_len)
    cum = a.cumsum(1)
    for t in range(1, t_len):
        z[t] = min(int(np.searchsorted(cum[z[t - 1]], u[t])), k - 1)
    log_b = -150.0 - 150.0 * np.abs(rng.normal(size=(t_len, k)))
    log_b[np.arange(t_len), z] = rng.normal(size=t_len)
    tensors = [torch.tensor(v) for v in (log_pi, log_a, log_b)]
    ll, gamma, xi_sum = hmmlearn_posterior(*tensors, [t_len])
    got = forward_backward(*tensors)
    np.testing.assert_allclose(got.log_likelihood.numpy(), ll, rtol=1e-12, atol=0)
    g = got.gamma.numpy()
    big = gamma > 1e-200
    np.testing.assert_allclose(g[big], gamma[big], rtol=1e-10, atol=0)
    np.testing.assert_allclose(g, gamma, rtol=0, atol=1e-12)
    # hmmlearn's compute_log_xi_sum carries its log p error (~1e-8 relative here) into
    # every count; its gamma does not, and fixes the margins of xi_sum exactly:
    # sum_k xi_sum[j, k] = sum_{t < T} gamma_t(j), sum_j xi_sum[j, k] = sum_{t > 1} gamma_t(k)
    counts = got.xi_sum.numpy()
    np.testing.assert_allclose(counts, xi_sum, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(counts.sum(1), gamma[:-1].sum(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(counts.sum(0), gamma[1:].sum(0), rtol=1e-10, atol=1e-10)
    assert (counts[~np.isfinite(log_a)] == 0).all()


def test_layouts_agree_on_mixed_lengths():
    """Blocks and side-by-side sweeps give the same posterior (1e-12) on unequal lengths,
    long and short, in both arithmetics."""
    lengths = [700, 1, 17, 1200, 2, 300]
    k = 4
    log_b = emissions(sum(lengths), k, seed=5, scale=10.0)
    for sparse in (False, True):
        log_pi, log_a = random_hmm(k, seed=6, sparse=sparse)
        chain = fb._prepare(log_pi, log_a, log_b, lengths)
        ref = fb._forward_backward(chain, mode="side_by_side", arithmetic="log")
        for mode, arithmetic in [("blocks", "log"), ("blocks", None), ("side_by_side", None)]:
            got = fb._forward_backward(chain, mode=mode, arithmetic=arithmetic)
            torch.testing.assert_close(got.log_likelihood, ref.log_likelihood, rtol=1e-13, atol=0)
            torch.testing.assert_close(got.gamma, ref.gamma, rtol=0, atol=1e-12)
            torch.testing.assert_close(got.xi_sum, ref.xi_sum, rtol=1e-12, atol=1e-9)
        side_lp, side_path = fb._viterbi(chain, mode="side_by_side")
        block_lp, block_path = fb._viterbi(chain, mode="blocks")
        assert torch.equal(block_path, side_path)
        torch.testing.assert_close(block_lp, side_lp, rtol=1e-13, atol=0)


# ======================================================================== consistency
@pytest.mark.parametrize("way", WAYS[:4], ids=lambda w: f"{w[0]}-{w[1]}-{w[2]}")
def test_gamma_and_xi_are_consistent(way):
    """gamma_t sums to one; sum_k xi_t(j, k) = gamma_t-1(j) and sum_j xi_t(j, k) =
    gamma_t(k) inside a sequence; xi_sum = sum_t xi_t. These are identities of the exact
    posterior, so they hold to rounding: 1e-12 (1e-11 for the sum of ~240 xi_t)."""
    lengths = [40, 1, 73, 5, 120]
    log_pi, log_a = random_hmm(5, seed=8, sparse=way[2] == "log")
    log_b = emissions(sum(lengths), 5, seed=9, scale=4.0)
    got = posterior(log_pi, log_a, log_b, lengths, way, per_step_xi=True)
    tol = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(got.gamma.sum(1), torch.ones(sum(lengths), dtype=F64), **tol)
    first = torch.tensor(np.cumsum([0] + lengths[:-1]))
    inner = torch.ones(sum(lengths), dtype=torch.bool)
    inner[first] = False
    t = inner.nonzero()[:, 0]
    torch.testing.assert_close(got.xi[t].sum(2), got.gamma[t - 1], **tol)
    torch.testing.assert_close(got.xi[t].sum(1), got.gamma[t], **tol)
    assert (got.xi[first] == 0).all()
    torch.testing.assert_close(got.xi_sum, got.xi.sum(0), rtol=0, atol=1e-11)
    torch.testing.assert_close(got.start, got.gamma[first], rtol=0, atol=0)


def test_zeros_stay_zeros():
    """Where A_jk = 0, xi_sum[j, k] == 0 exactly; where pi_k = 0, start[:, k] == 0; where an
    emission is -inf, gamma is 0 -- exactly (not merely small), in both arithmetics and
    both layouts, with no NaN."""
    k = 4
    lengths = [30, 1, 250]
    log_b = emissions(sum(lengths), k, seed=11)
    log_b[::7, 1] = -INF
    for sparse in (False, True):
        log_pi, log_a = random_hmm(k, seed=12, sparse=sparse)
        log_pi = torch.log_softmax(log_pi.masked_fill(torch.arange(k) == 0, -INF), 0)
        for way in WAYS:
            if sparse and way[2] == "scaled":
                continue
            got = posterior(log_pi, log_a, log_b, lengths, way, per_step_xi=True)
            assert (got.xi_sum[log_a == -INF] == 0).all()
            assert (got.xi[:, log_a == -INF] == 0).all()
            assert (got.start[:, 0] == 0).all()
            assert (got.gamma[log_b == -INF] == 0).all()
            assert torch.isfinite(got.gamma).all() and torch.isfinite(got.xi_sum).all()


@pytest.mark.parametrize("mode", ["side_by_side", "blocks"])
def test_sequence_starts_far_from_the_best_emission(mode):
    """A dense A but a first frame whose best emission has pi = 0 and whose possible states
    are ~720 nats behind it (and a start probability of 1e-300): the scaled arithmetic
    still matches the log-space one to 1e-12 (pi is folded in before the rescaling)."""
    k = 3
    log_pi_dense, log_a = random_hmm(k, seed=25)
    lengths = [20, 30, 1]
    log_b = emissions(sum(lengths), k, seed=26)
    log_pi = torch.tensor([math.log(0.5), math.log(0.5), -INF], dtype=F64)
    starts = [0, 20, 50]
    log_b[starts] = torch.tensor([-720.0, -730.0, 0.0], dtype=F64)
    for pi in (log_pi, torch.log_softmax(torch.tensor([0.0, -690.0, 0.0], dtype=F64), 0)):
        chain = fb._prepare(pi, log_a, log_b, lengths)
        assert fb._dense(chain)
        ref = fb._forward_backward(chain, mode=mode, arithmetic="log", per_step_xi=True)
        got = fb._forward_backward(chain, mode=mode, block_length=8, per_step_xi=True)
        torch.testing.assert_close(got.log_likelihood, ref.log_likelihood, rtol=1e-14, atol=0)
        for name in ("gamma", "xi_sum", "start", "xi"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=1e-12)
    assert log_pi_dense.isfinite().all()


# ========================================================================== hmmlearn
@needs_hmmlearn
@pytest.mark.parametrize("mode", ["side_by_side", "blocks"])
def test_matches_hmmlearn_kernels(mode):
    """Same log p, gamma and xi_sum as hmmlearn's forward_log / backward_log /
    compute_log_xi_sum on random inputs with several sequences (1e-10 relative)."""
    lengths = [200, 1, 57, 1000, 3]
    k = 6
    log_pi, log_a = random_hmm(k, seed=13)
    log_b = emissions(sum(lengths), k, seed=14, scale=5.0)
    ll, gamma, xi_sum = hmmlearn_posterior(log_pi, log_a, log_b, lengths)
    chain = fb._prepare(log_pi, log_a, log_b, lengths)
    got = fb._forward_backward(chain, mode=mode)
    np.testing.assert_allclose(got.log_likelihood.numpy(), ll, rtol=1e-10, atol=0)
    np.testing.assert_allclose(got.gamma.numpy(), gamma, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got.xi_sum.numpy(), xi_sum, rtol=1e-10, atol=1e-12)


@needs_hmmlearn
def test_viterbi_matches_hmmlearn_on_a_long_sequence():
    """Same best path and log p as hmmlearn's viterbi on 2 * 10^4 frames (1e-12 relative)."""
    k = 5
    log_pi, log_a = random_hmm(k, seed=15)
    log_b = emissions(20_000, k, seed=16, scale=3.0)
    ref_lp, ref_path = hmmc.viterbi(log_pi.exp().numpy(), log_a.exp().numpy(), log_b.numpy())
    log_prob, path = viterbi(log_pi, log_a, log_b)
    assert np.array_equal(path.numpy(), ref_path)
    np.testing.assert_allclose(log_prob.item(), ref_lp, rtol=1e-12, atol=0)


def test_wikipedia_example():
    """hmmlearn's test_base: the forward-backward example of Wikipedia. log p = -3.3725,
    the smoothed posteriors (4 decimals), best path [0, 0, 1, 0, 0] with log p = -4.4590."""
    frameprob = torch.tensor(
        [[0.9, 0.2], [0.9, 0.2], [0.1, 0.8], [0.9, 0.2], [0.9, 0.2]], dtype=F64
    )
    log_pi = torch.tensor([0.5, 0.5], dtype=F64).log()
    log_a = torch.tensor([[0.7, 0.3], [0.3, 0.7]], dtype=F64).log()
    got = forward_backward(log_pi, log_a, frameprob.log())
    assert round(got.log_likelihood.item(), 4) == -3.3725
    ref_posteriors = torch.tensor(
        [
            [0.8673, 0.1327],
            [0.8204, 0.1796],
            [0.3075, 0.6925],
            [0.8204, 0.1796],
            [0.8673, 0.1327],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(got.gamma, ref_posteriors, rtol=0, atol=1e-4)
    log_prob, path = viterbi(log_pi, log_a, frameprob.log())
    assert path.tolist() == [0, 0, 1, 0, 0]
    assert round(log_prob.item(), 4) == -4.4590
    # and exactly hmmlearn's own kernels on it
    if hmmc is None:
        return
    ll, gamma, _ = hmmlearn_posterior(log_pi, log_a, frameprob.log(), [5])
    np.testing.assert_allclose(got.log_likelihood.numpy(), ll, rtol=1e-14)
    np.testing.assert_allclose(got.gamma.numpy(), gamma, rtol=0, atol=1e-14)


# ============================================================================= dtypes
def test_float32_in_float32_out():
    """float32 in, float32 out (computed in float64): the float64 result to 1e-5 (the inputs
    rounded to float32 move the posterior by ~1e-7 relative per frame, the output rounding
    adds 6e-8); the same best path."""
    lengths = [100, 7]
    log_pi, log_a = random_hmm(3, seed=17)
    log_b = emissions(sum(lengths), 3, seed=18)
    ref = forward_backward(log_pi, log_a, log_b, lengths, per_step_xi=True)
    got = forward_backward(log_pi.float(), log_a.float(), log_b.float(), lengths, per_step_xi=True)
    for name in ("log_likelihood", "gamma", "xi_sum", "start", "xi"):
        value = getattr(got, name)
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), getattr(ref, name), rtol=1e-5, atol=1e-5)
    log_prob, path = viterbi(log_pi.float(), log_a.float(), log_b.float(), lengths)
    assert log_prob.dtype == torch.float32
    assert torch.equal(path, viterbi(log_pi, log_a, log_b, lengths)[1])


# ========================================================================== bad input
def _good():
    log_pi, log_a = random_hmm(3, seed=19)
    return log_pi, log_a, emissions(10, 3, seed=20)


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda p, a, b, n: (p, a, b.masked_fill(b > 1, math.nan), n), "NaN"),
        (lambda p, a, b, n: (p, a, b.masked_fill(b > 1, INF), n), "+inf"),
        (lambda p, a, b, n: (p, a, b[:, :2], n), "to match log_emission's 2 states"),
        (lambda p, a, b, n: (p[:2], a, b, n), "log_startprob must be (3,)"),
        (lambda p, a, b, n: (p, a[:2], b, n), "log_transmat must be (3, 3)"),
        (lambda p, a, b, n: (p, a, b[:, 0], n), "log_emission must be (N, K)"),
        (lambda p, a, b, n: (p, a, b[:0], None), "N >= 1"),
        (lambda p, a, b, n: (p, a, b, [4, 5]), "lengths sum to 9 but log_emission has 10"),
        (lambda p, a, b, n: (p, a, b, [4, 0, 6]), "lengths[1] = 0"),
        (lambda p, a, b, n: (p, a, b, [12, -2]), "drop the empty"),
        (lambda p, a, b, n: (p, a, b, torch.tensor([4.0, 6.0])), "lengths.long()"),
        (lambda p, a, b, n: (p, a, b, [4.5, 5.5]), "lengths must hold integers"),
        (lambda p, a, b, n: (p, a, b, []), "at least one sequence"),
        (lambda p, a, b, n: (p, a, b, torch.tensor([[10]])), "one-dimensional"),
        (lambda p, a, b, n: (p, a.exp(), b, n), "row 0 sums to"),
        (lambda p, a, b, n: (p.exp(), a, b, n), "torch.log of a distribution"),
        (lambda p, a, b, n: (p, a + 0.1, b, n), "log_softmax"),
        (lambda p, a, b, n: (p.float(), a, b, n), "pass all three in one dtype"),
        (lambda p, a, b, n: (p, a, b.long(), n), "float32 or float64"),
        (lambda p, a, b, n: (p.numpy(), a, b, n), "must be a torch.Tensor"),
        (
            lambda p, a, b, n: (p, a, b.index_fill(0, torch.tensor([4]), -INF), n),
            "row 4 is -inf for every state",
        ),
    ],
)
def test_bad_input_names_the_fix(change, words):
    """Each malformed input is refused before any work, with a ValueError naming the fix."""
    args = change(*_good(), None)
    with pytest.raises(ValueError, match=None) as err:
        forward_backward(*args)
    assert words in str(err.value), str(err.value)
    with pytest.raises(ValueError):
        viterbi(*args)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode", ["side_by_side", "blocks"])
def test_zero_probability_sequence_is_named(mode, sparse):
    """A sequence no path can produce is refused, named by its index, whichever layout and
    arithmetic computed it; the other sequences are fine. Sparse: a forbidden transition
    (0 -> 2) forced by the emissions; dense: a forbidden start (pi_0 = 0) forced."""
    log_pi, log_a = random_hmm(3, seed=21, sparse=sparse)  # sparse: no 0 <-> 2, pi_2 = 0
    lengths = [50, 4, 60]
    log_b = emissions(sum(lengths), 3, seed=22)
    if sparse:
        log_b[50, 1:] = -INF  # sequence 1: state 0 ...
        log_b[51, :2] = -INF  # ... then state 2: impossible
    else:
        log_pi = torch.log_softmax(log_pi.masked_fill(torch.arange(3) == 0, -INF), 0)
        log_b[50, 1:] = -INF  # sequence 1 must start in state 0: impossible
        log_b[0, 0] = 0.0
    chain = fb._prepare(log_pi, log_a, log_b, lengths)
    assert fb._dense(chain) is not sparse
    with pytest.raises(ValueError, match=r"sequence\(s\) 1 have probability zero"):
        fb._forward_backward(chain, mode=mode, block_length=16)
    with pytest.raises(ValueError, match=r"sequence\(s\) 1 have probability zero"):
        fb._viterbi(chain, mode=mode, block_length=16)
    ok = forward_backward(log_pi, log_a, log_b[:50])
    assert torch.isfinite(ok.log_likelihood).all()
