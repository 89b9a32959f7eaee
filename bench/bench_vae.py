"""Benchmark: elbolab's SVITrainer (a VAE through Pyro's ELBO) against a hand-written torch loop.

Run ``python bench/bench_vae.py`` (full: about 3 minutes on 2 cores, both thread counts) or
``python bench/bench_vae.py --quick`` (smoke run: synthetic N = 2,000, one round, ~20 s).
Everything is measured side by side in one process with ``time.perf_counter``; the whole
set is run once per torch thread count (``--threads``, default: the core count, then 1).

What is measured
----------------
The wall time of one training epoch inside ``fit(x, epochs=E)``, for

``trainer``
    ``SVITrainer(VAE(...), AmortizedNormal(...), loss=TraceMeanField_ELBO(), lr=1e-3,
    batch_size=B, seed=0, progress=False).fit(x, epochs=E)``, i.e. exactly what a user
    calls, with its defaults: the ELBO is a ``CompiledELBO`` (loss and gradients
    recorded once per batch shape as one graph, replayed after), Pyro validation is on
    for the first step of each fit;
    epoch times are the trainer's own ``TrainResult.epoch_times``;
``hand``
    a hand-written PyTorch loop computing the *same* loss, the negative ELBO with the
    analytic KL that ``TraceMeanField_ELBO`` uses::

        loc, scale = encoder(x)                        (scale = 1 for the unit guide)
        z    = loc + scale * eps,   eps ~ N(0, I)     (the reparametrised draw)
        loss = -( sum_d log p(x_d | decoder(z_d)) - sum_d KL(N(loc_d, scale_d^2) || N(0, I)) ) / B

    with the log-likelihood written out in plain tensor algebra (unit Gaussian,
    Bernoulli via ``binary_cross_entropy_with_logits``, Binomial with its lgamma
    normaliser) and the KL in closed form; divided by the batch size like
    ``SVITrainer.step`` (``loss = elbo(batch) / batch.shape[0]``), then
    ``zero_grad / backward / Adam.step`` and ``float(loss)`` for the epoch's bound.

Both contenders use the same network classes (``model.decoder`` and ``guide.encoder`` of
a VAE / AmortizedNormal built from the same torch seed, so the initial state dicts are
identical -- checked), the same batches in the same order and the same noise (the hand
loop re-seeds torch and its batch generator per epoch exactly as ``SVITrainer.fit`` does,
see :func:`epoch_seed`) and the same ``torch.optim.Adam(lr=1e-3)``. So they do the same
arithmetic: ``dbound`` (epoch bounds) and ``dtheta`` (final parameters) against the hand
loop are float32 rounding. A large dtheta means the contenders diverged (e.g. svi.py
changed its seeding); the script then says PARITY FAILED, and the times are not
comparable.

Extra rows (``--modes``; same batches, same seeds, parity reported the same way):

``eager``     ``SVITrainer(..., compile=False)``: Pyro's ELBO module called every step
              (validation, as in ``trainer``, only on each fit's first step);
``no-valid``  ``eager`` inside ``pyro.validation_enabled(False)``;
``jit-pyro``  ``JitTraceMeanField_ELBO``. With elbolab's module-local parameters it fails
              on its first step (``pyro.ops.jit`` looks the parameters up in the global
              param store: KeyError, printed); the row runs it under
              ``pyro.settings.context(module_local_params=False)`` with a cleared global
              store, which registers the networks' parameters there -- fine for one model
              at a time, not a general fix. As shipped in pyro 1.9 it also re-traces on
              every call (a cache-attribute mismatch; measured and printed), so the row
              uses :func:`jit_pyro_elbo`, which compiles once, and is warmed up
              (``WARM_UP_CALLS`` forward+backward per batch shape) before timing.

Workloads: scikit-learn digits (1797 x 64 float32, hidden (128,), latent 2, batch 128)
with the unit-Gaussian likelihood and unit-scale guide (the lecture's DEC/ENC) and with
the Binomial(16) likelihood and learned-scale guide; synthetic binary data (N = 10,000 x
784 float32 from a fixed random low-rank logistic model, Bernoulli likelihood, learned
scale, hidden (400,), latent 20) at batch 128 and 512.

Each contender runs ``--rounds`` (2; four times as many for the digits, whose epochs
take milliseconds) fits of ``--epochs`` (3) epochs (training continues), the fits
interleaved round-robin with the other contenders' so that machine noise hits them
alike; the table shows the best epoch, ms per step, and ratio = row / hand. The first
epoch of a fit pays for Pyro's validated first step, and the trainer's very first one
for recording its graphs (``1st``); what a fit spends outside its epochs
(``validate_data`` over all of x, two state snapshots) is ``per fit``. Target: trainer /
hand <= 1.15 with TraceMeanField_ELBO. The script only reports; it does not fail when a
target is missed.

torch's thread count matters: on a 2-core machine where another process keeps one core
busy, a second torch thread makes every small op wait for the busy core (measured: ~20
ms instead of 60 us for a 128 x 64 linear + sqrt), so the busy CPU time of *other*
processes is printed, with a warning before the start if it is high. A fixed per-step
overhead weighs more when more threads make the hand loop faster.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_model, n_cores

SEED = 0
C = 10  # classes of the M2 workloads (digits 0..9)
LR = 1e-3
WARM_UP_CALLS = 3  # per batch shape, for the jit-pyro row
MODES = ("trainer", "eager", "no-valid", "jit-pyro")


# ----------------------------------------------------------------------------- machine
def cpu_ticks() -> tuple[int, int, int] | None:
    """(busy, steal, total) jiffies of all CPUs from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    steal = v[7] if len(v) > 7 else 0
    return sum(v) - idle - steal, steal, sum(v)


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def other_load(seconds: float = 0.5) -> float | None:
    """CPU cores kept busy by *other* processes during ``seconds`` (sleeping ourselves)."""
    t0 = cpu_ticks()
    time.sleep(seconds)
    t1 = cpu_ticks()
    if not t0 or not t1 or t1[2] == t0[2]:
        return None
    return n_cores() * (t1[0] - t0[0]) / (t1[2] - t0[2])


