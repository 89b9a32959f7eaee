"""The VAE part of the main job: a 2-D latent VAE on scikit-learn's digits.

The model is ``VAE(64, 2, likelihood="binomial", count=16)`` (each pixel 0..16 is a
binomial count), the guide ``AmortizedNormal(..., scale="learned")``; Pyro's
``TraceMeanField_ELBO`` (analytic KL, VAE-KL) is maximised by minibatch Adam (SGD).
Written: the bound per epoch (train and validation), the latent means coloured by
digit, reconstructions of test digits, and samples from p(z) p(x | z).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def train(epochs: int = 60, seed: int = 0) -> dict:
    """Train on the digits training split; returns model, guide, result, splits, test IWAE."""
    import pyro

    from .datasets import load_digits_split
    from .guides import AmortizedNormal
    from .inference import SVITrainer, elbo_per_datapoint, iwae_log_likelihood
    from .models import VAE

    torch.manual_seed(seed)
    train_set, val_set, test_set = load_digits_split(seed=seed)
    model = VAE(64, 2, hidden=(128,), likelihood="binomial", count=16)
    guide = AmortizedNormal(64, 2, hidden=(128,), scale="learned")
    trainer = SVITrainer(
        model,
        guide,
        loss=pyro.infer.TraceMeanField_ELBO(),
        lr=3e-3,
        batch_size=128,
        seed=seed,
        patience=10,
    )
    x_test = test_set.data.float()
    result = trainer.fit(train_set.data.float(), epochs=epochs, x_val=val_set.data.float())
    pyro.set_rng_seed(seed)
    elbo = float(
        elbo_per_datapoint(model, guide, x_test, num_particles=10, analytic_kl=True).mean()
    )
    iwae = float(iwae_log_likelihood(model, guide, x_test, num_samples=500).mean())
    return {
        "model": model,
        "guide": guide,
        "result": result,
        "train": train_set,
        "val": val_set,
        "test": test_set,
        "test_elbo": elbo,
        "test_iwae": iwae,
    }


def plot(fit: dict, out: Path) -> list[Path]:
    """Write the four VAE figures into ``out``; returns their paths."""
    import matplotlib.pyplot as plt

    from .inference import latent_means, reconstruct

    model, guide, result = fit["model"], fit["guide"], fit["result"]
    paths = []

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    epochs = np.arange(1, len(result.train_bounds) + 1)
    ax.plot(epochs, result.train_bounds, label="train (minibatch mean)")
    ax.plot(epochs, result.val_bounds, label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("bound per digit (nats)")
    ax.set_title("VAE on digits: the ELBO climbs")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "vae_bound.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    data = torch.cat([fit["train"].data, fit["val"].data, fit["test"].data]).float()
    labels = torch.cat([fit["train"].target, fit["val"].target, fit["test"].target]).numpy()
    mu = latent_means(guide, data).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    scatter = ax.scatter(mu[:, 0], mu[:, 1], c=labels, cmap="tab10", s=6, alpha=0.8)
    ax.legend(*scatter.legend_elements(), title="digit", fontsize=7, loc="best")
    ax.set_xlabel("z₁")
    ax.set_ylabel("z₂")
    ax.set_title("latent means μ_E(x), coloured by digit")
    fig.tight_layout()
    paths.append(out / "vae_latent.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    x = fit["test"].data[:10].float()
    rec = reconstruct(model, guide, x)
    fig, axes = plt.subplots(2, 10, figsize=(10, 2.3))
    for i in range(10):
        axes[0, i].imshow(x[i].reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=16)
        axes[1, i].imshow(rec[i].reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=16)
        axes[0, i].axis("off")
        axes[1, i].axis("off")
    fig.suptitle("test digits (top) and reconstructions E[x | z = μ_E(x)] (bottom)")
    paths.append(out / "vae_reconstructions.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    with torch.no_grad():
        z = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
        means = model.decode(z)
    fig, axes = plt.subplots(2, 10, figsize=(10, 2.3))
    for i, ax in enumerate(axes.flat):
        ax.imshow(means[i].reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=16)
        ax.axis("off")
    fig.suptitle("samples: E[x | z] for z ~ N(0, I)")
    paths.append(out / "vae_samples.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def run(out: Path, fast: bool = False) -> dict:
    """Train, print a summary, write the figures."""
    fit = train(epochs=3 if fast else 60)
    r = fit["result"]
    print(
        f"\nVAE on digits (latent 2, binomial pixels): {r.epochs} epochs in {r.fit_time:.1f} s"
        f"{' (stopped early)' if r.stopped_early else ''}"
    )
    print(f"  bound per digit: train {r.train_bounds[-1]:.2f}, validation {r.val_bounds[-1]:.2f}")
    print(
        f"  test: ELBO {fit['test_elbo']:.2f}, importance-weighted log p(x) (K=500) "
        f"{fit['test_iwae']:.2f} nats per digit"
    )
    for path in plot(fit, out):
        print(f"  {path}")
    return fit
