"""Molecule descriptions: presets, TOML files, columns, the vibrational sampler, the
canonical order of identical atoms, and the OCS preset reproducing today's OCS."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flowrecon.systems.cei.canonical import canonical_order, canonical_order_table
from flowrecon.systems.cei.constants import BOHR_IN_ANGSTROM, MASSES
from flowrecon.systems.cei.constants import MOMENTUM_COLUMNS as OCS_MOMENTA
from flowrecon.systems.cei.constants import POSITION_COLUMNS as OCS_POSITIONS
from flowrecon.systems.cei.geometry import (
    sample_molecule,
    sample_ocs,
    simulate_events,
    simulate_molecule_events,
)
from flowrecon.systems.cei.molecule import (
    available_molecules,
    isotope_mass,
    load_molecule,
    molecule_from_dict,
    preset_names,
)
from flowrecon.systems.cei.physics import (
    bond_angles,
    bond_lengths,
    centre_of_mass,
    dihedral_angles,
    handedness,
)

PRESETS = ["ocs", "co2", "n2o", "so2", "d2o", "ch2i2", "chbrclf"]
U = 1822.888486209  # electron masses per dalton (CODATA 2018)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- presets ------------------------------------------------------------------------


def test_presets_are_listed():
    assert preset_names() == sorted(PRESETS)
    rows = {r["name"]: r for r in available_molecules()}
    assert rows["chbrclf"]["formula"] == "CHBrClF"
    assert rows["d2o"]["formula"] == "D2O"
    assert rows["ocs"]["charges"] == "2,2,2"
    assert all(r["description"] for r in rows.values())


def test_ocs_preset_is_todays_ocs():
    m = load_molecule("ocs")
    assert m.masses == MASSES  # exactly, not the 12C/16O/32S isotope masses
    assert m.charges == (2.0, 2.0, 2.0)
    assert m.position_columns == OCS_POSITIONS
    assert m.momentum_columns == OCS_MOMENTA
    assert m.identical_groups() == ()
    assert m.frame == (2, 0)  # e1 along p_S, e2 from p_C


@pytest.mark.parametrize("name", PRESETS)
def test_presets_round_trip_and_columns(name):
    m = load_molecule(name)
    assert molecule_from_dict(m.to_dict()) == m
    assert len(m.position_columns) == len(m.momentum_columns) == 3 * m.n_atoms
    assert len(set(m.position_columns + m.momentum_columns)) == 6 * m.n_atoms
    assert m.source and m.description
    assert all(label == label.lower() for label in m.labels)


def test_masses_are_most_abundant_isotopes():
    co2 = load_molecule("co2")
    assert co2.masses[0] == pytest.approx(12.0 * U, rel=1e-12)
    assert co2.masses[1] == pytest.approx(15.9949146193 * U, rel=1e-10)
    d2o = load_molecule("d2o")
    assert d2o.masses[1] == pytest.approx(2.01410177784 * U, rel=1e-10)  # deuterium
    br = load_molecule("chbrclf").masses[4]
    assert br == pytest.approx(78.9183376 * U, rel=1e-9)  # 79Br (50.7 %) over 81Br
    assert isotope_mass("C", 13) == pytest.approx(13.00335483534 * U, rel=1e-10)


def test_identical_atoms_follow_the_charges():
    co2 = load_molecule("co2")
    assert co2.identical_groups() == ((1, 2),)
    assert co2.identical_groups((1, 2, 1)) == ()  # O2+ and O+ are told apart
    assert load_molecule("ch2i2").identical_groups() == ((1, 2), (3, 4))
    assert load_molecule("n2o").identical_groups() == ((0, 1),)
    assert load_molecule("chbrclf").identical_groups() == ()
    assert co2.with_charges((1, 2, 2)).identical_groups() == ((1, 2),)


@pytest.mark.parametrize("name", PRESETS)
def test_reference_geometry_is_rebuilt_by_the_zmatrix(name):
    # With every spread at zero the Z-matrix gives back the reference geometry, up to a
    # rigid motion: the same distances between every pair of atoms.
    m = load_molecule(name)
    d = m.to_dict()
    for row in d["vibration"]["zmatrix"]:
        for key in ("bond_sigma", "angle_sigma", "dihedral_sigma"):
            if key in row:
                row[key] = 0.0
    if "chirality" in d:
        d["chirality"]["racemic"] = False  # mirror images have the same distances anyway
    x = sample_molecule(molecule_from_dict(d), 3, _gen(0)).reshape(3, m.n_atoms, 3)
    ref = torch.tensor(m.geometry, dtype=torch.float64)
    assert torch.allclose(torch.cdist(x, x), torch.cdist(ref, ref).expand(3, -1, -1), atol=1e-12)


def test_handedness_of_the_chbrclf_preset_is_r():
    m = load_molecule("chbrclf")
    x = np.array(m.geometry).ravel()
    c, br, cl, f = (m.index(a) for a in ("c", "br", "cl", "f"))
    assert float(handedness(x, c, br, cl, f)) == -1.0
    # Textbook (R): with H pointing away (-z), Br -> Cl -> F runs clockwise seen from +z.
    angles = np.radians([90.0, -30.0, -150.0])
    subs = np.stack([np.cos(angles), np.sin(angles), np.full(3, 0.33)], 1)
    r = np.concatenate([[0, 0, 0], [0, 0, -1], *subs])  # c, h, br, cl, f
    assert float(handedness(r, 0, 2, 3, 4)) == -1.0


# --- the sampler ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7])
def test_ocs_preset_samples_exactly_like_sample_ocs(seed):
    for n in (1, 5, 1000):
        assert torch.equal(sample_molecule("ocs", n, _gen(seed)), sample_ocs(n, _gen(seed)))


def test_ocs_preset_simulates_exactly_like_simulate_events():
    for kwargs in ({}, {"charges": (2, 1, 1), "momentum_noise": 0.01}):
        a = simulate_events(300, seed=4, **kwargs)
        b = simulate_molecule_events("ocs", 300, seed=4, **kwargs)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.momenta, b.momenta)
        np.testing.assert_array_equal(a.true_momenta, b.true_momenta)


def test_sampler_statistics_bent_and_tetrahedral():
    so2 = load_molecule("so2")
    x = sample_molecule(so2, 20000, _gen(1))
    r = bond_lengths(x, so2.bonds) * BOHR_IN_ANGSTROM
    assert abs(r.mean() - 1.4308) < 0.002 and abs(r.std() - 0.05) < 0.002
    angle = bond_angles(x, so2.angles)
    assert abs(angle.mean() - 119.33) < 0.15 and abs(angle.std() - 5.0) < 0.15
    assert centre_of_mass(x, so2.masses).abs().max() < 1e-12

    m = load_molecule("chbrclf")
    x = sample_molecule(m, 20000, _gen(2))
    h, c, f, cl = (m.index(a) for a in ("h", "c", "f", "cl"))
    dih = dihedral_angles(x, [(cl, c, h, f)])[:, 0]
    ref = float(dihedral_angles(np.array(m.geometry).ravel(), [(cl, c, h, f)])[0])
    signs = handedness(x, *m.chirality)
    # Racemic: half the events are mirror images, whose dihedral has the opposite sign.
    assert abs((signs > 0).double().mean() - 0.5) < 0.02
    same = signs == -1  # the reference (R) enantiomer
    assert abs(dih[same].mean() - ref) < 0.2 and abs(dih[same].std() - 5.0) < 0.2
    assert abs(dih[~same].mean() + ref) < 0.2


def test_linear_bend_follows_a_rayleigh_law():
    co2 = load_molecule("co2")
    x = sample_molecule(co2, 20000, _gen(3))
    bend = 180.0 - bond_angles(x, co2.angles)[:, 0]
    assert abs(bend.mean() - 10.0 * math.sqrt(math.pi / 2)) < 0.2


def test_sampler_is_rotation_uniform_and_reproducible():
    m = load_molecule("ch2i2")
    x = sample_molecule(m, 20000, _gen(4)).reshape(-1, 5, 3)
    axis = x[:, 3] - x[:, 4]  # I-I
    assert (axis / axis.norm(dim=1, keepdim=True)).mean(0).abs().max() < 0.03
    assert torch.equal(sample_molecule(m, 10, _gen(5)), sample_molecule(m, 10, _gen(5)))


# --- canonical order --------------------------------------------------------------------


def _swap(v: np.ndarray, a: int, b: int) -> np.ndarray:
    out = v.reshape(*v.shape[:-1], -1, 3).copy()
    out[..., [a, b], :] = out[..., [b, a], :]
    return out.reshape(v.shape)


def test_canonical_order_sorts_groups_by_momentum():
    m = load_molecule("ch2i2")
    rng = np.random.default_rng(0)
    p, x = rng.normal(size=(500, 15)), rng.normal(size=(500, 15))
    xo, po = canonical_order(x, p, m)
    norms = np.linalg.norm(po.reshape(-1, 5, 3), axis=-1)
    assert (norms[:, 1] >= norms[:, 2]).all() and (norms[:, 3] >= norms[:, 4]).all()

    # Positions travel with their atoms: each event keeps its set of (x_i, p_i) rows.
    def rows(xs, ps):
        atoms = np.concatenate([xs.reshape(-1, 5, 3), ps.reshape(-1, 5, 3)], -1)
        return np.sort(atoms.view([("", atoms.dtype)] * 6), axis=1)

    np.testing.assert_array_equal(rows(xo, po), rows(x, p))
    np.testing.assert_array_equal(po[:, :3], p[:, :3])  # the carbon never moves


def test_canonical_order_ignores_input_labels_and_is_idempotent():
    m = load_molecule("co2")
    rng = np.random.default_rng(1)
    p, x = rng.normal(size=(200, 9)), rng.normal(size=(200, 9))
    p[:20, 6:9] = -p[:20, 3:6]  # exact ties in |p|: broken by the components
    a = canonical_order(x, p, m)
    b = canonical_order(_swap(x, 1, 2), _swap(p, 1, 2), m)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    again = canonical_order(*a, m)
    np.testing.assert_array_equal(again[1], a[1])


def test_canonical_order_torch_numpy_none_and_tables():
    m = load_molecule("so2")
    p = np.random.default_rng(2).normal(size=(50, 9))
    x_none, p_np = canonical_order(None, p, m)
    _, p_t = canonical_order(None, torch.as_tensor(p), m)
    assert x_none is None and isinstance(p_t, torch.Tensor)
    np.testing.assert_array_equal(p_t.numpy(), p_np)
    table = pd.DataFrame(p, columns=m.momentum_columns).assign(run=np.arange(50))
    out = canonical_order_table(table, m)
    np.testing.assert_array_equal(out[list(m.momentum_columns)].to_numpy(), p_np)
    assert list(out.columns) == list(table.columns) and (out["run"] == table["run"]).all()
    with pytest.raises(ValueError, match="lacks the momentum column 'pso2x'|lacks the momentum"):
        canonical_order_table(table.drop(columns=["po1x"]), m)
    with pytest.raises(ValueError, match="9 columns for so2"):
        canonical_order(None, p[:, :6], m)


def test_simulated_events_are_in_canonical_order():
    ev = simulate_molecule_events("d2o", 400, seed=1, momentum_noise=0.01)
    norms = np.linalg.norm(ev.momenta.reshape(-1, 3, 3), axis=-1)
    assert (norms[:, 1] >= norms[:, 2]).all()
    frame = ev.to_frame()
    assert list(frame.columns) == [*ev.molecule.position_columns, *ev.molecule.momentum_columns]
    # The true momenta were permuted with the observed ones: each is close to its noisy twin.
    rel = np.linalg.norm(
        (ev.momenta - ev.true_momenta).reshape(-1, 3, 3), axis=-1
    ) / np.linalg.norm(ev.true_momenta.reshape(-1, 3, 3), axis=-1)
    assert rel.max() < 0.1


# --- molecule files and their errors ---------------------------------------------------

GOOD = """
name = "hcn"
description = "test"
[[atoms]]
element = "H"
charge = 1
[[atoms]]
element = "C"
charge = 1
[[atoms]]
element = "N"
charge = 1
[geometry]
unit = "angstrom"
positions = [[-1.065, 0, 0], [0, 0, 0], [1.153, 0, 0]]
[vibration]
zmatrix = [
  {atom = "c"},
  {atom = "h", bond = "c", bond_sigma = 0.05},
  {atom = "n", bond = "c", bond_sigma = 0.05, angle = "h", angle_sigma = 8, linear = true},
]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "molecule.toml"
    path.write_text(text)
    return path