def torch_parallel_info() -> str:
    """torch's threading backend and math libraries, and the thread environment variables."""
    try:
        lines = [ln.strip() for ln in torch.__config__.parallel_info().splitlines()]
    except Exception:  # noqa: BLE001 -- informational only
        return "parallel info n/a"
    libs = []
    for ln in lines:
        if ln.startswith(("OpenMP", "Native thread pool", "TBB")):
            libs.append(ln.split(" (")[0])
        elif "Math Kernel Library Version" in ln:
            libs.append("MKL " + ln.split("Version ")[1].split("-")[0])
        elif "MKL-DNN" in ln or "oneDNN" in ln:
            libs.append("oneDNN " + ln.split(" v")[-1].split(" ")[0])
    env = [
        f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
    ]
    return "; ".join(libs + (env or ["OMP/MKL_NUM_THREADS unset"]))


# ----------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    name: str
    data: str  # "digits" or "synthetic"
    likelihood: str
    scale: str  # guide scale: "unit" or "learned"
    hidden: tuple[int, ...]
    latent: int
    batch: int
    count: int | None = None
    more_rounds: int = 1  # small workloads: several times --rounds (cheap, and noisier)
    labels: int = 0  # > 0: the M2 semi-supervised VAE with this many labelled rows


WORKLOADS = (
    Workload("digits gauss-unit/unit", "digits", "gaussian-unit", "unit", (128,), 2, 128, None, 4),
    Workload("digits binom16/learned", "digits", "binomial", "learned", (128,), 2, 128, 16, 4),
    Workload("synth784 bern/learned", "synthetic", "bernoulli", "learned", (400,), 20, 128),
    Workload("synth784 bern/learned", "synthetic", "bernoulli", "learned", (400,), 20, 512),
)
# the M2 defaults (latent 50, hidden (256,), y summed by TraceEnum_ELBO, alpha = 0.1 N)
M2_WORKLOADS = (
    Workload("M2 digits binom16", "digits", "binomial", "learned", (256,), 50, 128, 16, 2, 100),
    Workload("M2 mnist5k bern", "mnist", "bernoulli", "learned", (256,), 50, 128, None, 1, 100),
)


