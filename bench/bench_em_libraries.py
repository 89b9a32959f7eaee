"""Benchmark: EM throughput of elbolab against scikit-learn and pomegranate (full covariance).

Run ``python bench/bench_em_libraries.py`` (about 5 minutes on 2 idle cores) or add
``--quick`` (every N divided by 10, a smoke run). Everything runs in one process on the same
float64 data, timed with ``time.perf_counter``; torch and the BLAS/OpenMP pools of numpy and
scikit-learn (``threadpoolctl``) use the same number of threads (``--threads``, default the
process's core count).

Workloads: N samples from a fixed K-component Gaussian mixture in D dimensions (numpy seed
fixed; Dirichlet weights, means about 7 apart whatever D, random full covariances of scale
~1), so the components are distinct but overlap:

1. N = 200,000, K = 8,  D = 2;
2. N = 1,000,000, K = 10, D = 10.

What is measured, per library (best time over round-robin repeats: 3 for workload 1, 2 for
workload 2, so background load hits every library alike):

(a) 20 EM iterations from one shared start: weights, means and covariances of a k-means++
    hard assignment, given to scikit-learn as ``weights_init``/``means_init``/
    ``precisions_init`` (``max_iter=20, tol=0``), to elbolab as ``init={...}``
    (``max_iter=20, tol=0``), and to pomegranate as initialised ``Normal`` components and
    ``priors`` (``max_iter=20, tol=-inf``). Each does 21 E-steps and 20 M-steps: sklearn and
    elbolab end with an E-step inside ``fit``; pomegranate's ``fit`` does not, so the timed
    region includes its ``log_probability(x)`` pass, which gives its final log-likelihood.
    The three final mean log-likelihoods per sample should agree (same arithmetic; sklearn and
    elbolab add reg_covar = 1e-6 to the covariances, pomegranate adds nothing).
(b) Fit to convergence, each library's own default initialisation included: elbolab
    k-means++ seeding, scikit-learn one ``KMeans`` run (``init_params="kmeans"``),
    pomegranate 3 k-means iterations from random points (computed in float32 by
    pomegranate). ``max_iter=300``, ``n_init=1``, seed 0. elbolab and scikit-learn stop when
    the mean per-sample bound changes by less than 1e-3; pomegranate stops when the *summed*
    log-likelihood improves by less than its ``tol``, so it gets ``tol = 1e-3 * N`` (the same
    threshold per sample; it also stops on a decrease). Iterations = M-steps taken.

pomegranate builds its modules in torch's default dtype (float32); they are cast to float64
with ``.to(torch.float64)`` before fitting, so its E- and M-steps run in float64 (it still
sums the mixture weights in a float32 buffer). If pomegranate does not import, its rows are
replaced by one line saying why.

The ``faults`` column counts the minor page faults of each fit: fresh memory the kernel had to
map. numpy asks for transparent huge pages (2 MB, one fault each) for its large arrays and
torch by default does not (4 kB pages), so torch code that allocates a fresh (N, K) table on
every pass (pomegranate) takes far more faults for the same bytes; elbolab's E-step works in
blocks of rows whose memory the allocator reuses, and takes few. On a virtual machine that
hands freed memory back to its host, first touches are slow (here ~0.4 GB/s against ~15 GB/s
for memory already mapped), and much slower when other processes compete for the CPU;
``THP_MEM_ALLOC_ENABLE=1`` (a torch environment variable, read at start-up) makes torch ask
for huge pages too. The script prints
whether it is set, and the average load other processes put on the machine during the run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import time
import warnings

import numpy as np
import torch
from machine import cpu_model, n_cores

SEED = 0
REG_COVAR = 1e-6
FIXED_ITERS = 20
TOL, MAX_ITER = 1e-3, 300
# (N, K, D, repeats)
WORKLOADS = ((200_000, 8, 2, 3), (1_000_000, 10, 10, 2))
LIBRARIES = ("elbolab", "scikit-learn", "pomegranate")


# ----------------------------------------------------------------------------- data
def make_data(n: int, k: int, d: int, seed: int = 20240601) -> np.ndarray:
    """N samples (float64, C order) from a fixed K-component full-covariance mixture."""
    rng = np.random.default_rng(seed + 100 * k + d)
    weights = rng.dirichlet(np.full(k, 5.0))
    means = rng.normal(scale=5.0 / np.sqrt(d), size=(k, d))  # mean gaps ~7 whatever D
    a = rng.normal(size=(k, d, d)) / np.sqrt(d)
    chol = np.linalg.cholesky(a @ a.transpose(0, 2, 1) + 0.3 * np.eye(d))
    z = rng.choice(k, size=n, p=weights)
    return means[z] + np.einsum("nij,nj->ni", chol[z], rng.normal(size=(n, d)))


def shared_start(x: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Weights, means, covariances (+ reg_covar) of a k-means++ hard assignment."""
    from sklearn.cluster import kmeans_plusplus

    centers, _ = kmeans_plusplus(x, k, random_state=SEED)
    d2 = (x**2).sum(1)[:, None] - 2 * x @ centers.T + (centers**2).sum(1)[None, :]
    labels = d2.argmin(1)
    nk = np.bincount(labels, minlength=k).astype(float)
    means = np.stack([x[labels == j].mean(0) for j in range(k)])
    covs = np.stack([np.cov(x[labels == j].T, bias=True) for j in range(k)])
    covs += REG_COVAR * np.eye(x.shape[1])
    return {"weights": nk / nk.sum(), "means": means, "covariances": covs}


