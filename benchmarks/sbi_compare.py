"""Side by side with sbi: flowrecon and sbi's NPE on the same events, budget and metrics.

Usage:
    pip install -e ".[bench]"                      # sbi is a benchmark dependency only
    python benchmarks/sbi_compare.py               # 200,000 events, 4 min a model
    python benchmarks/sbi_compare.py --quick       # 20,000 events, 15 s a model
    python benchmarks/sbi_compare.py --ours zuko-nsf,freia-cinn --sbi maf,zuko_nsf

For each momentum-noise level, simulates ``--n-train`` OCS events and ``--n-test``
separate held-out events. Every model gets exactly these training events and the same
wall-clock budget:

- flowrecon models are trained as in ``accuracy.py`` (85/15 train/validation split,
  cosine learning rate over the budget, best validation state restored);
- sbi's ``NPE`` is used the way its documentation shows, with its own defaults (batch
  200, learning rate 5e-4, z-scoring, 10 % validation) and only the density estimator
  chosen: ``maf`` (NPE's default) and ``zuko_nsf``. Its training loop has no time budget,
  so it is resumed one epoch at a time (``resume_training=True``) until the next epoch
  would overrun the budget; its early stopping is lengthened so that the budget, not a
  patience of 20 epochs, ends training, as for flowrecon.

Positions (theta) and momenta (x) go to sbi as they are (``--sbi-theta lab``, the
default): the 9 lab-frame coordinates of the three atoms with the centre of mass at the
origin, and the 9 momentum components. Three of those nine coordinates are fixed by the
centre of mass, which flowrecon's whitening finds and removes and sbi's z-scoring does
not; ``--sbi-theta relative`` instead hands sbi the 6 relative coordinates r_CO, r_CS
(a parametrisation the user would have to derive) and maps its samples back.
Posterior samples come from ``posterior.sample_batched`` of ``build_posterior()``. Both
sides are scored by `flowrecon.systems.cei.metrics.cei_metrics` in the same run. ``nll``
is left out for sbi: its density lives on all 9 coordinates, flowrecon's on the 6 that
are not fixed by the centre of mass, so the two numbers are not comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, fit_for, markdown_table, write_results  # noqa: E402

from flowrecon.base import resolve_device  # noqa: E402
from flowrecon.registry import MODELS, is_installed  # noqa: E402
from flowrecon.systems.cei.constants import MASSES  # noqa: E402
from flowrecon.systems.cei.geometry import simulate_events  # noqa: E402
from flowrecon.systems.cei.metrics import cei_metrics  # noqa: E402
from flowrecon.systems.cei.refine import _masses, _to_positions, _to_relative  # noqa: E402

COLUMNS = (
    "tool", "model", "noise", "ade", "ade_sample", "bond_error_co", "bond_error_cs",
    "angle_error_deg", "resim_residual", "coverage_50", "coverage_90", "epochs", "train_s",
    "samples_per_s",
)  # fmt: skip


class _NoTracker:
    """sbi's tracker protocol, doing nothing: no TensorBoard directory per run."""

    log_dir = None

    def log_metric(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, *args, **kwargs) -> None:
        pass

    def log_params(self, *args, **kwargs) -> None:
        pass

    def add_figure(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass


def train_sbi(
    estimator: str, theta: torch.Tensor, x: torch.Tensor, *, minutes: float, device: str
) -> tuple[object, dict]:
    """Train sbi's NPE for at most ``minutes``; returns the posterior and training facts."""
    from sbi.inference import NPE

    inference = NPE(
        density_estimator=estimator, device=device, tracker=_NoTracker(), show_progress_bars=False
    )
    inference.append_simulations(theta.float(), x.float())
    budget = 60.0 * minutes
    t0 = time.perf_counter()
    epoch, last = 0, 0.0
    # sbi prints a line per train() call that ends by its epoch limit; keep the log clean.
    with contextlib.redirect_stdout(io.StringIO()):
        while True:
            start = time.perf_counter()
            epoch += 1
            density = inference.train(
                max_num_epochs=epoch,
                resume_training=epoch > 1,
                stop_after_epochs=10**9,
            )
            last = time.perf_counter() - start
            elapsed = time.perf_counter() - t0
            if elapsed + last > budget:
                break
    seconds = time.perf_counter() - t0
    posterior = inference.build_posterior(density)
    facts = {
        "epochs": epoch,
        "train_s": seconds,
        "best_validation_loss": float(inference._summary["best_validation_loss"][-1]),
    }
    return posterior, facts


def to_relative(x: torch.Tensor) -> torch.Tensor:
    """(B, 9) positions -> (B, 6) relative coordinates r_CO = x_O - x_C, r_CS = x_S - x_C."""
    return _to_relative(x, _masses(MASSES, x))[0]


def from_relative(q: torch.Tensor) -> torch.Tensor:
    """(..., 6) relative coordinates -> (..., 9) positions with the centre of mass at 0."""
    flat = q.reshape(-1, 6)
    x = _to_positions(flat, torch.zeros_like(flat[:, :3]), _masses(MASSES, q))
    return x.reshape(*q.shape[:-1], 9)


def sample_sbi(posterior, y: torch.Tensor, n: int, chunk: int = 2000) -> torch.Tensor:
    """``(n, B, D)`` float64 posterior samples for every row of ``y``."""
    out = []
    for start in range(0, y.shape[0], chunk):
        s = posterior.sample_batched((n,), x=y[start : start + chunk].float(),
                                     show_progress_bars=False)  # fmt: skip
        out.append(s.double())
    return torch.cat(out, dim=1)


def _table(env: dict, args: argparse.Namespace, rows: list[dict]) -> str:
    import sbi

    head = (
        f"flowrecon against sbi {sbi.__version__}, {env['date']}, {env['device_name']}, "
        f"torch {env['torch']}; {args.n_train:,} training events, {args.n_test:,} held-out "
        f"events, {args.samples} posterior samples each, {args.minutes:g} min a model"
    )
    return markdown_table(head, COLUMNS, rows)


def verdict(rows: list[dict]) -> list[str]:
    """Per noise level: flowrecon's best against sbi's best on ade and calibration."""
    lines = []
    for noise in dict.fromkeys(r["noise"] for r in rows):
        here = [r for r in rows if r["noise"] == noise]
        ours = [r for r in here if r["tool"] == "flowrecon"]
        theirs = [r for r in here if r["tool"] == "sbi"]
        if not ours or not theirs:
            continue

        def calib(r: dict) -> float:
            return abs(r["coverage_90"] - 0.9)

        a, b = min(ours, key=lambda r: r["ade"]), min(theirs, key=lambda r: r["ade"])
        c, d = min(ours, key=calib), min(theirs, key=calib)
        # The nine coordinates of an event are covered or missed together, so the
        # statistical error of a coverage is about a binomial one over events.
        n_events = c.get("n_test") or 1
        err = (0.9 * 0.1 / n_events) ** 0.5
        lines.append(
            f"noise {noise:g}: best ade flowrecon {a['model']} {a['ade']:.4g} vs sbi "
            f"{b['model']} {b['ade']:.4g} ({'better' if a['ade'] < b['ade'] else 'WORSE'}); "
            f"best |coverage_90 - 0.9| flowrecon {c['model']} {calib(c):.3g} vs sbi "
            f"{d['model']} {calib(d):.3g} ({'better' if calib(c) < calib(d) else 'WORSE'}; "
            f"each coverage +-{err:.3f} statistically)"
        )
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", default="zuko-maf,zuko-nsf", help="flowrecon models")
    parser.add_argument("--sbi", default="maf,zuko_nsf", help="sbi NPE density estimators")
    parser.add_argument(
        "--sbi-theta", choices=["lab", "relative"], default="lab",
        help="what sbi gets as parameters: the 9 positions, or the 6 relative coordinates",
    )  # fmt: skip
    parser.add_argument("--n-train", type=int, default=200_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget a model")
    parser.add_argument("--batch-size", type=int, default=512, help="flowrecon's batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="flowrecon's learning rate")
    parser.add_argument("--noise", type=float, action="append", help="relative momentum noise")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="20k events, 15 s a model, into sbi_quick.*"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--stem", default="sbi")
    args = parser.parse_args(argv)
    try:
        import sbi  # noqa: F401
    except ImportError:
        parser.error("sbi is not installed: pip install -e '.[bench]' (or pip install sbi)")
    if args.quick:
        args.n_train, args.n_test = min(args.n_train, 20_000), min(args.n_test, 500)
        args.minutes, args.samples = min(args.minutes, 0.25), min(args.samples, 50)
        args.stem += "_quick" if args.stem == "sbi" else ""
    ours = [n for n in args.ours.split(",") if n]
    unknown = [n for n in ours if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    ours = [n for n in ours if is_installed(n)]
    theirs = [n for n in args.sbi.split(",") if n]
    noises = args.noise or [0.0, 0.01]
    device = resolve_device(args.device)
    env = environment(device)
    logging.getLogger("sbi").setLevel(logging.ERROR)
    # sbi warns after every one-epoch resume that training has not converged: expected.
    warnings.filterwarnings("ignore", module="sbi")
    warnings.filterwarnings("ignore", message=".*max_num_epochs.*")
    warnings.filterwarnings("ignore", message=".*max_sampling_batch_size.*")
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(markdown_table("", COLUMNS, [row]).splitlines()[-1], flush=True)
        payload = {**env, "settings": vars(args) | {"out": str(args.out)}, "results": rows}
        payload["command"] = "python benchmarks/sbi_compare.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        payload["verdict"] = verdict(rows)
        table = _table(env, args, rows) + "\n\n" + "\n".join(f"- {v}" for v in verdict(rows))
        write_results(args.out, args.stem, json.loads(json.dumps(payload, default=str)), table)

    for noise in noises:
        ev = simulate_events(
            args.n_train + args.n_test, seed=args.seed, momentum_noise=noise, device=device
        )
        x, y = ev.positions[: args.n_train], ev.momenta[: args.n_train]
        xt, yt = ev.positions[args.n_train :], ev.momenta[args.n_train :]
        for name in ours:
            print(f"[flowrecon {name}, noise {noise}] {args.minutes:g} min", flush=True)
            model = fit_for(name, x, y, minutes=args.minutes, batch_size=args.batch_size,
                            lr=args.lr, device=device, seed=args.seed)  # fmt: skip
            t0 = time.perf_counter()
            samples = model.sample(yt, n=args.samples, seed=args.seed)
            sample_s = time.perf_counter() - t0
            metrics = cei_metrics(samples, xt, yt, charges=(2, 2, 2))
            record({
                "tool": "flowrecon", "model": name, "noise": noise, **metrics,
                "n_test": args.n_test,
                "epochs": model.history_.epochs, "train_s": model.history_.seconds,
                "samples_per_s": samples.shape[0] * samples.shape[1] / sample_s,
            })  # fmt: skip
        for estimator in theirs:
            print(f"[sbi NPE {estimator}, noise {noise}] {args.minutes:g} min", flush=True)
            torch.manual_seed(args.seed)
            label = f"NPE {estimator}" + (" (relative)" if args.sbi_theta == "relative" else "")
            theta = torch.as_tensor(x)
            theta = to_relative(theta) if args.sbi_theta == "relative" else theta
            posterior, facts = train_sbi(
                estimator, theta, torch.as_tensor(y), minutes=args.minutes, device=str(device)
            )
            t0 = time.perf_counter()
            samples = sample_sbi(posterior, torch.as_tensor(yt, device=device), args.samples)
            sample_s = time.perf_counter() - t0
            samples = from_relative(samples) if args.sbi_theta == "relative" else samples
            metrics = cei_metrics(samples.cpu(), xt, yt, charges=(2, 2, 2))
            record({
                "tool": "sbi", "model": label, "noise": noise, **metrics, **facts,
                "n_test": args.n_test,
                "samples_per_s": samples.shape[0] * samples.shape[1] / sample_s,
            })  # fmt: skip
            # sbi's trainer keeps its data, optimiser and best state: free them before
            # the next model (a run of eight models otherwise ran out of memory).
            del posterior, samples
            gc.collect()
    print(_table(env, args, rows))
    print("\n".join(verdict(rows)))
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
