"""The console command: ``python -m elbolab.inference.distributed em|vae``, torchrun or not."""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .collectives import (
    DEFAULT_TIMEOUT_S,
    RankFailure,
    _coalesced,
    _one_line,
    _plural,
    _ranks,
    agree,
    check_in_sync,
    collective,
    init,
    is_distributed,
    rank,
    shutdown,
    world_size,
)
from .files import _write_results, check_output_folder, save_atomic, write_json_atomic
from .training import train_svi

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


def _seed(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")


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
    common.add_argument("--seed", type=_seed, default=0, help=HELP["--seed"])
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


def _npy_dtype(path: Path) -> np.dtype | None:
    """The dtype in the header of the .npy file ``path``, nothing else read; None if unreadable."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(f)
            else:
                return None
    except (OSError, ValueError):
        return None
    return header[2]


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    """``ValueError`` with the fix unless ``dtype`` holds real numbers a fit can use.

    The rule of the models' own data check: booleans, integers and floats of at least 32
    bits; refused are Python objects, structured records, text, complex numbers, float16
    and anything else (dates, raw bytes).
    """
    kind, save = dtype.kind, "numpy.save(path, numpy.asarray(x, dtype=numpy.float64))"
    if dtype.fields is not None:
        raise ValueError(
            f"{path} holds a structured array (fields {', '.join(dtype.names)}), not an "
            "(N, D) array of numbers; save the fields as columns, e.g. numpy.save(path, "
            "numpy.lib.recfunctions.structured_to_unstructured(x))"
        )
    if kind == "O":
        raise ValueError(
            f"{path} holds Python objects (dtype object), which are not read (unsafe to "
            f"unpickle) and are not numbers; save a numeric array, e.g. {save}"
        )
    if kind == "c":
        raise ValueError(
            f"{path} holds complex numbers ({dtype}); save real numbers, e.g. "
            "numpy.save(path, x.real) or numpy.save(path, numpy.abs(x))"
        )
    if kind == "f" and dtype.itemsize < 4:
        raise ValueError(
            f"{path} holds {dtype}, which has too few digits to fit a model; save it as "
            "float32 or float64, e.g. numpy.save(path, x.astype(numpy.float64))"
        )
    if kind in "US":
        raise ValueError(
            f"{path} holds text ({dtype}), not numbers; convert it first, e.g. {save}, or "
            "encode text columns as integers"
        )
    if kind not in "biuf":
        raise ValueError(
            f"{path} holds {dtype} values, not numbers; save real numbers, e.g. {save}"
        )


def _read_npy(path: Path) -> np.ndarray:
    """The (N, D) array in ``path``, memory-mapped; ``ValueError`` with the fix otherwise.

    The dtype is checked from the file's header first, before any data is read.
    """
    dtype = _npy_dtype(path)
    if dtype is not None:
        _check_dtype(path, dtype)
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
    if isinstance(x, np.lib.npyio.NpzFile):
        names = list(x.files)
        x.close()
        raise ValueError(
            f"{path} is a .npz archive (arrays {names}), not one .npy array; save the array "
            "to fit on its own, e.g. numpy.save('x.npy', numpy.load(path)[name])"
        )
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(
            f"{path} holds {shape}, not a 2-D (N, D) array; save one sample per row, "
            "e.g. numpy.save(path, x.reshape(len(x), -1))"
        )
    _check_dtype(path, x.dtype)
    return x


def _check_out(out: Path, files: tuple[str, ...]) -> None:
    """Rank 0 checks that it can write ``files`` into ``out``; every rank learns the outcome.

    Before anything is read or fitted, so that no run's results are lost at the end.
    """
    error = None
    if rank() == 0:
        try:
            check_output_folder(out, files)
        except ValueError as e:
            error = e
    agree(error, f"checking --out {out}")


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
    from ...models import BernoulliMixture, CategoricalMixture, GaussianMixture, PoissonMixture

    k = args.components
    if args.family == "gaussian":
        return GaussianMixture(k, covariance_type=args.covariance)
    if args.family == "bernoulli":
        return BernoulliMixture(k)
    if args.family == "poisson":
        return PoissonMixture(k)
    return CategoricalMixture(k, n_categories=args.categories or _largest_code(shard) + 1)


def _run_em(args: argparse.Namespace) -> None:
    from ...guides import ExactPosterior
    from ..em.loop import EM  # here, not at the top: EM itself imports this package

    _check_out(args.out, ("model.pt", "result.json"))
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
    from ...datasets import load_digits
    from ...guides import AmortizedNormal
    from ...models import VAE

    _check_out(args.out, ("checkpoint.pt", "log.jsonl", "result.json"))
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
    """Combinations the parser cannot see: an option that would be needed, or ignored."""
    if args.command == "em" and args.categories is not None and args.family != "categorical":
        parser.error(
            f"--categories goes with --family categorical, not --family {args.family}; "
            "drop --categories or pass --family categorical"
        )
    if args.command == "vae":
        if args.data is not None and args.likelihood == "binomial" and args.count is None:
            parser.error("--likelihood binomial with --data needs --count (trials per entry)")
        default = "binomial" if args.dataset == "digits" else "gaussian-unit"
        likelihood = args.likelihood or default
        if args.count is not None and likelihood != "binomial":
            parser.error(
                f"--count goes with the binomial likelihood, not {likelihood}; drop --count "
                "or pass --likelihood binomial"
            )


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