# ----------------------------------------------------------------------------- libraries
def load_pomegranate():
    """(the pomegranate module, '') or (None, why it is unavailable, one line)."""
    try:
        import pomegranate
        import pomegranate.distributions
        import pomegranate.gmm
    except Exception as exc:  # noqa: BLE001 -- any import failure means "unavailable"
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return pomegranate, ""


def run_elbolab(x: torch.Tensor, k: int, start: dict | None) -> dict:
    from elbolab.guides import ExactPosterior
    from elbolab.inference import EM
    from elbolab.models import GaussianMixture

    fixed = start is not None
    t0 = time.perf_counter()
    model = GaussianMixture(k, covariance_type="full")
    res = EM(
        model,
        ExactPosterior(model),
        init=dict(start) if fixed else "kmeans++",
        tol=0.0 if fixed else TOL,
        max_iter=FIXED_ITERS if fixed else MAX_ITER,
        n_init=1,
        seed=SEED,
        reg_covar=REG_COVAR,
        progress=False,
    ).fit(x)
    seconds = time.perf_counter() - t0
    return {"s": seconds, "it": res.n_iter, "ll": res.log_likelihood, "conv": res.converged}


def run_sklearn(x: np.ndarray, k: int, start: dict | None) -> dict:
    from sklearn.mixture import GaussianMixture

    if start is not None:
        kwargs = {
            "weights_init": start["weights"],
            "means_init": start["means"],
            "precisions_init": np.linalg.inv(start["covariances"]),
            "tol": 0.0,
            "max_iter": FIXED_ITERS,
        }
    else:
        kwargs = {"tol": TOL, "max_iter": MAX_ITER}  # init_params="kmeans" (default)
    t0 = time.perf_counter()
    gm = GaussianMixture(
        k, covariance_type="full", reg_covar=REG_COVAR, n_init=1, random_state=SEED, **kwargs
    ).fit(x)
    seconds = time.perf_counter() - t0
    return {"s": seconds, "it": gm.n_iter_, "ll": float(gm.score(x)), "conv": gm.converged_}


def run_pomegranate(pg, x: torch.Tensor, k: int, start: dict | None) -> dict:
    Normal, GMM = pg.distributions.Normal, pg.gmm.GeneralMixtureModel
    fixed = start is not None
    t0 = time.perf_counter()
    if fixed:
        components = [
            Normal(torch.tensor(m), torch.tensor(c), covariance_type="full")
            for m, c in zip(start["means"], start["covariances"], strict=True)
        ]
        gmm = GMM(components, priors=torch.tensor(start["weights"]), max_iter=FIXED_ITERS)
        gmm.tol = -math.inf  # exactly FIXED_ITERS iterations
    else:
        components = [Normal(covariance_type="full") for _ in range(k)]
        gmm = GMM(components, max_iter=MAX_ITER, tol=TOL * x.shape[0], random_state=SEED)
    gmm.to(torch.float64)
    for module in (*gmm.distributions, gmm):  # recompute the caches in float64
        module._reset_cache()
    m_steps = [0]
    m_step = gmm.from_summaries

    def counted_m_step():
        m_steps[0] += 1
        m_step()

    gmm.from_summaries = counted_m_step
    gmm.fit(x)
    if fixed:  # the 21st E-step, which sklearn's and elbolab's fit do themselves
        ll = float(gmm.log_probability(x).mean())
    seconds = time.perf_counter() - t0
    if not fixed:
        ll = float(gmm.log_probability(x).mean())
    assert gmm.distributions[0].covs.dtype == torch.float64
    return {"s": seconds, "it": m_steps[0], "ll": ll, "conv": m_steps[0] < MAX_ITER}


# ----------------------------------------------------------------------------- machine
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


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh memory the kernel had to map)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# ----------------------------------------------------------------------------- main
def bench_workload(n, k, d, repeats, pg) -> dict:
    """Both measurements for every library, interleaved round-robin; best time of each."""
    from sklearn.exceptions import ConvergenceWarning

    x = make_data(n, k, d)
    xt = torch.from_numpy(x)
    start = shared_start(x, k)
    runners = {
        "elbolab": lambda s: run_elbolab(xt, k, s),
        "scikit-learn": lambda s: run_sklearn(x, k, s),
    }
    if pg is not None:
        runners["pomegranate"] = lambda s: run_pomegranate(pg, xt, k, s)
    best = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(repeats):
            for part, s in (("a", start), ("b", None)):
                for lib, run in runners.items():
                    # a fresh copy each time: pomegranate updates the tensors it is given in place
                    copy = None if s is None else {key: v.copy() for key, v in s.items()}
                    faults = minor_faults()
                    r = run(copy)
                    r["faults"] = minor_faults() - faults
                    if (part, lib) not in best or r["s"] < best[part, lib]["s"]:
                        best[part, lib] = r
    return best


