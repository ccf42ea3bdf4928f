"""Energies, centre of mass, internal coordinates and charge parsing of the CEI physics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from flowrecon.systems.cei.constants import DEFAULT_CHARGES, MASSES, R_CO_EQ, R_CS_EQ
from flowrecon.systems.cei.physics import (
    as_atoms,
    centre_of_mass,
    coulomb_potential,
    energy_difference,
    energy_difference_squared,
    flatten_atoms,
    internal_coordinates,
    kinetic_energy,
    parse_charges,
    remove_centre_of_mass,
    total_momentum,
)

# Linear OCS at equilibrium along x, carbon at the origin, O on the -x side.
LINEAR_OCS = np.array([0.0, 0, 0, -R_CO_EQ, 0, 0, R_CS_EQ, 0, 0])
R_OS_EQ = R_CO_EQ + R_CS_EQ

coordinates = arrays(np.float64, 9, elements=st.floats(-10, 10))


def rotation(seed: int) -> np.ndarray:
    """A random proper rotation matrix."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_as_atoms_round_trip_and_order() -> None:
    v = np.arange(18.0).reshape(2, 9)
    atoms = as_atoms(v)
    assert atoms.shape == (2, 3, 3)
    np.testing.assert_array_equal(atoms[1, 1], [12.0, 13.0, 14.0])  # O of the second event
    np.testing.assert_array_equal(flatten_atoms(atoms), v)
    with pytest.raises(ValueError, match="last dimension 9"):
        as_atoms(np.zeros(8))


def test_kinetic_energy_by_hand() -> None:
    p = np.array([1.0, 2, 2, 0, 3, 4, 0, 0, 0])  # |p_C| = 3, |p_O| = 5
    expected = 9 / (2 * MASSES[0]) + 25 / (2 * MASSES[1])
    assert kinetic_energy(p) == pytest.approx(expected, rel=1e-14)
    assert kinetic_energy(p, masses=(1.0, 1.0, 1.0)) == pytest.approx(17.0)


def test_coulomb_potential_linear_ocs_equilibrium() -> None:
    expected = 4 / R_CO_EQ + 4 / R_CS_EQ + 4 / R_OS_EQ
    pe = coulomb_potential(LINEAR_OCS)
    assert pe == pytest.approx(expected, rel=1e-14)
    assert pe == pytest.approx(3.96, abs=0.01)  # "about 4 hartree"


def test_coulomb_potential_configurable_charges() -> None:
    pe_111 = coulomb_potential(LINEAR_OCS, charges=(1, 1, 1))
    assert pe_111 == pytest.approx(coulomb_potential(LINEAR_OCS) / 4, rel=1e-14)
    # Charges (C, O, S) = (2, 1, 1): C-O 2, C-S 2, O-S 1.
    expected = 2 / R_CO_EQ + 2 / R_CS_EQ + 1 / R_OS_EQ
    assert coulomb_potential(LINEAR_OCS, charges=(2, 1, 1)) == pytest.approx(expected, rel=1e-14)
    # Per-event charges broadcast against the batch.
    x = np.stack([LINEAR_OCS, LINEAR_OCS])
    pe = coulomb_potential(x, charges=np.array([DEFAULT_CHARGES, (1.0, 1.0, 1.0)]))
    np.testing.assert_allclose(pe, [4 * pe_111, pe_111], rtol=1e-14)
    with pytest.raises(ValueError, match="one value per atom"):
        coulomb_potential(LINEAR_OCS, charges=(2, 2))


@settings(max_examples=50, deadline=None)
@given(coordinates, st.integers(0, 2**32 - 1), arrays(np.float64, 3, elements=st.floats(-5, 5)))
def test_energies_are_invariant_under_rotation_and_translation(
    x: np.ndarray, seed: int, shift: np.ndarray
) -> None:
    q = rotation(seed)
    moved = flatten_atoms(as_atoms(x) @ q.T + shift)
    pe, pe_moved = coulomb_potential(x), coulomb_potential(moved)
    if np.isfinite(pe) and pe < 1e6:  # skip near-coincident atoms
        assert pe_moved == pytest.approx(pe, rel=1e-9)
    assert kinetic_energy(flatten_atoms(as_atoms(x) @ q.T)) == pytest.approx(
        kinetic_energy(x), rel=1e-12, abs=1e-300
    )


def test_energy_difference_zero_when_energy_is_conserved() -> None:
    pe = coulomb_potential(LINEAR_OCS)
    # Put the whole Coulomb energy into an S momentum: KE(p) = PE(x) exactly.
    p = np.zeros(9)
    p[6] = math.sqrt(2 * MASSES[2] * pe)
    assert energy_difference(LINEAR_OCS, p) == pytest.approx(0.0, abs=1e-14)
    assert energy_difference_squared(LINEAR_OCS, p) == pytest.approx(0.0, abs=1e-28)
    # Twice the kinetic energy: |KE - PE| / KE = 1/2.
    p2 = p * math.sqrt(2)
    assert energy_difference(LINEAR_OCS, p2) == pytest.approx(0.5, rel=1e-12)
    assert energy_difference_squared(LINEAR_OCS, p2) == pytest.approx(0.25, rel=1e-12)
    # Charges are honoured: with (1,1,1) the PE is a quarter, so the mismatch is 3/4.
    assert energy_difference(LINEAR_OCS, p, charges=(1, 1, 1)) == pytest.approx(0.75)


