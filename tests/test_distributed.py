"""Training on several processes: the primitives, DDP's SVI against one process, the console
module through torchrun, resuming, and what every rank does when one has bad input or is lost.

Multi-process tests run 2 ranks over gloo on loopback. ``launch`` starts one process per rank
with the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); one test goes
through torchrun itself. ``_distributed_workers.py`` holds what those processes run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from _distributed_workers import NoLatents, Regression, regression_data, train_regression

from elbolab.datasets import load_digits, load_faithful
from elbolab.guides import AmortizedNormal, ExactPosterior
from elbolab.inference import EM, TrainingDiverged
from elbolab.inference import distributed as d
from elbolab.models import VAE, GaussianMixture

WORKERS = Path(__file__).with_name("_distributed_workers.py")
MODULE = ["-m", "elbolab.inference.distributed"]


@dataclass
class Rank:
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int = 2, timeout: float = 60) -> list[Rank]:
    """Run ``python ARGS`` once per rank, as torchrun would; wait for every rank."""
    port, procs = free_port(), []
    for r in range(world):
        env = os.environ | {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        )
    deadline, ranks = time.monotonic() + timeout, []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        ranks.append(Rank(p.returncode, out.decode(), err.decode()))
    return ranks


def run_case(case: str, out: Path, timeout_s: float = 30) -> list[dict]:
    """Run a case of ``_distributed_workers.py`` on 2 ranks; what each rank saved."""
    ranks = launch([str(WORKERS), case, str(out), str(timeout_s)])
    seen = []
    for r, rank in enumerate(ranks):
        path = out / f"rank{r}.pt"
        seen.append(torch.load(path, weights_only=True) if path.exists() else None)
        if seen[-1] is None and case not in ("dead_peer", "silent_peer"):
            pytest.fail(f"rank {r} exited with {rank.returncode}:\n{rank.stderr[-3000:]}")
    return seen


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (two threads on a busy 2-core machine are far slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------- one process
def test_help_explains_every_option_and_shows_torchrun():
    done = subprocess.run(
        [sys.executable, *MODULE, "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "torchrun --nproc_per_node=4" in done.stdout
    assert "--nnodes=2 --node_rank=R" in done.stdout and "--rdzv_endpoint=HOST:29500" in done.stdout
    # runpy warns when the package imports this module before running it as __main__
    assert "RuntimeWarning" not in done.stderr, done.stderr
    parser = d.build_parser()
    for command in ("em", "vae"):
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            assert action.help, f"{command} {action.option_strings} has no help"


def test_primitives_on_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert d.init() is False and not d.is_distributed()
    assert (d.rank(), d.world_size()) == (0, 1)
    tensors = {"a": torch.ones(2, dtype=torch.float64)}
    assert d.all_reduce_sum(tensors) is tensors and torch.equal(tensors["a"], torch.ones(2))
    d.agree(None, "nothing")
    error = ValueError("bad row 3; drop it")
    with pytest.raises(ValueError) as caught:
        d.agree(error, "reading")
    assert caught.value is error  # one process: the original error itself
    net = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    d.broadcast_module(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert len(d.check_in_sync(net)) == 1


def test_collective_turns_a_lost_peer_into_rank_failure():
    gloo = "[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"
    with pytest.raises(d.RankFailure, match="summing x failed: another rank stopped") as caught:
        with d.collective("summing x"):
            raise RuntimeError(gloo)
    assert "timeout" in str(caught.value) and "Connection reset" in str(caught.value)
    with pytest.raises(RuntimeError, match="^mat1 and mat2"):  # not a peer failure: unchanged
        with d.collective("summing x"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


def tiny_vae():
    torch.manual_seed(0)
    model = VAE(64, 2, hidden=(16,), likelihood="binomial", count=16)
    return model, AmortizedNormal(64, 2, hidden=(16,), scale="learned")


def test_resume_repeats_an_uninterrupted_run(tmp_path):
    x = load_digits().data[:256]
    options = {"batch_size": 32, "lr": 1e-2, "seed": 4}
    straight = tiny_vae()
    full = d.train_svi(*straight, x, epochs=3, **options)
    resumed, ckpt, log = tiny_vae(), tmp_path / "ckpt.pt", tmp_path / "log.jsonl"
    d.train_svi(*resumed, x, epochs=2, checkpoint=ckpt, log=log, **options)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    again = d.train_svi(*resumed, x, epochs=3, checkpoint=ckpt, log=log, resume=True, **options)
    assert again["resumed_from"] == 2 and again["bound"] == full["bound"]
    for a, b in zip(straight, resumed, strict=True):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "log.jsonl"]  # no temp files


def test_nan_loss_on_one_process_keeps_the_last_checkpoint(tmp_path):
    model, ckpt = Regression(), tmp_path / "ckpt.pt"

    def poison(epoch: int, _history: dict) -> None:
        model.poisoned = True

    with pytest.raises(TrainingDiverged, match="the loss became nan .* step 1 of epoch 2"):
        d.train_svi(
            model,
            NoLatents(),
            regression_data(),
            elbo=pyro.infer.Trace_ELBO(),
            batch_size=8,
            epochs=3,
            checkpoint=ckpt,
            callback=poison,
        )
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------------- two ranks
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    """One 2-rank run of the primitives and of train_svi (``collectives``), for several tests."""
    out = tmp_path_factory.mktemp("collectives")
    return run_case("collectives", out), out


def test_primitives_on_two_ranks(two_ranks):
    seen = [s["primitives"] for s in two_ranks[0]]
    assert [s["rank"] for s in seen] == [0, 1] and all(s["distributed"] for s in seen)
    for name in ("a", "b", "n"):
        total = seen[0]["before"][name] + seen[1]["before"][name]
        assert torch.equal(seen[0]["after"][name], total)  # the sum, bit for bit on both ranks
        assert torch.equal(seen[1]["after"][name], total)
    assert [float(s["after"]["kept"]) for s in seen] == [0.0, 1.0]  # skipped: unchanged
    assert all(s["same_dict"] for s in seen)

    for s in seen:  # every rank raised, naming the failing rank, the step and the fix
        assert s["agree"]["message"].startswith("the E-step pass of iteration 3 failed on rank 1")
        assert "row 3 is negative; drop it" in s["agree"]["message"]
        assert "rank 1 of 2" in s["odd"]
    assert seen[0]["agree"]["cause"] == "None"
    assert seen[1]["agree"]["cause"] == "ValueError('row 3 is negative; drop it')"

    torch.manual_seed(100)  # what rank 0 built
    rank0 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()
    for s in seen:
        assert all(torch.equal(v, rank0[k]) for k, v in s["net"].items())
        assert len(set(s["digests"])) == 1


def test_ddp_equals_one_process_with_the_union_batch(two_ranks):
    """2 ranks x batch 4 = 1 process x batch 8 on the same permutation.

    The DistributedSampler gives rank r the rows perm[r::2], so its t-th batch is
    perm[8t + r : 8(t + 1) : 2] and the union is perm[8t : 8(t + 1)], the one-process batch.
    The ELBO has no random site, so the runs differ only by rounding: DDP sums two half-batch
    gradients and halves them where one process sums eight terms (relative error ~1e-16,
    still ~1e-15 after 18 Adam steps). 1e-10 in float64 leaves room for that and fails on
    any error of scale, order or averaging (those move the parameters by ~1e-2).
    """
    seen = [s["svi"] for s in two_ranks[0]]
    model, history = train_regression(batch_size=8)  # one process
    for s in seen:
        for name, value in model.state_dict().items():
            assert torch.allclose(s["params"][name], value, rtol=0, atol=1e-10), name
        assert np.allclose(s["history"]["bound"], history["bound"], rtol=0, atol=1e-10)
        assert s["history"]["world_size"] == 2 and len(set(s["history"]["parameter_digests"])) == 1
    for name, value in seen[0]["params"].items():
        assert torch.equal(value, seen[1]["params"][name])  # identical on both ranks


def test_resume_on_two_ranks_needs_the_checkpoint_on_rank_0_only(two_ranks):
    seen, out = [s["svi"] for s in two_ranks[0]], two_ranks[1]
    for s in seen:
        assert s["resumed_from"] == 2
        for name, value in s["params"].items():  # 2 epochs + 1 resumed = 3 epochs
            assert torch.equal(s["resumed"][name], value), name
    assert torch.load(out / "resume.pt", weights_only=True)["epoch"] == 3
    assert not (out / "elsewhere").exists()  # rank 1 wrote nothing


def test_nan_on_one_rank_stops_every_rank(two_ranks):
    seen, out = [s["svi"] for s in two_ranks[0]], two_ranks[1]
    for s in seen:
        assert s["nan"]["type"] == "DistributedInputError"
        assert s["nan"]["message"].startswith("step 1 of epoch 2 failed on rank 1 of 2")
        assert "the loss became nan on rank 1" in s["nan"]["message"]
    assert torch.load(out / "nan.pt", weights_only=True)["epoch"] == 1  # the last good epoch


def test_too_little_data_stops_every_rank_before_training(two_ranks):
    for s in two_ranks[0]:
        assert s["svi"]["empty"]["type"] == "DistributedInputError"
        message = s["svi"]["empty"]["message"]
        assert message.startswith("splitting the data over ranks failed on rank 1 of 2")
        assert "rank 1 gets no data: the data set has 1 row for 2 ranks" in message


def test_vae_through_torchrun_then_resume(tmp_path, capsys, monkeypatch):
    out, logs = tmp_path / "vae", tmp_path / "logs"
    options = ["--dataset", "digits", "--batch-size", "64", "--hidden", "16", "--lr", "0.01"]
    options += ["--out", str(out), "--timeout", "30"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    torchrun += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    torchrun += ["--redirects=3", f"--log_dir={logs}"]  # each rank's output in its own file
    done = subprocess.run(
        [*torchrun, *MODULE, "vae", *options, "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (next(logs.glob(f"*/attempt_0/{r}")) for r in (0, 1))
    printed = (rank0 / "stdout.log").read_text()
    assert "epoch 1/2" in printed and "epoch 2/2" in printed
    assert (rank1 / "stdout.log").read_text() == "" == (rank1 / "stderr.log").read_text()
    # rank 0 alone wrote, and no temporary file is left
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.jsonl", "result.json"]
    first = (out / "log.jsonl").read_text().splitlines()
    bounds = [json.loads(line)["bound"] for line in first]
    assert len(bounds) == 2 and bounds[1] > bounds[0]  # the bound rises: the loss falls
    result = json.loads((out / "result.json").read_text())
    assert len(result["parameter_digests"]) == 2 and len(set(result["parameter_digests"])) == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2

    # continue to epoch 3 on one process (no torchrun): the checkpoint does not depend on W
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert d.main(["vae", *options, "--epochs", "3", "--resume"]) == 0
    assert "resuming after epoch 2" in capsys.readouterr().out
    lines = (out / "log.jsonl").read_text().splitlines()
    assert lines[:2] == first and json.loads(lines[2])["epoch"] == 3
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"] == 2 and result["world_size"] == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 3


def test_em_on_two_ranks_reaches_the_one_process_optimum(tmp_path):
    x = load_faithful().standardized().data.numpy()
    np.save(tmp_path / "x.npy", x)
    args = ["em", "--data", str(tmp_path / "x.npy"), "--components", "2", "--tol", "1e-10"]
    ranks = launch([*MODULE, *args, "--max-iter", "1000", "--out", str(tmp_path / "fit")])
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-3000:]
    assert "(converged)" in ranks[0].stdout and ranks[1].stdout == ""
    result = json.loads((tmp_path / "fit" / "result.json").read_text())
    assert result["world_size"] == 2 and len(set(result["parameter_digests"])) == 1
    saved = torch.load(tmp_path / "fit" / "model.pt", weights_only=True)
    assert saved["meta"]["n_samples"] == 272 and saved["meta"]["family"] == "gaussian"

    one = GaussianMixture(2)
    EM(one, ExactPosterior(one), tol=1e-10, max_iter=1000, seed=0, progress=False).fit(x)
    two = GaussianMixture(2).build(2)
    two.load_state_dict(saved["state_dict"])
    assert result["log_likelihood"] == pytest.approx(one.score(x), abs=1e-8)
    means = [m.means_[m.means_[:, 0].argsort()] for m in (one, two)]  # labels may be swapped
    assert torch.allclose(means[0], means[1], atol=1e-5)


def test_an_empty_shard_stops_every_rank_with_one_line(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros((1, 2)))  # 1 row for 2 ranks: rank 0 gets [0, 0)
    args = ["em", "--data", str(tmp_path / "one.npy"), "--components", "1"]
    ranks = launch([*MODULE, *args, "--out", str(tmp_path / "out"), "--timeout", "30"])
    for r, rank in enumerate(ranks):
        assert rank.returncode == 2 and rank.stdout == ""
        lines = rank.stderr.strip().splitlines()
        assert len(lines) == 1, rank.stderr
        assert lines[0].startswith(f"[rank {r}] error: reading {tmp_path / 'one.npy'} failed on")
        assert "rank 0 of 2" in lines[0] and "rank 0 has no rows" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["dead_peer", "silent_peer"])
def test_a_lost_rank_is_reported_within_the_timeout(tmp_path, case):
    """Rank 1 exits (or hangs) after epoch 1; rank 0 raises RankFailure, bounded by the timeout.

    A process that is gone is noticed at once (its sockets close); a silent one after the
    timeout of the collective, here 3 s.
    """
    timeout = 3.0
    seen = run_case(case, tmp_path, timeout_s=timeout)
    assert seen[1] is None  # rank 1 never finished
    marks = seen[0]
    assert marks["type"] == "RankFailure"
    assert "step 1 of epoch 2 failed: another rank stopped" in marks["message"]
    assert f"({timeout:g} s)" in marks["message"]
    waited = marks["raised"] - marks["epoch_done"]
    if case == "dead_peer":
        assert waited < timeout
    else:
        assert 0.8 * timeout <= waited <= timeout + 4
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # the last complete one
    assert state["epoch"] == 1 and set(state) >= {"model", "guide", "optimizer", "history"}
    assert not list(tmp_path.glob(".*.tmp"))
