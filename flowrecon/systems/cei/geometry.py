"""Initial geometries and simulated CEI data sets.

Samplers: ``ocs`` (the molecule near its linear equilibrium, with vibrational spread),
``ball`` (three atoms anywhere in a ball, a harder, broader test set) and
:func:`sample_molecule` (any `flowrecon.systems.cei.molecule.Molecule`, from its
Z-matrix spread; the ``ocs`` preset gives exactly what ``sample_ocs`` gives). All return
positions in bohr with the centre of mass at the origin and a uniformly random
orientation. ``simulate_events`` (OCS) and :func:`simulate_molecule_events` (any
molecule) explode them and add detector noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flowrecon.base import resolve_device
from flowrecon.systems.cei.canonical import apply_permutation, canonical_permutation
from flowrecon.systems.cei.constants import (
    BOLTZMANN_IN_HARTREE_PER_KELVIN,
    DEFAULT_CHARGES,
    MASSES,
    R_CO_EQ,
    R_CS_EQ,
)
from flowrecon.systems.cei.molecule import Molecule, load_molecule
from flowrecon.systems.cei.nbody import molecule_momenta
from flowrecon.systems.cei.simulator import IntegratorSettings, asymptotic_momenta
from flowrecon.systems.cei.zmatrix import sample_zmatrix

GEOMETRIES: tuple[str, ...] = ("ocs", "ball")

__all__ = [
    "GEOMETRIES",
    "MoleculeEvents",
    "SimulatedEvents",
    "random_rotations",
    "sample_ball",
    "sample_molecule",
    "sample_ocs",
    "simulate_events",
    "simulate_molecule_events",
    "thermal_momenta",
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
    return x.reshape(x.shape[0], x.shape[1] * 3)


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
    atoms = p.reshape(*p.shape[:-1], p.shape[-1] // 3, 3)
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


def sample_molecule(
    molecule: Molecule | str, n: int, generator: torch.Generator, *, rotate: bool = True
) -> torch.Tensor:
    """Geometries of a molecule around its reference, shape (n, 3N), bohr, float64.

    The spread is the molecule's Z-matrix (`flowrecon.systems.cei.zmatrix`) or, without
    one, an isotropic Gaussian displacement of every atom by ``cartesian_sigma``. A
    ``racemic`` chiral molecule is inverted through its centre in half of the events (a
    coin per event, drawn before the orientation). The centre of mass is at the origin and
    the orientation uniformly random; for the ``ocs`` preset the result equals
    :func:`sample_ocs` bit for bit on the same generator state.

    Example:
        >>> x = sample_molecule("co2", 3, torch.Generator().manual_seed(0))
        >>> tuple(x.shape)
        (3, 9)
    """
    molecule = load_molecule(molecule)
    if n < 0:
        raise ValueError(f"the number of geometries must be >= 0, got {n}")
    g = generator
    if molecule.zmatrix:
        x = sample_zmatrix(molecule, n, g)
    else:
        ref = torch.tensor(molecule.geometry, dtype=torch.float64, device=g.device)
        noise = torch.randn(
            n, molecule.n_atoms, 3, generator=g, dtype=torch.float64, device=g.device
        )
        x = ref + molecule.cartesian_sigma * noise
    if molecule.racemic:
        mirror = torch.rand(n, generator=g, dtype=torch.float64, device=g.device) < 0.5
        x = torch.where(mirror[:, None, None], -x, x)
    return _centre_and_orient(x, g, molecule.masses, rotate)


def thermal_momenta(
    molecule: Molecule | str, n: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """Initial momenta (n, 3N) of a classical thermal ensemble at ``temperature`` kelvin.

    Each Cartesian component of atom i is Gaussian with variance ``m_i k_B T``; the
    centre-of-mass momentum is then removed, so the molecule as a whole is at rest and
    its internal kinetic energy is about ``(3N - 3) k_B T / 2``.

    Example:
        >>> p0 = thermal_momenta("co2", 2, 300.0, torch.Generator().manual_seed(0))
        >>> bool(p0.reshape(2, 3, 3).sum(1).abs().max() < 1e-9)
        True
    """
    molecule = load_molecule(molecule)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 kelvin, got {temperature}")
    g = generator
    m = torch.tensor(molecule.masses, dtype=torch.float64, device=g.device)
    sigma = torch.sqrt(m * BOLTZMANN_IN_HARTREE_PER_KELVIN * temperature)[:, None]
    p = sigma * torch.randn(
        n, molecule.n_atoms, 3, generator=g, dtype=torch.float64, device=g.device
    )
    p = p - m[:, None] * p.sum(1, keepdim=True) / m.sum()
    return p.reshape(n, -1)


@dataclass(frozen=True)
class MoleculeEvents:
    """Simulated events of a molecule, atoms in canonical order (see ``canonical_order``).

    Attributes:
        molecule: The molecule, with the charges of the simulated channel.
        positions: Initial positions (n, 3N), bohr, centre of mass at the origin.
        momenta: Observed final momenta (n, 3N), a.u. (with detector noise, if any).
        true_momenta: Final momenta before detector noise (n, 3N).
    """

    molecule: Molecule
    positions: np.ndarray
    momenta: np.ndarray
    true_momenta: np.ndarray

    def __len__(self) -> int:
        return self.positions.shape[0]

    def to_frame(self, extra: dict | None = None):
        """A DataFrame with the molecule's position then momentum columns, then ``extra``.

        Example:
            >>> ev = simulate_molecule_events("co2", 2, seed=0)
            >>> list(ev.to_frame().columns[:4])
            ['cx', 'cy', 'cz', 'o1x']
        """
        import pandas as pd

        m = self.molecule
        data = dict(zip(m.position_columns, self.positions.T))
        data.update(zip(m.momentum_columns, self.momenta.T))
        frame = pd.DataFrame(data)
        for name, values in (extra or {}).items():
            if name in frame.columns:
                raise ValueError(f"extra column {name!r} clashes with a column of {m.name}")
            frame[name] = np.asarray(values)
        return frame


def simulate_molecule_events(
    molecule: Molecule | str,
    n: int,
    *,
    seed: int = 0,
    charges: Sequence[float] | None = None,
    momentum_noise: float = 0.0,
    device: str | torch.device = "auto",
    accuracy: str = "high",
    temperature: float = 0.0,
    settings: IntegratorSettings | None = None,
    progress: bool = False,
    compile: bool | None = None,
) -> MoleculeEvents:
    """Sample ``n`` geometries of a molecule, explode them, add noise, order identical atoms.

    The steps, in this order: :func:`sample_molecule` (geometry, orientation), the
    explosion (`flowrecon.systems.cei.nbody.molecule_momenta`: the planar three-atom
    integrator for N = 3, the N-body one otherwise), isotropic detector noise
    (:func:`add_momentum_noise`), and the canonical order of identical atoms by observed
    momentum (`flowrecon.systems.cei.molecule.canonical_order`), which permutes positions
    and true momenta alike. For the ``ocs`` preset the events equal
    :func:`simulate_events` on the same seed, bit for bit.

    Args:
        molecule: A :class:`~flowrecon.systems.cei.molecule.Molecule`, a preset name or a
            TOML file.
        n: Number of events.
        seed: Seed of geometries, orientations and noise; the same seed gives the same
            events on the same device.
        charges: The explosion channel, one charge per atom; default the molecule's.
        momentum_noise: Relative detector resolution sigma (0.01 = 1 %).
        device: Where to integrate (``"auto"``, ``"cpu"``, ``"cuda"``).
        accuracy: ``"high"`` (~1e-8 relative momentum error) or ``"fast"`` (float32 on a
            coarse grid, ~1e-5, several times faster); see
            `flowrecon.systems.cei.nbody.molecule_momenta`.
        temperature: Initial momenta before the explosion, kelvin: see
            :func:`thermal_momenta` (0: the ions start at rest). An effective temperature
            can stand in for zero-point motion.
        settings: Integrator grid; default the simulator's own for the molecule.
        progress: Show a progress bar.
        compile: See `flowrecon.systems.cei.simulator.asymptotic_momenta`.

    Example:
        >>> ev = simulate_molecule_events("so2", 4, seed=1, momentum_noise=0.01)
        >>> ev.positions.shape, ev.momenta.shape
        ((4, 9), (4, 9))
    """
    if n < 1:
        raise ValueError(f"the number of events must be at least 1, got {n}")
    molecule = load_molecule(molecule).with_charges(charges)
    device = resolve_device(device)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    x = sample_molecule(molecule, n, g)
    p0 = None if temperature == 0 else thermal_momenta(molecule, n, temperature, g).to(device)
    p_true = molecule_momenta(
        x.to(device),
        molecule,
        p0,
        accuracy=accuracy,
        settings=settings,
        progress=progress,
        compile=compile,
    ).cpu()
    p_obs = add_momentum_noise(p_true, momentum_noise, g)
    perm = canonical_permutation(p_obs, molecule)
    if perm is not None:
        x, p_obs, p_true = (apply_permutation(v, perm) for v in (x, p_obs, p_true))
    return MoleculeEvents(
        molecule=molecule, positions=x.numpy(), momenta=p_obs.numpy(), true_momenta=p_true.numpy()
    )
