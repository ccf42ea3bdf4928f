"""Accuracy per molecule: a model trained on each preset's simulated events, same budget.

Usage:
    python benchmarks/molecules_accuracy.py                  # every preset, 0 and 1 % noise,
                                                             # 200,000 events, 15 min a model
    python benchmarks/molecules_accuracy.py --molecules co2,so2,chbrclf --noise 0 --minutes 3
    python benchmarks/molecules_accuracy.py --quick          # pipeline check, seconds a model

For each molecule (`flowrecon molecules`) and momentum-noise level, the CEI system of that
molecule (`flowrecon.systems.cei.make_system(molecule=...)`) simulates ``--n-train``
events (85 % train, 15 % validation) and ``--n-test`` separate held-out events (another
seed), in the canonical order of identical atoms; the model is trained in the system's
own momentum frame for at most ``--minutes`` (cosine learning-rate schedule over the
budget, best validation state restored), draws ``--samples`` posterior samples per
held-out event from the momenta alone, and is scored with
`flowrecon.systems.cei.metrics.cei_metrics` for that molecule: ``ade``, its median and
95th percentile over events, ``coverage_90``, the mean bond and angle errors, energy
difference, re-simulation residual and, for CHBrClF, the fraction of events (posterior
mean) and of single draws with the right handedness. Results are written after every
model to ``molecules_accuracy.json``/``.md`` in ``--out``.

With ``--refine K`` every noise-free model's first K samples (and their mean) are refined
through the molecule's simulator (`flowrecon.systems.cei.refine.refine_posterior`, 3N - 3
relative coordinates), with the training events as a start bank and the learned prior
(`flowrecon.learned_prior`, fitted on the training geometries) choosing among several
exact solutions. Reported: the fraction of events whose truth is among the solutions
(every atom within 1e-5 bohr), the fraction whose chosen solution is the truth, the
refined ``ade`` and, for CHBrClF, the handedness of the chosen solutions.
"""

from __future__ import annotations

import argparse
import json
import os
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
from flowrecon.evaluation.metrics import robust_summary  # noqa: E402
from flowrecon.systems.cei.metrics import cei_metrics  # noqa: E402
from flowrecon.systems.cei.molecule import load_molecule, preset_names  # noqa: E402
from flowrecon.systems.cei.system import make_system, mean_atom_distance  # noqa: E402

COLUMNS = (
    "molecule", "atoms", "noise", "model", "minutes", "ade", "ade_median", "ade_p95",
    "coverage_90", "bond_error", "angle_error_deg", "handedness_right",
    "handedness_right_sample", "energy_diff", "resim_residual", "epochs", "train_s",
    "refine_truth_among_solutions", "refine_chosen_is_truth", "refined_ade",
    "refined_handedness_right", "refine_s",
)  # fmt: skip


def _table(env: dict, args: argparse.Namespace, rows: list[dict]) -> str:
    head = (
        f"Accuracy per molecule, {env['date']}, {env['device_name']}, torch {env['torch']}; "
        f"{args.n_train:,} simulated events (85/15 train/val), {args.n_test:,} held-out "
        f"events, {args.samples} posterior samples each, at most {args.minutes:g} min a model"
    )
    return markdown_table(head, COLUMNS, rows)


def evaluate_molecule(
    name: str, noise: float, model_name: str, args: argparse.Namespace, device: torch.device
) -> dict:
    """Simulate, train and score one model on one molecule at one noise level."""
    system = make_system(molecule=name, momentum_noise=noise)
    m = load_molecule(name)
    # Training budgets are wall-clock: the load of a shared machine is part of the result.
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    train = system.simulate(args.n_train, seed=args.seed, device=str(device))
    test = system.simulate(args.n_test, seed=args.seed + 1, device=str(device))
    simulate_s = time.perf_counter() - t0
    xc, yc = list(system.x_columns), list(system.y_columns)
    x, y = train[xc].to_numpy(), train[yc].to_numpy()
    xt, yt = test[xc].to_numpy(), test[yc].to_numpy()
    print(f"[{name}, noise {noise:g}, {model_name}] simulated {len(x) + len(xt):,} events in "
          f"{simulate_s:.1f} s; training for at most {args.minutes:g} min", flush=True)  # fmt: skip
    model = fit_for(model_name, x, y, minutes=args.minutes, batch_size=args.batch_size,
                    lr=args.lr, device=device, seed=args.seed, transform=system.transform,
                    hparams=_hparams(model_name, args.hparam))  # fmt: skip
    samples = np.asarray(model.sample(yt, n=args.samples, seed=args.seed))
    metrics = cei_metrics(
        samples, xt, yt, charges=m.charges, molecule=m, resim_max_events=args.n_test
    )
    robust = robust_summary(mean_atom_distance(samples.mean(0), xt), system.failure_threshold)
    refined = {}
    if args.refine and noise == 0:
        refined = refine_metrics(system, m, samples[: args.refine], x, y, xt, yt, args.seed)
    h = model.history_
    return {
        "molecule": name,
        "atoms": m.n_atoms,
        "noise": noise,
        "model": model_name,
        "minutes": args.minutes,
        **metrics,
        "ade_median": robust["median"],
        "ade_p95": robust["p95"],
        "failure_rate": robust["failure_rate"],
        "epochs": h.epochs,
        "best_epoch": h.best_epoch,
        "train_s": h.seconds,
        "simulate_s": simulate_s,
        "transform": system.transform,
        "hparams": model.hparams_,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        **refined,
    }


