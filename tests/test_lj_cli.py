"""The Lennard-Jones workflow on the command line, through click's CliRunner.

The commands a physicist types (``simulate --system lj``, ``fit``, ``evaluate --run``,
``sample --run``, ``compare``), at small sizes: 4 particles in a box of side 3.
"""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import flowrecon.system as system_module
from flowrecon.cli import main

SMALL = ["--set", "n_particles=4", "--set", "box=3"]
GRID = ["--set", "gamma=0.05,0.25,1.0", "--set", "temperature=1.5"]
COORDS = [f"{a}{i}" for i in range(4) for a in "xyz"]


@pytest.fixture(scope="module", autouse=True)
def lj_registered():
    """``--system lj`` also where the installed metadata predates the lj entry point."""
    found = system_module._entry_points()
    if "lj" in found:
        yield
        return
    point = EntryPoint("lj", "flowrecon.systems.lj:make_system", system_module.ENTRY_POINT_GROUP)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(system_module, "_entry_points", lambda: {**found, "lj": point})
        yield


@pytest.fixture(scope="module")
def lj_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("lj") / "lj.parquet"
    args = ["simulate", "--system", "lj", "--n", "600", *SMALL, *GRID, "--out", str(path)]
    result = CliRunner().invoke(main, [*args, "--seed", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    return str(path)


@pytest.fixture(scope="module")
def lj_run(lj_data, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("runs") / "nsf"
    args = [
        "fit", "--system", "lj", *SMALL, "--model", "zuko-nsf", "--data", lj_data,
        "--out", str(out), "--epochs", "2", "--batch-size", "128",
        "--hparam", "transforms=2", "--hparam", "hidden=16",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "not calibrated: system lj fits without it" in result.output
    return str(out)


def test_simulate_writes_the_physicists_columns(lj_data):
    table = pd.read_parquet(lj_data)
    assert list(table.columns) == [
        *COORDS, "gamma", "temperature", "energy", "chain", "step",
    ]  # fmt: skip
    assert table.groupby("gamma").size().to_dict() == {0.05: 200, 0.25: 200, 1.0: 200}
    assert (table["temperature"] == 1.5).all()
    coords = table[COORDS].to_numpy()
    assert ((coords >= 0) & (coords <= 3)).all()
    # Chains belong to one condition each.
    assert (table.groupby("chain")["gamma"].nunique() == 1).all()


def test_simulate_prints_the_samplers_diagnostics(tmp_path):
    out = tmp_path / "lj.csv"
    args = ["simulate", "--system", "lj", "--n", "40", *SMALL, "--set", "gamma=0.5"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 40 rows of Lennard-Jones fluid under gravity" in result.output
    assert "Metropolis min(1, exp(-dU/T))" in result.output
    assert "gamma 0.5, T 1.5: 32 chains, acceptance" in result.output and "ESS" in result.output


@pytest.mark.slow
def test_simulate_default_system_size(tmp_path):
    out = tmp_path / "lj.csv"
    args = ["simulate", "--system", "lj", "--n", "6", "--set", "gamma=0.5", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert table.shape == (6, 90 + 5) and list(table.columns[87:90]) == ["x29", "y29", "z29"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "gamma=abc"], "option 'gamma'"),
        (["--set", "temperature=-1"], "temperatures must be positive"),
        (["--set", "n_particles=600"], "600 particles do not fit"),
        (["--set", "order=random"], "order must be one of"),
        (["--set", "gama=0.5"], "Did you mean 'gamma'"),
        (["--set", "dim=4"], "dim must be 2 or 3"),
        (["--n", "0"], "0 is not in the range"),
    ],
)
def test_simulate_bad_values(tmp_path, extra, message):
    args = ["simulate", "--system", "lj", "--out", str(tmp_path / "x.parquet")]
    if "--n" not in extra:
        args += ["--n", "10"]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output


def test_fit_records_lj_choices_and_keeps_chains_whole(lj_run, lj_data):
    config = json.loads(open(f"{lj_run}/config.json").read())
    assert config["system"]["name"] == "lj"
    assert config["preprocessing"]["transform"] == "lj-box-d3-L3"
    assert config["fit_options"] == {
        "calibrate": False,
        "condition_density": False,
        "support": False,
    }
    assert config["result"]["temperature"] == 1.0
    split = np.load(f"{lj_run}/split.npz")
    chain = pd.read_parquet(lj_data)["chain"].to_numpy()
    parts = [set(chain[split[k]]) for k in ("train", "val", "test")]
    assert parts[0] and parts[1] and parts[2]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_evaluate_reports_physics_per_condition(lj_run, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--run", lj_run, "--samples", "4", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--set", "reweight_samples=50"])
    assert result.exit_code == 0, result.output
    assert "held-out test events" in result.output
    assert "anomaly AUC" in result.output and "exact U/T" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    conditions = metrics["conditions"]
    assert sorted(c["gamma"] for c in conditions) == [0.05, 0.25, 1.0]
    for c in conditions:
        for key in ("energy_w1", "energy_diff", "overlap_fraction", "ess"):
            assert key in c, key
        assert c["outside_fraction"] == 0.0  # the box transform keeps draws inside
    assert np.isfinite(metrics["nll"])
    assert 0.0 <= metrics["anomaly_auc"] <= 1.0 and metrics["anomaly_auc_energy"] > 0.55
    assert "latent_silhouette" not in metrics  # a flow has no encoder
    assert metrics["out_of_domain"] is None and 0.0 <= metrics["redrawn_fraction"] <= 1.0
    for name in ("report.md", "lj_energy.png", "lj_density.png", "lj_pairs.png"):
        assert (out / name).is_file(), name


def test_sample_takes_conditions_only(lj_run, tmp_path):
    conditions = tmp_path / "conditions.csv"
    pd.DataFrame({"gamma": [0.5, 0.05], "temperature": [1.5, 1.5]}).to_csv(conditions)
    out = tmp_path / "draws.parquet"
    args = ["sample", "--run", lj_run, "--data", str(conditions), "--n", "3", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    # No condition density for LJ, so no in_domain column; guarded draws: none unresolved.
    extra = ["drawn_in_order", "min_distance", "unresolved"]
    assert list(table.columns) == ["event", "sample", *COORDS, *extra]
    assert table["event"].tolist() == [0, 0, 0, 1, 1, 1]
    heights = table[[f"z{i}" for i in range(4)]].to_numpy()
    assert (np.diff(heights, axis=1) >= 0).all()  # canonical order: sorted by height
    conf = table[COORDS].to_numpy().reshape(-1, 4, 3)
    r = np.linalg.norm(conf[:, :, None] - conf[:, None], axis=-1) + 9 * np.eye(4)
    np.testing.assert_allclose(table["min_distance"], r.min((1, 2)))


def test_sample_relaxes_draws_at_their_own_conditions(lj_run, tmp_path):
    conditions = tmp_path / "conditions.csv"
    pd.DataFrame({"gamma": [0.2, 1.0], "temperature": [1.5, 1.5]}).to_csv(conditions)
    tables = {}
    for sweeps in (0, 30):
        out = tmp_path / f"draws{sweeps}.parquet"
        args = ["sample", "--run", lj_run, "--data", str(conditions), "--n", "200"]
        args += ["--out", str(out), "--set", f"relax_sweeps={sweeps}"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        tables[sweeps] = pd.read_parquet(out)
    raw, relaxed = tables[0], tables[30]
    assert (relaxed["drawn_in_order"] == raw["drawn_in_order"]).all()  # same draws
    assert (np.diff(relaxed[[f"z{i}" for i in range(4)]].to_numpy(), axis=1) >= 0).all()
    # Metropolis separates overlapping pairs (r < 0.8 costs tens of epsilon).
    assert (relaxed["min_distance"] < 0.8).mean() < max((raw["min_distance"] < 0.8).mean(), 0.01)
    assert ((relaxed[COORDS] > 0) & (relaxed[COORDS] < 3)).all().all()
    args[args.index(str(out))] = str(tmp_path / "bad.parquet")
    bad = CliRunner().invoke(main, [*args[:-1], "relax_sweeps=-1"])
    assert bad.exit_code != 0 and "relax_sweeps must be >= 0" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "bad.parquet").exists()


def test_evaluate_sample_bad_values(lj_run, tmp_path):
    bad = CliRunner().invoke(main, ["evaluate", "--run", lj_run, "--set", "overlap=-1"])
    assert bad.exit_code != 0 and "overlap" in bad.output and "Traceback" not in bad.output
    conditions = tmp_path / "c.csv"
    pd.DataFrame({"gamma": [0.5]}).to_csv(conditions, index=False)
    args = ["sample", "--run", lj_run, "--data", str(conditions), "--out", str(tmp_path / "s.csv")]
    bad = CliRunner().invoke(main, args)
    assert bad.exit_code != 0 and "temperature" in bad.output


def test_compare_tabulates_lj_metrics(lj_data, tmp_path):
    out = tmp_path / "cmp"
    args = [
        "compare", "cvae", "zuko-maf", "--system", "lj", *SMALL, "--data", lj_data,
        "--out", str(out), "--epochs", "1", "--samples", "3", "--quiet",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "comparison.csv")
    assert table["model"].tolist() == ["cvae", "zuko-maf"]
    assert "height_rmse" in table.columns
    cvae = json.loads((out / "cvae" / "evaluation" / "metrics.json").read_text())
    assert -1.0 <= cvae["latent_silhouette"] <= 1.0 and cvae["latent_dim"] >= 2
    assert 0.0 <= cvae["anomaly_auc"] <= 1.0
    assert (out / "cvae" / "evaluation" / "lj_latent.png").is_file()


def test_tune_on_the_height_error_without_calibration(lj_data, tmp_path, monkeypatch):
    import flowrecon.base as base

    def refuse(*args, **kwargs):
        raise AssertionError("an LJ model must not be calibrated")

    monkeypatch.setattr(base.ConditionalGenerator, "calibrate", refuse)
    out = tmp_path / "study"
    args = [
        "tune", "--system", "lj", *SMALL, "--model", "maf", "--data", lj_data, "--out", str(out),
        "--trials", "1", "--epochs", "1", "--metric", "height_rmse", "--device", "cpu",
        "--quiet",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert '[system]\nname = "lj"' in (out / "best.toml").read_text()
    trials = pd.read_csv(out / "trials.csv")
    assert trials["state"].tolist() == ["COMPLETE"] and np.isfinite(trials["value"]).all()


def test_particle_flow_gets_the_box_from_the_system_and_keeps_its_core(lj_data, tmp_path):
    out = tmp_path / "pf"
    args = [
        "fit", "--system", "lj", *SMALL, "--model", "particle-flow", "--data", lj_data,
        "--out", str(out), "--epochs", "2", "--batch-size", "128",
        "--hparam", "rounds=1", "--hparam", "hidden=16",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    hparams = config["hparams"]
    assert (hparams["particle_dim"], hparams["box"], hparams["core"]) == (3, 3.0, 0.8)
    assert hparams["rounds"] == 1  # the user's own choice kept
    assert config["preprocessing"]["whitening"] is False
    conditions = tmp_path / "conditions.csv"
    pd.DataFrame({"gamma": [0.05, 1.0], "temperature": [1.5, 1.5]}).to_csv(conditions)
    draws = tmp_path / "draws.parquet"
    args = ["sample", "--run", str(out), "--data", str(conditions), "--n", "50"]
    result = CliRunner().invoke(main, [*args, "--out", str(draws)])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(draws)
    assert table["drawn_in_order"].all()  # the flow sorts its own draws
    assert (table["min_distance"] >= 0.8 - 1e-4).mean() > 0.99
