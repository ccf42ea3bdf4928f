"""Simulator benchmark: events per second, and accuracy against an independent reference.

Usage:
    python benchmarks/simulate.py                 # 1,000,000 OCS events on CPU (or CUDA)
    python benchmarks/simulate.py --quick         # 100,000 events, 50 reference events
    python benchmarks/simulate.py --device cuda --n 10000000

Prints events/s and writes ``simulate.json`` and ``simulate.md`` into ``--out``. The
warm-up (``torch.compile`` on CPU, kernel caches on CUDA) is timed separately from the
measured run. Accuracy: the fast simulator against scipy's DOP853 in plain time to
t = 1e10 a.u. (rtol 1e-12), on OCS and ball geometries; energy closure
|KE_final - PE_initial| / PE_initial and total momentum over every simulated event.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from flowrecon.base import resolve_device  # noqa: E402
from flowrecon.systems.cei.geometry import sample_ball, sample_ocs  # noqa: E402
from flowrecon.systems.cei.physics import (  # noqa: E402
    coulomb_potential,
    kinetic_energy,
    total_momentum,
)
from flowrecon.systems.cei.reference import reference_momenta  # noqa: E402
from flowrecon.systems.cei.simulator import IntegratorSettings, asymptotic_momenta  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(p: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per event: largest per-ion momentum error over the largest ion momentum."""
    a, b = p.reshape(-1, 3, 3), ref.reshape(-1, 3, 3)
    return np.linalg.norm(a - b, axis=-1).max(1) / np.linalg.norm(b, axis=-1).max(1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="events to time")
    parser.add_argument("--reference-events", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--chunk-size", type=int, default=1 << 20)
    parser.add_argument("--quick", action="store_true", help="100,000 events, 50 reference")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.reference_events = min(args.n, 100_000), min(args.reference_events, 50)

    device = resolve_device(args.device)
    compile_flag = {"auto": None, "on": True, "off": False}[args.compile]
    if compile_flag is None:
        compile_flag = device.type == "cpu"
    settings = IntegratorSettings()
    gen = torch.Generator().manual_seed(0)
    x = sample_ocs(args.n, gen).to(device)

    # Warm-up on one chunk of the same shape: compiles (CPU) or loads kernels (CUDA).
    warm = x[: min(args.n, args.chunk_size)]
    _sync(device)
    t0 = time.perf_counter()
    asymptotic_momenta(warm, chunk_size=args.chunk_size, compile=compile_flag)
    _sync(device)
    warmup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    p = asymptotic_momenta(x, chunk_size=args.chunk_size, compile=compile_flag)
    _sync(device)
    elapsed = time.perf_counter() - t0
    rate = args.n / elapsed

    pe = coulomb_potential(x)
    closure = ((kinetic_energy(p) - pe).abs() / pe).cpu().numpy()
    p_scale = p.abs().max().item()
    total_p = total_momentum(p).abs().max().item() / p_scale

    accuracy = {}
    for name, sampler in (("ocs", sample_ocs), ("ball", sample_ball)):
        xr = sampler(args.reference_events, torch.Generator().manual_seed(1))
        err = relative_error(
            asymptotic_momenta(xr.to(device)).cpu().numpy(), reference_momenta(xr.numpy())
        )
        accuracy[name] = {"median": float(np.median(err)), "max": float(err.max())}

    env = environment(device)
    result = {
        **env,
        "events": args.n,
        "compile": bool(compile_flag),
        "chunk_size": args.chunk_size,
        "settings": settings.__dict__,
        "warmup_s": warmup_s,
        "seconds": elapsed,
        "events_per_s": rate,
        "energy_closure_median": float(np.median(closure)),
        "energy_closure_max": float(closure.max()),
        "total_momentum_max_rel": total_p,
        "reference_events_per_geometry": args.reference_events,
        "accuracy_vs_reference": accuracy,
        "command": "python benchmarks/simulate.py " + " ".join(argv or sys.argv[1:]),
    }
    table = "\n".join(
        [
            f"Simulator, {env['date']}, {env['device_name']}, torch {env['torch']}, "
            f"compile={result['compile']}",
            "",
            "| events | seconds | events/s | warm-up s | closure median | closure max "
            "| ref. median (ocs/ball) | ref. max (ocs/ball) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {args.n:,} | {elapsed:.2f} | {rate:,.0f} | {warmup_s:.1f} "
            f"| {np.median(closure):.1e} | {closure.max():.1e} "
            f"| {accuracy['ocs']['median']:.1e} / {accuracy['ball']['median']:.1e} "
            f"| {accuracy['ocs']['max']:.1e} / {accuracy['ball']['max']:.1e} |",
        ]
    )
    print(table)
    stem = "simulate" if device.type == "cpu" else "simulate_cuda"
    write_results(args.out, stem, result, table)
    return result


if __name__ == "__main__":
    main()
