"""The M2 guide q(y | x; phi) q(z | x, y; phi): y summed exactly, z amortized (M2-L, M2-U).

    q(y | x) = Cat(softmax(G_y(x))),   q(z | x, y) = N(mu_E, diag sigma_E^2),
    (mu_E, sigma_E) = G_z([x, onehot(y)])

``guide(x, y)`` with labels samples z only: the model observes y, and the ELBO is the
labelled bound -L(x, y) (M2-L). ``guide(x)`` marks y for parallel enumeration, so
``TraceEnum_ELBO`` sums it over its C values instead of sampling it:

    E_{q(y|x)}[-L(x, y)] + H(q(y | x)) = sum_y q(y | x) (-L(x, y)) - sum_y q(y | x) log q(y | x)

which is the unlabelled bound -U(x) (M2-U): the exact-posterior idea of EM applied to the
discrete latent, the amortized idea of the VAE to the continuous one. Under enumeration
y has shape (C, 1) and z (C, N, k): one draw of z per class and datum.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from ..models.base import as_data_tensor, check_data_matrix
from ..models.semi_supervised import SemiSupervisedVAE, concat_condition
from ..models.vae import check_hidden, check_network, mlp
from .amortized import GaussianEncoder


class SemiSupervisedGuide(PyroModule):
    """q(y | x) a classifier and q(z | x, y) an encoder, for a :class:`SemiSupervisedVAE`.

    Parameters
    ----------
    model:
        The :class:`~elbolab.models.SemiSupervisedVAE` it is the guide of: n, C and k are
        read from it, and the default networks take its ``hidden`` sizes and dtype.
    hidden:
        Hidden layer sizes of the default classifier (n -> hidden -> C) and encoder
        ((n + C) -> hidden -> (mu_E, sigma_E)); default the model's ``hidden``.
    classifier:
        Any ``nn.Module`` mapping (N, n) to logits (N, C), replacing the default MLP.
    encoder:
        Any ``nn.Module`` mapping (..., n + C) to ``(mu_E, sigma_E)``, each (..., k),
        replacing the default :class:`GaussianEncoder`. It sees (C, N, n + C) inputs under
        enumeration; both networks are checked at construction, leaving buffers and modes
        as they were.

    The guide's sites are ``"y"`` (only where the labels are not given) and ``"z"``, inside
    ``pyro.plate("data", N)``; ``forward(x, y=None)`` has the model's signature.
    """

    def __init__(
        self,
        model: SemiSupervisedVAE,
        hidden: tuple[int, ...] | None = None,
        classifier: nn.Module | None = None,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, SemiSupervisedVAE):
            raise ValueError(
                f"SemiSupervisedGuide is the guide of a SemiSupervisedVAE, got "
                f"{type(model).__name__}; build the model first, e.g. "
                "SemiSupervisedGuide(SemiSupervisedVAE(64, 10))"
            )
        self.data_dim, self.latent_dim = model.data_dim, model.latent_dim
        self.n_classes = model.n_classes
        self.latent_site, self.label_site = model.latent_site, model.label_site
        # binomial counts 0..count reach the networks as proportions in [0, 1]
        self.input_scale = 1.0 / model.count if model.likelihood == "binomial" else 1.0
        dtype = model._dtype()
        hidden = check_hidden(model.hidden if hidden is None else hidden)
        n, C, k = self.data_dim, self.n_classes, self.latent_dim
        self.classifier = classifier if classifier is not None else mlp([n, *hidden, C]).to(dtype)
        self.encoder = (
            encoder if encoder is not None else GaussianEncoder(n + C, k, hidden).to(dtype)
        )
        check_network(self.classifier, n, [(2, C)], "classifier", dtype)
        check_network(self.encoder, n + C, [(2, k), (2, k)], "encoder", dtype, leading_dims=True)

    # ------------------------------------------------------------------ the two networks
    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """log q(y | x), shape (N, C) (normalised: logsumexp over classes is 0)."""
        return torch.log_softmax(self._modules["classifier"](x * self.input_scale), dim=-1)

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_E, sigma_E) of q(z | x, y), each (..., N, k); y (N,) or (C, 1) under enumeration."""
        return self._modules["encoder"](concat_condition(x * self.input_scale, y, self.n_classes))

    @torch.no_grad()
    def class_probs(self, x) -> torch.Tensor:
        """q(y | x), shape (N, C)."""
        return self.class_logits(self._as_data(x)).exp()

    @torch.no_grad()
    def classify(self, x) -> torch.Tensor:
        """The most probable class under q(y | x), shape (N,) (long)."""
        return self.class_logits(self._as_data(x)).argmax(-1)

    def _as_data(self, x) -> torch.Tensor:
        dtype = next(self.parameters(), torch.zeros(())).dtype
        return check_data_matrix(as_data_tensor(x, dtype, "x"), self.data_dim, "x")

    # ------------------------------------------------------------------ the Pyro program
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z ~ q(z | x, y); without labels y ~ q(y | x) first, marked for enumeration."""
        with pyro.plate("data", x.shape[0], dim=-1):
            if y is None:
                y = pyro.sample(
                    self.label_site,
                    dist.Categorical(logits=self.class_logits(x)),
                    infer={"enumerate": "parallel"},
                )
            loc, scale = self.encode(x, y)
            return pyro.sample(self.latent_site, dist.Normal(loc, scale).to_event(1))
