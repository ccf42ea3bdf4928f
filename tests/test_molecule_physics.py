"""Physics helpers for N atoms: energies, centre of mass, internal coordinates, handedness."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from flowrecon.systems.cei.geometry import random_rotations, sample_molecule
from flowrecon.systems.cei.molecule import load_molecule
from flowrecon.systems.cei.physics import (
    as_atoms,
    bond_angles,
    bond_lengths,
    centre_of_mass,
    coulomb_potential,
    dihedral_angles,
    energy_difference,
    handedness,
    kinetic_energy,
    remove_centre_of_mass,
    total_momentum,
)

RNG = np.random.default_rng(0)


def test_energies_of_five_atoms_by_hand():
    x, p = RNG.normal(size=15) * 3, RNG.normal(size=15) * 50
    q, m = np.array([1.0, 2, 1, 3, 1]), np.array([1.0, 2, 3, 4, 5]) * 1000
    xa, pa = x.reshape(5, 3), p.reshape(5, 3)
    pe = sum(
        q[i] * q[j] / np.linalg.norm(xa[i] - xa[j]) for i, j in itertools.combinations(range(5), 2)
    )
    ke = sum((pa[i] ** 2).sum() / (2 * m[i]) for i in range(5))
    assert coulomb_potential(x, q) == pytest.approx(pe, rel=1e-14)
    assert kinetic_energy(p, m) == pytest.approx(ke, rel=1e-14)
    assert energy_difference(x, p, q, m) == pytest.approx(abs(ke - pe) / ke, rel=1e-12)
    np.testing.assert_allclose(total_momentum(p), pa.sum(0))
    com = (m[:, None] * xa).sum(0) / m.sum()
    np.testing.assert_allclose(centre_of_mass(x, m), com)
    np.testing.assert_allclose(centre_of_mass(remove_centre_of_mass(x, m), m), 0, atol=1e-12)


def test_atom_count_comes_from_the_masses_and_charges():
    with pytest.raises(ValueError, match=r"one value per atom \(5 atoms\)"):
        kinetic_energy(np.zeros(15))  # OCS masses by default
    with pytest.raises(ValueError, match="multiple of 3"):
        coulomb_potential(np.zeros(14), np.ones(5))
    with pytest.raises(ValueError, match="same atoms"):
        energy_difference(np.ones(15), np.ones(9))
    assert as_atoms(np.zeros((2, 15))).shape == (2, 5, 3)


def test_internal_coordinates_are_rotation_invariant_and_match_the_preset():
    m = load_molecule("chbrclf")
    x = torch.tensor(m.geometry, dtype=torch.float64).reshape(1, 15)
    r = bond_lengths(x, m.bonds)[0] * 0.529177210903
    np.testing.assert_allclose(r.numpy(), [1.082, 1.351, 1.758, 1.930], atol=1e-6)
    angles = bond_angles(x, m.angles)[0]
    np.testing.assert_allclose(angles[:3].numpy(), [109.1, 108.6, 107.4], atol=1e-4)
    xs = sample_molecule(m, 50, torch.Generator().manual_seed(0))
    rot = random_rotations(50, torch.Generator().manual_seed(1))
    turned = (xs.reshape(-1, 5, 3) @ rot.transpose(1, 2)).reshape(-1, 15)
    torsion = [(3, 0, 1, 2)]
    for f, args in ((bond_lengths, m.bonds), (bond_angles, m.angles), (dihedral_angles, torsion)):
        assert torch.allclose(f(turned, args), f(xs, args), atol=1e-9)
    assert torch.equal(handedness(turned, *m.chirality), handedness(xs, *m.chirality))
    # A mirror image flips the handedness and the dihedrals, not the bonds and angles.
    mirror = xs * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64).repeat(5)
    assert torch.equal(handedness(mirror, *m.chirality), -handedness(xs, *m.chirality))
    assert torch.allclose(dihedral_angles(mirror, torsion), -dihedral_angles(xs, torsion))
    assert torch.allclose(bond_angles(mirror, m.angles), bond_angles(xs, m.angles))


def test_angles_are_accurate_at_180_degrees_and_differentiable():
    x = torch.tensor(
        [[0.0, 0, 0, -2.0, 0, 0, 3.0, 1e-9, 0]], dtype=torch.float64, requires_grad=True
    )
    angle = bond_angles(x, [(1, 0, 2)])
    assert float(angle.detach()) == pytest.approx(180.0 - np.degrees(1e-9 / 3.0), abs=1e-12)
    (grad,) = torch.autograd.grad(angle.sum(), x)
    assert torch.isfinite(grad).all()


def test_bad_index_lists():
    x = np.zeros(9)
    with pytest.raises(ValueError, match="each bond must name 2 atom indices in 0..2"):
        bond_lengths(x, [(0, 3)])
    with pytest.raises(ValueError, match="3 different atoms"):
        bond_angles(x, [(0, 1, 1)])
    with pytest.raises(ValueError, match="chirality centre"):
        handedness(x, 0, 1, 2, 3)


def test_zero_geometries_have_the_molecule_width() -> None:
    x = sample_molecule("chbrclf", 0, torch.Generator().manual_seed(0))
    assert tuple(x.shape) == (0, 15)
