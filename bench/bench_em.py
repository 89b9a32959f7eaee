"""Benchmark: elbolab's closed-form EM and Pyro-enumeration E-step against references.

Run ``python bench/bench_em.py`` (full: N = 200,000) or ``python bench/bench_em.py --quick``
(N = 20,000, a smoke run). Everything is measured side by side in one process, with
``time.perf_counter``, on the same float64 data and the same thread settings.

Data: for each D in (2, 25), N samples from a known 8-component full-covariance Gaussian
mixture (fixed numpy seed; Dirichlet weights, overlapping means whose typical distance
does not grow with D, random SPD covariances), so EM needs a realistic number of iterations.

What is measured
----------------
1a. Fit to convergence, *initialisation included* (one run each, single timing):
    ours  ``EM(GaussianMixture(8, "full"), ..., init="kmeans++", tol=1e-3, max_iter=100)``
    vs scikit-learn ``GaussianMixture(8, covariance_type="full", tol=1e-3, max_iter=100)``
    with ``init_params="k-means++"`` (the like-for-like row) and with the default
    ``init_params="kmeans"`` (a second reference row). Reported: seconds, ratio
    ours / sklearn, the reached mean per-sample log-likelihood, iterations, s / iteration.
    The inits differ (different random streams), so iteration counts can differ; 1b
    removes that confounder.
1b. 20 fixed EM iterations from one shared start (best of ``--repeats``): weights, means and
    covariances from a k-means++ hard assignment, given to sklearn as ``weights_init``,
    ``means_init``, ``precisions_init = inv(cov)`` (``max_iter=20, tol=0``: sklearn then
    skips its own init) and to ours as ``init={...}`` (``max_iter=20, tol=0``). Both
    final log-likelihoods are printed; they agree to ~1e-8 relative when the two EMs do the
    same arithmetic. ``ConvergenceWarning`` (tol=0 never converges) is suppressed.
2.  One E-step on the same parameters (the model after 1b), best of ``--repeats``:
    ours    ``guide.refresh(x); guide.probs(x)`` (twin copy of theta + Pyro enumeration of
            z + normalisation), vs
    hand    plain torch: Cholesky of the covariances, precision-Cholesky P_k = L_k^{-T},
            batched matmul ``x @ P_k - mu_k @ P_k``, log-weights, logsumexp -> log r (N, K),
            then ``exp``.
    Both responsibilities are compared (max abs difference). sklearn's private
    ``_estimate_log_prob_resp`` is timed too, for reference only.
3.  (``--breakdown``) where one EM iteration of ours spends its time: the twin copy in
    ``refresh``, ``enumerate_joint`` (Pyro trace + MultivariateNormal.log_prob), the
    normalisation, the closed-form M-step.

Targets: ours / sklearn <= 1.0 (1a k-means++ row and 1b, both D); Pyro E-step <= 1.5x hand.
The script only reports; it does not fail when a target is missed.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import time
import warnings

import numpy as np
import torch

N_COMPONENTS = 8
DIMS = (2, 25)
TOL, MAX_ITER, FIXED_ITERS, REG_COVAR = 1e-3, 100, 20, 1e-6


# ----------------------------------------------------------------------------- helpers
def n_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Minimum wall time of ``repeats`` calls of ``fn()``, and the last return value."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def make_data(n: int, d: int, seed: int = 20240601) -> np.ndarray:
    """N samples (float64) from a fixed 8-component full-covariance Gaussian mixture."""
    rng = np.random.default_rng(seed + d)
    K = N_COMPONENTS
    weights = rng.dirichlet(np.full(K, 5.0))
    means = rng.normal(scale=5.0 / np.sqrt(d), size=(K, d))  # mean gaps ~7 whatever D
    a = rng.normal(size=(K, d, d)) / np.sqrt(d)
    covs = a @ a.transpose(0, 2, 1) + 0.3 * np.eye(d)
    chol = np.linalg.cholesky(covs)
    z = rng.choice(K, size=n, p=weights)
    eps = rng.normal(size=(n, d))
    return means[z] + np.einsum("nij,nj->ni", chol[z], eps)


def shared_start(x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights, means, full covariances from a k-means++ hard assignment (+ reg_covar)."""
    from sklearn.cluster import kmeans_plusplus

    K, (n, d) = N_COMPONENTS, x.shape
    centers, _ = kmeans_plusplus(x, K, random_state=seed)
    d2 = (x**2).sum(1)[:, None] - 2 * x @ centers.T + (centers**2).sum(1)[None, :]
    resp = np.eye(K)[d2.argmin(1)]
    nk = resp.sum(0) + 10 * np.finfo(x.dtype).eps
    means = resp.T @ x / nk[:, None]
    covs = np.empty((K, d, d))
    for k in range(K):
        diff = x - means[k]
        covs[k] = (resp[:, k, None] * diff).T @ diff / nk[k] + REG_COVAR * np.eye(d)
    return {"weights": nk / nk.sum(), "means": means, "covariances": covs}


