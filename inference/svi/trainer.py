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
import pickle
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from ...models.base import check_positive_int
from ...models.vae import _cuda_devices, leaves_unchanged
from .compiled import CompiledELBO, Term, eager_sum_loss_and_grads, is_compilable


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
        Mean per-datapoint bound on the validation data per epoch (beta = 1), if given
        (for a model with a class site, the unlabelled bound -U of M2-U: y summed).
    val_accuracies:
        With validation labels (``fit(..., y_val=...)``): the fraction of validation
        points the guide's classifier gets right, per epoch.
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
    val_accuracies: list[float] = field(default_factory=list)
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


def _epoch_seed(seed: int, epoch: int) -> int:
    """The seed of (1-based) ``epoch`` of a run seeded with ``seed``; epoch 0 draws weights.

    ``(seed * 100_003 + epoch) mod 2**32`` (NumPy's limit), the seeds of rank 0 in
    ``distributed.training.rank_seed``.
    """
    return (seed * 100_003 + epoch) % 2**32


def _check_checkpoint_path(path: Path) -> None:
    """``ValueError`` naming the fix if no file can be written at ``path``.

    A missing parent directory is fine (``save`` creates it); a path that is a directory,
    or lies below a file, or in a directory without write permission, is not.
    """
    if path.is_dir():
        raise ValueError(
            f"checkpoint {str(path)!r} is a directory; pass the path of a file in it, "
            f"e.g. checkpoint={str(path / 'vae.pt')!r}"
        )
    for parent in path.parents:  # nearest first: the first that exists decides
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise ValueError(
                f"checkpoint {str(path)!r} cannot be written: {str(parent)!r} is a file, not "
                "a directory; pass a path in a directory, or move that file away"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(
                f"checkpoint {str(path)!r} cannot be written: no permission to create files "
                f"in {str(parent)!r}; pass a path in a writable directory"
            )
        return


CHECKPOINT_KEYS = ("model", "guide", "optimizer", "train_bounds", "val_bounds", "epochs")
_NOT_OURS = "pass a checkpoint written by SVITrainer.save (or by fit with checkpoint=...)"


def _read_checkpoint(path: Path) -> dict:
    """The dict ``save`` wrote to ``path`` (``weights_only=True``: no code is unpickled).

    ``FileNotFoundError`` if there is no file; one ``ValueError`` naming the file and what
    is wrong for an empty, truncated, corrupt or foreign file, or a torch file that is not
    an ``SVITrainer`` checkpoint.
    """
    if path.is_dir():
        raise ValueError(f"the checkpoint {str(path)!r} is a directory; {_NOT_OURS}")
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}; {_NOT_OURS}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(
            f"the checkpoint {str(path)!r} is empty (0 bytes), so it was never completely "
            f"written; delete it and train again, or {_NOT_OURS}"
        )
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text suggests loading with code execution on; never pass that on
        what = (
            "holds Python objects other than tensors, numbers, strings, lists and dicts "
            "(which are never unpickled here)"
            if is_zip
            else "is not a torch file (its bytes are not the zip archive torch.save writes)"
        )
        raise ValueError(f"the checkpoint {str(path)!r} {what}; {_NOT_OURS}") from None
    except Exception as error:  # EOFError, RuntimeError from the zip reader, KeyError ...
        what = (
            f"is truncated or corrupt ({size} bytes whose zip archive cannot be read)"
            if is_zip
            else "is not a torch file (its bytes are not the zip archive torch.save writes)"
        )
        raise ValueError(
            f"the checkpoint {str(path)!r} {what}: {type(error).__name__}; delete it and train "
            f"again, or {_NOT_OURS}"
        ) from None
    if not isinstance(state, dict) or not set(CHECKPOINT_KEYS) <= set(state):
        found = (
            f"a dict with keys {sorted(map(str, state))}"
            if isinstance(state, dict)
            else (f"a {type(state).__name__}")
        )
        raise ValueError(
            f"the checkpoint {str(path)!r} is a torch file but not an SVITrainer checkpoint: it "
            f"holds {found}, not the keys {list(CHECKPOINT_KEYS)}; {_NOT_OURS}"
        )
    problems = []
    for part in ("model", "guide"):
        entry = state[part]
        if not isinstance(entry, dict) or not all(
            isinstance(v, torch.Tensor) for v in entry.values()
        ):
            problems.append(f"{part!r} is not a state dict of tensors")
    opt = state["optimizer"]
    if (
        not isinstance(opt, dict)
        or not isinstance(opt.get("state"), dict)
        or not isinstance(opt.get("param_groups"), list)
        or not all(isinstance(g, dict) and "params" in g for g in opt["param_groups"])
    ):
        problems.append("'optimizer' is not an optimiser state dict (state, param_groups)")
    for key in ("train_bounds", "val_bounds", "val_accuracies"):
        if key not in state:  # (val_accuracies: written since labels were supported)
            continue
        value = state[key]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            problems.append(f"{key!r} is not a list of numbers")
    if isinstance(state["epochs"], bool) or not isinstance(state["epochs"], int):
        problems.append("'epochs' is not an integer")
    if "optimizer_class" in state and not isinstance(state["optimizer_class"], str):
        problems.append("'optimizer_class' is not a class name")
    if problems:
        raise ValueError(
            f"the checkpoint {str(path)!r} is not a valid SVITrainer checkpoint: "
            f"{'; '.join(problems)}; {_NOT_OURS}"
        )
    return state


