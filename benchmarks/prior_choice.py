"""Learned prior against the analytic OCS prior where a run uses them: solution choice and weights.

Usage:
    python benchmarks/prior_choice.py --minutes 8          # fit zuko-nsf on the built-in set
    python benchmarks/prior_choice.py --run runs/nsf       # an existing run of built-in data
    python benchmarks/prior_choice.py --quick

Fits (or takes) a run on the built-in CEI data (OCS sampler, 1 % momentum noise), whose
`fit` also learned ``prior.pt`` from the training geometries, then evaluates it twice with
each prior, `flowrecon.runs.evaluate_run` exactly as ``flowrecon evaluate`` does:

- Solution choice: ``--events`` fresh noise-free events of the same geometry law,
  ``--refine --refine-samples 8``: the fraction of events whose chosen exact solution is
  the truth (within 1e-5 bohr), of events with the truth among the solutions, and of events
  with several solutions, under ``--prior ocs`` and ``--prior learned``.
- Weights: the run's held-out test split (1 % noise), ``--weights --noise 0.01``: the
  weighted coverage_50 / coverage_90, weighted ade and effective sample size under each.

"Within statistics" is judged against the binomial standard error of each fraction over
events (coordinates of one event are correlated, so events are the independent unit).
Writes ``prior_choice.json`` / ``.md`` (``*_quick`` with --quick) in benchmarks/results.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from flowrecon.data import write_table  # noqa: E402
from flowrecon.runs import evaluate_run, fit_run  # noqa: E402
from flowrecon.system import make_system  # noqa: E402

CHOICE = (
    "refine_events_within_1e-5_bohr",
    "refine_events_truth_among_solutions",
    "refine_events_multiple_solutions",
    "refined_ade",
)
WEIGHTS = ("weighted_coverage_50", "weighted_coverage_90", "weighted_ade", "weights_ess_median")


def _se(p: float | None, n: int) -> float | None:
    return None if p is None else math.sqrt(max(p * (1 - p), 1.0 / n) / n)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="a run on the built-in CEI data")
    ap.add_argument("--model", default="zuko-nsf")
    ap.add_argument("--minutes", type=float, default=8.0, help="training budget of a new run")
    ap.add_argument("--events", type=int, default=4000, help="noise-free events to refine")
    ap.add_argument("--weighted-events", type=int, default=4000, help="test events weighed")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 min fit, 500 events each")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.minutes, args.events, args.weighted_events = 2.0, 500, 500
    tmp = Path(tempfile.mkdtemp(prefix="prior_choice_"))
    run_dir = args.run
    t0 = time.time()
    if run_dir is None:
        run_dir = tmp / "run"
        fit_run(args.model, run_dir, training={"max_minutes": args.minutes, "epochs": 10_000,
                "lr_schedule": "cosine", "patience": None}, seed=args.seed, quiet=True)  # fmt: skip
    fit_s = time.time() - t0
    clean = tmp / "clean.parquet"
    write_table(make_system("cei").simulate(args.events, seed=args.seed + 101), clean)
    rows: list[dict] = []
    for prior in ("ocs", "learned"):
        refine = {"refine": True, "refine_samples": 8, "prior": prior}
        weigh = {"weights": True, "noise": 0.01, "prior": prior}
        choice = evaluate_run(run_dir, clean, samples=args.samples, out=tmp / f"choice_{prior}",
                              options=refine, seed=args.seed)  # fmt: skip
        weighted = evaluate_run(run_dir, samples=args.samples, out=tmp / f"weights_{prior}",
                                max_events=args.weighted_events, seed=args.seed,
                                options=weigh)  # fmt: skip
        row = {"prior": prior}
        row.update({k: choice.metrics.get(k) for k in CHOICE})
        row.update({k: weighted.metrics.get(k) for k in WEIGHTS})
        rows.append(row)
        print(row, flush=True)
    n_choice, n_weighted = args.events, args.weighted_events
    diffs = {}
    for key, n in [(k, n_choice) for k in CHOICE[:3]] + [
        ("weighted_coverage_50", n_weighted),
        ("weighted_coverage_90", n_weighted),
    ]:
        a, b = rows[0][key], rows[1][key]
        se = _se(a, n)
        diffs[key] = {"ocs": a, "learned": b, "difference": b - a, "se": se,
                      "z": (b - a) / (math.sqrt(2) * se) if se else None}  # fmt: skip
    env = environment(torch.device("cpu"))
    env["load_average"] = os.getloadavg()
    payload = {
        "environment": env,
        "command": " ".join(["python", "benchmarks/prior_choice.py", *(argv or sys.argv[1:])]),
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "fit_s": fit_s},
        "rows": rows,
        "differences": diffs,
    }
    lines = [
        f"Learned vs analytic OCS prior, {env['date']}, {env['device_name']}, torch "
        f"{env['torch']}; run {'fitted here' if args.run is None else args.run} "
        f"({args.model}, {args.minutes:g} min); {args.events:,} noise-free events refined "
        f"(8 samples each), {args.weighted_events:,} noisy test events weighted.",
        "",
        "| quantity | ocs | learned | difference | z (paired SE) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, d in diffs.items():
        z = "n/a" if d["z"] is None else f"{d['z']:.2f}"
        lines.append(
            f"| {key} | {d['ocs']:.4f} | {d['learned']:.4f} | {d['difference']:+.4f} | {z} |"
        )
    stem = "prior_choice_quick" if args.quick else "prior_choice"
    write_results(args.out, stem, payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
