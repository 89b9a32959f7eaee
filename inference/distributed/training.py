"""Minibatch SVI (the VAE, VAE-OBJ) on every rank: Pyro's ``ELBOModule`` under DDP.

:func:`train_svi` gives each rank a ``DistributedSampler`` shard, a seed of its own, and the
N / B subsample scale; rank 0 alone writes the checkpoint and the JSON-lines log, atomically.
"""

from __future__ import annotations

import gc
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torch import nn

from ..svi.trainer import TrainingDiverged
from .collectives import (
    _broadcast_object,
    _device,
    _one_line,
    _plural,
    _ranks,
    agree,
    all_reduce_sum,
    broadcast_module,
    check_in_sync,
    collective,
    is_distributed,
    rank,
    world_size,
)
from .files import _write_results, save_atomic, write_json_atomic


def rank_seed(seed: int, r: int, epoch: int) -> int:
    """Pyro's seed on rank ``r`` in (1-based) ``epoch``: ``seed * 100_003 + 1000 * r + epoch``.

    Taken mod 2**32 (NumPy's limit). Distinct over ranks and epochs for epochs < 1000; rank
    0 uses the one-process ``SVITrainer``'s seeds.
    """
    return (seed * 100_003 + 1000 * r + epoch) % 2**32


def _rows(data: Any, index: torch.Tensor) -> torch.Tensor:
    """The rows ``index`` of a tensor, an array (memory-mapped too) or a Dataset."""
    if isinstance(data, torch.Tensor):
        return data[index]
    if isinstance(data, np.ndarray):
        return torch.as_tensor(np.asarray(data[index.numpy()]))
    items = [data[int(i)] for i in index]
    return torch.stack(
        [torch.as_tensor(it[0] if isinstance(it, (tuple, list)) else it) for it in items]
    )


def _check_rows(data: Any, validate: Callable | None, chunk: int = 65_536) -> None:
    """Validate this rank's contiguous share of a tensor or array (rows r N / W ...)."""
    if validate is None or not isinstance(data, (torch.Tensor, np.ndarray)):
        return  # a Dataset is validated batch by batch
    n, r, w = len(data), rank(), world_size()
    lo, hi = r * n // w, (r + 1) * n // w
    for start in range(lo, hi, chunk):
        part = data[start : min(start + chunk, hi)]
        validate(part if isinstance(part, torch.Tensor) else torch.from_numpy(np.array(part)))


HISTORY = ("epoch", "bound", "epoch_time_s", "epoch_world_size", "epoch_batch_size")


def _log_lines(history: dict) -> list[dict]:
    """One JSON-lines record per epoch: epoch, bound, time_s, world_size, batch_size."""
    names = ("epoch", "bound", "time_s", "world_size", "batch_size")
    rows = zip(*(history[k] for k in HISTORY), strict=True)
    return [dict(zip(names, row, strict=True)) for row in rows]


def _check_data(model: nn.Module, dataset: Any) -> Callable[[Any], torch.Tensor]:
    """Every rank has data and every row is valid; returns the batch -> tensor conversion."""
    n, r, world = len(dataset), rank(), world_size()
    empty = (
        f"rank {r} gets no data: the data set has {_plural(n, 'row', 'rows')} for "
        f"{_ranks(world)}; pass at least {world} rows or launch at most "
        f"{_plural(max(n, 1), 'process', 'processes')}"
        if world > 1
        else "the data set is empty; pass at least one row"
    )
    agree(ValueError(empty) if r >= n else None, "splitting the data over ranks")
    validate = getattr(model, "validate_data", None)
    error = None
    try:
        _check_rows(dataset, validate)
    except ValueError as e:
        error = e
    agree(error, "checking the data")
    return validate if validate is not None else torch.as_tensor


def _first_evaluation(elbo_module: nn.Module, batch: torch.Tensor, on_device) -> None:
    """Evaluate the ELBO once with Pyro's checks on (this also creates lazy parameters)."""
    error = None
    try:
        with torch.no_grad(), pyro.validation_enabled(True), on_device:
            elbo_module(batch)
    except Exception as e:  # the user's model or guide: every rank must hear about it
        error = ValueError(f"{type(e).__name__}: {_one_line(e)}")
        error.__cause__ = e
    agree(error, "evaluating the ELBO on a first batch")


def _resume(path: Path, model: nn.Module, guide: nn.Module, optimizer) -> dict | None:
    """Rank 0 reads the checkpoint and sends it; every rank loads it. None: no checkpoint."""
    state, error = None, None
    if rank() == 0 and path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            error = ValueError(
                f"cannot read the checkpoint {path} ({_one_line(e, 200)}); delete it to start "
                "afresh"
            )
    agree(error, "reading the checkpoint")
    state = _broadcast_object(state)
    if state is None:
        return None
    error = None
    try:
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
        optimizer.load_state_dict(state["optimizer"])
        history = {k: list(state["history"][k]) for k in HISTORY}
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        error = ValueError(
            f"the checkpoint {path} does not fit this model and guide ({_one_line(e, 300)}); "
            "resume with the options it was written with, or write to a new checkpoint"
        )
    agree(error, "loading the checkpoint")
    return history


