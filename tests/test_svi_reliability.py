"""The SVI side under stress: checkpoints of other runs, broken files, bad paths, module
state under the compiled ELBO, seeds that fix whole runs, and refusals at construction.

Runs compared for equality do the same arithmetic in the same order, so bounds and
parameters are compared exactly (or at 1e-12 relative in float64, the rounding of a
recorded graph against Pyro's eager ops, as in ``test_compiled.py``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from elbolab.guides import AmortizedNormal
from elbolab.inference import (
    CompiledELBO,
    SVITrainer,
    bound_terms,
    elbo_per_datapoint,
    iwae_log_likelihood,
)
from elbolab.models import VAE

RTOL = 1e-12  # float64: a recorded graph against Pyro's eager ops differs by rounding only
ROOT = Path(__file__).resolve().parents[1]


def counts(n: int = 24, d: int = 6, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Binomial data, 0..16 per entry."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (n, d), generator=g).to(dtype)


def pair(latent=2, hidden=(5,), scale="learned", seed=0, likelihood="binomial"):
    torch.manual_seed(seed)
    count = 16 if likelihood == "binomial" else None
    model = VAE(6, latent, hidden=hidden, likelihood=likelihood, count=count)
    guide = AmortizedNormal(6, latent, hidden=(4,), scale=scale)
    return model, guide


def trainer_for(model, guide, **overrides) -> SVITrainer:
    """A small trainer; eager unless ``compile=True`` (compiling is tested on its own)."""
    options = {"lr": 1e-2, "batch_size": 8, "seed": 0, "progress": False, "compile": False}
    options |= overrides
    return SVITrainer(model, guide, **options)


def snapshot(trainer: SVITrainer):
    """Everything ``load`` could change: parameters, buffers, optimiser state, history."""
    return _copy(
        {
            "model": trainer.model.state_dict(),
            "guide": trainer.guide.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "history": (
                list(trainer.history.train_bounds),
                list(trainer.history.val_bounds),
                trainer.history.epochs,
            ),
            "lr": trainer.lr,
        }
    )


def _copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v) for v in obj)
    return obj


def assert_identical(a, b) -> None:
    """Bit-identical nested structures of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_identical(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_identical(x, y)
    else:
        assert a == b


def trained_checkpoint(path: Path, **options) -> SVITrainer:
    """A trainer after one epoch on ``counts()``, its checkpoint written to ``path``."""
    model_options = {k: options.pop(k) for k in ("latent", "hidden", "scale") if k in options}
    trainer = trainer_for(*pair(**model_options), checkpoint=path, **options)
    trainer.fit(counts(), epochs=1)
    return trainer


# ----------------------------------------------------------------------- 1. load checks
@pytest.mark.parametrize(
    "saved, part, words",
    [
        (
            {"latent": 3},
            "model",
            r"'decoder\.0\.weight' has shape \(5, 3\) in the checkpoint and \(5, 2\) in this "
            r"model",
        ),
        (
            {"hidden": (7,)},
            "model",
            r"'decoder\.0\.weight' has shape \(7, 2\) in the checkpoint and \(5, 2\) in this "
            r"model",
        ),
        (
            {"scale": "unit"},
            "guide",
            r"this guide has keys 'encoder\.body\.0\.weight', .* that the checkpoint lacks "
            r"\(shapes \(4, 6\), \(4,\), \(2, 4\)\); the checkpoint has keys "
            r"'encoder\.0\.weight', .* that this guide lacks \(shapes \(4, 6\), \(4,\), "
            r"\(2, 4\)\)\. Build the guide as",
        ),
    ],
    ids=["latent-size", "hidden-sizes", "guide-scale"],
)
def test_load_of_another_architecture_names_the_part_and_changes_nothing(
    tmp_path, saved, part, words
):
    """Every key and shape is checked before anything is loaded: a checkpoint of another
    architecture raises a ValueError naming the part, the key and both shapes, and the
    trainer's parameters, optimiser state and history stay bit-identical."""
    path = tmp_path / "other.pt"
    trained_checkpoint(path, **saved)
    trainer = trainer_for(*pair(seed=4))
    trainer.fit(counts(seed=2), epochs=1)  # a history and an optimiser state to keep
    before = snapshot(trainer)
    with pytest.raises(ValueError, match=f"does not fit this trainer's {part}: {words}"):
        trainer.load(path)
    assert_identical(snapshot(trainer), before)


def _sgd_momentum(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


@pytest.mark.parametrize(
    "saved, loading, names",
    [
        (functools.partial(torch.optim.SGD, momentum=0.9), torch.optim.Adam, ("SGD", "Adam")),
        (torch.optim.Adam, functools.partial(torch.optim.SGD, momentum=0.9), ("Adam", "SGD")),
    ],
    ids=["sgd-into-adam", "adam-into-sgd"],
)
def test_load_refuses_another_optimizer_class(tmp_path, saved, loading, names):
    """The checkpoint stores the optimiser's class name; resuming with another class is
    refused at load (not with a KeyError at the next step), and nothing changes."""
    path = tmp_path / "run.pt"
    trained_checkpoint(path, optimizer=saved)
    assert torch.load(path, weights_only=True)["optimizer_class"] == names[0]
    trainer = trainer_for(*pair(), optimizer=loading)
    trainer.fit(counts(), epochs=1)
    before = snapshot(trainer)
    written, here = names
    with pytest.raises(
        ValueError,
        match=f"with optimizer {written}, but this trainer uses {here}; .* Resume with "
        f"optimizer={written}",
    ):
        trainer.load(path)
    assert_identical(snapshot(trainer), before)


def test_load_checks_the_optimizer_state_structure(tmp_path):
    """Without a class name (an older file) the settings of the parameter groups are
    compared; a state tensor of the wrong shape is named with both shapes."""
    path = tmp_path / "run.pt"
    trained_checkpoint(path)  # Adam
    state = torch.load(path, weights_only=True)
    del state["optimizer_class"]
    torch.save(state, path)
    sgd = trainer_for(*pair(), optimizer=functools.partial(torch.optim.SGD, momentum=0.9))
    with pytest.raises(
        ValueError,
        match=r"does not fit this trainer's optimizer: parameter group 0 lacks the settings "
        r"\[.*'momentum'.*\] of SGD",
    ):
        sgd.load(path)
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 3)
    torch.save(state, path)
    adam = trainer_for(*pair())
    before = snapshot(adam)
    with pytest.raises(
        ValueError,
        match=r"optimizer: state 'exp_avg' of parameter 0 has shape \(3, 3\) in the checkpoint "
        r"and the parameter \(5, 2\) here",
    ):
        adam.load(path)
    assert_identical(snapshot(adam), before)


def test_resuming_keeps_the_checkpoints_learning_rate_and_says_so(tmp_path):
    """Rule: the checkpoint restores the optimiser state with its lr (resuming continues
    the saved run); a trainer built with another lr warns and reports the saved one.
    The resumed run then equals the uninterrupted run at the saved lr."""
    path = tmp_path / "run.pt"
    straight = trainer_for(*pair(), lr=3e-3)
    straight.fit(counts(), epochs=2)
    trained_checkpoint(path, lr=3e-3)
    resumed = trainer_for(*pair(seed=9), lr=1e-2)
    with pytest.warns(UserWarning, match=r"written with lr=0\.003, which replaces this trainer's"):
        resumed.load(path)
    assert resumed.lr == 3e-3
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [3e-3]
    resumed.fit(counts(), epochs=1)
    assert resumed.history.train_bounds == straight.history.train_bounds
    for a, b in zip(straight.elbo.parameters(), resumed.elbo.parameters(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------- 2. broken files
class Opaque:
    """Not a tensor, number, string, list or dict: never unpickled by ``load``."""


def _write(path: Path, kind: str) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 3)
    elif kind == "truncated":
        trained_checkpoint(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "foreign-dict":
        torch.save({"a": 1}, path)
    elif kind == "list":
        torch.save([1, 2], path)
    elif kind == "objects":
        torch.save({"model": Opaque()}, path)
    elif kind == "bad-entry":
        state = {
            "model": 1,
            "guide": {},
            "optimizer": {"state": {}, "param_groups": []},
            "train_bounds": ["x"],
            "val_bounds": [],
            "epochs": 1,
        }
        torch.save(state, path)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("empty", r"is empty \(0 bytes\), so it was never completely written; delete it"),
        ("garbage", r"is not a torch file \(its bytes are not the zip archive torch\.save"),
        ("truncated", r"is truncated or corrupt \(\d+ bytes whose zip archive cannot be read"),
        ("foreign-dict", r"is a torch file but not an SVITrainer checkpoint: it holds a dict "),
        ("list", r"is a torch file but not an SVITrainer checkpoint: it holds a list"),
        ("objects", r"holds Python objects other than tensors, numbers, strings"),
        ("bad-entry", r"is not a valid SVITrainer checkpoint: 'model' is not a state dict"),
    ],
)
def test_unreadable_checkpoints_raise_one_value_error_naming_the_file(tmp_path, kind, words):
    """Empty, garbage, truncated or foreign files: one ValueError naming the file and what
    is wrong, pointing to SVITrainer.save, never suggesting weights_only=False (still read
    with weights_only=True: the pickled object is refused, not built); nothing changes."""
    path = tmp_path / f"{kind}.pt"
    _write(path, kind)
    trainer = trainer_for(*pair())
    before = snapshot(trainer)
    with pytest.raises(ValueError) as info:
        trainer.load(path)
    message = str(info.value)
    assert message.startswith(f"the checkpoint {str(path)!r} ")
    assert re.search(words, message), message
    assert "written by SVITrainer.save" in message
    assert "weights_only" not in message
    assert_identical(snapshot(trainer), before)


def test_a_missing_checkpoint_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="^no checkpoint at .*; pass a checkpoint"):
        trainer_for(*pair()).load(tmp_path / "none.pt")


