"""Tuning benchmark: zuko-nsf tuned on the built-in CEI data against its defaults.

Usage:
    python benchmarks/tune_zuko.py                    # 30 min of tuning, 3 min a model
    python benchmarks/tune_zuko.py --quick            # a few minutes in all
    python benchmarks/tune_zuko.py --workers 4 --storage postgresql://me@db/flowrecon

Simulates the built-in data set (100,000 OCS events, seed 2026, 1 % momentum resolution)
and splits it 70/15/15 with `flowrecon.training.split_indices` (``--seed``). Tunes
zuko-nsf with `flowrecon.tune.tune` for ``--minutes`` of wall-clock time, each trial
training for at most ``--trial-minutes`` on the training split and scored by its
validation loss (the default configuration is the study's first trial). Then fits two
models the way ``flowrecon fit`` does, with the same per-model budget, epochs and
patience: the tuned one with ``flowrecon fit --config best.toml`` and the default one
with ``flowrecon fit --model zuko-nsf``, both on the same events and split, and compares
``ade``, ``coverage_90`` and ``nll`` (`flowrecon.systems.cei.metrics.cei_metrics`) on
the same held-out test events (the first ``--test-events`` of the test split). Results
go to ``tune_zuko.json``/``.md`` in ``--out`` (``tune_zuko_quick`` with ``--quick``),
with the study's figures and best.toml beside them; the study itself stays in
``--study-dir`` (re-running adds ``--minutes`` more tuning to it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, write_results  # noqa: E402

import flowrecon as fr  # noqa: E402
from flowrecon.base import resolve_device  # noqa: E402
from flowrecon.config import read_config_file  # noqa: E402
from flowrecon.systems.cei.data import save_events  # noqa: E402
from flowrecon.systems.cei.geometry import simulate_events  # noqa: E402
from flowrecon.systems.cei.metrics import cei_metrics  # noqa: E402
from flowrecon.training import split_indices  # noqa: E402
from flowrecon.tune import tune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLUMNS = (
    "configuration", "ade", "ade_median", "ade_p95", "coverage_90", "coverage_50", "nll",
    "epochs", "best_epoch", "train_s", "val_loss",
)  # fmt: skip


def _fit(args: argparse.Namespace, flags: list[str], out: Path, data: Path) -> Path:
    """``python -m flowrecon fit FLAGS`` on the benchmark's events; returns the run dir."""
    command = [sys.executable, "-m", "flowrecon", "fit", *flags, "--data", str(data)]
    command += ["--out", str(out), "--device", args.device, "--overwrite", "--quiet"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    return out


def _evaluate(run: Path, x_test: np.ndarray, y_test: np.ndarray, test_idx, args) -> dict:
    """Metrics of the run's model on the test events (``test_idx``: the whole test split,
    checked against the run's own)."""
    split = np.load(run / "split.npz")
    if not np.array_equal(split["test"], test_idx):
        raise RuntimeError(f"{run}: its test split differs from the benchmark's")
    model = fr.load(run / "model.pt", device=args.device)
    samples = model.sample(y_test, n=args.samples, seed=args.seed)
    log_prob = model.log_prob(x_test, y_test)
    metrics = cei_metrics(
        samples, x_test, y_test, charges=(2, 2, 2), log_prob=log_prob, resimulate=False
    )
    # Robust summaries beside the mean: per event, the mean atom distance of the mean.
    error = np.linalg.norm((samples.mean(0) - x_test).reshape(len(x_test), 3, 3), axis=-1)
    per_event = error.mean(-1)
    metrics["ade_median"], metrics["ade_p95"] = np.percentile(per_event, [50, 95]).tolist()
    h = model.history_
    val_loss = h.val["loss"][h.best_epoch - 1] if h.best_epoch else None
    return {
        **metrics,
        "epochs": h.epochs,
        "best_epoch": h.best_epoch,
        "train_s": h.seconds,
        "val_loss": val_loss,
        "hparams": model.hparams_,
        "training": json.loads((run / "config.json").read_text())["training"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="tuning wall-clock budget")
    parser.add_argument("--trial-minutes", type=float, default=3.0, help="budget of a model")
    parser.add_argument("--epochs", type=int, default=1000, help="epoch cap of every fit")
    parser.add_argument("--patience", type=int, default=20, help="early-stopping patience")
    parser.add_argument("--n", type=int, default=100_000, help="simulated events")
    parser.add_argument(
        "--test-events", type=int, default=2000, help="first test events evaluated (0: all)"
    )
    parser.add_argument("--samples", type=int, default=100, help="posterior samples an event")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--storage", default=None, help="study storage (default: SQLite)")
    parser.add_argument("--study", default=None, help="study name (default: the model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, study and fits")
    parser.add_argument(
        "--quick", action="store_true",
        help="10,000 events, 2 min of tuning, 15 s a model, 1,000 test events, 50 samples",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--study-dir", type=Path, default=None, help="default runs/tune_zuko")
    args = parser.parse_args(argv)
    stem = "tune_zuko_quick" if args.quick else "tune_zuko"
    if args.quick:
        args.n, args.minutes, args.trial_minutes = min(args.n, 10_000), 2.0, 0.25
        args.test_events, args.samples = min(args.test_events or 1000, 1000), 50
    study_dir = args.study_dir or Path("runs") / stem
    device = resolve_device(args.device)
    args.device = str(device)
    env = environment(device)

    start, load_before = time.perf_counter(), os.getloadavg()
    ev = simulate_events(args.n, seed=2026, momentum_noise=0.01, device=device)
    x, y = ev.positions, ev.momenta
    train_idx, val_idx, test_idx = split_indices(len(x), args.seed)
    study_dir.mkdir(parents=True, exist_ok=True)
    data = study_dir / "events.parquet"
    save_events(data, x, y)
    print(f"simulated {len(x):,} events in {time.perf_counter() - start:.0f} s", flush=True)

    fixed = {"epochs": args.epochs, "patience": args.patience}
    tuned = tune(
        "zuko-nsf", x[train_idx], y[train_idx], x[val_idx], y[val_idx],
        out=study_dir, storage=args.storage, study=args.study, timeout=60 * args.minutes,
        max_minutes_per_trial=args.trial_minutes, training=fixed, workers=args.workers,
        generator_options={"transform": "cei-momentum-frame", "device": args.device},
        seed=args.seed, progress=True,
    )  # fmt: skip
    print(tuned.summary, flush=True)
    if "best" not in tuned.files:
        raise SystemExit("no trial completed: nothing to compare")
    read_config_file(tuned.files["best"])  # the file fit --config reads, as it is

    test = test_idx[: args.test_events] if args.test_events else test_idx
    x_test, y_test = x[test], y[test]
    budget = ["--epochs", str(args.epochs), "--patience", str(args.patience)]
    budget += ["--max-minutes", str(args.trial_minutes), "--seed", str(args.seed)]
    runs = {
        "tuned (fit --config best.toml)": _fit(
            args, ["--config", str(tuned.files["best"])], study_dir / "refit_tuned", data
        ),
        "default (fit --model zuko-nsf)": _fit(
            args, ["--model", "zuko-nsf", *budget], study_dir / "refit_default", data
        ),
    }
    rows = []
    for name, run in runs.items():
        row = {"configuration": name, **_evaluate(run, x_test, y_test, test_idx, args)}
        rows.append(row)
        print(markdown_table("", COLUMNS, [row]).splitlines()[-1], flush=True)

    for name in ("best", "history", "importances"):
        if name in tuned.files:
            suffix = tuned.files[name].suffix
            shutil.copy(tuned.files[name], args.out / f"{stem}_{name}{suffix}")
    payload = {
        **env,
        "command": "python benchmarks/tune_zuko.py " + " ".join(argv or sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "study": {
            "name": tuned.study,
            "trials": tuned.counts,
            "best_trial": tuned.best_trial,
            "best_val_loss": tuned.best_value,
            "best_params": tuned.best_params,
            "first_trial": _first_trial(tuned.files["trials"]),
        },
        "test_events": int(len(test)),
        "results": rows,
        "seconds": time.perf_counter() - start,
        "load_average": {"start": load_before, "end": os.getloadavg()},
    }
    table = _table(env, args, tuned, rows, len(test))
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, stem, json.loads(json.dumps(payload, default=str)), table)
    print(table)
    return rows


def _first_trial(trials_csv: Path) -> dict:
    """Trial 0: the default configuration in a study this script created."""
    import pandas as pd

    first = pd.read_csv(trials_csv).iloc[0]
    value = None if pd.isna(first["value"]) else float(first["value"])
    return {"number": int(first["number"]), "state": str(first["state"]), "value": value}


def _table(env: dict, args: argparse.Namespace, tuned, rows: list[dict], n_test: int) -> str:
    c = tuned.counts
    head = (
        f"Tuning zuko-nsf, {env['date']}, {env['device_name']}, torch {env['torch']}; "
        f"{args.n:,} simulated OCS events (seed 2026, 1 % momentum noise), split 70/15/15 "
        f"(seed {args.seed}); {args.minutes:g} min of tuning ({c['complete']} complete, "
        f"{c['pruned']} pruned, {c['fail']} failed trials; best trial {tuned.best_trial}, "
        f"validation loss {tuned.best_value:.4g}); then each configuration refitted for at "
        f"most {args.trial_minutes:g} min and evaluated on {n_test:,} test events with "
        f"{args.samples} posterior samples each; load average {os.getloadavg()[0]:.1f} at "
        f"the end (other work shares the machine). Tuned: "
        + ", ".join(f"{k}={_short(v)}" for k, v in tuned.best_params.items())
    )
    return markdown_table(head, COLUMNS, rows)


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
