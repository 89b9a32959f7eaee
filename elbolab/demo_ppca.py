"""The linear-Gaussian part of the main job: PPCA three ways on the wine data.

``PPCA(13, 3)`` on scikit-learn's wine measurements (178 x 13, standardised) is fitted by
the closed form (LG-ML), by EM with the exact Gaussian posterior (LG-EM) and as a linear
VAE (the same model, ``AmortizedNormal`` with no hidden layer, trained by SGD on Pyro's
ELBO). Printed: log-likelihood, bound and their gap for each; written: the log-likelihood
against iterations/epochs for EM and the VAE, with the closed form as the line both reach.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


def since(t0: float) -> float:
    return time.perf_counter() - t0


def fit_three(epochs: int = 600, seed: int = 0) -> dict:
    """Closed form, EM and linear VAE; returns the models, traces and summary rows."""
    from sklearn.datasets import load_wine

    from .guides import AmortizedNormal, ExactGaussianPosterior
    from .inference import EM, SVITrainer, ppca_closed_form
    from .models import PPCA, gaussian_bound

    x = torch.tensor(load_wine().data)
    x = (x - x.mean(0)) / x.std(0)
    rows = []

    t0 = time.perf_counter()
    closed = ppca_closed_form(PPCA(13, 3), x)
    rows.append(
        ("closed form (eigen-decomposition)", closed.score(x), closed.score(x), 1, since(t0))
    )

    t0 = time.perf_counter()
    em_model = PPCA(13, 3)
    guide = ExactGaussianPosterior(em_model)
    em = EM(em_model, guide, tol=1e-10, max_iter=5000, seed=seed, progress=False).fit(x)
    rows.append(
        ("EM, exact Gaussian posterior", em.log_likelihood, em.lower_bound, em.n_iter, since(t0))
    )

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    vae_model = PPCA(13, 3).double()
    vae_guide = AmortizedNormal(13, 3, hidden=(), scale="learned").double()
    trainer = SVITrainer(
        vae_model, vae_guide, lr=3e-2, batch_size=len(x), seed=seed, progress=False
    )
    curve = []
    for _ in range(epochs // 20):
        trainer.fit(x, epochs=20)
        curve.append(vae_model.score(x))
    with torch.no_grad():
        loc, scale = vae_guide.encode(x)
        bound = float(gaussian_bound(vae_model, x, loc, torch.diag_embed(scale.square())).mean())
    rows.append(("linear VAE (amortized guide, SGD)", vae_model.score(x), bound, epochs, since(t0)))
    return {"x": x, "closed": closed, "em": em, "vae_curve": curve, "rows": rows, "epochs": epochs}


def table(fit: dict) -> str:
    best = fit["closed"].score(fit["x"])
    lines = [
        f"{'PPCA(13, 3) on wine':<36}{'mean log p(x)':>15}{'bound':>12}{'gap':>10}"
        f"{'iter':>6}{'time (s)':>10}{'|ll - closed|':>15}",
        "-" * 104,
    ]
    for name, ll, lb, it, seconds in fit["rows"]:
        lines.append(
            f"{name:<36}{ll:>15.8f}{lb:>12.5f}{ll - lb:>10.2e}{it:>6}{seconds:>10.3f}"
            f"{abs(ll - best):>15.2e}"
        )
    return "\n".join(lines)


def log_iteration_axis(ax, last: int) -> None:
    """A log-scale axis of iterations 1..last with plain ticks 1, 2, 5, 10, 20, 50, ..."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

    ticks = [m * 10**e for e in range(len(str(max(last, 1)))) for m in (1, 2, 5)]
    ax.set_xscale("log")
    ax.set_xlim(0.85, last * 1.15)
    ax.xaxis.set_major_locator(FixedLocator([t for t in ticks if t <= last]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot(fit: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    best = fit["closed"].score(fit["x"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ll = np.array(fit["em"].log_likelihoods)
    t = np.arange(1, len(ll))  # iteration 0 (the random start) has no place on a log axis
    axes[0].plot(t, ll[1:], "o-", ms=3, label="EM: log p(x) after each E-step")
    axes[0].axhline(best, color="k", ls="--", lw=0.8, label="closed form")
    log_iteration_axis(axes[0], int(t[-1]))
    axes[0].set_xlabel("EM iteration t (log scale)")
    axes[0].set_ylabel("mean log p(x) per wine (nats)")
    axes[0].set_title(f"EM with the exact posterior (start: {ll[0]:.2f})")
    axes[0].legend()
    epochs = np.arange(1, len(fit["vae_curve"]) + 1) * 20
    axes[1].plot(epochs, fit["vae_curve"], "o-", ms=3, color="C1", label="linear VAE: log p(x)")
    axes[1].axhline(best, color="k", ls="--", lw=0.8, label="closed form")
    axes[1].set_xlabel("SGD epoch (full batch)")
    axes[1].set_ylabel("mean log p(x) per wine (nats)")
    axes[1].set_title("the linear VAE")
    axes[1].set_ylim(best - 1.0, best + 0.1)
    axes[1].legend()
    fig.suptitle("PPCA: EM, the VAE and the closed form reach one maximum")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run(out: Path, fast: bool = False) -> dict:
    """Fit three ways, print the table, write the figure."""
    fit = fit_three(epochs=100 if fast else 600)
    print("\n" + table(fit))
    print(f"  {plot(fit, out / 'ppca_bridge.png')}")
    return fit
