"""A discrete and a continuous latent in one model: the M2 semi-supervised VAE (M2-L, M2-U).

    y ~ Cat(pi),   z ~ N(0, I_k),   x | y, z ~ p(x | F(z, y); theta)

(Kingma, Rezende, Mohamed & Welling, 2014). The class y is discrete, so where it is not
observed its posterior is summed exactly, as in EM; the style z is continuous, so its
posterior is amortized, as in the VAE. The decoder F reads the concatenation [z, onehot(y)]
and its output means what it means for :class:`~elbolab.models.VAE` (a mean, or logits);
the likelihoods are the VAE's.

The program is ``model(x, y=None)``: ``y`` (N,) integer labels observes the class site
(the labelled bound, M2-L); without it y is a latent of the data plate, which
:class:`~elbolab.guides.SemiSupervisedGuide` enumerates (the unlabelled bound, M2-U).
"""

from __future__ import annotations

from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .base import check_positive_int, check_seed
from .vae import VAE


def one_hot(y: torch.Tensor, n_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """onehot(y), shape (*y.shape, n_classes), written as a comparison.

    ``torch.nn.functional.one_hot`` reads the labels' range into Python, which a recorded
    ELBO (:class:`~elbolab.inference.CompiledELBO`) cannot replay; a comparison with
    ``arange`` is the same tensor.
    """
    return (y.unsqueeze(-1) == torch.arange(n_classes, device=y.device)).to(dtype)


def concat_condition(h: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[h, onehot(y)] along the last dimension, leading dimensions broadcast.

    ``h`` (..., m) and ``y`` (...) broadcast against each other: under enumeration y is
    (C, 1) and h (N, m) or (C, N, m), and the result is (C, N, m + C).
    """
    code = one_hot(y, n_classes, h.dtype)
    lead = torch.broadcast_shapes(h.shape[:-1], code.shape[:-1])
    return torch.cat([h.expand(*lead, h.shape[-1]), code.expand(*lead, n_classes)], dim=-1)


class SemiSupervisedVAE(VAE):
    """p(y) p(z) p(x | y, z; theta): the M2 generative model.

    Parameters
    ----------
    data_dim:
        n, the number of observed features.
    n_classes:
        C >= 2, the number of classes y takes.
    latent_dim:
        k, the dimension of the style z (default 50, as in the paper).
    hidden:
        Hidden layer sizes of the default decoder MLP, (k + C) -> hidden -> n (default
        ``(256,)``). An int alone is refused: ``hidden=(16,)``.
    likelihood, count:
        As for :class:`~elbolab.models.VAE`: ``"gaussian-unit"`` (default),
        ``"gaussian"``, ``"bernoulli"`` or ``"binomial"`` with ``count`` trials (16 for
        scikit-learn's digits).
    decoder:
        Any ``nn.Module`` mapping (..., k + C) to (..., n), replacing the default MLP; its
        input is [z, onehot(y)]. Checked at construction on (2, k + C) and (3, 2, k + C).
    class_probs:
        p(y) = Cat(pi), a length-C vector of positive numbers summing to 1 (a fixed prior,
        not learned); default uniform, as in the paper.

    The model's sites are ``"y"`` (observed where labels are given), ``"z"`` and ``"x"``,
    all inside ``pyro.plate("data", N)``.
    """

    label_site = "y"

    def __init__(
        self,
        data_dim: int,
        n_classes: int,
        latent_dim: int = 50,
        hidden: tuple[int, ...] = (256,),
        likelihood: str = "gaussian-unit",
        count: int | None = None,
        decoder: nn.Module | None = None,
        class_probs=None,
    ) -> None:
        n_classes = check_positive_int("n_classes", n_classes, "the number of classes, e.g. 10")
        if n_classes < 2:
            raise ValueError(
                f"n_classes must be at least 2, got {n_classes}; a single class leaves "
                "nothing to classify (use VAE for a model without a class)"
            )
        self.n_classes = n_classes  # before VAE's __init__, which sizes the decoder with it
        super().__init__(data_dim, latent_dim, hidden, likelihood, count, decoder)
        dtype = self._dtype()
        if class_probs is None:
            probs = torch.full((n_classes,), 1.0 / n_classes, dtype=dtype)
        else:
            probs = torch.as_tensor(class_probs, dtype=dtype)
            if (
                probs.shape != (n_classes,)
                or not bool(torch.isfinite(probs).all())
                or not bool((probs > 0).all())
                or abs(float(probs.sum()) - 1.0) > 1e-6
            ):
                raise ValueError(
                    f"class_probs must be {n_classes} positive numbers summing to 1, got "
                    f"{class_probs!r}; e.g. the class frequencies, or None for uniform"
                )
        self.register_buffer("class_logits", probs.log())

    def default_loss(self) -> pyro.infer.ELBO:
        """The ELBO :class:`~elbolab.inference.SVITrainer` uses for this model by default:
        ``TraceEnum_ELBO(max_plate_nesting=1)``, which sums the guide's y exactly (M2-U)."""
        return pyro.infer.TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)

    def decoder_inputs(self) -> int:
        """k + C: the decoder reads [z, onehot(y)]."""
        return self.latent_dim + self.n_classes

    # ------------------------------------------------------------------ the Pyro program
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The Pyro program: y ~ Cat(pi), z ~ N(0, I), x | y, z inside ``pyro.plate("data", N)``.

        ``y``: (N,) integer labels (observed: M2-L), or None (y latent: M2-U).
        """
        return self._program(x.shape[0], x, y)

    def _program(self, n: int, x: torch.Tensor | None, y: torch.Tensor | None = None):
        decoder = self._modules["decoder"]  # (see VAE._program)
        dtype = x.dtype if x is not None else self._dtype()
        with pyro.plate("data", n, dim=-1):
            y = pyro.sample(self.label_site, dist.Categorical(logits=self.class_logits), obs=y)
            prior = dist.Normal(
                torch.zeros(self.latent_dim, dtype=dtype), torch.ones(self.latent_dim, dtype=dtype)
            ).to_event(1)
            z = pyro.sample(self.latent_site, prior)
            out = decoder(concat_condition(z, y, self.n_classes))
            return pyro.sample(self.observed_site, self.likelihood_dist(out), obs=x)

    # ------------------------------------------------------------------ helpers
    def decode(self, z: torch.Tensor, y) -> torch.Tensor:
        """The mean of p(x | y, z), shape (..., n): z (..., k), y an int or (...) labels."""
        y = torch.as_tensor(y, dtype=torch.long)
        return self.likelihood_mean(self.decoder(concat_condition(z, y, self.n_classes)))

    @torch.no_grad()
    def sample(
        self, n: int, y=None, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` draws by ancestral sampling; returns ``(x, y, z)``, (n, data_dim), (n,), (n, k).

        ``y``: None (y ~ p(y)), one class for every draw, or (n,) labels: class-conditional
        samples. A ``seed`` fixes the draws without touching the caller's random state.
        """
        n = check_positive_int("n", n, "the number of samples to draw")
        seed = check_seed(seed)
        labels = None if y is None else self.validate_labels(y, n, name="y")
        if labels is not None and labels.dim() == 0:
            labels = labels.expand(n)
        with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
            if seed is not None:
                torch.manual_seed(seed)  # the caller's random state is left as it was
            trace = pyro.poutine.trace(self._program).get_trace(n, None, labels)
        return (
            trace.nodes[self.observed_site]["value"],
            trace.nodes[self.label_site]["value"],
            trace.nodes[self.latent_site]["value"],
        )

    def validate_labels(
        self, y, n: int | None = None, *, name: str = "y", allow_missing: bool = False
    ) -> torch.Tensor:
        """Labels as a long tensor: a scalar class, or (n,) with entries in 0..C-1.

        With ``allow_missing`` an entry of -1 marks an unlabelled datum. ``ValueError``
        naming the fix for non-integer values, labels out of range, or a length other
        than ``n``.
        """
        t = torch.as_tensor(y)
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
                raise ValueError(
                    f"{name} must hold integer class labels, got non-integer values; pass "
                    "integers 0..n_classes-1" + (" (-1 where unlabelled)" if allow_missing else "")
                )
        elif t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name} must hold integer class labels, got dtype {t.dtype}")
        t = t.long()
        if t.dim() > 1 or (t.dim() == 0 and n is None):
            raise ValueError(f"{name} must be a 1-D tensor of labels, got shape {tuple(t.shape)}")
        if t.dim() == 1 and n is not None and t.shape[0] != n:
            raise ValueError(
                f"{name} has {t.shape[0]} labels but there are {n} data points; pass one "
                "label per row of x" + (" (-1 where unlabelled)" if allow_missing else "")
            )
        low = -1 if allow_missing else 0
        bad = (t < low) | (t >= self.n_classes)
        if bool(bad.any()):
            value = int(t[bad].flatten()[0])
            allowed = f"0..{self.n_classes - 1}" + (
                ", or -1 for unlabelled" if allow_missing else ""
            )
            raise ValueError(
                f"{name} holds the label {value}, outside {allowed} (n_classes="
                f"{self.n_classes}); relabel the classes as 0..{self.n_classes - 1}"
            )
        return t

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_classes={self.n_classes}"
