"""Throughput of the batched Metropolis sampler, and the diagnostics of a full run.

Usage:
    python benchmarks/lj_sampler.py                  # CPU: threads 1 and 2, several batches
    python benchmarks/lj_sampler.py --quick          # fewer settings, shorter timings
    python benchmarks/lj_sampler.py --device cuda    # the CUDA figure

Part 1 times attempted single-particle moves per second for N = 30, L = 5: all chains
in one tensor, a quarter of them at each of (gamma, T) = (0.05, 1.5), (0.25, 1.5),
(1.0, 1.5), (0.25, 3.0), with step sizes as tuned for these conditions (acceptance near
0.4), after a warm-up that includes compilation. Each setting is timed ``--repeats``
times; the best and the median are reported, since the machine is shared (the load
average and the CPU time other processes took during the timing are recorded).

Part 2 runs the whole protocol (`run_metropolis`: tuning, equilibration, a preliminary
run for tau, thinned production) on the three-gamma data set and reports acceptance,
tau, thinning and effective sample size per condition, and the end-to-end rate.

Writes ``lj_sampler.json`` and ``lj_sampler.md`` (``*_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from flowrecon.base import resolve_device  # noqa: E402
from flowrecon.systems.lj.sampler import LJChains, run_metropolis  # noqa: E402

CONDITIONS = ((0.05, 1.5), (0.25, 1.5), (1.0, 1.5), (0.25, 3.0))
#: Step sizes the tuning finds for these conditions (acceptance ~0.4), so that the timed
#: moves cost what production moves cost.
STEPS = (0.96, 0.66, 0.33, 1.66)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_times() -> tuple[float, float]:
    """(this process's CPU seconds, all CPUs' busy seconds) for the load report."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in fields]
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return time.process_time(), busy / os.sysconf("SC_CLK_TCK")


def time_moves(
    chains: int,
    threads: int,
    dtype: torch.dtype,
    compiled: bool,
    device: torch.device,
    sweeps: int,
    repeats: int,
    barrier=None,
) -> dict:
    torch.set_num_threads(threads)
    # Each setting compiles afresh: a change of shape, dtype or thread count recompiles,
    # and past torch._dynamo's recompile limit (8) it would silently run eagerly.
    torch._dynamo.reset()
    per = chains // len(CONDITIONS)
    gamma = torch.tensor([c[0] for c in CONDITIONS]).repeat_interleave(per)
    temp = torch.tensor([c[1] for c in CONDITIONS]).repeat_interleave(per)
    step = torch.tensor(STEPS).repeat_interleave(per)
    mc = LJChains(gamma, temp, step=step, seed=0, device=device, dtype=dtype, compile=compiled)
    t0 = time.perf_counter()
    mc.sweeps(3)  # warm-up: compilation, allocations
    _sync(device)
    warmup = time.perf_counter() - t0
    rates, others = [], []
    for _ in range(repeats):
        if barrier is not None:  # processes timed together start together
            barrier.wait()
        own0, busy0 = _cpu_times()
        t0 = time.perf_counter()
        mc.sweeps(sweeps)
        _sync(device)
        wall = time.perf_counter() - t0
        own1, busy1 = _cpu_times()
        rates.append(sweeps * 30 * mc.n_chains / wall)
        # CPU-seconds per second spent by everything else on the machine.
        others.append(max(0.0, ((busy1 - busy0) - (own1 - own0)) / wall))
    acceptance = float(mc.accepted.sum() / (mc.attempted * mc.n_chains))
    return {
        "chains": mc.n_chains,
        "threads": threads,
        "dtype": str(dtype).replace("torch.", ""),
        "compiled": compiled,
        "best_moves_per_s": max(rates),
        "median_moves_per_s": statistics.median(rates),
        "warmup_s": warmup,
        "acceptance": acceptance,
        "other_load_cpus": statistics.median(others),
        "loadavg": os.getloadavg()[0],
    }


def _worker(args: tuple) -> tuple[float, float]:
    """One single-threaded process of `time_processes`: its best and median moves/s."""
    chains, dtype, sweeps, repeats, barrier = args
    row = time_moves(chains, 1, dtype, True, torch.device("cpu"), sweeps, repeats, barrier)
    return row["best_moves_per_s"], row["median_moves_per_s"]