def test_user_file_loads(tmp_path):
    m = load_molecule(_write(tmp_path, GOOD))
    assert m.labels == ("h", "c", "n")
    assert m.bonds == ((1, 0), (1, 2))  # from the Z-matrix when [report] is absent
    assert m.geometry[2][0] == pytest.approx(1.153 / BOHR_IN_ANGSTROM)
    assert m.zmatrix[1].bond_sigma == pytest.approx(0.05 / BOHR_IN_ANGSTROM)
    ev = simulate_molecule_events(m, 5, seed=0)
    assert ev.positions.shape == (5, 9)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('description = "test"', 'colour = "red"'), r"unknown key 'colour'"),
        (
            lambda t: t.replace('unit = "angstrom"', 'unit = "nm"'),
            r"unit must be one of bohr, angstrom, got 'nm'",
        ),
        (
            lambda t: t.replace(", [1.153, 0, 0]]", "]"),
            r"positions has 2 rows but there are 3 atoms",
        ),
        (
            lambda t: t.replace("[0, 0, 0], [1.153", "[0, 0], [1.153"),
            r"positions\[1\] must be \[x, y, z\]",
        ),
        (
            lambda t: t.replace('element = "N"\ncharge = 1', 'element = "N"\ncharge = -1'),
            r"charge must be positive",
        ),
        (
            lambda t: t.replace('element = "N"\ncharge = 1', 'element = "N"'),
            r"\(n\) needs a charge",
        ),
        (lambda t: t.replace('element = "N"', 'element = "Xx"'), r"unknown element 'Xx'"),
        (
            lambda t: t.replace('element = "N"', 'element = "N"\nlabel = "N1"'),
            r"label 'N1' must be lower-case",
        ),
        (
            lambda t: t.replace('element = "N"', 'element = "N"\nlabel = "c"'),
            r"label 'c' is used twice",
        ),
        (
            lambda t: t.replace('angle = "h"', 'angle = "n"'),
            r"angle atom 'n' must be placed in an earlier row",
        ),
        (
            lambda t: t.replace('{atom = "n", bond', '{atom = "h", bond'),
            r"atom 'h' is placed twice",
        ),
        (lambda t: t.replace(", linear = true", ""), r"set linear = true"),
        (
            lambda t: t.replace("bond_sigma = 0.05}", "bond_sigma = -1}"),
            r"bond_sigma must be finite and zero or positive",
        ),
        (
            lambda t: t.replace("[[atoms]]\nelement", "[[atoms]]\nisotope = 2.5\nelement", 1),
            r"isotope must be a mass number",
        ),
        (
            lambda t: t.replace("[1.153, 0, 0]", "[1.153, 0.2, 0]"),
            r"linear = true needs angle n-c-h = 180",
        ),
        (lambda t: t + "[report]\nbonds = [['c', 'x']]\n", r"report.bonds\[0\]: unknown atom 'x'"),
        (
            lambda t: t + "[report]\nangles = [['c', 'n']]\n",
            r"report.angles\[0\] must name 3 atoms",
        ),
        (lambda t: t.replace("name =", "nom ="), r"unknown key 'nom'"),
        (lambda t: t.replace("linear = true", 'linear = "yes"'), r"linear must be true or false"),
        (
            lambda t: t.replace('{atom = "c"},', '{atom = "c", bond = "h"},'),
            r"row 0 of a Z-matrix has no 'bond'",
        ),
        (
            lambda t: t.replace(
                '{atom = "h", bond = "c", bond_sigma = 0.05},', '{atom = "h", bond_sigma = 0.05},'
            ),
            r"\(h\) needs 'bond'",
        ),
        (
            lambda t: t.replace(", linear = true}", ', linear = true}, {atom = "x"}'),
            r"zmatrix\[3\] atom: unknown atom 'x'",
        ),
    ],
)
def test_bad_files_get_one_line_errors(tmp_path, edit, message):
    text = edit(GOOD)
    with pytest.raises(ValueError, match=message) as err:
        load_molecule(_write(tmp_path, text))
    assert "\n" not in str(err.value) and "molecule.toml" in str(err.value)