def test_energy_difference_is_differentiable_and_broadcasts() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 9, generator=gen, dtype=torch.float64) * 20
    x = torch.as_tensor(LINEAR_OCS) + 0.1 * torch.randn(5, 4, 9, generator=gen, dtype=torch.float64)
    x.requires_grad_(True)
    loss = energy_difference_squared(x, p)  # samples (5, 4, 9) against momenta (4, 9)
    assert loss.shape == (5, 4)
    loss.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    x0 = torch.as_tensor(LINEAR_OCS[None] + 0.05, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: energy_difference(v, p[:1]), (x0,))


def test_centre_of_mass_and_its_removal() -> None:
    com = centre_of_mass(LINEAR_OCS)
    expected = (-R_CO_EQ * MASSES[1] + R_CS_EQ * MASSES[2]) / sum(MASSES)
    np.testing.assert_allclose(com, [expected, 0.0, 0.0], rtol=1e-14)
    np.testing.assert_allclose(centre_of_mass(LINEAR_OCS, masses=(1, 1, 1)), [0.76 / 3, 0, 0])
    centred = remove_centre_of_mass(LINEAR_OCS)
    np.testing.assert_allclose(centre_of_mass(centred), 0.0, atol=1e-14)
    # Bond lengths do not change.
    assert internal_coordinates(centred).r_co == pytest.approx(R_CO_EQ)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (3, 9), elements=st.floats(-10, 10)))
def test_remove_centre_of_mass_property(x: np.ndarray) -> None:
    centred = remove_centre_of_mass(x)
    assert centred.shape == (3, 9)
    np.testing.assert_allclose(centre_of_mass(centred), 0.0, atol=1e-12)
    # Only a translation: differences between atoms are unchanged.
    np.testing.assert_allclose(
        np.diff(as_atoms(centred), axis=-2), np.diff(as_atoms(x), axis=-2), atol=1e-12
    )


def test_total_momentum() -> None:
    p = np.array([[1.0, 2, 3, -4, 0, 1, 3, -2, -4], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_allclose(total_momentum(p), [[0, 0, 0], [3, 3, 3]])


def test_internal_coordinates_linear_and_bent() -> None:
    r_co, r_cs, angle = internal_coordinates(LINEAR_OCS)
    assert (r_co, r_cs) == pytest.approx((R_CO_EQ, R_CS_EQ), rel=1e-15)
    assert angle == pytest.approx(180.0, abs=1e-12)
    # Bent by 160 degrees at C, in the xy plane, rotated and shifted arbitrarily.
    theta = math.radians(160.0)
    x = np.array([0, 0, 0, 2.0, 0, 0, 3.0 * math.cos(theta), 3.0 * math.sin(theta), 0])
    moved = flatten_atoms(as_atoms(x) @ rotation(7).T + np.array([1.0, -2.0, 0.5]))
    coords = internal_coordinates(moved)
    assert coords.r_co == pytest.approx(2.0)
    assert coords.r_cs == pytest.approx(3.0)
    assert coords.angle_ocs_deg == pytest.approx(160.0, rel=1e-12)
    # A right angle.
    right = np.array([0, 0, 0, 1.0, 0, 0, 0, 2.0, 0])
    assert internal_coordinates(right).angle_ocs_deg == pytest.approx(90.0)


def test_internal_coordinates_accurate_near_linear() -> None:
    # 1e-7 degrees off linear: arccos of a normalised dot product would lose this.
    deviation = 1e-7
    theta = math.radians(180.0 - deviation)
    x = torch.tensor(
        [0, 0, 0, 2.19, 0, 0, 2.95 * math.cos(theta), 2.95 * math.sin(theta), 0],
        dtype=torch.float64,
        requires_grad=True,
    )
    angle = internal_coordinates(x).angle_ocs_deg
    assert 180.0 - angle.item() == pytest.approx(deviation, rel=1e-6)
    angle.backward()
    assert torch.isfinite(x.grad).all()
    exact = torch.tensor(LINEAR_OCS, requires_grad=True)
    internal_coordinates(exact).angle_ocs_deg.backward()
    assert torch.isfinite(exact.grad).all()


def test_numpy_in_numpy_out_and_torch_in_torch_out() -> None:
    x32 = LINEAR_OCS.astype(np.float32)
    pe = coulomb_potential(x32)
    assert isinstance(pe, np.ndarray) and pe.dtype == np.float32
    assert isinstance(internal_coordinates(LINEAR_OCS).angle_ocs_deg, np.ndarray)
    assert isinstance(centre_of_mass(LINEAR_OCS), np.ndarray)
    t = torch.as_tensor(x32)
    for value in (coulomb_potential(t), kinetic_energy(t), remove_centre_of_mass(t)):
        assert isinstance(value, torch.Tensor) and value.dtype == torch.float32
    # Mixed inputs give torch, in the promoted dtype.
    mixed = energy_difference(t, np.ones(9))
    assert isinstance(mixed, torch.Tensor) and mixed.dtype == torch.float64
    # Lists behave like numpy.
    assert isinstance(total_momentum(LINEAR_OCS.tolist()), np.ndarray)


def test_parse_charges() -> None:
    assert parse_charges("2,2,2") == (2.0, 2.0, 2.0)
    assert parse_charges(" 2, 1 ,1.5 ") == (2.0, 1.0, 1.5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2,2", r"3 comma-separated numbers.*'2,2' \(2 values\)"),
        ("2,2,2,2", r"3 comma-separated numbers.*\(4 values\)"),
        ("", r"3 comma-separated numbers.*\(1 value\)"),
        ("2,a,2", r"could not read 'a' in '2,a,2'"),
        ("2,,2", r"could not read '' in '2,,2'"),
        ("2,0,2", r"positive and finite; got '2,0,2'"),
        ("2,-1,2", r"positive and finite"),
        ("2,nan,2", r"positive and finite"),
        ("2,inf,2", r"positive and finite"),
    ],
)
def test_parse_charges_rejects_bad_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_charges(text)