def _hparams(model_name: str, pairs: list[str] | None) -> dict:
    """``--hparam KEY=VALUE`` options, checked and typed against ``model_name``."""
    from flowrecon.registry import coerce_hparams

    bad = [p for p in pairs or [] if "=" not in p]
    if bad:
        raise ValueError(f"--hparam takes KEY=VALUE, got {bad[0]!r}")
    return coerce_hparams(model_name, dict(p.split("=", 1) for p in pairs or []))


def refine_metrics(system, molecule, samples, x, y, xt, yt, seed: int) -> dict:
    """Refine noise-free posterior samples through the simulator; how often is the truth found?

    The training events (``x``, ``y``) serve as the start bank and fit the learned prior
    that chooses among several exact solutions, as in a run's ``evaluate --refine``.
    """
    from flowrecon.learned_prior import fit_prior, log_prior
    from flowrecon.systems.cei.refine import StartBank, refine_posterior

    t0 = time.perf_counter()
    prior = log_prior(system, fit_prior(system, x, device="cpu", seed=seed))
    prior_s = time.perf_counter() - t0
    bank = StartBank(x, y, molecule.masses, molecule.frame)
    refined = refine_posterior(
        samples, yt, charges=molecule.charges, masses=molecule.masses, log_prior=prior, bank=bank
    )
    point = cei_metrics(refined.best[None], xt, yt, charges=molecule.charges, molecule=molecule,
                        resimulate=False)  # fmt: skip
    nearest = refined.nearest_solution_error(xt)
    return {
        "refine_samples": int(samples.shape[0]),
        "refine_truth_among_solutions": float((nearest <= 1e-5).mean()),
        "refine_chosen_is_truth": float((refined.atom_error(xt) <= 1e-5).mean()),
        "refine_events_with_solution": float((refined.n_solutions > 0).mean()),
        "refine_events_multiple_solutions": float((refined.n_solutions > 1).mean()),
        "refine_converged_fraction": float(refined.converged.mean()),
        "refined_ade": point["ade"],
        "refined_ade_median": float(np.median(mean_atom_distance(refined.best, xt))),
        "refined_handedness_right": point.get("handedness_right"),
        "refine_s": refined.seconds,
        "prior_s": prior_s,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", default="all", help="comma-separated presets, or all")
    parser.add_argument("--models", default="zuko-nsf", help="comma-separated model names")
    add_run_arguments(parser)
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget a model")
    parser.add_argument(
        "--hparam", action="append", metavar="KEY=VALUE", help="model hyper-parameter (repeat)"
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="co2 and chbrclf, 5,000 events, 200 test events, 0.1 min a model; "
        "results go to molecules_accuracy_quick files",
    )  # fmt: skip
    parser.add_argument(
        "--refine", type=int, default=0, metavar="K",
        help="refine K samples an event of every noise-free model (0: no refinement)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--stem", default=None, help="default molecules_accuracy[_quick]")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test = min(args.n_train, 5_000), min(args.n_test, 200)
        args.minutes, args.samples = min(args.minutes, 0.1), min(args.samples, 20)
        if args.molecules == "all":
            args.molecules = "co2,chbrclf"
    stem = args.stem or ("molecules_accuracy_quick" if args.quick else "molecules_accuracy")
    names = preset_names() if args.molecules == "all" else args.molecules.split(",")
    unknown = [n for n in names if n not in preset_names()]
    if unknown:
        parser.error(f"unknown molecule(s) {', '.join(unknown)}; presets: {preset_names()}")
    device = resolve_device(args.device)
    env = environment(device)
    rows: list[dict] = []
    for noise in args.noise or [0.0, 0.01]:
        for name in names:
            for model_name in args.models.split(","):
                row = evaluate_molecule(name, noise, model_name, args, device)
                rows.append(row)
                print(markdown_table("", COLUMNS, [row]).splitlines()[-1], flush=True)
                payload = {**env, "settings": vars(args) | {"out": str(args.out)}, "results": rows}
                payload["command"] = "python benchmarks/molecules_accuracy.py " + " ".join(
                    argv if argv is not None else sys.argv[1:]
                )
                write_results(args.out, stem, json.loads(json.dumps(payload, default=str)),
                              _table(env, args, rows))  # fmt: skip
                torch.cuda.empty_cache() if device.type == "cuda" else None
    print(_table(env, args, rows))
    return rows


if __name__ == "__main__":
    main()
