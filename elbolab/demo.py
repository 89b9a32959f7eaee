"""The main job: a Gaussian mixture on Old Faithful fitted three ways, then a VAE on digits.

Run it as ``elbolab demo`` (or ``make demo``). It fits a two-component, full-covariance
Gaussian mixture to the standardised Old Faithful data, from a start like PRML Figure 9.8
with

- EM with the closed-form M-step (EM-MIX.2/3),
- EM with the gradient M-step (Pyro's ELBO maximised with the exact guide frozen),
- direct maximisation of log p(x) with z summed out (no guide),

and with scikit-learn's ``GaussianMixture`` from the same start; prints a table and writes
figures into the output folder. Then it trains the VAE of :mod:`elbolab.demo_vae` and fits
PPCA three ways (:mod:`elbolab.demo_ppca`).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from .datasets import load_faithful

#: Iterations whose fit is kept for the figure: PRML Figure 9.8 draws 0, 1, 2, 5 and 20 (and
#: the converged fit); 10 stands in for 20 when EM converges before iteration 21.
SNAPSHOTS = (0, 1, 2, 5, 10, 20)

#: The axis labels of the Old Faithful panels (the data are standardised per feature).
FAITHFUL_AXES = ("eruption duration (standardised)", "waiting time (standardised)")

#: A start in the spirit of PRML Figure 9.8: two round components across the two clusters.
START = {
    "weights": np.array([0.5, 0.5]),
    "means": np.array([[-1.5, 1.0], [1.5, -1.0]]),
    "covariances": np.stack([np.eye(2), np.eye(2)]) * 0.5,
}


def _aligned_gap(a, b) -> float:
    """Largest absolute difference between two fits' parameters, components matched."""
    order_a, order_b = np.argsort(a["means"][:, 0]), np.argsort(b["means"][:, 0])
    return max(
        float(np.abs(np.asarray(a[k])[order_a] - np.asarray(b[k])[order_b]).max())
        for k in ("weights", "means", "covariances")
    )


def _params(model) -> dict[str, np.ndarray]:
    return {
        "weights": model.weights_.numpy().copy(),
        "means": model.means_.numpy().copy(),
        "covariances": model.covariances_.numpy().copy(),
    }