def hand_e_step(x: torch.Tensor, weights, means, covariances) -> torch.Tensor:
    """Hand-vectorised E-step in plain torch: log responsibilities, shape (N, K)."""
    d = x.shape[1]
    L = torch.linalg.cholesky(covariances)  # (K, D, D)
    eye = torch.eye(d, dtype=x.dtype).expand_as(L)
    prec_chol = torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2)  # L^-T
    y = torch.matmul(x, prec_chol) - (means.unsqueeze(1) @ prec_chol)  # (K, N, D)
    maha = y.square().sum(-1)  # (K, N)
    half_log_det = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (K,)
    log_joint = (
        weights.log()[:, None] - half_log_det[:, None] - 0.5 * (d * math.log(2 * math.pi) + maha)
    ).T  # (N, K)
    return log_joint - log_joint.logsumexp(-1, keepdim=True)


def fresh():
    from elbolab.guides import ExactPosterior
    from elbolab.models import GaussianMixture

    model = GaussianMixture(n_components=N_COMPONENTS, covariance_type="full")
    return model, ExactPosterior(model)


# ----------------------------------------------------------------------------- sections
def warm_up() -> float:
    """One tiny fit of each contender, so no timing below pays one-time lazy imports.

    (The first MultivariateNormal built in a process imports sympy through
    ``torch.broadcast_shapes``; sklearn imports its k-means code on first use.)
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture as SkGM

    from elbolab.inference import EM

    x = make_data(2_000, 3, seed=1)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for init in ("kmeans++", "kmeans"):
            model, guide = fresh()
            EM(model, guide, init=init, max_iter=3, progress=False).fit(x)
        for init in ("k-means++", "kmeans"):
            SkGM(N_COMPONENTS, init_params=init, max_iter=3).fit(x)
    return time.perf_counter() - t0


def bench_convergence(x: np.ndarray) -> list[dict]:
    """1a: fit to convergence, initialisation included, one run each."""
    from sklearn.mixture import GaussianMixture as SkGM

    from elbolab.inference import EM

    rows = []
    model, guide = fresh()
    t0 = time.perf_counter()
    res = EM(
        model,
        guide,
        tol=TOL,
        max_iter=MAX_ITER,
        n_init=1,
        init="kmeans++",
        reg_covar=REG_COVAR,
        seed=0,
        progress=False,
    ).fit(x)
    t = time.perf_counter() - t0
    ours = {
        "who": "ours kmeans++",
        "time": t,
        "ll": res.log_likelihoods[-1],
        "n_iter": res.n_iter,
        "converged": res.converged,
    }
    rows.append(ours)
    for init in ("k-means++", "kmeans"):
        gm = SkGM(
            N_COMPONENTS,
            covariance_type="full",
            tol=TOL,
            max_iter=MAX_ITER,
            init_params=init,
            reg_covar=REG_COVAR,
            random_state=0,
        )
        t0 = time.perf_counter()
        gm.fit(x)
        t = time.perf_counter() - t0
        rows.append(
            {
                "who": f"sklearn {init}",
                "time": t,
                "ll": float(gm.score(x)),
                "n_iter": int(gm.n_iter_),
                "converged": bool(gm.converged_),
                "ratio": ours["time"] / t,
            }
        )
    return rows


def bench_fixed_iters(x: np.ndarray, start: dict, repeats: int):
    """1b: FIXED_ITERS EM iterations from the shared start, best of ``repeats``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture as SkGM

    from elbolab.inference import EM

    precisions = np.linalg.inv(start["covariances"])

    def sk():
        gm = SkGM(
            N_COMPONENTS,
            covariance_type="full",
            tol=0.0,
            max_iter=FIXED_ITERS,
            reg_covar=REG_COVAR,
            weights_init=start["weights"],
            means_init=start["means"],
            precisions_init=precisions,
            random_state=0,
        )
        return gm.fit(x)

    def ours():
        model, guide = fresh()
        res = EM(
            model,
            guide,
            init=dict(start),
            tol=0.0,
            max_iter=FIXED_ITERS,
            reg_covar=REG_COVAR,
            progress=False,
        ).fit(x)
        return model, guide, res

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t_sk, gm = best_of(sk, repeats)
        t_ours, (model, guide, res) = best_of(ours, repeats)
    ll_sk, ll_ours = float(gm.score(x)), res.log_likelihoods[-1]
    return {
        "t_ours": t_ours,
        "t_sk": t_sk,
        "ll_ours": ll_ours,
        "ll_sk": ll_sk,
        "rel": abs(ll_ours - ll_sk) / abs(ll_sk),
        "n_iter": (res.n_iter, int(gm.n_iter_)),
        "model": model,
        "guide": guide,
        "sk": gm,
    }


