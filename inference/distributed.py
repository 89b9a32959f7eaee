"""Training on several processes with ``torch.distributed``, giving the answers of one process.

Launch with ``torchrun`` (one process per rank); without it the same command runs as a single
process::

    torchrun --nproc_per_node=4 -m elbolab.inference.distributed vae --dataset digits --out vae
    python -m elbolab.inference.distributed em --data x.npy --components 10 --out fit

The file has three parts, read top to bottom:

1. **Primitives**, also used by ``EM(..., distributed=True)``: :func:`init` / :func:`shutdown`,
   :func:`rank` / :func:`world_size`, :func:`all_reduce_sum` (EM's sufficient statistics),
   :func:`agree` (every rank stops together, with one clear message, on bad input),
   :func:`broadcast_module`, :func:`check_in_sync`, and :func:`collective`, which turns a dead
   or silent peer into :class:`RankFailure` naming the timeout.
2. :func:`train_svi`: minibatch SVI (the VAE, VAE-OBJ) with ``DistributedDataParallel``.
3. The console module (``main``): the ``em`` and ``vae`` subcommands.

Every rank calls the same collectives in the same order. A rank that raises outside a
collective simply exits; its peers then fail in their next collective and raise
:class:`RankFailure` ("see the failing rank's own error above"), at once when the process is
gone, or after the timeout when it hangs.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import sys
import textwrap
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist
from torch import nn

from .svi import TrainingDiverged

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedInputError",
    "RankFailure",
    "agree",
    "all_reduce_sum",
    "broadcast_module",
    "build_parser",
    "check_in_sync",
    "collective",
    "init",
    "is_distributed",
    "main",
    "rank",
    "rank_seed",
    "save_atomic",
    "shutdown",
    "train_svi",
    "world_size",
    "write_json_atomic",
]

DEFAULT_TIMEOUT_S = 120.0
_state: dict[str, float | None] = {"timeout_s": None}  # the timeout init() used, for messages


class DistributedInputError(ValueError):
    """Some rank(s) found bad input; raised on every rank at the same point (see :func:`agree`)."""


class RankFailure(RuntimeError):
    """A collective failed: another rank stopped, or did not answer within the timeout."""


# ---------------------------------------------------------------------------------- primitives
def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when no process group is active)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 when no process group is active)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _timeout_text() -> str:
    timeout = _state["timeout_s"]
    return "the process group's timeout" if timeout is None else f"{timeout:g} s"


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _ranks(count: int) -> str:
    return _plural(count, "rank", "ranks")


def _one_line(error: BaseException, limit: int = 600) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _device() -> torch.device:
    """Where collectives run: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_PEER_MARKERS = (
    "gloo",
    "nccl",
    "connection reset",
    "connection closed",
    "timed out",
    "broken pipe",
)


def _is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is what a backend raises when a peer died or timed out."""
    if isinstance(error, (RankFailure, DistributedInputError)):
        return False
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(
        marker in str(error).lower() for marker in _PEER_MARKERS
    )


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Run collectives; a dead or silent peer becomes :class:`RankFailure` naming ``what``.

    Gloo raises a plain ``RuntimeError`` ("Connection reset by peer" at once when a peer
    process is gone, "Timed out waiting ..." after the timeout when it hangs); other errors
    pass through unchanged.
    """
    try:
        yield
    except RuntimeError as error:
        if not _is_peer_failure(error):
            raise
        raise RankFailure(
            f"rank {rank()}: {what} failed: another rank stopped or did not answer within the "
            f"timeout ({_timeout_text()}); see the failing rank's own error above (or in its "
            "log), fix it and relaunch; raise --timeout if a rank is only slow. "
            f"[{type(error).__name__}: {_one_line(error, 300)}]"
        ) from error


