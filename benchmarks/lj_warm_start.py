"""How many Metropolis sweeps does a generator save? Warm starts against the lattice.

Usage:
    python benchmarks/lj_warm_start.py --model runs/lj/model.pt
    python benchmarks/lj_warm_start.py --model M.pt --draws 1000 --sweeps 0 2 5 10 20

A model of p(configuration | gamma, T) gets the density profile roughly right but puts
some pair of particles inside each other's core in almost every draw; Metropolis sweeps
at the draw's own condition separate such pairs within a few sweeps, while the profile,
structure on the scale of the box, relaxes over tau (tens of sweeps). Starting chains
from the model's draws should therefore reach the Boltzmann distribution in fewer sweeps
than starting them, as the sampler does, from a random subset of a lattice.

For each condition (the three-gamma set's gamma = 0.05, 0.25, 1.0 and the unseen 0.5,
T = 1.5), ``--draws`` chains start from the model's draws and as many from the lattice,
all run with the same per-chain step tuned during the first half of each leg
(`flowrecon.systems.lj.sampler.relax`), and after every checkpoint of ``--sweeps`` the
configurations are judged against held-out Monte Carlo by the evaluator's
`condition_metrics` on the generation targets: |U/N - MC| <= 0.05, density profile
within 10 % where it exceeds a tenth of its maximum, at most 1 % overlapping
configurations. The table gives each start's metrics at every checkpoint and the first
checkpoint at which all three hold ("sweeps to targets"); the ratio is the saving.

Writes ``lj_warm_start.json``, ``lj_warm_start.md`` and ``lj_warm_start.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402
from lj_generation import TARGETS, load_data  # noqa: E402

import flowrecon as fr  # noqa: E402
from flowrecon.systems.lj import make_system  # noqa: E402
from flowrecon.systems.lj.evaluation import condition_metrics  # noqa: E402
from flowrecon.systems.lj.geometry import canonical_order  # noqa: E402
from flowrecon.systems.lj.sampler import lattice_start, relax  # noqa: E402

N, DIM, BOX, TEMPERATURE = 30, 3, 5.0, 1.5
KEYS = ("energy_diff", "density_rel_error_max", "overlap_fraction", "height_rel_error")


def references(data_dir: Path, n_train: int) -> dict[float, np.ndarray]:
    """Held-out Monte Carlo ``(n, N, D)`` per gamma: the test chains of the set the model
    was trained on (`lj_generation.load_data`, split as there) and the unseen set."""
    table, unseen = load_data(data_dir, n_train)
    system = make_system()
    prepared = system.prepare(table)
    _, _, test = system.split(prepared, 0)
    cols = list(system.x_columns)
    out = {}
    for source in (prepared.iloc[test], system.prepare(unseen)):
        for gamma, group in source.groupby("gamma"):
            out[float(gamma)] = group[cols].to_numpy().reshape(-1, N, DIM)
    return dict(sorted(out.items()))


def starts(model, gamma: float, draws: int, seed: int) -> dict[str, np.ndarray]:
    """The model's draws at (gamma, T) and lattice starts, both ``(draws, N, D)``."""
    y = np.array([[gamma, TEMPERATURE]])
    gen = model.sample(y, n=draws, seed=seed).reshape(draws, N, DIM)
    lattice = lattice_start(draws, N, BOX, DIM, torch.Generator().manual_seed(seed))
    return {"model": np.clip(gen, 0.0, BOX), "lattice": lattice.permute(2, 0, 1).numpy()}


def passed(row: dict) -> bool:
    return (
        abs(row["energy_diff"]) <= TARGETS["energy"]
        and row["density_rel_error_max"] <= TARGETS["density"]
        and row["overlap_fraction"] <= TARGETS["overlap"]
    )


def legs(conf: np.ndarray, gamma: float, checkpoints: list[int], seed: int):
    """Yields (sweeps, configurations) at every checkpoint of one set of chains.

    Each leg between checkpoints tunes its steps in its first half from the previous
    leg's end; the chains carry their positions across legs.
    """
    done, cur = 0, conf
    for k in checkpoints:
        if k > done:
            cur, _ = relax(cur, gamma, TEMPERATURE, sweeps=k - done, box=BOX, seed=seed + k)
            done = k
        yield k, cur


def run_condition(
    model, gamma: float, mc: np.ndarray, draws: int, checkpoints: list[int], seed: int
) -> list[dict]:
    rows = []
    for start, conf in starts(model, gamma, draws, seed).items():
        t0 = time.perf_counter()
        for k, cur in legs(conf, gamma, checkpoints, seed):
            metrics, _ = condition_metrics(canonical_order(cur), mc, gamma, TEMPERATURE, BOX)
            row = {"gamma": gamma, "start": start, "sweeps": k}
            row.update({key: metrics[key] for key in KEYS})
            row["energy_gen"], row["energy_mc"] = metrics["energy_gen"], metrics["energy_mc"]
            row["passed"] = passed(row)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(
                f"gamma={gamma:g} {start:8s} sweeps={k:4d} dU/N={row['energy_diff']:+.3g} "
                f"rho={row['density_rel_error_max']:.1%} overlap={row['overlap_fraction']:.1%}"
                f"{'  passed' if row['passed'] else ''}",
                flush=True,
            )
    return rows


