"""The contract every backend adapter implements.

An estimator is a plain ``torch.nn.Module`` that works in *model space*: x and y have
already been preprocessed (scaled, rotated, reduced) by ``ConditionalGenerator``, so an
adapter only wraps one library's network. Shapes:

- ``x``: ``(B, x_dim)``, ``y``: ``(B, y_dim)``, both float32 on the module's device.
- ``loss(x, y)`` returns a dict of 0-d tensors; ``"loss"`` is the total that is minimised,
  the other keys are its components (``"nll"``, or ``"recon"`` and ``"kl"``) and are logged.
- ``sample(n, y, temperature=1.0)`` returns ``(n, B, x_dim)``: sample-first, always; the
  latent draw is scaled by ``temperature`` (z ~ N(0, temperature^2 I)).
- ``log_prob(x, y)`` returns ``(B,)`` natural-log densities including every constant;
  estimators without a density (the cVAE) set ``has_density = False`` and raise.
- ``to_latent(x, y)`` returns ``(z, log|det dz/dx|)``, each row's latent point and
  log-Jacobian: estimators with a density implement it, so that tempered densities
  (``temperature != 1``) can be evaluated.

Log-Jacobian convention: for a flow z = f(x; y), ``log_prob(x, y) = log N(f(x); 0, I) +
log|det df/dx|``, the log-determinant taken of the map from x (data) to z (latent).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LOG_2PI = math.log(2.0 * math.pi)


class Estimator(nn.Module):
    """Base class of backend adapters: see the module docstring for the contract."""

    has_density: bool = True

    def __init__(self, x_dim: int, y_dim: int) -> None:
        super().__init__()
        self.x_dim = int(x_dim)
        self.y_dim = int(y_dim)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training loss; the default is the mean negative log-likelihood."""
        nll = -self.log_prob(x, y).mean()
        return {"loss": nll, "nll": nll}

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no density")

    def sample(self, n: int, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    def to_latent(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log|det dz/dx|)`` of each row, ``(B, x_dim)`` and ``(B,)``."""
        raise NotImplementedError(f"{type(self).__name__} has no latent map")


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """Log density of N(0, I) over the last axis, including the -D/2 log(2 pi) constant.

    Example:
        >>> standard_normal_log_prob(torch.zeros(1, 2, dtype=torch.float64))  # -log(2 pi)
        tensor([-1.8379], dtype=torch.float64)
    """
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * _LOG_2PI)
