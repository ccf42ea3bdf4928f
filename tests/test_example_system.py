"""A system defined in a user's own script (examples/projectile.py), end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from flowrecon.cli import main
from flowrecon.runs import evaluate_run, fit_run, load_run, sample_run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "projectile.py"


def _invoke(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("projectile")


def test_the_command_line_runs_a_users_system(workdir) -> None:
    data = workdir / "launches.parquet"
    _invoke("simulate", "--system", EXAMPLE, "--n", 1500, "--out", data, "--set", "noise=0.02",
            "--quiet")  # fmt: skip
    assert list(pd.read_parquet(data).columns) == ["v0", "theta", "range", "time", "height"]
    run = workdir / "run"
    _invoke("fit", "--system", EXAMPLE, "--model", "nsf", "--data", data, "--out", run,
            "--epochs", 8, "--hparam", "hidden=32", "--quiet")  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["system"]["name"] == "projectile"
    assert config["system"]["spec"] == f"{EXAMPLE}:make_system"
    output = _invoke("evaluate", "--run", run, "--samples", 50)  # the system from the run
    assert "225 held-out test events" in output and "median relative speed error" in output
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert metrics["n"] == 225 and {"rel_error_median", "failure_rate"} <= set(metrics)
    # Eight epochs on 1,050 launches already pin the speed to a few per cent.
    assert metrics["speed_error"] < 0.1 and 0.5 < metrics["coverage_90"] <= 1.0
    assert (run / "evaluation" / "angle_error.png").is_file()
    report = (run / "evaluation" / "report.md").read_text()
    assert "angle_error.png" in report and "`speed_error` | ratio" in report
    measured = workdir / "measured.csv"
    pd.read_parquet(data)[["range", "time", "height"]].head(4).to_csv(measured, index=False)
    _invoke("sample", "--run", run, "--data", measured, "--n", 3, "--out", workdir / "s.csv",
            "--quiet")  # fmt: skip
    assert list(pd.read_csv(workdir / "s.csv").columns) == ["event", "sample", "v0", "theta"]
    details = _invoke("systems", "--details", EXAMPLE)
    assert "--set noise=..." in details and "projectile launches" in details


def test_the_library_runs_a_users_system(workdir) -> None:
    spec = importlib.util.spec_from_file_location("my_projectile", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = fit_run("maf", workdir / "lib-run", system=module.make_system,
                  system_options={"noise": 0.05}, training={"epochs": 2}, quiet=True)  # fmt: skip
    assert run.system.options == {"noise": 0.05, "g": 9.81}
    # The run names the factory by its file, so another process can remake it.
    assert load_run(run.directory).system.options["noise"] == 0.05
    ev = evaluate_run(run.directory, samples=20, max_events=100)
    assert ev.metrics["n"] == 100 and "speed_error" in ev.metrics
    rows = sample_run(run.directory, run.directory / "data.parquet", workdir / "lib.csv", n=2)
    assert rows == 2 * 20_000
