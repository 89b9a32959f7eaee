"""What each process of the distributed tests runs: ``python _distributed_workers.py CASE DIR``.

The test starts one process per rank with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set, as ``torchrun`` would. Each process joins the group, runs ``CASE`` and
saves what it saw to ``DIR/rank{R}.pt`` for the test to compare across ranks.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam

from elbolab.inference import distributed as d


class Regression(PyroModule):
    """y ~ N(x . w + b, 1) for rows (x, y) of shape (B, 4): no latent site, a deterministic ELBO."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = PyroParam(torch.randn(3, generator=g, dtype=torch.float64))
        self.b = PyroParam(torch.zeros((), dtype=torch.float64))
        self.poisoned = False  # set by a test: the loss becomes NaN

    def forward(self, rows: torch.Tensor) -> None:
        x, y = rows[:, :3], rows[:, 3]
        loc = x @ self.w + self.b
        if self.poisoned:
            loc = loc * torch.nan
        with pyro.plate("data", rows.shape[0]):
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)


class NoLatents(PyroModule):
    """The guide of a model without latent sites: it samples nothing."""

    def forward(self, rows: torch.Tensor) -> None:
        return None


def regression_data(n: int = 48) -> torch.Tensor:
    """Rows (x, y), shape (n, 4), float64, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3
    return torch.cat([x, (y + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))[:, None]], 1)


def train_regression(batch_size: int, **kwargs) -> tuple[Regression, dict]:
    """The run the exactness test repeats on one process with twice the batch."""
    model, guide = Regression(), NoLatents()
    if d.rank() == 1:  # a different start: train_svi must begin from rank 0's values
        with torch.no_grad():
            model.w_unconstrained.add_(1.0)
    options = {"elbo": pyro.infer.Trace_ELBO(), "epochs": 3, "lr": 0.05, "seed": 3} | kwargs
    history = d.train_svi(model, guide, regression_data(), batch_size=batch_size, **options)
    return model, history


# ---------------------------------------------------------------------------------- cases
def primitives(out: Path) -> dict:
    r = d.rank()
    seen: dict = {"rank": r, "world_size": d.world_size(), "distributed": d.is_distributed()}
    g = torch.Generator().manual_seed(10 + r)
    tensors = {
        "a": torch.randn(7, generator=g, dtype=torch.float64) * 1e3 + 1 / 3,
        "b": torch.randn(3, 2, generator=g, dtype=torch.float64).t(),  # not contiguous
        "n": torch.tensor([r + 1]),
        "kept": torch.tensor([float(r)]),
    }
    seen["before"] = {k: v.clone() for k, v in tensors.items()}
    returned = d.all_reduce_sum(tensors, skip=("kept",))
    seen["same_dict"] = returned is tensors
    seen["after"] = tensors

    d.agree(None, "a step where nothing failed")
    error = ValueError("row 3 is negative; drop it") if r == 1 else None
    try:
        d.agree(error, "the E-step pass of iteration 3")
    except d.DistributedInputError as caught:
        seen["agree"] = {"message": str(caught), "cause": repr(caught.__cause__)}

    torch.manual_seed(100 + r)  # a different network on every rank
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    d.broadcast_module(net)
    seen["net"] = {k: v.clone() for k, v in net.state_dict().items()}
    seen["digests"] = d.check_in_sync(net)

    odd = torch.nn.Linear(3, 4 + r)  # other shapes on rank 1: an error, not a hang
    try:
        d.broadcast_module(odd)
    except d.DistributedInputError as caught:
        seen["odd"] = str(caught)
    return seen


def svi(out: Path) -> dict:
    model, history = train_regression(batch_size=4)
    seen = {"params": {k: v.clone() for k, v in model.state_dict().items()}, "history": history}

    def poison(epoch: int, _history: dict) -> None:
        if epoch == 1 and d.rank() == 1:
            nan_model.poisoned = True

    nan_model = Regression()
    try:
        d.train_svi(
            nan_model,
            NoLatents(),
            regression_data(),
            elbo=pyro.infer.Trace_ELBO(),
            batch_size=4,
            epochs=3,
            checkpoint=out / "nan.pt",
            callback=poison,
        )
    except ValueError as caught:
        seen["nan"] = {"type": type(caught).__name__, "message": str(caught)}

    # resume: rank 0 reads the checkpoint and sends it; rank 1's path need not exist
    path = out / "resume.pt" if d.rank() == 0 else out / "elsewhere" / "resume.pt"
    train_regression(batch_size=4, epochs=2, checkpoint=path)
    resumed, history = train_regression(batch_size=4, epochs=3, checkpoint=path, resume=True)
    seen["resumed"] = {k: v.clone() for k, v in resumed.state_dict().items()}
    seen["resumed_from"] = history["resumed_from"]

    try:  # one row for two ranks
        d.train_svi(Regression(), NoLatents(), regression_data(1), elbo=pyro.infer.Trace_ELBO())
    except ValueError as caught:
        seen["empty"] = {"type": type(caught).__name__, "message": str(caught)}
    return seen


def lost_peer(out: Path, hang: bool) -> dict:
    """Rank 1 exits (or hangs) after epoch 1; rank 0 reports what it raised, and when."""
    marks: dict = {}

    def leave(epoch: int, _history: dict) -> None:
        marks["epoch_done"] = time.monotonic()
        if epoch == 1 and d.rank() == 1:
            if not hang:
                os._exit(1)
            while not (out / "release").exists():  # silent until rank 0 has given up
                time.sleep(0.05)
            os._exit(1)

    try:
        train_regression(batch_size=4, epochs=4, checkpoint=out / "checkpoint.pt", callback=leave)
    except d.RankFailure as caught:
        marks |= {"type": type(caught).__name__, "message": str(caught)}
    marks["raised"] = time.monotonic()
    (out / "release").touch()
    return marks


CASES = {
    "collectives": lambda out: {"primitives": primitives(out), "svi": svi(out)},
    "dead_peer": lambda out: lost_peer(out, hang=False),
    "silent_peer": lambda out: lost_peer(out, hang=True),
}


if __name__ == "__main__":
    case, out, timeout = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    d.init(timeout_s=timeout)
    r = d.rank()
    try:
        result = CASES[case](out)
    finally:
        d.shutdown()
    torch.save(result, out / f"rank{r}.pt")
