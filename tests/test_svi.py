"""The SVI trainer and the evaluation functions: history, early stopping, warm-up,
checkpoints, divergence, inputs, importance weighting."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from elbolab.datasets import load_digits_split
from elbolab.guides import AmortizedNormal
from elbolab.inference import (
    SVITrainer,
    TrainingDiverged,
    elbo_per_datapoint,
    iwae_log_likelihood,
    latent_means,
    reconstruct,
)
from elbolab.models import VAE


def digits():
    train, val, _ = load_digits_split(seed=0)
    return train.data.float(), val.data.float()


def pair(seed=0, likelihood="binomial"):
    torch.manual_seed(seed)
    count = 16 if likelihood == "binomial" else None
    model = VAE(64, 2, hidden=(32,), likelihood=likelihood, count=count)
    guide = AmortizedNormal(64, 2, hidden=(32,), scale="learned")
    return model, guide


def test_public_surface_and_the_bound_rises():
    x_train, x_val = digits()
    model, guide = pair()
    trainer = SVITrainer(
        model, guide, loss=TraceMeanField_ELBO(), lr=3e-3, batch_size=128, seed=0, progress=False
    )
    result = trainer.fit(x_train, epochs=8, x_val=x_val)
    assert len(result.train_bounds) == len(result.val_bounds) == 8 == result.epochs
    assert result.val_bounds[-1] > result.val_bounds[0] + 20  # nats per digit
    assert model.decoder(torch.zeros(5, 2)).shape == (5, 64)
    loc, scale = guide.encoder(x_val[:5])
    assert loc.shape == scale.shape == (5, 2) and bool((scale > 0).all())
    # the trainer's validation bound is the mean per-datapoint ELBO
    per_point = elbo_per_datapoint(model, guide, x_val, num_particles=200, analytic_kl=True)
    assert per_point.shape == (len(x_val),)
    assert float(per_point.mean()) == pytest.approx(trainer.evaluate(x_val), abs=1.0)
    assert latent_means(guide, x_val).shape == (len(x_val), 2)
    assert reconstruct(model, guide, x_val).shape == x_val.shape


def test_seeded_training_is_reproducible():
    x_train, _ = digits()
    runs = []
    for _ in range(2):
        model, guide = pair(1)
        runs.append(
            SVITrainer(model, guide, lr=3e-3, seed=3, progress=False).fit(x_train, 2).train_bounds
        )
    assert runs[0] == runs[1]


def test_iwae_k1_is_the_elbo_estimator_and_grows_with_k():
    """K = 1: with the same random draws the importance-weighted estimate is the
    single-sample ELBO. Larger K: the mean estimate rises (Burda et al.); 300 validation
    digits make the differences far larger than their standard errors."""
    x_train, x_val = digits()
    model, guide = pair(2)
    SVITrainer(model, guide, lr=3e-3, seed=0, progress=False).fit(x_train, 5)
    pyro.set_rng_seed(7)
    k1 = iwae_log_likelihood(model, guide, x_val, num_samples=1)
    pyro.set_rng_seed(7)
    elbo = elbo_per_datapoint(model, guide, x_val, num_particles=1)
    assert torch.allclose(k1, elbo, rtol=1e-6)
    means = [
        float(iwae_log_likelihood(model, guide, x_val, num_samples=K).mean()) for K in (1, 10, 200)
    ]
    assert means[0] < means[1] < means[2]


def test_early_stopping_restores_the_best_epoch():
    x_train, x_val = digits()
    model, guide = pair(3)
    trainer = SVITrainer(model, guide, lr=0.05, seed=0, patience=1, progress=False)
    result = trainer.fit(x_train[:200], epochs=60, x_val=x_val)
    assert result.stopped_early and result.epochs < 60
    best = max(result.val_bounds)
    assert result.val_bounds.index(best) + 1 == result.best_epoch
    pyro.set_rng_seed(0)
    assert trainer.evaluate(x_val) == pytest.approx(best, abs=2.0)  # MC noise of one pass
    with pytest.raises(ValueError, match="early stopping \\(patience\\) needs validation data"):
        trainer.fit(x_train, epochs=1)


def test_kl_warmup_scales_the_kl_term():
    """beta rises linearly; with beta = 0 the training objective has no KL term, so it is
    larger than the beta = 1 bound on the same parameters."""
    x_train, _ = digits()
    model, guide = pair(4)
    trainer = SVITrainer(model, guide, kl_warmup_epochs=4, seed=0, progress=False)
    assert [trainer.beta(e) for e in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert SVITrainer(model, guide, progress=False).beta(1) == 1.0
    batch = x_train[:256]
    from elbolab.inference.svi.trainer import ScaleSite

    with torch.no_grad():
        pyro.set_rng_seed(0)
        warm = -float(trainer.elbo(batch))
        pyro.set_rng_seed(0)
        with ScaleSite("z", 0.0):
            no_kl = -float(trainer.elbo(batch))
    assert no_kl > warm


def test_checkpoint_resume_equals_uninterrupted_training(tmp_path):
    x_train, x_val = digits()
    path = tmp_path / "vae.pt"
    model_a, guide_a = pair(5)
    straight = SVITrainer(model_a, guide_a, seed=0, progress=False)
    straight.fit(x_train, epochs=2)
    straight.fit(x_train, epochs=1)

    model_b, guide_b = pair(5)
    first = SVITrainer(model_b, guide_b, seed=0, checkpoint=path, progress=False)
    first.fit(x_train, epochs=2)
    model_c, guide_c = pair(99)  # different initial weights: everything comes from the file
    resumed = SVITrainer(model_c, guide_c, seed=0, progress=False).load(path)
    assert resumed.history.train_bounds == first.history.train_bounds
    resumed.fit(x_train, epochs=1)
    for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.allclose(a, c)
    # the file is loadable without unpickling code
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"model", "guide", "optimizer", "train_bounds", "epochs"}


class NaNAfter(TraceMeanField_ELBO):
    """An ELBO that turns NaN after a number of calls (a divergence, on demand)."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def differentiable_loss(self, model, guide, *args, **kwargs):
        self.calls -= 1
        loss = super().differentiable_loss(model, guide, *args, **kwargs)
        return loss * float("nan") if self.calls < 0 else loss


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_state(tmp_path):
    x_train, _ = digits()
    path = tmp_path / "vae.pt"
    model, guide = pair(6)
    batches_per_epoch = math.ceil(len(x_train) / 128)
    trainer = SVITrainer(
        model, guide, loss=NaNAfter(batches_per_epoch + 3), seed=0, checkpoint=path, progress=False
    )
    with pytest.raises(TrainingDiverged, match="the loss became NaN or infinite in epoch 2"):
        trainer.fit(x_train, epochs=3)
    saved = torch.load(path, weights_only=True)
    assert saved["epochs"] == 1
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all()
        assert torch.equal(value, saved["model"][name])  # in memory = last good checkpoint
    assert not list(tmp_path.glob("*.tmp"))  # no half-written file


