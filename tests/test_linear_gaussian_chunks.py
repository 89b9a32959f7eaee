"""PPCA and factor analysis over chunks: EM from n, the mean and the scatter.

Every identity here is an exact path in float64, compared at 1e-10: each sum computed
from the moments against the same sum over the data point by point, and EM over chunks
against EM on the data in memory after the same iterations.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from elbolab.guides import ExactGaussianPosterior
from elbolab.inference import EM, linear_gaussian_m_step
from elbolab.inference.em.linear_gaussian import (
    Moments,
    bound_sum,
    log_likelihood_sum,
    m_step_from_sums,
    m_step_sums,
)
from elbolab.models import PPCA, FactorAnalysis, gaussian_bound

TOL = 1e-10
D, K = 6, 2


def _model(cls, seed: int):
    g = torch.Generator().manual_seed(seed)
    model = cls(D, K).double()
    model.set_params(
        weight=torch.randn(D, K, generator=g, dtype=torch.float64),
        mean=torch.randn(D, generator=g, dtype=torch.float64),
        noise=0.3 + torch.rand(D, generator=g, dtype=torch.float64)
        if cls is FactorAnalysis
        else 0.5,
    )
    return model


def _data(n: int = 500, seed: int = 0) -> torch.Tensor:
    x, _ = _model(FactorAnalysis, 7).sample(n, seed=seed)
    return x + 10.0  # away from the origin: the scatter about the mean must keep its digits


def _close(a, b) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.allclose(a, b, rtol=TOL, atol=TOL)


def test_moments_of_chunks_combine_to_the_moments_of_all():
    x = _data()
    whole = Moments.of(x)
    parts = Moments.of(x[:3])
    for piece in (x[3:4], x[4:250], x[250:]):
        parts = parts.combine(Moments.of(piece))
    assert parts.n == whole.n
    assert _close(parts.mean, whole.mean) and _close(parts.scatter, whole.scatter)


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_sums_from_the_moments_equal_the_sums_over_the_data(cls):
    """LG-MARG, LB-DEF and LG-EM from (n, xbar, S) equal the per-datum formulas summed, for
    q from one theta~ and the bound at another theta (as after an M-step)."""
    x, mom = _data(), Moments.of(_data())
    with torch.no_grad():
        q_model, theta = _model(cls, 1), _model(cls, 2)
        A, cov = q_model.posterior_map()
        loc, cov_ref = q_model.posterior(x)
        assert _close((x - q_model.mean) @ A.T, loc) and _close(cov, cov_ref)
        assert _close(log_likelihood_sum(theta, mom), theta.log_likelihood(x).sum())
        direct = gaussian_bound(theta, x, loc, cov).sum()
        assert _close(bound_sum(theta, mom, A, q_model.mean, cov), direct)
        by_data, by_moments = _model(cls, 3), _model(cls, 3)
        linear_gaussian_m_step(by_data, x, loc, cov, 1e-6)
        ezz, xez = m_step_sums(mom, A, q_model.mean, cov)
        m_step_from_sums(by_moments, mom.n, mom.mean, mom.scatter.diagonal(), ezz, xez, 1e-6)
    for (name, a), (_, b) in zip(
        by_data.state_dict().items(), by_moments.state_dict().items(), strict=True
    ):
        assert _close(a, b), name


def _fit(cls, data, **options):
    model = cls(D, K).double()
    em = EM(model, ExactGaussianPosterior(model), tol=0.0, max_iter=15, seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model, em.fit(data, **options)


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_chunked_em_equals_em_in_memory(cls, tmp_path):
    """A list of uneven chunks, a .npy path and a DataLoader give the in-memory fit: the
    parameters, every log-likelihood and every bound, to 1e-10."""
    x = _data()
    np.save(tmp_path / "x.npy", x.numpy())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
    reference, ref = _fit(cls, x)
    for data in ([x[:1], x[1:200], x[200:]], tmp_path / "x.npy", loader):
        model, result = _fit(cls, data)
        for (name, a), (_, b) in zip(
            reference.state_dict().items(), model.state_dict().items(), strict=True
        ):
            assert _close(a, b), name
        assert np.allclose(result.log_likelihoods, ref.log_likelihoods, rtol=TOL, atol=TOL)
        assert np.allclose(result.lower_bounds, ref.lower_bounds, rtol=TOL, atol=TOL)


def test_bad_chunks_are_named():
    x = _data()
    model = PPCA(D, K).double()
    em = EM(model, ExactGaussianPosterior(model), progress=False)
    with pytest.raises(ValueError, match=r"chunk 1 \(from row 100\).*features"):
        em.fit([x[:100], x[100:, :3]])
    with pytest.raises(ValueError, match="chunks must be re-iterable"):
        em.fit(x[i : i + 100] for i in range(0, 500, 100))


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_weighted_chunks_equal_repeated_rows(cls):
    """Sample weights enter the summary as sums: weight 2 on the first 100 rows, given as
    (x, w) chunks, is the fit of those rows repeated (parameters, log-likelihoods and
    bounds to 1e-10)."""
    x = _data()
    w = torch.ones(len(x), dtype=torch.float64)
    w[:100] = 2.0
    weighted, wres = _fit(cls, [(x[:250], w[:250]), (x[250:], w[250:])])
    repeated, rres = _fit(cls, torch.cat([x[:100], x]))
    for (name, a), (_, b) in zip(
        weighted.state_dict().items(), repeated.state_dict().items(), strict=True
    ):
        assert _close(a, b), name
    assert np.allclose(wres.log_likelihoods, rres.log_likelihoods, rtol=TOL, atol=TOL)
    assert np.allclose(wres.lower_bounds, rres.lower_bounds, rtol=TOL, atol=TOL)
