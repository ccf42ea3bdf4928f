"""Is generation right? Models of p(configuration | gamma, T) judged by the physics.

Usage:
    python benchmarks/lj_generation.py                  # 15 min a model
    python benchmarks/lj_generation.py --quick          # 3 min a model, fewer draws
    python benchmarks/lj_generation.py --models zuko-nsf --minutes 5

Data: the LJ system's built-in three-gamma set (N = 30, L = 5, gamma = 0.05, 0.25, 1.0,
T = 1.5; 30,000 Metropolis configurations, 10,000 a condition, or ``--n-train``) split
by chain 70/15/15, and 3,000 configurations at the unseen gamma = 0.5 (simulated once and
cached under ``--data-dir``). The training rows are taken with their images under the
box's 8 horizontal symmetries (the system's ``augment``; ``--no-augment`` leaves them out,
and the source study's raw cVAE never has them). Every model is fitted to the training
chains for at most ``--minutes``
of wall-clock time (Adam, cosine schedule, batch 512, best validation state kept; no
sampling-temperature calibration: the learned density itself is judged), then draws
``--draws`` configurations a condition, compared with the held-out test chains by the
system's evaluator (`flowrecon.systems.lj.evaluation`). Targets per condition:

- mean energy per particle U/N within 0.05 of Monte Carlo;
- density profile within 10 % wherever it exceeds a tenth of its maximum;
- at most 1 % of configurations with an overlapping pair (r < 0.8);
- after Boltzmann reweighting, the mean U/N within 3 standard errors (ESS reported);
- at the unseen gamma = 0.5, the mean height within 5 % of Monte Carlo.

Representations: ``box`` (default for the flows and the cVAE) = canonical order by
height plus the box transform (`flowrecon.systems.lj.transform`: each coordinate through
logit(c / L), so every draw is inside the box), then whitening; ``chamber`` (with
--ablation) = the heights stick-broken instead, so every draw is also in order, but the
model's errors compound into heights that are too high; ``ordered`` = canonical order
only; ``raw`` = the simulated particle labels, no transform: the source study's plain
VAE on raw coordinates, run as ``cvae-raw``.

Writes ``lj_generation.json`` and ``lj_generation.md`` (``*_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

import flowrecon as fr  # noqa: E402
from flowrecon.system import EvaluationContext  # noqa: E402
from flowrecon.systems.lj import make_system  # noqa: E402
from flowrecon.systems.lj.latent import ANOMALY_NOISE  # noqa: E402
from flowrecon.systems.lj.transform import (  # noqa: E402
    box_transform_name,
    chamber_transform_name,
)

#: Hyper-parameters for 90-dimensional configurations (defaults are sized for 9-D CEI).
SETTINGS: dict[str, dict] = {
    "zuko-nsf": {"transforms": 6, "hidden": 256},
    "zuko-maf": {"transforms": 6, "hidden": 256},
    "zuko-realnvp": {"transforms": 8, "hidden": 256},
    "freia-cinn": {"blocks": 12, "hidden": 256},
    "nflows-nsf": {},
    "nflows-maf": {},
    "cvae": {"hidden_dim": 128, "num_layers": 3, "latent_dim": 32},
    "particle-flow": {},
}

#: Preprocessing a model needs: the particle flow reads box coordinates as logit(c / L),
#: particle after particle, so it gets neither whitening nor scaling.
PREPROCESSING: dict[str, dict] = {"particle-flow": {"whitening": False, "x_scaler": "none"}}

#: Latent-map and anomaly metrics of the evaluator, reported per model (seen conditions).
MODEL_CHECKS = (
    "latent_dim",
    "latent_silhouette",
    "latent_silhouette_2pc",
    "anomaly_auc",
    "anomaly_auc_energy",
    "anomaly_energy_shift",
    "nll_labelled",
)

TARGETS = {
    "energy": 0.05,
    "density": 0.10,
    "overlap": 0.01,
    "reweighted_z": 3.0,
    "unseen_height": 0.05,
}


def load_data(data_dir: Path, n_train: int = 30_000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The three-gamma set and the unseen gamma = 0.5 set, simulated once and cached."""
    data_dir.mkdir(parents=True, exist_ok=True)
    name = f"lj_three_gamma_{n_train}_seed1.parquet"
    sets = {
        "train": (data_dir / name, {}, n_train, 1),
        "unseen": (data_dir / "lj_gamma0.5_3000_seed2.parquet", {"gamma": (0.5,)}, 3_000, 2),
    }
    out = []
    for path, options, n, seed in sets.values():
        if not path.is_file():
            print(f"simulating {n} configurations into {path} ...", flush=True)
            make_system(**options).simulate(n, seed=seed, device="cpu").to_parquet(path)
        out.append(pd.read_parquet(path))
    return out[0], out[1]