def test_more_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"unknown molecule 'co3'.*co2"):
        load_molecule("co3")
    with pytest.raises(ValueError, match="not found"):
        load_molecule(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_molecule(_write(tmp_path, "name = "))
    with pytest.raises(ValueError, match="needs 3 charges"):
        load_molecule("co2").with_charges((1, 1))
    with pytest.raises(ValueError, match="positive and finite"):
        load_molecule("co2").with_charges((1, 0, 1))
    clash = GOOD.replace('element = "H"', 'element = "H"\nlabel = "pn"')
    clash = clash.replace('atom = "h"', 'atom = "pn"').replace('angle = "h"', 'angle = "pn"')
    with pytest.raises(ValueError, match=r"labels 'pn' and 'n' both give the column 'pnx'"):
        load_molecule(_write(tmp_path, clash))
    planar = GOOD.replace(", linear = true", "").replace("[1.153, 0, 0]", "[1.153, 0.5, 0]")
    chiral = planar.replace(
        "[vibration]", "[chirality]\ncentre = 'c'\natoms = ['h', 'c', 'n']\n[vibration]"
    )
    with pytest.raises(ValueError, match="must not include the centre|names an atom twice"):
        load_molecule(_write(tmp_path, chiral))


def test_cartesian_spread_and_dict_input():
    m = load_molecule("d2o").to_dict()
    m["vibration"] = {"cartesian_sigma": 0.1}
    mol = molecule_from_dict(m)
    assert mol.zmatrix == () and mol.cartesian_sigma == 0.1
    x = sample_molecule(mol, 5000, _gen(6)).reshape(-1, 3, 3)
    r = (x[:, 1] - x[:, 0]).norm(dim=-1)
    assert abs(r.mean() - 0.9578 / BOHR_IN_ANGSTROM) < 0.02


def test_thermal_initial_momenta():
    from flowrecon.systems.cei.constants import BOLTZMANN_IN_HARTREE_PER_KELVIN as KB
    from flowrecon.systems.cei.geometry import thermal_momenta
    from flowrecon.systems.cei.physics import coulomb_potential, kinetic_energy

    m = load_molecule("ch2i2")
    p0 = thermal_momenta(m, 20000, 1000.0, _gen(7))
    assert p0.reshape(-1, 5, 3).sum(1).abs().max() < 1e-9
    ke = kinetic_energy(p0, m.masses).mean()
    assert abs(ke / (6 * KB * 1000.0) - 1) < 0.02  # (3N - 3) / 2 k_B T
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        thermal_momenta(m, 1, -1.0, _gen(0))
    # Warm events conserve the total energy, initial kinetic energy included.
    for name in ("co2", "chbrclf"):
        ev = simulate_molecule_events(name, 50, seed=2, temperature=1000.0)
        mol = ev.molecule
        g = _gen(2)
        x = sample_molecule(mol, 50, g)
        warm = thermal_momenta(mol, 50, 1000.0, g)
        e0 = coulomb_potential(x, mol.charges) + kinetic_energy(warm, mol.masses)
        e1 = kinetic_energy(torch.as_tensor(ev.true_momenta), mol.masses)
        assert ((e1 - e0).abs() / e0).max() < 1e-6
        cold = simulate_molecule_events(name, 50, seed=2)
        assert not np.allclose(cold.true_momenta, ev.true_momenta)
