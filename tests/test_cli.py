"""The command line, through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from flowrecon.cli import main
from flowrecon.systems.cei.constants import MOMENTUM_COLUMNS, POSITION_COLUMNS


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "events.parquet"
    result = CliRunner().invoke(
        main, ["simulate", "--n", "400", "--out", str(path), "--seed", "3", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    return str(path)


def test_simulate_writes_contract_columns(runner, tmp_path):
    out = tmp_path / "sim.csv"
    result = runner.invoke(main, ["simulate", "--n", "25", "--out", str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote 25 rows of Coulomb explosion imaging of OCS" in result.output
    frame = pd.read_csv(out)
    assert list(frame.columns) == list(POSITION_COLUMNS + MOMENTUM_COLUMNS)
    assert len(frame) == 25 and np.isfinite(frame.to_numpy()).all()


def test_simulate_is_noise_free_unless_asked(runner, tmp_path):
    from flowrecon.systems.cei.simulator import asymptotic_momenta

    out = tmp_path / "clean.parquet"
    assert (
        runner.invoke(main, ["simulate", "--n", "20", "--out", str(out), "--quiet"]).exit_code == 0
    )
    frame = pd.read_parquet(out)
    p_sim = asymptotic_momenta(frame[list(POSITION_COLUMNS)].to_numpy())
    np.testing.assert_allclose(frame[list(MOMENTUM_COLUMNS)].to_numpy(), p_sim, rtol=1e-12)


def test_simulate_is_reproducible_by_seed(runner, tmp_path):
    paths = [tmp_path / f"{i}.parquet" for i in range(3)]
    for path, seed in zip(paths, ["7", "7", "8"]):
        args = ["simulate", "--n", "20", "--out", str(path), "--seed", seed, "--quiet"]
        assert runner.invoke(main, args).exit_code == 0
    a, b, c = (pd.read_parquet(p) for p in paths)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_simulate_options(runner, tmp_path):
    out = tmp_path / "ball.parquet"
    args = ["simulate", "--n", "30", "--out", str(out), "--geometry", "ball"]
    args += ["--charges", "2,1,1", "--momentum-noise", "0.01", "--quiet"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output == ""  # --quiet
    assert len(pd.read_parquet(out)) == 30


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "5", "--out", "x.txt"], "unsupported output format"),
        (["--n", "5", "--out", "x.csv", "--charges", "2,x,2"], "expected a number, got 'x'"),
        (["--n", "5", "--out", "x.csv", "--charges", "1e308,1e308,1e308"], "at most 118"),
        (["--n", "5", "--out", "x.csv", "--set", "charge=2,2,2"], "Did you mean 'charges'"),
        (["--n", "5", "--out", "x.csv", "--chargs", "2,2,2"], "no such option: --chargs"),
        (["--n", "5", "--out", "x.csv", "--seed", "-1"], "--seed"),
        (["--n", "5", "--out", "x.csv", "--system", "nope"], "unknown system 'nope'"),
        (["--n", "5", "--out", "x.csv", "--refine"], "belongs to evaluate"),
        (["--n", "5", "--out", "x.csv", "--charges", "2,2"], "charges"),
        (["--n", "0", "--out", "x.csv"], "0 is not in the range"),
        (["--n", "5", "--out", "x.csv", "--geometry", "cube"], "'cube' is not one of"),
        (["--n", "5", "--out", "x.csv", "--device", "cuda:7"], "cuda"),
        (["--n", "5", "--out", "x.csv", "--momentum-noise", "-1"], "-1"),
    ],
)
def test_simulate_bad_input(runner, tmp_path, args, message):
    result = runner.invoke(main, ["simulate", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_models_lists_every_model(runner):
    result = runner.invoke(main, ["models"])
    assert result.exit_code == 0
    for name in ("cvae", "freia-cinn", "zuko-nsf", "nflows-maf", "cvae-seed"):
        assert name in result.output
    details = runner.invoke(main, ["models", "--details", "zuko-nsf"])
    assert details.exit_code == 0 and "transforms (int, default" in details.output
    bad = runner.invoke(main, ["models", "--details", "zuko-nfs"])
    assert bad.exit_code != 0 and "Did you mean 'zuko-nsf'" in bad.output


def _tiny_fit_args(data: str, out) -> list[str]:
    return [
        "fit", "--model", "zuko-maf", "--data", data, "--out", str(out), "--epochs", "3",
        "--batch-size", "64", "--hparam", "hidden=16", "--hparam", "transforms=2", "--quiet",
    ]  # fmt: skip


def test_fit_writes_a_run_directory(runner, small_data, tmp_path):
    out = tmp_path / "run"
    args = [a for a in _tiny_fit_args(small_data, out) if a != "--quiet"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    for name in (
        "model.pt", "config.json", "split.npz", "history.csv", "history.json",
        "learning_curve_first10.png", "learning_curve_rest.png", "loss_components.png",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["hparams"]["hidden"] == 16 and config["training"]["epochs"] == 3
    # The summary separates the training time from the whole fit's.
    trained = round(config["result"]["seconds"])
    assert f"3 epochs in {trained} s of training (completed; " in result.output
    assert " s in all), best validation loss " in result.output
    assert config["split"] == {"seed": 0, "train": 280, "val": 60, "test": 60}
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 3 and {"train_loss", "val_loss"} <= set(history.columns)
    import flowrecon as fr

    model = fr.load(out / "model.pt")
    y = pd.read_parquet(small_data)[list(MOMENTUM_COLUMNS)].to_numpy()[:4]
    assert model.sample(y, n=2).shape == (2, 4, 9)


def test_fit_reads_a_toml_config(runner, small_data, tmp_path):
    config = tmp_path / "fit.toml"
    config.write_text(
        f'[model]\nname = "zuko-maf"\n[hparams]\nhidden = 8\ntransforms = 1\n'
        f'[training]\nepochs = 2\nbatch_size = 128\n[data]\npath = "{small_data}"\n'
        f'[preprocessing]\nframe = "lab"\n'
    )
    out = tmp_path / "run"
    args = ["fit", "--config", str(config), "--out", str(out), "--epochs", "1", "--quiet"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["hparams"]["hidden"] == 8
    assert saved["training"]["epochs"] == 1  # the command line wins over the file
    assert saved["system"]["options"]["frame"] == "lab"  # [preprocessing] frame: a system option
    assert saved["preprocessing"]["transform"] is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "zuko-nfs"], "Did you mean 'zuko-nsf'"),
        (["--model", "zuko-nsf", "--hparam", "hiden=3"], "hiden"),
        (["--model", "zuko-nsf", "--hparam", "hidden"], "expected KEY=VALUE"),
        (["--model", "zuko-nsf", "--hparam", "hidden=abc"], "hidden"),
        (["--model", "zuko-nsf", "--physics-weight", "energy=1"], "unknown physics term"),
        (["--model", "zuko-nsf", "--data", "missing.parquet"], "missing.parquet"),
        (["--model", "zuko-nsf", "--epochs", "-1"], "-1"),
        ([], "give --model"),
    ],
)
def test_fit_bad_input(runner, tmp_path, extra, message):
    result = runner.invoke(main, ["fit", "--out", str(tmp_path / "r"), *extra])
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output


def test_fit_reports_bad_data_file(runner, tmp_path):
    bad = tmp_path / "bad.csv"
    frame = pd.DataFrame(np.ones((5, 18)), columns=list(POSITION_COLUMNS + MOMENTUM_COLUMNS))
    frame = frame.drop(columns=["psz"])
    frame.to_csv(bad, index=False)
    result = runner.invoke(main, ["fit", "--model", "zuko-nsf", "--data", str(bad), "--quiet"])
    assert result.exit_code != 0
    assert "bad.csv" in result.output and "psz" in result.output


@pytest.fixture(scope="module")
def tiny_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = CliRunner().invoke(main, _tiny_fit_args(small_data, out))
    assert result.exit_code == 0, result.output
    return out


def test_evaluate_writes_metrics_report_and_figures(runner, tiny_run, small_data, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--run", str(tiny_run), "--samples", "20", "--out", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "60 held-out test events" in result.output  # the run's own test split only
    assert "Random test events" in result.output and "ade" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    from flowrecon.systems.cei.metrics import DESIGN_KEYS

    assert set(DESIGN_KEYS) <= set(metrics) and metrics["n"] == 60
    for name in (
        "report.md", "real_vs_predicted.png", "distributions.png", "calibration.png",
        "energy_difference.png", "posterior_in_plane.png",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "real_vs_predicted.png" in report and "coverage_90" in report


def test_evaluate_on_another_file_uses_every_event(runner, tiny_run, tmp_path):
    other = tmp_path / "other.csv"
    runner.invoke(main, ["simulate", "--n", "30", "--out", str(other), "--seed", "9", "--quiet"])
    args = ["evaluate", "--run", str(tiny_run), "--data", str(other), "--samples", "5"]
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "e"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["n"] == 30


def test_sample_writes_event_and_sample_ids(runner, tiny_run, tmp_path):
    momenta = tmp_path / "momenta.csv"
    frame = pd.DataFrame(np.zeros((3, 9)) + 100.0, columns=list(MOMENTUM_COLUMNS))
    frame.loc[:, ["pcx", "pox", "psx"]] = [[50.0, -300.0, 250.0]] * 3
    frame.to_csv(momenta, index=False)  # momenta only: positions are not needed
    out = tmp_path / "samples.parquet"
    args = ["sample", "--run", str(tiny_run), "--data", str(momenta), "--n", "4", "--out", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    extra = ["energy_mismatch", "energy_flag", "in_domain", "unresolved"]  # per draw, per event
    assert list(table.columns) == ["event", "sample", *POSITION_COLUMNS, *extra]
    assert len(table) == 12
    assert table["event"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert table["sample"].tolist() == [0, 1, 2, 3] * 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "--run", "nowhere"], "nowhere"),
        (["sample", "--run", "nowhere", "--data", "x.csv", "--out", "s.csv"], "nowhere"),
        (["evaluate", "--run", "RUN", "--charges", "2,1,1"], "belongs to fit"),
        (["evaluate", "--run", "RUN", "--set", "refin=1"], "Did you mean 'refine'"),
        (["evaluate", "--run", "RUN", "--prior", "gaussian"], "'gaussian' is not one of"),
        (["evaluate", "--run", "RUN", "--samples", "1"], "1 is not in the range"),
        (["sample", "--run", "RUN", "--data", "DATA", "--out", "s.txt"], "unsupported output"),
        (["compare", "cvae", "zuko-nfs", "--epochs", "1"], "Did you mean 'zuko-nsf'"),
        (["compare", "cvae", "cvae"], "named twice"),
        (["compare", "cinn", "freia-cinn"], "named twice"),
    ],
)
def test_evaluate_sample_compare_bad_input(runner, tiny_run, small_data, args, message):
    args = [str(tiny_run) if a == "RUN" else small_data if a == "DATA" else a for a in args]
    result = runner.invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output


def test_compare_trains_and_tabulates(runner, small_data, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "cvae", "zuko-maf", "--data", small_data, "--out", str(out)]
    result = runner.invoke(main, [*args, "--epochs", "1", "--samples", "5", "--quiet"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "comparison.csv")
    assert table["model"].tolist() == ["cvae", "zuko-maf"]
    assert table.loc[0, "nll"] != table.loc[0, "nll"]  # the cVAE has no density: empty
    assert np.isfinite(table.loc[1, "nll"])
    for name in ("comparison.md", "calibration.png", "comparison.png"):
        assert (out / name).is_file(), name
    assert (out / "cvae" / "evaluation" / "metrics.json").is_file()
    assert (out / "zuko-maf" / "evaluation" / "report.md").is_file()
    for column in ("ade", "ade_median", "ade_p95", "failure_rate"):  # robust beside the mean
        assert column in table.columns and column in (out / "comparison.md").read_text()


def test_evaluate_refine_and_weights(runner, tiny_run, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--run", str(tiny_run), "--samples", "4", "--out", str(out)]
    result = runner.invoke(main, [*args, "--refine", "--refine-samples", "1", "--max-events", "6"])
    assert result.exit_code == 0, result.output
    assert "Refined through the simulator" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"refined_ade", "refined_resim_residual", "refine_events_within_1e-5_bohr"} <= set(
        metrics
    )
    again = runner.invoke(main, [*args, "--weights", "--noise", "0.01", "--max-events", "6"])
    assert again.exit_code != 0 and "give --overwrite" in again.output  # nothing replaced
    assert "refined_ade" in json.loads((out / "metrics.json").read_text())
    result = runner.invoke(
        main,
        [*args, "--weights", "--noise", "0.01", "--max-events", "6", "--quiet", "--overwrite"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert "refined_ade" not in metrics  # replaced whole, not merged with the earlier one
    assert 0 <= metrics["weighted_coverage_90"] <= 1
    assert metrics["weights_ess_median"] <= 4  # at most the number of samples
    assert metrics["weights_prior"] == "learned"  # a user's file: what its training data say
    missing = runner.invoke(main, [*args, "--weights", "--quiet", "--overwrite"])
    assert missing.exit_code != 0 and "give --noise" in missing.output


def test_sample_refine_adds_residual_columns(runner, tiny_run, small_data, tmp_path):
    few = tmp_path / "few.parquet"
    pd.read_parquet(small_data).head(10).to_parquet(few)
    out = tmp_path / "refined.csv"
    args = ["sample", "--run", str(tiny_run), "--data", str(few), "--n", "2", "--out", str(out)]
    result = runner.invoke(main, [*args, "--refine", "--quiet"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert {"residual", "converged", "solution"} <= set(table.columns)
    assert len(table) == 20
    assert table["event"].tolist() == sorted(list(range(10)) * 2)
    # Each row's residual is what the simulator says of that row's refined positions for
    # that row's event: positions, residual and event ids stay aligned.
    from flowrecon.systems.cei.simulator import asymptotic_momenta

    p_obs = pd.read_parquet(few)[list(MOMENTUM_COLUMNS)].to_numpy()[table["event"]]
    p_sim = asymptotic_momenta(table[list(POSITION_COLUMNS)].to_numpy())
    rel = np.linalg.norm(p_sim - p_obs, axis=1) / np.linalg.norm(p_obs, axis=1)
    np.testing.assert_allclose(table["residual"], rel, rtol=1e-6, atol=1e-12)
    assert (table["converged"] == (table["residual"] < 1e-9)).all()
    assert ((table["solution"] >= 0) == table["converged"]).all()
    assert table["converged"].mean() >= 0.5  # noise-free events: most samples reach one
