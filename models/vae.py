"""The variational autoencoder's generative model p(z) p(x | z; theta) (DEC).

    z ~ N(0, I_k),   mu_D = F_mu(z; theta),   x | z ~ p(x | mu_D)

``F_mu`` is the ``decoder`` attribute, any ``nn.Module`` mapping (..., k) to (..., n).
What it outputs depends on the likelihood:

=================  ==================================  ===============================
likelihood         p(x | z)                            decoder output
=================  ==================================  ===============================
``gaussian-unit``  N(mu_D, I): the lecture's DEC        the mean mu_D
``gaussian``       N(mu_D, diag sigma^2), sigma learned the mean mu_D
``bernoulli``      Bernoulli per pixel (binary data)   logits
``binomial``       Binomial(count) per pixel           logits (e.g. 0..16 digits)
=================  ==================================  ===============================
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from pyro.ops.special import log_binomial
from torch import nn
from torch.distributions import constraints, transform_to

from .base import ancestral_sample, as_data_tensor, check_data_matrix, check_positive_int

LIKELIHOODS = ("gaussian-unit", "gaussian", "bernoulli", "binomial")


def mlp(
    sizes: list[int] | tuple[int, ...], activation: type[nn.Module] = nn.Softplus
) -> nn.Sequential:
    """A multilayer perceptron with ``activation`` between layers and a linear last layer."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def check_hidden(hidden) -> tuple[int, ...]:
    """Hidden layer sizes as a tuple of positive ints, from any iterable of them.

    A bare integer is refused (``hidden=16`` means one layer of 16: ``hidden=(16,)``), as
    are strings and non-iterables, with a ``ValueError`` that shows the tuple to pass.
    """
    if isinstance(hidden, (int, np.integer)) and not isinstance(hidden, bool):
        raise ValueError(
            f"hidden must be a sequence of layer sizes, got the integer {hidden!r}; pass a "
            f"tuple, e.g. hidden=({int(hidden)},) for one hidden layer of {int(hidden)} units"
        )
    if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
        raise ValueError(
            f"hidden must be a sequence of layer sizes, got {hidden!r}; pass a tuple, "
            "e.g. hidden=(128,), or hidden=() for no hidden layer"
        )
    hidden = tuple(hidden)
    for h in hidden:
        check_positive_int("every hidden layer size", h, "e.g. hidden=(128,)")
    return tuple(int(h) for h in hidden)


def _cuda_devices(*modules: nn.Module) -> list[int]:
    """The CUDA device indices the tensors of ``modules`` live on (for ``fork_rng``)."""
    devices = set()
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            if t.device.type == "cuda":
                devices.add(t.device.index or 0)
    return sorted(devices)


@contextmanager
def leaves_unchanged(*modules: nn.Module) -> Iterator[None]:
    """Run a probe of ``modules`` that leaves no trace: buffers, modes and RNG restored.

    On exit every buffer is the tensor object it was, holding the values it held (a
    BatchNorm's running statistics and ``num_batches_tracked`` included), every submodule
    is back in its train/eval mode, and torch's global random state (CPU and the CUDA
    devices the modules use) is what it was: a probe that runs dropout draws nothing
    from the caller's stream. Python attributes a forward pass changes (a call counter)
    cannot be restored.
    """
    modes = [(m, m.training) for module in modules for m in module.modules()]
    buffers = [
        (m, name, t, t.detach().clone())
        for module in modules
        for m in module.modules()
        for name, t in m._buffers.items()
        if t is not None
    ]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(*modules)):
            yield
    finally:
        with torch.no_grad():
            for m, name, t, saved in buffers:
                m._buffers[name] = t  # a buffer the probe reassigned gets its object back
                if t.shape != saved.shape:
                    t.data = saved
                elif not torch.equal(t, saved):
                    t.copy_(saved)
        for m, training in modes:
            m.training = training


def _shape(shapes: list[tuple[int, ...]]):
    return shapes if len(shapes) > 1 else shapes[0]


