"""`flowrecon tune` on a System's data: the study, best.toml that fit accepts, resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from flowrecon.cli import main
from flowrecon.data import write_table
from flowrecon.system import make_system


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tune-data") / "d.parquet"
    write_table(make_system("cei").simulate(300, seed=2), path)
    return str(path)


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_tune_writes_a_study_that_fit_accepts_and_resumes(tmp_path, data) -> None:
    out = tmp_path / "study"
    args = ["tune", "--model", "maf", "--data", data, "--out", out, "--epochs", 1,
            "--set", "frame=lab", "--quiet", "--device", "cpu"]  # fmt: skip
    result = _invoke(*args, "--trials", 2)
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out / "trials.csv")) == 2
    best = (out / "best.toml").read_text()
    assert '[system]\nname = "cei"' in best and 'frame = "lab"' in best and "[data]" in best
    # The same command with a larger budget resumes the study: 3 trials in all.
    assert _invoke(*args, "--trials", 3).exit_code == 0
    assert len(pd.read_csv(out / "trials.csv")) == 3
    refit = tmp_path / "refit"
    fitted = _invoke("fit", "--config", out / "best.toml", "--out", refit, "--epochs", 1,
                     "--quiet")  # fmt: skip
    assert fitted.exit_code == 0, fitted.output
    config = json.loads((refit / "config.json").read_text())
    assert config["system"]["options"]["frame"] == "lab"
    assert config["resolved_model"] == "zuko-maf"


def test_tune_on_the_systems_error_and_bad_metrics(tmp_path, data) -> None:
    out = tmp_path / "ade"
    result = _invoke("tune", "--model", "maf", "--data", data, "--out", out, "--trials", 1,
                     "--epochs", 1, "--metric", "ade", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "ade =" in result.output
    bad = _invoke("tune", "--model", "maf", "--data", data, "--out", tmp_path / "x",
                  "--metric", "speed")  # fmt: skip
    assert bad.exit_code == 1 and "unknown metric 'speed'" in bad.output