# ----------------------------------------------------------------------- 3. paths
def test_checkpoint_paths_that_cannot_be_written_are_refused_before_training(tmp_path):
    """A path below a file, or a directory: refused at construction, and again in fit
    before epoch 1 (the path may have changed since)."""
    blocker = tmp_path / "results"
    blocker.write_text("a file where a directory is needed")
    model, guide = pair()
    with pytest.raises(
        ValueError, match=r"cannot be written: '.*results' is a file, not a directory; pass"
    ):
        SVITrainer(model, guide, checkpoint=blocker / "vae.pt", progress=False)
    with pytest.raises(
        ValueError, match=r"is a directory; pass the path of a file in it, e\.g\. checkpoint="
    ):
        SVITrainer(model, guide, checkpoint=tmp_path, progress=False)
    path = tmp_path / "later.pt"
    trainer = trainer_for(model, guide, checkpoint=path)
    path.mkdir()
    before = snapshot(trainer)
    with pytest.raises(ValueError, match="is a directory"):
        trainer.fit(counts(), epochs=1)
    assert_identical(snapshot(trainer), before)  # not one step was taken
    with pytest.raises(ValueError, match="is a directory"):
        trainer.save(path)


def test_saving_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous checkpoint, byte for byte, and no
    temporary file."""
    path = tmp_path / "run.pt"
    trainer = trained_checkpoint(path)
    good = path.read_bytes()

    def half_written(obj, f):
        Path(f).write_bytes(good[: len(good) // 3])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(counts(), epochs=1)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


# ----------------------------------------------------------------------- 4. module state
class NormedDecoder(nn.Module):
    """k -> 8 -> BatchNorm -> softplus -> n; flattens only the leading dimensions."""

    def __init__(self, k: int = 2, n: int = 6) -> None:
        super().__init__()
        self.inner, self.norm, self.outer = nn.Linear(k, 8), nn.BatchNorm1d(8), nn.Linear(8, n)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inner(z)
        h = self.norm(h.reshape(-1, h.shape[-1])).reshape(h.shape)
        return self.outer(nn.functional.softplus(h))


def test_batchnorm_decoder_trains_the_same_compiled_and_eager():
    """A forward pass that changes buffers runs eagerly, and says so in ``fallbacks``:
    compiled and eager training leave the same running statistics, the same
    num_batches_tracked (5 batches of 8 per epoch) and the same bounds."""
    x = counts(40, dtype=torch.float64)
    runs = []
    for compile_ in (True, False):
        torch.manual_seed(3)
        model = VAE(6, 2, likelihood="binomial", count=16, decoder=NormedDecoder()).double()
        guide = AmortizedNormal(6, 2, hidden=(4,), scale="learned").double()
        trainer = trainer_for(model, guide, compile=compile_)
        result = trainer.fit(x, epochs=3, x_val=x[:10])
        runs.append((result.train_bounds + result.val_bounds, model.decoder.norm, trainer))
    (bounds_c, norm_c, compiled), (bounds_e, norm_e, _) = runs
    assert int(norm_c.num_batches_tracked) == int(norm_e.num_batches_tracked) == 3 * 5 + 3
    for name in ("running_mean", "running_var"):
        a, b = getattr(norm_c, name), getattr(norm_e, name)
        assert float((a - b).abs().max()) <= RTOL * float(b.abs().max())
    for a, b in zip(bounds_c, bounds_e, strict=True):
        assert a == pytest.approx(b, rel=RTOL)
    reasons = list(compiled.elbo.fallbacks.values())
    assert reasons and all(
        "the forward pass changes buffers (model.decoder.norm" in r for r in reasons
    )
    assert all("run eagerly" in r for r in reasons)


def test_eval_mode_batchnorm_is_compiled():
    """In eval mode BatchNorm changes no buffer: the graph is recorded as usual."""
    model = VAE(6, 2, likelihood="binomial", count=16, decoder=NormedDecoder().eval())
    guide = AmortizedNormal(6, 2, hidden=(4,))
    compiled = CompiledELBO(TraceMeanField_ELBO(), model, guide)
    with pyro.validation_enabled(False):
        compiled.loss_and_grads(counts())
    assert compiled.fallbacks == {} and None not in compiled.graphs.values()
    assert int(model.decoder.norm.num_batches_tracked) == 0


class CountingDecoder(nn.Module):
    """Counts its calls in a buffer it replaces (not in place) on every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 6)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, z):
        self.calls = self.calls + 1
        return self.net(z)


