"""Accuracy benchmark: every model trained on the same simulated OCS events, same budget.

Usage:
    python benchmarks/accuracy.py                      # 200,000 events, 15 min a model
    python benchmarks/accuracy.py --minutes 5 --noise 0 --noise 0.01
    python benchmarks/accuracy.py --models zuko-nsf,freia-cinn --quick
    python benchmarks/accuracy.py --minutes 0.5 --minutes 1 --minutes 2 --minutes 4
                                                      # accuracy against training budget

For each momentum-noise level, simulates ``--n-train`` OCS events (85 % train, 15 %
validation) and ``--n-test`` separate held-out events, trains each model for at most
``--minutes`` of wall-clock time (cosine learning-rate schedule over that budget, best
validation state restored), draws ``--samples`` posterior samples per held-out event
(only the momenta go into the model) and computes the metrics of DESIGN section 3 with
`flowrecon.systems.cei.metrics.cei_metrics`. Results are written after every model to
``accuracy.json`` and ``accuracy.md`` in ``--out``, so an interrupted run keeps what it
finished. With several ``--minutes``, every model is trained afresh for each budget (each
run anneals its learning rate over its own budget, as a user with that budget would) and
the results go to ``accuracy_budget.json``/``.md`` with a figure ``accuracy_budget.png``
of ``ade`` and ``|coverage_90 - 0.90|`` against budget.
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
from _common import (  # noqa: E402
    add_run_arguments,
    environment,
    fit_for,
    markdown_table,
    write_results,
)

from flowrecon.base import resolve_device  # noqa: E402
from flowrecon.registry import MODELS, is_installed  # noqa: E402
from flowrecon.systems.cei.geometry import simulate_events  # noqa: E402
from flowrecon.systems.cei.metrics import cei_metrics  # noqa: E402

COLUMNS = (
    "model", "noise", "minutes", "ade", "ade_sample", "rmsd_com", "bond_error_co",
    "bond_error_cs", "angle_error_deg", "energy_diff", "resim_residual", "coverage_50",
    "coverage_90", "nll", "epochs", "train_s", "samples_per_s",
)  # fmt: skip


def _table(env: dict, args: argparse.Namespace, rows: list[dict]) -> str:
    budgets = ", ".join(f"{m:g}" for m in args.minutes)
    head = (
        f"Accuracy, {env['date']}, {env['device_name']}, torch {env['torch']}; "
        f"{args.n_train:,} training events (85/15 train/val), {args.n_test:,} held-out "
        f"events, {args.samples} posterior samples each, budgets {budgets} min a model"
    )
    return markdown_table(head, COLUMNS, rows)


def plot_budget(rows: list[dict], path: Path) -> None:
    """Mean position error and coverage_90 against the training budget, one line a model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    noises = sorted({r["noise"] for r in rows})
    fig, axes = plt.subplots(len(noises), 2, figsize=(10, 3.6 * len(noises)), squeeze=False)
    for i, noise in enumerate(noises):
        for name in dict.fromkeys(r["model"] for r in rows):
            mine = sorted(
                (r for r in rows if r["model"] == name and r["noise"] == noise),
                key=lambda r: r["minutes"],
            )
            if mine:
                t = [r["minutes"] for r in mine]
                axes[i, 0].plot(t, [r["ade"] for r in mine], "o-", label=name)
                axes[i, 1].plot(t, [r["coverage_90"] for r in mine], "o-", label=name)
        axes[i, 0].set(yscale="log", ylabel="ade (bohr)")
        axes[i, 0].set_title(f"mean position error, noise {noise:g}")
        axes[i, 1].axhline(0.9, color="k", lw=0.8, ls="--")
        axes[i, 1].set(ylabel="coverage_90", title=f"calibration (nominal 0.90), noise {noise:g}")
        for ax in axes[i]:
            ax.set(xscale="log", xlabel="training budget (min)")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(sorted({r["minutes"] for r in rows}))
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all", help="comma-separated names, or all")
    add_run_arguments(parser)
    parser.add_argument(
        "--minutes", type=float, action="append",
        help="training budget a model; repeat for accuracy against budget (default 15)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="20k events, 500 test events, budgets of at most 15 s, 3 models by default; "
        "results go to *_quick files",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--stem", default=None, help="accuracy, or accuracy_budget for several")
    args = parser.parse_args(argv)
    args.minutes = sorted(set(args.minutes or [15.0]))
    if args.quick:
        args.n_train, args.n_test = min(args.n_train, 20_000), min(args.n_test, 500)
        args.minutes = sorted({min(m, 0.25) for m in args.minutes})
        args.samples = min(args.samples, 50)
        if args.models == "all":
            args.models = "cvae,freia-cinn,zuko-nsf"
    if args.stem is None:
        args.stem = "accuracy" if len(args.minutes) == 1 else "accuracy_budget"
        args.stem += "_quick" if args.quick else ""
    noises = args.noise or [0.0, 0.01]
    names = list(MODELS) if args.models == "all" else args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
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
        for minutes in args.minutes:
            for name in names:
                print(f"[{name}, noise {noise}] training for at most {minutes:g} min", flush=True)
                model = fit_for(name, x, y, minutes=minutes, batch_size=args.batch_size,
                                lr=args.lr, device=device, seed=args.seed)  # fmt: skip
                t0 = time.perf_counter()
                samples = model.sample(yt, n=args.samples, seed=args.seed)
                sample_s = time.perf_counter() - t0
                log_prob = model.log_prob(xt, yt) if model.has_density else None
                metrics = cei_metrics(samples, xt, yt, charges=(2, 2, 2), log_prob=log_prob)
                h = model.history_
                row = {
                    "model": name,
                    "noise": noise,
                    "minutes": minutes,
                    **metrics,
                    "epochs": h.epochs,
                    "best_epoch": h.best_epoch,
                    "train_s": h.seconds,
                    "samples_per_s": samples.shape[0] * samples.shape[1] / sample_s,
                    "hparams": model.hparams_,
                }
                rows.append(row)
                print(markdown_table("", COLUMNS, [row]).splitlines()[-1], flush=True)
                payload = {**env, "settings": vars(args) | {"out": str(args.out)}, "results": rows}
                payload["command"] = "python benchmarks/accuracy.py " + " ".join(
                    argv if argv is not None else sys.argv[1:]
                )
                write_results(args.out, args.stem, json.loads(json.dumps(payload, default=str)),
                              _table(env, args, rows))  # fmt: skip
                if len(args.minutes) > 1:
                    plot_budget(rows, args.out / f"{args.stem}.png")
                del model, samples
                torch.cuda.empty_cache() if device.type == "cuda" else None
    print(_table(env, args, rows))
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
