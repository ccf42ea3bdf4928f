"""Physics properties and accuracy of the Coulomb explosion simulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowrecon.systems.cei.constants import MASSES
from flowrecon.systems.cei.geometry import (
    add_momentum_noise,
    random_rotations,
    sample_ball,
    sample_ocs,
    simulate_events,
)
from flowrecon.systems.cei.physics import (
    centre_of_mass,
    coulomb_potential,
    internal_coordinates,
    kinetic_energy,
    total_momentum,
)
from flowrecon.systems.cei.reference import reference_momenta
from flowrecon.systems.cei.simulator import IntegratorSettings, asymptotic_momenta


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ocs_events():
    x = sample_ocs(200, _gen(1))
    return x, asymptotic_momenta(x)


@pytest.fixture(scope="module")
def ball_events():
    x = sample_ball(200, _gen(2))
    return x, asymptotic_momenta(x)


def _relative_error(p: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per event: largest per-atom momentum error over the largest atom momentum."""
    a, b = np.asarray(p).reshape(-1, 3, 3), np.asarray(ref).reshape(-1, 3, 3)
    return np.linalg.norm(a - b, axis=-1).max(1) / np.linalg.norm(b, axis=-1).max(1)


@pytest.mark.parametrize("charges", [(2, 2, 2), (2, 1, 1), (1, 1, 1), (3, 2, 1)])
@pytest.mark.parametrize("events", ["ocs_events", "ball_events"])
def test_energy_closure(events, charges, request):
    x, _ = request.getfixturevalue(events)
    p = asymptotic_momenta(x, charges=charges)
    ke, pe = kinetic_energy(p), coulomb_potential(x, charges)
    assert ((ke - pe).abs() / pe).max() < 1e-6


@pytest.mark.parametrize("events", ["ocs_events", "ball_events"])
def test_total_momentum_is_zero(events, request):
    _, p = request.getfixturevalue(events)
    scale = p.abs().max()
    assert total_momentum(p).abs().max() < 1e-12 * scale


def test_initial_momenta_conserve_momentum_and_energy(ocs_events):
    x, _ = ocs_events
    p0 = 5.0 * torch.randn(x.shape, generator=_gen(3), dtype=torch.float64)
    p = asymptotic_momenta(x, p0)
    assert torch.allclose(total_momentum(p), total_momentum(p0), atol=1e-9)
    e0 = coulomb_potential(x) + kinetic_energy(p0)
    assert ((kinetic_energy(p) - e0).abs() / e0).max() < 1e-6


def test_matches_independent_reference():
    # scipy DOP853 in plain time to t = 1e10 a.u.: converged to ~1e-8 on its own.
    x = torch.cat([sample_ocs(6, _gen(4)), sample_ball(6, _gen(5))])
    err = _relative_error(asymptotic_momenta(x), reference_momenta(x.numpy()))
    assert np.median(err) < 1e-7
    assert err.max() < 1e-6


def test_matches_reference_with_initial_momenta():
    x = sample_ocs(4, _gen(6))
    p0 = 3.0 * torch.randn(x.shape, generator=_gen(7), dtype=torch.float64)
    err = _relative_error(asymptotic_momenta(x, p0), reference_momenta(x.numpy(), p0.numpy()))
    assert err.max() < 1e-6


@pytest.mark.slow
def test_reference_accuracy_on_hundreds_of_events():
    x = torch.cat([sample_ocs(150, _gen(8)), sample_ball(150, _gen(9))])
    err = _relative_error(asymptotic_momenta(x), reference_momenta(x.numpy()))
    assert np.median(err) < 1e-7
    assert err.max() < 1e-6


def test_rotation_equivariance(ball_events):
    x, p = ball_events
    rot = random_rotations(x.shape[0], _gen(10))
    xr = (x.reshape(-1, 3, 3) @ rot.transpose(1, 2)).reshape(-1, 9)
    pr = asymptotic_momenta(xr)
    expected = (p.reshape(-1, 3, 3) @ rot.transpose(1, 2)).reshape(-1, 9)
    assert _relative_error(pr, expected).max() < 1e-9


def test_translation_invariance(ocs_events):
    x, p = ocs_events
    shift = torch.tensor([3.0, -7.0, 11.0], dtype=torch.float64).repeat(3)
    assert _relative_error(asymptotic_momenta(x + shift), p).max() < 1e-9


