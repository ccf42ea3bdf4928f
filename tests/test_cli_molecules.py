"""CEI for any molecule through the command line: simulate, fit, evaluate, sample, listings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from flowrecon.cli import main
from flowrecon.systems.cei.molecule import load_molecule, preset_names

TINY = ["--epochs", "2", "--hparam", "transforms=2", "--hparam", "hidden=16", "--device", "cpu"]

#: A four-atom molecule of the user's own (ammonia-like, made up), in angstrom.
MY_TOML = """
name = "nh3x"
description = "a made-up pyramidal molecule"

[[atoms]]
label = "n"
element = "N"
charge = 1

[[atoms]]
element = "H"
charge = 1

[[atoms]]
element = "H"
charge = 1

[[atoms]]
element = "H"
charge = 1

[geometry]
unit = "angstrom"
positions = [[0, 0, 0.38], [0.94, 0, 0], [-0.47, 0.81, 0], [-0.47, -0.81, 0]]

[vibration]
cartesian_sigma = 0.03

[report]
bonds = [["n", "h1"], ["n", "h2"], ["n", "h3"]]
angles = [["h1", "n", "h2"], ["h2", "n", "h3"]]
"""


def _ok(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _fails(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("molecules")
    paths = {}
    for name, n in (("co2", 400), ("chbrclf", 300), ("ocs", 200)):
        paths[name] = tmp / f"{name}.parquet"
        _ok("simulate", "--molecule", name, "--n", n, "--seed", 1, "--out", paths[name], "--quiet")
    toml = tmp / "nh3x.toml"
    toml.write_text(MY_TOML)
    paths["toml"] = toml
    paths["tmp"] = tmp
    return paths


@pytest.fixture(scope="module")
def runs(data) -> dict:
    tmp = data["tmp"]
    out = {}
    for name in ("co2", "chbrclf"):
        out[name] = tmp / f"run_{name}"
        _ok("fit", "--model", "zuko-nsf", "--molecule", name, "--data", data[name],
            "--out", out[name], *TINY, "--quiet")  # fmt: skip
    return out


def test_simulate_writes_the_molecule_columns_in_canonical_order(data):
    frame = pd.read_parquet(data["co2"])
    m = load_molecule("co2")
    assert list(frame.columns) == [*m.position_columns, *m.momentum_columns]
    p1 = np.linalg.norm(frame[["po1x", "po1y", "po1z"]].to_numpy(), axis=1)
    p2 = np.linalg.norm(frame[["po2x", "po2y", "po2z"]].to_numpy(), axis=1)
    assert (p1 >= p2).all()  # o1 is always the faster oxygen ion
    assert list(pd.read_parquet(data["chbrclf"]).columns[:6]) == [
        "cx",
        "cy",
        "cz",
        "hx",
        "hy",
        "hz",
    ]


def test_set_molecule_is_the_molecule_flag(data, tmp_path):
    out = tmp_path / "set.parquet"
    _ok("simulate", "--set", "molecule=co2", "--n", 400, "--seed", 1, "--out", out, "--quiet")
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(data["co2"]))


def test_ocs_stays_the_default(data, tmp_path):
    out = tmp_path / "default.parquet"
    _ok("simulate", "--n", 200, "--seed", 1, "--out", out, "--quiet")
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(data["ocs"]))


def test_fit_and_evaluate_co2(runs, data, tmp_path):
    config = json.loads((runs["co2"] / "config.json").read_text())
    assert config["system"]["options"]["molecule"] == "co2"
    assert config["preprocessing"]["transform"] == "cei-molecule-frame:2,0"
    out = tmp_path / "ev"
    text = _ok("evaluate", "--run", runs["co2"], "--samples", 8, "--out", out, "--device", "cpu")
    assert "CEI metrics of co2" in text and "O1-C-O2" in text
    metrics = json.loads((out / "metrics.json").read_text())
    keys = ("ade", "ade_c", "ade_o1", "ade_o2", "bond_error_co1", "bond_error_co2", "bond_error",
            "angle_error_deg", "energy_diff", "resim_residual", "coverage_90")  # fmt: skip
    for key in keys:
        assert metrics[key] is not None and np.isfinite(metrics[key]), key
    assert "handedness_right" not in metrics
    assert (out / "posterior_per_atom.png").is_file()


def test_fit_and_evaluate_chbrclf_reports_handedness(runs, tmp_path):
    out = tmp_path / "ev"
    _ok("evaluate", "--run", runs["chbrclf"], "--samples", 8, "--out", out, "--device", "cpu",
        "--quiet")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["handedness_right"] <= 1 and 0 <= metrics["handedness_right_sample"] <= 1
    assert {"bond_error_ch", "bond_error_cbr", "angle_error_clcbr_deg", "ade_br"} <= set(metrics)
    assert metrics["n"] == 45


def test_sample_reads_the_molecule_from_the_run(runs, data, tmp_path):
    out = tmp_path / "s.csv"
    momenta = pd.read_parquet(data["co2"])[list(load_molecule("co2").momentum_columns)]
    momenta.head(5).to_csv(tmp_path / "p.csv", index=False)
    _ok("sample", "--run", runs["co2"], "--data", tmp_path / "p.csv", "--n", 3, "--out", out,
        "--quiet")  # fmt: skip
    table = pd.read_csv(out)
    positions, extra = load_molecule("co2").position_columns, ["energy_mismatch", "energy_flag"]
    assert list(table.columns) == ["event", "sample", *positions, *extra, "in_domain", "unresolved"]
    assert len(table) == 15


def test_sample_refines_a_five_atom_molecule(runs, data, tmp_path):
    out = tmp_path / "s.csv"
    m = load_molecule("chbrclf")
    momenta = pd.read_parquet(data["chbrclf"])
    momenta[list(m.momentum_columns)].head(4).to_csv(tmp_path / "p.csv", index=False)
    _ok("sample", "--run", runs["chbrclf"], "--data", tmp_path / "p.csv", "--n", 3, "--out",
        out, "--refine", "--quiet")  # fmt: skip
    table = pd.read_csv(out)
    assert {"residual", "converged", "solution"} <= set(table.columns)
    assert len(table) == 12 and table["converged"].mean() >= 0.5
    # A converged draw explains the momenta: its solution id is a real one.
    assert (table.loc[table["converged"], "solution"] >= 0).all()
    assert (table.loc[table["converged"], "residual"] < 1e-8).all()


def test_a_toml_molecule_is_kept_in_the_run(data, tmp_path):
    sim = tmp_path / "nh3.parquet"
    _ok("simulate", "--molecule", data["toml"], "--n", 200, "--out", sim, "--quiet")
    assert list(pd.read_parquet(sim).columns[:6]) == ["nx", "ny", "nz", "h1x", "h1y", "h1z"]
    moved = tmp_path / "mine.toml"
    shutil.copy(data["toml"], moved)
    run = tmp_path / "run"
    _ok("fit", "--model", "zuko-maf", "--molecule", moved, "--data", sim, "--out", run, *TINY,
        "--quiet")  # fmt: skip
    moved.unlink()  # the run must not need the file any more
    kept = json.loads((run / "config.json").read_text())["system"]["options"]["molecule"]
    assert kept["name"] == "nh3x" and len(kept["atoms"]) == 4
    _ok("evaluate", "--run", run, "--samples", 4, "--out", tmp_path / "ev", "--quiet")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"bond_error_nh1", "angle_error_h1nh2_deg", "angle_error_deg"} <= set(metrics)


@pytest.mark.slow  # two trainings and evaluations: ~25 s on two shared cores
def test_compare_on_a_molecule(data, tmp_path):
    out = tmp_path / "cmp"
    _ok("compare", "zuko-maf", "cvae", "--molecule", "co2", "--data", data["co2"], "--epochs", 1,
        "--samples", 4, "--out", out, "--device", "cpu", "--quiet")  # fmt: skip
    table = pd.read_csv(out / "comparison.csv")
    assert set(table["model"]) == {"zuko-maf", "cvae"} and "bond_error" in table.columns


def test_molecules_lists_the_presets():
    text = _ok("molecules")
    for name in preset_names():
        assert f"\n{name} " in text
    assert "c: br,cl,f (racemic)" in text and "o1=o2" in text and "frame" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--molecule", "co3"], "unknown molecule 'co3'. Did you mean 'co2'?"),
        (["--molecule", "co2", "--charges", "2,1"], "charges must be 3 numbers for c,o1,o2"),
        (["--molecule", "chbrclf", "--geometry", "ball"], "geometry 'ball' is for OCS only"),
        (["--molecule", "nothere.toml"], "molecule file nothere.toml not found"),
    ],
)
def test_simulate_bad_molecule(tmp_path, args, message):
    out = _fails("simulate", "--n", 5, "--out", tmp_path / "x.parquet", *args)
    assert message in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name = 'x'\n[[atoms]\n", "not valid TOML"),
        ("name = 'x'\n[[atoms]]\nelement = 'C'\n", "atoms[0] (c) needs a charge"),
        (MY_TOML.replace('unit = "angstrom"', 'unit = "parsec"'), "unit must be one of"),
    ],
)
def test_bad_molecule_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = _fails("simulate", "--n", 5, "--out", tmp_path / "x.parquet", "--molecule", path)
    assert message in out and "bad.toml" in out


def test_data_of_another_molecule_is_named(data, runs, tmp_path):
    out = _fails("fit", "--model", "zuko-maf", "--molecule", "co2", "--data", data["ocs"],
                 "--out", tmp_path / "r", *TINY)  # fmt: skip
    assert "missing required columns" in out and "columns of molecule 'ocs'" in out
    out = _fails("evaluate", "--run", runs["co2"], "--data", data["chbrclf"], "--out",
                 tmp_path / "e")  # fmt: skip
    assert "columns of molecule 'chbrclf', not of 'co2'" in out


def test_refinement_weights_and_learned_prior_for_a_five_atom_molecule(runs, tmp_path):
    config = json.loads((runs["chbrclf"] / "config.json").read_text())
    assert config["prior"]["features"] == 9  # 3N - 6 Z-matrix coordinates
    out = tmp_path / "e"
    text = _ok("evaluate", "--run", runs["chbrclf"], "--samples", 4, "--refine",
               "--refine-samples", 2, "--weights", "--noise", "0.01", "--out", out,
               "--device", "cpu")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    # Noise-free events: the training events as starts find exact solutions even for a
    # two-epoch model, and the refined prediction is far closer than the raw one.
    assert metrics["refine_events_with_solution"] >= 0.9
    assert metrics["refined_ade"] < 0.1 * metrics["ade"]
    assert metrics["refined_handedness_right"] >= 0.9
    assert metrics["weights_prior"] == "learned"
    assert 0 < metrics["weights_ess_median"] <= 4
    assert "Refined through the simulator" in text and "handedness_right" in text


def test_the_ocs_prior_refuses_other_molecules(runs, tmp_path):
    out = _fails("evaluate", "--run", runs["co2"], "--refine", "--prior", "ocs",
                 "--out", tmp_path / "e")  # fmt: skip
    assert "the OCS prior (prior=ocs) is implemented for OCS only" in out
