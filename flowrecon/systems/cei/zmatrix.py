"""Vibrational spread of a molecule: Gaussian internal coordinates of a Z-matrix.

A Z-matrix places atoms one after another: the first at the origin, the second on the
-x axis at its bond length, the third in the xy plane by a bond and an angle, every later
one by a bond, an angle and a dihedral to atoms already placed. The reference values of
these internal coordinates are read off the molecule's reference geometry; the sampler
draws each from a Gaussian around its reference (bonds kept above 0.5 bohr, angles in
[0, 180] degrees) and builds the Cartesian positions. A *linear* row describes the doubly
degenerate bend of a linear molecule: a two-dimensional isotropic Gaussian displacement
of the bond direction away from the line, whose size follows a Rayleigh law.

Random numbers are drawn row by row (bond, then angle or bend, then dihedral), so the
OCS preset (C; O bonded to C; S bonded to C with a linear bend) draws exactly what
`flowrecon.systems.cei.geometry.sample_ocs` drew and gives the same geometries, bit for bit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from flowrecon.systems.cei.molecule import Molecule, ZMatrixRow

__all__ = ["check_zmatrix", "reference_values", "sample_zmatrix"]

#: A linear row's reference angle must be this close to 180 degrees (it is then exactly 180).
LINEAR_TOLERANCE_DEG = 0.01
#: A non-linear angle must stay this far from 0 and 180 degrees.
ANGLE_MARGIN_DEG = 0.5
#: Sampled bonds are kept above this many bohr, as OCS's sampler always did.
MIN_BOND = 0.5


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return math.atan2(float(np.linalg.norm(np.cross(a, b))), float(np.dot(a, b)))


def _dihedral(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> float:
    axis = (c - b) / np.linalg.norm(c - b)
    v = (a - b) - np.dot(a - b, axis) * axis
    w = (d - c) - np.dot(d - c, axis) * axis
    return math.atan2(float(np.dot(np.cross(axis, v), w)), float(np.dot(v, w)))


def reference_values(molecule: Molecule) -> list[tuple[float, float, float]]:
    """``(bond, angle, dihedral)`` of every Z-matrix row in the reference geometry.

    Bohr and radians; zero where a row has no such coordinate. A linear row's angle is
    its deviation from 180 degrees, taken as exactly 0.
    """
    xyz = [np.array(r, dtype=float) for r in molecule.geometry]
    out = []
    for row in molecule.zmatrix:
        i, j, k, m = row.atom, row.bond_to, row.angle_to, row.dihedral_to
        # math.dist is correctly rounded here: a bond of 2.19 bohr along an axis stays 2.19.
        bond = math.dist(xyz[i], xyz[j]) if j is not None else 0.0
        angle = 0.0 if k is None or row.linear else _angle(xyz[i] - xyz[j], xyz[k] - xyz[j])
        dihedral = _dihedral(xyz[i], xyz[j], xyz[k], xyz[m]) if m is not None else 0.0
        out.append((bond, angle, dihedral))
    return out


def check_zmatrix(molecule: Molecule, where: str) -> None:
    """One-line errors for Z-matrices the reference geometry cannot support."""
    xyz = [np.array(r, dtype=float) for r in molecule.geometry]
    labels = molecule.labels
    for n, row in enumerate(molecule.zmatrix):
        at = f"{where}: zmatrix[{n}] ({labels[row.atom]})"
        i, j, k, m = row.atom, row.bond_to, row.angle_to, row.dihedral_to
        if j is not None and math.dist(xyz[i], xyz[j]) < MIN_BOND:
            raise ValueError(f"{at}: bond to {labels[j]} is below {MIN_BOND} bohr")
        if k is None:
            continue
        deg = math.degrees(_angle(xyz[i] - xyz[j], xyz[k] - xyz[j]))
        names = f"{labels[i]}-{labels[j]}-{labels[k]}"
        if row.linear:
            if abs(180.0 - deg) > LINEAR_TOLERANCE_DEG:
                raise ValueError(
                    f"{at}: linear = true needs angle {names} = 180 deg in the geometry, "
                    f"got {deg:.4f}"
                )
            if m is not None:
                raise ValueError(f"{at}: a linear row takes no dihedral (its bend is isotropic)")
        elif not ANGLE_MARGIN_DEG < deg < 180.0 - ANGLE_MARGIN_DEG:
            raise ValueError(
                f"{at}: angle {names} is {deg:.4f} deg in the geometry; for a linear "
                "arrangement set linear = true (a 2-D bend)"
            )
        if m is not None:
            jkm = math.degrees(_angle(xyz[j] - xyz[k], xyz[m] - xyz[k]))
            if not ANGLE_MARGIN_DEG < jkm < 180.0 - ANGLE_MARGIN_DEG:
                raise ValueError(
                    f"{at}: dihedral reference {labels[j]}-{labels[k]}-{labels[m]} is "
                    "collinear in the geometry, so the dihedral is undefined; pick another atom"
                )


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def _perpendicular_axis(axis: torch.Tensor) -> torch.Tensor:
    """A unit vector perpendicular to ``axis``, from the lab axis least aligned with it."""
    lab = torch.eye(3, dtype=axis.dtype, device=axis.device)
    ref = lab[axis.abs().argmin(dim=-1)]
    return _unit(ref - (ref * axis).sum(-1, keepdim=True) * axis)


def _place(
    row_number: int,
    row: ZMatrixRow,
    ref: tuple[float, float, float],
    pos: dict[int, torch.Tensor],
    n: int,
    g: torch.Generator,
) -> torch.Tensor:
    """Position (n, 3) of one row's atom; draws its random numbers in a fixed order."""
    dev, f64 = g.device, torch.float64
    if row_number == 0:
        return torch.zeros(n, 3, dtype=f64, device=dev)
    r = (ref[0] + row.bond_sigma * torch.randn(n, generator=g, dtype=f64, device=dev)).clamp(
        min=MIN_BOND
    )
    j = pos[row.bond_to]
    if row_number == 1:
        return j + r[:, None] * torch.tensor([-1.0, 0.0, 0.0], dtype=f64, device=dev)
    k = pos[row.angle_to]
    if row.linear:
        bend_xy = math.radians(row.angle_sigma_deg) * torch.randn(
            n, 2, generator=g, dtype=f64, device=dev
        )
        bend = bend_xy.norm(dim=1).clamp(max=math.pi)
        axis = _unit(j - k)  # the line continued beyond j
        if row_number == 2:
            # The third atom defines the plane: only the size of the bend matters, and it
            # goes into the xy plane, as a Z-matrix's third atom always does.
            w = torch.tensor([0.0, 1.0, 0.0], dtype=f64, device=dev).expand(n, 3)
        else:
            e_u = _perpendicular_axis(axis)
            e_v = torch.linalg.cross(axis, e_u, dim=-1)
            size = bend_xy.norm(dim=1, keepdim=True)
            direction = bend_xy / torch.where(size > 0, size, torch.ones_like(size))
            w = direction[:, :1] * e_u + direction[:, 1:] * e_v
        return j + r[:, None] * (torch.cos(bend)[:, None] * axis + torch.sin(bend)[:, None] * w)
    theta = (
        ref[1]
        + math.radians(row.angle_sigma_deg) * torch.randn(n, generator=g, dtype=f64, device=dev)
    ).clamp(0.0, math.pi)
    u = _unit(k - j)
    if row_number == 2:
        w = torch.tensor([0.0, 1.0, 0.0], dtype=f64, device=dev).expand(n, 3)
        return j + r[:, None] * (torch.cos(theta)[:, None] * u + torch.sin(theta)[:, None] * w)
    phi = ref[2] + math.radians(row.dihedral_sigma_deg) * torch.randn(
        n, generator=g, dtype=f64, device=dev
    )
    d = pos[row.dihedral_to] - k
    w = _unit(d - (d * u).sum(-1, keepdim=True) * u)
    # Sign chosen so that the dihedral atom-j-k-l of the result is +phi (IUPAC convention).
    side = torch.cos(phi)[:, None] * w - torch.sin(phi)[:, None] * torch.linalg.cross(u, w, dim=-1)
    return j + r[:, None] * (torch.cos(theta)[:, None] * u + torch.sin(theta)[:, None] * side)


def sample_zmatrix(molecule: Molecule, n: int, generator: torch.Generator) -> torch.Tensor:
    """Geometries (n, N, 3) in bohr drawn from the molecule's Z-matrix, not yet centred.

    Example:
        >>> from flowrecon.systems.cei.molecule import load_molecule
        >>> x = sample_zmatrix(load_molecule("so2"), 4, torch.Generator().manual_seed(0))
        >>> tuple(x.shape)
        (4, 3, 3)
    """
    if not molecule.zmatrix:
        raise ValueError(f"molecule {molecule.name!r} has no Z-matrix")
    refs = reference_values(molecule)
    pos: dict[int, torch.Tensor] = {}
    for number, (row, ref) in enumerate(zip(molecule.zmatrix, refs)):
        pos[row.atom] = _place(number, row, ref, pos, n, generator)
    return torch.stack([pos[i] for i in range(molecule.n_atoms)], 1)
