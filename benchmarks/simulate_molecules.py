"""Molecule simulator benchmark: accuracy of every preset and events per second.

Usage:
    python benchmarks/simulate_molecules.py                  # all presets, 100 reference events
    python benchmarks/simulate_molecules.py --quick          # 20 reference events, short timing
    OMP_NUM_THREADS=2 python benchmarks/simulate_molecules.py --threads 2 --speed-only

Accuracy: for every preset and both operating points (``high``: float64, ``fast``:
float32 on a coarse grid) the simulator's momenta against scipy's DOP853 in plain time
(rtol 1e-12, to t = 1e12 a.u., where even the slow I-I pair of CH2I2 keeps less than
1e-9 of the energy as potential): median and maximum of the per-event relative error
(largest per-atom momentum error over the largest atom momentum); energy closure
|KE - PE| / PE and total momentum over every timed event. Speed: events per second of
the compiled CPU path (``torch.compile``; its first compilation is timed separately as
warm-up) with ``--threads`` torch threads, for OCS and the five-atom presets by default
(three-atom molecules all run OCS's planar integrator). Writes ``simulate_molecules.json``
and ``.md`` (``*_quick`` with ``--quick``; speed-only runs add ``_t{threads}``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

# This checkout's flowrecon, not an installed one: the script's own folder comes first
# on sys.path, not the working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from flowrecon.systems.cei.geometry import sample_molecule  # noqa: E402
from flowrecon.systems.cei.molecule import load_molecule, preset_names  # noqa: E402
from flowrecon.systems.cei.nbody import default_settings, molecule_momenta  # noqa: E402
from flowrecon.systems.cei.physics import (  # noqa: E402
    coulomb_potential,
    kinetic_energy,
    total_momentum,
)
from flowrecon.systems.cei.reference import reference_momenta  # noqa: E402

T_REFERENCE = 1e12
SPEED_PRESETS = ("ocs", "ch2i2", "chbrclf")


def relative_error(p: np.ndarray, ref: np.ndarray, n_atoms: int) -> np.ndarray:
    """Per event: largest per-atom momentum error over the largest atom momentum."""
    a = np.asarray(p, dtype=float).reshape(-1, n_atoms, 3)
    b = np.asarray(ref, dtype=float).reshape(-1, n_atoms, 3)
    return np.linalg.norm(a - b, axis=-1).max(1) / np.linalg.norm(b, axis=-1).max(1)


def accuracy(name: str, events: int, accuracies: list[str]) -> dict:
    """Errors of each operating point against the reference on ``events`` geometries."""
    m = load_molecule(name)
    x = sample_molecule(m, events, torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    ref = reference_momenta(x.numpy(), None, m.charges, m.masses, t_end=T_REFERENCE)
    out = {"reference_seconds": time.perf_counter() - t0}
    for acc in accuracies:
        err = relative_error(molecule_momenta(x, m, accuracy=acc, compile=False), ref, m.n_atoms)
        out[acc] = {"median": float(np.median(err)), "max": float(err.max())}
    return out


def speed(name: str, n: int, accuracy_mode: str, chunk: int) -> dict:
    """Compiled events per second (warm-up timed apart) and conservation on those events."""
    m = load_molecule(name)
    x = sample_molecule(m, n, torch.Generator().manual_seed(0))
    dtype = torch.float32 if accuracy_mode == "fast" else torch.float64
    settings = default_settings(m.masses, m.charges, accuracy_mode)
    kwargs = {"settings": settings, "compile": True}
    if m.n_atoms != 3:
        kwargs["chunk_size"] = chunk
    run = _runner(m, kwargs)
    # Warm up on a batch that compiles the same chunk shape as the timed run.
    warm = chunk if m.n_atoms != 3 else min(n, 1 << 16)
    t0 = time.perf_counter()
    run(x[:warm].to(dtype))
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = run(x.to(dtype))
    seconds = time.perf_counter() - t0
    p = p.double()
    pe = coulomb_potential(x, m.charges)
    closure = ((kinetic_energy(p, m.masses) - pe).abs() / pe).numpy()
    return {
        "events": n,
        "dtype": str(dtype).replace("torch.", ""),
        "settings": settings.__dict__,
        "warmup_s": warmup,
        "seconds": seconds,
        "events_per_s": n / seconds,
        "closure_median": float(np.median(closure)),
        "closure_max": float(closure.max()),
        "total_momentum_max_rel": float(total_momentum(p).abs().max() / p.abs().max()),
    }


def _runner(m, kwargs):
    from flowrecon.systems.cei.nbody import explode
    from flowrecon.systems.cei.simulator import asymptotic_momenta

    if m.n_atoms == 3:
        return lambda x: asymptotic_momenta(
            x, charges=m.charges, masses=m.masses, chunk_size=1 << 16, **kwargs
        )
    return lambda x: explode(x, masses=m.masses, charges=m.charges, **kwargs)


def _table(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"Molecule simulator, {env['date']}, {env['device_name']}, torch {env['torch']}, "
        f"{result['threads']} thread(s); load average before: {result['load_before']}",
        "",
    ]
    if result["accuracy"]:
        lines += [
            f"Accuracy against DOP853 (rtol 1e-12, t = 1e12 a.u.), "
            f"{result['reference_events']} events a preset:",
            "",
            "| preset | atoms | high median | high max | fast median | fast max |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, acc in result["accuracy"].items():
            hi, fa = acc.get("high", {}), acc.get("fast", {})
            lines.append(
                f"| {name} | {acc['atoms']} | {hi.get('median', float('nan')):.1e} "
                f"| {hi.get('max', float('nan')):.1e} | {fa.get('median', float('nan')):.1e} "
                f"| {fa.get('max', float('nan')):.1e} |"
            )
        lines.append("")
    if result["speed"]:
        lines += [
            "Compiled CPU path (torch.compile), warm-up timed apart:",
            "",
            "| preset | atoms | accuracy | dtype | steps | events | events/s | warm-up s "
            "| closure median | closure max | total momentum |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in result["speed"]:
            lines.append(
                f"| {row['preset']} | {row['atoms']} | {row['accuracy']} | {row['dtype']} "
                f"| {row['settings']['steps']} | {row['events']:,} | {row['events_per_s']:,.0f} "
                f"| {row['warmup_s']:.0f} | {row['closure_median']:.1e} "
                f"| {row['closure_max']:.1e} | {row['total_momentum_max_rel']:.1e} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=None, help="default: all")
    parser.add_argument("--speed-presets", nargs="*", default=list(SPEED_PRESETS))
    parser.add_argument("--reference-events", type=int, default=100)
    parser.add_argument("--n", type=int, default=1 << 18, help="events to time")
    parser.add_argument("--chunk-size", type=int, default=1 << 13)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accuracy", nargs="*", default=["high", "fast"])
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--accuracy-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="20 reference events, 32k timed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.reference_events, args.n = min(args.reference_events, 20), min(args.n, 1 << 15)
    torch.set_num_threads(args.threads)
    presets = args.presets or preset_names()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    result = {
        "environment": environment(torch.device("cpu")),
        "threads": args.threads,
        "load_before": load_before,
        "reference_events": args.reference_events,
        "accuracy": {},
        "speed": [],
        "command": "python benchmarks/simulate_molecules.py " + " ".join(argv or sys.argv[1:]),
    }
    if not args.speed_only:
        for name in presets:
            acc = accuracy(name, args.reference_events, args.accuracy)
            acc["atoms"] = load_molecule(name).n_atoms
            result["accuracy"][name] = acc
            print(name, {k: v for k, v in acc.items() if k in args.accuracy}, flush=True)
    if not args.accuracy_only:
        for name in args.speed_presets:
            for acc in args.accuracy:
                row = speed(name, args.n, acc, args.chunk_size)
                row.update(preset=name, atoms=load_molecule(name).n_atoms, accuracy=acc)
                result["speed"].append(row)
                print(f"{name} {acc}: {row['events_per_s']:,.0f} events/s", flush=True)
    result["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    table = _table(result) + f"\n\nLoad average after: {result['load_after']}"
    print(table)
    stem = "simulate_molecules" + ("_quick" if args.quick else "")
    if args.speed_only:
        stem += f"_speed_t{args.threads}"
    elif args.accuracy_only:
        stem += "_accuracy"
    write_results(args.out, stem, result, table)
    return result


if __name__ == "__main__":
    main()
