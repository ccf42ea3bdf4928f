"""The momentum frame: orthonormality, round trips, equivariance and degenerate events."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from flowrecon.systems.cei.frames import from_frame, momentum_frame, to_frame
from flowrecon.systems.cei.physics import as_atoms, flatten_atoms

momenta = arrays(np.float64, 9, elements=st.floats(-50, 50))
finite_momenta = arrays(
    np.float64, 9, elements=st.floats(allow_nan=False, allow_infinity=False, width=64)
)


def rotation(seed: int) -> np.ndarray:
    """A random proper rotation matrix."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def rotate(v: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Applies the lab rotation q to every atom of flat (..., 9) vectors."""
    return flatten_atoms(as_atoms(v) @ q.T)


def well_conditioned(p: np.ndarray) -> bool:
    """p_S clearly non-zero and p_C clearly not parallel to it."""
    pa = as_atoms(p)
    ps, pc = pa[2], pa[0]
    if np.linalg.norm(ps) < 1e-2:
        return False
    e1 = ps / np.linalg.norm(ps)
    return bool(np.linalg.norm(pc - (pc @ e1) * e1) > 1e-2)


def assert_proper_rotation(R: np.ndarray) -> None:
    assert np.isfinite(R).all()
    eye = np.broadcast_to(np.eye(3), R.shape)
    np.testing.assert_allclose(R @ np.swapaxes(R, -1, -2), eye, atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(finite_momenta)
def test_frame_is_a_proper_rotation_for_any_finite_input(p: np.ndarray) -> None:
    assert_proper_rotation(momentum_frame(p))


@settings(max_examples=50, deadline=None)
@given(momenta)
def test_momenta_in_their_own_frame(p: np.ndarray) -> None:
    assume(well_conditioned(p))
    in_frame = as_atoms(to_frame(p, momentum_frame(p)))
    pc, ps = in_frame[0], in_frame[2]
    # p_S lies on e1, pointing along +e1; p_C lies in the e1-e2 plane with p_C . e2 > 0.
    np.testing.assert_allclose(ps, [np.linalg.norm(as_atoms(p)[2]), 0, 0], atol=1e-12)
    assert abs(pc[2]) < 1e-12
    assert pc[1] > 0


@settings(max_examples=50, deadline=None)
@given(momenta, arrays(np.float64, (2, 9), elements=st.floats(-10, 10)))
def test_round_trip(p: np.ndarray, v: np.ndarray) -> None:
    R = momentum_frame(p)
    np.testing.assert_allclose(from_frame(to_frame(v, R), R), v, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(to_frame(from_frame(v, R), R), v, rtol=1e-13, atol=1e-13)


@settings(max_examples=50, deadline=None)
@given(momenta, arrays(np.float64, 9, elements=st.floats(-10, 10)), st.integers(0, 2**32 - 1))
def test_rotation_equivariance(p: np.ndarray, x: np.ndarray, seed: int) -> None:
    assume(well_conditioned(p))
    q = rotation(seed)
    R, R_rot = momentum_frame(p), momentum_frame(rotate(p, q))
    np.testing.assert_allclose(R_rot, R @ q.T, atol=1e-10)
    # Frame coordinates of anything rotated along with the momenta do not change.
    np.testing.assert_allclose(to_frame(rotate(x, q), R_rot), to_frame(x, R), atol=1e-9)


@pytest.mark.parametrize(
    "p",
    [
        # Exactly linear OCS exploding along a lab axis and along a skew direction.
        np.array([0.5, 0, 0, -10.0, 0, 0, 9.5, 0, 0]),
        np.concatenate([c * np.array([1.0, 2.0, -3.0]) for c in (0.5, -10.0, 9.5)]),
        # p_C exactly zero, p_S zero, p_S and p_O zero, everything zero.
        np.array([0.0, 0, 0, -3, 1, 0, 3, -1, 0]),
        np.array([1.0, 2, 0, -1, -2, 0, 0, 0, 0]),
        np.array([1.0, 2, 3, 0, 0, 0, 0, 0, 0]),
        np.zeros(9),
        # Extreme but finite scales.
        np.array([1e300, 0, 0, -1e300, 1e300, 0, 1e300, 1e300, -1e300]),
        np.array([5e-324, 0, 0, 0, 5e-324, 0, 0, 0, 1e-310]),
    ],
)
def test_degenerate_momenta_give_finite_proper_frames(p: np.ndarray) -> None:
    R = momentum_frame(p)
    assert_proper_rotation(R)
    v = np.arange(9.0)
    np.testing.assert_allclose(from_frame(to_frame(v, R), R), v, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(-12, -3))
def test_nearly_collinear_momenta_stay_orthonormal(seed: int, log_bend: float) -> None:
    # Bent by about 10**log_bend rad: around the degeneracy tolerance, rounding in the
    # orthogonal part of p_C must not spoil orthogonality.
    rng = np.random.default_rng(seed)
    u = rng.normal(size=3)
    u /= np.linalg.norm(u)
    bend = 10**log_bend * rng.normal(size=3)
    assert_proper_rotation(momentum_frame(np.concatenate([0.5 * u + bend, -10 * u, 9.5 * u])))


def test_fallbacks_follow_the_documented_order() -> None:
    # p_S = 0: e1 follows p_O.
    R = momentum_frame(np.array([0.0, 1, 0, 0, 0, 2, 0, 0, 0]))
    np.testing.assert_allclose(R[0], [0, 0, 1], atol=1e-15)
    np.testing.assert_allclose(R[1], [0, 1, 0], atol=1e-15)
    # Collinear along x: e2 comes from the lab axis least aligned with e1 (y; ties go first).
    R = momentum_frame(np.array([0.5, 0, 0, -10.0, 0, 0, 9.5, 0, 0]))
    np.testing.assert_allclose(R, np.eye(3), atol=1e-15)


def test_collinear_frame_is_finite_and_differentiable() -> None:
    p = torch.tensor([0.5, 0, 0, -10.0, 0, 0, 9.5, 0, 0], dtype=torch.float64)
    p = (p.reshape(3, 3) @ torch.as_tensor(rotation(3)).T).reshape(9).requires_grad_(True)
    R = momentum_frame(p)
    (R * torch.arange(9.0, dtype=torch.float64).reshape(3, 3)).sum().backward()
    assert torch.isfinite(R).all() and torch.isfinite(p.grad).all()
    zero = torch.zeros(9, dtype=torch.float64, requires_grad=True)
    momentum_frame(zero).sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_frame_gradient_matches_finite_differences() -> None:
    p = torch.tensor([1.0, 2, 0.5, -4, -1, 0.3, 3, -1, -0.8], dtype=torch.float64)
    assert torch.autograd.gradcheck(momentum_frame, (p.requires_grad_(True),))


def test_sample_first_broadcast() -> None:
    gen = torch.Generator().manual_seed(0)
    n, batch = 4, 5
    p = torch.randn(batch, 9, generator=gen, dtype=torch.float64)
    samples = torch.randn(n, batch, 9, generator=gen, dtype=torch.float64)
    R = momentum_frame(p)
    assert R.shape == (batch, 3, 3)
    in_frame = to_frame(samples, R)
    assert in_frame.shape == (n, batch, 9)
    for i in range(n):
        for b in range(batch):
            torch.testing.assert_close(in_frame[i, b], to_frame(samples[i, b], R[b]))
    torch.testing.assert_close(from_frame(in_frame, R), samples)


def test_kinds_and_dtypes_are_kept() -> None:
    p = np.array([1.0, 2, 0.5, -4, -1, 0.3, 3, -1, -0.8])
    R = momentum_frame(p.astype(np.float32))
    assert isinstance(R, np.ndarray) and R.dtype == np.float32
    assert isinstance(to_frame(p, R), np.ndarray)
    Rt = momentum_frame(torch.as_tensor(p, dtype=torch.float32))
    assert isinstance(Rt, torch.Tensor) and Rt.dtype == torch.float32
    np.testing.assert_allclose(Rt.numpy(), R, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\)"):
        to_frame(p, np.eye(4))