INITS = {"elbolab": "k-means++", "scikit-learn": "KMeans", "pomegranate": "random+3 k-means"}


def print_table(best: dict, part: str, pg_note: str) -> None:
    """One measurement's rows: library, seconds, iterations, mean log-lik, time / elbolab."""
    fixed = part == "a"
    extra = "" if fixed else f" {'converged':>9}  {'init':<16}"
    print(
        f"    {'library':<13} {'seconds':>8} {'iters':>5} {'mean log-lik':>16} "
        f"{'time/elbolab':>12} {'faults':>7}{extra}"
    )
    ref = best[part, "elbolab"]["s"]
    for lib in LIBRARIES:
        r = best.get((part, lib))
        if r is None:
            print(f"    {lib:<13} unavailable ({pg_note})")
            continue
        extra = "" if fixed else f" {str(bool(r['conv'])):>9}  {INITS[lib]:<16}"
        print(
            f"    {lib:<13} {r['s']:8.3f} {r['it']:5d} {r['ll']:16.10f} {r['s'] / ref:12.2f} "
            f"{r['faults'] / 1e3:6.0f}k{extra}"
        )


def warm_up(pg) -> float:
    """One tiny fit per library and mode, so no timing pays one-time imports or set-up."""
    x = make_data(2_000, 3, 2, seed=1)
    t0 = time.perf_counter()
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = shared_start(x, 3)
        for s in (start, None):
            run_elbolab(torch.from_numpy(x), 3, s)
            run_sklearn(x, 3, s)
            if pg is not None:
                run_pomegranate(pg, torch.from_numpy(x), 3, s)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Measures (a) 20 EM iterations from a shared start and (b) a fit to convergence "
        "with each library's default initialisation; see the module docstring.",
    )
    parser.add_argument("--quick", action="store_true", help="divide every N by 10 (smoke run)")
    parser.add_argument(
        "--threads",
        type=int,
        default=n_cores(),
        help="threads of torch and of numpy/scikit-learn's BLAS and OpenMP pools "
        "(default: the process's cores)",
    )
    args = parser.parse_args()

    cores, threads = n_cores(), args.threads
    torch.set_num_threads(threads)
    import sklearn
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)  # BLAS and OpenMP pools of numpy/scikit-learn
    pg, why = load_pomegranate()
    print(
        f"machine: {cpu_model()} | {cores} cores | {platform.platform()} | "
        f"python {platform.python_version()}"
    )
    print(
        f"threads: torch {torch.get_num_threads()}, numpy/scikit-learn BLAS+OpenMP {threads} | "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')} | "
        f"torch {torch.__version__}, scikit-learn {sklearn.__version__}, "
        + (f"pomegranate {pg.__version__}" if pg else f"pomegranate unavailable ({why})")
    )
    busy = other_load()
    if busy is not None and busy > 0.3:
        print(
            f"WARNING: other processes keep {busy:.1f} of {cores} cores busy; with several "
            "threads per library the timings below are distorted (use an idle machine)"
        )
    print(f"warm-up (one-time imports and set-up, untimed): {warm_up(pg):.1f} s")
    ticks0, cpu0, t_start = cpu_ticks(), own_cpu_seconds(), time.perf_counter()
    for i, (n, k, d, repeats) in enumerate(WORKLOADS, 1):
        n = n // 10 if args.quick else n
        t0 = time.perf_counter()
        best = bench_workload(n, k, d, repeats, pg)
        print(
            f"\nworkload {i}: N={n:,}, K={k}, D={d}, full covariance, float64 "
            f"(best of {repeats}, round-robin; {time.perf_counter() - t0:.0f} s)"
        )
        print(f"  (a) {FIXED_ITERS} EM iterations from one shared k-means++ start")
        print_table(best, "a", why)
        print(
            f"  (b) to convergence, own default init included (tol {TOL:g}/sample, "
            f"max_iter {MAX_ITER})"
        )
        print_table(best, "b", why)
    wall = time.perf_counter() - t_start
    ticks1 = cpu_ticks()
    other = "n/a"
    if ticks0 and ticks1 and ticks1[1] > ticks0[1]:
        busy_cores = cores * (ticks1[0] - ticks0[0]) / (ticks1[1] - ticks0[1])
        other = f"{max(0.0, busy_cores - (own_cpu_seconds() - cpu0) / wall):.2f} cores"
    print(
        f"\ntime/elbolab > 1: elbolab faster; faults: minor page faults of the fit. pomegranate: "
        f"tol = {TOL:g} * N on the summed log-likelihood in (b), no reg_covar, mixture weights "
        "summed in float32."
    )
    print(f"total {wall:.0f} s; average load from other processes during the run: {other}")


if __name__ == "__main__":
    main()
