"""Benchmark: variational Bayes (CAVI) through the EM loop against scikit-learn's.

Run ``python bench/bench_vb.py`` (N = 200,000) or ``--quick`` (N = 20,000, a smoke run).
Data: bench_em.py's 8-component mixtures, D in (2, 25), float64. Both sides fit a
``BayesianGaussianMixture(8, "full")`` with scikit-learn's default priors, measured side by
side in one process (best of ``--repeats``):

1. 20 iterations from one shared start: the responsibilities of a k-means++ hard
   assignment, given to scikit-learn through a subclass whose ``_initialize_parameters``
   starts from them, and to ours as ``init={"responsibilities": resp}`` (``tol=0``).
   The final weights of both are printed (they agree to ~1e-12 when the two do the same
   arithmetic).
2. To convergence from that start, ``tol=1e-3`` on scikit-learn's bound change and
   ``tol = 1e-3 / N`` on ours (scikit-learn's bound is a sum over the data, ours a mean per
   datum), ``max_iter=500``: seconds and iterations.

scikit-learn is measured with its BLAS pool at the core count and at 1 thread, and the
faster is used (as in bench_em.py). Target: ours / scikit-learn <= 1 on every row.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from functools import partial

import numpy as np
import torch
from bench_em import blas_settings, make_data
from machine import cpu_model, n_cores
from sklearn.mixture import BayesianGaussianMixture as SklearnBGM
from threadpoolctl import threadpool_limits

from elbolab.guides import MeanFieldPosterior
from elbolab.inference import EM
from elbolab.models import BayesianGaussianMixture

K = 8
REG_COVAR = 1e-6


class FromResponsibilities(SklearnBGM):
    """scikit-learn's variational mixture started from given responsibilities."""

    def _initialize_parameters(self, X, random_state, xp=None):
        self._initialize(X, self.resp_init)


def hard_start(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Responsibilities (N, K) of a k-means++ hard assignment."""
    from sklearn.cluster import kmeans_plusplus

    centers, _ = kmeans_plusplus(x, K, random_state=seed)
    d2 = (x**2).sum(1)[:, None] - 2 * x @ centers.T + (centers**2).sum(1)[None, :]
    return np.eye(K)[d2.argmin(1)]


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run_sklearn(x, resp, tol, max_iter):
    sk = FromResponsibilities(
        n_components=K, covariance_type="full", tol=tol, max_iter=max_iter, reg_covar=REG_COVAR
    )
    sk.resp_init = resp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.fit(x)
    return sk


def run_ours(x, resp, tol, max_iter):
    model = BayesianGaussianMixture(K, "full")
    guide = MeanFieldPosterior(model)
    em = EM(
        model,
        guide,
        tol=tol,
        max_iter=max_iter,
        init={"responsibilities": resp},
        reg_covar=REG_COVAR,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = em.fit(x)
    return guide, result


def bench(x: np.ndarray, repeats: int):
    resp = hard_start(x)
    xt = torch.from_numpy(x)
    resp_t = torch.from_numpy(resp)
    for label, tol_sk, tol_ours, max_iter in (
        ("20 iterations", 0.0, 0.0, 20),
        ("to convergence", 1e-3, 1e-3 / x.shape[0], 500),
    ):
        sk_times = []
        for blas in blas_settings():
            with threadpool_limits(limits=blas, user_api="blas"):
                t, sk = best_of(partial(run_sklearn, x, resp, tol_sk, max_iter), repeats)
            sk_times.append(t)
        t_ours, (guide, result) = best_of(
            partial(run_ours, xt, resp_t, tol_ours, max_iter), repeats
        )
        gap = float(np.abs(guide.weights_.numpy() - sk.weights_).max())
        yield label, t_ours, min(sk_times), result.n_iter, sk.n_iter_, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 20,000 (smoke run)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats per row (best)")
    args = parser.parse_args()
    n = 20_000 if args.quick else 200_000
    torch.set_num_threads(n_cores())
    print(
        f"machine: {cpu_model()}, {n_cores()} cores, {platform.python_version()}, torch "
        f"{torch.__version__}; N = {n:,}, K = {K}, full covariances, float64\n"
    )
    print(
        f"{'D':>3}  {'workload':<15} {'elbolab (s)':>11} {'sklearn (s)':>11} {'ratio':>6} "
        f"{'iter':>9}  max |weights gap|"
    )
    for d in (2, 25):
        x = make_data(n, d)
        for label, ours, sk, it_ours, it_sk, gap in bench(x, args.repeats):
            print(
                f"{d:>3}  {label:<15} {ours:>11.2f} {sk:>11.2f} {ours / sk:>6.2f} "
                f"{it_ours:>4}/{it_sk:<4}  {gap:.1e}",
                flush=True,
            )
    print("\nratio = elbolab / scikit-learn (target <= 1); iter = elbolab/scikit-learn")


if __name__ == "__main__":
    main()
