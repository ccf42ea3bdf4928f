"""Scalers, whitening, the CEI momentum-frame transform and the rotation equivariance it buys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import flowrecon as fr
from flowrecon.preprocessing import (
    SCALERS,
    PairTransform,
    Pipeline,
    Scaler,
    Whitening,
    make_pair_transform,
    resolve_transform,
)
from flowrecon.systems.cei.constants import MASSES
from flowrecon.systems.cei.transform import MomentumFrameTransform

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


def rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def rotate(v: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Applies the rotation q to every atom of flat (..., 9) vectors."""
    return (v.reshape(*v.shape[:-1], 3, 3) @ q.T).reshape(v.shape)


def planar_molecules(
    n: int, seed: int = 0, convention: str = "com"
) -> tuple[np.ndarray, np.ndarray]:
    """CEI-shaped toy data: each event's positions and momenta lie in one random plane.

    ``convention`` puts the centre of mass ("com") or the carbon atom ("carbon") at the
    origin, as users' data do.
    """
    rng = np.random.default_rng(seed)
    planar_x = np.zeros((n, 3, 3))
    planar_x[:, :, :2] = rng.normal(size=(n, 3, 2)) + [[0, 0], [-2.2, 0.3], [2.9, -0.2]]
    planar_p = np.zeros((n, 3, 3))
    planar_p[:, :, :2] = rng.normal(size=(n, 3, 2)) * 10 + [[0, 5], [-30, 0], [30, 0]]
    if convention == "com":
        m = np.asarray(MASSES)
        planar_x -= (m[:, None] * planar_x).sum(1, keepdims=True) / m.sum()
    else:
        planar_x -= planar_x[:, :1]
    q = np.stack([rotation(int(s)) for s in rng.integers(0, 2**31, size=n)])
    x = np.einsum("nij,naj->nai", q, planar_x).reshape(n, 9)
    p = np.einsum("nij,naj->nai", q, planar_p).reshape(n, 9)
    return x, p


# -- scalers ---------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (20, 3), elements=finite), st.sampled_from(SCALERS))
def test_scalers_round_trip(x: np.ndarray, kind: str) -> None:
    t = torch.as_tensor(x)
    s = Scaler(kind).fit(t)
    z = s.forward(t)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(s.inverse(z), t, atol=1e-9 * (1 + t.abs().max().item()), rtol=1e-9)


@pytest.mark.parametrize("kind", SCALERS)
def test_zero_variance_columns_stay_finite(kind: str) -> None:
    x = torch.column_stack(
        [torch.randn(50, dtype=torch.float64), torch.full((50,), 3.0, dtype=torch.float64)]
    )
    s = Scaler(kind).fit(x)
    z = s.forward(x)
    assert torch.isfinite(z).all() and torch.isfinite(s.log_abs_det())
    torch.testing.assert_close(s.inverse(z), x)
    if kind != "none":
        assert torch.all(z[:, 1] == z[0, 1])  # the constant column stays constant, not inf


def test_robust_scaler_falls_back_to_std_for_zero_iqr() -> None:
    x = torch.zeros(100, 1, dtype=torch.float64)
    x[:5] = 1.0  # the interquartile range is 0 but the column is not constant
    s = Scaler("robust").fit(x)
    assert s.scale.item() == pytest.approx(x.std(correction=0).item())


def test_scaler_state_round_trip_and_errors() -> None:
    s = Scaler("minmax").fit(torch.randn(10, 2))
    s2 = Scaler.from_state(s.state_dict())
    x = torch.randn(4, 2)
    torch.testing.assert_close(s2.forward(x), s.forward(x))
    with pytest.raises(ValueError, match="unknown scaler 'zscore'"):
        Scaler("zscore")
    with pytest.raises(ValueError, match="expected 2 columns, got 3"):
        s.forward(torch.zeros(1, 3))


# -- whitening -------------------------------------------------------------------------


