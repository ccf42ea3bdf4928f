"""The Lennard-Jones System end to end: simulate, prepare, split, fit, evaluate, figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

import flowrecon as fr
from flowrecon.runs import fit_run
from flowrecon.system import EvaluationContext, System, make_system
from flowrecon.systems.lj import make_system as make_lj
from flowrecon.systems.lj.data import coordinate_columns, simulate, split, symmetric_copies
from flowrecon.systems.lj.evaluation import (
    condition_metrics,
    height_rmse,
    reweight,
    reweighting_metrics,
)
from flowrecon.systems.lj.geometry import canonical_order
from flowrecon.systems.lj.physics import potential_energy

SMALL = {"n_particles": 6, "box": 3.0, "gamma": (0.2, 1.0)}


@pytest.fixture(scope="module")
def small_table() -> pd.DataFrame:
    return make_lj(**SMALL).simulate(600, seed=3, device="cpu")


def test_factory_signature_and_options():
    system = make_system("flowrecon.systems.lj:make_system", dim="2", box="8", gamma="0.05,0.5")
    assert isinstance(system, System) and system.name == "lj"
    assert system.x_columns == coordinate_columns(30, 2) and system.x_dim == 60
    assert system.y_columns == ("gamma", "temperature")
    assert system.options["gamma"] == [0.05, 0.5] and system.transform == "lj-box-d2-L8"
    assert make_lj(order="none").transform is None  # raw labels: no ordered chamber
    assert make_lj(representation="chamber").transform == "lj-chamber-d3-L5"
    with pytest.raises(ValueError, match="representation must be one of box, chamber"):
        make_lj(representation="stick")
    assert make_lj().fit_options == {
        "calibrate": False,
        "condition_density": False,
        "support": False,
    }
    with pytest.raises(ValueError, match="unknown fit option"):
        System("s", "", ("a",), ("b",), fit_options={"calibrated": False})
    with pytest.raises(ValueError, match="order must be one of"):
        make_lj(order="random")
    with pytest.raises(ValueError, match="dim must be 2 or 3"):
        make_lj(dim=1)
    with pytest.raises(ValueError, match="temperatures must be positive"):
        make_lj(temperature=(0.0,))
    with pytest.raises(ValueError, match="do not fit in a 2-D box"):
        make_lj(dim=2)  # 30 particles in a 5 x 5 square: denser than close packing


def test_simulated_table_has_the_documented_columns(small_table):
    t = small_table
    cols = list(coordinate_columns(6, 3))
    assert list(t.columns) == [*cols, "gamma", "temperature", "energy", "chain", "step"]
    assert len(t) == 600 and sorted(t["gamma"].unique()) == [0.2, 1.0]
    conf = t[cols].to_numpy().reshape(-1, 6, 3)
    np.testing.assert_allclose(t["energy"], potential_energy(conf, t["gamma"].to_numpy()))
    assert ((conf >= 0) & (conf <= 3.0)).all()
    # Rows of one chain are saved at increasing sweeps, a fixed number of sweeps apart.
    first = t[t["chain"] == t["chain"].iloc[0]]
    steps = first["step"].to_numpy()
    assert (np.diff(steps) > 0).all() and len(set(np.diff(steps))) == 1
    assert len(first[cols].drop_duplicates()) == len(first)  # saved states, not one state
    report = t.attrs["lj"]["conditions"]
    assert [r["gamma"] for r in report] == [0.2, 1.0]
    assert all(0.3 < r["acceptance"] < 0.5 and r["ess"] > 0 for r in report)
    assert json.dumps(t.attrs["lj"])  # plain values only


def test_two_dimensional_system_has_gravity_along_y():
    system = make_lj(n_particles=5, box=4.0, dim=2, gamma=(0.0, 2.0))
    table = system.prepare(system.simulate(128, seed=6, device="cpu"))
    assert list(table.columns[:4]) == ["x0", "y0", "x1", "y1"]
    ys = table[[f"y{i}" for i in range(5)]].to_numpy()
    xs = table[[f"x{i}" for i in range(5)]].to_numpy()
    strong = table["gamma"].to_numpy() == 2.0
    assert ys[strong].mean() < 1.0 < 1.6 < ys[~strong].mean()  # sedimentation along y
    assert abs(xs.mean() - 2.0) < 0.2  # no force along x
    assert (np.diff(ys, axis=1) >= 0).all()  # canonical order by height = y


def test_simulate_is_reproducible_and_rejects_bad_sizes():
    a = simulate(40, seed=5, n_particles=4, box=3.0, gamma=(0.5,), device="cpu")
    b = simulate(40, seed=5, n_particles=4, box=3.0, gamma=(0.5,), device="cpu")
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(ValueError, match="n must be a positive"):
        simulate(0, seed=0)


def test_split_keeps_chains_whole_and_stratifies(small_table):
    parts = split(small_table, seed=0)
    assert sum(len(p) for p in parts) == len(small_table)
    assert len(np.unique(np.concatenate(parts))) == len(small_table)
    chains = [set(small_table["chain"].iloc[p]) for p in parts]
    assert not (chains[0] & chains[1] or chains[0] & chains[2] or chains[1] & chains[2])
    for p in parts:  # every part holds every condition
        assert sorted(small_table["gamma"].iloc[p].unique()) == [0.2, 1.0]
    again = split(small_table, seed=0)
    assert all((a == b).all() for a, b in zip(parts, again))
    other = split(small_table, seed=1)
    assert not all(len(a) == len(b) and (a == b).all() for a, b in zip(parts, other))


def test_prepare_puts_particles_in_height_order(small_table):
    system = make_lj(**SMALL)
    prepared = system.prepare(small_table)
    h = prepared[[f"z{i}" for i in range(6)]].to_numpy()
    assert (np.diff(h, axis=1) >= 0).all()
    np.testing.assert_allclose(
        potential_energy(prepared[list(system.x_columns)].to_numpy().reshape(-1, 6, 3), 0.2),
        potential_energy(small_table[list(system.x_columns)].to_numpy().reshape(-1, 6, 3), 0.2),
    )
    raw = make_lj(**SMALL, order="none").prepare(small_table)
    pd.testing.assert_frame_equal(raw, small_table)


def test_height_rmse_is_permutation_invariant_and_zero_on_equal_heights():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 5, (3, 30, 3))
    perm = a[:, rng.permutation(30)]
    np.testing.assert_allclose(height_rmse(a.reshape(3, -1), perm.reshape(3, -1), 3), 0)
    b = a.copy()
    b[..., -1] += 0.1
    np.testing.assert_allclose(height_rmse(a.reshape(3, -1), b.reshape(3, -1), 3), 0.1)


def test_reweighting_recovers_a_known_mean():
    """Draws from N(0, 1) reweighted to N(1, 1): mean 1, ESS ~ n / e."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=200_000)
    out = reweight(-0.5 * (x - 1) ** 2 + 0.5 * x**2, x)
    assert out["mean"] == pytest.approx(1.0, abs=4 * out["se"])
    assert out["ess_fraction"] == pytest.approx(math.exp(-1), rel=0.05)
    assert reweight(np.full(3, -np.inf), x[:3])["ess"] == 0.0