@pytest.mark.parametrize("scale", [0.5, 2.0, 10.0])
def test_coulomb_scaling_law(ocs_events, scale):
    # Energies scale like 1/L, so momenta like 1/sqrt(L).
    x, p = ocs_events
    scaled = asymptotic_momenta(x * scale)
    assert _relative_error(scaled * math.sqrt(scale), p).max() < 1e-9


def test_planar_and_general_paths_agree(ball_events):
    x, p = ball_events
    x3 = x[:20].clone().requires_grad_(True)  # gradients force the general 3-D path
    assert _relative_error(asymptotic_momenta(x3).detach(), p[:20]).max() < 1e-10


def test_exactly_linear_molecule_is_finite():
    x = torch.tensor([[0.0, 0, 0, -2.19, 0, 0, 2.95, 0, 0]], dtype=torch.float64)
    p = asymptotic_momenta(x)
    assert torch.isfinite(p).all()
    assert p.reshape(3, 3)[:, 1:].abs().max() < 1e-12  # stays on the axis
    assert abs(kinetic_energy(p) - coulomb_potential(x)) / coulomb_potential(x) < 1e-6


def test_differentiable_with_respect_to_positions():
    x = sample_ocs(2, _gen(11)).requires_grad_(True)
    coarse = IntegratorSettings(steps=8, sigma_end=4.0)  # small graph; the map is smooth
    assert torch.autograd.gradcheck(
        lambda v: asymptotic_momenta(v, settings=coarse), (x,), eps=1e-6, atol=1e-5, fast_mode=True
    )
    # Full settings: a directional derivative against a central difference.
    direction = torch.randn(x.shape, generator=_gen(12), dtype=torch.float64)
    p = asymptotic_momenta(x)
    (jvp,) = torch.autograd.grad(p, x, direction)
    with torch.no_grad():
        eps = 1e-5
        fd = asymptotic_momenta(x + eps * direction) - asymptotic_momenta(x - eps * direction)
        fd_dot = (fd / (2 * eps) * direction).sum()
    assert torch.isfinite(jvp).all()
    # <J^T d, d> = <J d, d>: compares the backward pass with the finite difference.
    assert torch.isclose((jvp * direction).sum(), fd_dot, rtol=1e-5)


def test_numpy_in_numpy_out_and_shapes():
    x = sample_ocs(3, _gen(12)).numpy()
    p = asymptotic_momenta(x)
    assert isinstance(p, np.ndarray) and p.shape == (3, 9)
    p33 = asymptotic_momenta(x.reshape(3, 3, 3))
    assert p33.shape == (3, 3, 3)
    np.testing.assert_allclose(p33.reshape(3, 9), p, rtol=1e-12)
    assert asymptotic_momenta(x[:0]).shape == (0, 9)


def test_chunks_give_the_same_result(ocs_events):
    x, p = ocs_events
    assert torch.equal(asymptotic_momenta(x, chunk_size=37), p)


@pytest.mark.parametrize(
    ("positions", "kwargs", "message"),
    [
        (np.zeros((4, 7)), {}, r"shape \(\.\.\., 9\)"),
        (np.full((1, 9), np.nan), {}, "NaN or infinite"),
        (np.ones((2, 9)), {"initial_momenta": np.zeros((3, 9))}, "same events"),
        (np.arange(9.0), {"charges": (2, 2)}, "three positive numbers"),
        (np.arange(9.0), {"charges": (2, 0, 2)}, "three positive numbers"),
    ],
)
def test_bad_input_messages(positions, kwargs, message):
    with pytest.raises(ValueError, match=message):
        asymptotic_momenta(positions, **kwargs)


@pytest.mark.slow
def test_compiled_path_matches_eager(ocs_events):
    x, p = ocs_events
    assert _relative_error(asymptotic_momenta(x, compile=True), p).max() < 1e-12


def _with_collinear(x: torch.Tensor) -> torch.Tensor:
    """``x`` with two exactly collinear events appended (along z and along x)."""
    line = torch.tensor(
        [[0.0, 0, 0, 0, 0, -2.19, 0, 0, 2.95], [0.0, 0, 0, -2.19, 0, 0, 2.95, 0, 0]],
        dtype=x.dtype,
    )
    return torch.cat([x, line])