def test_whitening_drops_null_directions_and_round_trips() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    offset = torch.arange(5, dtype=torch.float64)
    x = torch.randn(400, 3, generator=gen, dtype=torch.float64) @ a + offset  # rank 3 in 5-D
    w = Whitening().fit(x)
    assert (w.n_kept, w.n_dropped) == (3, 2)
    z = w.forward(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.T @ z / (len(z) - 1), torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(w.inverse(z), x)
    # Any point of the reduced space maps onto the training subspace (dropped
    # directions at their training mean), so round trips from there are exact too.
    z_new = torch.randn(7, 2, 3, dtype=torch.float64)  # sample-first shapes work
    torch.testing.assert_close(w.forward(w.inverse(z_new)), z_new)
    # log|det| of the kept part: sqrt(det(J J^T)) of the (3 x 5) Jacobian.
    jac = torch.autograd.functional.jacobian(lambda v: w.forward(v[None])[0], x[0])
    assert 0.5 * torch.logdet(jac @ jac.T).item() == pytest.approx(w.log_abs_det().item())
    w2 = Whitening.from_state(w.state_dict())
    torch.testing.assert_close(w2.forward(x), z)


def test_whitening_of_constant_data_is_an_error() -> None:
    with pytest.raises(ValueError, match="constant"):
        Whitening().fit(torch.ones(10, 3))


# -- the CEI momentum frame -----------------------------------------------------------


def test_frame_transform_round_trip_and_momenta_in_their_own_frame() -> None:
    x, p = (torch.as_tensor(a) for a in planar_molecules(20))
    t = MomentumFrameTransform().fit(x, p)
    torch.testing.assert_close(t.inverse_x(t.forward_x(x, p), p), x)
    samples = torch.randn(4, 20, 9, dtype=torch.float64)  # sample-first against (B, 9)
    torch.testing.assert_close(t.forward_x(t.inverse_x(samples, p), p), samples)
    pf = t.forward_y(p).reshape(20, 3, 3)
    torch.testing.assert_close(pf[:, 2, 1:], torch.zeros(20, 2, dtype=torch.float64))  # p_S on e1
    # Planar events: positions have no out-of-plane part in the frame.
    torch.testing.assert_close(
        t.forward_x(x, p).reshape(20, 3, 3)[..., 2], torch.zeros(20, 3, dtype=torch.float64)
    )
    assert make_pair_transform("cei-momentum-frame").name == "cei-momentum-frame"
    with pytest.raises(ValueError, match="needs 9 position columns"):
        t.fit(x[:, :6], p)


def test_transform_names() -> None:
    assert resolve_transform("cei-momentum-frame") == "cei-momentum-frame"
    assert resolve_transform("lab") is None and resolve_transform("none") is None
    with pytest.raises(ValueError, match="unknown transform 'momentum'.*cei-momentum-frame"):
        resolve_transform("momentum")
    # The generic core never guesses a physical frame from the widths of the data.
    with pytest.raises(ValueError, match="name the transform"):
        resolve_transform("auto")
    x, y = torch.randn(20, 9, dtype=torch.float64), torch.randn(20, 9, dtype=torch.float64)
    assert Pipeline().fit(x, y).transform_name is None


@pytest.mark.parametrize(
    ("transform", "convention", "kept"),
    [
        # frame: 3 out-of-plane + 2 in-plane centre-of-mass constraints dropped
        ("cei-momentum-frame", "com", 4),
        ("cei-momentum-frame", "carbon", 4),  # carbon at the origin: 3 + 2 as well
        ("lab", "com", 6),  # lab: only the 3 centre-of-mass constraints
    ],
)
def test_pipeline_drops_what_the_convention_fixes(
    transform: str, convention: str, kept: int
) -> None:
    x, p = (torch.as_tensor(a) for a in planar_molecules(300, convention=convention))
    pipe = Pipeline(transform=transform).fit(x, p)
    assert pipe.model_x_dim == kept
    xm = pipe.encode_x(x, p)
    assert torch.isfinite(xm).all() and torch.isfinite(pipe.encode_y(p)).all()
    # Results come back in the user's own frame and units, convention included.
    torch.testing.assert_close(pipe.decode_x(xm, p), x, atol=1e-9, rtol=0)
    state = Pipeline.from_state(pipe.state_dict())
    torch.testing.assert_close(state.encode_x(x, p), xm)


def test_pair_transform_protocol_defaults_are_the_identity() -> None:
    t = PairTransform()
    x, y = torch.randn(3, 2), torch.randn(3, 4)
    assert t.fit(x, y) is t and t.forward_x(x, y) is x and t.forward_y(y) is y
    assert torch.equal(t.log_abs_det_x(x, y), torch.zeros(3))


@pytest.mark.parametrize("name", ["cvae", "zuko-maf"])
def test_fitted_model_is_rotation_equivariant_with_the_frame(name: str) -> None:
    x, p = planar_molecules(200)
    hp = {"cvae": {"hidden_dim": 8, "latent_dim": 4}, "zuko-maf": {"transforms": 2, "hidden": 16}}[
        name
    ]
    model = fr.make(name, device="cpu", transform="cei-momentum-frame", **hp)
    model.fit(x, p, epochs=2, quiet=True)
    assert model.preprocessing_.transform_name == "cei-momentum-frame"
    q = rotation(3)
    samples = model.sample(p[:10], n=5, seed=0)
    rotated = model.sample(rotate(p[:10], q), n=5, seed=0)
    np.testing.assert_allclose(rotated, rotate(samples, q), atol=1e-4)
    if model.has_density:
        np.testing.assert_allclose(
            model.log_prob(rotate(x[:10], q), rotate(p[:10], q)),
            model.log_prob(x[:10], p[:10]),
            atol=1e-4,
        )
    # In the lab frame the same model is not equivariant: the frame is what buys it.
    lab = fr.make(name, device="cpu", transform="lab", **hp).fit(x, p, epochs=2, quiet=True)
    lab_rotated = lab.sample(rotate(p[:10], q), n=5, seed=0)
    assert not np.allclose(lab_rotated, rotate(lab.sample(p[:10], n=5, seed=0), q), atol=1e-2)


def test_log_prob_includes_the_preprocessing_log_det() -> None:
    # Scaling x by 2 (and shifting it) maps model space identically, so the user-space
    # density drops by exactly D log 2.
    rng = np.random.default_rng(0)
    y = rng.normal(size=(120, 2))
    x = y @ np.ones((2, 3)) + rng.normal(size=(120, 3))
    a = fr.make("zuko-maf", device="cpu", transforms=1, hidden=8).fit(x, y, epochs=1, quiet=True)
    b = fr.make("zuko-maf", device="cpu", transforms=1, hidden=8).fit(
        2 * x + 1, y, epochs=1, quiet=True
    )
    np.testing.assert_allclose(
        b.log_prob(2 * x[:5] + 1, y[:5]), a.log_prob(x[:5], y[:5]) - 3 * np.log(2), atol=1e-5
    )


def test_whitening_says_why_it_cannot_whiten_huge_values() -> None:
    from flowrecon.preprocessing import Whitening

    x = torch.randn(20, 3, dtype=torch.float64)
    x[4, 1] = 1e200  # its square overflows the covariance
    with pytest.raises(ValueError, match="too large .* to whiten: its covariance overflows"):
        Whitening().fit(x)
