"""Initial geometries of OCS and simulated CEI data sets.

Two samplers: ``ocs`` (the molecule near its linear equilibrium, with vibrational
spread) and ``ball`` (three atoms anywhere in a ball, a harder, broader test set).
Both return positions in bohr with the centre of mass at the origin and a uniformly
random orientation. ``simulate_events`` explodes them and adds detector noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flowrecon.base import resolve_device
from flowrecon.systems.cei.constants import DEFAULT_CHARGES, MASSES, R_CO_EQ, R_CS_EQ
from flowrecon.systems.cei.simulator import IntegratorSettings, asymptotic_momenta

GEOMETRIES: tuple[str, ...] = ("ocs", "ball")

__all__ = [
    "GEOMETRIES",
    "SimulatedEvents",
    "random_rotations",
    "sample_ball",
    "sample_ocs",
    "simulate_events",
]


def random_rotations(
    n: int, generator: torch.Generator, *, dtype=torch.float64, device="cpu"
) -> torch.Tensor:
    """Uniformly distributed rotation matrices (n, 3, 3), from normalised quaternions.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> R = random_rotations(4, g)
        >>> bool(torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(4, 3, 3).double()))
        True
    """
    q = torch.randn(n, 4, generator=generator, dtype=dtype, device=generator.device)
    q = (q / q.norm(dim=1, keepdim=True)).to(device)
    w, x, y, z = q.unbind(1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


def _centre_and_orient(
    x: torch.Tensor, generator: torch.Generator, masses: Sequence[float], rotate: bool
) -> torch.Tensor:
    m = torch.as_tensor(masses, dtype=x.dtype, device=x.device)
    x = x - (m[:, None] * x).sum(1, keepdim=True) / m.sum()
    if rotate:
        rot = random_rotations(x.shape[0], generator, dtype=x.dtype, device=x.device)
        x = x @ rot.transpose(1, 2)
    return x.reshape(-1, 9)


def sample_ocs(
    n: int,
    generator: torch.Generator,
    *,
    bond_sigma: float = 0.1,
    bend_sigma_deg: float = 10.0,
    r_co: float = R_CO_EQ,
    r_cs: float = R_CS_EQ,
    masses: Sequence[float] = MASSES,
    rotate: bool = True,
    bend_sampler: Callable[[int, torch.Generator], torch.Tensor] | None = None,
) -> torch.Tensor:
    """OCS geometries near linear equilibrium, shape (n, 9), bohr, float64.

    Bond lengths are Gaussian around equilibrium with ``bond_sigma``. The bend is the
    doubly degenerate bending mode: its two components are Gaussian with
    ``bend_sigma_deg`` each, so the deviation from linear follows a Rayleigh law
    (exactly linear molecules are rare, as in nature). Bonds are kept above 0.5 bohr.

    ``bend_sampler(n, generator)``, when given, replaces that law: it returns the n
    deviations from linear in radians (float64, on the generator's device), e.g. a law
    peaked at linear for a stress test with sparse tails. ``bend_sigma_deg`` is then unused.

    Example:
        >>> x = sample_ocs(3, torch.Generator().manual_seed(0))
        >>> tuple(x.shape)
        (3, 9)
    """
    g = generator
    dev = g.device
    r1 = (r_co + bond_sigma * torch.randn(n, generator=g, dtype=torch.float64, device=dev)).clamp(
        min=0.5
    )
    r2 = (r_cs + bond_sigma * torch.randn(n, generator=g, dtype=torch.float64, device=dev)).clamp(
        min=0.5
    )
    if bend_sampler is None:
        bend_xy = math.radians(bend_sigma_deg) * torch.randn(
            n, 2, generator=g, dtype=torch.float64, device=dev
        )
        bend = bend_xy.norm(dim=1).clamp(max=math.pi)
    else:
        bend = torch.as_tensor(bend_sampler(n, g), dtype=torch.float64, device=dev)
        if bend.shape != (n,):
            raise ValueError(f"bend_sampler must return {n} bends, got shape {tuple(bend.shape)}")
        bend = bend.clamp(min=0.0, max=math.pi)
    x = torch.zeros(n, 3, 3, dtype=torch.float64, device=dev)
    x[:, 1, 0] = -r1  # O on the -x side of C
    x[:, 2, 0] = r2 * torch.cos(bend)  # S bent away from the axis in the xy plane
    x[:, 2, 1] = r2 * torch.sin(bend)
    return _centre_and_orient(x, g, masses, rotate)


def sample_ball(
    n: int,
    generator: torch.Generator,
    *,
    radius: float = 4.0,
    min_distance: float = 0.5,
    masses: Sequence[float] = MASSES,
    rotate: bool = True,
) -> torch.Tensor:
    """Three atoms uniform in a ball of ``radius`` bohr, pair distances >= ``min_distance``.

    Rejection sampling in batches; shape (n, 9), centre of mass at the origin.

    Example:
        >>> x = sample_ball(5, torch.Generator().manual_seed(0))
        >>> tuple(x.shape)
        (5, 9)
    """
    if min_distance >= radius:
        raise ValueError(f"min_distance ({min_distance}) must be below radius ({radius})")
    g = generator
    dev = g.device
    accepted: list[torch.Tensor] = []
    have = 0
    while have < n:
        want = max(64, int(1.5 * (n - have)) + 16)
        # Uniform in the ball: Gaussian direction, radius ~ U^(1/3).
        direction = torch.randn(want, 3, 3, generator=g, dtype=torch.float64, device=dev)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        rad = radius * torch.rand(want, 3, 1, generator=g, dtype=torch.float64, device=dev) ** (
            1 / 3
        )
        p = direction * rad
        d = torch.stack([(p[:, 0] - p[:, 1]), (p[:, 0] - p[:, 2]), (p[:, 1] - p[:, 2])], 1).norm(
            dim=-1
        )
        ok = p[(d >= min_distance).all(1)]
        accepted.append(ok)
        have += ok.shape[0]
    x = torch.cat(accepted)[:n]
    # Orientation is already uniform; only recentre.
    return _centre_and_orient(x, g, masses, rotate=False)


def add_momentum_noise(
    p: torch.Tensor, relative_sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """Isotropic Gaussian detector noise: each ion's momentum gets N(0, (sigma |p_i|)^2 I).

    Isotropic rather than per component so that the noise model is rotation-invariant,
    as a detector's momentum resolution is to a good approximation.
    """
    if relative_sigma < 0:
        raise ValueError(f"momentum noise must be >= 0, got {relative_sigma}")
    if relative_sigma == 0:
        return p
    atoms = p.reshape(*p.shape[:-1], 3, 3)
    scale = relative_sigma * atoms.norm(dim=-1, keepdim=True)
    noise = torch.randn(atoms.shape, generator=generator, dtype=p.dtype, device=generator.device)
    return (atoms + scale * noise.to(p.device)).reshape(p.shape)


@dataclass(frozen=True)
class SimulatedEvents:
    """A simulated data set: positions (N, 9) bohr and observed momenta (N, 9) a.u."""

    positions: np.ndarray
    momenta: np.ndarray
    true_momenta: np.ndarray

    def __len__(self) -> int:
        return self.positions.shape[0]


def simulate_events(
    n: int,
    *,
    seed: int = 0,
    geometry: str = "ocs",
    charges: Sequence[float] = DEFAULT_CHARGES,
    masses: Sequence[float] = MASSES,
    momentum_noise: float = 0.0,
    device: str | torch.device = "cpu",
    settings: IntegratorSettings | None = None,
    progress: bool = False,
    compile: bool | None = None,
) -> SimulatedEvents:
    """Sample ``n`` geometries, explode them and return positions and observed momenta.

    The same seed gives the same events on the same device.

    Args:
        n: number of events.
        seed: random seed for geometries, orientations and noise.
        geometry: ``"ocs"`` or ``"ball"``.
        charges: ion charges (C, O, S).
        masses: ion masses in electron masses.
        momentum_noise: relative detector resolution sigma (0.01 = 1 %).
        device: where to integrate (``"cpu"``, ``"cuda"``, or ``"auto"``).
        settings: integrator grid.
        progress: show a progress bar.
        compile: see :func:`asymptotic_momenta`.

    Example:
        >>> ev = simulate_events(4, seed=1)
        >>> ev.positions.shape, ev.momenta.shape
        ((4, 9), (4, 9))
    """
    if n < 1:
        raise ValueError(f"the number of events must be at least 1, got {n}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; choose one of {', '.join(GEOMETRIES)}")
    device = resolve_device(device)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    sampler = sample_ocs if geometry == "ocs" else sample_ball
    x = sampler(n, g, masses=masses)
    p_true = asymptotic_momenta(
        x.to(device),
        charges=charges,
        masses=masses,
        settings=settings,
        progress=progress,
        compile=compile,
    )
    p_obs = add_momentum_noise(p_true.cpu(), momentum_noise, g)
    return SimulatedEvents(
        positions=x.numpy(), momenta=p_obs.numpy(), true_momenta=p_true.cpu().numpy()
    )