def test_buffers_replaced_in_forward_are_detected_and_run_eagerly():
    x = counts()
    calls = []
    for compile_ in (True, False):
        model, guide = VAE(6, 2, decoder=CountingDecoder()), AmortizedNormal(6, 2, hidden=(4,))
        assert int(model.decoder.calls) == 0  # the construction probes left no count
        trainer = trainer_for(model, guide, compile=compile_)
        trainer.fit(x, epochs=2)
        calls.append(int(model.decoder.calls))
        if compile_:
            (reason,) = set(trainer.elbo.fallbacks.values())
            assert "model.decoder.calls" in reason
    assert calls[0] == calls[1] == 2 * 3


def test_construction_probes_leave_buffers_modes_and_the_random_state_alone():
    """check_network (VAE and AmortizedNormal) and the trainer's model-guide probe run
    forward passes; none changes a buffer, a train/eval flag or the global RNG."""
    decoder = NormedDecoder()
    encoder = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    encoder.eval()
    encoder[1].train()  # a mixed state must come back as it was
    state = torch.get_rng_state()
    model = VAE(6, 2, likelihood="binomial", count=16, decoder=decoder)
    guide = AmortizedNormal(6, 2, encoder=encoder)
    SVITrainer(model, guide, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    for norm in (decoder.norm, encoder[1]):
        assert int(norm.num_batches_tracked) == 0
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))
    assert decoder.training and all(m.training for m in decoder.modules())
    assert [m.training for m in encoder] == [False, True, False, False]