def test_exact_sampler_gets_ideal_scores():
    """Monte Carlo against Monte Carlo: zero overlaps, small errors, near-full ESS.

    With log q = -U / T (the exact density up to a constant) the reweighting weights
    are constant, so the ESS is the number of draws.
    """
    table = make_lj(**SMALL).prepare(make_lj(**SMALL).simulate(1200, seed=4, device="cpu"))
    cols = list(coordinate_columns(6, 3))
    g = table[table["gamma"] == 1.0]
    conf = g[cols].to_numpy().reshape(-1, 6, 3)
    half = len(conf) // 2
    row, curves = condition_metrics(conf[:half], conf[half:], 1.0, 1.5, 3.0, bins=10)
    assert abs(row["energy_diff"]) < 5 * row["energy_mc_se"]
    assert row["overlap_fraction"] == 0 and row["outside_fraction"] == 0
    assert row["unordered_fraction"] == 0 and row["height_rel_error"] < 0.05
    assert row["density_rel_error_max"] < 5 * row["density_noise"] + 0.05
    log_q = -potential_energy(conf[:half], 1.0) / 1.5
    rw = reweighting_metrics(
        conf[:half], log_q, 1.0, 1.5, 3.0, row["energy_mc"], row["energy_mc_se"]
    )
    assert rw["ess_fraction"] == pytest.approx(1.0)
    assert abs(rw["reweighted_z"]) < 5
    # Draws out of canonical order or outside the box get weight zero.
    shuffled = conf[:half][:, ::-1]
    rw = reweighting_metrics(shuffled, log_q, 1.0, 1.5, 3.0, 0.0, 1.0)
    assert rw["ess"] == 0.0