def _coalesced(tensors: list[torch.Tensor], op: Callable[[torch.Tensor], Any]) -> None:
    """Apply the in-place collective ``op`` to one flat buffer per dtype, then copy back."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    device = _device()
    for dtype in sorted(by_dtype, key=str):
        group = by_dtype[dtype]
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        op(flat)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()


def all_reduce_sum(
    tensors: dict[str, torch.Tensor], skip: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Sum every tensor of ``tensors`` (except the names in ``skip``) over ranks, in place.

    Every rank passes the same names with the same shapes and dtypes (any shapes; float64
    is summed in float64). Returns ``tensors``; a no-op on one process.

    Every rank ends with the *same bits*: gloo (like NCCL) sums each element once, on one
    rank, and copies that sum to the others, so ranks never drift apart. The order of the
    summands differs from a one-process sum, so results match one process to rounding.
    """
    if not is_distributed():
        return tensors
    names = [name for name in sorted(tensors) if name not in skip]
    with collective(f"summing {', '.join(names)} over ranks"):
        _coalesced([tensors[name] for name in names], lambda flat: dist.all_reduce(flat))
    return tensors


def agree(error: BaseException | None, what: str) -> None:
    """Stop every rank together if any rank failed at ``what``.

    Every rank calls ``agree`` at the same point with its own error (or None). If any rank
    failed, every rank raises :class:`DistributedInputError` naming the failing rank(s),
    ``what`` and each original message (which says the fix); a failing rank chains its own
    exception. On one process: re-raises ``error`` itself, if any.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    reports: list[str | None] = [None] * world_size()
    with collective(f"agreeing on {what}"):
        dist.all_gather_object(reports, None if error is None else _one_line(error))
    failed = [(r, message) for r, message in enumerate(reports) if message is not None]
    if not failed:
        return
    by_message: dict[str, list[int]] = {}
    for r, message in failed:
        by_message.setdefault(message, []).append(r)
    ranks = ", ".join(str(r) for r, _ in failed)
    details = "; ".join(
        f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {message}"
        for message, rs in by_message.items()
    )
    raise DistributedInputError(
        f"{what} failed on rank{'s' if len(failed) > 1 else ''} {ranks} of {world_size()} "
        f"(every rank stopped here): {details}"
    ) from error


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer value of ``module`` from rank ``src`` (in place).

    Every rank must hold the same architecture; a rank whose parameter names or shapes
    differ gets a :class:`DistributedInputError` (on every rank) instead of a hang.
    """
    if not is_distributed():
        return
    named = _tensors(module)
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in named]
    layouts: list[Any] = [None] * world_size()
    with collective("comparing module layouts"):
        dist.all_gather_object(layouts, layout)
    odd = [r for r, other in enumerate(layouts) if other != layouts[src]]
    agree(
        ValueError(
            f"this rank's {type(module).__name__} has other parameters than rank {src}'s; "
            "build the same model (same options, same data dimensions) on every rank"
        )
        if rank() in odd
        else None,
        "broadcasting the parameters",
    )
    with collective(f"broadcasting the parameters from rank {src}"):
        _coalesced([t for _, t in named], lambda flat: dist.broadcast(flat, src))


def check_in_sync(module: nn.Module, what: str = "the parameters") -> list[str]:
    """Every rank's SHA-256 digest of ``module``'s parameters and buffers, gathered.

    Returns the list (one digest per rank, all equal); raises ``RuntimeError`` on every
    rank if they differ (the ranks diverged: a bug, not a data problem).
    """
    digest = hashlib.sha256()
    for name, t in _tensors(module):
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digests = [digest.hexdigest()]
    if is_distributed():
        digests = [None] * world_size()
        with collective(f"comparing {what} across ranks"):
            dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"{what} differ across ranks (digests {digests}); every rank should hold the same "
            "values after each step: check that every rank runs the same code and options"
        )
    return digests


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the default process group from torchrun's environment, if there is one.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; without
    them nothing happens (one process). ``backend``: ``"nccl"`` when CUDA is available, else
    ``"gloo"``, unless given. ``timeout_s`` bounds every collective (and the rendezvous).
    Returns True if a group with more than one rank is active. Calling it again is a no-op.
    """
    if not timeout_s > 0:
        raise ValueError(f"the timeout must be positive (seconds), got {timeout_s!r}")
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return is_distributed()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _state["timeout_s"] = float(timeout_s)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    with collective(f"joining the process group at {where}"):
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return is_distributed()


def shutdown() -> None:
    """Leave the process group, if one is active.

    Garbage is collected first: a ``DistributedDataParallel`` wrapper sits in reference
    cycles, and one still alive when the interpreter exits can abort the process
    ("terminate called without an active exception", seen with gloo on torch 2.13).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _state["timeout_s"] = None


