"""Trustworthy posteriors: the sample guard, out-of-distribution flags, representable
ranges, calibration guards, robust loading and file modes."""

from __future__ import annotations

import os
import re
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowrecon as fr
from flowrecon.density import Density
from flowrecon.guard import Support, redraw


def toy(n: int, seed: int = 0, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, 2))
    return y @ np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]) + noise * rng.normal(size=(n, 3)), y


@pytest.fixture(scope="module")
def flow() -> fr.ConditionalGenerator:
    x, y = toy(2000)
    return fr.make("zuko-nsf", hidden=16, transforms=2, device="cpu").fit(
        x, y, epochs=8, batch_size=128, quiet=True
    )


# -- the guard -----------------------------------------------------------------------


def test_support_holds_the_training_rows_with_a_margin() -> None:
    x = torch.tensor([[-1.0, 0.0], [1.0, 2.0], [0.0, 1.0]])
    s = Support.fit(x, margin=0.25)
    torch.testing.assert_close(s.lo, torch.tensor([-1.5, -0.5], dtype=torch.float64))
    torch.testing.assert_close(s.hi, torch.tensor([1.5, 2.5], dtype=torch.float64))
    assert s.inside(x).all()
    far = torch.tensor([[1.45, 2.45], [0.0, 1e18], [float("nan"), 0.0], [float("inf"), 0.0]])
    assert s.inside(far).tolist() == [False, False, False, False]  # a box corner, not the ball
    assert s.inside(s.project(far)).all()


def test_redraw_replaces_runaways_and_counts_them_per_event() -> None:
    s = Support.fit(torch.tensor([[-1.0], [1.0]]))
    xs = torch.tensor([[[0.1], [1e18], [5.0]], [[0.2], [0.3], [float("nan")]]])  # (k=2, B=3)
    calls = []

    def draw(m: int, events: torch.Tensor) -> torch.Tensor:
        calls.append(events.tolist())
        out = torch.full((m, len(events), 1), 0.5)
        out[:, events == 2] = 1e9  # event 2 never draws inside
        return out

    out, redrawn, unresolved = redraw(xs, draw, s, rounds=3)
    assert redrawn.tolist() == [0, 1, 2] and unresolved.tolist() == [0, 0, 2]
    assert calls == [[1, 2], [2], [2]]  # only events with draws outside are drawn again
    assert out[:, 0, 0].tolist() == pytest.approx([0.1, 0.2])  # untouched
    assert out[:, 1, 0].tolist() == pytest.approx([0.5, 0.3])  # the runaway redrawn
    assert s.inside(out).all() and torch.isfinite(out).all()  # event 2: projected


def test_unresolved_draws_are_replaced_by_accepted_draws_of_the_same_event() -> None:
    s = Support.fit(torch.tensor([[-1.0], [1.0]]))
    xs = torch.tensor([[[0.3]], [[1e18]], [[-0.4]], [[1e18]]])  # one event, two good draws
    out, redrawn, unresolved = redraw(xs, lambda m, ev: torch.full((m, len(ev), 1), 9e9), s)
    assert redrawn.tolist() == [2] and unresolved.tolist() == [2]
    assert set(np.round(out[:, 0, 0].tolist(), 5)) <= {0.3, -0.4}


def test_guard_does_not_touch_in_distribution_samples(flow) -> None:
    from flowrecon.evaluation.metrics import central_interval_coverage

    x, y = toy(600, seed=5)
    d = flow.sample(y, n=60, seed=0, return_diagnostics=True)
    raw = flow.sample(y, n=60, seed=0, guard=False)
    assert d.redrawn.sum() <= 4  # a few of 36,000 draws at most
    same = d.redrawn == 0
    np.testing.assert_array_equal(d.samples[:, same], raw[:, same])
    cov, cov_raw = (central_interval_coverage(s, x, 0.9) for s in (d.samples, raw))
    assert cov == pytest.approx(cov_raw, abs=0.002) and 0.8 < cov < 0.97


