"""Conditional variational autoencoder, as in the seed decks.

Encoder q(z | x, y) and decoder p(x | z, y) are MLPs; the encoder's hidden widths are
``hidden_dim * 2**i`` for ``i < num_layers`` and the decoder mirrors them. The loss is
``recon + beta * kl`` in model space, where ``recon`` is the squared error summed over
coordinates and averaged over the batch (``x_dim`` times the MSE) and ``kl`` is the KL
divergence to the standard-normal prior summed over latent dimensions.

There is no tractable density (``has_density = False``). Sampling sees y only: z comes
from the prior N(0, I) (default) or, with ``latent_sampling="train_stats"``, from a
diagonal normal with the mean and std of the encoder means over the training set (what
the seed decks did); those statistics are buffers, filled in at the end of training.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flowrecon.models._estimator import Estimator
from flowrecon.nn import check_activation, check_at_least, choose, mlp

LATENT_SAMPLING = ("prior", "train_stats")


class CVAE(Estimator):
    """The conditional VAE estimator; build it with `build_cvae`."""

    has_density = False

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        hidden_dim: int,
        num_layers: int,
        latent_dim: int,
        activation: str,
        beta: float,
        latent_sampling: str,
    ) -> None:
        super().__init__(x_dim, y_dim)
        widths = [hidden_dim * 2**i for i in range(num_layers)]
        self.latent_dim = latent_dim
        self.beta = float(beta)
        self.latent_sampling = latent_sampling
        self.encoder = mlp(x_dim + y_dim, 2 * latent_dim, widths, activation)
        self.decoder = mlp(latent_dim + y_dim, x_dim, widths[::-1], activation)
        self.register_buffer("latent_mean", torch.zeros(latent_dim))
        self.register_buffer("latent_std", torch.ones(latent_dim))

    def encode(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z | x, y)."""
        mu, logvar = self.encoder(torch.cat([x, y], -1)).chunk(2, -1)
        # Clamped so that exp() can neither overflow nor underflow to a zero std.
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor, y: Tensor) -> Tensor:
        return self.decoder(torch.cat([z, y], -1))

    def loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        mu, logvar = self.encode(x, y)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = (self.decode(z, y) - x).square().sum(-1).mean()
        kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(-1).mean()
        return {"loss": recon + self.beta * kl, "recon": recon, "kl": kl}

    def sample(self, n: int, y: Tensor, temperature: float = 1.0) -> Tensor:
        z = torch.randn(n, y.shape[0], self.latent_dim, device=y.device, dtype=y.dtype)
        z = temperature * z
        if self.latent_sampling == "train_stats":
            z = self.latent_mean + self.latent_std * z
        return self.decode(z, y.expand(n, *y.shape))

    @torch.no_grad()
    def on_fit_end(self, x: Tensor, y: Tensor, batch_size: int = 4096) -> None:
        """Stores the mean and std of the encoder means over the training set."""
        mus = torch.cat(
            [
                self.encode(x[i : i + batch_size], y[i : i + batch_size])[0]
                for i in range(0, len(x), batch_size)
            ]
        )
        self.latent_mean.copy_(mus.mean(0))
        self.latent_std.copy_(mus.std(0, correction=0).clamp_min(1e-6))


def build_cvae(
    x_dim: int,
    y_dim: int,
    *,
    hidden_dim: int = 64,
    num_layers: int = 3,
    latent_dim: int = 16,
    activation: Literal["relu", "elu", "tanh", "sigmoid", "leaky_relu", "gelu", "silu"] = "relu",
    beta: float = 1.0,
    latent_sampling: Literal["prior", "train_stats"] = "prior",
) -> CVAE:
    """Builds the conditional VAE.

    Args:
        x_dim: Width of the target in model space.
        y_dim: Width of the condition in model space.
        hidden_dim: Width of the first encoder layer; layer i has ``hidden_dim * 2**i``.
        num_layers: Number of hidden layers of the encoder (and of the decoder).
        latent_dim: Width of the latent z.
        activation: Activation between layers.
        beta: Weight of the KL term.
        latent_sampling: ``"prior"`` draws z from N(0, I); ``"train_stats"`` from the
            training-set statistics of the encoder means.

    Example:
        >>> vae = build_cvae(3, 2, hidden_dim=8, num_layers=2, latent_dim=4)
        >>> vae.sample(5, torch.zeros(7, 2)).shape
        torch.Size([5, 7, 3])
    """
    check_activation(activation)
    choose("latent_sampling", latent_sampling, dict.fromkeys(LATENT_SAMPLING))
    check_at_least(
        hidden_dim=int(hidden_dim), num_layers=int(num_layers), latent_dim=int(latent_dim)
    )
    check_at_least(beta=(beta, 0))
    return CVAE(
        x_dim,
        y_dim,
        int(hidden_dim),
        int(num_layers),
        int(latent_dim),
        activation.lower(),
        beta,
        latent_sampling,
    )