def test_zuko_flow_end_to_end_with_the_evaluator(small_table, tmp_path):
    system = make_lj(**SMALL)
    table = system.prepare(small_table)
    train, val, test = system.split(table, 0)
    x, y = table[list(system.x_columns)], table[list(system.y_columns)]
    # A coupling flow: sampling is one pass (an autoregressive inverse takes one per
    # coordinate), and no calibration, to keep the test fast.
    model = fr.make("zuko-realnvp", transforms=2, hidden=32, seed=0, device="cpu")
    model.fit(
        x.iloc[train].to_numpy(),
        y.iloc[train].to_numpy(),
        x.iloc[val].to_numpy(),
        y.iloc[val].to_numpy(),
        epochs=3,
        quiet=True,
        calibrate=False,
    )
    xt, yt = x.iloc[test].to_numpy(), y.iloc[test].to_numpy()
    context = EvaluationContext(model, xt, yt, samples=4, seed=0, config={})
    ev = system.evaluator(context, max_per_condition=120, reweight_samples=50)
    for start in range(0, len(xt), 25):  # the generic loop hands chunks over in order
        stop = min(start + 25, len(xt))
        ev.update(start, stop, model.sample(yt[start:stop], n=4, seed=start))
    metrics = ev.finish(model.sample(yt, n=4, seed=0).mean(0))
    assert json.dumps(metrics)
    rows = metrics["conditions"]
    assert [r["gamma"] for r in rows] == [0.2, 1.0]
    assert all(r["n_generated"] == 120 and r["reweighted_draws"] == 50 for r in rows)
    assert all(r["nll"] is not None and 0 <= r["ess_fraction"] <= 1 for r in rows)
    assert metrics["nll_labelled"] == pytest.approx(
        np.mean([r["nll"] for r in rows]) + math.lgamma(7)
    )
    figures = ev.figures(tmp_path, [0], None)
    assert set(figures) == {"lj_energy", "lj_density", "lj_pairs", "lj_snapshots"}
    assert all(p.is_file() and p.stat().st_size > 1000 for p, _ in figures.values())
    table_text, _, rest = ev.table(metrics).partition("\n\n")
    assert table_text.count("\n") == 3 and "U/N MC" in table_text  # header, rule, 2 rows
    assert rest.startswith("anomaly AUC")  # a flow's density judges perturbed configurations
    errors = system.event_error(model.sample(yt, n=8, seed=1).mean(0), xt)
    assert errors.shape == (len(xt),) and np.isfinite(errors).all()
    # Generator + short Monte Carlo: relaxed draws, no reweighting (their density is unknown).
    relaxed = system.evaluator(context, max_per_condition=120, relax_sweeps=3)
    relaxed.update(0, len(xt), model.sample(yt, n=4, seed=0))
    rows = relaxed.finish(np.zeros_like(xt))["conditions"]
    assert all(r["relax_sweeps"] == 3 and "ess" not in r for r in rows)
    assert all(r["unordered_fraction"] == 0 and r["outside_fraction"] == 0 for r in rows)


def test_evaluator_rejects_bad_options(small_table):
    system = make_lj(**SMALL)
    x = canonical_order(small_table[list(system.x_columns)].to_numpy().reshape(-1, 6, 3))
    context = EvaluationContext(None, x.reshape(len(x), -1), small_table[["gamma"]], 1, 0, {})
    with pytest.raises(ValueError, match="conditions y must be"):
        system.evaluator(context)
    with pytest.raises(ValueError, match="bins >= 2"):
        context = EvaluationContext(
            None, x.reshape(len(x), -1), small_table[["gamma", "temperature"]], 1, 0, {}
        )
        system.evaluator(context, bins=1)


@pytest.mark.parametrize(("dim", "box", "images"), [(3, 5.0, 8), (2, 8.0, 2)])
def test_symmetric_copies_keep_energy_heights_and_order(dim, box, images):
    rng = np.random.default_rng(7)
    conf = canonical_order(rng.uniform(0.2, box - 0.2, (50, 6, dim)))
    x, y = conf.reshape(50, -1), rng.uniform(size=(50, 2))
    xs, ys = symmetric_copies(x, y, 6, dim, box)
    assert xs.shape == (images * 50, 6 * dim) and np.array_equal(ys, np.tile(y, (images, 1)))
    copies = xs.reshape(images, 50, 6, dim)
    np.testing.assert_array_equal(copies[0], conf)  # the originals first
    for image in copies:
        np.testing.assert_allclose(potential_energy(image, 0.7), potential_energy(conf, 0.7))
        np.testing.assert_array_equal(image[..., -1], conf[..., -1])
    # every image differs: no symmetry counted twice
    assert len({copies[k].round(9).tobytes() for k in range(images)}) == images


def test_fit_trains_on_the_symmetric_copies_of_training_rows_only(monkeypatch, tmp_path):
    seen = {}
    original = fr.ConditionalGenerator.fit

    def spy(self, x, y, x_val=None, y_val=None, **kwargs):
        seen.update(train=len(x), val=len(x_val))
        return original(self, x, y, x_val, y_val, **kwargs)

    monkeypatch.setattr(fr.ConditionalGenerator, "fit", spy)
    table = make_lj(**SMALL).simulate(300, seed=4, device="cpu")
    table.to_parquet(tmp_path / "lj.parquet")
    for augment, factor in ((True, 8), (False, 1)):
        run = fit_run(
            "zuko-maf", tmp_path / f"run{augment}", system="lj",
            system_options={**SMALL, "augment": augment}, data=tmp_path / "lj.parquet",
            hparams={"hidden": 8, "transforms": 1}, training={"epochs": 1}, quiet=True,
        )  # fmt: skip
        assert seen == {"train": factor * len(run.split["train"]), "val": len(run.split["val"])}
        assert run.config["system"]["options"]["augment"] is augment
