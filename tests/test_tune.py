"""flowrecon.tune: trials, pruning, faults, resuming and results, on a SQLite storage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flowrecon import registry
from flowrecon.tune import tune

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

#: A search that costs a fraction of a second a trial: one tiny flow, two epochs.
SEARCH = {
    "transforms": 1,
    "hidden_layers": 1,
    "hidden": [4, 8],
    "lr": {"low": 1e-3, "high": 1e-2, "log": True},
    "batch_size": 64,
    "lr_schedule": "constant",
}
TRAINING = {"epochs": 2, "patience": 0}


def _data(n: int = 240, width: int = 3, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, width))
    x = y @ rng.normal(size=(width, width)) + 0.3 * rng.normal(size=(n, width))
    cut = n * 3 // 4
    return x[:cut], y[:cut], x[cut:], y[cut:]


def _tune(out: Path, **kwargs):
    options = {"search": SEARCH, "training": TRAINING, "trials": 3, "figures": False, **kwargs}
    return tune("zuko-maf", *_data(), out=out, **options)


def _trials(out: Path, name: str = "zuko-maf") -> list:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials(deepcopy=False)


def test_results_and_a_best_toml_that_fit_accepts_as_it_is(tmp_path: Path) -> None:
    import matplotlib
    import matplotlib.pyplot as plt
    from click.testing import CliRunner

    from flowrecon.cli import main
    from flowrecon.config import read_config_file
    from flowrecon.systems.cei.constants import MOMENTUM_COLUMNS, POSITION_COLUMNS
    from flowrecon.training import training_options

    figures, style = plt.get_fignums(), dict(matplotlib.rcParams)
    x, y, xv, yv = _data(320, width=9)
    result = tune(
        "zuko-maf", x, y, xv, yv, out=tmp_path / "tune", search=SEARCH, training=TRAINING,
        trials=3, generator_options={"transform": "none", "x_scaler": "robust"}, seed=3,
        best_sections={"system": {"name": "cei", "frame": "lab"}},
    )  # fmt: skip
    assert plt.get_fignums() == figures and dict(matplotlib.rcParams) == style
    assert result.counts["complete"] == 3 and result.best_trial is not None
    for name in ("best", "trials", "summary", "history", "importances", "intermediate"):
        assert result.files[name].is_file(), name
    assert f"best: trial {result.best_trial}" in result.summary
    table = pd.read_csv(result.files["trials"])
    assert list(table["number"]) == [0, 1, 2] and set(table["state"]) == {"COMPLETE"}
    assert table["value"].min() == pytest.approx(result.best_value)

    config = read_config_file(result.files["best"])
    assert config.model == "zuko-maf" and config.seed == 3 and config.device == "auto"
    assert registry.coerce_hparams("zuko-maf", config.hparams) == config.hparams
    assert config.hparams["hidden"] == result.best_params["hidden"]
    assert config.training["lr"] == pytest.approx(result.best_params["lr"])
    assert config.training["epochs"] == 2 and set(config.training) <= set(training_options())
    assert config.preprocessing == {"x_scaler": "robust", "y_scaler": "standard"}
    assert config.system == "cei" and config.system_options == {"frame": "lab"}

    data = tmp_path / "events.csv"
    columns = list(POSITION_COLUMNS) + list(MOMENTUM_COLUMNS)
    pd.DataFrame(np.hstack([np.vstack([x, xv]), np.vstack([y, yv])]), columns=columns).to_csv(
        data, index=False
    )
    run = tmp_path / "refit"
    args = ["fit", "--config", str(result.files["best"]), "--data", str(data), "--out", str(run)]
    outcome = CliRunner().invoke(main, [*args, "--quiet"])
    assert outcome.exit_code == 0, outcome.output
    refit = json.loads((run / "config.json").read_text())
    assert refit["hparams"]["hidden"] == result.best_params["hidden"]
    assert refit["training"]["lr"] == pytest.approx(result.best_params["lr"])
    assert refit["system"]["options"]["frame"] == "lab"


def test_figures_are_skipped_with_a_note_when_trials_are_too_few(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    from flowrecon.tune import write_results

    study = optuna.create_study(study_name="one")
    trial = study.ask()
    trial.suggest_int("hidden", 4, 8)
    trial.report(2.0, 1)
    study.tell(trial, 1.5)
    figures = plt.get_fignums()
    result = write_results(study, tmp_path, model="zuko-maf")
    assert plt.get_fignums() == figures
    assert result.files["history"].is_file() and "importances" not in result.files
    assert "note: importances.png: needs 2 complete trials, has 1" in result.summary
    assert result.summary.startswith("study 'one': 1 trials, 1 complete, 0 pruned, 0 failed")


def test_rerunning_resumes_the_study_up_to_its_total(tmp_path: Path) -> None:
    _tune(tmp_path, trials=2)
    first = {t.number: t.datetime_start for t in _trials(tmp_path)}
    result = _tune(tmp_path, trials=4)
    trials = _trials(tmp_path)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.number: t.datetime_start for t in trials[:2]} == first  # not run again
    assert result.counts["complete"] == 4
    _tune(tmp_path, trials=4)  # the budget is spent: nothing runs
    assert len(_trials(tmp_path)) == 4


def test_the_default_configuration_is_the_first_trial(tmp_path: Path) -> None:
    search = {**SEARCH, "lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    _tune(tmp_path, trials=2, search=search, pruner="hyperband")
    first = _trials(tmp_path)[0]
    assert first.params["lr"] == 1e-3  # train's default learning rate
    assert first.user_attrs["queued"] == "default configuration"


def test_a_diverging_trial_fails_with_its_reason_and_the_study_goes_on(tmp_path: Path) -> None:
    search = {**SEARCH, "lr": [1e-3, 1e9]}  # 1e9 drives the loss to infinity at once
    result = _tune(tmp_path, trials=5, search=search, sampler="random", seed=1)
    trials = _trials(tmp_path)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 5 and failed and complete
    assert all(t.params["lr"] == 1e9 for t in failed)
    assert all("the loss is not finite" in t.user_attrs["fail_reason"] for t in failed)
    assert all(t.params["lr"] == 1e-3 for t in complete)
    assert f"trial {failed[0].number}: training stopped at epoch 1" in result.summary


def test_a_trial_that_raises_fails_with_its_reason(tmp_path: Path) -> None:
    calls = []

    def score(model, x_val, y_val) -> float:
        calls.append(len(x_val))
        if len(calls) == 2:
            raise ValueError("detector map missing")
        return float(-model.log_prob(x_val, y_val).mean())

    _tune(tmp_path, trials=3, metric="nll", metric_fn=score)
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["fail_reason"] == "ValueError: detector map missing"
    assert trials[0].value != pytest.approx(trials[0].user_attrs["val_loss"])  # nll, not loss


def test_a_pruned_trial_stops_at_once(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="zuko-maf", storage=storage)
    for lr in (1e-2, 1e-2, 1e-2, 1e-7):  # the last learns nothing: pruned at an early epoch
        study.enqueue_trial({"hidden": 8, "lr": lr}, user_attrs={"queued": "test"})
    search = {**SEARCH, "lr": {"low": 1e-7, "high": 1e-2, "log": True}}
    training = {"epochs": 12, "patience": 0}
    _tune(tmp_path, trials=4, search=search, training=training, pruner="median")
    trials = _trials(tmp_path)
    assert [t.state for t in trials[:3]] == [TrialState.COMPLETE] * 3
    assert all(t.user_attrs["epochs"] == 12 for t in trials[:3])
    pruned = trials[3]
    assert pruned.state == TrialState.PRUNED
    assert pruned.user_attrs["pruned_at_epoch"] <= 2
    assert max(pruned.intermediate_values) == pruned.user_attrs["pruned_at_epoch"]


def test_ctrl_c_leaves_the_study_resumable(tmp_path: Path) -> None:
    calls = []

    def interrupt_second(model, x_val, y_val) -> float:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return float(len(calls))

    with pytest.raises(KeyboardInterrupt):
        _tune(tmp_path, trials=3, metric="score", metric_fn=interrupt_second)
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["fail_reason"].startswith("interrupted")
    assert (tmp_path / "summary.txt").is_file()

    _tune(tmp_path, trials=3, metric="score", metric_fn=lambda m, x, y: 1.0)
    trials = _trials(tmp_path)
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert trials[2].params == trials[1].params and trials[2].user_attrs["retry_of"] == 1


def test_timeout_cuts_the_last_trial_and_starts_no_other(tmp_path: Path) -> None:
    start = time.monotonic()
    result = _tune(tmp_path, trials=None, timeout=4, training={"epochs": 100_000, "patience": 0})
    assert time.monotonic() - start < 30
    trials = _trials(tmp_path)
    assert trials[-1].state == TrialState.PRUNED
    assert trials[-1].user_attrs["pruned_reason"] == "cut short by the study's timeout"
    assert result.counts["running"] == result.counts["waiting"] == 0


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_stale_trial_is_failed_and_run_again(tmp_path: Path) -> None:
    from flowrecon.tune import _open_storage

    storage = _open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1)
    study = optuna.create_study(study_name="zuko-maf", storage=storage)
    lost = study.ask({"hidden": optuna.distributions.CategoricalDistribution([4, 8])})
    storage.record_heartbeat(lost._trial_id)  # ... and its worker dies
    time.sleep(3.5)  # three heartbeat intervals
    _tune(tmp_path, trials=3, heartbeat_interval=1)
    trials = _trials(tmp_path)
    assert trials[0].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params["hidden"] == lost.params["hidden"]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3  # the stale one is not charged


def test_two_local_workers_share_one_budget(tmp_path: Path) -> None:
    result = _tune(tmp_path, trials=6, workers=2)
    trials = _trials(tmp_path)
    assert [t.number for t in trials] == list(range(6))  # every trial once, none extra
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes worked
    assert result.counts["complete"] + result.counts["pruned"] == 6
    assert not list(tmp_path.glob(".tune-data*"))


def test_the_budget_counts_what_ran_and_what_is_queued() -> None:
    from flowrecon.tune import _is_surplus, _uncharged, _work_left

    study = optuna.create_study()
    for _ in range(2):
        study.tell(study.ask(), 1.0)
    failed = study.ask()
    failed.set_user_attr("fail_reason", "interrupted")
    study.tell(failed, state=TrialState.FAIL)
    study.enqueue_trial({}, user_attrs={"retry_of": failed.number})
    assert _uncharged(study.get_trials()) == {2}
    assert _work_left(study, 3)  # the queued retry
    retry = study.ask()
    study.tell(retry, 1.0)
    assert not _work_left(study, 3)
    assert _is_surplus(study, study.ask().number, 3)
    assert not _is_surplus(study, 4, 5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trials": None}, "tune needs a budget: trials=N, timeout=SECONDS, or both"),
        ({"trials": 0}, "trials must be a positive integer, got 0"),
        ({"workers": 0}, "workers must be a positive integer, got 0"),
        ({"metric": "ade"}, "metric 'ade' needs metric_fn(model, x_val, y_val) -> float"),
        ({"sampler": "grid"}, "unknown sampler 'grid'; choose one of tpe, random"),
        ({"pruner": "asha"}, "unknown pruner 'asha'; choose one of median, hyperband, none"),
        ({"generator_options": {"frame": "lab"}}, "unknown generator option 'frame'"),
        ({"training": {"epoch": 3}}, "unknown training option 'epoch'. Did you mean 'epochs'?"),
    ],
)
def test_bad_options_fail_before_any_trial(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        _tune(tmp_path / "out", **options)
    assert str(info.value).startswith(message)
    assert not (tmp_path / "out").exists()


def test_storage_urls() -> None:
    from flowrecon.tune import redact, storage_url

    assert storage_url(None, "/data/run") == "sqlite:////data/run/study.db"
    assert storage_url("/data/s.db", "x") == "sqlite:////data/s.db"
    pytest.importorskip("psycopg")
    url = storage_url("postgresql://me:secret@db.example:5432/flowrecon", "x")
    assert url == "postgresql+psycopg://me:secret@db.example:5432/flowrecon"
    assert "secret" not in redact(url)
