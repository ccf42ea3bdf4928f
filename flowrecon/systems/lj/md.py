"""Langevin molecular dynamics of the same system: an independent check of the sampler.

Molecular dynamics with a Langevin thermostat samples the same Boltzmann distribution of
positions, exp(-U / T), as the Metropolis chains, by a different route (forces,
velocities and friction instead of random displacements and acceptance), so agreement of
their averages is a check of both. The integrator is BAOAB (Leimkuhler and Matthews,
Appl. Math. Res. Express 2013, 34): a half kick B, a half drift A, the exact
Ornstein-Uhlenbeck step O, a half drift and a half kick; its error in configurational
averages is O(dt^2) and small. The walls are hard: a drift that crosses a wall is
reflected specularly (the position mirrored, the normal velocity reversed), which is the
exact free flight with an elastic wall and leaves the Boltzmann distribution invariant.
Mass m = 1; replicas are independent boxes advanced together, ``(R, N, D)``.

Example:
    >>> md = LangevinMD(0.25, 1.5, n_particles=8, box=4.0, replicas=4, seed=0)
    >>> md.run(200, dt=0.002)
    >>> md.positions.shape
    torch.Size([4, 8, 3])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from flowrecon.systems.lj.sampler import lattice_start

__all__ = ["LangevinMD", "lj_forces"]


def lj_forces(pos: Tensor, weight: Tensor | float, interaction: bool = True) -> Tensor:
    """Forces -dU/dx ``(R, N, D)``; ``weight`` = 4 gamma (per replica or scalar)."""
    force = torch.zeros_like(pos)
    if interaction:
        d = pos.unsqueeze(2) - pos.unsqueeze(1)  # x_i - x_j, (R, N, N, D)
        r2 = (d * d).sum(-1)
        n = pos.shape[1]
        self_pair = torch.eye(n, dtype=torch.bool, device=pos.device)
        r2 = r2.masked_fill(self_pair, math.inf)
        i2 = 1.0 / r2
        i6 = i2 * i2 * i2
        # -dU/dr / r for U = 4 (r^-12 - r^-6): 24 (2 r^-14 - r^-8).
        coef = 24.0 * i6 * (2.0 * i6 - 1.0) * i2
        force = (coef.unsqueeze(-1) * d).sum(2)
    w = torch.as_tensor(weight, dtype=pos.dtype, device=pos.device).reshape(-1, 1)
    force[..., -1] -= w
    return force


def _reflect(x: Tensor, v: Tensor, box: float) -> tuple[Tensor, Tensor]:
    """Mirrors coordinates that crossed a wall and reverses their velocity."""
    low, high = x < 0, x > box
    x = torch.where(low, -x, torch.where(high, 2 * box - x, x))
    v = torch.where(low | high, -v, v)
    return x, v


class LangevinMD:
    """BAOAB Langevin dynamics of R independent boxes with hard walls and gravity.

    Args:
        gamma, temperature: The condition (scalars).
        n_particles, box, dim: N, L and D.
        replicas: Independent boxes R.
        friction: Langevin friction zeta (per unit time).
        interaction: False switches the pair interaction off.
        seed: Seed of the starting lattice, velocities and noise.
        device, dtype: Where and in what precision to integrate.
        compile: Fuse the force with ``torch.compile``.
    """

    def __init__(
        self,
        gamma: float,
        temperature: float,
        *,
        n_particles: int = 30,
        box: float = 5.0,
        dim: int = 3,
        replicas: int = 256,
        friction: float = 1.0,
        interaction: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        compile: bool = False,
    ) -> None:
        if not (temperature > 0 and friction > 0):
            raise ValueError("temperature and friction must be positive")
        self.gamma, self.temperature, self.box = float(gamma), float(temperature), float(box)
        self.friction, self.interaction = float(friction), bool(interaction)
        self.device, self.dtype = torch.device(device), dtype
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        start = lattice_start(
            replicas, n_particles, box, dim, torch.Generator().manual_seed(int(seed)), dtype
        )
        self.positions = start.permute(2, 0, 1).contiguous().to(self.device)
        self.velocities = self._noise() * math.sqrt(self.temperature)
        self._force: Callable[..., Tensor] = lj_forces
        if compile:
            self._force = torch.compile(lj_forces, dynamic=False)
        self.forces = self._force(self.positions, 4.0 * self.gamma, self.interaction)
        self.time = 0.0

    def _noise(self) -> Tensor:
        return torch.randn(
            self.positions.shape, generator=self.generator, device=self.device, dtype=self.dtype
        )

    def run(self, steps: int, dt: float, every: int = 0, observe: Callable | None = None) -> None:
        """Integrates ``steps`` BAOAB steps of size dt; calls ``observe(self)`` every n."""
        x, v, f = self.positions, self.velocities, self.forces
        c1 = math.exp(-self.friction * dt)
        c2 = math.sqrt((1 - c1 * c1) * self.temperature)
        half = 0.5 * dt
        for step in range(1, int(steps) + 1):
            v = v + half * f
            x, v = _reflect(x + half * v, v, self.box)
            v = c1 * v + c2 * self._noise()
            x, v = _reflect(x + half * v, v, self.box)
            f = self._force(x, 4.0 * self.gamma, self.interaction)
            v = v + half * f
            if every and observe is not None and step % every == 0:
                self.positions, self.velocities, self.forces = x, v, f
                observe(self)
        self.positions, self.velocities, self.forces = x, v, f
        self.time += steps * dt

    def kinetic_energy(self) -> Tensor:
        """Kinetic energy of each replica, ``(R,)``."""
        return 0.5 * (self.velocities**2).sum((1, 2))

    def potential_energy(self) -> Tensor:
        """Potential energy U (Lennard-Jones plus gravity) of each replica, ``(R,)``."""
        return self.lj_energy() + 4.0 * self.gamma * self.positions[..., -1].sum(1)

    def lj_energy(self) -> Tensor:
        """Lennard-Jones energy of each replica, ``(R,)``."""
        if not self.interaction:
            return torch.zeros(self.positions.shape[0], dtype=self.dtype, device=self.device)
        n = self.positions.shape[1]
        i, j = torch.triu_indices(n, n, 1, device=self.device)
        d = self.positions[:, i] - self.positions[:, j]
        inv6 = (d * d).sum(-1).reciprocal() ** 3
        return 4.0 * (inv6 * (inv6 - 1.0)).sum(1)
