"""The N-atom momentum frame and its pair transform: equivariance, continuity near
collinear momenta, degenerate events, the choice of reference atoms, save and load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowrecon.preprocessing import Pipeline, available_transforms, make_pair_transform
from flowrecon.systems.cei.frames import (
    choose_frame_atoms,
    choose_mirror_atom,
    mirrored,
    molecule_frame,
    momentum_frame,
    to_frame,
)
from flowrecon.systems.cei.geometry import random_rotations, simulate_molecule_events
from flowrecon.systems.cei.molecule import load_molecule
from flowrecon.systems.cei.molecule_transform import MoleculeFrameTransform
from flowrecon.systems.cei.physics import remove_centre_of_mass

PRESETS = ["ocs", "co2", "n2o", "so2", "d2o", "ch2i2", "chbrclf"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def data():
    out = {}
    for n, name in enumerate(PRESETS):
        ev = simulate_molecule_events(name, 300, seed=n, momentum_noise=0.01)
        out[name] = (ev.molecule, torch.as_tensor(ev.positions), torch.as_tensor(ev.momenta))
    return out


def _is_rotation(R: torch.Tensor) -> bool:
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    orthonormal = torch.allclose(R @ R.transpose(-1, -2), eye, atol=1e-12)
    return orthonormal and torch.allclose(
        torch.linalg.det(R), torch.ones(R.shape[:-2], dtype=R.dtype)
    )


def test_ocs_frame_is_the_original_momentum_frame(data):
    _, _, p = data["ocs"]
    assert torch.allclose(molecule_frame(p, (2, 0)), momentum_frame(p), atol=1e-14)
    q = torch.randn(500, 9, generator=_gen(1), dtype=torch.float64)
    assert torch.allclose(molecule_frame(q, (2, 0)), momentum_frame(q), atol=1e-14)


@pytest.mark.parametrize("name", PRESETS)
def test_rotation_equivariance(name, data):
    m, x, p = data[name]
    R = molecule_frame(p, m.frame)
    assert _is_rotation(R)
    Q = random_rotations(p.shape[0], _gen(2))
    turn = lambda v: (v.reshape(-1, m.n_atoms, 3) @ Q.transpose(1, 2)).reshape(v.shape)  # noqa: E731
    assert torch.allclose(molecule_frame(turn(p), m.frame), R @ Q.transpose(1, 2), atol=1e-10)
    # So positions in the frame do not depend on the lab orientation at all.
    assert torch.allclose(
        to_frame(turn(x), molecule_frame(turn(p), m.frame)), to_frame(x, R), atol=1e-10
    )


def test_frame_turns_smoothly_with_a_tiny_bend():
    # CO2 momenta collinear up to a 1e-5 rad bend whose direction phi goes once around the
    # axis: e1 stays on the axis, e2 follows the carbon's sideways kick without jumps.
    phis = torch.linspace(0, 2 * math.pi, 2001, dtype=torch.float64)
    eps = 1e-5
    side = torch.stack([torch.zeros_like(phis), torch.cos(phis), torch.sin(phis)], -1)
    axis = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    p_c = -2 * eps * 100.0 * side
    p_o1 = 100.0 * axis + eps * 100.0 * side
    p_o2 = -100.0 * axis + eps * 100.0 * side
    p = torch.cat([p_c, p_o1, p_o2], -1)
    R = molecule_frame(p, (1, 0))
    assert _is_rotation(R)
    e1 = p_o1 / p_o1.norm(dim=-1, keepdim=True)
    e2 = p_c - (p_c * e1).sum(-1, keepdim=True) * e1
    assert torch.allclose(R[:, 0], e1, atol=1e-15)
    assert torch.allclose(R[:, 1], e2 / e2.norm(dim=-1, keepdim=True), atol=1e-12)
    assert torch.allclose(R[:, 1], -side, atol=1e-4)
    step = (R[1:] - R[:-1]).flatten(1).norm(dim=1)
    assert step.max() < 2.5 * (phis[1] - phis[0])


def test_frame_is_lipschitz_near_collinear_momenta():
    m = load_molecule("co2")
    p = torch.as_tensor(simulate_molecule_events(m, 200, seed=3).momenta)
    R = molecule_frame(p, m.frame)
    pa = p.reshape(-1, 3, 3)
    sine = torch.linalg.cross(pa[:, 2], pa[:, 0]).norm(dim=-1) / (
        pa[:, 2].norm(dim=-1) * pa[:, 0].norm(dim=-1)
    )
    delta = (
        1e-9
        * p.abs().max(-1, keepdim=True).values
        * torch.randn(p.shape, generator=_gen(4), dtype=torch.float64)
    )
    change = (molecule_frame(p + delta, m.frame) - R).flatten(1).norm(dim=1)
    # An angular change of about |dp| / (|p| sin): bounded wherever momenta are not collinear.
    assert (change * sine).max() < 1e-7


def test_gradients_are_finite_near_collinear_momenta():
    p = torch.tensor([[0.0, 1e-6, 0, 100, 1e-7, 0, -100, 1e-7, 0]], dtype=torch.float64)
    p.requires_grad_(True)
    (grad,) = torch.autograd.grad(molecule_frame(p, (1, 0)).sum(), p)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "p",
    [
        np.zeros(15),  # nothing measured
        np.array([1.0, 0, 0] * 5),  # all parallel
        np.array([0, 0, 0, 1, 0, 0, 2, 0, 0, -3, 0, 0, 0.5, 0, 0]),  # collinear, p_a = 0
        np.array([0, 0, 0, 1, 0, 0, 2, 0, 0, -3, 0, 0, 0.5, 1, 0]),  # p_b parallel to p_a
    ],
)
def test_degenerate_events_get_a_rotation(p):
    R = torch.as_tensor(molecule_frame(p, (0, 1)))
    assert torch.isfinite(R).all() and _is_rotation(R)


def test_degenerate_fallbacks_use_the_other_atoms():
    # p_b = 0: e2 comes from the atom with the largest part orthogonal to e1 (atom 3).
    p = np.array([2.0, 0, 0, 0, 0, 0, 1, 0.1, 0, 0, 0, 3, 1, 0, 0])
    R = molecule_frame(p, (0, 1))
    np.testing.assert_allclose(R[1], [0, 0, 1], atol=1e-15)
    # p_a = 0: e1 follows the largest momentum.
    R = molecule_frame(p, (1, 2))
    np.testing.assert_allclose(R[0], [0, 0, 1], atol=1e-15)


def test_choose_frame_atoms_is_deterministic_and_rotation_invariant(data):
    m, _, p = data["chbrclf"]
    choice = choose_frame_atoms(p)
    Q = random_rotations(p.shape[0], _gen(5))
    assert choose_frame_atoms((p.reshape(-1, 5, 3) @ Q.transpose(1, 2)).reshape(-1, 15)) == choice
    assert choice == m.frame  # the preset names the atoms the data would choose
    with pytest.raises(ValueError, match="at least one event"):
        choose_frame_atoms(np.zeros((0, 9)))


# --- the pair transform ------------------------------------------------------------------


def test_transform_is_registered_and_learns_its_atoms(data):
    assert "cei-molecule-frame" in available_transforms()
    m, x, p = data["ch2i2"]
    t = make_pair_transform("cei-molecule-frame").fit(x, p)
    assert t.n_atoms == 5 and t.reference == choose_frame_atoms(p)
    assert MoleculeFrameTransform("ch2i2").fit(x, p).reference == m.frame
    assert MoleculeFrameTransform(reference=(0, 2)).fit(x, p).reference == (0, 2)


@pytest.mark.parametrize("name", PRESETS)
def test_transform_round_trip_and_sample_first_shapes(name, data):
    m, x, p = data[name]
    t = MoleculeFrameTransform(m).fit(x, p)
    xf = t.forward_x(x, p)
    assert torch.allclose(t.inverse_x(xf, p), x, atol=1e-12)
    samples = torch.stack([xf, xf])  # (n, B, 3N)
    assert torch.allclose(t.inverse_x(samples, p)[1], x, atol=1e-12)
    assert torch.equal(t.log_abs_det_x(x, p), torch.zeros(x.shape[0], dtype=x.dtype))
    # Frame coordinates of the momenta: the reference atom lies along e1.
    pf = t.forward_y(p).reshape(-1, m.n_atoms, 3)
    assert pf[:, m.frame[0], 1:].abs().max() < 1e-9 * pf.abs().max()


def test_pipeline_saves_and_rebuilds_the_frame():
    ev = simulate_molecule_events("d2o", 300, seed=9)  # noise-free
    m, x, p = ev.molecule, torch.as_tensor(ev.positions), torch.as_tensor(ev.momenta)
    pipe = Pipeline(transform="cei-molecule-frame").fit(x, p)
    # Noise-free, the explosion stays in the molecular plane, which is the frame's xy
    # plane; with the centre of mass at the origin the whitening keeps 9 - 3 - 2 = 4
    # directions (the three internal coordinates lie on a curved 3-D set inside them).
    assert pipe.model_x_dim == 4
    again = Pipeline.from_state(pipe.state_dict())
    assert again.pair.state_dict() == pipe.pair.state_dict()
    assert torch.allclose(again.encode_x(x, p), pipe.encode_x(x, p))
    decoded = again.decode_x(pipe.encode_x(x, p), p)
    assert torch.allclose(decoded, remove_centre_of_mass(x, m.masses), atol=1e-9)


# --- reflections: one side of the frame plane for both mirror images --------------------

MIRROR = np.diag([1.0, 1.0, -1.0])  # reflection through the lab xy plane


def _reflect(v: torch.Tensor) -> torch.Tensor:
    return to_frame(v, torch.as_tensor(MIRROR))


@pytest.mark.parametrize("name", ["ocs", "co2", "n2o", "so2", "d2o"])
def test_planar_molecules_are_never_reflected(name, data):
    m, x, p = data[name]
    assert choose_mirror_atom(p, m.frame) is None
    assert MoleculeFrameTransform(m).fit(x, p).mirror is None


@pytest.mark.parametrize("name", ["ch2i2", "chbrclf"])
def test_mirror_images_share_frame_coordinates(name, data):
    m, x, p = data[name]
    t = MoleculeFrameTransform(m).fit(x, p)
    assert t.mirror is not None and t.mirror not in m.frame
    # The mirror image of every event (positions and momenta reflected) lands on the same
    # frame coordinates, and the plain frame would put it on the other side.
    xr, pr = _reflect(x), _reflect(p)
    assert torch.allclose(t.forward_x(xr, pr), t.forward_x(x, p), atol=1e-10)
    assert torch.allclose(t.forward_y(pr), t.forward_y(p), atol=1e-10)
    plain = MoleculeFrameTransform(m, mirror=False).fit(x, p)
    z = plain.forward_x(x, p).reshape(-1, m.n_atoms, 3)[..., 2]
    zr = plain.forward_x(xr, pr).reshape(-1, m.n_atoms, 3)[..., 2]
    assert torch.allclose(zr, -z, atol=1e-10) and z.abs().max() > 0.5
    # The mirror atom's momentum points to +e3 in every event; the transform stays exact.
    pf = t.forward_y(p).reshape(-1, m.n_atoms, 3)
    assert (pf[:, t.mirror, 2] >= 0).all()
    assert torch.allclose(t.inverse_x(t.forward_x(x, p), p), x, atol=1e-12)
    # With one sign, the out-of-plane coordinates spread far less than the plain frame's.
    spread = t.forward_x(x, p).reshape(-1, m.n_atoms, 3)[..., 2].std(0)
    assert (spread < 0.3 * z.std(0)).all()


def test_mirrored_frame_is_orthonormal_and_keeps_e3_on_the_plane(data):
    m, _, p = data["chbrclf"]
    R = mirrored(molecule_frame(p, m.frame), p, 2)
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    assert torch.allclose(R @ R.transpose(-1, -2), eye, atol=1e-12)
    assert set(torch.linalg.det(R).round().tolist()) == {-1.0, 1.0}
    # A momentum exactly in the plane keeps e3.
    q = torch.tensor([[1.0, 0, 0, 0, 1, 0, 1, 1, 0]], dtype=torch.float64)
    assert torch.equal(mirrored(molecule_frame(q, (0, 1)), q, 2), molecule_frame(q, (0, 1)))


def test_mirror_options_state_and_old_saved_models(data):
    m, x, p = data["chbrclf"]
    t = make_pair_transform("cei-molecule-frame:3,0,4").fit(x, p)
    assert (t.reference, t.mirror) == ((3, 0), 4)
    assert make_pair_transform("cei-molecule-frame:3,0,none").fit(x, p).mirror is None
    fitted = MoleculeFrameTransform(m).fit(x, p)
    again = MoleculeFrameTransform()
    again.load_state_dict(fitted.state_dict())
    assert torch.equal(again.forward_x(x, p), fitted.forward_x(x, p))
    # A model saved before reflections existed has no "mirror" and was trained without.
    old = MoleculeFrameTransform()
    old.load_state_dict({"n_atoms": 5, "reference": [3, 0]})
    assert old.mirror is None
    plain = MoleculeFrameTransform(m, mirror=False).fit(x, p)
    assert torch.equal(old.forward_x(x, p), plain.forward_x(x, p))


def test_mirror_bad_input(data):
    m, x, p = data["chbrclf"]
    with pytest.raises(ValueError, match=r"A,B\[,C\] takes two different atom indices"):
        make_pair_transform("cei-molecule-frame:3,0,x")
    with pytest.raises(ValueError, match=r"other than the reference atoms \(3, 0\), got 0"):
        MoleculeFrameTransform(m, mirror=0).fit(x, p)
    with pytest.raises(ValueError, match="mirror atom must be an index in 0..4, got 7"):
        mirrored(molecule_frame(p, m.frame), p, 7)


def test_transform_bad_input(data):
    m, x, p = data["so2"]
    with pytest.raises(ValueError, match="made for 5 atoms"):
        MoleculeFrameTransform("chbrclf").fit(x, p)
    with pytest.raises(ValueError, match="3N position and 3N momentum columns"):
        MoleculeFrameTransform().fit(x[:, :8], p)
    with pytest.raises(ValueError, match="two different indices in 0..2"):
        MoleculeFrameTransform(reference=(0, 3)).fit(x, p)
    with pytest.raises(ValueError, match="not fitted"):
        MoleculeFrameTransform().forward_y(p)