def _broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    with collective(f"sending data from rank {src}"):
        dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


# ---------------------------------------------------------------------------------- files
def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in its folder and ``os.replace``.

    Readers see the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def write_json_atomic(obj: Any, path: str | os.PathLike, lines: bool = False) -> None:
    """Write ``obj`` as JSON (or each item of ``obj`` as one JSON line) atomically."""
    text = "".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj, indent=2)
    _atomic_write(path, lambda f: f.write(text.encode()))


def _write_results(files: dict[Any, Callable[[Path], None]], what: str) -> None:
    """Rank 0 writes each file (keys: paths; None is skipped); every rank learns the outcome."""
    error = None
    if rank() == 0:
        try:
            for path, write in files.items():
                if path is not None:
                    write(Path(path))
        except OSError as e:
            error = OSError(
                f"cannot write {e.filename or 'the results'}: {e.strerror or e}; free disk "
                "space or choose another folder"
            )
    agree(error, what)


# ---------------------------------------------------------------------------------- SVI
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
        validate(part if isinstance(part, torch.Tensor) else torch.as_tensor(np.asarray(part)))


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


# ---------------------------------------------------------------------------------- console
PROG = "python -m elbolab.inference.distributed"
FAMILIES = ("gaussian", "bernoulli", "poisson", "categorical")
COVARIANCES = ("full", "tied", "diag", "spherical")
LIKELIHOODS = ("gaussian-unit", "gaussian", "bernoulli", "binomial")

DESCRIPTION = """\
Fit a mixture by exact EM (em) or train a VAE by SVI (vae), on one process or many.

Under torchrun every process (rank) reads its share of the data; the ranks sum EM's
sufficient statistics, or average the SVI gradients, with torch.distributed (gloo on CPU,
NCCL on GPUs), so the result is that of one process up to rounding. Without torchrun the
same command runs as one process. The options of each command: COMMAND --help.
"""

EPILOG = """\
launching:
  one process (no torchrun):
    python -m elbolab.inference.distributed em --data x.npy --components 10 --out fit
  one machine, 4 processes:
    torchrun --nproc_per_node=4 -m elbolab.inference.distributed \\
        em --data x.npy --components 10 --out fit
  two machines, 4 processes each (run on both machines, R = 0 on the first and 1 on the
  second; HOST = an address of the first machine that the second can reach):
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=4 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m elbolab.inference.distributed vae --dataset digits --out vae

Rank 0 prints progress and alone writes to --out; the other ranks print only errors,
prefixed with their rank. Exit status: 0 done, 2 bad input or options (every rank stops
with the same one-line message), 1 a rank failed or did not answer within --timeout.
"""


def _number(text: str, kind: type, ok: Callable[[float], bool], what: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < math.inf, "a positive number")


def _nonnegative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < math.inf, "a number >= 0")