def _shape_text(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _check_module_state(path: Path, part: str, saved: dict, module: torch.nn.Module) -> None:
    """``ValueError`` unless ``saved`` has exactly the keys and shapes of ``module``'s state."""
    own = module.state_dict()
    shapes = [
        f"{k!r} has shape {_shape_text(saved[k])} in the checkpoint and {_shape_text(v)} in "
        f"this {part}"
        for k, v in own.items()
        if k in saved and saved[k].shape != v.shape
    ]
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    problems = shapes[:3]
    if missing:
        problems.append(
            f"this {part} has {_keys(missing)} that the checkpoint lacks "
            f"(shapes {', '.join(_shape_text(own[k]) for k in missing[:3])})"
        )
    if extra:
        problems.append(
            f"the checkpoint has {_keys(extra)} that this {part} lacks "
            f"(shapes {', '.join(_shape_text(saved[k]) for k in extra[:3])})"
        )
    if problems:
        raise ValueError(
            f"the checkpoint {str(path)!r} does not fit this trainer's {part}: "
            f"{'; '.join(problems)}. Build the {part} as it was when the checkpoint was "
            "written (the same sizes, hidden layers and options, e.g. the guide's scale), "
            f"or pass a checkpoint of this {part}; nothing was loaded"
        )


def _keys(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"key{'s' if len(keys) > 1 else ''} {shown}"


def _check_optimizer_state(
    path: Path, saved: dict, saved_class: str | None, optimizer: torch.optim.Optimizer
) -> None:
    """``ValueError`` unless ``saved`` is a state of this optimiser's class and parameters."""
    own_class = type(optimizer).__name__
    if saved_class is not None and saved_class != own_class:
        raise ValueError(
            f"the checkpoint {str(path)!r} was written by a trainer with optimizer {saved_class}, "
            f"but this trainer uses {own_class}; their states do not carry over. Resume with "
            f"optimizer={saved_class} (the run it continues), or start a new run; nothing was "
            "loaded"
        )
    own = optimizer.state_dict()
    problems = []
    groups, own_groups = saved["param_groups"], own["param_groups"]
    if len(groups) != len(own_groups):
        problems.append(
            f"it has {len(groups)} parameter groups and this optimiser {len(own_groups)}"
        )
    else:
        for i, (g, o) in enumerate(zip(groups, own_groups, strict=True)):
            if len(g["params"]) != len(o["params"]):
                problems.append(
                    f"parameter group {i} holds {len(g['params'])} parameters in the "
                    f"checkpoint and {len(o['params'])} here"
                )
            lacking = sorted(set(o) - set(g))
            if lacking:
                problems.append(
                    f"parameter group {i} lacks the settings {lacking} of {own_class} "
                    "(written by another optimiser?)"
                )
    if not problems:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ids = [i for g in groups for i in g["params"]]  # same lengths, group by group
        index = dict(zip(ids, params, strict=True))
        for i, entry in saved["state"].items():
            if i not in index or not isinstance(entry, dict):
                problems.append(f"its state has an entry {i!r} for no parameter")
                continue
            for name, value in entry.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.dim() > 0
                    and value.shape != index[i].shape
                ):
                    problems.append(
                        f"state {name!r} of parameter {i} has shape {_shape_text(value)} in "
                        f"the checkpoint and the parameter {_shape_text(index[i])} here"
                    )
    if problems:
        raise ValueError(
            f"the checkpoint {str(path)!r} does not fit this trainer's optimizer: "
            f"{'; '.join(problems[:3])}. Build the trainer as the checkpoint's was (the same "
            f"optimizer, model and guide), or pass a checkpoint of this run; nothing was loaded"
        )


def _first_line(error: BaseException) -> str:
    """The first line of an error's text (Pyro appends a table of trace shapes)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _float_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters() if p.is_floating_point()}


def _dtype_names(dtypes: set[torch.dtype]) -> str:
    return "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def _latent_sites(trace) -> list[str]:
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]


def _check_model_and_guide(model: torch.nn.Module, guide: torch.nn.Module) -> list[str] | None:
    """``ValueError`` naming the fix if ``model`` and ``guide`` cannot be trained together.

    Duck-typed: ``data_dim``, ``latent_dim`` and ``latent_site`` are compared where both
    have them, the parameters' dtypes where both have parameters. If both have a
    ``data_dim``, one probe runs them on a (2, data_dim) batch of zeros (the guide, then
    the model replaying its draws), without gradients, hidden from enclosing Pyro
    handlers, and leaving buffers, modes and the random state as they were. Returns the
    model's latent sites found by the probe (None without a probe).
    """
    for attr, what in (("data_dim", "features"), ("latent_dim", "latent dimensions")):
        a, b = getattr(model, attr, None), getattr(guide, attr, None)
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"the model has {attr}={a} but the guide has {attr}={b}; build both for the "
                f"same number of {what}, e.g. the guide with {attr}={a}"
            )
    a, b = getattr(model, "latent_site", None), getattr(guide, "latent_site", None)
    if isinstance(a, str) and isinstance(b, str) and a != b:
        raise ValueError(
            f"the guide samples latent_site={b!r} but the model's latent site is {a!r}; build "
            f"the guide with latent_site={a!r}"
        )
    dm, dg = _float_dtypes(model), _float_dtypes(guide)
    if dm and dg and dm != dg:
        fix = "guide.double()" if torch.float64 in dm else "guide.float()"
        raise ValueError(
            f"the model's parameters are {_dtype_names(dm)} but the guide's are "
            f"{_dtype_names(dg)}; give both one dtype, e.g. {fix}"
        )
    n = getattr(model, "data_dim", None)
    if not isinstance(n, int) or getattr(guide, "data_dim", None) is None:
        return None
    x = torch.zeros(2, n, dtype=next(iter(dm), torch.get_default_dtype()))
    with (
        leaves_unchanged(model, guide),
        torch.no_grad(),
        pyro.poutine.block(),
        pyro.validation_enabled(False),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        try:
            guide_trace = pyro.poutine.trace(guide).get_trace(x)
            model_trace = pyro.poutine.trace(
                pyro.poutine.replay(model, trace=guide_trace)
            ).get_trace(x)
            guide_trace.compute_log_prob()
            model_trace.compute_log_prob()
        except Exception as error:  # a shape or dtype error inside the user's programs
            raise ValueError(
                f"the model and the guide do not run together on a (2, {n}) batch: "
                f"{type(error).__name__}: {_first_line(error)}; build them for the same data "
                "and latent "
                "space (data_dim, latent_dim, latent site and dtype)"
            ) from error
    in_model, in_guide = _latent_sites(model_trace), _latent_sites(guide_trace)
    if sorted(in_model) != sorted(in_guide):
        raise ValueError(
            f"the model's latent sites are {in_model} but the guide samples {in_guide}; the "
            "guide must sample the model's latent sites, under the same names"
        )
    return in_model


class SVITrainer:
    """Minibatch training of ``model`` and ``guide`` through a Pyro ELBO.

    Parameters
    ----------
    model, guide:
        Pyro programs that are ``nn.Module`` s (e.g. ``VAE`` and ``AmortizedNormal``), both
        called as ``f(x)``. They are checked together at construction (``ValueError``
        naming the fix): the same ``data_dim``, ``latent_dim`` and ``latent_site`` where
        both define them, parameters of one dtype, and one probe run on a (2, data_dim)
        batch of zeros that must succeed and sample the same latent sites in both (the
        probe leaves buffers, modes and the random state as they were).
    loss:
        A Pyro ELBO instance: ``TraceMeanField_ELBO()`` (default; analytic KL, VAE-KL) or
        ``Trace_ELBO(num_particles=C)`` (Monte Carlo, VAE-MC), or any other. A model with
        a ``default_loss()`` method brings its own default: ``TraceEnum_ELBO`` for
        :class:`~elbolab.models.SemiSupervisedVAE`, which sums the class exactly.
    optimizer:
        A ``torch.optim`` class (default ``Adam``), or any callable such as
        ``functools.partial(torch.optim.SGD, momentum=0.9)``, called as
        ``optimizer(parameters, lr=lr)``; not an optimiser instance.
    lr:
        Learning rate, a positive number. On :meth:`load` the checkpoint's learning rate
        wins (see ``checkpoint``).
    batch_size:
        Minibatch size (>= 1); the last batch of an epoch may be smaller.
    seed:
        Fixes the whole run, the starting weights included. At the start of the first
        ``fit``, every submodule of the model and then of the guide that has a
        ``reset_parameters()`` method has it called, in ``modules()`` order, under
        torch's generator seeded with ``seed * 100_003`` (mod 2**32), inside
        ``torch.random.fork_rng`` so that the caller's random state is untouched;
        parameters are re-initialised in place, so the optimiser trains the same
        objects (a ``VAE``'s gaussian scale goes back to ones). Before (1-based) epoch
        e, Pyro's and torch's generators and the batch order are seeded with
        ``seed * 100_003 + e`` (mod 2**32). Two runs with the same seed, data and
        options therefore give the same bounds and parameters, whatever the global
        generator did before the modules were built. Not re-drawn: parameters that do
        not require grad (frozen ones are kept as they are); parameters of modules
        without ``reset_parameters`` (they keep the weights they were built with: give
        such a module a ``reset_parameters`` that re-initialises it in place, or pass
        ``warm_start=True``); anything on later ``fit`` calls of the same trainer (they
        continue training), after :meth:`step` or :meth:`load` (resuming continues the
        saved run), or with ``warm_start=True``. ``None``: nothing is re-drawn and every
        draw is fresh.
    warm_start:
        Keep the modules' current weights at the first ``fit`` (a pretrained decoder,
        modules fitted another way); the seed then fixes only the draws of the epochs.
    kl_warmup_epochs:
        Scale the KL term (the latent site) linearly from 0 to 1 over this many epochs.
    patience:
        Stop when the validation bound has not improved for this many epochs and restore
        the best parameters (needs ``x_val``). None: never stop early.
    checkpoint:
        A path: after every epoch, model, guide, optimiser state (with the optimiser's
        class name) and history are written there atomically (``torch.save`` to a
        temporary file in the same directory, then renamed; read back with
        ``weights_only=True``). A path that is a directory or lies below a file is
        refused at construction and again at the start of ``fit``, before any training.
        :meth:`load` restores the optimiser state *including its learning rate*:
        resuming continues the saved run. If this trainer was built with another ``lr``,
        ``load`` warns (``UserWarning``) and uses the checkpoint's (``trainer.lr`` then
        reports it); to change the rate after loading, set ``group["lr"]`` for every
        group in ``trainer.optimizer.param_groups``.
    progress:
        Show a progress bar over epochs (after a second), on a terminal or in a notebook;
        nothing is written where stderr is not a terminal (a log file, a pipe).
    latent_site:
        The site whose KL term the warm-up scales; default the model's ``latent_site``
        attribute, else ``"z"``. It must be one of the model's latent sites.
    alpha:
        With labels (``fit(x, y=labels)``, a model with a class site such as
        :class:`~elbolab.models.SemiSupervisedVAE`): the weight of the classifier term of
        M2-J, J^alpha = sum_l L(x, y) + sum_u U(x) + alpha sum_l -log q(y | x): the weight
        of each labelled point's classification loss against its bound. None (default):
        the paper's rule, alpha = 0.1 N with N the number of training points (labelled or
        not), so that the classifier term keeps its weight as unlabelled data are added.
    compile:
        Record the ELBO once per batch shape and replay it (:class:`CompiledELBO`) when
        the loss is ``Trace_ELBO``, ``TraceMeanField_ELBO`` or ``TraceEnum_ELBO`` (the
        discrete guide sites summed by the same contraction Pyro runs): the same loss and the same
        random draws, without Pyro's per-step overhead. Steps that cannot be recorded
        (the first step of each fit, which Pyro validates; KL warm-up epochs; programs
        that branch on tensor values; forward passes that change buffers, like BatchNorm
        in training mode) run through Pyro as usual. The graph replays tensor operations
        only: Python side effects of a ``forward`` (a call counter) happen once per
        recording, so use ``compile=False`` for such programs. False: always as usual.
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
        latent_site: str | None = None,
        compile: bool = True,
        warm_start: bool = False,
        alpha: float | None = None,
    ) -> None:
        batch_size = check_positive_int(
            "batch_size", batch_size, "datapoints per minibatch, e.g. batch_size=128"
        )
        if (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float, np.integer, np.floating))
            or not math.isfinite(lr)
            or not lr > 0
        ):
            raise ValueError(f"lr must be a positive number, got {lr!r}; e.g. lr=1e-3")
        if (
            isinstance(kl_warmup_epochs, bool)
            or not isinstance(kl_warmup_epochs, (int, np.integer))
            or kl_warmup_epochs < 0
        ):
            raise ValueError(
                f"kl_warmup_epochs must be an integer >= 0, got {kl_warmup_epochs!r}; "
                "0 means no warm-up"
            )
        if patience is not None:
            patience = check_positive_int(
                "patience", patience, "epochs without improvement, or None to never stop early"
            )
        if alpha is not None and (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float, np.integer, np.floating))
            or not math.isfinite(alpha)
            or alpha < 0
        ):
            raise ValueError(
                f"alpha must be a number >= 0 or None, got {alpha!r}; e.g. alpha=0.1 * N for N "
                "training points (the paper's rule, what None gives), or 0 for the bound alone"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"seed must be an integer or None, got {seed!r}; e.g. seed=0")
        if loss is not None and not isinstance(loss, pyro.infer.ELBO):
            if isinstance(loss, type) and issubclass(loss, pyro.infer.ELBO):
                raise ValueError(
                    f"loss must be an ELBO instance, got the class {loss.__name__}; create "
                    f"one: loss={loss.__name__}()"
                )
            raise ValueError(
                f"loss must be a pyro.infer.ELBO instance, got {loss!r}; e.g. "
                "loss=pyro.infer.TraceMeanField_ELBO() or Trace_ELBO(num_particles=4)"
            )
        if loss is not None and not callable(getattr(loss, "differentiable_loss", None)):
            fix = (
                "for alpha=0, the importance-weighted bound, use ImportanceWeightedELBO(K)"
                if isinstance(loss, pyro.infer.RenyiELBO)
                else "pass an ELBO with one, e.g. Trace_ELBO()"
            )
            raise ValueError(
                f"{type(loss).__name__} has no differentiable_loss: it backpropagates only "
                "into parameters of Pyro's param store, and this trainer's parameters are "
                f"module-local, so it would train nothing; {fix}"
            )
        if isinstance(optimizer, torch.optim.Optimizer):
            name = type(optimizer).__name__
            raise ValueError(
                f"optimizer must be an optimiser class, got an instance of {name}; pass the "
                f"class, optimizer=torch.optim.{name} (the trainer builds it over the model's "
                "and guide's parameters with lr; other settings via functools.partial)"
            )
        if not callable(optimizer) or (
            isinstance(optimizer, type) and not issubclass(optimizer, torch.optim.Optimizer)
        ):
            raise ValueError(
                f"optimizer must be a torch.optim class, e.g. torch.optim.Adam, got {optimizer!r}"
            )
        sites = _check_model_and_guide(model, guide)
        if latent_site is None:
            latent_site = getattr(model, "latent_site", "z")
        elif sites is not None and latent_site not in sites:
            raise ValueError(
                f"latent_site={latent_site!r} is not a latent site of the model (it has "
                f"{sites}); pass one of those, or leave latent_site unset"
            )
        self.model, self.guide = model, guide
        if loss is None:
            default = getattr(model, "default_loss", None)
            loss = default() if callable(default) else pyro.infer.TraceMeanField_ELBO()
        self.loss = loss
        self.alpha = None if alpha is None else float(alpha)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        if self.checkpoint is not None:
            _check_checkpoint_path(self.checkpoint)
        # an nn.Module: elbo(x) is the loss, elbo.parameters() those of model and guide
        if compile and is_compilable(self.loss):
            self.elbo = CompiledELBO(self.loss, model, guide)
        else:
            self.elbo = self.loss(model, guide)
        self.lr, self.batch_size = float(lr), batch_size
        self.seed = None if seed is None else int(seed)
        self.kl_warmup_epochs, self.patience = int(kl_warmup_epochs), patience
        self.progress, self.latent_site = progress, latent_site
        self.warm_start = bool(warm_start)
        try:
            self.optimizer = optimizer(list(self.elbo.parameters()), lr=self.lr)
        except TypeError as error:
            raise ValueError(
                f"optimizer {optimizer!r} cannot be built as optimizer(parameters, lr=lr) "
                f"({error}); pass a torch.optim class, e.g. torch.optim.Adam"
            ) from error
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer {optimizer!r} built a {type(self.optimizer).__name__}, not a "
                "torch.optim.Optimizer; pass a torch.optim class, e.g. torch.optim.Adam "
                "(pyro.optim wrappers are not torch optimisers)"
            )
        self.history = TrainResult()  # everything so far, across fit calls and resumes
        self._trained = False  # set by the first fit, step or load: no re-draw after it
        self._generator = torch.Generator()  # batch order; reseeded every epoch
        if seed is None:
            self._generator.seed()  # a fresh order, not torch's fixed default seed

    def _draw_initial_weights(self) -> None:
        """Re-draw the starting weights from the seed, in place (see ``seed``)."""
        modules, seen = [], set()
        for root in (self.model, self.guide):
            for m in root.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    modules.append(m)
        params = {id(p): p for m in modules for p in m.parameters(recurse=False)}
        frozen = [(p, p.detach().clone()) for p in params.values() if not p.requires_grad]
        devices, seed = _cuda_devices(self.model, self.guide), _epoch_seed(self.seed, 0)
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.random.default_generator.manual_seed(seed)  # CPU weights
            for d in devices:  # weights on a GPU draw from that device's generator
                with torch.cuda.device(d):
                    torch.cuda.manual_seed(seed)
            for m in modules:
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
            for p, value in frozen:
                p.copy_(value)
        after = {id(p) for m in modules for p in m.parameters(recurse=False)}
        if after != set(params):
            raise ValueError(
                "a reset_parameters() of the model or guide replaced parameter objects "
                "instead of re-initialising them in place, so the optimiser would train "
                "stale copies; write it in place (with torch.no_grad(): p.copy_(...), or "
                "nn.init functions), or pass warm_start=True to keep the current weights"
            )

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
        """One SGD step on a batch; returns the mean per-datapoint (warmed-up) bound.

        The modules are trained as they are: after a ``step`` the seed no longer re-draws
        the starting weights (see ``seed``).
        """
        self._trained = True
        scale = 1.0 / batch.shape[0]  # the loss per datapoint
        self.optimizer.zero_grad()
        with ScaleSite(self.latent_site, beta) if beta != 1.0 else nullcontext():
            loss = self._loss_and_grads((batch,), scale)
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

    # ------------------------------------------------------------------ labels (M2-J)
    def _labels(self, y, n: int, name: str, allow_missing: bool) -> torch.Tensor:
        """Labels checked by the model (``validate_labels``), refused for a model without one."""
        validate = getattr(self.model, "validate_labels", None)
        if validate is None or not callable(getattr(self.guide, "class_logits", None)):
            raise ValueError(
                f"{name} was given, but {type(self.model).__name__} has no class site to "
                "observe (and its guide no classifier q(y | x)); train it without labels, "
                "or use a model with a class, e.g. SemiSupervisedVAE with SemiSupervisedGuide"
            )
        return validate(y, n, name=name, allow_missing=allow_missing)

    def _split_labelled(self, x, y) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_u, x_l, y_l): the unlabelled rows, the labelled rows and their labels."""
        if isinstance(x, torch.utils.data.Dataset) and not isinstance(x, torch.Tensor):
            raise ValueError(
                "labels (y=...) need x_train as one tensor or array, not a Dataset; pass the "
                "data as a tensor with one label per row (-1 where unlabelled)"
            )
        x = self._validate(x)
        labels = self._labels(y, x.shape[0], "y", allow_missing=True)
        observed = labels >= 0
        if not bool(observed.any()):
            raise ValueError(
                "y holds no labels (every entry is -1, unlabelled), so the classifier has "
                "nothing to learn from; pass at least one label, or fit(x) without y"
            )
        return x[~observed], x[observed], labels[observed]

    def _labelled_step(
        self,
        x_u: torch.Tensor | None,
        x_l: torch.Tensor,
        y_l: torch.Tensor,
        counts: tuple[int, int],
        beta: float,
    ) -> float:
        """One SGD step on J^alpha / N (M2-J), estimated from one batch of each kind.

            J^alpha / N ~ (N_u / N) mean_bu(U) + (N_l / N) mean_bl(L + alpha (-log q(y | x)))

        ``counts``: (N_u, N_l), the numbers of unlabelled and labelled training points.
        Returns the sum of the batches' bounds (-U and -L summed over their points).
        """
        self._trained = True
        self.optimizer.zero_grad()
        n = sum(counts)
        terms = []  # summed and differentiated as one recorded graph (sum_loss_and_grads)
        if x_u is not None and x_u.shape[0] > 0:
            terms.append(Term((x_u,), counts[0] / n / x_u.shape[0]))  # -U, per datum of J / N
        if x_l.shape[0] > 0:
            terms.append(Term((x_l, y_l), counts[1] / n / x_l.shape[0]))  # -L
            alpha = self.alpha if self.alpha is not None else 0.1 * n
            # the M2-J term alpha sum_l -log q(y | x), per datum of J / N
            terms.append(Term((x_l, y_l), alpha * counts[1] / n, self._classifier_loss))
        with ScaleSite(self.latent_site, beta) if beta != 1.0 else nullcontext():
            losses = self._sum_loss_and_grads(terms)
        if not all(map(math.isfinite, losses)):
            raise TrainingDiverged("non-finite loss")
        self.optimizer.step()
        # the batches' bounds: -U and -L summed over their points
        return -sum(loss / t.scale for loss, t in zip(losses, terms, strict=True) if t.loss is None)

    def _classifier_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """mean -log q(y | x) over the rows of (x, y): M2-J's classification term per datum."""
        return -self.guide.class_logits(x).gather(-1, y.unsqueeze(-1)).squeeze(-1).mean()

    def _loss_and_grads(self, args: tuple, scale: float) -> float:
        """``scale`` times the ELBO's loss on ``args``, its gradient added to ``.grad``."""
        return self._sum_loss_and_grads([Term(args, scale)])[0]

    def _sum_loss_and_grads(self, terms: list[Term]) -> list[float]:
        """Each term's scaled loss; the gradient of their sum added to ``.grad`` (``Term``)."""
        if isinstance(self.elbo, CompiledELBO):
            return self.elbo.sum_loss_and_grads(terms)
        return eager_sum_loss_and_grads(self.elbo, terms)

    def _loss_value(self, args: tuple) -> float:
        """The ELBO's loss on ``args`` as a float (no gradient)."""
        return float(self.elbo(*args).detach())

    def _labelled_epoch(self, parts, beta: float, validate_first: bool) -> float:
        """One pass over every point, labelled and not; the mean per-datapoint bound J / N.

        Each step takes the next batch of ``batch_size`` unlabelled points and the next
        share of the labelled ones (the labelled set split into as many parts as there
        are unlabelled batches), so every point is seen once per epoch.
        """
        x_u, x_l, y_l = parts
        n_u, n_l = x_u.shape[0], x_l.shape[0]
        n, b = n_u + n_l, self.batch_size
        steps = math.ceil(n_u / b) if n_u else math.ceil(n_l / b)
        order_u = torch.randperm(n_u, generator=self._generator)
        order_l = torch.randperm(n_l, generator=self._generator)
        shares = torch.tensor_split(order_l, steps)
        total = 0.0
        with pyro.validation_enabled(False):
            for i in range(steps):
                batch_u = x_u[order_u[i * b : (i + 1) * b]] if n_u else None
                share = shares[i]
                with pyro.validation_enabled(validate_first):
                    total += self._labelled_step(batch_u, x_l[share], y_l[share], (n_u, n_l), beta)
                validate_first = False
        return total / n

    @torch.no_grad()
    def accuracy(self, x, y) -> float:
        """The fraction of (x, y) whose most probable class under q(y | x) is y."""
        x = self._validate(x)
        labels = self._labels(y, x.shape[0], "y", allow_missing=False)
        return float((self.guide.class_logits(x).argmax(-1) == labels).double().mean())

    @torch.no_grad()
    def evaluate(self, x, batch_size: int = 1024, y=None) -> float:
        """Mean per-datapoint bound on ``x`` with the trainer's ELBO (beta = 1).

        With labels ``y`` (a model with a class site) the labelled bound -L(x, y) (M2-L);
        without, the model's own bound (for M2, -U(x): y summed, M2-U).
        """
        batch_size = check_positive_int("batch_size", batch_size, "datapoints per pass")
        x = self._validate(x)  # checked here, so Pyro's per-call checks are not needed
        labels = None if y is None else self._labels(y, x.shape[0], "y", allow_missing=False)
        total = 0.0
        with pyro.validation_enabled(False):
            for start in range(0, x.shape[0], batch_size):
                args = (x[start : start + batch_size],)
                if labels is not None:
                    args = (*args, labels[start : start + batch_size])
                total += self._loss_value(args)
        return -total / x.shape[0]

    def fit(self, x_train, epochs: int = 10, x_val=None, *, y=None, y_val=None) -> TrainResult:
        """Train for ``epochs`` epochs; returns this call's :class:`TrainResult`.

        ``x_train`` and ``x_val`` are tensors, arrays or ``torch.utils.data.Dataset`` s.
        ``y``: for a model with a class site (:class:`~elbolab.models.SemiSupervisedVAE`),
        one integer label per row of ``x_train``, -1 where unlabelled; training then
        maximises J^alpha of M2-J (see ``alpha``) and ``train_bounds`` is J / N, the mean
        bound per training point. ``y_val``: labels for every row of ``x_val``; the
        classifier's accuracy on them is recorded per epoch, and early stopping
        (``patience``) then watches that accuracy instead of the validation bound.
        A non-finite loss raises :class:`TrainingDiverged` with the parameters and the
        checkpoint file left at the last completed epoch. The inputs and the checkpoint
        path are checked before anything is trained; then, on the first ``fit`` of a
        seeded trainer, the starting weights are re-drawn from the seed (see ``seed``).
        """
        epochs = check_positive_int("epochs", epochs, "the number of passes over x_train")
        started = time.perf_counter()
        if self.checkpoint is not None:
            _check_checkpoint_path(self.checkpoint)
        if y is not None:
            train = self._split_labelled(x_train, y)
        else:
            train = _as_batches_source(x_train, self._validate)
            if isinstance(train, torch.Tensor) and train.shape[0] == 0:
                raise ValueError("x_train is empty; pass at least one sample.")
        val = None if x_val is None else self._validate(x_val)
        if y_val is not None and val is None:
            raise ValueError("y_val labels validation data: pass x_val as well")
        val_labels = None if y_val is None else self._labels(y_val, val.shape[0], "y_val", False)
        if self.patience is not None and val is None:
            raise ValueError("early stopping (patience) needs validation data: pass x_val")
        if not self._trained:
            self._trained = True
            if self.seed is not None and not self.warm_start:
                self._draw_initial_weights()
        result = TrainResult()
        done = len(self.history.train_bounds)
        watched = self.history.val_accuracies if val_labels is not None else self.history.val_bounds
        best_val = max(watched, default=-float("inf"))
        last_good = self._state()
        best_state, since_best = last_good, 0
        validate_first = pyro.infer.util.is_validation_enabled()  # Pyro checks step 1
        bar = tqdm(
            range(done + 1, done + epochs + 1),
            desc="SVI",
            delay=1.0,
            disable=None if self.progress else True,  # (none where stderr is no terminal)
            leave=False,
        )
        for epoch in bar:
            epoch_started = time.perf_counter()
            if self.seed is not None:
                # every draw depends on (seed, epoch) only: a resumed run repeats exactly
                pyro.set_rng_seed(_epoch_seed(self.seed, epoch))
                self._generator.manual_seed(_epoch_seed(self.seed, epoch))
            run_epoch = self._labelled_epoch if isinstance(train, tuple) else self._epoch
            try:
                bound = run_epoch(train, self.beta(epoch), validate_first=validate_first)
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
                self.history.val_bounds.append(result.val_bounds[-1])
                score = result.val_bounds[-1]
                if val_labels is not None:
                    result.val_accuracies.append(self.accuracy(val, val_labels))
                    self.history.val_accuracies.append(result.val_accuracies[-1])
                    score = result.val_accuracies[-1]
                if score > best_val:
                    best_val, best_state, since_best = score, last_good, 0
                    result.best_epoch = epoch
                else:
                    since_best += 1
            self.history.train_bounds.append(result.train_bounds[-1])
            result.epochs += 1
            self.history.epochs += 1
            if self.checkpoint is not None:
                self.save(self.checkpoint)
            result.epoch_times.append(time.perf_counter() - epoch_started)
            self.history.epoch_times.append(result.epoch_times[-1])
            post = {"bound": f"{result.train_bounds[-1]:.4g}"}
            if val is not None:
                post["val"] = f"{result.val_bounds[-1]:.4g}"
            if val_labels is not None:
                post["val acc"] = f"{result.val_accuracies[-1]:.3f}"
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
        """Write model, guide, optimiser state and history to ``path`` atomically.

        The state goes to a temporary file in the same directory, which then replaces
        ``path`` in one rename: a crash or a full disk leaves the previous checkpoint (or
        none), never a half-written one. ``ValueError`` if ``path`` is a directory or lies
        below a file.
        """
        path = Path(path)
        _check_checkpoint_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self._state() | {
            "optimizer_class": type(self.optimizer).__name__,
            "train_bounds": list(self.history.train_bounds),
            "val_bounds": list(self.history.val_bounds),
            "val_accuracies": list(self.history.val_accuracies),
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
        """Resume from a checkpoint written by :meth:`save` (no code is unpickled).

        Everything is checked before anything changes: the file (``FileNotFoundError``
        if missing; ``ValueError`` naming the file if empty, truncated, corrupt or not a
        checkpoint), every key and shape of the model's and the guide's state, the
        optimiser's class and the structure of its state (``ValueError`` naming the part,
        the key and both shapes). On any of these the trainer is left exactly as it was.
        The optimiser state is restored with its learning rate (resuming continues the
        saved run); if it differs from this trainer's ``lr``, a ``UserWarning`` says so
        and ``self.lr`` becomes the checkpoint's. After ``load`` the seed does not re-draw
        the weights. Returns ``self``.
        """
        path = Path(path)
        state = _read_checkpoint(path)
        _check_module_state(path, "model", state["model"], self.model)
        _check_module_state(path, "guide", state["guide"], self.guide)
        _check_optimizer_state(
            path, state["optimizer"], state.get("optimizer_class"), self.optimizer
        )
        before, history = self._state(), self.history
        try:
            self._load_state(state)
            self.history = TrainResult(
                list(state["train_bounds"]),
                list(state["val_bounds"]),
                int(state["epochs"]),
                val_accuracies=list(state.get("val_accuracies", [])),
            )
        except Exception as error:  # not foreseen by the checks: undo, then explain
            self._load_state(before)
            self.history = history
            raise ValueError(
                f"the checkpoint {str(path)!r} does not fit this trainer "
                f"({type(error).__name__}: {error}); build model, guide and optimizer as they "
                "were when it was written; nothing was loaded"
            ) from error
        rates = sorted({float(g["lr"]) for g in self.optimizer.param_groups})
        if rates != [self.lr]:
            saved = rates[0] if len(rates) == 1 else rates
            warnings.warn(
                f"the checkpoint {str(path)!r} was written with lr={saved}, which replaces this "
                f"trainer's lr={self.lr}: resuming continues the saved run. To train on with "
                "another rate, set group['lr'] for every group in trainer.optimizer.param_groups "
                "after load",
                UserWarning,
                stacklevel=2,
            )
            self.lr = rates[0]
        self._trained = True
        return self