def load_data(kind: str, n_synth: int) -> torch.Tensor:
    if kind == "mnist":  # the bundled subset's 4,000 training rows, binarised
        from elbolab.datasets import load_mnist_5k_split

        return load_mnist_5k_split(seed=SEED, binarize=True)[0].data.float()
    if kind == "digits":
        from sklearn.datasets import load_digits

        return torch.tensor(load_digits().data, dtype=torch.float32)  # 1797 x 64, 0..16
    rng = np.random.default_rng(20240601)
    z = rng.normal(size=(n_synth, 20))
    w = rng.normal(scale=0.7, size=(20, 784))
    b = rng.normal(scale=1.5, size=784)
    p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
    return torch.tensor(rng.random(p.shape) < p, dtype=torch.float32)  # binary, 784 pixels


def load_labels(w: Workload) -> torch.Tensor:
    """``w.labels`` class labels (n / 10 per class, seeded), -1 elsewhere, for ``w.data``."""
    from elbolab.datasets import hide_labels, load_mnist_5k_split

    if w.data == "mnist":
        target = load_mnist_5k_split(seed=SEED, binarize=True)[0].target
    else:
        from sklearn.datasets import load_digits

        target = torch.as_tensor(load_digits().target, dtype=torch.long)
    return hide_labels(target, w.labels, seed=SEED)


def fresh(w: Workload, data_dim: int):
    """A VAE and its guide; the same torch seed gives the same initial weights every call."""
    from elbolab.guides import AmortizedNormal, SemiSupervisedGuide
    from elbolab.models import VAE, SemiSupervisedVAE

    torch.manual_seed(1234)
    if w.labels:
        model = SemiSupervisedVAE(
            data_dim, C, w.latent, w.hidden, likelihood=w.likelihood, count=w.count
        )
        return model, SemiSupervisedGuide(model)
    model = VAE(data_dim, w.latent, w.hidden, likelihood=w.likelihood, count=w.count)
    guide = AmortizedNormal(data_dim, w.latent, w.hidden, scale=w.scale)
    return model, guide


# ----------------------------------------------------------------------------- hand loop
def hand_loss(decoder, encoder, x: torch.Tensor, w: Workload) -> torch.Tensor:
    """-(sum_d [log p(x_d | decoder(z_d)) - KL(q_d || N(0, I))]) / B, z_d = loc + scale eps."""
    if w.scale == "unit":
        loc = encoder(x)
        z = loc + torch.randn_like(loc)  # eps * 1: the same draw Pyro's rsample makes
        kl = 0.5 * loc.square().sum()
    else:
        loc, scale = encoder(x)
        z = loc + torch.randn_like(loc) * scale
        kl = (0.5 * (scale.square() + loc.square() - 1.0) - scale.log()).sum()
    out = decoder(z)
    if w.likelihood == "gaussian-unit":
        log_lik = -0.5 * (x - out).square().sum() - 0.5 * x.numel() * math.log(2 * math.pi)
    elif w.likelihood == "bernoulli":
        log_lik = -F.binary_cross_entropy_with_logits(out, x, reduction="sum")
    elif w.likelihood == "binomial":
        n = float(w.count)
        log_norm = math.lgamma(n + 1) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)
        log_lik = (x * out - n * F.softplus(out) + log_norm).sum()
    else:
        raise ValueError(w.likelihood)
    return -(log_lik - kl) / x.shape[0]


def log_likelihood(out: torch.Tensor, x: torch.Tensor, w: Workload) -> torch.Tensor:
    """log p(x | decoder output), summed over the last dimension: shape out.shape[:-1]."""
    if w.likelihood == "bernoulli":
        return -F.binary_cross_entropy_with_logits(out, x.expand_as(out), reduction="none").sum(-1)
    n = float(w.count)  # binomial
    log_norm = math.lgamma(n + 1) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)
    return (x * out - n * F.softplus(out) + log_norm).sum(-1)


