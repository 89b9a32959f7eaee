"""Training a model and an amortized guide together through Pyro's ELBO (VAE-OBJ, SGD).

    max_{theta, phi} sum_d LB_d(q(z | x_d; phi), theta)

is done by minibatch stochastic gradient ascent (SGD): each step takes a batch S, Pyro's
ELBO gives -(1/|S|) sum_{d in S} LB_d (one Monte Carlo draw of z per datum and particle,
VAE-MC; with ``TraceMeanField_ELBO`` the KL term in closed form, VAE-KL), and the
optimiser steps *up* the bound (the lecture's slide writes a minus sign; the bound is
maximised, so the step follows +gradient -- minimising the loss = -LB does exactly that).

Parameters are module-local, so the ELBO is used as a module (``elbo(model, guide)``)
with a torch optimiser over ``model.parameters()`` and ``guide.parameters()``. By default
that module is a ``CompiledELBO`` (``compiled.py``): the same loss and gradients, recorded
once per batch shape and replayed without Pyro's (or autograd's) per-call bookkeeping.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.poutine.messenger import Messenger
from tqdm.auto import tqdm

from .compiled import CompiledELBO, is_compilable


class ScaleSite(Messenger):
    """Multiply the log-density of one site by ``factor`` (KL warm-up on ``"z"``)."""

    def __init__(self, site: str, factor: float) -> None:
        super().__init__()
        self.site, self.factor = site, factor

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and msg["name"] == self.site:
            msg["scale"] = msg["scale"] * self.factor


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good state was kept."""


@dataclass
class TrainResult:
    """What one ``SVITrainer.fit`` did.

    Attributes
    ----------
    train_bounds:
        Mean per-datapoint bound on the training batches, one value per epoch (during
        KL warm-up, the warmed-up objective with the KL term scaled by beta).
    val_bounds:
        Mean per-datapoint bound on the validation data per epoch (beta = 1), if given.
    epochs:
        Epochs run in this call (after any resumed ones).
    best_epoch:
        Epoch (1-based, counting resumed ones) with the best validation bound, if any.
    stopped_early:
        Whether early stopping ended training.
    fit_time:
        Seconds spent in ``fit``.
    epoch_times:
        Seconds per epoch (training, validation bound and checkpoint).
    """

    train_bounds: list[float] = field(default_factory=list)
    val_bounds: list[float] = field(default_factory=list)
    epochs: int = 0
    best_epoch: int | None = None
    stopped_early: bool = False
    fit_time: float = 0.0
    epoch_times: list[float] = field(default_factory=list)


