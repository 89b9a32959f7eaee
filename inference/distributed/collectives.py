"""Collectives that every rank calls in the same order, and what happens when one fails.

Used by ``EM(..., distributed=True)`` and by :func:`~elbolab.inference.distributed.train_svi`:
:func:`init` / :func:`shutdown`, :func:`rank` / :func:`world_size`, :func:`all_reduce_sum`
(EM's sufficient statistics), :func:`agree` (every rank stops together, with one clear
message, on bad input), :func:`broadcast_module`, :func:`check_in_sync`, and
:func:`collective`, which turns a dead or silent peer into :class:`RankFailure` naming the
timeout.

A rank that raises outside a collective simply exits; its peers then fail in their next
collective and raise :class:`RankFailure` ("see the failing rank's own error above"), at
once when the process is gone, or after the timeout when it hangs.
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

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
