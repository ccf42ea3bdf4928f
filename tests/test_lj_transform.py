"""The chamber and box transforms: bijection, log-determinant, valid draws, save and load."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import flowrecon as fr
from flowrecon.preprocessing import make_pair_transform
from flowrecon.systems.lj.geometry import canonical_order, in_canonical_order
from flowrecon.systems.lj.transform import box_transform_name, chamber_transform_name

NAMES = (chamber_transform_name, box_transform_name)


def _ordered(n: int, particles: int, dim: int, box: float, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    conf = canonical_order(rng.uniform(0.01, box - 0.01, (n, particles, dim)))
    return torch.tensor(conf.reshape(n, -1))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("dim", "box"), [(2, 3.0), (3, 5.0)])
def test_round_trip_and_log_det_against_autograd(name, dim, box):
    t = make_pair_transform(name(dim, box)).fit(_ordered(5, 4, dim, box), None)
    x = _ordered(5, 4, dim, box, seed=1)
    z = t.forward_x(x, None)
    torch.testing.assert_close(t.inverse_x(z, None), x, rtol=0, atol=1e-12)
    for row in range(3):
        jac = torch.autograd.functional.jacobian(lambda a: t.forward_x(a[None], None)[0], x[row])
        expected = torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(t.log_abs_det_x(x[row : row + 1], None)[0], expected)


def test_every_unconstrained_point_maps_to_a_valid_configuration():
    t = make_pair_transform(chamber_transform_name(3, 5.0))
    z = torch.randn(2000, 30 * 3, dtype=torch.float64) * 4  # far into the tails too
    conf = t.inverse_x(z, None).numpy().reshape(-1, 30, 3)
    assert ((conf >= 0) & (conf <= 5)).all()
    assert in_canonical_order(conf).all()


def test_box_draws_stay_in_the_box_and_order_is_left_to_the_model():
    t = make_pair_transform(box_transform_name(3, 5.0))
    z = torch.randn(2000, 30 * 3, dtype=torch.float64) * 4
    conf = t.inverse_x(z, None).numpy().reshape(-1, 30, 3)
    assert ((conf >= 0) & (conf <= 5)).all()
    assert not in_canonical_order(conf).any()  # noise in R^90 is not ordered
    # A coordinate's map ignores the others: no compounding along the column of heights.
    shifted = z.clone()
    shifted[:, 2] += 1.0  # the lowest particle's height
    moved = t.inverse_x(shifted, None).numpy().reshape(-1, 30, 3) != conf
    assert moved[:, 0, 2].all() and moved.sum() == len(conf)


@pytest.mark.parametrize("name", NAMES)
def test_fit_rejects_unordered_or_outside_configurations(name):
    t = make_pair_transform(name(3, 5.0))
    x = _ordered(4, 5, 3, 5.0)
    with pytest.raises(ValueError, match="canonical"):
        t.fit(x.flip(-1), None)
    with pytest.raises(ValueError, match="canonical"):
        t.fit(x + 5.0, None)
    with pytest.raises(ValueError, match="multiple of dim"):
        t.fit(x[:, :-1], None)


@pytest.mark.parametrize("kind", NAMES)
def test_a_flow_with_the_transform_saves_loads_and_draws_valid_configurations(tmp_path, kind):
    name = kind(2, 3.0)
    x = _ordered(400, 4, 2, 3.0, seed=2).numpy()
    y = np.random.default_rng(3).uniform(0, 1, (400, 2))
    model = fr.make("zuko-realnvp", transforms=2, hidden=16, transform=name, device="cpu")
    model.fit(x, y, epochs=2, quiet=True, calibrate=False)
    draws = model.sample(y[:20], n=50, seed=0)
    conf = draws.reshape(-1, 4, 2)
    assert ((conf >= 0) & (conf <= 3)).all()
    if kind is chamber_transform_name:
        assert in_canonical_order(conf).all()
    model.save(tmp_path / "m.pt")
    again = fr.load(tmp_path / "m.pt", device="cpu")
    np.testing.assert_allclose(again.sample(y[:20], n=50, seed=0), draws)
    np.testing.assert_allclose(again.log_prob(x[:10], y[:10]), model.log_prob(x[:10], y[:10]))


@pytest.mark.parametrize("kind", NAMES)
def test_a_saved_model_loads_in_a_fresh_process_that_never_made_the_system(tmp_path, kind):
    # The transform's exact name (lj-box-d2-L3) is registered only when the system is
    # made; a fresh script finds it through the family's entry point (lj-box + d2-L3).
    x = _ordered(200, 4, 2, 3.0, seed=4).numpy()
    y = np.random.default_rng(5).uniform(0, 1, (200, 2))
    model = fr.make("zuko-realnvp", transforms=2, hidden=16, transform=kind(2, 3.0))
    model.fit(x, y, epochs=1, quiet=True, calibrate=False)
    model.save(tmp_path / "m.pt")
    expected = model.log_prob(x[:5], y[:5])
    np.save(tmp_path / "xy.npy", np.concatenate([x[:5], y[:5]], 1))
    script = (
        "import numpy as np, flowrecon as fr\n"
        "from flowrecon.preprocessing import PAIR_TRANSFORMS\n"
        "assert not PAIR_TRANSFORMS, PAIR_TRANSFORMS  # nothing registered at run time\n"
        f"m = fr.load({str(tmp_path / 'm.pt')!r}, device='cpu')\n"
        f"xy = np.load({str(tmp_path / 'xy.npy')!r})\n"
        "print(repr(m.log_prob(xy[:, :8], xy[:, 8:]).tolist()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(eval(out.stdout), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("lj-box", "needs its dimension and box in its name"),
        ("lj-box-d4-L5", "must read d{D}-L{L}"),
        ("lj-chamber-d3-L0", "must read d{D}-L{L}"),
        ("lj-boxes", "unknown transform 'lj-boxes'"),
    ],
)
def test_malformed_lj_transform_names_say_what_is_expected(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_pair_transform(name)