def _clone(obj):
    """Deep copy of nested dicts, lists and tuples of tensors and numbers.

    ``copy.deepcopy`` does the same at ~20x the cost per tensor, which on a small VAE is a
    sizeable part of an epoch. A state dict's ``_metadata`` (module versions) is kept.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        out = type(obj)((k, _clone(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = _clone(obj._metadata)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_clone(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _as_batches_source(data, validate):
    """A tensor (validated once) or a torch Dataset (validated per batch)."""
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.Tensor):
        return data
    return validate(data)


class SVITrainer:
    """Minibatch training of ``model`` and ``guide`` through a Pyro ELBO.

    Parameters
    ----------
    model, guide:
        Pyro programs that are ``nn.Module`` s (e.g. ``VAE`` and ``AmortizedNormal``), both
        called as ``f(x)``.
    loss:
        A Pyro ELBO: ``TraceMeanField_ELBO()`` (default; analytic KL, VAE-KL) or
        ``Trace_ELBO(num_particles=C)`` (Monte Carlo, VAE-MC), or any other.
    optimizer:
        A ``torch.optim`` class (default ``Adam``) taking ``lr``.
    lr:
        Learning rate.
    batch_size:
        Minibatch size (>= 1); the last batch of an epoch may be smaller.
    seed:
        Seeds Pyro, torch and the batch order.
    kl_warmup_epochs:
        Scale the KL term (the ``"z"`` site) linearly from 0 to 1 over this many epochs.
    patience:
        Stop when the validation bound has not improved for this many epochs and restore
        the best parameters (needs ``x_val``). None: never stop early.
    checkpoint:
        A path: after every epoch, model, guide, optimiser state and history are written
        there atomically (``torch.save``; read back with ``weights_only=True``).
    progress:
        Show a progress bar over epochs (after a second).
    latent_site:
        The site whose KL term the warm-up scales.
    compile:
        Record the ELBO once per batch shape and replay it (:class:`CompiledELBO`) when
        the loss is ``Trace_ELBO`` or ``TraceMeanField_ELBO``: the same loss and the same
        random draws, without Pyro's per-step overhead. Steps that cannot be recorded
        (the first step of each fit, which Pyro validates; KL warm-up epochs; programs
        that branch on tensor values) run through Pyro as usual. False: always as usual.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        guide: torch.nn.Module,
        loss: pyro.infer.ELBO | None = None,
        optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
        lr: float = 1e-3,
        batch_size: int = 128,
        seed: int | None = None,
        kl_warmup_epochs: int = 0,
        patience: int | None = None,
        checkpoint: str | os.PathLike | None = None,
        progress: bool = True,
        latent_site: str = "z",
        compile: bool = True,
    ) -> None:
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if kl_warmup_epochs < 0:
            raise ValueError(f"kl_warmup_epochs must be >= 0, got {kl_warmup_epochs!r}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be a positive integer or None, got {patience!r}")
        self.model, self.guide = model, guide
        self.loss = loss if loss is not None else pyro.infer.TraceMeanField_ELBO()
        # an nn.Module: elbo(x) is the loss, elbo.parameters() those of model and guide
        if compile and is_compilable(self.loss):
            self.elbo = CompiledELBO(self.loss, model, guide)
        else:
            self.elbo = self.loss(model, guide)
        self.lr, self.batch_size, self.seed = lr, int(batch_size), seed
        self.kl_warmup_epochs, self.patience = kl_warmup_epochs, patience
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.progress, self.latent_site = progress, latent_site
        self.optimizer = optimizer(list(self.elbo.parameters()), lr=lr)
        self.history = TrainResult()  # everything so far, across fit calls and resumes
        self._generator = torch.Generator()  # batch order; reseeded every epoch
        if seed is None:
            self._generator.seed()  # a fresh order, not torch's fixed default seed

    # ------------------------------------------------------------------ data
    def _validate(self, x):
        validate = getattr(self.model, "validate_data", None)
        if validate is not None:
            return validate(x)
        return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)

    def _batches(self, data):
        """Shuffled minibatches of a tensor or a Dataset."""
        if isinstance(data, torch.Tensor):
            order = torch.randperm(data.shape[0], generator=self._generator)
            for start in range(0, data.shape[0], self.batch_size):
                yield data[order[start : start + self.batch_size]]
            return
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=True,
            generator=self._generator,
            collate_fn=lambda items: torch.stack(
                [torch.as_tensor(it[0] if isinstance(it, (tuple, list)) else it) for it in items]
            ),
        )
        for batch in loader:
            yield self._validate(batch)

    # ------------------------------------------------------------------ training
    def beta(self, epoch: int) -> float:
        """KL weight in (1-based) ``epoch``: linear warm-up, then 1."""
        if self.kl_warmup_epochs == 0:
            return 1.0
        return min(1.0, epoch / self.kl_warmup_epochs)

    def step(self, batch: torch.Tensor, beta: float = 1.0) -> float:
        """One SGD step on a batch; returns the mean per-datapoint (warmed-up) bound."""
        scale = 1.0 / batch.shape[0]  # the loss per datapoint
        self.optimizer.zero_grad()
        with ScaleSite(self.latent_site, beta) if beta != 1.0 else nullcontext():
            if isinstance(self.elbo, CompiledELBO):
                loss = self.elbo.loss_and_grads(batch, scale=scale)
            else:
                surrogate = self.elbo(batch) * scale
                loss = float(surrogate.detach())
                if math.isfinite(loss):
                    surrogate.backward()
        if not math.isfinite(loss):
            raise TrainingDiverged("non-finite loss")
        self.optimizer.step()  # loss = -LB: descending it is ascending the bound (SGD)
        return -loss

    def _epoch(self, train, beta: float, validate_first: bool) -> float:
        """One pass over the training batches; returns the mean per-datapoint bound.

        Pyro's validation checks the first step of a fit (``validate_first``); later steps
        skip it: the data were checked by ``validate_data`` and the loss is checked in
        ``step``, and unvalidated steps can replay the compiled ELBO.
        """
        total, count = 0.0, 0
        with pyro.validation_enabled(False):
            for batch in self._batches(train):
                if validate_first:
                    with pyro.validation_enabled(True):
                        bound = self.step(batch, beta)
                    validate_first = False
                else:
                    bound = self.step(batch, beta)
                total += bound * batch.shape[0]
                count += batch.shape[0]
        return total / count

    @torch.no_grad()
    def evaluate(self, x, batch_size: int = 1024) -> float:
        """Mean per-datapoint bound on ``x`` with the trainer's ELBO (beta = 1)."""
        x = self._validate(x)  # checked here, so Pyro's per-call checks are not needed
        total = 0.0
        with pyro.validation_enabled(False):
            for start in range(0, x.shape[0], batch_size):
                total += float(self.elbo(x[start : start + batch_size]).detach())
        return -total / x.shape[0]

    def fit(self, x_train, epochs: int = 10, x_val=None) -> TrainResult:
        """Train for ``epochs`` epochs; returns this call's :class:`TrainResult`.

        ``x_train`` and ``x_val`` are tensors, arrays or ``torch.utils.data.Dataset`` s.
        A non-finite loss raises :class:`TrainingDiverged` with the parameters and the
        checkpoint file left at the last completed epoch.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        started = time.perf_counter()
        train = _as_batches_source(x_train, self._validate)
        if isinstance(train, torch.Tensor) and train.shape[0] == 0:
            raise ValueError("x_train is empty; pass at least one sample.")
        val = None if x_val is None else self._validate(x_val)
        if self.patience is not None and val is None:
            raise ValueError("early stopping (patience) needs validation data: pass x_val")
        result = TrainResult()
        done = len(self.history.train_bounds)
        best_val = max(self.history.val_bounds, default=-float("inf"))
        last_good = self._state()
        best_state, since_best = last_good, 0
        validate_first = pyro.infer.util.is_validation_enabled()  # Pyro checks step 1
        bar = tqdm(
            range(done + 1, done + epochs + 1),
            desc="SVI",
            delay=1.0,
            disable=not self.progress,
            leave=False,
        )
        for epoch in bar:
            epoch_started = time.perf_counter()
            if self.seed is not None:
                # every draw depends on (seed, epoch) only: a resumed run repeats exactly
                pyro.set_rng_seed(self.seed * 100_003 + epoch)
                self._generator.manual_seed(self.seed * 100_003 + epoch)
            try:
                bound = self._epoch(train, self.beta(epoch), validate_first=validate_first)
            except TrainingDiverged:
                self._load_state(last_good)
                bar.close()
                raise TrainingDiverged(
                    f"the loss became NaN or infinite in epoch {epoch}; parameters (and the "
                    "checkpoint, if any) are those after the last completed epoch. Lower lr, "
                    "use a KL warm-up, or check the data scale."
                ) from None
            validate_first = False
            result.train_bounds.append(bound)
            last_good = self._state()  # one snapshot per epoch, shared with best_state
            if val is not None:
                result.val_bounds.append(self.evaluate(val))
                if result.val_bounds[-1] > best_val:
                    best_val, best_state, since_best = result.val_bounds[-1], last_good, 0
                    result.best_epoch = epoch
                else:
                    since_best += 1
            self.history.train_bounds.append(result.train_bounds[-1])
            if val is not None:
                self.history.val_bounds.append(result.val_bounds[-1])
            result.epochs += 1
            self.history.epochs += 1
            if self.checkpoint is not None:
                self.save(self.checkpoint)
            result.epoch_times.append(time.perf_counter() - epoch_started)
            self.history.epoch_times.append(result.epoch_times[-1])
            post = {"bound": f"{result.train_bounds[-1]:.4g}"}
            if val is not None:
                post["val"] = f"{result.val_bounds[-1]:.4g}"
            bar.set_postfix(post, refresh=False)
            if self.patience is not None and since_best >= self.patience:
                result.stopped_early = True
                self._load_state(best_state)
                break
        bar.close()
        self.history.best_epoch = result.best_epoch or self.history.best_epoch
        result.fit_time = time.perf_counter() - started
        return result

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        """A copy of model, guide and optimiser state (tensors cloned, containers rebuilt)."""
        return _clone(
            {
                "model": self.model.state_dict(),
                "guide": self.guide.state_dict(),
                "optimizer": self.optimizer.state_dict(),
            }
        )

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.guide.load_state_dict(state["guide"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save(self, path: str | os.PathLike) -> None:
        """Write model, guide, optimiser state and history to ``path`` atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self._state() | {
            "train_bounds": list(self.history.train_bounds),
            "val_bounds": list(self.history.val_bounds),
            "epochs": self.history.epochs,
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)  # never a half-written checkpoint
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load(self, path: str | os.PathLike) -> SVITrainer:
        """Resume from a checkpoint written by :meth:`save` (no code is unpickled)."""
        state = torch.load(path, weights_only=True)
        self._load_state(state)
        self.history = TrainResult(
            list(state["train_bounds"]), list(state["val_bounds"]), int(state["epochs"])
        )
        return self