def bench_e_step(x: np.ndarray, model, guide, gm, repeats: int) -> dict:
    """2: one E-step on the model's current parameters, ours vs hand-vectorised torch."""
    xt = torch.as_tensor(x)
    w, mu, cov = model.weights_, model.means_, model.covariances_

    def pyro_e():
        guide.refresh(xt)
        return guide.probs(xt)

    t_pyro, r_pyro = best_of(pyro_e, repeats)
    t_hand, log_r = best_of(lambda: hand_e_step(xt, w, mu, cov).exp(), repeats)
    t_sk, (_, log_r_sk) = best_of(lambda: gm._estimate_log_prob_resp(x), repeats)
    return {
        "t_pyro": t_pyro,
        "t_hand": t_hand,
        "t_sk": t_sk,
        "diff": float((r_pyro - log_r).abs().max()),
    }


def bench_breakdown(x: np.ndarray, model, guide, repeats: int) -> list[tuple[str, float]]:
    """3: the pieces of one EM iteration of ours (best of ``repeats`` each)."""
    from torch.distributions import MultivariateNormal

    from elbolab.inference.closed_form import _m_step_gaussian
    from elbolab.models.enumeration import enumerate_joint

    xt = torch.as_tensor(x)
    twin = copy.deepcopy(model)  # stands in for the guide's frozen copy of theta
    state = model.state_dict()
    out = [
        ("refresh: deepcopy(model)", best_of(lambda: copy.deepcopy(model), repeats)[0]),
        ("refresh: twin.load_state_dict", best_of(lambda: twin.load_state_dict(state), repeats)[0]),
        ("refresh(x) total", best_of(lambda: guide.refresh(xt), repeats)[0]),
        ("  enumerate_joint(model, x)", best_of(lambda: enumerate_joint(model, xt), repeats)[0]),
    ]
    loc, L = model.means_.unsqueeze(1), model.scale_tril.detach().unsqueeze(1)  # (K,1,D[,D])
    out.append(
        (
            "    MVN(loc[z], L[z]).log_prob(x) alone",
            best_of(lambda: MultivariateNormal(loc, scale_tril=L).log_prob(xt), repeats)[0],
        )
    )
    out.append(
        (
            "    PyroParam read (weights, means, scale_tril)",
            best_of(lambda: (model.weights, model.means, model.scale_tril), repeats)[0],
        )
    )
    guide.refresh(xt)
    out.append(("guide.probs(x) from cache", best_of(lambda: guide.probs(xt), repeats)[0]))
    resp = guide.probs(xt)
    nk = resp.sum(0)
    out.append(
        (
            "closed-form M-step _m_step_gaussian",
            best_of(lambda: _m_step_gaussian(model, xt, resp, nk, REG_COVAR), repeats)[0],
        )
    )
    return out


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 20,000 (smoke run)")
    parser.add_argument("--n", type=int, default=None, help="override N")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of short measurements")
    parser.add_argument("--breakdown", action="store_true", help="time the pieces of ours")
    args = parser.parse_args()
    n = args.n or (20_000 if args.quick else 200_000)

    threads = n_cores()
    torch.set_num_threads(threads)
    import pyro
    import sklearn
    from threadpoolctl import threadpool_info

    print(
        f"elbolab EM benchmark: N={n:,}, K={N_COMPONENTS}, full covariance, float64, "
        f"torch threads={torch.get_num_threads()}, repeats={args.repeats}"
    )

    print(f"warm-up (first fits in this process, one-time imports): {warm_up():.2f} s")
    results = {}
    for d in DIMS:
        t0 = time.perf_counter()
        x = make_data(n, d)
        print(f"\n=== D = {d} ===")
        conv = bench_convergence(x)
        for r in conv:
            print(
                f"  1a {r['who']:<17} {r['time']:8.3f} s  ll={r['ll']:.6f}  "
                f"iters={r['n_iter']:3d}  converged={r['converged']}"
            )
        fixed = bench_fixed_iters(x, shared_start(x), args.repeats)
        print(
            f"  1b {FIXED_ITERS} iterations: ours {fixed['t_ours']:.3f} s, sklearn "
            f"{fixed['t_sk']:.3f} s, ll ours={fixed['ll_ours']:.10f} "
            f"sklearn={fixed['ll_sk']:.10f} (rel diff {fixed['rel']:.1e})"
        )
        e = bench_e_step(x, fixed["model"], fixed["guide"], fixed["sk"], args.repeats)
        print(
            f"  2  E-step: pyro {e['t_pyro'] * 1e3:.1f} ms, hand {e['t_hand'] * 1e3:.1f} ms, "
            f"sklearn {e['t_sk'] * 1e3:.1f} ms, max|r_pyro - r_hand| = {e['diff']:.1e}"
        )
        if args.breakdown:
            print("  3  one iteration of ours, by piece (best of repeats):")
            for name, t in bench_breakdown(x, fixed["model"], fixed["guide"], args.repeats):
                print(f"       {name:<46} {t * 1e3:9.2f} ms")
        print(f"  (section wall time {time.perf_counter() - t0:.1f} s)")
        results[d] = (conv, fixed, e)

    # ------------------------------------------------------------------ summary table
    blas = (
        ", ".join(
            f"{i['internal_api']} {i.get('version')} ({i['num_threads']} thr)"
            for i in threadpool_info()
        )
        or "none loaded"
    )
    print("\n" + "=" * 96)
    print(f"platform : {platform.platform()} | python {platform.python_version()}")
    print(f"cpu      : {cpu_model()} | cores {threads} | torch threads {torch.get_num_threads()}")
    print(
        f"versions : torch {torch.__version__}, scikit-learn {sklearn.__version__}, "
        f"pyro {pyro.__version__}, numpy {np.__version__}"
    )
    print(f"blas     : {blas}")
    print(f"data     : N={n:,}, K={N_COMPONENTS}, full covariance, float64")
    print("-" * 96)
    hdr = (
        f"{'D':>3} {'measurement':<34} {'ours':>9} {'ref':>9} {'ours/ref':>8} {'target':>7}  notes"
    )
    print(hdr)
    print("-" * 96)
    for d, (conv, fixed, e) in results.items():
        ours = conv[0]
        for r in conv[1:]:
            target = "<=1.0" if r["who"].endswith("k-means++") else "(ref)"
            print(
                f"{d:>3} {'1a fit+init vs ' + r['who']:<34} {ours['time']:8.2f}s "
                f"{r['time']:8.2f}s {r['ratio']:8.2f} {target:>7}  "
                f"ll {ours['ll']:.5f} vs {r['ll']:.5f}; iters {ours['n_iter']} vs {r['n_iter']}"
                f"; s/iter {ours['time'] / ours['n_iter']:.3f} vs {r['time'] / r['n_iter']:.3f}"
            )
        print(
            f"{d:>3} {f'1b {FIXED_ITERS} iters, shared init vs sklearn':<34} "
            f"{fixed['t_ours']:8.2f}s {fixed['t_sk']:8.2f}s "
            f"{fixed['t_ours'] / fixed['t_sk']:8.2f} {'<=1.0':>7}  "
            f"ll {fixed['ll_ours']:.10f} vs {fixed['ll_sk']:.10f} (rel {fixed['rel']:.1e})"
        )
        print(
            f"{d:>3} {'2  E-step pyro vs hand torch':<34} {e['t_pyro'] * 1e3:7.1f}ms "
            f"{e['t_hand'] * 1e3:7.1f}ms {e['t_pyro'] / e['t_hand']:8.2f} {'<=1.5':>7}  "
            f"max|dr| {e['diff']:.1e}; sklearn E-step {e['t_sk'] * 1e3:.1f} ms"
        )
    print("=" * 96)


if __name__ == "__main__":
    main()
