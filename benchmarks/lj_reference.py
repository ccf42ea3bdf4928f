"""Is the Metropolis sampler right? Its averages against Langevin molecular dynamics.

Usage:
    python benchmarks/lj_reference.py             # four conditions, MD at dt 0.002 and 0.001
    python benchmarks/lj_reference.py --quick     # fewer chains/replicas, shorter runs

For N = 30 particles in the closed box L = 5 at (gamma, T) = (0.05, 1.5), (0.25, 1.5),
(1.0, 1.5) and (0.25, 3.0), the mean Lennard-Jones energy per particle and the mean
height from `run_metropolis` are compared with those of BAOAB Langevin dynamics with
hard reflecting walls (`flowrecon.systems.lj.md`), an independent algorithm sampling the
same Boltzmann distribution. Standard errors: both methods run many independent
replicas (Monte Carlo chains, MD boxes), so the error of a mean is the spread of the
replicas' own time averages over sqrt(replicas), valid whatever the autocorrelation
within a replica (each replica's equilibration is discarded first; for MD it is checked
on the replica-averaged energy trace with Chodera's rule). MD runs at two time steps to
show its time-step error is below the statistical one; the verdict uses the smaller.

Writes ``lj_reference.json`` and ``lj_reference.md`` (``*_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from flowrecon.systems.lj.md import LangevinMD  # noqa: E402
from flowrecon.systems.lj.physics import heights, lj_energy  # noqa: E402
from flowrecon.systems.lj.sampler import run_metropolis  # noqa: E402
from flowrecon.systems.lj.stats import batch_means_error, detect_equilibration  # noqa: E402

CONDITIONS = ((0.05, 1.5), (0.25, 1.5), (1.0, 1.5), (0.25, 3.0))


def monte_carlo(args: argparse.Namespace) -> list[dict]:
    t0 = time.perf_counter()
    run = run_metropolis(
        CONDITIONS,
        chains=args.chains,
        samples=args.samples,
        seed=args.seed,
        device="cpu",
        compile=True,
        thin=1.0,
    )
    seconds = time.perf_counter() - t0
    rows = []
    for r, pos in zip(run.reports, run.positions):
        lj = lj_energy(pos) / 30  # (saved, chains)
        h = heights(pos).mean(-1)
        rows.append(
            {
                "gamma": r.gamma,
                "temperature": r.temperature,
                "mc_lj": float(lj.mean()),
                "mc_lj_se": batch_means_error(lj.mean(0)),
                "mc_height": float(h.mean()),
                "mc_height_se": batch_means_error(h.mean(0)),
                "mc_chains": r.chains,
                "mc_tau_sweeps": r.tau,
                "mc_thin": r.thin,
                "mc_acceptance": r.acceptance,
                "mc_ess": r.ess,
            }
        )
    print(f"Monte Carlo: {run.moves:.3g} moves in {seconds:.0f} s", flush=True)
    return rows


def molecular_dynamics(gamma: float, temp: float, dt: float, args: argparse.Namespace) -> dict:
    md = LangevinMD(
        gamma, temp, replicas=args.replicas, friction=1.0, seed=args.seed + 1, compile=True
    )
    every = max(1, round(0.05 / dt))  # observe every 0.05 time units
    lj_trace: list[np.ndarray] = []
    h_trace: list[np.ndarray] = []

    def observe(m: LangevinMD) -> None:
        lj_trace.append((m.lj_energy() / 30).cpu().numpy())
        h_trace.append(m.positions[..., -1].mean(1).cpu().numpy())

    t0 = time.perf_counter()
    md.run(round(args.md_time / dt), dt, every=every, observe=observe)
    seconds = time.perf_counter() - t0
    lj, h = np.asarray(lj_trace), np.asarray(h_trace)  # (observations, replicas)
    start, _, _ = detect_equilibration(lj.mean(1), stride=max(1, len(lj) // 200))
    start = max(start, round(args.md_equilibration / (every * dt)))
    if start > len(lj) // 2:
        print(f"  warning: MD equilibrated late ({start} of {len(lj)} observations)")
    lj, h = lj[start:], h[start:]
    return {
        f"md_lj_{dt}": float(lj.mean()),
        f"md_lj_se_{dt}": batch_means_error(lj.mean(0)),
        f"md_height_{dt}": float(h.mean()),
        f"md_height_se_{dt}": batch_means_error(h.mean(0)),
        f"md_discarded_time_{dt}": start * every * dt,
        f"md_seconds_{dt}": seconds,
    }


def verdict(row: dict, dt: float) -> None:
    for key in ("lj", "height"):
        diff = row[f"mc_{key}"] - row[f"md_{key}_{dt}"]
        err = math.hypot(row[f"mc_{key}_se"], row[f"md_{key}_se_{dt}"])
        row[f"z_{key}_{dt}"] = diff / err


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=1024, help="MC chains per condition")
    parser.add_argument("--samples", type=int, default=40, help="MC samples per chain")
    parser.add_argument("--replicas", type=int, default=256, help="MD boxes per condition")
    parser.add_argument("--md-time", type=float, default=60.0, help="MD time per box")
    parser.add_argument("--md-equilibration", type=float, default=10.0)
    parser.add_argument("--dt", type=float, nargs="+", default=[0.002, 0.001])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.chains, args.samples, args.replicas = 256, 10, 64
        args.md_time, args.md_equilibration, args.dt = 15.0, 5.0, [0.002]
    torch.set_num_threads(args.threads)

    rows = monte_carlo(args)
    for row in rows:
        for dt in args.dt:
            row.update(molecular_dynamics(row["gamma"], row["temperature"], dt, args))
            verdict(row, dt)
            print(
                f"gamma={row['gamma']}, T={row['temperature']}, dt={dt}: "
                f"LJ/N MC {row['mc_lj']:.4f}+-{row['mc_lj_se']:.4f} "
                f"MD {row[f'md_lj_{dt}']:.4f}+-{row[f'md_lj_se_{dt}']:.4f} "
                f"(z={row[f'z_lj_{dt}']:+.2f}); height MC {row['mc_height']:.4f}"
                f"+-{row['mc_height_se']:.4f} MD {row[f'md_height_{dt}']:.4f}"
                f"+-{row[f'md_height_se_{dt}']:.4f} (z={row[f'z_height_{dt}']:+.2f})",
                flush=True,
            )
    final = min(args.dt)
    passed = all(abs(r[f"z_{k}_{final}"]) < 3 for r in rows for k in ("lj", "height"))
    env = environment(torch.device("cpu"))
    payload = {
        "environment": env,
        "command": " ".join(["python", "benchmarks/lj_reference.py", *(argv or sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "passed": passed,
    }
    lines = [
        f"Metropolis vs Langevin MD, N = 30, L = 5; {env['date']}, {env['device_name']}, "
        f"torch {env['torch']}",
        "",
        f"MC: {args.chains} chains x {args.samples} samples a condition; MD: {args.replicas} "
        f"boxes x {args.md_time} time units (friction 1), dt = {', '.join(map(str, args.dt))}. "
        "Errors: one standard error from independent replicas.",
        "",
        "| gamma | T | dt | LJ/N MC | LJ/N MD | z | height MC | height MD | z |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for dt in args.dt:
            lines.append(
                f"| {r['gamma']} | {r['temperature']} | {dt} | {r['mc_lj']:.4f} ± "
                f"{r['mc_lj_se']:.4f} | {r[f'md_lj_{dt}']:.4f} ± {r[f'md_lj_se_{dt}']:.4f} | "
                f"{r[f'z_lj_{dt}']:+.2f} | {r['mc_height']:.4f} ± {r['mc_height_se']:.4f} | "
                f"{r[f'md_height_{dt}']:.4f} ± {r[f'md_height_se_{dt}']:.4f} | "
                f"{r[f'z_height_{dt}']:+.2f} |"
            )
    lines += [
        "",
        f"Verdict (dt = {final}): {'all' if passed else 'NOT all'} |z| < 3.",
    ]
    write_results(
        args.out, "lj_reference_quick" if args.quick else "lj_reference", payload, "\n".join(lines)
    )
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
