"""The blocked computations behind the Gaussian E- and M-steps equal the plain formulas.

Exact paths in float64: 1e-10. N is above the block size so several blocks are summed.
"""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from elbolab.inference.closed_form import _centred_scatter
from elbolab.models.gaussian import BLOCK, ComponentMultivariateNormal

N, K, D = BLOCK + 777, 4, 5


def setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    loc = torch.randn(K, D, generator=g, dtype=torch.float64)
    A = torch.randn(K, D, D, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(A @ A.mT + torch.eye(D, dtype=torch.float64))
    return x, loc, L


def test_enumerated_log_prob_equals_torch():
    x, loc, L = setup()
    ours = ComponentMultivariateNormal(loc.unsqueeze(1), scale_tril=L.unsqueeze(1))
    torchs = dist.MultivariateNormal(loc.unsqueeze(1), scale_tril=L.unsqueeze(1))
    assert torch.allclose(ours.log_prob(x), torchs.log_prob(x), rtol=1e-10, atol=1e-10)
    # as Pyro's plate expands it, (K, N) with a stride-0 loc
    expanded = ours.expand((K, N))
    assert torch.allclose(expanded.log_prob(x), torchs.log_prob(x), rtol=1e-10, atol=1e-10)


def test_enumerated_log_prob_gradient_equals_torch():
    x, loc, L = setup()
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


def test_blocked_scatter_equals_the_centred_sum():
    x, loc, _ = setup()
    resp = torch.rand(N, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = torch.stack([(resp[:, k, None] * (x - loc[k])).T @ (x - loc[k]) for k in range(K)])
    assert torch.allclose(_centred_scatter(x, resp, loc, full=True), full, rtol=1e-10)
    diag = torch.diagonal(full, dim1=-2, dim2=-1)
    assert torch.allclose(_centred_scatter(x, resp, loc, full=False), diag, rtol=1e-10)


def test_singular_floor_follows_the_data_tensor():
    """The cached floor belongs to one tensor: another tensor (even one reusing a freed
    address) or an in-place change gets its own."""
    from elbolab.models.gaussian import singular_floor

    eps = torch.finfo(torch.float64).eps
    a = torch.tensor([[0.0, 0.0], [2.0, 4.0]], dtype=torch.float64)  # variances 1, 4
    assert singular_floor(a) == eps * 4.0
    for scale in (10.0, 100.0):
        b = a * scale  # a new tensor each time; CPython may reuse the old one's address
        assert singular_floor(b) == pytest.approx(eps * 4.0 * scale**2)
        del b
    a.mul_(3.0)  # in place: the version changes
    assert singular_floor(a) == pytest.approx(eps * 36.0)
