"""Side by side: flowrecon's simulator and a compiled C++ SIMD Coulomb-explosion integrator.

Usage:
    python benchmarks/simulate_compare.py --cpp /path/to/ce_driver          # OCS
    python benchmarks/simulate_compare.py --cpp /path/to/ce_driver --molecule chbrclf
    python benchmarks/simulate_compare.py --quick                            # flowrecon only

The C++ side is nathan-albin/coulomb-explosion's batched lockstep Dormand-Prince 5(4)
(``BatchedRK45<T>``: one SIMD lane an explosion, Highway, ``-march=native``), called by a
small driver program built outside this repository; this script only runs the binary it
is given. Its interface: ``DRIVER --input IN --output OUT --precision f32|f64 --rtol R
--atol A --pe-stop P --reps K``, where IN holds int64 events, int64 atoms, float64 masses
and charges, then float64 positions (events x atoms x 3, bohr); OUT receives float64
momenta in the same layout, and the driver prints one JSON line whose ``seconds`` is its
best time over K passes (input and output excluded).

Both sides get the same geometries and run on one thread (torch threads = 1; the C++
driver is single-threaded). Accuracy of every operating point is measured against scipy's
DOP853 (rtol 1e-12, t = 1e12 a.u.) on the first ``--reference-events`` geometries. The
runs are interleaved over ``--rounds`` rounds and the best time of each point is kept, so
that a busy machine slows both sides alike. A C++ point *matches* a flowrecon point when
its median error is at most twice flowrecon's; the ratio is flowrecon's rate over the
fastest matching C++ rate. Writes ``simulate_compare[_MOLECULE].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
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
from flowrecon.systems.cei.molecule import load_molecule  # noqa: E402
from flowrecon.systems.cei.nbody import default_settings, explode  # noqa: E402
from flowrecon.systems.cei.reference import reference_momenta  # noqa: E402
from flowrecon.systems.cei.simulator import asymptotic_momenta  # noqa: E402

#: flowrecon operating points: (dtype, accuracy mode, steps, shift of sigma_end). The
#: modes' own grids (steps None) come from ``default_settings`` and depend on the molecule;
#: the variants change the steps (and grid end) of the mode's grid. For three atoms the
#: last is the earlier ``fast`` grid (20 steps to sigma = 7).
FLOWRECON_POINTS = [
    ("float64", "high", None, 0.0),
    ("float64", "high", 40, 0.0),
    ("float32", "fast", None, 0.0),
    ("float32", "fast", 16, 0.0),
    ("float32", "fast", 20, 1.0),
]


def _point_name(dtype: str, accuracy: str, settings, variant: bool) -> str:
    """``fast (f32, 12 steps)`` for a mode's own grid, ``f32, 16 steps to sigma 6.0`` else."""
    point = f"{'f64' if dtype == 'float64' else 'f32'}, {settings.steps} steps"
    if variant:
        return f"{point} to sigma {settings.sigma_end:.1f}"
    return f"{accuracy} ({point})"


#: C++ operating points: (precision, rtol, atol, pe_stop). The f64 default and the f32
#: production point are the C++ project's own (its ADR 0004); the others bracket them.
CPP_POINTS = [
    ("f64", 1e-6, 1e-8, 1e-7),
    ("f64", 1e-8, 1e-10, 1e-9),
    ("f64", 1e-9, 1e-11, 1e-10),
    ("f64", 1e-10, 1e-12, 1e-11),
    ("f32", 1e-3, 1e-6, 1e-4),
    ("f32", 1e-4, 1e-7, 1e-5),
    ("f32", 1e-5, 1e-8, 1e-6),
]


def relative_error(p: np.ndarray, ref: np.ndarray, n_atoms: int) -> np.ndarray:
    """Per event: largest per-atom momentum error over the largest atom momentum."""
    a = np.asarray(p, dtype=float).reshape(-1, n_atoms, 3)
    b = np.asarray(ref, dtype=float).reshape(-1, n_atoms, 3)
    return np.linalg.norm(a - b, axis=-1).max(1) / np.linalg.norm(b, axis=-1).max(1)


def _flowrecon_runner(molecule, dtype: str, accuracy: str, steps: int | None, shift: float):
    m = molecule
    settings = default_settings(m.masses, m.charges, accuracy)
    if steps is not None:
        settings = dataclasses.replace(settings, steps=steps, sigma_end=settings.sigma_end + shift)
    torch_dtype = getattr(torch, dtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch_dtype)
        if m.n_atoms == 3:
            return asymptotic_momenta(
                x, charges=m.charges, masses=m.masses, settings=settings, compile=True,
                chunk_size=1 << 16,
            )  # fmt: skip
        return explode(
            x, masses=m.masses, charges=m.charges, settings=settings, compile=True,
            chunk_size=1 << 13,
        )  # fmt: skip

    return run, settings


