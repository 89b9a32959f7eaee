"""EM over chunks is full-batch EM: additive sums (statistics.py) make every split the same.

Exact paths in float64: parameters, log-likelihoods and bounds agree to 1e-10 after the
same iterations from the same start; only the order of the sums differs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from elbolab.guides import ExactPosterior
from elbolab.inference import EM, DirectML
from elbolab.inference.em.mixture import GaussianStatistics, lookup_statistics
from elbolab.models import GaussianMixture
from families import FAMILIES, make_model, sample_data, true_params

TOL = 1e-10


def _start(family: str) -> dict:
    start = dict(true_params(family))
    if "means" in start:
        start["means"] = start["means"] + 0.7  # away from the truth: EM has work to do
    return start


def _fit(family: str, data, iterations: int = 8, sample_weight=None, **options):
    """``iterations`` EM steps from the same explicit start (tol=0: never stops early)."""
    model = make_model(family)
    em = EM(
        model,
        ExactPosterior(model),
        init=_start(family),
        max_iter=iterations,
        tol=0.0,
        progress=False,
        **options,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = em.fit(data, sample_weight=sample_weight)
    return model, result


def _assert_same(a, b, ra, rb) -> None:
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(pa, pb, rtol=TOL, atol=TOL), name
    assert np.allclose(ra.log_likelihoods, rb.log_likelihoods, rtol=TOL, atol=TOL)
    assert np.allclose(ra.lower_bounds, rb.lower_bounds, rtol=TOL, atol=TOL)
    assert ra.n_iter == rb.n_iter


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_em_equals_full_batch_em(family):
    """A list of uneven chunks gives full-batch EM's parameters, lls and bounds to 1e-10."""
    x = sample_data(family, 700)
    full_model, full = _fit(family, x)
    pieces = [x[:5], x[5:333], x[333:334], x[334:]]  # uneven, one of a single row
    chunk_model, chunked = _fit(family, pieces)
    _assert_same(full_model, chunk_model, full, chunked)
    assert chunked.n_passes == chunked.n_iter + 1  # one pass per E-step


@pytest.mark.parametrize("family", FAMILIES)
def test_e_step_in_row_blocks_equals_one_block(family, monkeypatch):
    """Data in memory go through the E-step in blocks of rows: 50-row blocks give what one
    block of all 700 rows gives, to 1e-10 (a lost or repeated block would change every sum)."""
    import elbolab.inference.em.mixture as em_module

    x = sample_data(family, 700)
    K = make_model(family).n_components
    monkeypatch.setattr(em_module, "E_BLOCK_ELEMENTS", 10**9)  # one block
    whole_model, whole = _fit(family, x)
    monkeypatch.setattr(em_module, "E_BLOCK_ELEMENTS", 50 * K)  # 14 blocks of 50 rows
    blocked_model, blocked = _fit(family, x)
    _assert_same(whole_model, blocked_model, whole, blocked)


def test_dataloader_npy_and_memmap_equal_full_batch(tmp_path):
    """The same EM from a DataLoader, a .npy path (memory-mapped), and a numpy.memmap."""
    family = "gaussian-full"
    x = sample_data(family, 500)
    full_model, full = _fit(family, x)
    path = tmp_path / "x.npy"
    np.save(path, x.numpy())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
    memmap = np.load(path, mmap_mode="r")
    for data in (loader, str(path), path, memmap):
        model, result = _fit(family, data, chunk_size=97)
        _assert_same(full_model, model, full, result)


def test_weighted_chunks_equal_weighted_full_batch():
    """(x, w) pairs from a DataLoader are the same fit as x with sample_weight."""
    family = "gaussian-diag"
    x = sample_data(family, 400)
    w = torch.rand(400, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    model = make_model(family)
    em = EM(model, ExactPosterior(model), init=_start(family), max_iter=6, tol=0.0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        full = em.fit(x, sample_weight=w)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, w), batch_size=50)
    chunk_model, chunked = _fit(family, loader, iterations=6)
    _assert_same(model, chunk_model, full, chunked)


def test_em_mono_holds_over_chunks():
    """(EM-MONO) ll_t <= LB_t <= ll_{t+1} with the bound computed from the sums alone."""
    x = sample_data("gaussian-full", 600)
    _, result = _fit("gaussian-full", [x[:200], x[200:400], x[400:]], iterations=15)
    lls, lbs = result.log_likelihoods, result.lower_bounds
    for t, lb in enumerate(lbs):
        assert lls[t] <= lb + 1e-12 and lb <= lls[t + 1] + 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_expected_log_lik_from_sums_equals_the_direct_sum(family):
    """sum_d r_dk log p_k(x_d; theta) from the sums equals the sum over the data (1e-10),
    at parameters other than those the responsibilities came from."""
    x = sample_data(family, 300)
    model = make_model(family)
    model.build(x.shape[1], x.dtype)
    model.set_params(**_start(family))
    resp = model.predict_proba(x)
    statistics = lookup_statistics(type(model))
    stats = statistics.collect(model, x, resp)
    model.set_params(**true_params(family))  # theta moves; the sums stay
    component = model._component_dist(**model._component_params())
    direct = (resp * component.log_prob(x.unsqueeze(-2))).sum(0)
    assert torch.allclose(statistics.expected_log_lik(model, stats), direct, rtol=TOL)


