"""Benchmark: exact EM in memory, over chunks of a memory-mapped file, and on 2 processes.

Run ``python bench/bench_scale.py`` (N = 1,000,000 and N = 10,000,000) or with ``--quick``
(N = 100,000 and 1,000,000: a smoke run). D = 10, K = 10, full covariances, float64.

Each mode runs in its own fresh process, so its peak resident memory (``VmHWM``, the
high-water mark of the whole process: Python, torch and the data) is its own:

full       the data loaded into one (N, D) tensor, ``EM(...).fit(x)``
chunked    ``EM(..., chunk_size=65536).fit("x.npy")``: memory-mapped, 65,536 rows at a time
2-process  ``torchrun --nproc_per_node=2``-style launch (``torch.distributed.run``, gloo on
           loopback); each rank reads its half of the file in chunks, the sums of every
           pass are all-reduced (``EM(..., distributed=True)``)

All modes start from one shared start (K data rows as means, identity covariances) and run
the same fixed number of iterations (``tol=0``); the per-iteration time is the mean over
iterations 2..n (one M-step and one E-step pass over all the data each), read from the
``callback`` timestamps. The final log-likelihoods are printed: exact EM gives the same
number in every mode (to rounding). Torch threads: the single-process rows use every core
(and, for the speed-up, also one thread); each of the 2 processes uses one thread, so both
sides use the same cores.

The large run (N = 10,000,000) writes an 800 MB file and fits it chunked: peak resident
memory stays at that of a small run, far under 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, n_cores  # noqa: E402

D, K, CHUNK = 10, 10, 65_536


# ---------------------------------------------------------------------------- data
def write_data(path: Path, n: int, seed: int = 0) -> None:
    """n rows from a K-component mixture, written block by block to a .npy file."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((K, D))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, D))
    for start in range(0, n, 1_000_000):
        m = min(1_000_000, n - start)
        z = rng.integers(K, size=m)
        out[start : start + m] = centres[z] + rng.standard_normal((m, D))
    out.flush()
    del out


def shared_start(path: Path) -> dict:
    """K rows of the file as means, identity covariances, equal weights (lists, for JSON)."""
    x = np.load(path, mmap_mode="r")
    rows = np.random.default_rng(1).choice(min(len(x), 100_000), size=K, replace=False)
    return {"means": np.asarray(x[np.sort(rows)]).tolist()}