HELP = {
    # options of both commands
    "--out": "folder that rank 0 writes the results to (created if missing)",
    "--seed": "seed of the initialisation (for vae also of the batch order and the Monte Carlo "
    "draws); the same on every rank (default: %(default)s)",
    "--timeout": "seconds a rank waits for the others, at start-up and in every collective, "
    "before it stops with an error naming the step (default: %(default)g)",
    "--backend": "torch.distributed backend; auto: nccl when CUDA is available, else gloo "
    "(default: %(default)s)",
    # em
    "em": "Fit a mixture by exact EM. Rank r of W memory-maps --data and fits on rows "
    "[r N / W, (r + 1) N / W); the ranks sum the E-step statistics, so every rank takes the "
    "same M-step. Rank 0 writes DIR/model.pt ({'state_dict', 'meta'}; read it with "
    "torch.load(path, weights_only=True)) and DIR/result.json.",
    "em --data": "the (N, D) data, one sample per row, saved with numpy.save",
    "--components": "number of mixture components",
    "--family": "component family: gaussian (real values), bernoulli (0/1 entries), poisson "
    "(counts), categorical (integer codes 0..C-1) (default: %(default)s)",
    "--covariance": "covariance type of gaussian components (default: %(default)s)",
    "--categories": "number of categories per feature for --family categorical (default: the "
    "largest code in the data, over all ranks, plus one)",
    "--max-iter": "maximum number of EM iterations (default: %(default)s)",
    "--tol": "stop when the mean per-sample bound changes by less than this (default: %(default)g)",
    "--chunk-size": "rows per block of the E-step on each rank, which bounds its memory "
    "(default: %(default)s)",
    # vae
    "vae": "Train a VAE (decoder p(x | z), amortized guide q(z | x)) by minibatch SVI with "
    "DistributedDataParallel: every rank takes --batch-size points per step and the gradients "
    "are averaged, so a step uses W x --batch-size points. After every epoch rank 0 rewrites "
    "DIR/checkpoint.pt and DIR/log.jsonl (one line per epoch) atomically; at the end it "
    "writes DIR/result.json.",
    "--dataset": "a bundled data set: digits = scikit-learn's 8x8 digits (1797 x 64, counts 0..16)",
    "vae --data": "the (N, D) data saved with numpy.save (memory-mapped by every rank)",
    "--epochs": "total number of epochs; with --resume, training continues up to this many "
    "(default: %(default)s)",
    "--batch-size": "points per rank per step (default: %(default)s)",
    "--lr": "Adam's learning rate (default: %(default)g)",
    "--latent-dim": "dimension of the latent z (default: %(default)s)",
    "--hidden": "hidden layer sizes of the encoder and decoder networks, e.g. --hidden 256 128 "
    "(default: 128)",
    "--likelihood": "p(x | z): gaussian-unit = N(mu, I), gaussian = N(mu, diag sigma^2), "
    "bernoulli (0/1 data), binomial (counts 0..--count) (default: binomial for --dataset "
    "digits, gaussian-unit for --data)",
    "--count": "number of trials of the binomial likelihood (default: 16 for digits; "
    "required with --data)",
    "--guide-scale": "q(z | x) = N(mu(x), diag sigma(x)^2) with a learned sigma, or "
    "N(mu(x), I) (default: %(default)s)",
    "--resume": "continue from DIR/checkpoint.pt if it exists (after a failure, or with a "
    "larger --epochs); without it a run starts afresh and overwrites DIR's files",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``em`` and ``vae``, each with the common options (see ``HELP``)."""
    raw = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, metavar="DIR", help=HELP["--out"])
    common.add_argument("--seed", type=int, default=0, help=HELP["--seed"])
    common.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=HELP["--timeout"],
    )
    common.add_argument(
        "--backend", choices=("auto", "gloo", "nccl"), default="auto", help=HELP["--backend"]
    )
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=raw
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shared = {"parents": [common], "formatter_class": raw, "epilog": EPILOG}
    em = sub.add_parser(
        "em", help="fit a mixture by exact EM", description=textwrap.fill(HELP["em"]), **shared
    )
    em.add_argument("--data", required=True, type=Path, metavar="FILE.npy", help=HELP["em --data"])
    em.add_argument(
        "--components", required=True, type=_positive_int, metavar="K", help=HELP["--components"]
    )
    em.add_argument("--family", choices=FAMILIES, default="gaussian", help=HELP["--family"])
    em.add_argument("--covariance", choices=COVARIANCES, default="full", help=HELP["--covariance"])
    em.add_argument("--categories", type=_positive_int, metavar="C", help=HELP["--categories"])
    em.add_argument("--max-iter", type=_positive_int, default=100, help=HELP["--max-iter"])
    em.add_argument("--tol", type=_nonnegative_float, default=1e-3, help=HELP["--tol"])
    em.add_argument(
        "--chunk-size", type=_positive_int, default=65536, metavar="ROWS", help=HELP["--chunk-size"]
    )

    vae = sub.add_parser(
        "vae", help="train a VAE by SVI", description=textwrap.fill(HELP["vae"]), **shared
    )
    source = vae.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=("digits",), help=HELP["--dataset"])
    source.add_argument("--data", type=Path, metavar="FILE.npy", help=HELP["vae --data"])
    vae.add_argument("--epochs", type=_positive_int, default=10, help=HELP["--epochs"])
    vae.add_argument("--batch-size", type=_positive_int, default=128, help=HELP["--batch-size"])
    vae.add_argument("--lr", type=_positive_float, default=1e-3, help=HELP["--lr"])
    vae.add_argument(
        "--latent-dim", type=_positive_int, default=2, metavar="K", help=HELP["--latent-dim"]
    )
    vae.add_argument(
        "--hidden", type=_positive_int, nargs="+", default=[128], metavar="H", help=HELP["--hidden"]
    )
    vae.add_argument("--likelihood", choices=LIKELIHOODS, help=HELP["--likelihood"])
    vae.add_argument("--count", type=_positive_int, help=HELP["--count"])
    vae.add_argument(
        "--guide-scale", choices=("learned", "unit"), default="learned", help=HELP["--guide-scale"]
    )
    vae.add_argument("--resume", action="store_true", help=HELP["--resume"])
    return parser


def _say(text: str) -> None:
    if rank() == 0:
        print(text, flush=True)


def _read_npy(path: Path) -> np.ndarray:
    """The (N, D) array in ``path``, memory-mapped; ``ValueError`` with the fix otherwise."""
    try:
        x = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise ValueError(
            f"{path} does not exist; pass an (N, D) array saved with numpy.save"
        ) from None
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot read {path} as a .npy array ({_one_line(error, 200)}); "
            "save the data with numpy.save(path, x)"
        ) from error
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(
            f"{path} holds {shape}, not a 2-D (N, D) array; save one sample per row, "
            "e.g. numpy.save(path, x.reshape(len(x), -1))"
        )
    return x


def _shard(x: np.ndarray, path: Path) -> np.ndarray:
    """This rank's rows [r N / W, (r + 1) N / W) of ``x`` (a view of the memory map)."""
    n, r, w = len(x), rank(), world_size()
    lo, hi = r * n // w, (r + 1) * n // w
    if hi <= lo:
        raise ValueError(
            f"rank {r} has no rows: {path} has {_plural(n, 'row', 'rows')} for {_ranks(w)}; "
            f"pass more rows or launch at most {_plural(n, 'process', 'processes')}"
            if w > 1
            else f"{path} has no rows; pass at least one sample"
        )
    return x[lo:hi]


def _largest_code(shard: np.ndarray, chunk: int = 65_536) -> int:
    """The largest value of ``shard`` over all ranks (for the categorical family)."""
    local = max(float(np.max(shard[i : i + chunk])) for i in range(0, len(shard), chunk))
    error = None if math.isfinite(local) else ValueError("the data contain NaN or inf")
    agree(error, "finding the number of categories")
    largest = torch.tensor([local], dtype=torch.float64)
    if is_distributed():
        with collective("finding the largest category over ranks"):
            _coalesced([largest], lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.MAX))
    return int(largest)