def time_flowrecon(run, x: torch.Tensor, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run(x)
        best = min(best, time.perf_counter() - t0)
    return best


def run_cpp(binary: Path, workdir: Path, point: tuple, reps: int, n_events: int, n_atoms: int):
    precision, rtol, atol, pe_stop = point
    out = workdir / "momenta.bin"
    cmd = [
        str(binary), "--input", str(workdir / "input.bin"), "--output", str(out),
        "--precision", precision, "--rtol", repr(rtol), "--atol", repr(atol),
        "--pe-stop", repr(pe_stop), "--reps", str(reps),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    info = json.loads(done.stdout.strip().splitlines()[-1])
    momenta = np.fromfile(out, dtype=np.float64).reshape(n_events, 3 * n_atoms)
    return info["seconds"], momenta


def write_input(path: Path, molecule, x: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.array([x.shape[0], molecule.n_atoms], dtype=np.int64).tofile(f)
        np.asarray(molecule.masses, dtype=np.float64).tofile(f)
        np.asarray(molecule.charges, dtype=np.float64).tofile(f)
        np.ascontiguousarray(x, dtype=np.float64).tofile(f)


def _table(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"{result['molecule']} ({result['atoms']} atoms), {result['events']:,} events, one thread "
        f"each, {env['date']}, {env['device_name']}, torch {env['torch']}; load average "
        f"before/after: {result['load_before']} / {result['load_after']}",
        "",
        "| code | operating point | events/s | median rel. error | max rel. error |",
        "|---|---|---:|---:|---:|",
    ]
    for row in result["points"]:
        lines.append(
            f"| {row['code']} | {row['point']} | {row['events_per_s']:,.0f} "
            f"| {row['median_error']:.1e} | {row['max_error']:.1e} |"
        )
    if result["matches"]:
        lines += ["", "| flowrecon point | matching C++ point | speed ratio |", "|---|---|---:|"]
        for m in result["matches"]:
            cpp = m["cpp_point"] or "none reaches that accuracy"
            ratio = f"{m['ratio']:.2f}x" if m["ratio"] else "-"
            lines.append(f"| {m['flowrecon_point']} | {cpp} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpp", type=Path, default=None, help="the C++ driver binary")
    parser.add_argument("--molecule", default="ocs")
    parser.add_argument("--n", type=int, default=1 << 18, help="events timed")
    parser.add_argument("--reference-events", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="32k events, 20 reference, 1 round")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.reference_events, args.rounds = 1 << 15, 20, 1
    torch.set_num_threads(1)
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    m = load_molecule(args.molecule)
    x = sample_molecule(m, args.n, torch.Generator().manual_seed(0))
    ref = reference_momenta(
        x[: args.reference_events].numpy(), None, m.charges, m.masses, t_end=1e12
    )

    def accuracy(p) -> tuple[float, float]:
        err = relative_error(np.asarray(p, dtype=float)[: args.reference_events], ref, m.n_atoms)
        return float(np.median(err)), float(err.max())

    runners = {}
    for dtype, mode, steps, shift in FLOWRECON_POINTS:
        own = default_settings(m.masses, m.charges, mode)
        if steps == own.steps and shift == 0:
            continue  # a variant that is the mode's own grid
        run, settings = _flowrecon_runner(m, dtype, mode, steps, shift)
        runners[_point_name(dtype, mode, settings, steps is not None)] = (run, settings)
    warmup = {}
    for name, (run, _) in runners.items():  # compile every point before any timing
        t0 = time.perf_counter()
        run(x[: 1 << 16])
        warmup[name] = time.perf_counter() - t0
    best: dict[str, float] = {}
    outputs: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.cpp is not None:
            write_input(workdir / "input.bin", m, x.numpy())
        for _ in range(args.rounds):
            for name, (run, _) in runners.items():
                best[name] = min(best.get(name, np.inf), time_flowrecon(run, x, args.reps))
                outputs[name] = run(x[: args.reference_events]).double().numpy()
            if args.cpp is None:
                continue
            for point in CPP_POINTS:
                key = f"{point[0]}, rtol {point[1]:g}, atol {point[2]:g}, pe_stop {point[3]:g}"
                seconds, momenta = run_cpp(args.cpp, workdir, point, args.reps, args.n, m.n_atoms)
                best[key] = min(best.get(key, np.inf), seconds)
                outputs[key] = momenta

    points = []
    for name in best:
        med, mx = accuracy(outputs[name])
        code = "flowrecon" if name in runners else "C++ coulomb-explosion"
        row = {"code": code, "point": name, "seconds": best[name]}
        row.update(events_per_s=args.n / best[name], median_error=med, max_error=mx)
        if name in runners:
            row.update(warmup_s=warmup[name], settings=runners[name][1].__dict__)
        points.append(row)
    matches = []
    if args.cpp is not None:
        cpp_rows = [r for r in points if r["code"] != "flowrecon"]
        for row in (r for r in points if r["code"] == "flowrecon"):
            ok = [c for c in cpp_rows if c["median_error"] <= 2 * row["median_error"]]
            fastest = max(ok, key=lambda c: c["events_per_s"]) if ok else None
            matches.append(
                {
                    "flowrecon_point": row["point"],
                    "cpp_point": fastest["point"] if fastest else None,
                    "ratio": row["events_per_s"] / fastest["events_per_s"] if fastest else None,
                }
            )
    result = {
        "environment": environment(torch.device("cpu")),
        "molecule": m.name,
        "atoms": m.n_atoms,
        "events": args.n,
        "reference_events": args.reference_events,
        "rounds": args.rounds,
        "reps": args.reps,
        "cpp_binary": None if args.cpp is None else str(args.cpp),
        "load_before": load_before,
        "load_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "points": points,
        "matches": matches,
        "command": "python benchmarks/simulate_compare.py " + " ".join(argv or sys.argv[1:]),
    }
    table = _table(result)
    print(table)
    stem = "simulate_compare" + ("" if m.name == "ocs" else f"_{m.name}")
    write_results(args.out, stem + ("_quick" if args.quick else ""), result, table)
    return result


if __name__ == "__main__":
    main()
