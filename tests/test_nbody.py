"""The N-body Coulomb explosion: accuracy against an independent reference, conservation
laws, symmetries, gradients, and agreement with the three-atom planar integrator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowrecon.systems.cei.geometry import random_rotations, sample_molecule
from flowrecon.systems.cei.molecule import load_molecule
from flowrecon.systems.cei.nbody import default_settings, explode, molecule_momenta
from flowrecon.systems.cei.physics import coulomb_potential, kinetic_energy, total_momentum
from flowrecon.systems.cei.reference import reference_momenta
from flowrecon.systems.cei.simulator import IntegratorSettings, asymptotic_momenta

PRESETS = ["ocs", "co2", "n2o", "so2", "d2o", "ch2i2", "chbrclf"]
#: Late enough that even the slow I-I pair of CH2I2 keeps < 1e-9 of the energy as potential.
T_REF = 1e12


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _relative_error(p, ref, n_atoms: int) -> np.ndarray:
    """Per event: largest per-atom momentum error over the largest atom momentum."""
    a = np.asarray(p, dtype=float).reshape(-1, n_atoms, 3)
    b = np.asarray(ref, dtype=float).reshape(-1, n_atoms, 3)
    return np.linalg.norm(a - b, axis=-1).max(1) / np.linalg.norm(b, axis=-1).max(1)


def _explode(x, m, **kwargs):
    return explode(x, masses=m.masses, charges=m.charges, **kwargs)


@pytest.fixture(scope="module")
def events():
    """100 geometries per preset and their momenta from the N-body integrator."""
    out = {}
    for n, name in enumerate(PRESETS):
        m = load_molecule(name)
        x = sample_molecule(m, 100, _gen(n))
        out[name] = (m, x, _explode(x, m))
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_matches_independent_reference(name, events):
    m, x, p = events[name]
    ref = reference_momenta(x[:4].numpy(), None, m.charges, m.masses, t_end=T_REF)
    err = _relative_error(p[:4], ref, m.n_atoms)
    assert np.median(err) < 1e-7
    assert err.max() < 1e-6
    # The dispatcher (planar integrator for three atoms) is as accurate.
    err = _relative_error(molecule_momenta(x[:4], m), ref, m.n_atoms)
    assert err.max() < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_reference_accuracy_on_a_hundred_events(name, events):
    m, x, p = events[name]
    ref = reference_momenta(x[:100].numpy(), None, m.charges, m.masses, t_end=T_REF)
    err = _relative_error(p[:100], ref, m.n_atoms)
    assert np.median(err) < 1e-7
    assert err.max() < 1e-6


@pytest.mark.parametrize("name", PRESETS)
def test_energy_closure_and_momentum_conservation(name, events):
    m, x, p = events[name]
    pe, ke = coulomb_potential(x, m.charges), kinetic_energy(p, m.masses)
    assert ((ke - pe).abs() / pe).max() < 1e-6
    assert total_momentum(p).abs().max() < 1e-12 * p.abs().max()


def test_other_charge_channels_close_energy():
    m = load_molecule("chbrclf")
    x = sample_molecule(m, 100, _gen(20))
    for charges in [(2, 1, 1, 1, 1), (1, 1, 2, 3, 4), (3, 1, 1, 1, 1)]:
        p = explode(x, masses=m.masses, charges=charges)
        pe, ke = coulomb_potential(x, charges), kinetic_energy(p, m.masses)
        assert ((ke - pe).abs() / pe).max() < 1e-6


def test_initial_momenta_match_reference_and_conserve():
    m = load_molecule("ch2i2")
    x = sample_molecule(m, 100, _gen(21))
    p0 = 2.0 * torch.randn(x.shape, generator=_gen(22), dtype=torch.float64)
    p = _explode(x, m, initial_momenta=p0)
    assert torch.allclose(total_momentum(p), total_momentum(p0), atol=1e-9)
    e0 = coulomb_potential(x, m.charges) + kinetic_energy(p0, m.masses)
    assert ((kinetic_energy(p, m.masses) - e0).abs() / e0).max() < 1e-6
    ref = reference_momenta(x[:3].numpy(), p0[:3].numpy(), m.charges, m.masses, t_end=T_REF)
    assert _relative_error(p[:3], ref, 5).max() < 1e-6


def _system(n_atoms: int) -> tuple[torch.Tensor, tuple, tuple]:
    """100 geometries, masses and charges: SO2 (3 atoms, planar), CHBrClF without its
    bromine (4 atoms, non-planar), CHBrClF (5 atoms)."""
    m = load_molecule("so2" if n_atoms == 3 else "chbrclf")
    x = sample_molecule(m, 100, _gen(23)).reshape(100, -1, 3)[:, :n_atoms].reshape(100, -1)
    return x, m.masses[:n_atoms], m.charges[:n_atoms]


@pytest.mark.parametrize("n_atoms", [3, 4, 5])
def test_rotation_equivariance(n_atoms):
    x, masses, charges = _system(n_atoms)
    p = explode(x, masses=masses, charges=charges)
    rot = random_rotations(x.shape[0], _gen(25))
    turn = lambda v: (v.reshape(-1, n_atoms, 3) @ rot.transpose(1, 2)).reshape(v.shape)  # noqa: E731
    pr = explode(turn(x), masses=masses, charges=charges)
    assert _relative_error(pr, turn(p), n_atoms).max() < 1e-9


@pytest.mark.parametrize("n_atoms", [4, 5])
def test_reflection_equivariance(n_atoms):
    # Coulomb dynamics commutes with reflections too: the molecule frame relies on it when
    # it maps both mirror images of a non-planar molecule onto one side of its plane.
    x, masses, charges = _system(n_atoms)
    mirror = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=x.dtype))
    flip = lambda v: (v.reshape(-1, n_atoms, 3) @ mirror).reshape(v.shape)  # noqa: E731
    p = explode(x, masses=masses, charges=charges)
    pr = explode(flip(x), masses=masses, charges=charges)
    assert _relative_error(pr, flip(p), n_atoms).max() < 1e-9
    assert _relative_error(pr, p, n_atoms).max() > 1e-3  # the molecules are not planar


@pytest.mark.parametrize("n_atoms", [3, 4, 5])
@pytest.mark.parametrize("scale", [0.5, 2.0, 10.0])
def test_coulomb_scaling_law(n_atoms, scale):
    # Energies scale like 1/L, so momenta like 1/sqrt(L).
    x, masses, charges = _system(n_atoms)
    p = explode(x, masses=masses, charges=charges)
    scaled = explode(x * scale, masses=masses, charges=charges)
    assert _relative_error(scaled * math.sqrt(scale), p, n_atoms).max() < 1e-9


@pytest.mark.parametrize("n_atoms", [3, 4, 5])
def test_translation_invariance_and_atom_relabelling(n_atoms):
    x, masses, charges = _system(n_atoms)
    p = explode(x, masses=masses, charges=charges)
    shift = torch.tensor([3.0, -7.0, 11.0], dtype=torch.float64).repeat(n_atoms)
    assert (
        _relative_error(explode(x + shift, masses=masses, charges=charges), p, n_atoms).max() < 1e-9
    )
    # Listing the atoms in another order permutes the answer the same way.
    order = list(reversed(range(n_atoms)))
    perm = lambda v: v.reshape(-1, n_atoms, 3)[:, order].reshape(v.shape)  # noqa: E731
    pp = explode(perm(x), masses=[masses[i] for i in order], charges=[charges[i] for i in order])
    assert _relative_error(pp, perm(p), n_atoms).max() < 1e-9


@pytest.mark.parametrize("name", ["ocs", "co2", "so2", "d2o"])
def test_three_atoms_agree_with_the_planar_integrator(name, events):
    m, x, p = events[name]
    planar = asymptotic_momenta(x, charges=m.charges, masses=m.masses)
    assert _relative_error(p, planar, 3).max() < 1e-8


def test_exactly_linear_and_coincident_free_geometries_are_finite():
    m = load_molecule("co2")
    x = torch.tensor(m.geometry, dtype=torch.float64).reshape(1, 9)
    p = _explode(x, m)
    assert torch.isfinite(p).all()
    assert p.reshape(3, 3)[:, 1:].abs().max() < 1e-12  # stays on the axis
    assert p.reshape(3, 3)[0].abs().max() < 1e-12  # the symmetric carbon stays at rest


def test_differentiable_with_respect_to_positions():
    m = load_molecule("chbrclf")
    x = sample_molecule(m, 2, _gen(26)).requires_grad_(True)
    coarse = IntegratorSettings(steps=6, sigma_end=4.0)
    assert torch.autograd.gradcheck(
        lambda v: _explode(v, m, settings=coarse), (x,), eps=1e-6, atol=1e-5, fast_mode=True
    )
    direction = torch.randn(x.shape, generator=_gen(27), dtype=torch.float64)
    p = _explode(x, m)
    (vjp,) = torch.autograd.grad(p, x, direction)
    with torch.no_grad():
        eps = 1e-5
        fd = _explode(x + eps * direction, m) - _explode(x - eps * direction, m)
    assert torch.isclose((vjp * direction).sum(), (fd / (2 * eps) * direction).sum(), rtol=1e-5)


def test_shapes_chunks_dtypes_and_numpy():
    m = load_molecule("ch2i2")
    x = sample_molecule(m, 7, _gen(28))
    p = _explode(x, m)
    # Chunks give the same momenta up to rounding: batch sizes can take different SIMD
    # paths (bit-for-bit equality held on one CPU and failed by 5e-15 on another).
    torch.testing.assert_close(_explode(x, m, chunk_size=3), p, rtol=1e-12, atol=0)
    p_np = _explode(x.numpy(), m)
    assert isinstance(p_np, np.ndarray) and p_np.shape == (7, 15)
    np.testing.assert_array_equal(p_np, p.numpy())
    assert _explode(x.reshape(7, 5, 3), m).shape == (7, 5, 3)
    p32 = _explode(x.float(), m)
    assert p32.dtype == torch.float32 and _relative_error(p32, p, 5).max() < 1e-4
    assert _explode(x[:0], m).shape == (0, 15)


@pytest.mark.parametrize(
    ("positions", "kwargs", "message"),
    [
        (np.zeros((4, 14)), {}, r"shape \(\.\.\., 15\) or \(\.\.\., 5, 3\) for 5 atoms"),
        (np.full((1, 15), np.nan), {}, "NaN or infinite"),
        (np.ones((2, 15)), {"initial_momenta": np.zeros((3, 15))}, "same events"),
        (np.ones(15), {"charges": (1, 1, 1, 1)}, "one charge per atom"),
        (np.ones(15), {"charges": (1, 1, 0, 1, 1)}, "positive and finite"),
    ],
)
def test_bad_input_messages(positions, kwargs, message):
    m = load_molecule("chbrclf")
    args = {"masses": m.masses, "charges": m.charges, **kwargs}
    with pytest.raises(ValueError, match=message):
        explode(positions, **args)


def test_default_settings_reach_further_for_slow_fragments():
    ocs, ch2i2 = load_molecule("ocs"), load_molecule("ch2i2")
    assert default_settings(ocs.masses, ocs.charges) == IntegratorSettings()
    longer = default_settings(ch2i2.masses, ch2i2.charges)
    assert longer.sigma_end > IntegratorSettings().sigma_end


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_path_matches_eager(dtype):
    # Minutes the first time (torch.compile of the fused five-atom step), cached after.
    m = load_molecule("chbrclf")
    x = sample_molecule(m, 5000, _gen(29)).to(dtype)
    eager = _explode(x, m, compile=False)
    fused = _explode(x, m, compile=True, chunk_size=8192)
    assert _relative_error(fused, eager, 5).max() < (1e-12 if dtype == torch.float64 else 1e-5)
    # Another five-atom molecule reuses the same compiled step (its constants are inputs).
    other = load_molecule("ch2i2")
    y = sample_molecule(other, 5000, _gen(30)).to(dtype)
    eager = _explode(y, other, compile=False)
    assert _relative_error(_explode(y, other, compile=True, chunk_size=8192), eager, 5).max() < (
        1e-12 if dtype == torch.float64 else 1e-5
    )
    # Initial momenta take the compiled set-up's other branch.
    p0 = 2.0 * torch.randn(y.shape, generator=_gen(31), dtype=torch.float64).to(dtype)
    eager = _explode(y, other, initial_momenta=p0, compile=False)
    fused = _explode(y, other, initial_momenta=p0, compile=True, chunk_size=8192)
    assert _relative_error(fused, eager, 5).max() < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_fast_accuracy_is_about_1e_5(name, events):
    m, x, _ = events[name]
    ref = reference_momenta(x[:4].numpy(), None, m.charges, m.masses, t_end=T_REF)
    fast = molecule_momenta(x[:4], m, accuracy="fast")
    assert fast.dtype == torch.float64  # integrated in float32, returned as given
    err = _relative_error(fast, ref, m.n_atoms)
    assert np.median(err) < 3e-5
    assert err.max() < 1e-4
    with pytest.raises(ValueError, match="accuracy must be one of high, fast"):
        molecule_momenta(x[:1], m, accuracy="medium")
