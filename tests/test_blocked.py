"""The blocked computations behind the Gaussian E- and M-steps equal the plain formulas.

Exact paths in float64: 1e-10. N is above the block size so several blocks are summed.
D runs over 1-3 (coordinates summed by a product with a block of ones) and 5 (by a reduction).
"""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from elbolab.inference.em.mixture import GaussianStatistics
from elbolab.models.gaussian import BLOCK, ComponentMultivariateNormal

N, K, D = BLOCK + 777, 4, 5


def setup(D=D):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    loc = torch.randn(K, D, generator=g, dtype=torch.float64)
    A = torch.randn(K, D, D, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(A @ A.mT + torch.eye(D, dtype=torch.float64))
    return x, loc, L


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_enumerated_log_prob_equals_torch(d):
    x, loc, L = setup(d)
    ours = ComponentMultivariateNormal(loc.unsqueeze(1), scale_tril=L.unsqueeze(1))
    torchs = dist.MultivariateNormal(loc.unsqueeze(1), scale_tril=L.unsqueeze(1))
    assert torch.allclose(ours.log_prob(x), torchs.log_prob(x), rtol=1e-10, atol=1e-10)
    # as Pyro's plate expands it, (K, N) with a stride-0 loc
    expanded = ours.expand((K, N))
    assert torch.allclose(expanded.log_prob(x), torchs.log_prob(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [2, 5])
def test_enumerated_log_prob_gradient_equals_torch(d):
    x, loc, L = setup(d)
    grads = []
    for cls in (ComponentMultivariateNormal, dist.MultivariateNormal):
        mu, tril = loc.clone().requires_grad_(), L.clone().requires_grad_()
        cls(mu.unsqueeze(1), scale_tril=tril.unsqueeze(1)).log_prob(x).sum().backward()
        grads.append((mu.grad, tril.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_other_shapes_fall_back_to_torch():
    x, loc, L = setup()
    z = torch.arange(N) % K  # one component per point, as when z is sampled
    ours = ComponentMultivariateNormal(loc[z], scale_tril=L[z]).log_prob(x)
    assert torch.allclose(ours, dist.MultivariateNormal(loc[z], scale_tril=L[z]).log_prob(x))


class _Model:
    """Just what GaussianStatistics reads: K, the covariance type and the means."""

    def __init__(self, means, covariance_type):
        self.means, self.n_components, self.covariance_type = means, len(means), covariance_type


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_blocked_sums_give_the_centred_scatter(kind):
    """Sums about a shift c_k, taken block by block, give sum_d r_dk (x_d - mu_k)(...)^T."""
    x, loc, _ = setup()
    resp = torch.rand(N, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = torch.stack([(resp[:, k, None] * (x - loc[k])).T @ (x - loc[k]) for k in range(K)])
    expected = full if kind == "full" else torch.diagonal(full, dim1=-2, dim2=-1)
    shift = loc + 3.0  # sums about a point away from mu_k
    stats = GaussianStatistics().collect(_Model(shift, kind), x, resp)
    assert torch.allclose(GaussianStatistics._scatter(stats, loc), expected, rtol=1e-10)
    # recentred about mu_k itself, s2 is the scatter and s1 vanishes at the weighted mean
    means = stats["shift"] + stats["s1"] / stats["nk"].unsqueeze(-1)
    moved = GaussianStatistics.recentre(stats, means)
    direct = GaussianStatistics().collect(_Model(means, kind), x, resp)
    assert torch.allclose(moved["s2"], direct["s2"], rtol=1e-10)
    assert torch.allclose(moved["s1"], torch.zeros_like(moved["s1"]), atol=1e-9)


def test_singular_floor_is_eps_times_the_largest_feature_variance():
    """From the sums alone (law of total variance): eps * max_j var(x_j)."""
    x, loc, _ = setup()
    x = x * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    resp = torch.softmax(torch.randn(N, K, dtype=torch.float64), -1)
    stats = GaussianStatistics().collect(_Model(loc, "diag"), x, resp)
    means = stats["shift"] + stats["s1"] / stats["nk"].unsqueeze(-1)
    scatter = GaussianStatistics._scatter(stats, means)
    floor = GaussianStatistics._singular_floor(stats, means, scatter)
    eps = torch.finfo(torch.float64).eps
    assert floor == pytest.approx(eps * float(x.var(0, unbiased=False).max()), rel=1e-10)


@pytest.mark.parametrize("d", [1, 4])
def test_diagonal_table_equals_torch(d):
    """Diagonal components scored as a table by two products: torch's log_prob (and its
    gradient) to 1e-10, in the mixture's enumerated layout (K, 1, D) against (N, D) (also as
    the plate expands it) and in a hidden Markov model's (K, D) against (N, 1, D); also for
    data far from the origin (the products are taken about the components' centre)."""
    from elbolab.models.gaussian import ComponentDiagonalNormal

    g = torch.Generator().manual_seed(1)
    for offset in (0.0, 1e6):
        x = torch.randn(N, d, generator=g, dtype=torch.float64) * 2 + offset
        loc = (torch.randn(K, d, generator=g, dtype=torch.float64) + offset).requires_grad_()
        scale = (torch.rand(K, d, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
        ref = dist.Normal(loc.unsqueeze(1), scale.unsqueeze(1)).to_event(1).log_prob(x)
        ours = ComponentDiagonalNormal(loc.unsqueeze(1), scale.unsqueeze(1))
        for table in (ours.log_prob(x), ours.expand((K, N)).log_prob(x)):
            assert torch.allclose(table, ref, rtol=1e-10, atol=1e-8 if offset else 1e-10)
        frames = ComponentDiagonalNormal(loc, scale).log_prob(x.unsqueeze(-2))  # (N, K)
        assert torch.allclose(frames, ref.T, rtol=1e-10, atol=1e-8 if offset else 1e-10)
        grads = torch.autograd.grad(frames.sum(), [loc, scale])
        expected = torch.autograd.grad(ref.sum(), [loc, scale])
        for a, b in zip(grads, expected, strict=True):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-6 if offset else 1e-9)
