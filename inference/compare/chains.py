"""Independent Markov chains run side by side, one process per core.

NUTS on a mixture of a few hundred points spends its time in thousands of gradient
evaluations of a small function, each a few hundred tiny tensor operations: one core is
busy and a second idles. The chains are independent, so :func:`run_chains` runs chain c
in its own process (forked, so the sampler and its potential need no pickling) and
gathers the results in chain order. Each chain seeds itself (``seed + c``), so the draws
are the same as when the chains run one after another -- a test checks it.

Processes are used where they can be forked cheaply and safely (Linux) and at least two
cores are free to this process; elsewhere, or with ``parallel=False``, the chains run in
turn. A chain that raises in its process re-raises the same exception here.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def can_fork() -> bool:
    """Whether chains can run in forked processes here (Linux, with ``fork`` available)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _child(run_one: Callable[[int], Any], chains: list[int], send) -> None:
    """Body of a forked process: run its chains, send back (results, or the error)."""
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the parent reports; a child's stderr may be shared
    # plain pickles (tensors copied into the message): torch's sharing of tensors between
    # processes would hand over file descriptors of a process about to exit
    try:
        send.send_bytes(pickle.dumps(("ok", [(c, run_one(c)) for c in chains])))
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent
        try:
            send.send_bytes(pickle.dumps(("error", error)))
        except Exception:  # the exception does not pickle: send its text
            send.send_bytes(pickle.dumps(("error", RuntimeError(traceback.format_exc()))))
    finally:
        send.close()


def run_chains(
    run_one: Callable[[int], Any], n_chains: int, parallel: bool | None = None
) -> list[Any]:
    """``[run_one(0), ..., run_one(n_chains - 1)]``, the chains spread over processes.

    ``parallel``: ``None`` (default) uses processes where :func:`can_fork` and at least
    two cores are available; ``True`` asks for them (still in turn where forking is not
    possible); ``False`` runs every chain here, one after another. This process runs its
    share of the chains while the others run theirs.
    """
    workers = min(n_chains, available_cores())
    if parallel is False or workers < 2 or not can_fork():
        return [run_one(c) for c in range(n_chains)]
    shares = [list(range(w, n_chains, workers)) for w in range(workers)]
    context = multiprocessing.get_context("fork")
    children = []
    with warnings.catch_warnings():
        # Python >= 3.12 warns that forking a threaded process may deadlock; the child
        # only runs the sampler on its own tensors and exits without touching locks
        warnings.simplefilter("ignore", DeprecationWarning)
        for share in shares[1:]:
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(run_one, share, send), daemon=True)
            process.start()
            send.close()
            children.append((process, receive, share))
    results: dict[int, Any] = {}
    try:
        for c in shares[0]:
            results[c] = run_one(c)
        for process, receive, share in children:
            try:
                status, payload = pickle.loads(receive.recv_bytes())
            except EOFError:
                process.join()
                raise RuntimeError(
                    f"the process running chains {share} ended without a result (exit code "
                    f"{process.exitcode}, e.g. killed for memory); run with parallel=False "
                    "to run every chain in this process"
                ) from None
            if status == "error":
                raise payload
            results.update(payload)
    finally:
        for process, receive, _ in children:
            receive.close()
            if process.is_alive():
                process.terminate()
            process.join()
    return [results[c] for c in range(n_chains)]