def sweeps_to_targets(rows: list[dict]) -> dict:
    """First checkpoint from which every later one passes, per (gamma, start)."""
    out: dict = {}
    for key in sorted({(r["gamma"], r["start"]) for r in rows}):
        mine = [r for r in rows if (r["gamma"], r["start"]) == key]
        first = None
        for r in reversed(mine):
            if not r["passed"]:
                break
            first = r["sweeps"]
        out[f"{key[0]:g}/{key[1]}"] = first
    return out


def report(result: dict) -> str:
    env, rows = result["environment"], result["rows"]
    lines = [
        f"LJ warm starts, N = {N}, L = {BOX:g}, T = {TEMPERATURE}; {env['date']}, "
        f"{env['device_name']}, torch {env['torch']}; model `{result['model']}`, "
        f"{result['draws']} chains a start and condition.",
        "",
        "Targets: |U/N - MC| <= 0.05, density error <= 10 % (bins above max/10), "
        "overlaps <= 1 %. Steps tuned per chain in the first half of every leg.",
        "",
        "| gamma | start | sweeps | U/N - MC | rho err | overlap | h err | passed |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['gamma']:g}{'*' if r['gamma'] not in result['trained'] else ''} | "
            f"{r['start']} | {r['sweeps']} | {r['energy_diff']:+.3f} | "
            f"{r['density_rel_error_max']:.1%} | {r['overlap_fraction']:.2%} | "
            f"{r['height_rel_error']:.1%} | {'yes' if r['passed'] else 'no'} |"
        )
    lines += [
        "",
        "`*`: unseen condition.",
        "",
        "| gamma | model: sweeps to targets | lattice: sweeps to targets |",
        "|---:|---:|---:|",
    ]
    to = result["sweeps_to_targets"]
    for g in sorted({r["gamma"] for r in rows}):
        cells = [to.get(f"{g:g}/{s}") for s in ("model", "lattice")]
        shown = [f"> {result['checkpoints'][-1]}" if c is None else str(c) for c in cells]
        lines.append(f"| {g:g} | {shown[0]} | {shown[1]} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gammas = sorted({r["gamma"] for r in rows})
    fig, axes = plt.subplots(3, len(gammas), figsize=(3.2 * len(gammas), 7.5), squeeze=False)
    limits = (TARGETS["energy"], TARGETS["density"], TARGETS["overlap"])
    labels = ("|U/N - MC|", "density error (max)", "overlapping fraction")
    for j, g in enumerate(gammas):
        for start, style in (("model", "o-"), ("lattice", "s--")):
            mine = [r for r in rows if r["gamma"] == g and r["start"] == start]
            k = np.array([max(r["sweeps"], 0.5) for r in mine])  # 0 sweeps drawn at 0.5
            values = (
                [abs(r["energy_diff"]) for r in mine],
                [r["density_rel_error_max"] for r in mine],
                [r["overlap_fraction"] for r in mine],
            )
            for i, v in enumerate(values):
                axes[i, j].plot(k, np.maximum(v, 1e-4), style, label=start, ms=3)
        for i in range(3):
            ax = axes[i, j]
            ax.axhline(limits[i], color="k", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylabel(labels[i] if j == 0 else "")
        axes[0, j].set_title(f"gamma = {g:g}")
        axes[-1, j].set_xlabel("Metropolis sweeps (0 drawn at 0.5)")
    axes[0, 0].legend()
    fig.suptitle("Model warm start vs lattice start (dotted: target; floored at 1e-4)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a saved flowrecon model")
    parser.add_argument("--draws", type=int, default=2000, help="chains a start and condition")
    parser.add_argument(
        "--sweeps", type=int, nargs="+", default=[0, 2, 5, 10, 20, 50, 100, 200, 400]
    )
    parser.add_argument("--gamma", type=float, nargs="+", default=None, help="conditions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path("benchmarks/results/lj_data"))
    parser.add_argument(
        "--n-train", type=int, default=30_000, help="the three-gamma set the model saw"
    )
    parser.add_argument("--stem", default="lj_warm_start")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file (save one with flowrecon fit)")
    torch.set_num_threads(args.threads)
    model = fr.load(args.model, device="cpu")
    mc = references(args.data_dir, args.n_train)
    gammas = args.gamma or list(mc)
    missing = [g for g in gammas if g not in mc]
    if missing:
        parser.error(f"no held-out Monte Carlo at gamma {missing}; have {sorted(mc)}")
    checkpoints = sorted(set(args.sweeps))
    t0 = time.perf_counter()
    rows = []
    for g in gammas:
        rows += run_condition(model, g, mc[g], args.draws, checkpoints, args.seed)
    result = {
        "environment": {**environment(torch.device("cpu")), "load": os.getloadavg()[0]},
        "model": str(args.model),
        "draws": args.draws,
        "checkpoints": checkpoints,
        "trained": [0.05, 0.25, 1.0],
        "rows": rows,
        "sweeps_to_targets": sweeps_to_targets(rows),
        "seconds": time.perf_counter() - t0,
    }
    table = report(result)
    write_results(args.out, args.stem, result, table)
    figure(rows, args.out / f"{args.stem}.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