#: Models whose draws take one network pass, so that physics terms on draws are cheap.
ONE_PASS = ("zuko-realnvp", "freia-cinn", "freia-allinone", "cvae")


def plan(models: list[str], ablation: bool, physics: float) -> list[dict]:
    runs = [{"label": m, "model": m, "representation": "box"} for m in models]
    if physics > 0:
        for run in runs:
            if run["model"] in ONE_PASS:
                run["physics"] = physics
                run["label"] += f" + overlap x{physics:g}"
    if ablation:  # the first model through the chamber transform, and with no transform
        for representation in ("chamber", "ordered"):
            runs.append(
                {
                    "label": f"{models[0]} ({representation})",
                    "model": models[0],
                    "representation": representation,
                }
            )
    runs.append({"label": "cvae-raw (source study)", "model": "cvae", "representation": "raw"})
    return runs


def fit(
    run: dict,
    table: pd.DataFrame,
    minutes: float,
    seed: int,
    saved: Path | None = None,
    augment: bool = True,
    hparams: dict | None = None,
) -> tuple[object, dict]:
    """Fits the run's model, or loads ``saved`` (a model this script saved) instead."""
    # The source study trained on its configurations as simulated: no symmetric copies.
    raw = run["representation"] == "raw"
    system = make_system(order="none" if raw else "height", augment=augment and not raw)
    prepared = system.prepare(table)
    train, val, test = system.split(prepared, seed)
    if saved is not None:
        model = fr.load(saved, device="cpu")
        if not system.fit_options.get("support", True):
            model.support_ = None  # as fitted now: only non-finite draws are redrawn
        h = model.history_
        info = {"fit_seconds": h.seconds, "fit_cpu_seconds": math.nan, "epochs": h.epochs}
        info["best_val"] = float(min(h.val.get("loss", [math.nan]) or [math.nan]))
        info.update(train_rows=len(train), test_rows=len(test), loaded=str(saved))
        return model, {"system": system, "prepared": prepared, "test": test, **info}
    transform = {
        "box": box_transform_name(3, 5.0),
        "chamber": chamber_transform_name(3, 5.0),
    }.get(run["representation"], "none")
    xcols, ycols = list(system.x_columns), list(system.y_columns)
    x, y = prepared[xcols].to_numpy(), prepared[ycols].to_numpy()
    model = fr.make(
        run["model"],
        **{**SETTINGS.get(run["model"], {}), **(hparams or {})},
        **PREPROCESSING.get(run["model"], {}),
        transform=transform,
        device="cpu",
        seed=seed,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    extra = {}
    if run.get("physics"):
        extra = {
            "physics_loss": system.physics_loss(),
            "physics_weights": {"overlap": run["physics"]},
        }
    x_train, y_train = x[train], y[train]
    if system.augment is not None:  # the box's horizontal symmetries, training rows only
        x_train, y_train = system.augment(x_train, y_train)
    model.fit(
        x_train,
        y_train,
        x[val],
        y[val],
        **extra,
        epochs=100_000,
        batch_size=512,
        lr=1e-3,
        lr_schedule="cosine",
        patience=0,
        max_minutes=minutes,
        quiet=True,
        **system.fit_options,  # no calibrated temperature, no condition density
    )
    info = {
        "fit_seconds": time.perf_counter() - t0,
        "fit_cpu_seconds": time.process_time() - c0,
        "epochs": model.history_.epochs,
        "best_val": float(min(model.history_.val.get("loss", [math.nan]) or [math.nan])),
        "train_rows": len(train),
        "augmented_rows": len(x_train),
        "test_rows": len(test),
    }
    return model, {"system": system, "prepared": prepared, "test": test, **info}


def evaluate(
    model, system, table: pd.DataFrame, rows: np.ndarray, draws: int, seed: int, relax: int
) -> list[dict]:
    """The system's evaluator on ``rows`` with about ``draws`` draws a condition.

    The same draws feed one evaluator of the raw draws and, with ``relax`` > 0, one of
    the draws after ``relax`` Metropolis sweeps.
    """
    xcols, ycols = list(system.x_columns), list(system.y_columns)
    x, y = table[xcols].to_numpy()[rows], table[ycols].to_numpy()[rows]
    per_condition = pd.Series(1, index=pd.MultiIndex.from_arrays(y.T)).groupby(level=[0, 1]).size()
    n = max(1, math.ceil(draws / per_condition.min()))
    context = EvaluationContext(model, x, y, samples=n, seed=seed, config={})
    options = [{}] + ([{"relax_sweeps": relax}] if relax else [])
    evaluators = [
        system.evaluator(
            context, max_per_condition=draws, reweight_samples=min(draws, 5000), **extra
        )
        for extra in options
    ]
    chunk = max(1, 4096 // n)
    t0 = time.perf_counter()
    for start in range(0, len(x), chunk):
        stop = min(start + chunk, len(x))
        draws_ = model.sample(y[start:stop], n=n, seed=seed + start)
        for ev in evaluators:
            ev.update(start, stop, draws_)
    sample_seconds = time.perf_counter() - t0
    out = []
    for ev in evaluators:
        t0 = time.perf_counter()
        metrics = ev.finish(np.zeros_like(x))
        metrics["sample_seconds"] = sample_seconds
        metrics["finish_seconds"] = time.perf_counter() - t0
        metrics["evaluator"] = ev
        out.append(metrics)
    return out


def judge(row: dict, unseen: bool) -> dict:
    checks = {
        "energy": abs(row["energy_diff"]) <= TARGETS["energy"],
        "density": row["density_rel_error_max"] <= TARGETS["density"],
        "overlap": row["overlap_fraction"] <= TARGETS["overlap"],
    }
    if "ess" in row:  # models with a density; too few effective samples fail the check
        z = row["reweighted_z"]
        checks["reweighted"] = math.isfinite(z) and abs(z) <= TARGETS["reweighted_z"]
    if unseen:
        checks["unseen_height"] = row["height_rel_error"] <= TARGETS["unseen_height"]
    return checks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["zuko-nsf", "zuko-maf", "freia-cinn", "cvae"]
    )
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget a model")
    parser.add_argument(
        "--budget",
        nargs="+",
        default=[],
        metavar="MODEL=MIN",
        help="other budgets by model name (raw: the source study's cVAE), e.g. cvae=5 raw=5",
    )
    parser.add_argument("--draws", type=int, default=5000, help="draws a condition")
    parser.add_argument(
        "--ar-draws", type=int, default=1000, help="draws a condition, autoregressive flows"
    )
    parser.add_argument(
        "--relax", type=int, default=0, help="also judge draws after this many MC sweeps"
    )
    parser.add_argument(
        "--ablation", action="store_true", help="also the first model without the transform"
    )
    parser.add_argument("--no-raw", action="store_true", help="skip the source study's cVAE")
    parser.add_argument(
        "--physics",
        type=float,
        default=0.0,
        help="weight of the overlap term (one-pass models only; 0: maximum likelihood only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path("benchmarks/results/lj_data"))
    parser.add_argument("--figures", type=Path, default=None, help="write figures here")
    parser.add_argument("--stem", default=None, help="result file name [lj_generation(_quick)]")
    parser.add_argument("--save-models", type=Path, default=None, help="save fitted models here")
    parser.add_argument(
        "--load-models", type=Path, default=None, help="evaluate models saved here, no fitting"
    )
    parser.add_argument(
        "--n-train", type=int, default=30_000, help="configurations in the three-gamma set"
    )
    parser.add_argument(
        "--no-augment",
        action="store_true",
        help="train without the box's symmetric copies of the configurations",
    )
    parser.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyper-parameter of the fitted models (not the source study's cVAE)",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.draws = min(args.minutes, 3.0), min(args.draws, 2000)
    torch.set_num_threads(args.threads)
    table, unseen = load_data(args.data_dir, args.n_train)
    runs = plan(args.models, args.ablation, args.physics)
    if args.no_raw:
        runs = [r for r in runs if r["representation"] != "raw"]
    budgets = dict(_budget(b) for b in args.budget)
    results = []
    for run in runs:
        key = "raw" if run["representation"] == "raw" else run["model"]
        minutes = min(budgets.get(key, args.minutes), args.minutes)
        load = os.getloadavg()
        print(f"== {run['label']}: fitting for {minutes} min (load {load[0]:.2f})", flush=True)
        saved = None
        if args.load_models is not None:
            saved = args.load_models / f"{run['label'].split(' ')[0]}.pt"
            print(f"   loading {saved} instead of fitting", flush=True)
        hparams = {} if run["representation"] == "raw" else dict(_pair(h) for h in args.hparam)
        model, info = fit(
            run, table, minutes, args.seed, saved, augment=not args.no_augment, hparams=hparams
        )
        info.update(minutes=minutes, load_before=load, load_after_fit=os.getloadavg())
        if args.save_models is not None:
            args.save_models.mkdir(parents=True, exist_ok=True)
            model.save(args.save_models / f"{run['label'].split(' ')[0]}.pt")
        system, prepared = info.pop("system"), info.pop("prepared")
        test = info.pop("test")
        draws = args.draws if run["model"] in ONE_PASS else min(args.draws, args.ar_draws)
        seen = evaluate(model, system, prepared, test, draws, args.seed, args.relax)
        unseen_table = system.prepare(unseen)
        new = evaluate(
            model,
            system,
            unseen_table,
            np.arange(len(unseen_table)),
            draws,
            args.seed,
            args.relax,
        )
        for variant, (seen_m, new_m) in enumerate(zip(seen, new)):
            suffix = f" + {args.relax} MC sweeps" if variant else ""
            if args.figures is not None:
                label = run["label"].split(" ")[0] + ("-relaxed" if variant else "")
                seen_m["evaluator"].figures(args.figures / label, [], None)
            rows = []
            for row, is_unseen in [(r, False) for r in seen_m["conditions"]] + [
                (r, True) for r in new_m["conditions"]
            ]:
                checks = judge(row, is_unseen)
                rows.append(
                    {**row, "unseen": is_unseen, "checks": checks, "passed": all(checks.values())}
                )
            result = {
                **run,
                **info,
                "label": run["label"] + suffix,
                "relax_sweeps": args.relax if variant else 0,
                "draws_per_condition": draws,
                "conditions": rows,
                "sample_seconds": seen_m["sample_seconds"] + new_m["sample_seconds"],
                "model_checks": {k: seen_m.get(k) for k in MODEL_CHECKS if k in seen_m},
            }
            results.append(result)
            print(f"  {result['label']}:", flush=True)
            for r in rows:
                print(
                    f"  gamma={r['gamma']:g}{' (unseen)' if r['unseen'] else ''}: U/N "
                    f"{r['energy_gen']:.3f} vs {r['energy_mc']:.3f}, rho err "
                    f"{r['density_rel_error_max']:.1%}, overlap {r['overlap_fraction']:.2%}, "
                    f"ESS {r.get('ess', math.nan):.1f} ({r.get('ess_fraction', math.nan):.2%}), "
                    f"z_rew {r.get('reweighted_z', math.nan):+.2f}, h {r['height_gen']:.3f} vs "
                    f"{r['height_mc']:.3f} -> {'PASS' if r['passed'] else 'fail'} "
                    f"{[k for k, v in r['checks'].items() if not v]}",
                    flush=True,
                )
        del model
        gc.collect()
    env = environment(torch.device("cpu"))
    payload = {
        "environment": env,
        "command": " ".join(["python", "benchmarks/lj_generation.py", *(argv or sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": TARGETS,
        "hparams": SETTINGS,
        "results": results,
    }
    text = report(results, args, env)
    stem = args.stem or ("lj_generation_quick" if args.quick else "lj_generation")
    write_results(args.out, stem, payload, text)
    print(text)
    return payload


def _budget(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--budget takes MODEL=MINUTES, got {text!r}")
    return name, float(value)


def _pair(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--hparam``; the registry parses the value by its annotation."""
    name, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--hparam takes KEY=VALUE, got {text!r}")
    return name, value


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def report(results: list[dict], args: argparse.Namespace, env: dict) -> str:
    lines = [
        f"LJ generation, N = 30, L = 5, T = 1.5; {env['date']}, {env['device_name']}, "
        f"torch {env['torch']}; at most {args.minutes} min of training a model, "
        f"{args.draws} draws a condition.",
        "",
        "Targets: |U/N - MC| <= 0.05, density error <= 10 % (bins above max/10), overlaps "
        "<= 1 %, reweighted U/N within 3 standard errors, unseen gamma = 0.5 mean height "
        "within 5 %.",
        "",
        "| model | repr. | epochs | gamma | U/N gen | U/N MC | rho err | overlap | outside "
        "| ESS | U/N rew. | z | h gen | h MC | passed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        for r in res["conditions"]:
            failed = [k for k, v in r["checks"].items() if not v]
            lines.append(
                f"| {res['label']} | {res['representation']} | {res['epochs']} | "
                f"{r['gamma']:g}{'*' if r['unseen'] else ''} | {_fmt(r['energy_gen'], '.3f')} | "
                f"{r['energy_mc']:.3f} | {_fmt(r['density_rel_error_max'], '.1%')} | "
                f"{r['overlap_fraction']:.2%} | {r['outside_fraction']:.2%} | "
                f"{_fmt(r.get('ess'), '.1f')} | {_fmt(r.get('reweighted_energy'), '.3f')} ± "
                f"{_fmt(r.get('reweighted_energy_se'), '.3f')} | "
                f"{_fmt(r.get('reweighted_z'), '+.1f')} | "
                f"{r['height_gen']:.3f} | {r['height_mc']:.3f} | "
                f"{'yes' if r['passed'] else 'no: ' + ', '.join(failed)} |"
            )
    lines += ["", "`*`: unseen condition (not in the training data).", ""]
    lines += [
        "| model | budget (min) | fit wall (s) | fit CPU (s) | load before / after fit | "
        "best val loss | latent silhouette (2 PC) | anomaly AUC | AUC of U/T |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for res in results:
        if res.get("relax_sweeps"):
            continue
        c = res.get("model_checks", {})
        load = f"{res['load_before'][0]:.2f} / {res['load_after_fit'][0]:.2f}"
        lines.append(
            f"| {res['label']} | {res['minutes']:g} | {res['fit_seconds']:.0f} | "
            f"{res['fit_cpu_seconds']:.0f} | {load} | {_fmt(res['best_val'], '.2f')} | "
            f"{_fmt(c.get('latent_silhouette'), '.3f')} "
            f"({_fmt(c.get('latent_silhouette_2pc'), '.3f')}) | "
            f"{_fmt(c.get('anomaly_auc'), '.3f')} | {_fmt(c.get('anomaly_auc_energy'), '.3f')} |"
        )
    lines += [
        "",
        "Load: 1-minute load average of the 2-core machine (other work shares it). "
        f"Perturbed configurations for the AUCs: every coordinate displaced by "
        f"N(0, {ANOMALY_NOISE} sigma), reflected into the box, re-sorted.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