@pytest.mark.slow
@pytest.mark.parametrize("events", ["ocs_events", "ball_events"])
def test_fused_float32_path_matches_eager(events, request):
    # Float32 batches from rest run set-up and tail compiled too (~10 s to compile).
    x = _with_collinear(request.getfixturevalue(events)[0]).float()
    settings = IntegratorSettings(steps=12, sigma_end=6.0, grid_power=1.0)
    eager = asymptotic_momenta(x, settings=settings, compile=False)
    fused = asymptotic_momenta(x, settings=settings, compile=True)
    assert fused.dtype == torch.float32 and fused.shape == x.shape
    assert _relative_error(fused.double(), eager.double()).max() < 1e-5
    # Collinear events stay on their line (the fallback plane axis).
    assert fused[-2].reshape(3, 3)[:, :2].abs().max() < 1e-6 * fused[-2].abs().max()
    assert fused[-1].reshape(3, 3)[:, 1:].abs().max() < 1e-6 * fused[-1].abs().max()
    assert total_momentum(fused.double()).abs().max() < 1e-5 * fused.abs().max()


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fast_mode_error_level(compile):
    # The "fast" accuracy level for OCS (12 float32 steps): ~1e-5 median against DOP853.
    from flowrecon.systems.cei.nbody import molecule_momenta

    x = sample_ocs(16, _gen(7))
    ref = reference_momenta(x.numpy(), None, (2, 2, 2), MASSES, t_end=1e12)
    err = _relative_error(molecule_momenta(x, "ocs", accuracy="fast", compile=compile), ref)
    assert np.median(err) < 3e-5
    assert err.max() < 1e-4
    assert np.median(err) > 1e-7  # float32 on a coarse grid, not the high path


# --- geometry samplers and data sets -------------------------------------------------


def test_ocs_sampler_statistics():
    x = sample_ocs(20000, _gen(13))
    ic = internal_coordinates(x)
    assert abs(ic.r_co.mean() - 2.19) < 0.005 and abs(ic.r_co.std() - 0.1) < 0.005
    assert abs(ic.r_cs.mean() - 2.95) < 0.005 and abs(ic.r_cs.std() - 0.1) < 0.005
    bend = 180.0 - ic.angle_ocs_deg
    # Rayleigh law of a 2-D bend with sigma = 10 deg: mean sigma * sqrt(pi / 2).
    assert abs(bend.mean() - 10 * math.sqrt(math.pi / 2)) < 0.3
    assert centre_of_mass(x).abs().max() < 1e-12
    # Orientation is uniform: the C-S axis has no preferred direction.
    axis = x[:, 6:9] - x[:, 0:3]
    assert (axis / axis.norm(dim=1, keepdim=True)).mean(0).abs().max() < 0.03


def test_ball_sampler_respects_limits():
    x = sample_ball(5000, _gen(14), radius=4.0, min_distance=0.5).reshape(-1, 3, 3)
    pairs = torch.stack([x[:, 0] - x[:, 1], x[:, 0] - x[:, 2], x[:, 1] - x[:, 2]], 1)
    assert pairs.norm(dim=-1).min() >= 0.5
    assert pairs.norm(dim=-1).max() <= 8.0
    masses = torch.tensor(MASSES, dtype=torch.float64)
    assert ((masses[:, None] * x).sum(1) / masses.sum()).abs().max() < 1e-12
    with pytest.raises(ValueError, match="must be below radius"):
        sample_ball(3, _gen(0), radius=1.0, min_distance=2.0)


def test_simulate_events_is_reproducible_and_noisy():
    a = simulate_events(50, seed=3)
    b = simulate_events(50, seed=3)
    c = simulate_events(50, seed=4)
    np.testing.assert_array_equal(a.momenta, b.momenta)
    assert not np.array_equal(a.positions, c.positions)
    noisy = simulate_events(2000, seed=3, momentum_noise=0.01)
    rel = np.linalg.norm((noisy.momenta - noisy.true_momenta).reshape(-1, 3, 3), axis=-1)
    rel /= np.linalg.norm(noisy.true_momenta.reshape(-1, 3, 3), axis=-1)
    # |noise| / |p| follows a chi distribution with 3 dof times sigma: mean 1.596 sigma.
    assert abs(rel.mean() / 0.01 - 1.596) < 0.05


def test_simulate_events_bad_input():
    with pytest.raises(ValueError, match="unknown geometry 'cube'"):
        simulate_events(3, geometry="cube")
    with pytest.raises(ValueError, match="at least 1"):
        simulate_events(0)
    with pytest.raises(ValueError, match="must be >= 0"):
        add_momentum_noise(torch.zeros(1, 9), -0.1, _gen(0))
