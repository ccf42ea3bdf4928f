"""Accuracy benchmark: every model trained on the same simulated OCS events, same budget.

Usage:
    python benchmarks/accuracy.py                      # 200,000 events, 15 min a model
    python benchmarks/accuracy.py --minutes 5 --noise 0 --noise 0.01
    python benchmarks/accuracy.py --models zuko-nsf,freia-cinn --quick

For each momentum-noise level, simulates ``--n-train`` OCS events (85 % train, 15 %
validation) and ``--n-test`` separate held-out events, trains each model for at most
``--minutes`` of wall-clock time (cosine learning-rate schedule over that budget, best
validation state restored), draws ``--samples`` posterior samples per held-out event
(only the momenta go into the model) and computes the metrics of DESIGN section 3 with
`flowrecon.systems.cei.metrics.cei_metrics`. Results are written after every model to
``accuracy.json`` and ``accuracy.md`` in ``--out``, so an interrupted run keeps what it
finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

import flowrecon as fr  # noqa: E402
from flowrecon.base import resolve_device  # noqa: E402
from flowrecon.registry import MODELS, is_installed  # noqa: E402
from flowrecon.systems.cei.geometry import simulate_events  # noqa: E402
from flowrecon.systems.cei.metrics import cei_metrics  # noqa: E402

#: Hyper-parameters used here where a model's defaults are too small for 200k events.
SETTINGS: dict[str, dict] = {
    "cvae": {"hidden_dim": 128, "num_layers": 3, "latent_dim": 8},
}

COLUMNS = (
    "model", "noise", "ade", "ade_sample", "rmsd_com", "bond_error_co", "bond_error_cs",
    "angle_error_deg", "energy_diff", "resim_residual", "coverage_50", "coverage_90", "nll",
    "epochs", "train_s", "samples_per_s",
)  # fmt: skip


def _row(r: dict) -> str:
    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    return "| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |"


def _table(env: dict, args: argparse.Namespace, rows: list[dict]) -> str:
    head = (
        f"Accuracy, {env['date']}, {env['device_name']}, torch {env['torch']}; "
        f"{args.n_train:,} training events (85/15 train/val), {args.n_test:,} held-out "
        f"events, {args.samples} posterior samples each, at most {args.minutes:g} min a model"
    )
    return "\n".join(
        [head, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        + [_row(r) for r in rows]
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all", help="comma-separated names, or all")
    parser.add_argument("--n-train", type=int, default=200_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget a model")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--noise", type=float, action="append", help="relative momentum noise")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20k events, 1 min a model")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--stem", default="accuracy")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test = min(args.n_train, 20_000), min(args.n_test, 500)
        args.minutes, args.samples = min(args.minutes, 1.0), min(args.samples, 50)
    noises = args.noise or [0.0, 0.01]
    names = list(MODELS) if args.models == "all" else args.models.split(",")
    names = [n for n in names if is_installed(n)]
    device = resolve_device(args.device)
    env = environment(device)
    rows: list[dict] = []
    for noise in noises:
        ev = simulate_events(
            args.n_train + args.n_test, seed=args.seed, momentum_noise=noise, device=device
        )
        x, y = ev.positions[: args.n_train], ev.momenta[: args.n_train]
        xt, yt = ev.positions[args.n_train :], ev.momenta[args.n_train :]
        for name in names:
            model = fr.make(name, **SETTINGS.get(name, {}), device=str(device), seed=args.seed)
            print(f"[{name}, noise {noise}] training for at most {args.minutes:g} min", flush=True)
            model.fit(
                x,
                y,
                epochs=100_000,
                batch_size=args.batch_size,
                lr=args.lr,
                lr_schedule="cosine",
                patience=0,
                max_minutes=args.minutes,
                quiet=True,
            )
            t0 = time.perf_counter()
            samples = model.sample(yt, n=args.samples, seed=args.seed)
            sample_s = time.perf_counter() - t0
            log_prob = model.log_prob(xt, yt) if model.has_density else None
            metrics = cei_metrics(samples, xt, yt, charges=(2, 2, 2), log_prob=log_prob)
            h = model.history_
            row = {
                "model": name,
                "noise": noise,
                **metrics,
                "epochs": h.epochs,
                "best_epoch": h.best_epoch,
                "train_s": h.seconds,
                "samples_per_s": samples.shape[0] * samples.shape[1] / sample_s,
                "hparams": model.hparams_,
            }
            rows.append(row)
            print(_row(row), flush=True)
            payload = {**env, "settings": vars(args) | {"out": str(args.out)}, "results": rows}
            payload["command"] = "python benchmarks/accuracy.py " + " ".join(argv or sys.argv[1:])
            write_results(args.out, args.stem, json.loads(json.dumps(payload, default=str)),
                          _table(env, args, rows))  # fmt: skip
            del model, samples
            torch.cuda.empty_cache() if device.type == "cuda" else None
    print(_table(env, args, rows))
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