def fit_all(x: torch.Tensor, tol: float = 1e-10, max_iter: int = 500) -> dict:
    """Fit the mixture with every scheme from :data:`START`; returns results and snapshots."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    from .guides import ExactPosterior
    from .inference import EM, DirectML
    from .models import GaussianMixture

    out: dict = {}
    snapshots: dict[int, dict] = {}

    def keep(t, model):
        if t in SNAPSHOTS:
            snapshots[t] = _params(model) | {"resp": model.predict_proba(x).numpy()}

    for name, kwargs in (
        ("EM, closed-form M-step", {"m_step": "closed-form", "callback": keep}),
        ("EM, gradient M-step", {"m_step": "gradient"}),
    ):
        model = GaussianMixture(2, covariance_type="full")
        em = EM(
            model,
            ExactPosterior(model),
            init=START,
            tol=tol,
            max_iter=max_iter,
            reg_covar=0.0,
            **kwargs,
        )
        result = em.fit(x)
        out[name] = {"model": model, "result": result, "params": _params(model)}

    model = GaussianMixture(2, covariance_type="full")
    result = DirectML(model, init=START, tol=tol, max_iter=max_iter, reg_covar=0.0).fit(x)
    out["direct (z summed out)"] = {"model": model, "result": result, "params": _params(model)}

    sk = SkGaussianMixture(
        2,
        covariance_type="full",
        tol=tol,
        max_iter=max_iter,
        reg_covar=0.0,
        weights_init=START["weights"],
        means_init=START["means"],
        precisions_init=np.linalg.inv(START["covariances"]),
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk.fit(x.numpy())
    out["scikit-learn"] = {
        "sk": sk,
        "time": time.perf_counter() - started,
        "n_iter": sk.n_iter_,
        "loglik": float(sk.score(x.numpy())),
        "params": {"weights": sk.weights_, "means": sk.means_, "covariances": sk.covariances_},
    }
    final = out["EM, closed-form M-step"]
    snapshots["final"] = final["params"] | {
        "resp": final["model"].predict_proba(x).numpy(),
        "iteration": final["result"].n_iter,
    }
    out["snapshots"] = snapshots
    return out


def table(fits: dict) -> str:
    """The comparison table as text."""
    reference = fits["EM, closed-form M-step"]["params"]
    sk_ll = fits["scikit-learn"]["loglik"]
    rows = []
    for name in ("EM, closed-form M-step", "EM, gradient M-step", "direct (z summed out)"):
        r = fits[name]["result"]
        rows.append(
            (
                name,
                r.log_likelihood,
                r.n_iter,
                r.fit_time,
                _aligned_gap(fits[name]["params"], reference),
                abs(r.log_likelihood - sk_ll),
            )
        )
    s = fits["scikit-learn"]
    rows.append(
        (
            "scikit-learn GaussianMixture",
            s["loglik"],
            s["n_iter"],
            s["time"],
            _aligned_gap(s["params"], reference),
            0.0,
        )
    )
    head = (
        f"{'scheme':<30} {'mean log p(x)':>14} {'iter':>5} {'time (s)':>9} "
        f"{'|theta - closed form|':>22} {'|loglik - sklearn|':>19}"
    )
    lines = [head, "-" * len(head)]
    for name, ll, it, secs, gap, gap_sk in rows:
        lines.append(f"{name:<30} {ll:>14.10f} {it:>5d} {secs:>9.3f} {gap:>22.2e} {gap_sk:>19.2e}")
    return "\n".join(lines)


def _ellipse(ax, mean, cov, color):
    """The 1-sigma (solid) and 2-sigma (dashed) contours of N(mean, cov), outlined in black."""
    from matplotlib import patheffects
    from matplotlib.patches import Ellipse

    vals, vecs = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(vecs[1, -1], vecs[0, -1]))
    for n_std, style, lw in ((1.0, "-", 2.2), (2.0, "--", 1.3)):
        w, h = 2 * n_std * np.sqrt(vals[::-1])
        outline = [patheffects.Stroke(linewidth=lw + 1.6, foreground="black"), patheffects.Normal()]
        ax.add_patch(
            Ellipse(
                mean,
                w,
                h,
                angle=angle,
                fill=False,
                color=color,
                lw=lw,
                ls=style,
                path_effects=outline,
            )
        )


def shown_iterations(snapshots: dict) -> list:
    """The panels of the iterations figure: five kept iterations before convergence, then it.

    PRML Figure 9.8's 0, 1, 2, 5 and 20 when EM runs past iteration 20; 0, 1, 2, 5 and 10
    when it converges sooner (20 is then the converged fit itself, or never reached).
    """
    last = snapshots["final"]["iteration"]
    kept = [t for t in SNAPSHOTS if t in snapshots and t < last]
    if len(kept) > 5:
        kept.remove(10)
    return [*kept, "final"]


def _iteration_title(key, snapshots: dict) -> str:
    if key == "final":
        return f"converged (iteration {snapshots['final']['iteration']})"
    return "start (iteration 0)" if key == 0 else f"iteration {key}"


def plot_iterations(x: np.ndarray, snapshots: dict, path: Path) -> None:
    """Data coloured by responsibility with component ellipses (the PRML Fig. 9.8 layout)."""
    import matplotlib.pyplot as plt

    keys = shown_iterations(snapshots)
    rows = (len(keys) + 2) // 3
    fig, axes = plt.subplots(rows, 3, figsize=(10.5, 4.0 * rows + 0.5), sharex=True, sharey=True)
    axes = np.atleast_2d(axes)
    red, blue = np.array([0.9, 0.15, 0.15]), np.array([0.15, 0.3, 0.95])
    for ax, key in zip(axes.flat, keys, strict=False):
        snap = snapshots[key]
        r = snap["resp"][:, :1]
        colors = r * red + (1 - r) * blue  # red = component 1, blue = component 2
        ax.scatter(x[:, 0], x[:, 1], c=colors, s=10, alpha=0.5, linewidths=0)
        for k, color in enumerate((red, blue)):
            _ellipse(ax, snap["means"][k], snap["covariances"][k], color)
        ax.set_title(_iteration_title(key, snapshots))
        ax.set_xlim(-2.5, 2.5)
        ax.set_ylim(-2.5, 2.5)
        ax.set_aspect("equal")
    for ax in axes.flat[len(keys) :]:
        ax.remove()
    for ax in axes[-1]:
        ax.set_xlabel(FAITHFUL_AXES[0])
    for ax in axes[:, 0]:
        ax.set_ylabel(FAITHFUL_AXES[1])
    fig.suptitle(
        "EM on Old Faithful: points coloured by responsibility (red: component 1, blue: 2),\n"
        "1σ (solid) and 2σ (dashed) ellipses of each component"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_curves(fits: dict, path: Path) -> None:
    """Mean log-likelihood after each E-step and bound after each M-step (EM-TIGHT, EM-MONO)."""
    import matplotlib.pyplot as plt

    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
    em = fits["EM, closed-form M-step"]["result"]
    t = np.arange(len(em.log_likelihoods))
    ax.plot(t, em.log_likelihoods, "o-", ms=3, label="log p(x; θ_t), after the E-step")
    ax.plot(t[1:], em.lower_bounds, "s--", ms=3, label="LB(q_t, θ_t+1), after the M-step")
    g = fits["EM, gradient M-step"]["result"]
    ax.plot(
        np.arange(len(g.log_likelihoods)),
        g.log_likelihoods,
        "^:",
        ms=3,
        label="log p(x), EM with gradient M-step",
    )
    d = fits["direct (z summed out)"]["result"]
    ax.plot(
        np.arange(len(d.log_likelihoods)),
        d.log_likelihoods,
        "x-",
        ms=3,
        alpha=0.7,
        label="log p(x), direct L-BFGS step",
    )
    ax.set_xlabel("iteration t")
    ax.set_ylabel("mean log p(x) or bound (nats per eruption)")
    ax.set_title("EM climbs: log p(x; θ_t) ≤ LB_t ≤ log p(x; θ_t+1)")
    ax.legend(fontsize=8)
    best = em.log_likelihood
    for res, label in ((em, "EM closed form"), (g, "EM gradient"), (d, "direct")):
        gap = best - np.asarray(res.log_likelihoods)
        gap = np.where(gap > 1e-15, gap, np.nan)
        ax_gap.semilogy(np.arange(len(gap)), gap, "o-", ms=3, label=label)
    ax_gap.set_xlabel("iteration t")
    ax_gap.set_ylabel("max log p − log p(x; θ_t) (nats per eruption)")
    ax_gap.set_title("distance to the maximum (log scale)")
    ax_gap.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(out_dir: str | Path = "out/demo", fast: bool = False) -> dict:
    """Fit, print the table, write the figures; returns the fits."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = load_faithful().standardized().data
    print(
        f"Old Faithful: {x.shape[0]} eruptions x {x.shape[1]} features, standardised; "
        "two-component full-covariance Gaussian mixture from a PRML Fig. 9.8-like start.\n"
    )
    fits = fit_all(x, tol=1e-6 if fast else 1e-10, max_iter=100 if fast else 500)
    print(table(fits))
    plot_iterations(x.numpy(), fits["snapshots"], out / "em_iterations.png")
    plot_curves(fits, out / "em_loglik_bound.png")
    print(f"\nFigures written to {out.resolve()}:")
    for name in ("em_iterations.png", "em_loglik_bound.png"):
        print(f"  {out / name}")
    from .demo_vae import run as run_vae

    fits["vae"] = run_vae(out, fast=fast)
    from .demo_ppca import run as run_ppca

    fits["ppca"] = run_ppca(out, fast=fast)
    return fits


class UsageError(ValueError):
    """A bad command line for ``elbolab demo``; its message says what to do."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are raised (one line each), not printed with usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see 'elbolab demo --help'")


def main(argv: list[str] | None = None) -> int:
    """Run ``elbolab demo [--out DIR] [--fast]``; returns the exit status.

    A bad command line or an ``--out`` that cannot be written (an existing file, a path
    under a file, a place this process may not write) is one line on stderr and status 2,
    found before anything is fitted.
    """
    from .inference.distributed.files import check_output_folder

    parser = _Parser(prog="elbolab demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/demo", help="folder for the figures")
    parser.add_argument("--fast", action="store_true", help="looser tolerance, fewer steps")
    try:
        args = parser.parse_args(argv)
        check_output_folder(args.out)
    except ValueError as error:
        print(f"elbolab demo: error: {error}", file=sys.stderr)
        return 2
    run(args.out, args.fast)
    return 0