def test_runaway_draws_of_any_estimator_are_redrawn(flow, monkeypatch) -> None:
    _, y = toy(6, seed=3)
    clean = flow.sample(y, n=20, seed=1)
    original = flow.estimator_.sample
    state = {"calls": 0}

    def runaway(n, ym, temperature=1.0):
        out = original(n, ym, temperature=temperature)
        state["calls"] += 1
        if state["calls"] == 1:  # the first draw of event 0 explodes, event 4 is NaN
            out[0, 0] = 1e18
            out[:, 4] = float("nan")
        return out

    monkeypatch.setattr(flow.estimator_, "sample", runaway)
    d = flow.sample(y, n=20, seed=1, return_diagnostics=True)
    assert np.isfinite(d.samples).all()
    assert d.redrawn.tolist() == [1, 0, 0, 0, 20, 0] and d.unresolved.sum() == 0
    np.testing.assert_array_equal(d.samples[:, [1, 2, 3, 5]], clean[:, [1, 2, 3, 5]])
    assert np.abs(d.samples).max() < 100


def test_without_support_only_non_finite_draws_are_redrawn(monkeypatch, tmp_path) -> None:
    x, y = toy(400)
    model = fr.make("zuko-maf", hidden=8, transforms=1, device="cpu", seed=0)
    model.fit(x, y, epochs=1, quiet=True, support=False, condition_density=False, calibrate=False)
    assert model.support_ is None
    original = model.estimator_.sample
    calls = []

    def far(n, ym, temperature=1.0):
        out = original(n, ym, temperature=temperature)
        if not calls:  # the first draw only: event 0 far out but finite, one of event 1 NaN
            out[:, 0] = 1e6
            out[0, 1] = float("nan")
        calls.append(n)
        return out

    monkeypatch.setattr(model.estimator_, "sample", far)
    d = model.sample(y[:3], n=4, seed=0, return_diagnostics=True)
    assert d.redrawn.tolist() == [0, 1, 0] and np.abs(d.samples[:, 0]).max() > 1e5
    model.save(tmp_path / "m.pt")  # and the choice survives a round trip
    assert fr.load(tmp_path / "m.pt").support_ is None


def test_diagnostics_follow_the_input_type_and_shape(flow) -> None:
    _, y = toy(6)
    d = flow.sample(torch.as_tensor(y).reshape(2, 3, 2), n=4, return_diagnostics=True)
    assert d.samples.shape == (4, 2, 3, 3) and isinstance(d.redrawn, torch.Tensor)
    assert d.redrawn.shape == d.unresolved.shape == d.in_domain.shape == (2, 3)
    assert d.redrawn.dtype == torch.int64 and d.in_domain.dtype == torch.bool
    assert d.condition_log_prob.dtype == torch.float64


# -- out-of-distribution flags -------------------------------------------------------


def test_condition_density_flags_conditions_unlike_the_training_ones(flow) -> None:
    _, y = toy(2000, seed=9)
    inside = flow.in_domain(y)
    assert inside.dtype == bool and inside.mean() > 0.99
    far = np.array([[8.0, 0.0], [0.0, -9.0], [6.0, 6.0], [np.nan, 0.0], [1e300, 0.0]])
    assert not flow.in_domain(far).any()
    lp = flow.condition_log_prob(far)
    assert lp[3] == lp[4] == -np.inf and np.all(lp[:3] < flow.condition_density_.threshold_)
    assert flow.condition_log_prob(y[:5]).shape == (5,)
    d = flow.sample(far[:3], n=10, return_diagnostics=True)
    assert not d.in_domain.any() and np.isfinite(d.samples).all()


def test_conditions_off_the_training_subspace_are_flagged() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=(500, 1))
    y = np.column_stack([u[:, 0], 2 * u[:, 0]])  # a null direction
    x = u + 0.3 * rng.normal(size=(500, 1))
    model = fr.make("zuko-maf", hidden=8, transforms=1, device="cpu").fit(
        np.column_stack([x, -x]), y, epochs=2, quiet=True
    )
    assert model.in_domain(y).mean() > 0.95  # 75 validation rows set the threshold
    assert not model.in_domain(y[:50] + np.array([0.0, 0.5])).any()


