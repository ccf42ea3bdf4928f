"""cVAE calibration benchmark: does the Gaussian decoder carry the posterior width?

Usage:
    python benchmarks/cvae_calibration.py --quick          # a few minutes
    OMP_NUM_THREADS=1 python benchmarks/cvae_calibration.py --minutes 4

Data: simulated OCS events with 1 % momentum noise (`simulate_events(...,
momentum_noise=0.01)`): ``--train`` events (85/15 train/validation) and ``--test``
held-out events. Every model gets the same budget and recipe as the accuracy benchmark
(cosine schedule over ``--minutes``, no early stopping, calibrated on the validation
split): the cVAE with its Gaussian decoder (the default), the seed decks' deterministic
decoder (``decoder="deterministic"``) for comparison, and the flows named by ``--flows``.

Reported per model on the test events with ``--samples`` posterior samples each:
``ade`` (mean over events and atoms of the distance between the posterior mean and the
truth, bohr), ``coverage_90`` and ``coverage_50`` (fraction of true coordinates inside
the central intervals) at the calibrated temperature, ``coverage_90_t1`` at temperature 1
(what the decoder gives by itself), the temperature and whether calibration converged,
and ``ade_vs_best_flow`` = ade / the smallest flow ade.

Targets (issue 10): the Gaussian cVAE's coverage_90 in 0.87-0.93 and its ade within 10 %
of the best flow's.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's flowrecon
from _common import SETTINGS, environment, markdown_table, write_results  # noqa: E402

import flowrecon as fr  # noqa: E402
from flowrecon.base import resolve_device  # noqa: E402
from flowrecon.evaluation.metrics import central_interval_coverage  # noqa: E402
from flowrecon.systems.cei.geometry import simulate_events  # noqa: E402

COLUMNS = (
    "model", "decoder", "epochs", "train_s", "ade", "ade_vs_best_flow", "coverage_90",
    "coverage_50", "coverage_90_t1", "temperature", "calibration_converged",
)  # fmt: skip


def fit(name: str, hparams: dict, x, y, args, device) -> tuple[fr.ConditionalGenerator, float]:
    """The accuracy benchmark's recipe (see `_common.fit_for`), with extra hyper-parameters."""
    model = fr.make(name, **{**SETTINGS.get(name, {}), **hparams}, device=str(device), seed=0)
    t = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x, y, epochs=100_000, batch_size=args.batch_size, lr=args.lr, lr_schedule="cosine",
            patience=0, max_minutes=args.minutes, quiet=True,
        )  # fmt: skip
    for w in caught:
        print(f"  warning: {w.message}", flush=True)
    return model, time.time() - t


def measure(model: fr.ConditionalGenerator, x: np.ndarray, y: np.ndarray, n: int) -> dict:
    """ade, coverages at the calibrated temperature and at 1."""
    draws = model.sample(y, n=n, seed=1)
    mean = draws.mean(0)
    ade = float(np.linalg.norm((mean - x).reshape(-1, 3, 3), axis=-1).mean())
    plain = model.sample(y, n=n, seed=1, temperature=1.0)
    record = model.calibration_ or {}
    return {
        "ade": ade,
        "coverage_90": central_interval_coverage(draws, x, 0.9),
        "coverage_50": central_interval_coverage(draws, x, 0.5),
        "coverage_90_t1": central_interval_coverage(plain, x, 0.9),
        "temperature": model.temperature_,
        "calibration_converged": record.get("converged"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="50,000 events, 1 minute a model")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--train", type=int, default=200_000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--flows", default="zuko-maf,zuko-realnvp", help="comma-separated flows")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--stem", default="cvae_calibration")
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.train, args.test = 1.0, 50_000, 1000
        args.stem = args.stem if args.stem != "cvae_calibration" else "cvae_calibration_quick"
    device = resolve_device(args.device)
    ev = simulate_events(args.train + args.test, seed=0, momentum_noise=0.01, device=device)
    x, y = ev.positions[: args.train], ev.momenta[: args.train]
    x_te, y_te = ev.positions[args.train :], ev.momenta[args.train :]

    env = environment(device)
    payload = {
        "environment": env,
        "command": " ".join(sys.argv),
        "settings": vars(args),
        "rows": [],
    }
    rows = payload["rows"]
    runs = [("cvae", {"decoder": "gaussian"}), ("cvae", {"decoder": "deterministic"})]
    runs += [(f.strip(), {}) for f in args.flows.split(",") if f.strip()]
    out = Path(__file__).resolve().parent / "results"
    for name, hparams in runs:
        print(f"{name} {hparams}", flush=True)
        model, seconds = fit(name, hparams, x, y, args, device)
        row = {"model": name, "decoder": hparams.get("decoder", "")}
        row.update(epochs=model.history_.epochs, train_s=seconds)
        row.update(measure(model, x_te, y_te, args.samples))
        rows.append(row)
        flows = [r["ade"] for r in rows if r["model"] != "cvae"]
        for r in rows:
            r["ade_vs_best_flow"] = r["ade"] / min(flows) if flows else None
        print({k: row.get(k) for k in COLUMNS}, flush=True)
        head = (
            f"cVAE calibration, {env['date']}, {env['device_name']}, torch {env['torch']}; "
            f"OCS with 1 % momentum noise, {args.train:,} training events (85/15), "
            f"{args.test:,} test events x {args.samples} samples, {args.minutes:g} min a model"
        )
        write_results(out, args.stem, payload, markdown_table(head, COLUMNS, rows))


if __name__ == "__main__":
    main()
