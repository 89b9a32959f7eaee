"""The amortized guide q(z | x; phi) = N(mu_E, diag sigma_E^2), mu_E = G_mu(x; phi) (ENC, AMORT).

One network, the ``encoder``, serves every data point: instead of a separate q_d per
datum (EM's E-step) the guide learns the map x -> q(z | x). With ``scale="unit"`` the
encoder returns mu_E and sigma_E = 1, exactly the lecture's ENC; with ``scale="learned"``
it returns ``(mu_E, sigma_E)``.

It fits any model whose latent site (``"z"`` by default) is a continuous vector of size
``latent_dim`` inside ``pyro.plate("data", N)``; a new latent model reuses it as is.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from ..models.vae import check_hidden, check_network, check_positive_int, mlp


class GaussianEncoder(nn.Module):
    """x -> (mu_E, sigma_E): a shared MLP body with a mean head and a positive scale head."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.body = mlp([data_dim, *hidden]) if hidden else nn.Identity()
        width = hidden[-1] if hidden else data_dim
        self.activation = nn.Softplus() if hidden else nn.Identity()
        self.loc = nn.Linear(width, latent_dim)
        self.scale = nn.Linear(width, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.activation(self.body(x))
        return self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-6


class AmortizedNormal(PyroModule):
    """q(z | x; phi) = N(mu_E, I) (``scale="unit"``, ENC) or N(mu_E, diag sigma_E^2).

    Parameters
    ----------
    data_dim, latent_dim:
        n and k.
    hidden:
        Hidden layer sizes of the default encoder MLP: any iterable of positive ints,
        e.g. ``(128,)`` (an int alone is refused: one layer of 16 is ``hidden=(16,)``).
    scale:
        ``"unit"`` (the lecture's ENC) or ``"learned"``.
    encoder:
        Any ``nn.Module``: x (N, n) -> mu_E (N, k) for ``"unit"``, or -> (mu_E, sigma_E)
        for ``"learned"``. It only ever sees 2-D inputs (evaluation draws the particles
        from the distribution it returns), and its check at construction leaves its
        buffers and train/eval mode as they were.
    latent_site:
        Name of the model's latent site.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden: tuple[int, ...] = (128,),
        scale: str = "unit",
        encoder: nn.Module | None = None,
        latent_site: str = "z",
    ) -> None:
        super().__init__()
        self.data_dim = check_positive_int("data_dim", data_dim, "pass the number of features")
        self.latent_dim = check_positive_int(
            "latent_dim", latent_dim, "a latent space needs at least one dimension"
        )
        if scale not in ("unit", "learned"):
            raise ValueError(f"scale must be 'unit' or 'learned', got {scale!r}")
        if not isinstance(latent_site, str) or not latent_site:
            raise ValueError(
                f"latent_site must be the name of the model's latent site, got {latent_site!r}; "
                "e.g. latent_site='z' for VAE"
            )
        self.scale, self.latent_site = scale, latent_site
        if encoder is None:
            hidden = check_hidden(hidden)
            if scale == "unit":
                encoder = mlp([data_dim, *hidden, latent_dim])
            else:
                encoder = GaussianEncoder(data_dim, latent_dim, hidden)
        self.encoder = encoder
        dtype = next(self.encoder.parameters(), torch.zeros(())).dtype
        outs = [(2, latent_dim)] if scale == "unit" else [(2, latent_dim), (2, latent_dim)]
        check_network(self.encoder, data_dim, outs, "encoder", dtype)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_E, sigma_E), each (N, k)."""
        encoder = self._modules["encoder"]  # see VAE._program: no per-weight param messages
        if self.scale == "unit":
            loc = encoder(x)
            return loc, torch.ones_like(loc)
        return encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sample z ~ q(z | x) inside ``pyro.plate("data", N)`` (same signature as the model)."""
        loc, scale = self.encode(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            return pyro.sample(self.latent_site, dist.Normal(loc, scale).to_event(1))
