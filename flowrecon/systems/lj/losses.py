"""Physics loss terms of the Lennard-Jones system for `flowrecon.training.train`.

A model fitted by maximum likelihood alone spreads a little mass everywhere, and in 90
dimensions "a little" near each of 435 pairs makes almost every draw contain two
particles inside each other's core (r < 0.8 sigma, an energy of ~40 epsilon that the
Boltzmann distribution never visits). These terms act on differentiable draws of the
model during training (in the user's coordinates, after every inverse transform):

- ``overlap``: sum over pairs of relu(r0 - r)^2, r0 = 0.85 sigma by default. The
  held-out Monte Carlo has no pair below 0.85 (smallest of 30,000 configurations:
  0.852), so the term vanishes on the target distribution: it cannot move the optimum of
  maximum likelihood, only where training spends its effort.
- ``wall``: sum of squared distances outside the box (zero with the chamber transform,
  whose draws are always inside).
- ``energy``: U / (N T) with the pair part soft-clipped above ``clip`` (log growth) so
  that one overlap does not dominate the batch: logged by default. Weighting it pulls the
  model towards low energies, a bias (without the model's entropy it is not the reverse
  Kullback-Leibler divergence); use it knowingly.

Use them as ``model.fit(..., physics_loss=physics_loss(n, dim, box),
physics_weights={"overlap": 100.0})``; the System offers them as ``physics_terms``.
Samples must carry gradients: coupling flows (zuko-realnvp, freia-cinn) draw in one
pass; autoregressive flows need one pass a coordinate and make training slow.

Example:
    >>> import torch
    >>> terms = physics_loss(2, 1, 3.0)(torch.tensor([[[0.5, 1.0]]]), None,
    ...                                 torch.tensor([[0.0, 1.0]]))
    >>> round(float(terms["overlap"]), 4)  # one pair at r = 0.5: (0.85 - 0.5)^2
    0.1225
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TERMS", "physics_loss"]

#: Names of the terms `physics_loss` returns, for ``physics_weights``.
TERMS: tuple[str, ...] = ("overlap", "wall", "energy")


def _pair_r2(conf: Tensor) -> Tensor:
    n = conf.shape[-2]
    i, j = torch.triu_indices(n, n, 1, device=conf.device)
    d = conf[..., i, :] - conf[..., j, :]
    return (d * d).sum(-1)


def physics_loss(
    n_particles: int,
    dim: int,
    box: float,
    *,
    r0: float = 0.85,
    clip: float = 100.0,
) -> Callable[[Tensor, Tensor | None, Tensor], dict[str, Tensor]]:
    """The LJ physics terms as a ``physics_loss(x_sample, x_true, y)`` callable.

    Args:
        n_particles, dim, box: The system.
        r0: Distance below which a pair is penalised (sigma).
        clip: Pair energy per configuration (epsilon) above which ``energy`` grows only
            logarithmically.

    The terms are means over draws and conditions of per-configuration sums; ``y`` holds
    (gamma, T) per condition row, ``x_sample`` is ``(n, B, N * D)``.
    """

    def loss(x_sample: Tensor, x_true: Tensor | None, y: Tensor) -> dict[str, Tensor]:
        conf = x_sample.reshape(*x_sample.shape[:-1], n_particles, dim)
        r2 = _pair_r2(conf)
        r = torch.sqrt(r2.clamp_min(1e-12))
        overlap = torch.relu(r0 - r).square().sum(-1)
        wall = (torch.relu(-conf).square() + torch.relu(conf - box).square()).sum((-1, -2))
        inv6 = r2.clamp_min(1e-6).reciprocal() ** 3
        pair = 4.0 * (inv6 * (inv6 - 1.0)).sum(-1)
        pair = torch.where(pair > clip, clip + torch.log1p((pair - clip).clamp_min(0)), pair)
        gamma, temp = y[..., 0], y[..., 1]
        energy = (pair + 4.0 * gamma * conf[..., -1].sum(-1)) / (n_particles * temp)
        return {"overlap": overlap.mean(), "wall": wall.mean(), "energy": energy.mean()}

    return loss
