"""Benchmark: one forward-backward pass (HMM-FB) of elbolab against hmmlearn and pomegranate.

Run ``python bench/bench_forward_backward.py`` (about a minute on 2 idle cores; pomegranate's
Python loop over 10^5 frames takes most of it) or add ``--quick`` (every T divided by 10).
Everything runs in one process on the same float64 inputs, timed with
``time.perf_counter``, round-robin (``--repeats``, best time of each), so background load
hits every library alike.

Workloads, K = 8 states, random parameters (every row of A and pi drawn from Dirichlet(1),
numpy seed fixed) and random log-emissions log p_k(x_t) ~ N(0, 3^2) per entry:

(a) 100 sequences of 1,000 frames;
(b) one sequence of 100,000 frames.

What one pass computes, per library: the log-likelihood of every sequence, gamma (N, K) and
the summed xi (K, K) -- the E-step of Baum-Welch given the emission log-probabilities.

* elbolab: ``elbolab.guides.forward_backward.forward_backward`` (all sequences at once;
  (b) through blocked transfer products).
* hmmlearn (C++ kernels in ``hmmlearn._hmmc``, called as hmmlearn's own ``BaseHMM`` does,
  sequence by sequence): the default ``implementation="log"`` -- ``forward_log``,
  ``backward_log``, gamma by ``utils.log_normalize`` of their sum, ``compute_log_xi_sum``;
  and ``implementation="scaling"`` -- ``forward_scaling``, ``backward_scaling`` on
  ``exp(log_emission)`` (hmmlearn's ``_compute_likelihood``), gamma by ``utils.normalize``,
  ``compute_scaling_xi_sum``.
* pomegranate (if it imports): ``DenseHMM.forward_backward(emissions=...)`` on the
  (S, T, K) log-emissions, the model cast to float64 (``.to(torch.float64)``: otherwise its
  backward lattice is float32), ``ends`` = 1 so that its log p is hmmlearn's.

Every result is checked against elbolab's: the largest relative difference of log p and
the largest absolute difference of gamma must stay below 1e-8 ("ok"); the largest relative
difference of xi_sum is shown too (hmmlearn's ``compute_log_xi_sum`` carries the rounding of
its unnormalised log lattices, ~1e-8 on 10^5 frames). elbolab's kernels run on one thread
whatever torch's setting (they set it for the call); ``--threads`` (default 1, as hmmlearn's
single-threaded kernels) is torch's setting, which pomegranate uses.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from machine import cpu_model, n_cores

K = 8
SEED = 0
# (label, sequences, frames each)
WORKLOADS = (("a", 100, 1000), ("b", 1, 100_000))
AGREE = 1e-8


def make_problem(sequences: int, frames: int, k: int = K, seed: int = SEED) -> dict:
    rng = np.random.default_rng(seed + frames)
    pi = rng.dirichlet(np.ones(k))
    a = rng.dirichlet(np.ones(k), size=k)
    log_b = rng.normal(scale=3.0, size=(sequences * frames, k))
    return {"pi": pi, "a": a, "log_b": log_b, "lengths": [frames] * sequences}


# ----------------------------------------------------------------------------- libraries
def run_elbolab(p: dict):
    from elbolab.guides.forward_backward import forward_backward

    out = forward_backward(
        torch.from_numpy(np.log(p["pi"])),
        torch.from_numpy(np.log(p["a"])),
        torch.from_numpy(p["log_b"]),
        p["lengths"],
    )
    return out.log_likelihood.numpy(), out.gamma.numpy(), out.xi_sum.numpy()


def run_hmmlearn_log(p: dict):
    from hmmlearn import _hmmc
    from hmmlearn.utils import log_normalize

    pi, a = p["pi"], p["a"]
    lls, gammas, xi_sum, start = [], [], np.zeros_like(a), 0
    for n in p["lengths"]:
        x = p["log_b"][start : start + n]
        start += n
        ll, fwd = _hmmc.forward_log(pi, a, x)
        bwd = _hmmc.backward_log(pi, a, x)
        log_gamma = fwd + bwd
        log_normalize(log_gamma, axis=1)
        with np.errstate(under="ignore"):
            gammas.append(np.exp(log_gamma))
            xi_sum += np.exp(_hmmc.compute_log_xi_sum(fwd, a, bwd, x))
        lls.append(ll)
    return np.array(lls), np.concatenate(gammas), xi_sum


def run_hmmlearn_scaling(p: dict):
    from hmmlearn import _hmmc
    from hmmlearn.utils import normalize

    pi, a = p["pi"], p["a"]
    frameprob = np.exp(p["log_b"])
    lls, gammas, xi_sum, start = [], [], np.zeros_like(a), 0
    for n in p["lengths"]:
        x = frameprob[start : start + n]
        start += n
        ll, fwd, scaling = _hmmc.forward_scaling(pi, a, x)
        bwd = _hmmc.backward_scaling(pi, a, x, scaling)
        gamma = fwd * bwd
        normalize(gamma, axis=1)
        gammas.append(gamma)
        xi_sum += _hmmc.compute_scaling_xi_sum(fwd, a, bwd, x)
        lls.append(ll)
    return np.array(lls), np.concatenate(gammas), xi_sum


def load_pomegranate():
    """(the DenseHMM class, '') or (None, why it is unavailable, one line)."""
    try:
        from pomegranate.hmm import DenseHMM
    except Exception as exc:  # noqa: BLE001 -- any import failure means "unavailable"
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return DenseHMM, ""


def make_pomegranate(dense_hmm, p: dict):
    from pomegranate.distributions import Exponential

    k = len(p["pi"])
    model = dense_hmm(
        [Exponential([1.0]) for _ in range(k)],  # unused: the emissions are given
        edges=torch.from_numpy(p["a"]),
        starts=torch.from_numpy(p["pi"]),
        ends=torch.ones(k, dtype=torch.float64),
    )
    return model.to(torch.float64)


def run_pomegranate(model, p: dict):
    s, t = len(p["lengths"]), p["lengths"][0]
    emissions = torch.from_numpy(p["log_b"]).reshape(s, t, -1)
    xi, log_gamma, _, _, logp = model.forward_backward(emissions=emissions)
    return logp.numpy(), log_gamma.exp().reshape(s * t, -1).numpy(), xi.sum(0).numpy()


# ----------------------------------------------------------------------------- helpers
def cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(v) - v[3] - (v[4] if len(v) > 4 else 0), sum(v)


def other_load(seconds: float = 0.5) -> float | None:
    """CPU cores kept busy by other processes during ``seconds`` (sleeping ourselves)."""
    t0 = cpu_ticks()
    time.sleep(seconds)
    t1 = cpu_ticks()
    if not t0 or not t1 or t1[1] == t0[1]:
        return None
    return n_cores() * (t1[0] - t0[0]) / (t1[1] - t0[1])


def differences(ref, got) -> tuple[float, float, float]:
    """max relative |d log p|, max |d gamma|, max relative |d xi_sum| (against elbolab)."""
    ll, gamma, xi = ref
    ll2, gamma2, xi2 = got
    d_ll = float(np.max(np.abs(ll2 - ll) / np.maximum(np.abs(ll), 1.0)))
    d_gamma = float(np.max(np.abs(gamma2 - gamma)))
    d_xi = float(np.max(np.abs(xi2 - xi) / np.maximum(np.abs(xi), 1e-300)))
    return d_ll, d_gamma, d_xi


def bench_workload(sequences: int, frames: int, repeats: int, dense_hmm) -> dict:
    p = make_problem(sequences, frames)
    runners = {
        "elbolab": lambda: run_elbolab(p),
        "hmmlearn (log)": lambda: run_hmmlearn_log(p),
        "hmmlearn (scaling)": lambda: run_hmmlearn_scaling(p),
    }
    if dense_hmm is not None:
        model = make_pomegranate(dense_hmm, p)
        runners["pomegranate"] = lambda: run_pomegranate(model, p)
    results = {name: None for name in runners}
    best = {name: float("inf") for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            results[name] = run()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: (best[name], differences(results["elbolab"], results[name])) for name in runners}


def warm_up(dense_hmm) -> float:
    """One-time costs (imports, first calls) kept out of the timings."""
    t0 = time.perf_counter()
    p = make_problem(3, 50)
    run_elbolab(p)
    run_hmmlearn_log(p)
    run_hmmlearn_scaling(p)
    if dense_hmm is not None:
        run_pomegranate(make_pomegranate(dense_hmm, p), p)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="One E-step (log p, gamma, xi_sum) per library; see the module docstring.",
    )
    parser.add_argument("--quick", action="store_true", help="divide every T by 10")
    parser.add_argument("--repeats", type=int, default=5, help="round-robin repeats (best)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, as hmmlearn's kernels)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import hmmlearn

    dense_hmm, why = load_pomegranate()
    pg_version = ""
    if dense_hmm is not None:
        import pomegranate

        pg_version = pomegranate.__version__
    print(
        f"machine: {cpu_model()} | {n_cores()} cores | {platform.platform()} | "
        f"python {platform.python_version()}"
    )
    print(
        f"threads: torch {torch.get_num_threads()}, hmmlearn 1 | torch {torch.__version__}, "
        f"numpy {np.__version__}, hmmlearn {hmmlearn.__version__}, "
        + (f"pomegranate {pg_version}" if dense_hmm else f"pomegranate unavailable ({why})")
        + f" | THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"
    )
    busy = other_load()
    if busy is not None and busy > 0.3:
        print(
            f"WARNING: other processes keep {busy:.1f} of {n_cores()} cores busy: the timings "
            "below are slower than on an idle machine (all libraries alike, run round-robin)"
        )
    print(f"warm-up (imports, first calls; untimed): {warm_up(dense_hmm):.1f} s\n")
    header = (
        f"{'workload':<26} {'library':<19} {'best s':>9} {'x elbolab':>10} "
        f"{'d log p':>9} {'d gamma':>9} {'d xi_sum':>9}  agree"
    )
    print(header)
    print("-" * len(header))
    t_start = time.perf_counter()
    for label, sequences, frames in WORKLOADS:
        frames = frames // 10 if args.quick else frames
        rows = bench_workload(sequences, frames, args.repeats, dense_hmm)
        ours = rows["elbolab"][0]
        name = f"({label}) {sequences} x {frames:,}, K={K}"
        for lib, (seconds, (d_ll, d_gamma, d_xi)) in rows.items():
            ok = "-" if lib == "elbolab" else ("ok" if max(d_ll, d_gamma) < AGREE else "NO")
            print(
                f"{name:<26} {lib:<19} {seconds:>9.4f} {seconds / ours:>10.2f} "
                f"{d_ll:>9.1e} {d_gamma:>9.1e} {d_xi:>9.1e}  {ok}"
            )
            name = ""
        if dense_hmm is None:
            print(f"{'':<26} {'pomegranate':<19} unavailable ({why})")
    print(
        f"\nx elbolab: the library's time over elbolab's (> 1: elbolab is faster). d log p, "
        f"d xi_sum: largest relative difference from elbolab; d gamma: largest absolute one; "
        f"agree: d log p and d gamma < {AGREE:g}. Best of {args.repeats}; "
        f"{time.perf_counter() - t_start:.0f} s in all."
    )


if __name__ == "__main__":
    main()