def _step(net, optimizer, batch: torch.Tensor, n: int, where: str, on_device) -> torch.Tensor:
    """One SGD step on every rank; returns (sum of per-datum bounds, points, 0) over ranks.

    The loss -(N / B) sum_{d in batch} LB_d is checked on every rank before anyone steps:
    a NaN or infinite loss on any rank raises on every rank, parameters unchanged.
    """
    b = batch.shape[0]
    optimizer.zero_grad()
    with collective(f"the gradient all-reduce of {where}"), on_device:
        with pyro.poutine.scale(scale=n / b):
            loss = net(batch)  # -(N / B) sum_{d in batch} LB_d
        loss.backward()  # DDP averages the gradients over the ranks here
    value = float(loss.detach())
    finite = math.isfinite(value)
    stats = torch.tensor(
        [-value * b / n if finite else 0.0, b, 0.0 if finite else 1.0], dtype=torch.float64
    )
    all_reduce_sum({"stats": stats})  # the same sums on every rank
    if stats[2] > 0:  # some rank's loss is NaN or infinite: nobody steps
        diverged = TrainingDiverged(
            f"the loss became {value} on rank {rank()} in {where}; the checkpoint keeps the "
            "last completed epoch. Lower the learning rate or check the data scale"
        )
        agree(None if finite else diverged, where)
    optimizer.step()  # loss = -LB: descending it ascends the bound
    return stats


def _epoch(net, optimizer, batches: Iterator[torch.Tensor], n: int, epoch: int, on_device) -> float:
    """One pass over this rank's batches; returns the mean per-datum bound over all ranks."""
    totals = torch.zeros(3, dtype=torch.float64)
    with pyro.validation_enabled(False), warnings.catch_warnings():
        # Pyro checked the first batch; a NaN loss is reported on every rank by _step
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
        for step, batch in enumerate(batches, 1):
            totals += _step(net, optimizer, batch, n, f"step {step} of epoch {epoch}", on_device)
    return float(totals[0] / totals[1])


def _save(checkpoint, log, model, guide, optimizer, history: dict) -> None:
    """Rank 0 rewrites the checkpoint and the log (atomically); every rank learns the outcome."""
    epoch = history["epoch"][-1]
    state = {
        "model": model.state_dict(),
        "guide": guide.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
    }
    _write_results(
        {
            checkpoint: lambda p: save_atomic(state, p),
            log: lambda p: write_json_atomic(_log_lines(history), p, lines=True),
        },
        f"writing the checkpoint after epoch {epoch}",
    )