def test_accepts_arrays_and_torch_datasets():
    x_train, _ = digits()
    model, guide = pair(7)
    trainer = SVITrainer(model, guide, seed=0, progress=False)
    assert len(trainer.fit(x_train.numpy(), epochs=1).train_bounds) == 1
    labels = torch.zeros(len(x_train))
    dataset = torch.utils.data.TensorDataset(x_train, labels)  # (x, y) items
    assert len(trainer.fit(dataset, epochs=1).train_bounds) == 1


def test_bad_input_errors():
    x_train, _ = digits()
    model, guide = pair(8)
    trainer = SVITrainer(model, guide, progress=False)
    with pytest.raises(ValueError, match="^x has 10 features but the model has data_dim=64; "):
        trainer.fit(np.zeros((5, 10)), epochs=1)
    bad = x_train[:10].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="^x contains NaN or inf; remove or impute"):
        trainer.fit(bad, epochs=1)
    with pytest.raises(
        ValueError, match=r"^the binomial likelihood needs integer counts in 0\.\.16"
    ):
        trainer.fit(x_train[:10] + 1, epochs=1)  # 17 appears
    with pytest.raises(ValueError, match="^x is empty"):
        trainer.fit(torch.zeros(0, 64), epochs=1)
    bern, _ = pair(8, likelihood="bernoulli")
    with pytest.raises(ValueError, match="^the bernoulli likelihood needs binary data"):
        bern.validate_data(x_train[:10])
    with pytest.raises(ValueError, match="^batch_size must be a positive integer, got 0"):
        SVITrainer(model, guide, batch_size=0)
    with pytest.raises(ValueError, match="^latent_dim must be a positive integer, got 0"):
        VAE(64, 0)
    with pytest.raises(ValueError, match="^latent_dim must be a positive integer, got 0"):
        AmortizedNormal(64, 0)
    with pytest.raises(
        ValueError, match=r"^the decoder maps \(2, 2\) to \(2, 10\), expected \(2, 64\)"
    ):
        VAE(64, 2, decoder=torch.nn.Linear(2, 10))
    with pytest.raises(ValueError, match=r"^the encoder cannot take inputs of shape \(batch, 64\)"):
        AmortizedNormal(64, 2, encoder=torch.nn.Linear(10, 2))
    with pytest.raises(ValueError, match="needs the number of trials, e.g. count=16"):
        VAE(64, 2, likelihood="binomial")
