"""Run directories: whole or absent, never mixed, never over inputs; row identity; bad runs."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import flowrecon as fr
from flowrecon.cli import main
from flowrecon.data import write_table
from flowrecon.rundir import MARKER, OutputError, check_output_file, staged_directory
from flowrecon.runs import evaluate_run, fit_run, load_run, row_hashes, sample_run
from flowrecon.system import make_system
from flowrecon.systems.cei.constants import MOMENTUM_COLUMNS, POSITION_COLUMNS

TINY = {"hparams": {"transforms": 1, "hidden": 8}, "training": {"epochs": 1, "batch_size": 128}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "events.parquet"
    write_table(make_system("cei").simulate(300, seed=4), path)
    return str(path)


def _fit(out, data, **kwargs):
    return fit_run("zuko-maf", out, data=data, device="cpu", quiet=True, **{**TINY, **kwargs})


def _snapshot(directory) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _no_staging_left(parent) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("runs") / "run"
    _fit(out, data)
    return out


def test_a_run_is_complete_and_marked(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"model.pt", "config.json", "split.npz", "history.csv", MARKER} <= names
    assert json.loads((run_dir / MARKER).read_text())["kind"] == "run"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["system"] == {
        "name": "cei",
        "spec": "cei",
        "options": config["system"]["options"],
    }
    assert config["data"]["relpath"].endswith("events.parquet")


def test_existing_run_needs_overwrite_and_stays_intact(run_dir, data):
    before = _snapshot(run_dir)
    with pytest.raises(OutputError, match="give --overwrite"):
        _fit(run_dir, data)
    assert _snapshot(run_dir) == before


def test_a_failed_fit_leaves_the_previous_run(tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    _fit(out, data)
    before = _snapshot(out)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("flowrecon.runs._write_run_files", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        _fit(out, data, overwrite=True)
    assert _snapshot(out) == before and _no_staging_left(tmp_path)


def test_interrupt_after_training_leaves_the_previous_run(tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    _fit(out, data)
    before = _snapshot(out)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("flowrecon.runs._write_run_files", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit_run("zuko-nsf", out, data=data, device="cpu", quiet=True, overwrite=True, **TINY)
    assert _snapshot(out) == before and _no_staging_left(tmp_path)


def test_interrupted_training_gives_a_complete_marked_run(tmp_path, data, monkeypatch):
    from flowrecon import training

    real = training.train

    def train_then_interrupt(*args, **kwargs):
        kwargs["epochs"] = 2
        history = real(*args, **kwargs)
        history.stopped = "interrupted"  # what train records when Ctrl-C arrives
        return history

    monkeypatch.setattr("flowrecon.base.train", train_then_interrupt)
    result = CliRunner().invoke(
        main,
        ["fit", "--model", "zuko-maf", "--data", data, "--out", str(tmp_path / "r"), "--quiet",
         "--hparam", "transforms=1", "--hparam", "hidden=8", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 130
    assert "kept the best model" in result.output
    run = load_run(tmp_path / "r")
    assert run.interrupted and run.config["result"]["stopped"] == "interrupted"


def test_refit_with_another_model_replaces_everything(tmp_path, data):
    out = tmp_path / "run"
    _fit(out, data)
    evaluate_run(out, samples=4, device="cpu")
    assert (out / "evaluation" / "metrics.json").is_file()
    fit_run("cvae", out, data=data, device="cpu", quiet=True, overwrite=True,
            hparams={"hidden_dim": 8, "latent_dim": 2}, training=TINY["training"])  # fmt: skip
    assert not (out / "evaluation").exists()  # no report of the old model left beside it
    assert json.loads((out / "config.json").read_text())["model"] == "cvae"


def test_outputs_never_overwrite_inputs(tmp_path, run_dir, data):
    copy = tmp_path / "mine.parquet"
    write_table(pd.read_parquet(data), copy)
    before = copy.read_bytes()
    with pytest.raises(OutputError, match="is also an input"):
        sample_run(run_dir, copy, copy, n=2, overwrite=True)
    assert copy.read_bytes() == before
    # A run directory that holds its own input is not replaced either.
    inner = tmp_path / "r2"
    inner.mkdir()
    write_table(pd.read_parquet(data), inner / "d.parquet")
    with pytest.raises(OutputError, match="holds the input"):
        _fit(inner, inner / "d.parquet", overwrite=True)
    with pytest.raises(OutputError, match="exists; give --overwrite"):
        check_output_file(copy)


def test_cli_refuses_to_overwrite_files(tmp_path):
    out = tmp_path / "sim.csv"
    runner = CliRunner()
    assert (
        runner.invoke(main, ["simulate", "--n", "5", "--out", str(out), "--quiet"]).exit_code == 0
    )
    before = out.read_bytes()
    again = runner.invoke(main, ["simulate", "--n", "7", "--out", str(out), "--seed", "2"])
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert out.read_bytes() == before
    forced = ["simulate", "--n", "7", "--out", str(out), "--overwrite", "--quiet"]
    assert runner.invoke(main, forced).exit_code == 0
    assert len(pd.read_csv(out)) == 7


def test_a_folder_of_user_files_is_never_replaced(tmp_path, data):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds other files"):
        _fit(folder, data, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"


def test_evaluation_appears_whole_and_needs_overwrite(run_dir, monkeypatch):
    out = run_dir / "evaluation"
    evaluate_run(run_dir, samples=4, device="cpu", overwrite=True)
    before = _snapshot(out)

    def fail(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr("flowrecon.report._write_report", fail)
    with pytest.raises(RuntimeError):
        evaluate_run(run_dir, samples=4, device="cpu", overwrite=True)
    assert _snapshot(out) == before and _no_staging_left(run_dir)
    with pytest.raises(OutputError, match="holds the input"):
        evaluate_run(run_dir, samples=4, out=run_dir, overwrite=True)


def test_evaluation_never_uses_rows_the_model_was_fitted_on(tmp_path, run_dir, data):
    table = pd.read_parquet(data)
    split = np.load(run_dir / "split.npz")
    fresh = make_system("cei").simulate(20, seed=99)
    # A user's file mixing 30 training rows with 20 new events, rows shuffled.
    mixed = pd.concat([table.iloc[split["train"][:30]], fresh]).sample(frac=1, random_state=0)
    path = tmp_path / "mixed.csv"
    write_table(mixed, path)
    ev = evaluate_run(run_dir, path, samples=4, device="cpu", out=tmp_path / "e")
    assert ev.metrics["n"] == 20
    assert "30 rows used to fit the model left out" in ev.events
    with pytest.raises(ValueError, match="every row was used to fit"):
        train_only = tmp_path / "train.parquet"
        write_table(table.iloc[split["train"]], train_only)
        evaluate_run(run_dir, train_only, samples=4, out=tmp_path / "e2")


def test_drop_invalid_keeps_input_row_numbers_and_the_held_out_split(tmp_path, data):
    table = pd.read_parquet(data)
    table.loc[[3, 10], "cx"] = np.nan
    path = tmp_path / "holes.csv"
    write_table(table, path)
    out = tmp_path / "run"
    _fit(out, path, drop_invalid=True)
    ev = evaluate_run(out, path, samples=4, drop_invalid=True, device="cpu")
    held_out = len(np.load(out / "split.npz")["test"])
    assert ev.metrics["n"] == held_out  # not "all 298 events", training rows included
    momenta = table[list(MOMENTUM_COLUMNS)].copy()
    momenta.loc[1, "pcx"] = np.nan
    mpath = tmp_path / "momenta.csv"
    write_table(momenta.head(6), mpath)
    sample_run(out, mpath, tmp_path / "s.csv", n=2, drop_invalid=True, device="cpu")
    events = pd.read_csv(tmp_path / "s.csv")["event"].unique().tolist()
    assert events == [0, 2, 3, 4, 5]  # row 1 dropped; the others keep their numbers


def test_row_hashes_follow_content_not_position():
    x = np.random.default_rng(0).normal(size=(50, 9))
    y = np.random.default_rng(1).normal(size=(50, 9))
    h = row_hashes(x, y)
    assert len(np.unique(h)) == 50
    perm = np.random.default_rng(2).permutation(50)
    np.testing.assert_array_equal(row_hashes(x[perm], y[perm]), h[perm])
    y2 = y.copy()
    y2[7, 3] = np.nextafter(y2[7, 3], np.inf)  # one ulp: another row
    assert (row_hashes(x, y2) != h).sum() == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "config.json").unlink(), "not a complete run"),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "not a run record"),
        (lambda d: (d / "config.json").write_text("{"), "config.json: not a readable run"),
        (lambda d: _edit_config(d, data=None), "'data' is missing"),
        (lambda d: _edit_config(d, resolved_model="cvae"), "has been mixed"),
        (lambda d: (d / "split.npz").write_bytes(b"garbage"), "split.npz"),
        (lambda d: (d / "model.pt").write_bytes(os.urandom(500)), "model.pt"),
    ],
)
def test_damaged_runs_are_refused_with_one_line(tmp_path, data, damage, message):
    out = tmp_path / "run"
    _fit(out, data)
    damage(out)
    result = CliRunner().invoke(main, ["evaluate", "--run", str(out), "--samples", "3"])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_files_follow_the_umask(tmp_path, data):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        _fit(out, data)
    finally:
        os.umask(old)
    for name in ("model.pt", "config.json", "split.npz", "history.csv"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_stale_staging_of_a_killed_process_is_removed(tmp_path):
    out = tmp_path / "run"
    stale = tmp_path / ".run.partial-999999999-deadbeef"  # no such process
    stale.mkdir()
    (stale / "model.pt").write_text("half")
    with staged_directory(out, kind="run") as stage:
        (stage / "config.json").write_text("{}")
    assert not stale.exists() and (out / "config.json").is_file()


def test_a_loaded_model_matches_its_run(run_dir):
    run = load_run(run_dir)
    assert isinstance(run.model, fr.ConditionalGenerator)
    assert run.system.x_columns == POSITION_COLUMNS