def test_density_fit_save_load_and_errors(tmp_path) -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3000, 2)) @ np.array([[1.0, 0.5], [0.0, 2.0]]) + 3.0
    d = Density(hidden=16, transforms=2, device="cpu").fit(f, epochs=5)
    grid = np.mgrid[-7:13:0.1, -9:15:0.1].reshape(2, -1).T
    mass = np.exp(d.log_prob(grid)).sum() * 0.01
    assert mass == pytest.approx(1.0, abs=0.05)  # a density in the features' own units
    assert 0.0005 < 1 - d.in_domain(f).mean() < 0.01
    path = tmp_path / "prior.pt"
    d.save(path)
    torch.load(path, weights_only=True)
    back = Density.load(path, device="cpu")
    np.testing.assert_array_equal(back.log_prob(f[:50]), d.log_prob(f[:50]))
    np.testing.assert_array_equal(back.sample(7, seed=1), d.sample(7, seed=1))
    assert back.threshold_ == d.threshold_
    with pytest.raises(ValueError, match=r"features contains NaN or Inf in 1 rows \(first: 2\)"):
        Density(device="cpu").fit(np.where(np.arange(20)[:, None] == 2, np.nan, f[:20]))
    (tmp_path / "junk.pt").write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="junk.pt is not a flowrecon density file: not a"):
        Density.load(tmp_path / "junk.pt")


# -- ranges a float32 model can represent -------------------------------------------


def test_fit_rejects_values_beyond_float32_naming_rows() -> None:
    x, y = toy(100)
    y[7, 1] = 1e300
    with pytest.raises(
        ValueError, match=r"y has values beyond the float32 range .* in 1 rows \(first: 7\)"
    ):
        fr.make("zuko-nsf", device="cpu").fit(x, y, epochs=1, quiet=True)


def test_extreme_conditions_are_rejected_by_sample_and_log_prob(flow) -> None:
    x, y = toy(5)
    y[3] = [1e300, 0.0]
    assert flow.representable(y).tolist() == [True, True, True, False, True]
    for call in (lambda: flow.sample(y, n=2), lambda: flow.log_prob(x, y)):
        with pytest.raises(ValueError, match=r"beyond the range the model can represent in 1 "):
            call()
    with pytest.raises(ValueError, match=r"\(first: 3\)"):
        flow.sample(y, n=2)
    x[2] = 1e30
    with pytest.raises(ValueError, match=r"x is beyond the range .* \(first: 2\)"):
        flow.log_prob(x, toy(5)[1])
    # A condition far out, yet representable, gives finite samples and a flag.
    d = flow.sample(np.array([[1e4, -1e4]]), n=50, return_diagnostics=True)
    assert np.isfinite(d.samples).all() and not d.in_domain[0]


# -- calibration guards --------------------------------------------------------------


def test_calibration_does_not_chase_a_temperature_the_model_ignores(flow, monkeypatch) -> None:
    x, y = toy(300, seed=2, noise=3.0)  # far wider than the model: it wants T >> 1
    original = flow.estimator_.sample
    monkeypatch.setattr(
        flow.estimator_, "sample", lambda n, ym, temperature=1.0: original(n, ym, temperature=1.0)
    )
    monkeypatch.setattr(flow, "temperature_", 1.0)
    with pytest.warns(RuntimeWarning, match="calibration of 'zuko-nsf' stopped at temperature"):
        t = flow.calibrate(x, y, n=30)
    assert 0.01 <= t <= 100 and flow.calibration_["converged"] is False
    assert "bound" in flow.calibration_["reason"] or "rounds" in flow.calibration_["reason"]