def m2_bound(model, guide, x: torch.Tensor, code: torch.Tensor, w: Workload) -> torch.Tensor:
    """-L(x, y) of M2-L at one reparametrised draw z, for the one-hot ``code`` (..., N, C):

        log p(x | y, z) + log p(y) + log N(z; 0, I) - log N(z; mu_E, sigma_E^2),
        z = mu_E + sigma_E eps,  (mu_E, sigma_E) = encoder([x s, onehot(y)])

    with s the input scale (1/16 for counts); shape code.shape[:-1].
    """
    h = x * guide.input_scale
    loc, scale = guide.encoder(torch.cat([h.expand(*code.shape[:-1], h.shape[-1]), code], -1))
    eps = torch.randn_like(loc)  # the draw Pyro's rsample makes
    z = loc + eps * scale
    log_px = log_likelihood(model.decoder(torch.cat([z, code], -1)), x, w)
    log_pz = -0.5 * z.square().sum(-1)  # the 2 pi constants of p(z) and q(z) cancel
    log_qz = -0.5 * eps.square().sum(-1) - scale.log().sum(-1)
    return log_px - math.log(C) + log_pz - log_qz


def m2_hand_loss(
    model, guide, w: Workload, x_u, x_l, y_l, counts, alpha
) -> tuple[torch.Tensor, float]:
    """The trainer's M2 step loss, J^alpha / N estimated from one batch of each kind:

        (N_u / N) mean_u(-U) + (N_l / N) mean_l(-L) + alpha (N_l / N) mean_l(-log q(y | x))

    with U = sum_y q(y | x) (-L(x, y)) + H(q(y | x)) (M2-U; y summed over the C one-hot
    codes in one (C, B) batch). Returns (loss, the batches' summed bound U + L).
    """
    n_u, n_l = counts
    n = n_u + n_l
    loss, bound = 0.0, 0.0
    if x_u is not None and x_u.shape[0]:
        log_q = torch.log_softmax(guide.classifier(x_u * guide.input_scale), -1).T  # (C, B)
        codes = torch.eye(C)[:, None, :].expand(C, x_u.shape[0], C)
        bound_u = (log_q.exp() * (m2_bound(model, guide, x_u, codes, w) - log_q)).sum()
        loss = loss - bound_u * (n_u / n / x_u.shape[0])
        bound += float(bound_u.detach())
    if x_l.shape[0]:
        bound_l = m2_bound(model, guide, x_l, F.one_hot(y_l, C).float(), w).sum()
        logits = torch.log_softmax(guide.classifier(x_l * guide.input_scale), -1)
        log_q_l = logits.gather(-1, y_l[:, None]).squeeze(-1)
        loss = loss - bound_l * (n_l / n / x_l.shape[0]) - alpha * (n_l / n) * log_q_l.mean()
        bound += float(bound_l.detach())
    return loss, bound


def epoch_seed(epoch: int) -> int:
    """SVITrainer.fit's seed for (1-based) ``epoch``: torch's RNG and the batch order.

    Mirrors inference/svi.py (``pyro.set_rng_seed(seed * 100_003 + epoch)`` and the
    batch generator re-seeded alike); if svi.py changes this, dbound/dtheta below grow
    and the parity line says so.
    """
    return SEED * 100_003 + epoch