def _mixture(args: argparse.Namespace, shard: np.ndarray) -> nn.Module:
    from ..models import BernoulliMixture, CategoricalMixture, GaussianMixture, PoissonMixture

    k = args.components
    if args.family == "gaussian":
        return GaussianMixture(k, covariance_type=args.covariance)
    if args.family == "bernoulli":
        return BernoulliMixture(k)
    if args.family == "poisson":
        return PoissonMixture(k)
    return CategoricalMixture(k, n_categories=args.categories or _largest_code(shard) + 1)


def _run_em(args: argparse.Namespace) -> None:
    from ..guides import ExactPosterior
    from .em import EM  # here, not at the top: EM itself imports this module

    shard, error = None, None
    try:
        x = _read_npy(args.data)
        shard = _shard(x, args.data)
    except ValueError as e:
        error = e
    agree(error, f"reading {args.data}")
    n, d = len(x), x.shape[1]
    model = _mixture(args, shard)
    _say(
        f"EM: {args.family} mixture, K={args.components}, {n} rows x {d} features over "
        f"{_ranks(world_size())}"
    )
    fitter = EM(
        model,
        ExactPosterior(model),
        tol=args.tol,
        max_iter=args.max_iter,
        seed=args.seed,
        chunk_size=args.chunk_size,
        distributed=True,
        progress=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        result = fitter.fit(shard)
    for warning in caught:
        _say(f"warning: {warning.message}")
    digests = check_in_sync(model, "the fitted mixture parameters")
    meta = {
        "family": args.family,
        "n_components": args.components,
        "n_features": d,
        "n_samples": n,
        "covariance_type": args.covariance if args.family == "gaussian" else None,
        "n_categories": getattr(model, "n_categories", None),
        "n_iter": result.n_iter,
        "converged": result.converged,
        "log_likelihood": result.log_likelihood,
        "world_size": world_size(),
    }
    summary = meta | {
        "lower_bound": result.lower_bound,
        "log_likelihoods": result.log_likelihoods,
        "lower_bounds": result.lower_bounds,
        "m_step": result.m_step,
        "fit_time_s": result.fit_time,
        "parameter_digests": digests,
    }
    out = args.out
    state = {"state_dict": model.state_dict(), "meta": meta}
    _write_results(
        {
            out / "model.pt": lambda p: save_atomic(state, p),
            out / "result.json": lambda p: write_json_atomic(summary, p),
        },
        "writing the results",
    )
    _say(
        f"{result.n_iter} iterations ({'converged' if result.converged else 'not converged'}), "
        f"log-likelihood {result.log_likelihood:.6f} per sample; wrote {out}/model.pt and "
        f"{out}/result.json"
    )


def _run_vae(args: argparse.Namespace) -> None:
    from ..datasets import load_digits
    from ..guides import AmortizedNormal
    from ..models import VAE

    if args.dataset == "digits":
        data = load_digits().data  # (1797, 64), counts 0..16
        likelihood, count = args.likelihood or "binomial", args.count or 16
    else:
        data, error = None, None
        try:
            data = _read_npy(args.data)
        except ValueError as e:
            error = e
        agree(error, f"reading {args.data}")
        likelihood, count = args.likelihood or "gaussian-unit", args.count
    torch.manual_seed(args.seed)  # the same start on every rank (rank 0's is broadcast too)
    hidden = tuple(args.hidden)
    model = VAE(
        data.shape[1],
        args.latent_dim,
        hidden=hidden,
        likelihood=likelihood,
        count=count if likelihood == "binomial" else None,
    )
    guide = AmortizedNormal(data.shape[1], args.latent_dim, hidden=hidden, scale=args.guide_scale)
    _say(
        f"VAE: {len(data)} rows x {data.shape[1]} features, {likelihood} likelihood, "
        f"latent {args.latent_dim}, {_ranks(world_size())} x batch {args.batch_size}"
    )
    history = train_svi(
        model,
        guide,
        data,
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        checkpoint=args.out / "checkpoint.pt",
        log=args.out / "log.jsonl",
        resume=args.resume,
        progress=True,
    )
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"options": options | {"likelihood": likelihood, "count": count}} | history
    _write_results(
        {args.out / "result.json": lambda p: write_json_atomic(result, p)}, "writing the results"
    )
    if history["bound"]:
        _say(
            f"bound {history['bound'][-1]:.4f} nats per datum after epoch "
            f"{history['epoch'][-1]}; wrote {args.out}"
        )


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command == "vae" and args.data is not None:
        if args.likelihood == "binomial" and args.count is None:
            parser.error("--likelihood binomial with --data needs --count (trials per entry)")


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit status (see the epilog)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_options(parser, args)
    world, r = int(os.environ.get("WORLD_SIZE", "1") or 1), os.environ.get("RANK", "?")
    label = f"[rank {r}] " if world > 1 else ""
    try:
        init(None if args.backend == "auto" else args.backend, args.timeout)
        if rank() != 0:
            warnings.simplefilter("ignore")  # rank 0 shows the (same) warnings once
        (_run_em if args.command == "em" else _run_vae)(args)
        return 0
    except (ValueError, OSError, ArithmeticError, RankFailure) as error:
        message = _one_line(error, 2000).removeprefix(f"rank {r}: " if label else "")
        print(f"{label}error: {message}", file=sys.stderr, flush=True)
        return 2 if isinstance(error, ValueError) else 1
    except KeyboardInterrupt:
        return 130
    finally:
        shutdown()


if __name__ == "__main__":
    # Run the copy imported as elbolab.inference.distributed, whose classes and timeout the
    # rest of the package (EM) shares, rather than this __main__ copy.
    from elbolab.inference.distributed import main as _main

    raise SystemExit(_main())