# ----------------------------------------------------------------------- 5. seeds
def readme_run(global_seed: int, draws: int, threads: int) -> dict:
    """The README's VAE block on 256 digits for 2 epochs, after consuming the global RNG.

    Returns the epoch bounds (as reprs) and a SHA-256 of every parameter and buffer.
    """
    from elbolab.datasets import load_digits_split

    torch.set_num_threads(threads)  # the same reduction order in every process
    torch.manual_seed(global_seed)
    torch.randn(draws)  # the global RNG consumed differently in each process
    x = load_digits_split(seed=0)[0].data.float()[:256]
    model = VAE(data_dim=64, latent_dim=2, hidden=(128,), likelihood="binomial", count=16)
    guide = AmortizedNormal(64, 2, hidden=(128,), scale="learned")
    trainer = SVITrainer(
        model, guide, loss=TraceMeanField_ELBO(), lr=3e-3, batch_size=128, seed=0, progress=False
    )
    bounds = trainer.fit(x, epochs=2).train_bounds
    digest = hashlib.sha256()
    for module in (model, guide):
        for name, value in module.state_dict().items():
            digest.update(name.encode() + value.numpy().tobytes())
    return {"bounds": [repr(b) for b in bounds], "sha256": digest.hexdigest()}


def test_the_seed_repeats_a_run_in_a_fresh_process():
    """The README's VAE block (on 256 digits, 2 epochs) in a fresh process and in this
    one, the global RNG seeded and consumed differently before the modules were built:
    the seed re-draws the starting weights, so bounds and every parameter are equal."""
    threads = torch.get_num_threads()
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from test_svi_reliability import readme_run; "
        f"print(json.dumps(readme_run(2, 1000, {threads})))"
    )
    proc = subprocess.Popen(  # runs while this process does the same
        [sys.executable, "-c", code, str(ROOT / "tests")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    here = readme_run(1, 3, threads)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == here


class NoStep(torch.optim.SGD):
    """An optimiser that never moves the parameters: after fit they are the starting ones."""

    def step(self, closure=None):
        return None


def params(*modules) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def test_the_seed_draws_the_starting_weights_by_the_documented_rule():
    """At the first fit: every submodule's reset_parameters(), model then guide, in
    modules() order, under torch.manual_seed(seed * 100_003), in place; whatever the
    global RNG did before. The VAE's gaussian scale goes back to ones."""
    starts = []
    for global_seed in (1, 2):
        model, guide = pair(seed=global_seed, likelihood="gaussian")
        with torch.no_grad():
            model.scale_unconstrained.fill_(0.7)  # sigma = e^0.7, not 1
        objects = [id(p) for p in (*model.parameters(), *guide.parameters())]
        trainer = trainer_for(model, guide, seed=5, optimizer=NoStep)
        trainer.fit(counts(), epochs=1)
        assert [id(p) for p in (*model.parameters(), *guide.parameters())] == objects
        optimised = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
        assert sorted(optimised) == sorted(objects)  # the optimiser trains these objects
        assert torch.equal(model.scale.detach(), torch.ones(6))
        starts.append(params(model, guide))
    assert_identical(starts[0], starts[1])
    model, guide = pair(seed=7, likelihood="gaussian")
    torch.manual_seed(5 * 100_003)
    for m in (*model.modules(), *guide.modules()):
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    model.reset_parameters()
    assert_identical(params(model, guide), starts[0])


def test_no_redraw_with_warm_start_without_seed_on_later_fits_and_after_load(tmp_path):
    x = counts()
    for options in ({"warm_start": True}, {"seed": None}):
        model, guide = pair(seed=3)
        built = params(model, guide)
        trainer_for(model, guide, optimizer=NoStep, **options).fit(x, epochs=1)
        assert_identical(params(model, guide), built)
    model, guide = pair(seed=3)
    trainer = trainer_for(model, guide, optimizer=NoStep)
    trainer.fit(x, epochs=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a later fit continues from here
    moved = params(model, guide)
    trainer.fit(x, epochs=1)
    assert_identical(params(model, guide), moved)
    path = tmp_path / "run.pt"
    trainer.save(path)
    other_model, other_guide = pair(seed=8)
    resumed = trainer_for(other_model, other_guide, optimizer=NoStep).load(path)
    resumed.fit(x, epochs=1)
    assert_identical(params(other_model, other_guide), moved)


class ScaledEncoder(nn.Module):
    """A layer with reset_parameters, and a parameter of its own without one."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Linear(6, 2)
        self.raw_scale = nn.Parameter(torch.full((2,), 0.3))

    def forward(self, x):
        return self.loc(x), nn.functional.softplus(self.raw_scale).expand(x.shape[0], 2)


def test_frozen_parameters_and_modules_without_reset_parameters_keep_their_weights():
    model, _ = pair(seed=1)
    guide = AmortizedNormal(6, 2, scale="learned", encoder=ScaledEncoder())
    model.decoder[0].requires_grad_(False)
    frozen = params(model.decoder[0])
    drawn = params(model.decoder[2], guide.encoder.loc)
    trainer_for(model, guide, optimizer=NoStep).fit(counts(), epochs=1)
    assert_identical(params(model.decoder[0]), frozen)
    assert torch.equal(guide.encoder.raw_scale.detach(), torch.full((2,), 0.3))
    assert not any(
        torch.equal(a, b)
        for a, b in zip(params(model.decoder[2], guide.encoder.loc), drawn, strict=True)
    )


# ----------------------------------------------------------------------- 6. construction
class WrongSizeGuide(nn.Module):
    """Claims data_dim 6 but samples a 3-dimensional z (no latent_dim to compare)."""

    data_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, 3)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.net(x), 1.0).to_event(1))


class OtherSiteGuide(WrongSizeGuide):
    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("u", dist.Normal(self.net(x)[..., :2], 1.0).to_event(1))


def _adam_instance():
    model, guide = pair()
    return torch.optim.Adam([*model.parameters(), *guide.parameters()])


@pytest.mark.parametrize(
    "build, words",
    [
        (
            lambda: (VAE(6, 2), AmortizedNormal(5, 2), {}),
            r"^the model has data_dim=6 but the guide has data_dim=5; build both for the same "
            r"number of features, e\.g\. the guide with data_dim=6",
        ),
        (
            lambda: (VAE(6, 2), AmortizedNormal(6, 3), {}),
            r"^the model has latent_dim=2 but the guide has latent_dim=3; .* latent_dim=2",
        ),
        (
            lambda: (VAE(6, 2).double(), AmortizedNormal(6, 2), {}),
            r"^the model's parameters are float64 but the guide's are float32; give both one "
            r"dtype, e\.g\. guide\.double\(\)",
        ),
        (
            lambda: (VAE(6, 2), AmortizedNormal(6, 2, latent_site="w"), {}),
            r"^the guide samples latent_site='w' but the model's latent site is 'z'; build the "
            r"guide with latent_site='z'",
        ),
        (
            lambda: (VAE(6, 2), WrongSizeGuide(), {}),
            r"^the model and the guide do not run together on a \(2, 6\) batch: .*; build them "
            r"for the same data and latent space",
        ),
        (
            lambda: (VAE(6, 2), OtherSiteGuide(), {}),
            r"^the model's latent sites are \['z'\] but the guide samples \['u'\]",
        ),
        (
            lambda: (*pair(), {"latent_site": "w"}),
            r"^latent_site='w' is not a latent site of the model \(it has \['z'\]\)",
        ),
        (
            lambda: (*pair(), {"lr": "1e-3"}),
            r"^lr must be a positive number, got '1e-3'; e\.g\. lr=1e-3",
        ),
        (lambda: (*pair(), {"lr": float("nan")}), r"^lr must be a positive number, got nan"),
        (
            lambda: (*pair(), {"loss": "elbo"}),
            r"^loss must be a pyro\.infer\.ELBO instance, got 'elbo'; e\.g\. "
            r"loss=pyro\.infer\.TraceMeanField_ELBO\(\)",
        ),
        (
            lambda: (*pair(), {"loss": Trace_ELBO}),
            r"^loss must be an ELBO instance, got the class Trace_ELBO; create one: "
            r"loss=Trace_ELBO\(\)",
        ),
        (
            lambda: (*pair(), {"optimizer": _adam_instance()}),
            r"^optimizer must be an optimiser class, got an instance of Adam; pass the class, "
            r"optimizer=torch\.optim\.Adam",
        ),
        (
            lambda: (*pair(), {"optimizer": dict}),
            r"^optimizer must be a torch\.optim class, e\.g\. torch\.optim\.Adam",
        ),
        (
            lambda: (*pair(), {"seed": 1.5}),
            r"^seed must be an integer or None, got 1\.5",
        ),
        (
            lambda: (*pair(), {"kl_warmup_epochs": "2"}),
            r"^kl_warmup_epochs must be an integer >= 0, got '2'",
        ),
        (
            lambda: (*pair(), {"patience": 0}),
            r"^patience must be a positive integer, got 0; epochs without improvement",
        ),
    ],
    ids=[
        "data-dim",
        "latent-dim",
        "dtype",
        "latent-site",
        "probe-shapes",
        "probe-sites",
        "trainer-site",
        "lr-string",
        "lr-nan",
        "loss-string",
        "loss-class",
        "optimizer-instance",
        "optimizer-other",
        "seed",
        "warmup",
        "patience",
    ],
)
def test_the_trainer_refuses_bad_input_at_construction(build, words):
    model, guide, options = build()
    with pytest.raises(ValueError, match=words):
        SVITrainer(model, guide, progress=False, **options)


@pytest.mark.parametrize("make", [VAE, AmortizedNormal], ids=["VAE", "AmortizedNormal"])
def test_hidden_must_be_a_sequence_of_sizes(make):
    with pytest.raises(
        ValueError,
        match=r"^hidden must be a sequence of layer sizes, got the "
        r"integer 16; pass a tuple, e\.g\. hidden=\(16,\)",
    ):
        make(6, 2, hidden=16)
    with pytest.raises(ValueError, match=r"got '16'; pass a tuple, e\.g\. hidden=\(128,\)"):
        make(6, 2, hidden="16")
    with pytest.raises(ValueError, match="every hidden layer size must be a positive integer"):
        make(6, 2, hidden=(8, 0))
    for hidden in ([8, 4], (h for h in (8, 4)), np.array([8, 4])):  # any iterable of ints
        net = make(6, 2, hidden=hidden)
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        assert [m.out_features for m in linears][:2] == [8, 4]


# ----------------------------------------------------------------------- 7. evaluation
def test_evaluation_counts_accept_numpy_integers():
    """np.int64 counts give exactly what the same Python ints give (same seed)."""
    model, guide = pair()
    x = counts(10)
    calls = [
        (iwae_log_likelihood, {"num_samples": 5, "batch_size": 4, "sample_chunk": 2}),
        (elbo_per_datapoint, {"num_particles": 3, "batch_size": 4}),
        (bound_terms, {"num_particles": 3, "batch_size": 4}),
    ]
    for fn, options in calls:
        pyro.set_rng_seed(0)
        expected = fn(model, guide, x, **options)
        pyro.set_rng_seed(0)
        got = fn(model, guide, x, **{k: np.int64(v) for k, v in options.items()})
        assert_identical(got, expected)


@pytest.mark.parametrize("value", [0, -2, 2.5, True, "3"])
@pytest.mark.parametrize(
    "fn, option",
    [
        (iwae_log_likelihood, "num_samples"),
        (iwae_log_likelihood, "batch_size"),
        (iwae_log_likelihood, "sample_chunk"),
        (elbo_per_datapoint, "num_particles"),
        (elbo_per_datapoint, "batch_size"),
        (bound_terms, "num_particles"),
        (bound_terms, "batch_size"),
    ],
)
def test_evaluation_refuses_counts_that_are_not_positive_integers(fn, option, value):
    model, guide = pair()
    with pytest.raises(ValueError, match=f"^{option} must be a positive integer, got {value!r}; "):
        fn(model, guide, counts(4), **{option: value})


# ----------------------------------------------------------------------- 8. leading dims
class MatmulDecoder(nn.Module):
    """torch.mm: 2-D inputs only."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 6))

    def forward(self, z):
        return torch.mm(z, self.weight)


class ViewDecoder(nn.Module):
    """Flattens all but the first dimension: wrong for (S, N, k)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 6)

    def forward(self, z):
        return self.net(z.view(z.shape[0], -1))


class FlatteningDecoder(nn.Module):
    """Runs, but loses the leading dimensions: (3, 2, k) -> (6, n)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 6)

    def forward(self, z):
        return self.net(z.reshape(-1, z.shape[-1]))


@pytest.mark.parametrize(
    "decoder, words",
    [
        (MatmulDecoder, r"^the decoder fails on an input of shape \(3, 2, 2\) \(RuntimeError: "),
        (ViewDecoder, r"^the decoder fails on an input of shape \(3, 2, 2\) \(RuntimeError: "),
        (FlatteningDecoder, r"^the decoder maps \(3, 2, 2\) to \(6, 6\), expected \(3, 2, 6\); "),
    ],
    ids=["mm", "view", "flatten-all"],
)
def test_decoders_must_take_leading_sample_dimensions(decoder, words):
    """Evaluation draws particles in an outer plate (z is (K, N, k)): a decoder that only
    takes (N, k) is refused when the VAE is built, with the fix."""
    with pytest.raises(
        ValueError,
        match=words + r".*must accept any leading dimensions, \(\.\.\., 2\) -> \(\.\.\., 6\).*"
        r"use nn\.Linear layers, or flatten only the leading dimensions",
    ):
        VAE(6, 2, decoder=decoder())
    model = VAE(6, 2, likelihood="binomial", count=16, decoder=NormedDecoder())
    guide = AmortizedNormal(6, 2, hidden=(4,))
    assert iwae_log_likelihood(model, guide, counts(5), num_samples=4).shape == (5,)