class HandLoop:
    """The plain torch contender: own decoder/encoder copies, own Adam, own batch generator."""

    def __init__(self, model, guide, w: Workload) -> None:
        self.model, self.guide, self.w = model, guide, w
        self.optimizer = torch.optim.Adam(self.parameters(), lr=LR)
        self.generator = torch.Generator()
        self.epochs = 0
        self.bounds: list[float] = []

    def epoch(self, x: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.epochs += 1
        seed = epoch_seed(self.epochs)  # what SVITrainer.fit does at the start of an epoch
        torch.manual_seed(seed)
        self.generator.manual_seed(seed)
        total = 0.0
        for loss, bound in self.losses(x):
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += bound
        self.bounds.append(total / x.shape[0])
        return time.perf_counter() - t0

    def losses(self, x: torch.Tensor):
        """(loss, summed bound of its batch) per step, in the trainer's batch order."""
        order = torch.randperm(x.shape[0], generator=self.generator)
        for start in range(0, x.shape[0], self.w.batch):
            batch = x[order[start : start + self.w.batch]]
            loss = hand_loss(self.model.decoder, self.guide.encoder, batch, self.w)
            yield loss, -float(loss.detach()) * batch.shape[0]

    def run(self, x: torch.Tensor, epochs: int) -> list[float]:
        return [self.epoch(x) for _ in range(epochs)]

    def parameters(self):
        return [*self.model.decoder.parameters(), *guide_networks(self.guide)]


class HandM2Loop(HandLoop):
    """The plain torch contender for M2: the batching of ``SVITrainer._labelled_epoch``
    (each step the next unlabelled batch and the next share of the labelled rows), the
    loss of :func:`m2_hand_loss`."""

    def __init__(self, model, guide, w: Workload, labels: torch.Tensor) -> None:
        super().__init__(model, guide, w)
        self.labels = labels

    def losses(self, x: torch.Tensor):
        seen = self.labels >= 0
        x_u, x_l, y_l = x[~seen], x[seen], self.labels[seen]
        n_u, n_l, b = x_u.shape[0], x_l.shape[0], self.w.batch
        steps = math.ceil(n_u / b)
        order_u = torch.randperm(n_u, generator=self.generator)
        shares = torch.tensor_split(torch.randperm(n_l, generator=self.generator), steps)
        for i, share in enumerate(shares):
            batch_u = x_u[order_u[i * b : (i + 1) * b]]
            counts, alpha = (n_u, n_l), 0.1 * x.shape[0]  # the default alpha of M2-J
            yield m2_hand_loss(
                self.model, self.guide, self.w, batch_u, x_l[share], y_l[share], counts, alpha
            )


def guide_networks(guide):
    """The guide's parameters in a fixed order: the encoder's, then a classifier's if any."""
    classifier = getattr(guide, "classifier", None)
    return [*guide.encoder.parameters(), *([] if classifier is None else classifier.parameters())]


# ----------------------------------------------------------------------------- contenders
class TrainerContender:
    """SVITrainer with a given loss; ``mode`` picks the settings it runs under."""

    def __init__(self, model, guide, w: Workload, mode: str, labels=None) -> None:
        import pyro

        from elbolab.inference import SVITrainer

        self.mode, self.compile_time, self.labels = mode, 0.0, labels
        loss = jit_pyro_elbo() if mode == "jit-pyro" else pyro.infer.TraceMeanField_ELBO()
        if labels is not None:
            loss = None  # the model's default: TraceEnum_ELBO, y summed
        self.trainer = SVITrainer(
            model,
            guide,
            loss=loss,
            lr=LR,
            batch_size=w.batch,
            seed=SEED,
            progress=False,
            compile=mode == "trainer",
            warm_start=True,  # every contender starts from the same copied weights
        )
        self.model, self.guide = model, guide
        self.fit_overheads: list[float] = []

    def _context(self):
        import pyro

        if self.mode == "no-valid":
            return pyro.validation_enabled(False)
        if self.mode == "jit-pyro":
            return pyro.settings.context(module_local_params=False)
        return contextlib.nullcontext()

    def warm_up(self, x: torch.Tensor) -> None:
        """jit-pyro: compile on each batch shape of an epoch (no optimiser step)."""
        if self.mode != "jit-pyro":
            return
        import pyro

        pyro.clear_param_store()
        bs, n = self.trainer.batch_size, x.shape[0]
        shapes = {min(bs, n)} | ({n % bs} if n % bs else set())
        t0 = time.perf_counter()
        with self._context():
            for s in sorted(shapes, reverse=True):
                # TorchScript's profiling executor optimises forward and backward only
                # after a few runs: without these, the first ~2 timed epochs pay for it
                for _ in range(WARM_UP_CALLS):
                    self.trainer.elbo(x[:s]).backward()
        self.trainer.optimizer.zero_grad()  # gradients only; no optimiser step was taken
        self.compile_time = time.perf_counter() - t0

    def run(self, x: torch.Tensor, epochs: int) -> list[float]:
        """One ``fit(x, epochs=epochs)``; seconds per epoch as the trainer records them."""
        with self._context():
            result = self.trainer.fit(x, epochs=epochs, y=self.labels)
        self.fit_overheads.append(result.fit_time - sum(result.epoch_times))
        return result.epoch_times

    @property
    def bounds(self) -> list[float]:
        return self.trainer.history.train_bounds

    def parameters(self):
        return [*self.model.decoder.parameters(), *guide_networks(self.guide)]


def jit_pyro_elbo():
    """``JitTraceMeanField_ELBO`` with its compile cache working.

    In pyro 1.9, ``JitTraceMeanField_ELBO.differentiable_loss`` tests
    ``self._loss_and_surrogate_loss`` but stores the compiled function as
    ``self._differentiable_loss``, so every call builds and traces a new one (see
    :func:`jit_pyro_as_shipped`). Setting the tested attribute makes it reuse the first.
    """
    import pyro

    class CompiledOnce(pyro.infer.JitTraceMeanField_ELBO):
        def differentiable_loss(self, model, guide, *args, **kwargs):
            loss = super().differentiable_loss(model, guide, *args, **kwargs)
            self._loss_and_surrogate_loss = self._differentiable_loss  # the attribute tested
            return loss

    return CompiledOnce(ignore_jit_warnings=True)


def jit_pyro_as_shipped(w: Workload, x: torch.Tensor, steps: int = 10) -> tuple[float, int]:
    """ms per step of the unpatched JitTraceMeanField_ELBO (global params), and traces made."""
    import pyro

    from elbolab.inference import SVITrainer

    model, guide = fresh(w, x.shape[1])
    elbo = pyro.infer.JitTraceMeanField_ELBO(ignore_jit_warnings=True)
    trainer = SVITrainer(model, guide, loss=elbo, batch_size=w.batch, seed=SEED, progress=False)
    traced = 0
    original = torch.jit.trace

    def counting_trace(*args, **kwargs):
        nonlocal traced
        traced += 1
        return original(*args, **kwargs)

    batch = x[: w.batch]
    with pyro.settings.context(module_local_params=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyro.clear_param_store()
        trainer.step(batch)
        torch.jit.trace = counting_trace
        try:
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.step(batch)
            elapsed = time.perf_counter() - t0
        finally:
            torch.jit.trace = original
            pyro.clear_param_store()
    return elapsed / steps * 1e3, traced


def jit_pyro_module_local_error(w: Workload, x: torch.Tensor) -> str | None:
    """Does ``JitTraceMeanField_ELBO`` run with module-local params? None, or the error."""
    import pyro

    from elbolab.inference import SVITrainer

    model, guide = fresh(w, x.shape[1])
    trainer = SVITrainer(
        model, guide, loss=pyro.infer.JitTraceMeanField_ELBO(), batch_size=w.batch, seed=SEED
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.step(x[: w.batch])
    except Exception as error:  # noqa: BLE001 -- reported, not handled
        return f"{type(error).__name__}: {error}"
    return None


# ----------------------------------------------------------------------------- one workload
def run_workload(w: Workload, x: torch.Tensor, modes: list[str], rounds: int, epochs: int) -> dict:
    """``rounds`` x one fit of ``epochs`` epochs per contender, round-robin; best epoch."""
    labels = load_labels(w) if w.labels else None
    if labels is not None:
        modes = [m for m in modes if m != "jit-pyro"]  # no jit of TraceEnum_ELBO here
    base_model, base_guide = fresh(w, x.shape[1])
    ref = {k: v.clone() for k, v in base_model.state_dict().items()}
    ref |= {"g." + k: v.clone() for k, v in base_guide.state_dict().items()}
    contenders: dict[str, object] = {}
    for mode in ["hand", *modes]:
        model, guide = fresh(w, x.shape[1])
        state = model.state_dict() | {"g." + k: v for k, v in guide.state_dict().items()}
        assert all(torch.equal(state[k], ref[k]) for k in ref), "initial states differ"
        if mode == "hand" and labels is not None:
            contenders[mode] = HandM2Loop(model, guide, w, labels)
        elif mode == "hand":
            contenders[mode] = HandLoop(model, guide, w)
        else:
            contenders[mode] = TrainerContender(model, guide, w, mode, labels)
            contenders[mode].warm_up(x)
    times: dict[str, list[float]] = {m: [] for m in contenders}
    cpu: dict[str, float] = dict.fromkeys(contenders, 0.0)
    for _ in range(rounds):
        for mode, c in contenders.items():
            c0 = own_cpu()
            times[mode].extend(c.run(x, epochs))
            cpu[mode] += own_cpu() - c0
    hand = contenders["hand"]
    out = {"steps": math.ceil(x.shape[0] / w.batch), "rows": {}}
    for mode, c in contenders.items():
        bound_diff = max(abs(a - b) for a, b in zip(c.bounds, hand.bounds, strict=True))
        with torch.no_grad():
            param_diff = max(
                float((p - q).abs().max())
                for p, q in zip(c.parameters(), hand.parameters(), strict=True)
            )
        overheads = getattr(c, "fit_overheads", [])
        out["rows"][mode] = {
            "best": min(times[mode]),
            "first": times[mode][0],
            "times": times[mode],
            "cpu_per_wall": cpu[mode] / sum(times[mode]),
            "bound": c.bounds[-1],
            "bound_diff": bound_diff,
            "param_diff": param_diff,
            "compile": getattr(c, "compile_time", 0.0),
            "fit_overhead": sum(overheads) / len(overheads) if overheads else 0.0,
        }
    import pyro

    pyro.clear_param_store()  # the jit-pyro row registered its networks there
    return out


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="synthetic N = 2,000, 1 round")
    parser.add_argument("--rounds", type=int, default=None, help="fits per contender (2)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit (3)")
    parser.add_argument("--n-synth", type=int, default=None, help="synthetic N (10,000)")
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated torch thread counts to run everything with (default: cores,1)",
    )
    parser.add_argument(
        "--modes",
        default="trainer,eager",
        help=f"comma-separated trainer rows out of {','.join(MODES)} (hand always runs)",
    )
    parser.add_argument(
        "--workloads",
        choices=["vae", "m2", "all"],
        default="all",
        help="the VAE's workloads, the M2 semi-supervised VAE's, or both (all)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 2)
    n_synth = args.n_synth or (2_000 if args.quick else 10_000)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown --modes {sorted(unknown)}; choose from {MODES}")
    cores = n_cores()
    threads = (
        [int(t) for t in args.threads.split(",")]
        if args.threads
        else list(dict.fromkeys((cores, 1)))
    )

    import pyro
    import sklearn

    import elbolab  # noqa: F401 -- sets module_local_params=True

    busy_before = other_load()
    print(
        "elbolab VAE epoch benchmark: SVITrainer (Pyro's TraceMeanField_ELBO for the VAE, "
        "TraceEnum_ELBO for M2) vs a hand-written "
        f"torch loop; best of {rounds} x {args.epochs} epochs; torch threads {threads}"
    )
    if busy_before is not None and busy_before > 0.3:
        print(
            f"WARNING: other processes keep {busy_before:.1f} of {cores} cores busy: timings "
            "with more than one torch thread can be badly distorted; use an idle machine"
        )
    ticks0, cpu0, start = cpu_ticks(), own_cpu(), time.perf_counter()
    results = []
    workloads = {"vae": WORKLOADS, "m2": M2_WORKLOADS, "all": WORKLOADS + M2_WORKLOADS}[
        args.workloads
    ]
    data = {kind: load_data(kind, n_synth) for kind in dict.fromkeys(w.data for w in workloads)}
    jit_error, shipped = None, None
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        print(f"-- torch threads {n_threads}")
        for w in workloads:
            x = data[w.data]
            if jit_error is None and "jit-pyro" in modes:
                jit_error = jit_pyro_module_local_error(w, x) or "none (it ran)"
                shipped = jit_pyro_as_shipped(w, x)
            t0 = time.perf_counter()
            r = run_workload(w, x, modes, rounds * w.more_rounds, args.epochs)
            results.append((n_threads, w, x.shape, r))
            line = ", ".join(f"{m} {v['best'] * 1e3:.0f}" for m, v in r["rows"].items())
            print(
                f"   {w.name} B={w.batch}: best epoch ms: {line} ({time.perf_counter() - t0:.1f} s)"
            )
    ticks1, cpu1 = cpu_ticks(), own_cpu()
    wall = time.perf_counter() - start

    # ------------------------------------------------------------------ summary table
    steal = others = "n/a"
    if ticks0 and ticks1 and ticks1[2] > ticks0[2]:
        per_core = (ticks1[2] - ticks0[2]) / cores  # jiffies each core ticked during the run
        steal = f"{100 * (ticks1[1] - ticks0[1]) / (ticks1[2] - ticks0[2]):.1f}%"
        own_jiffies = (cpu1 - cpu0) * os.sysconf("SC_CLK_TCK")
        others = f"{max(0.0, (ticks1[0] - ticks0[0] - own_jiffies) / per_core):.2f} cores"
    width = 118
    print("\n" + "=" * width)
    print(f"platform : {platform.platform()} | python {platform.python_version()}")
    print(
        f"cpu      : {cpu_model()} | cores {cores} | torch threads {threads} (intra-op; "
        f"interop {torch.get_num_interop_threads()}) | {torch_parallel_info()}"
    )
    print(
        f"versions : torch {torch.__version__}, pyro {pyro.__version__}, "
        f"scikit-learn {sklearn.__version__}, numpy {np.__version__}"
    )
    print(
        f"run      : wall {wall:.0f} s | CPU steal {steal} | other processes busy {others} "
        f"on average (just before: {'n/a' if busy_before is None else f'{busy_before:.2f}'})"
    )
    if "jit-pyro" in modes:
        print(f"JitTraceMeanField_ELBO with module-local params: {jit_error}")
        print(
            f"JitTraceMeanField_ELBO as shipped (global params, {WORKLOADS[0].name}, "
            f"{threads[0]} threads): {shipped[0]:.2f} ms/step, {shipped[1]} torch.jit.trace calls "
            "in 10 steps: it retraces every call (rows jit-pyro use jit_pyro_elbo(): compiles once)"
        )
    print("-" * width)
    print(
        "best epoch of each contender; ratio = row / hand (target: trainer <= 1.15); "
        "dbound = max |epoch bound - hand's|;"
    )
    print(
        "dtheta = max |param - hand's| after all epochs (same arithmetic: ~0 or float32 "
        "rounding); 1st = the first epoch of the first fit"
    )
    print(
        "(the trainer records its graphs there); per fit = what each fit() call spends outside "
        "its epochs (validate_data, state snapshots)"
    )
    print(
        f"{'thr':>3} {'workload':<23} {'B':>4} {'steps':>5} {'row':<9} {'epoch ms':>9} "
        f"{'ms/step':>8} {'ratio':>6} {'target':>6} {'bound':>9} {'dbound':>7} {'dtheta':>7}"
        "  notes"
    )
    parity_ok = True
    for n_threads, w, shape, r in results:
        print("-" * width)
        hand = r["rows"]["hand"]["best"]
        for mode, v in r["rows"].items():
            target = "<=1.15" if mode == "trainer" else ""
            note = f"cpu/wall {v['cpu_per_wall']:.2f}; 1st {v['first'] * 1e3:.0f} ms"
            if mode != "hand":
                note += f"; per fit {v['fit_overhead'] * 1e3:.1f} ms"
            if v["compile"]:
                note += f"; warm-up {v['compile']:.2f} s"
            parity_ok &= v["param_diff"] < 1e-3
            print(
                f"{n_threads:>3} {w.name:<23} {w.batch:>4} {r['steps']:>5} {mode:<9} "
                f"{v['best'] * 1e3:9.1f} {v['best'] * 1e3 / r['steps']:8.3f} "
                f"{v['best'] / hand:6.2f} {target:>6} {v['bound']:9.2f} {v['bound_diff']:7.0e} "
                f"{v['param_diff']:7.0e}  {note}"
            )
        labelled = f", {w.labels} labelled, y summed" if w.labels else ""
        print(
            f"{'':>3} {'':<23} data {tuple(shape)}, hidden {w.hidden}, latent {w.latent}{labelled}"
        )
    print("=" * width)
    if not parity_ok:
        print(
            "PARITY FAILED: some row ended more than 1e-3 away from the hand loop's parameters: "
            "the contenders did not do the same arithmetic (has SVITrainer's seeding or batching "
            "changed? see epoch_seed), so their times are not comparable."
        )


if __name__ == "__main__":
    main()