def test_gaussian_sums_recentre_exactly():
    """Sums about one shift, moved to another, equal sums taken about the other (1e-10)."""
    x = sample_data("gaussian-full", 200)
    model = make_model("gaussian-full")
    model.build(3, x.dtype)
    model.set_params(**true_params("gaussian-full"))
    resp = model.predict_proba(x)
    stats = GaussianStatistics().collect(model, x, resp)
    other = stats["shift"] + torch.randn_like(stats["shift"])
    direct = GaussianStatistics().collect(model, x, resp, shift=other)
    moved = GaussianStatistics.recentre(stats, other)
    for key in ("s1", "s2"):
        assert torch.allclose(moved[key], direct[key], rtol=TOL, atol=1e-9)


# ---------------------------------------------------------------------------- bad input
def _em(family="gaussian-full", **options):
    model = make_model(family)
    return model, EM(model, ExactPosterior(model), progress=False, seed=0, **options)


def test_a_chunk_with_another_feature_count_is_named():
    x = sample_data("gaussian-full", 300)
    _, em = _em()
    bad = [x[:100], x[100:200], torch.cat([x[200:], x[200:, :1]], 1)]
    with pytest.raises(ValueError, match=r"chunk 2 \(from row 200\).*4 features.*3"):
        em.fit(bad)


def test_nan_in_a_later_chunk_restores_the_fitted_parameters():
    """The error names the chunk; a model fitted before keeps its parameters."""
    x = sample_data("gaussian-full", 300)
    model, em = _em(warm_start=True, max_iter=200)
    em.fit(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    broken = x[200:].clone()
    broken[50, 1] = float("nan")
    with pytest.raises(ValueError, match=r"chunk 2 \(from row 200\).*NaN"):
        em.fit([x[:100], x[100:200], broken])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
        assert bool(torch.isfinite(value).all())


def test_batch_em_refuses_a_generator_and_says_what_to_do():
    x = sample_data("gaussian-full", 300)
    _, em = _em()
    with pytest.raises(ValueError, match="re-iterable.*stochastic=True"):
        em.fit(chunk for chunk in (x[:150], x[150:]))


@pytest.mark.parametrize(
    ("content", "message"),
    [(np.zeros(10), "2-D"), (None, "no such file")],
)
def test_bad_npy_files(tmp_path, content, message):
    path = tmp_path / "x.npy"
    if content is not None:
        np.save(path, content)
    _, em = _em()
    with pytest.raises(ValueError, match=message):
        em.fit(path)


def test_small_first_chunk_and_other_misuse():
    x = sample_data("gaussian-full", 300)
    _, em = _em()
    with pytest.raises(ValueError, match="first chunk has 2 rows.*at least 3 rows"):
        em.fit([x[:2], x[2:]])
    with pytest.raises(ValueError, match="sample_weight goes with in-memory data"):
        em.fit([x[:150], x[150:]], sample_weight=torch.ones(300))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        _em(chunk_size=0)
    model = GaussianMixture(3)
    with pytest.raises(ValueError, match="needs the data in memory"):
        DirectML(model, progress=False).fit([x[:150], x[150:]])
    _, gradient = _em(m_step="gradient")
    with pytest.raises(ValueError, match="gradient M-step needs the data in memory"):
        gradient.fit([x[:150], x[150:]])


def test_zero_weights_leave_rows_out():
    """Weight 0 is allowed (Pyro's scale is not: those rows are left out), in memory and in
    chunks, a chunk of weight 0 throughout included: the fit equals the fit to the other
    rows alone, to 1e-10."""
    family = "gaussian-full"
    x = sample_data(family, 600)
    w = torch.ones(600, dtype=torch.float64)
    w[::7] = 0.0
    w[300:350] = 0.0
    kept_model, kept = _fit(family, x[w > 0])
    chunks = [(x[:300], w[:300]), (x[300:350], w[300:350]), (x[350:], w[350:])]
    for data, weights in ((x, w), (chunks, None)):
        model, result = _fit(family, data, sample_weight=weights)
        _assert_same(kept_model, model, kept, result)


def test_lists_of_pairs_and_what_is_refused(tmp_path):
    """A list of (x, w) pairs is read as weighted chunks (1e-10 against the weighted fit);
    labels from a DataLoader of (x, y), ragged 1-D arrays and .npz archives are refused
    with what to do instead."""
    family = "gaussian-full"
    x = sample_data(family, 400)
    w = torch.linspace(0.5, 1.5, 400, dtype=torch.float64)
    model_a, ra = _fit(family, x, sample_weight=w)
    model_b, rb = _fit(family, [(x[:123], w[:123]), (x[123:].numpy(), w[123:].numpy())])
    _assert_same(model_a, model_b, ra, rb)
    _, em = _em()
    labels = torch.arange(400) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=100)
    with pytest.raises(ValueError, match=r"chunk 0 \(from row 0\).*class labels\?"):
        em.fit(loader)
    with pytest.raises(ValueError, match="chunk 0 .*2-D"):
        em.fit([x[:100, 0], x[100:, 0]])
    np.savez(tmp_path / "x.npz", x=x.numpy())
    with pytest.raises(ValueError, match="is an .npz archive"):
        em.fit(tmp_path / "x.npz")