def train_svi(
    model: nn.Module,
    guide: nn.Module,
    dataset: Any,
    *,
    elbo: pyro.infer.ELBO | None = None,
    batch_size: int = 128,
    epochs: int = 10,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    log: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = False,
    callback: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train ``model`` and ``guide`` by minibatch SVI on every rank of the process group.

    The objective is VAE-OBJ, max sum_d LB_d over the N data points. Rank r takes a batch
    of B = ``batch_size`` points (the last of an epoch may be smaller) and the loss

        L_r = -(N / B) sum_{d in batch_r} LB_d       (``poutine.scale(N / B)``, the scale a
                                                     subsampled ``pyro.plate`` would apply)

    an unbiased estimate of -sum_d LB_d. ``DistributedDataParallel`` averages the gradients
    over the W ranks, so every step follows -(N / (W B)) sum_{d in union} grad LB_d, the
    full-data estimate from the union batch of W B points (SGD, with GRAD-DEC and GRAD-ENC
    per datum). With a deterministic ELBO this is, to rounding, one process with batches of
    W B. On one process nothing is wrapped or communicated.

    Parameters
    ----------
    model, guide:
        Pyro programs that are ``nn.Module`` s, both called as ``f(x)`` with x of shape (B, D)
        (e.g. ``VAE`` and ``AmortizedNormal``), parameters module-local.
    dataset:
        A tensor or array (N, D) (a memory-mapped ``.npy`` too), or a ``torch`` Dataset of
        rows. Every rank opens all of it. ``DistributedSampler`` gives rank r the rows
        perm[r::W] of each epoch's permutation (seeded by ``seed + epoch``), repeating a few
        rows when W does not divide N, so that every rank takes the same number of steps.
    elbo:
        Any ``pyro.infer.ELBO``; default ``TraceMeanField_ELBO()`` (analytic KL, VAE-KL).
    batch_size:
        B, points per rank per step (a step uses W B points).
    epochs:
        The *total* number of epochs; a resumed run continues up to it.
    lr:
        Adam's learning rate.
    seed:
        Seeds the batch order and, before epoch e on rank r, Pyro's draws:
        ``pyro.set_rng_seed(seed * 100_003 + 1000 * r + e)`` (:func:`rank_seed`), so ranks
        draw different noise and a resumed run repeats an uninterrupted one.
    checkpoint, log:
        Paths that rank 0 alone rewrites after every epoch, atomically: the checkpoint
        (``model``, ``guide``, ``optimizer`` state dicts, ``epoch``, ``history``; read it with
        ``torch.load(path, weights_only=True)``) and a JSON-lines log, one line per epoch.
        A run that fails leaves both at the last completed epoch.
    resume:
        Continue from ``checkpoint`` if the file exists (rank 0 reads it and sends it to the
        others, so only rank 0 needs the file); otherwise start afresh.
    progress:
        Rank 0 prints one line per epoch.
    callback:
        ``callback(epoch, history)``, on every rank after each epoch.

    Returns
    -------
    The history: ``epoch``, ``bound`` (mean per-datum bound of each epoch's batches over all
    ranks, the same on every rank), ``epoch_time_s``, ``epoch_world_size`` and
    ``epoch_batch_size``, lists that include resumed epochs; and ``fit_time_s``,
    ``resumed_from``, ``world_size``, ``n``, ``batch_size`` and ``parameter_digests`` (one per
    rank, all equal: :func:`check_in_sync`).

    Raises ``ValueError`` on every rank (``DistributedInputError`` on several ranks) before
    training when a rank has no data or a row is invalid, and in training when the loss
    becomes NaN or infinite on any rank (no step is taken; the checkpoint keeps the last
    completed epoch). Any other failure of one rank raises :class:`RankFailure` on the others.
    """
    for name, value in (("batch_size", batch_size), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint path to resume from")
    elbo = pyro.infer.TraceMeanField_ELBO() if elbo is None else elbo
    if not isinstance(elbo, pyro.infer.ELBO):
        raise ValueError(f"elbo must be a pyro.infer.ELBO, e.g. Trace_ELBO(), got {elbo!r}")
    started, r, world, n = time.perf_counter(), rank(), world_size(), len(dataset)
    if is_distributed():
        device = _device()  # under NCCL this rank's GPU
        model.to(device)
        guide.to(device)
    else:
        device = next(iter(model.parameters()), torch.zeros(())).device
    on_device = device if device.type == "cuda" else nullcontext()

    to_tensor = _check_data(model, dataset)
    elbo_module = elbo(model, guide)
    first = torch.arange(r * n // world, min(r * n // world + batch_size, n))
    _first_evaluation(elbo_module, to_tensor(_rows(dataset, first)).to(device), on_device)
    optimizer = torch.optim.Adam(elbo_module.parameters(), lr=lr)
    history: dict = {k: [] for k in HISTORY}
    if resume:
        resumed = _resume(Path(checkpoint), model, guide, optimizer)
        history = resumed or history
        if progress and r == 0:
            print(
                f"resuming after epoch {len(history['epoch'])}"
                if resumed
                else f"no checkpoint at {checkpoint}: starting afresh",
                flush=True,
            )
    done = len(history["epoch"])
    broadcast_module(elbo_module)  # every rank starts from rank 0's values
    net: nn.Module = elbo_module
    if is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        with collective("wrapping the ELBO in DistributedDataParallel"):
            net = nn.parallel.DistributedDataParallel(elbo_module, device_ids=ids)
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=world, rank=r, shuffle=True, seed=seed
    )

    try:
        for epoch in range(done + 1, epochs + 1):
            epoch_started = time.perf_counter()
            sampler.set_epoch(epoch)
            pyro.set_rng_seed(rank_seed(seed, r, epoch))
            order = torch.tensor(list(sampler), dtype=torch.long)  # perm[r::W]
            batches = (
                to_tensor(_rows(dataset, order[start : start + batch_size])).to(device)
                for start in range(0, len(order), batch_size)
            )
            history["bound"].append(_epoch(net, optimizer, batches, n, epoch, on_device))
            history["epoch"].append(epoch)
            history["epoch_time_s"].append(time.perf_counter() - epoch_started)
            history["epoch_world_size"].append(world)
            history["epoch_batch_size"].append(int(batch_size))
            if checkpoint is not None or log is not None:
                _save(checkpoint, log, model, guide, optimizer, history)
            if progress and r == 0:
                print(
                    f"epoch {epoch}/{epochs}: bound {history['bound'][-1]:.4f} nats per datum "
                    f"({history['epoch_time_s'][-1]:.2f} s on {_ranks(world)})",
                    flush=True,
                )
            if callback is not None:
                callback(epoch, history)
    finally:
        if net is not elbo_module:  # the DDP wrapper sits in reference cycles: free it now
            del net  # (see shutdown)
            gc.collect()

    return history | {
        "fit_time_s": time.perf_counter() - started,
        "resumed_from": done,
        "world_size": world,
        "n": n,
        "batch_size": int(batch_size),
        "parameter_digests": check_in_sync(elbo_module, "the model and guide parameters"),
    }