def time_processes(
    chains: int, processes: int, dtype: torch.dtype, sweeps: int, repeats: int
) -> dict:
    """Aggregate moves/s of independent single-threaded processes sharing the chains.

    The chains are independent, so they can be split over processes with no
    communication: unlike threads inside one kernel (which wait for each other at every
    move), a process that loses its core to other work slows down alone.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(processes)
        work = [(chains // processes, dtype, sweeps, repeats, barrier)] * processes
        with ctx.Pool(processes) as pool:
            rates = pool.map(_worker, work)
    return {
        "chains": chains,
        "threads": 1,
        "processes": processes,
        "dtype": str(dtype).replace("torch.", ""),
        "compiled": True,
        "best_moves_per_s": sum(r[0] for r in rates),
        "median_moves_per_s": sum(r[1] for r in rates),
        "warmup_s": math.nan,
        "acceptance": math.nan,
        "other_load_cpus": math.nan,
        "loadavg": os.getloadavg()[0],
    }


def full_run(device: torch.device, chains: int, samples: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run = run_metropolis(
        CONDITIONS[:3], chains=chains, samples=samples, seed=1, device=device, compile=True
    )
    wall = time.perf_counter() - t0
    saved = sum(p.shape[0] * p.shape[1] for p in run.positions)
    return {
        "threads": threads,
        "chains_per_condition": chains,
        "samples_per_chain": samples,
        "seconds": wall,
        "moves": run.moves,
        "moves_per_s": run.moves / wall,
        "configurations": saved,
        "configurations_per_s": saved / wall,
        "effective_per_s": sum(r.ess for r in run.reports) / wall,
        "conditions": [r.to_dict() for r in run.reports],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chains", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sweeps", type=int, default=20, help="sweeps per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--processes", type=int, default=2, help="also time this many 1-thread processes"
    )
    parser.add_argument("--full-chains", type=int, default=512)
    parser.add_argument("--full-samples", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        args.chains = [c for c in args.chains if c >= 4096] + [65536, 262144]
        args.threads = [torch.get_num_threads()]
    if args.quick:
        args.chains, args.repeats, args.sweeps = [2048], 3, 10
        args.full_chains, args.full_samples = 128, 5

    load_before = os.getloadavg()
    timings = []
    for threads in args.threads:
        for chains in args.chains:
            for dtype, compiled in (
                (torch.float64, True),
                (torch.float32, True),
                (torch.float64, False),
            ):
                if not compiled and chains != args.chains[0]:
                    continue  # eager once, for the ratio
                row = time_moves(
                    chains, threads, dtype, compiled, device, args.sweeps, args.repeats
                )
                timings.append(row)
                print(
                    f"threads={threads} chains={chains} {row['dtype']} "
                    f"{'compiled' if compiled else 'eager'}: best "
                    f"{row['best_moves_per_s'] / 1e6:.2f} M moves/s, median "
                    f"{row['median_moves_per_s'] / 1e6:.2f} (others used "
                    f"{row['other_load_cpus']:.2f} CPUs; load {row['loadavg']:.1f})",
                    flush=True,
                )
    if device.type == "cpu" and args.processes > 1:
        for chains in args.chains:
            for dtype in (torch.float64, torch.float32):
                row = time_processes(chains, args.processes, dtype, args.sweeps, args.repeats)
                timings.append(row)
                print(
                    f"{args.processes} processes x 1 thread, chains={chains} {row['dtype']}: "
                    f"best {row['best_moves_per_s'] / 1e6:.2f} M moves/s, median "
                    f"{row['median_moves_per_s'] / 1e6:.2f}",
                    flush=True,
                )
    full = full_run(device, args.full_chains, args.full_samples, max(args.threads))
    print(
        f"full run: {full['configurations']} configurations in {full['seconds']:.0f} s "
        f"({full['moves_per_s'] / 1e6:.2f} M moves/s incl. tuning, equilibration, saving)",
        flush=True,
    )
    env = environment(device)
    headline = max(
        (r for r in timings if r["dtype"] == "float64"), key=lambda r: r["best_moves_per_s"]
    )
    one_thread = max(
        (
            r
            for r in timings
            if r["dtype"] == "float64" and r["threads"] == 1 and r.get("processes", 1) == 1
        ),
        key=lambda r: r["best_moves_per_s"],
    )
    payload = {
        "environment": env,
        "command": " ".join(["python", "benchmarks/lj_sampler.py", *(argv or sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "timings": timings,
        "headline_float64": headline,
        "one_thread_float64": one_thread,
        "full_run": full,
    }
    lines = [
        f"Metropolis sampler, N = 30, L = 5; {env['date']}, {env['device_name']}, "
        f"torch {env['torch']}",
        "",
        f"Load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
        "(the machine is shared; 'others' is the CPU time other processes took during "
        "the timing, in CPUs).",
        "",
        "| processes x threads | chains | dtype | move | best M moves/s | median | others (CPUs) |",
        "|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in timings:
        lines.append(
            f"| {r.get('processes', 1)} x {r['threads']} | {r['chains']} | {r['dtype']} | "
            f"{'compiled' if r['compiled'] else 'eager'} | {r['best_moves_per_s'] / 1e6:.2f} | "
            f"{r['median_moves_per_s'] / 1e6:.2f} | {r['other_load_cpus']:.2f} |"
        )
    lines += [
        "",
        f"Full protocol, {full['chains_per_condition']} chains x {full['samples_per_chain']} "
        f"samples per condition, {full['threads']} threads: {full['seconds']:.0f} s, "
        f"{full['moves_per_s'] / 1e6:.2f} M moves/s overall, "
        f"{full['effective_per_s']:.0f} effective samples/s.",
        "",
        "| gamma | T | step | acceptance | tau (sweeps) | thin | ESS | burn-in sweeps |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in full["conditions"]:
        lines.append(
            f"| {c['gamma']} | {c['temperature']} | {c['step']:.3f} | {c['acceptance']:.3f} | "
            f"{c['tau']:.1f} ± {c['tau_error']:.1f} | {c['thin']} | {c['ess']:.0f} | "
            f"{c['burn_in_sweeps']} |"
        )
    stem = "lj_sampler_quick" if args.quick else "lj_sampler"
    if device.type == "cuda":
        stem += "_cuda"
    write_results(args.out, stem, payload, "\n".join(lines))
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