# ---------------------------------------------------------------------------- one mode
def peak_rss_mib() -> float:
    """Peak resident memory of this process's own address space, in MiB.

    ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` is no good in a child started by
    ``subprocess``, since Linux folds the parent's high-water mark into it at ``exec``
    (here the parent has just written the data file through a memmap).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    """Fit in this process (or this rank) and print one JSON line (rank 0)."""
    import torch

    torch.set_num_threads(args.threads)
    from elbolab.guides import ExactPosterior
    from elbolab.inference import EM
    from elbolab.inference import distributed as dist_ops
    from elbolab.models import GaussianMixture

    distributed = args.worker == "2-process"
    if distributed:
        dist_ops.init(timeout_s=600)
    start = json.loads(Path(args.init_json).read_text())
    init = {
        "weights": torch.full((K,), 1.0 / K, dtype=torch.float64),
        "means": torch.tensor(start["means"], dtype=torch.float64),
        "covariances": torch.eye(D, dtype=torch.float64).expand(K, D, D),
    }
    if args.worker == "full":
        data = torch.from_numpy(np.load(args.data))  # all N rows in memory
    elif distributed:
        x = np.load(args.data, mmap_mode="r")
        r, w = dist_ops.rank(), dist_ops.world_size()
        data = x[r * len(x) // w : (r + 1) * len(x) // w]  # this rank's rows, still mapped
    else:
        data = args.data
    stamps: list[float] = []
    model = GaussianMixture(K)
    em = EM(
        model,
        ExactPosterior(model),
        init=init,
        tol=0.0,
        max_iter=args.iters,
        chunk_size=CHUNK,
        distributed=distributed,
        progress=False,
        callback=lambda it, m: stamps.append(time.perf_counter()),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0 never converges: fixed iterations on purpose
        result = em.fit(data)
    per_iter = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    rss = [peak_rss_mib()]
    if distributed:
        box = [None] * dist_ops.world_size()
        torch.distributed.all_gather_object(box, rss[0])
        rss = box
        dist_ops.shutdown()
    if not distributed or dist_ops.rank() == 0:
        print(
            json.dumps(
                {"per_iter": per_iter, "rss": rss, "ll": result.log_likelihood, "iters": args.iters}
            ),
            flush=True,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(mode: str, data: Path, start: Path, iters: int, threads: int) -> dict:
    """Run one mode in fresh process(es) and return its JSON line."""
    me = [str(Path(__file__).resolve())]
    tail = ["--worker", mode, "--data", str(data), "--init-json", str(start)]
    tail += ["--iters", str(iters), "--threads", str(threads)]
    if mode == "2-process":
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        launch += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
        command = launch + me + tail
    else:
        command = [sys.executable] + me + tail
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stdout}\n{out.stderr}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N / 10 (a smoke run)")
    parser.add_argument("--iters", type=int, default=5, help="EM iterations per mode (>= 3)")
    parser.add_argument("--skip-large", action="store_true", help="skip the N = 10^7 run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--init-json", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.iters < 3:
        parser.error("--iters must be at least 3")
    cores = n_cores()
    n = 100_000 if args.quick else 1_000_000
    big = 1_000_000 if args.quick else 10_000_000
    import torch

    print(f"machine: {cpu_model()}, {cores} cores; torch {torch.__version__}; float64")
    with tempfile.TemporaryDirectory(prefix="elbolab-bench-") as tmp:
        data, start = Path(tmp) / "x.npy", Path(tmp) / "start.json"
        write_data(data, n)
        start.write_text(json.dumps(shared_start(data)))
        rows = [
            ("full (in memory)", run_mode("full", data, start, args.iters, cores)),
            ("chunked (.npy)", run_mode("chunked", data, start, args.iters, cores)),
            ("chunked, 1 thread", run_mode("chunked", data, start, args.iters, 1)),
            ("2-process (1 thread each)", run_mode("2-process", data, start, args.iters, 1)),
        ]
        print(f"\nexact EM, N = {n:,}, D = {D}, K = {K}, full covariance, {args.iters} iterations")
        print(f"{'mode':28s} {'s / iteration':>14s} {'peak RSS MiB':>14s} {'final mean ll':>16s}")
        for name, r in rows:
            rss = " + ".join(f"{v:.0f}" for v in r["rss"])
            print(f"{name:28s} {r['per_iter']:14.3f} {rss:>14s} {r['ll']:16.10f}")
        base = {name: r["per_iter"] for name, r in rows}
        two = base["2-process (1 thread each)"]
        print(
            f"speed-up of 2 processes: {base['chunked (.npy)'] / two:.2f}x over 1 process with "
            f"{cores} threads, {base['chunked, 1 thread'] / two:.2f}x over 1 process with 1 thread"
        )
        lls = [r["ll"] for _, r in rows]
        print(f"largest difference of the final log-likelihoods: {max(lls) - min(lls):.1e}")
        if args.skip_large:
            return
        data.unlink()
        started = time.perf_counter()
        write_data(data, big)
        written = time.perf_counter() - started
        size = data.stat().st_size / 2**20
        r = run_mode("chunked", data, start, 3, cores)
        print(
            f"\nchunked EM, N = {big:,} from a memory-mapped file of {size:.0f} MiB "
            f"(written in {written:.0f} s): {r['per_iter']:.2f} s / iteration, "
            f"peak RSS {r['rss'][0]:.0f} MiB"
        )


if __name__ == "__main__":
    main()