def test_calibration_keeps_the_posterior_mean_in_place(flow, monkeypatch) -> None:
    x, y = toy(300, seed=2, noise=1.5)
    original = flow.estimator_.sample

    def drifting(n, ym, temperature=1.0):  # like a decoder that moves with a large latent
        return original(n, ym, temperature=temperature) + 5.0 * (temperature - 1.0)

    monkeypatch.setattr(flow.estimator_, "sample", drifting)
    monkeypatch.setattr(flow, "temperature_", 1.0)
    plain = flow.sample(y, n=30, seed=0, temperature=1.0).mean(0)
    with pytest.warns(RuntimeWarning, match="moved the posterior mean"):
        t = flow.calibrate(x, y, n=30)
    record = flow.calibration_
    assert record["mean_error_after"] <= 1.1 * record["mean_error_before"]
    moved = np.abs(flow.sample(y, n=30, seed=0, temperature=t).mean(0) - plain).max()
    assert moved < 0.5


def test_a_slow_sampler_calibrates_on_fewer_rows_within_its_time(flow, monkeypatch) -> None:
    x, y = toy(1000, seed=3)
    original = flow.estimator_.sample

    def slow(n, ym, temperature=1.0):  # ~2 ms a row: 1,000 rows a round would take 2 s
        time.sleep(2e-3 * ym.shape[0])
        return original(n, ym, temperature=temperature)

    monkeypatch.setattr(flow.estimator_, "sample", slow)
    monkeypatch.setattr(flow, "temperature_", 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        flow.calibrate(x, y, n=30, max_seconds=1.0)
        seconds = time.perf_counter() - t0
    record = flow.calibration_
    # Three planned rounds of 1 s in all: ~160 rows, never fewer than 50.
    assert record["rows_limited_by_time"] is True
    assert 50 <= record["rows"] <= 250
    assert seconds < 8.0  # eight rounds on every row would take 16 s
    # Without a budget every row is used, and nothing is said about time.
    monkeypatch.setattr(flow.estimator_, "sample", original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flow.calibrate(x, y, n=30)
    assert flow.calibration_["rows"] == 1000
    assert flow.calibration_["rows_limited_by_time"] is False


def test_calibration_record_is_saved(flow, tmp_path) -> None:
    x, y = toy(300, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flow.calibrate(x, y, n=30)
    flow.save(tmp_path / "m.pt")
    assert fr.load(tmp_path / "m.pt").calibration_ == flow.calibration_


# -- files -----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_follow_the_umask(flow, tmp_path, umask) -> None:
    old = os.umask(umask)
    try:
        flow.save(tmp_path / "model.pt")
        flow.condition_density_.save(tmp_path / "density.pt")
    finally:
        os.umask(old)
    for name in ("model.pt", "density.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def _one_line_message(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "\x1b" not in text and "weights_only" not in text, text
    return text


def test_loading_junk_gives_one_line(tmp_path) -> None:
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError) as err:
        fr.load(tmp_path / "random.pt")
    assert "is not a flowrecon model file: not a readable PyTorch file" in _one_line_message(err)

    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"format": "flowrecon.ConditionalGenerator", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as err:
        fr.load(tmp_path / "evil.pt")
    assert "holds Python objects other than tensors" in _one_line_message(err)
    with pytest.raises(FileNotFoundError, match="no flowrecon model file at"):
        fr.load(tmp_path / "missing.pt")


def test_loading_crafted_files_gives_one_line(flow, tmp_path) -> None:
    state = flow.state_dict()
    cases = {
        "no_keys": {"format": state["format"], "format_version": 2},
        "newer": {**state, "format_version": 99},
        "unknown_model": {**state, "model": "zuko-xyz"},
        "bad_hparam": {**state, "hparams_full": {**state["hparams_full"], "colour": 3}},
        "wrong_type": {**state, "hparams_full": {**state["hparams_full"], "hidden": "big"}},
        "weights": {**state, "hparams_full": {**state["hparams_full"], "hidden": 17}},
        "list": [1, 2, 3],
    }
    expected = {
        "no_keys": "is not a valid flowrecon model file",
        "newer": "was written by a newer flowrecon",
        "unknown_model": "unknown model 'zuko-xyz'",
        "bad_hparam": "hyper-parameter 'colour', which model 'zuko-nsf' of this flowrecon",
        "wrong_type": "hyper-parameter 'hidden' of model 'zuko-nsf': expected an integer",
        "weights": "its weights do not fit model 'zuko-nsf' with the saved hyper-parameters",
        "list": "is not a flowrecon model file",
    }
    for name, crafted in cases.items():
        torch.save(crafted, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError) as err:
            fr.load(tmp_path / f"{name}.pt")
        assert expected[name] in _one_line_message(err), name


def test_load_checks_the_expected_model(flow, tmp_path) -> None:
    flow.save(tmp_path / "m.pt")
    assert fr.load(tmp_path / "m.pt", model="nsf").model_ == "zuko-nsf"
    with pytest.raises(ValueError, match=re.escape("holds a 'zuko-nsf' model, not 'cvae'")):
        fr.load(tmp_path / "m.pt", model="cvae")


def test_format_1_files_rebuild_the_model_they_were_trained_as(tmp_path) -> None:
    x, y = toy(200)
    old = fr.make("zuko-maf", hidden=8, transforms=2, bounded=False, device="cpu")
    old.fit(x, y, epochs=2, quiet=True, condition_density=False)
    state = old.state_dict()
    for key in ("hparams_full", "support", "condition_scale", "condition_density", "calibration"):
        del state[key]
    state["format_version"] = 1
    state["hparams"] = state["hparams_resolved"] = {"hidden": 8, "transforms": 2}
    torch.save(state, tmp_path / "v1.pt")
    loaded = fr.load(tmp_path / "v1.pt", device="cpu")
    assert loaded.hparams_full_["bounded"] is False and loaded.support_ is None
    np.testing.assert_array_equal(loaded.sample(y[:4], n=3, seed=0), old.sample(y[:4], n=3, seed=0))
    with pytest.raises(ValueError, match="no condition density"):
        loaded.in_domain(y[:2])
    assert loaded.sample(y[:2], n=2, return_diagnostics=True).in_domain is None


def test_interrupted_fit_keeps_the_best_state_and_skips_the_extras() -> None:
    x, y = toy(300)
    calls = {"n": 0}

    def physics(xs, xt, yy):
        calls["n"] += 1
        if calls["n"] == 8:  # Ctrl-C in the second epoch
            raise KeyboardInterrupt
        return {"zero": 0.0 * xs.sum()}

    model = fr.make("cvae", hidden_dim=8, latent_dim=2, device="cpu")
    with pytest.warns(RuntimeWarning, match="training was interrupted"):
        model.fit(x, y, epochs=5, batch_size=64, physics_loss=physics, quiet=True)
    assert model.history_.stopped == "interrupted" and model.history_.best_epoch == 1
    assert model.condition_density_ is None and model.calibration_ is None
    assert np.isfinite(model.sample(y[:3], n=2)).all()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_damaged_model_files_load_or_fail_in_one_line(flow, tmp_path, data) -> None:
    path = tmp_path / "model.pt"
    if not path.exists():
        flow.save(path)
    good = path.read_bytes()
    cut = data.draw(st.integers(0, len(good) - 1), label="truncate at")
    flips = data.draw(st.lists(st.integers(0, len(good) - 1), max_size=8), label="flip bytes")
    damaged = bytearray(good[: max(cut, 1)] if data.draw(st.booleans()) else good)
    for i in flips:
        if i < len(damaged):
            damaged[i] ^= 0xFF
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    try:
        model = fr.load(tmp_path / "damaged.pt", device="cpu")
    except ValueError as err:
        text = str(err)
        assert "\n" not in text and "\x1b" not in text and "weights_only" not in text, text
        assert "damaged.pt" in text
    else:  # flipped bytes inside tensor data load: the model must still sample finitely
        assert np.isfinite(model.sample(toy(3)[1], n=2)).all()