def check_network(
    net: nn.Module,
    in_dim: int,
    out_shapes: list[tuple[int, ...]],
    role: str,
    dtype: torch.dtype,
    leading_dims: bool = False,
) -> None:
    """Run ``net`` on a (2, in_dim) input and compare output shapes, at construction.

    ``out_shapes``: the expected output shapes for that input, e.g. ``[(2, n)]``. With
    ``leading_dims`` the network is also run on a (3, 2, in_dim) input and must return
    (3, 2, ...): the decoder sees z of shape (samples, batch, k) when particles are drawn
    in an outer plate (``elbo_per_datapoint``, ``iwae_log_likelihood``, vectorised
    particles). The probes run without gradients and leave every buffer, every
    submodule's train/eval mode and the global random state as they were
    (:func:`leaves_unchanged`). ``ValueError`` saying what to change otherwise.
    """
    out_dims = ", ".join(str(s[-1]) for s in out_shapes)
    leading_fix = (
        f"the {role} must accept any leading dimensions, (..., {in_dim}) -> "
        f"(..., {out_dims}), because particles are drawn in an outer plate "
        f"(elbo_per_datapoint, iwae_log_likelihood and vectorised particles pass "
        f"(samples, batch, {in_dim})): use nn.Linear layers, or flatten only the leading "
        f"dimensions, h = z.reshape(-1, {in_dim}), and restore them on the output, "
        "out.reshape(*z.shape[:-1], -1)"
    )
    # each probe: (leading dims, what a failure says, what a wrong output shape says)
    probes = [
        (
            (2,),
            lambda e: (
                f"cannot take inputs of shape (batch, {in_dim}): {e}; its first "
                f"layer must accept {in_dim} features"
            ),
            "make its output match",
        ),
    ]
    if leading_dims:
        probes.append(
            (
                (3, 2),
                lambda e: (
                    f"fails on an input of shape (3, 2, {in_dim}) "
                    f"({type(e).__name__}: {e}); {leading_fix}"
                ),
                leading_fix,
            )
        )
    with leaves_unchanged(net), torch.no_grad():
        for lead, fails, mismatch in probes:
            shape = (*lead, in_dim)
            try:
                out = net(torch.zeros(shape, dtype=dtype))
            except Exception as error:  # a shape error deep inside the user's network
                raise ValueError(f"the {role} {fails(error)}") from error
            outs = out if isinstance(out, tuple) else (out,)
            got = [tuple(o.shape) for o in outs]
            expected = [(*lead[:-1], *s) for s in out_shapes]
            if got != expected:
                raise ValueError(
                    f"the {role} maps {shape} to {_shape(got)}, expected {_shape(expected)}; "
                    f"{mismatch}"
                )


class LogitBinomial(dist.Binomial):
    """``Binomial(total_count, logits=...)`` whose ``log_prob`` spends one op on log(1 + e^l).

        log p(k) = k l - n log(1 + e^l) + log C(n, k),   log(1 + e^l) = logaddexp(l, 0)

    The value is Pyro's ``Binomial.log_prob`` (which writes log(1 + e^l) as
    max(l, 0) + log1p(e^-|l|), six elementwise ops each way through autograd); on a
    small VAE those ops are a sixth of a training step. log C(n, k) is computed on the
    shapes of n and k before broadcasting (M2 under enumeration: C times fewer lgamma
    calls). Sampling, support and validation are the parent's.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        n, logits = _unbroadcast(self.total_count), self.logits
        log1p_exp = torch.logaddexp(
            logits, torch.zeros((), dtype=logits.dtype, device=logits.device)
        )
        # log C(n, k) on the shape of n and k alone: under enumeration the logits are
        # (C, N, n) while k is (N, n), and the count a broadcast scalar
        return value * logits - n * log1p_exp + log_binomial(n, value)


def _unbroadcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` with each broadcast dimension (stride 0) cut to size 1: the same values.

    ``Binomial`` expands a scalar ``total_count`` to the logits' shape; arithmetic on the
    expanded view costs as much as on a full tensor, on the cut one it broadcasts back.
    """
    index = tuple(
        slice(0, 1) if stride == 0 and size > 1 else slice(None)
        for stride, size in zip(t.stride(), t.shape, strict=True)
    )
    return t[index]


