"""Training on several processes with ``torch.distributed``, giving the answers of one process.

Launch with ``torchrun`` (one process per rank); without it the same command runs as a single
process::

    torchrun --nproc_per_node=4 -m elbolab.inference.distributed vae --dataset digits --out vae
    python -m elbolab.inference.distributed em --data x.npy --components 10 --out fit

Four short modules, read in this order:

1. :mod:`.collectives`: :func:`init` / :func:`shutdown`, :func:`rank` / :func:`world_size`,
   :func:`all_reduce_sum` (EM's sufficient statistics), :func:`agree` (every rank stops
   together, with one clear message, on bad input), :func:`broadcast_module`,
   :func:`check_in_sync`, and :func:`collective`, which turns a dead or silent peer into
   :class:`RankFailure` naming the timeout. ``EM(..., distributed=True)`` uses these.
2. :mod:`.files`: atomic writes, so a failure never leaves a half-written checkpoint.
3. :mod:`.training`: :func:`train_svi`, minibatch SVI (the VAE, VAE-OBJ) with
   ``DistributedDataParallel``.
4. :mod:`.console`: :func:`main`, the ``em`` and ``vae`` subcommands (``__main__`` runs it).

Every rank calls the same collectives in the same order. A rank that raises outside a
collective simply exits; its peers then fail in their next collective and raise
:class:`RankFailure` ("see the failing rank's own error above"), at once when the process is
gone, or after the timeout when it hangs.
"""

from .collectives import (
    DEFAULT_TIMEOUT_S,
    DistributedInputError,
    RankFailure,
    agree,
    all_reduce_sum,
    broadcast_module,
    check_in_sync,
    collective,
    init,
    is_distributed,
    rank,
    shutdown,
    world_size,
)
from .console import build_parser, main
from .files import save_atomic, write_json_atomic
from .training import rank_seed, train_svi

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
