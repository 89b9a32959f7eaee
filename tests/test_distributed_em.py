"""Exact EM on 2 processes (gloo on loopback) is EM on one process.

Every rank reduces its shard to sums, ``all_reduce`` adds them, every rank takes the same
M-step: parameters equal the one-process fit to 1e-10 in float64 (only the order of the
sums differs). Bad input on one rank stops every rank with an error that names it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from elbolab.guides import ExactGaussianPosterior, ExactPosterior
from elbolab.inference import EM
from elbolab.models import GaussianMixture
from families import sample_data

WORKER = Path(__file__).with_name("dist_em_worker.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(data: Path, out: Path, scenario: str, timeout_s: float = 30):
    """Start 2 ranks as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT); wait for both."""
    port = _port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            TIMEOUT_S=str(timeout_s),
            OMP_NUM_THREADS="1",
        )
        command = [sys.executable, str(WORKER), str(data), str(out), scenario]
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    outputs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout_s + 60)
        outputs.append((p.returncode, stdout.decode() + stderr.decode()))
    return outputs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "x.npy"
    np.save(path, sample_data("gaussian-full", 400).numpy())
    return path


def test_two_processes_equal_one(data, tmp_path):
    out = tmp_path / "fit.pt"
    for code, text in _launch(data, out, "ok"):
        assert code == 0, text
    two = torch.load(out, weights_only=True)
    x = torch.from_numpy(np.load(data))
    model = GaussianMixture(3)
    start = {
        "weights": torch.full((3,), 1 / 3, dtype=torch.float64),
        "means": x[:3] + 0.5,
        "covariances": torch.eye(x.shape[1], dtype=torch.float64).expand(3, -1, -1),
    }
    em = EM(model, ExactPosterior(model), init=start, tol=0.0, max_iter=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        one = em.fit(x)
    for name, value in model.state_dict().items():
        assert torch.allclose(two["state"][name], value, rtol=1e-10, atol=1e-10), name
    assert np.allclose(two["lls"], one.log_likelihoods, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("nan", r"failed on rank 1 of 2.*chunk 1 \(from row 64\).*NaN"),
        ("empty", r"failed on rank 1 of 2.*empty"),
    ],
)
def test_bad_input_on_one_rank_stops_every_rank(data, tmp_path, scenario, message):
    out = tmp_path / "fit.pt"
    outputs = _launch(data, out, scenario)
    for rank, (code, text) in enumerate(outputs):
        assert code == 1, text
        assert f"rank {rank} DistributedInputError" in text
        assert __import__("re").search(message, text), text
    assert not out.exists()  # nothing written


def test_a_rank_that_dies_stops_the_other_within_the_timeout(data, tmp_path):
    out = tmp_path / "fit.pt"
    started = time.perf_counter()
    (code0, text0), (code1, _) = _launch(data, out, "die", timeout_s=10)
    assert code1 == 3
    assert code0 == 1 and "rank 0 RankFailure" in text0, text0
    assert "timeout (10 s)" in text0
    assert time.perf_counter() - started < 10 + 30  # the timeout, plus start-up
    assert not out.exists()


def test_two_processes_fit_a_hidden_markov_model_and_factor_analysis(tmp_path):
    """Baum-Welch with whole sequences on each of 2 ranks, and factor analysis with each
    rank's summary of its rows: the one-process fits to 1e-10."""
    from elbolab.models import FactorAnalysis, GaussianHMM
    from families import hmm_start

    x = sample_data("gaussian-diag", 400).numpy()
    lengths = np.array([90, 60, 50, 110, 40, 50])
    data = tmp_path / "x.npy"
    np.save(data, x)
    np.save(str(data) + ".lengths.npy", lengths)
    for scenario in ("hmm", "ppca"):
        out = tmp_path / f"{scenario}.pt"
        for code, text in _launch(data, out, scenario):
            assert code == 0, text
        two = torch.load(out, weights_only=True)
        if scenario == "hmm":
            model = GaussianHMM(3, "diag")
            em = EM(model, ExactPosterior(model), init=hmm_start(x), tol=0.0, max_iter=6)
            args = {"lengths": lengths}
        else:
            model = FactorAnalysis(x.shape[1], 2).double()
            em = EM(model, ExactGaussianPosterior(model), seed=0, tol=0.0, max_iter=6)
            args = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            one = em.fit(torch.from_numpy(x), **args)
        for name, value in model.state_dict().items():
            assert torch.allclose(two["state"][name], value, rtol=1e-10, atol=1e-10), name
        assert np.allclose(two["lls"], one.log_likelihoods, rtol=1e-10, atol=0)


def test_two_processes_fit_variational_bayes(data, tmp_path):
    """CAVI on 2 ranks: the sums of each shard all-reduced, q(theta) broadcast from rank 0's
    start; q(theta) and the bounds equal the one-process fit over the same chunks to 1e-10."""
    from elbolab.guides import MeanFieldPosterior
    from families import vb_setup

    out = tmp_path / "vb.pt"
    for code, text in _launch(data, out, "vb"):
        assert code == 0, text
    two = torch.load(out, weights_only=True)
    model, start = vb_setup(np.load(data).shape[1])
    guide = MeanFieldPosterior(model)
    em = EM(model, guide, init=start, tol=0.0, max_iter=6, chunk_size=64, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        one = em.fit(str(data))
    for name, value in guide.state_dict().items():
        assert torch.allclose(two["state"][name], value, rtol=1e-10, atol=1e-10), name
    assert np.allclose(two["lls"], one.log_likelihoods, rtol=1e-10, atol=0)