class VAE(PyroModule):
    """p(z) p(x | z; theta) with z ~ N(0, I) and a neural decoder (DEC).

    Parameters
    ----------
    data_dim:
        n, the number of observed features.
    latent_dim:
        k, the dimension of z.
    hidden:
        Hidden layer sizes of the default decoder MLP (k -> hidden -> n): any iterable of
        positive ints, e.g. ``(128,)`` (an int alone is refused: ``hidden=(16,)``).
    likelihood:
        ``"gaussian-unit"`` (default, the lecture's N(mu_D, I)), ``"gaussian"``,
        ``"bernoulli"`` or ``"binomial"``.
    count:
        Number of trials for ``"binomial"`` (16 for scikit-learn's digits).
    decoder:
        Any ``nn.Module`` mapping (..., k) to (..., n), replacing the default MLP. It is
        checked at construction on (2, k) and (3, 2, k) inputs (evaluation draws particles
        in an outer plate, so z has leading sample dimensions); the checks leave its
        buffers (BatchNorm statistics) and train/eval mode as they were.
    """

    latent_site = "z"
    observed_site = "x"

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden: tuple[int, ...] = (128,),
        likelihood: str = "gaussian-unit",
        count: int | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.data_dim = check_positive_int("data_dim", data_dim, "pass the number of features")
        self.latent_dim = check_positive_int(
            "latent_dim", latent_dim, "a latent space needs at least one dimension"
        )
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.likelihood = likelihood
        if likelihood == "binomial":
            self.count = check_positive_int(
                "count",
                count,
                "the binomial likelihood needs the number of trials, "
                "e.g. count=16 for scikit-learn's digits",
            )
        else:
            self.count = None
        inputs = self.decoder_inputs()
        self.hidden = check_hidden(hidden)  # (guides built for this model default to them)
        self.decoder = decoder if decoder is not None else mlp([inputs, *self.hidden, data_dim])
        dtype = next(self.decoder.parameters(), torch.zeros(())).dtype
        check_network(self.decoder, inputs, [(2, data_dim)], "decoder", dtype, leading_dims=True)
        if likelihood == "gaussian":
            self.scale = PyroParam(torch.ones(data_dim, dtype=dtype), constraints.positive)

    def decoder_inputs(self) -> int:
        """The decoder's input size: k here (a conditional model adds its condition's)."""
        return self.latent_dim

    def reset_parameters(self) -> None:
        """Re-initialise the likelihood's own parameters in place: the ``"gaussian"`` scale
        sigma back to ones (the parameter object stays the same).

        The decoder's layers have their own ``reset_parameters``; ``SVITrainer`` calls
        every submodule's when its seed re-draws the starting weights.
        """
        unconstrained = self._parameters.get("scale_unconstrained")
        if unconstrained is not None:
            with torch.no_grad():
                ones = torch.ones_like(unconstrained)
                unconstrained.copy_(transform_to(constraints.positive).inv(ones))

    # ------------------------------------------------------------------ the Pyro program
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The Pyro program: z ~ N(0, I) and x | z inside ``pyro.plate("data", N)``."""
        return self._program(x.shape[0], x)

    def _program(self, n: int, x: torch.Tensor | None):
        # The network is read from _modules: PyroModule's attribute hook would send a param
        # message per weight on every call, and nothing here needs those sites.
        decoder = self._modules["decoder"]
        dtype = x.dtype if x is not None else self._dtype()
        with pyro.plate("data", n, dim=-1):
            prior = dist.Normal(
                torch.zeros(self.latent_dim, dtype=dtype), torch.ones(self.latent_dim, dtype=dtype)
            ).to_event(1)
            z = pyro.sample(self.latent_site, prior)
            return pyro.sample(self.observed_site, self.likelihood_dist(decoder(z)), obs=x)

    def likelihood_dist(self, out: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) given the decoder output (mean or logits), event shape (n,)."""
        if self.likelihood == "gaussian-unit":
            return dist.Normal(out, torch.ones_like(out)).to_event(1)
        if self.likelihood == "gaussian":
            return dist.Normal(out, self.scale).to_event(1)
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out).to_event(1)
        return LogitBinomial(total_count=self.count, logits=out).to_event(1)

    def _dtype(self) -> torch.dtype:
        return next(self._modules["decoder"].parameters(), torch.zeros(())).dtype

    # ------------------------------------------------------------------ helpers
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | z): mu_D, or probabilities (times ``count``) for the discrete ones."""
        return self.likelihood_mean(self.decoder(z))

    def likelihood_mean(self, out: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | ...) given the decoder output ``out`` (a mean, or logits)."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(out)
        if self.likelihood == "binomial":
            return self.count * torch.sigmoid(out)
        return out

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` samples by ancestral sampling; returns ``(x, z)``, shapes (n, n_x), (n, k)."""
        return ancestral_sample(self._program, n, seed)

    def validate_data(self, x, *, name: str = "x") -> torch.Tensor:
        """Check ``x`` (N, data_dim) and return it as a tensor of the model's dtype.

        ``ValueError`` with the fix for: not 2-D, empty, wrong feature count, NaN/inf,
        non-binary data (``"bernoulli"``), values outside 0..count (``"binomial"``).
        """
        t = check_data_matrix(as_data_tensor(x, self._dtype(), name), self.data_dim, name)
        if self.likelihood == "bernoulli" and not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(
                "the bernoulli likelihood needs binary data (every entry 0 or 1); binarise "
                "the data first, e.g. (x > 0.5), or use likelihood='binomial' or 'gaussian'."
            )
        if self.likelihood == "binomial" and not bool(
            ((t >= 0) & (t <= self.count) & (t == t.round())).all()
        ):
            raise ValueError(
                f"the binomial likelihood needs integer counts in 0..{self.count}; "
                "round the data or create the model with a larger count."
            )
        return t

    def extra_repr(self) -> str:
        return (
            f"data_dim={self.data_dim}, latent_dim={self.latent_dim}, "
            f"likelihood={self.likelihood!r}"
        )
