"""Benchmark: ``compare`` with its six default schemes on standardised Old Faithful.

Run ``python bench/bench_compare.py`` (a few minutes on 2 idle cores) or ``--quick``
(NUTS and mean-field shortened, a smoke run). One process; the machine and the load from
other processes are printed first, since timings taken on a loaded machine are not usable.

Measured, in one run:

1. ``compare(GaussianMixture(2, "full"), x, seed=0)`` with every default, twice: the
   first call pays the process's one-time imports (ArviZ, with numba where installed, and
   torch's optimizer machinery), the second is what a notebook's next call costs. The
   time of each scheme (the table's own column), the totals, and the quality flags of
   each row (R-hat, ESS, divergences, label switching), so a faster run with worse
   diagnostics shows as such;
2. NUTS's two chains in processes side by side (the default where two cores are free)
   against in turn: the same draws, so only the time differs;
3. the evaluations NUTS and mean-field SVI can use, side by side on the same chains:
   ``potential="recorded"`` (the default: the direct potential and its gradient recorded
   once and replayed by TorchScript), ``"vectorized"`` (the potential Pyro derives from
   the program, written directly and tested equal to it) and ``"enumerated"`` (Pyro's
   own, the program run under enumeration at every leapfrog step); ``elbo="vectorized"``
   against ``elbo="pyro"`` for mean-field. Same seeds, so the runs of each group make the
   same draws to rounding; ratio = time / the first row's.
   ``--defaults`` stops after 1 and 2.

Target: the six defaults in at most 15 s on 2 idle cores, each row with R-hat <= 1.01 or
flagged.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from machine import cpu_model, n_cores

from elbolab.datasets import load_faithful
from elbolab.inference import compare
from elbolab.models import GaussianMixture


def load_from_others() -> float:
    """One-minute load average (cores busy), read before the run."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short chains: a smoke run")
    parser.add_argument("--defaults", action="store_true", help="parts 1 and 2 only")
    args = parser.parse_args()

    load = load_from_others()
    print(
        f"machine: {cpu_model()} | {n_cores()} cores | {platform.platform()} | "
        f"python {platform.python_version()} | torch {torch.__version__} "
        f"({torch.get_num_threads()} threads) | load average before the run {load:.2f}"
    )
    if load > 0.5:
        print("WARNING: other processes are loading this machine; the times below are not usable")

    x = load_faithful().standardized().data
    short = {"num_samples": 20, "warmup_steps": 20} if args.quick else {}
    mf_short = {"svi_steps": 50} if args.quick else {}

    totals = []
    for call in ("first", "second"):
        start = time.perf_counter()
        table = compare(
            GaussianMixture(2, "full"), x, seed=0, options={"nuts": short, "mean-field": mf_short}
        )
        totals.append(time.perf_counter() - start)
        print(f"\n1. compare(GaussianMixture(2, 'full'), x, seed=0), every default, {call} call\n")
        print(table)
    print(
        f"\ntotal {totals[0]:.1f} s in a fresh process (one-time imports included), "
        f"{totals[1]:.1f} s on the next call (target: at most 15 s on 2 idle cores)"
    )

    print("\n2. NUTS's chains side by side in processes against in turn, same draws\n")
    print(f"{'chains':<14} {'time (s)':>9} {'ratio':>7}  log p(x)")
    times = {}
    for parallel in (True, False):
        out = compare(
            GaussianMixture(2, "full"),
            x,
            ["nuts"],
            seed=0,
            reference=None,
            options={"nuts": {**short, "parallel_chains": parallel}},
        )
        row = out.row("nuts")
        times[parallel] = row["time_s"]
        label = "side by side" if parallel else "in turn"
        print(
            f"{label:<14} {row['time_s']:9.2f} {row['time_s'] / times[True]:7.2f}  "
            f"{row['loglik']:.6f}"
        )
    if args.defaults:
        return

    print("\n3. the vectorized evaluations against Pyro's own, same chains\n")
    print(f"{'scheme':<12} {'evaluation':<12} {'time (s)':>9} {'ratio':>7}  log p(x)     flags")
    pairs = (
        ("nuts", "potential", ("recorded", "vectorized", "enumerated"), short),
        ("mean-field", "elbo", ("vectorized", "pyro"), mf_short),
    )
    for scheme, option, values, extra in pairs:
        times = {}
        for value in values:
            out = compare(
                GaussianMixture(2, "full"),
                x,
                [scheme],
                seed=0,
                reference=None,
                options={scheme: {**extra, option: value}},
            )
            row = out.row(scheme)
            times[value] = row["time_s"]
            ratio = times[value] / times[values[0]]
            print(
                f"{scheme:<12} {value:<12} {row['time_s']:9.2f} {ratio:7.2f}  "
                f"{row['loglik']:.6f}  {row['flags'] or '-'}"
            )


if __name__ == "__main__":
    main()
