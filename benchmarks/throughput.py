"""Throughput benchmark: training and sampling samples/s of every model, simulator events/s.

Usage:
    python benchmarks/throughput.py                        # every model, CPU or CUDA
    python benchmarks/throughput.py --quick                # under 2 minutes on one CPU thread
    python benchmarks/throughput.py --models zuko-nsf,freia-cinn --batch-sizes 512,8192
    python benchmarks/throughput.py --device cuda --tf32   # TF32 matmuls on Ampere and later

Data: ``--train-rows`` simulated OCS events (1 % momentum noise), positions x (N, 9) from
momenta y (N, 9), moved to the device once; the library's training loop keeps them there
and gathers every batch on the device.

What is timed, per model (``flowrecon.make(name)``, default hyper-parameters):

- **Training samples/s.** ``fit(x, y, epochs=1, max_minutes=1e-6, val_fraction=0)``
  builds the preprocessing and the network (one optimiser step, not timed). Then, for
  each batch size, the library's one training loop, `flowrecon.training.train`, runs on
  the already preprocessed model-space rows, without validation data: one untimed
  warm-up epoch, which also sets the number of epochs E of each timed run (about
  ``--train-seconds`` long), then ``--repeats`` timed runs of E epochs. Counted: the
  loop's own wall time, ``History.seconds`` (batch gathering, forward, loss, backward,
  gradient clipping, Adam step, per-epoch bookkeeping, default settings lr 1e-3 and
  clip_grad 5); not counted: preprocessing, validation, optimiser construction, the
  end-of-fit hook. Reported: train rows x E / seconds, the median over the runs.
- **Posterior samples/s.** ``model.sample(y, n=K, seed=0)`` on C condition rows already on
  the device (a tensor, so the (K, C, 9) samples stay there), for each C of
  ``--sample-conditions``: an untimed warm-up on min(C, 256) conditions, then
  ``--repeats`` timed calls (fewer, at least one, when the warm-up predicts they would
  take over ``--sample-seconds`` in all). Counted: the whole call, including the
  preprocessing of y and the decoding of the samples back to positions in float64.
  Reported: K x C / seconds, the median over the calls.

Also timed:

- **Simulator events/s**: `asymptotic_momenta` (as in ``benchmarks/simulate.py``) on
  ``--simulator-events`` OCS geometries on the device, after an untimed warm-up on the same
  shape (which compiles the fused CPU step when ``--simulator-compile`` resolves to on).
- **Full epoch** of ``freia-cinn`` at the largest batch size over ``--epoch-events`` rows
  (default 1,000,000 on CUDA, 200,000 on CPU; skipped in ``--quick`` and for 0), the
  loop's wall time, also given scaled linearly to 1,000,000 events.

On CUDA every timing is bracketed by ``torch.cuda.synchronize``. Results are written to
``throughput.json`` (every raw timing) and ``throughput.md`` (``throughput_cuda.*`` on
CUDA) in ``--out`` after every model, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

import flowrecon as fr  # noqa: E402
from flowrecon.base import CPU_MAX_CHUNK, resolve_device  # noqa: E402
from flowrecon.registry import MODELS, hparam_defaults, is_installed  # noqa: E402
from flowrecon.systems.cei.geometry import sample_ocs, simulate_events  # noqa: E402
from flowrecon.systems.cei.simulator import asymptotic_momenta  # noqa: E402
from flowrecon.training import train  # noqa: E402

#: Model whose full-epoch time is reported (the proposal's architecture family).
EPOCH_MODEL = "freia-cinn"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Runs fn once; returns its result and its wall time, with the device synchronised."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _ints(text: str) -> list[int]:
    return [int(v.replace("_", "")) for v in text.split(",") if v.strip()]


def train_throughput(
    model: Any,
    xm: torch.Tensor,
    ym: torch.Tensor,
    batch_size: int,
    target_s: float,
    repeats: int,
    device: torch.device,
) -> dict:
    """Training rows/s of the library loop on model-space rows, at one batch size."""
    common = {"batch_size": batch_size, "patience": 0, "quiet": True}
    est = model.estimator_
    # Warm-up: first use of this batch shape (allocator, kernel choice) and a time estimate.
    _sync(device)
    warm = train(est, xm, ym, epochs=1, seed=0, **common)
    epochs = max(1, min(1000, round(target_s / max(warm.seconds, 1e-6))))
    seconds, stopped = [], []
    for r in range(repeats):
        _sync(device)
        h = train(est, xm, ym, epochs=epochs, seed=r + 1, **common)
        # The loop ends synchronised: it reads every epoch's loss on the host.
        seconds.append(h.seconds)
        stopped.append(h.stopped)
    rows = xm.shape[0] * epochs
    rates = [rows / s for s in seconds]
    return {
        "batch_size": batch_size,
        "rows": xm.shape[0],
        "epochs_per_run": epochs,
        "warmup_epoch_s": warm.seconds,
        "seconds": seconds,
        "samples_per_s_all": rates,
        "samples_per_s": statistics.median(rates),
        "stopped": stopped,
    }


def sample_throughput(
    model: Any,
    y: torch.Tensor,
    conditions: int,
    per_condition: int,
    repeats: int,
    budget_s: float,
    max_chunk: int,
    device: torch.device,
) -> dict:
    """Posterior samples/s of ``model.sample`` for ``conditions`` condition rows."""
    yc = y[:conditions]
    warm_rows = min(conditions, 256)
    _, warm_s = _timed(
        lambda: model.sample(yc[:warm_rows], n=per_condition, seed=0, max_chunk=max_chunk), device
    )
    # Slow samplers (autoregressive inverses) get fewer repeats, never fewer than one.
    estimate_s = warm_s * conditions / warm_rows
    repeats = max(1, min(repeats, int(budget_s / max(estimate_s, 1e-6))))
    seconds = []
    for _ in range(repeats):
        out, s = _timed(
            lambda: model.sample(yc, n=per_condition, seed=0, max_chunk=max_chunk), device
        )
        seconds.append(s)
    assert out.shape == (per_condition, yc.shape[0], 9), out.shape
    rates = [per_condition * yc.shape[0] / s for s in seconds]
    return {
        "conditions": int(yc.shape[0]),
        "samples_per_condition": per_condition,
        "warmup_s": warm_s,
        "seconds": seconds,
        "samples_per_s_all": rates,
        "samples_per_s": statistics.median(rates),
        "all_finite": bool(torch.isfinite(out).all()),
    }


def simulator_throughput(n: int, compile_flag: bool, device: torch.device) -> dict:
    """Events/s of `asymptotic_momenta` on OCS geometries, warm-up on the same shape."""
    x = sample_ocs(n, torch.Generator().manual_seed(0)).to(device)
    _, warmup_s = _timed(lambda: asymptotic_momenta(x, compile=compile_flag), device)
    _, seconds = _timed(lambda: asymptotic_momenta(x, compile=compile_flag), device)
    return {
        "events": n,
        "compile": compile_flag,
        "warmup_s": warmup_s,
        "seconds": seconds,
        "events_per_s": n / seconds,
    }


def epoch_time(
    model: Any, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device
) -> dict:
    """Seconds of one training epoch of the library loop over every row of x and y."""
    pipe = model.preprocessing_
    xm, ym = pipe.encode_x(x, y).float(), pipe.encode_y(y).float()  # not timed
    # Warm-up at this batch size over a few batches (the full rows are timed below).
    common = {"epochs": 1, "batch_size": batch_size, "patience": 0, "quiet": True}
    train(model.estimator_, xm[: 8 * batch_size], ym[: 8 * batch_size], **common)
    _sync(device)
    h = train(model.estimator_, xm, ym, **common)
    n = xm.shape[0]
    return {
        "model": model.name,
        "events": n,
        "batch_size": batch_size,
        "seconds": h.seconds,
        "seconds_per_1M_scaled": h.seconds * 1_000_000 / n,
        "samples_per_s": n / h.seconds,
        "stopped": h.stopped,
    }


def _table(env: dict, settings: dict, rows: list[dict], extra: dict) -> str:
    bss, conds = settings["batch_sizes"], settings["sample_conditions"]
    k = settings["samples_per_condition"]
    head = (
        f"Throughput, {env['date']}, {env['device_name']}, torch {env['torch']}, "
        f"tf32={settings['tf32_effective']}; training on {settings['train_rows']:,} "
        f"simulated OCS rows (no validation), sampling {k} posterior samples a condition; "
        f"medians of {settings['repeats']} timed runs (sampling: fewer for slow models). "
        f"Command: `{settings['command']}`"
    )
    cols = (
        ["model", "parameters"]
        + [f"train samples/s, batch {b:,}" for b in bss]
        + [f"sampling samples/s, {c:,} x {k}" for c in conds]
    )
    lines = [head, "", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for r in rows:
        train_by = {t["batch_size"]: t for t in r["train"]}
        samp_by = {s["conditions"]: s for s in r["sample"]}
        cells = [r["model"], f"{r['parameters']:,}"]
        cells += [f"{train_by[b]['samples_per_s']:,.0f}" if b in train_by else "n/a" for b in bss]
        cells += [f"{samp_by[c]['samples_per_s']:,.0f}" if c in samp_by else "n/a" for c in conds]
        lines.append("| " + " | ".join(cells) + " |")
    if "simulator" in extra:
        s = extra["simulator"]
        lines += [
            "",
            f"Simulator (`asymptotic_momenta`, OCS): {s['events']:,} events in "
            f"{s['seconds']:.2f} s, {s['events_per_s']:,.0f} events/s, compile={s['compile']} "
            f"(warm-up {s['warmup_s']:.1f} s, not counted).",
        ]
    if "epoch" in extra:
        e = extra["epoch"]
        lines += [
            "",
            f"Full epoch, {e['model']}, batch {e['batch_size']:,}: {e['events']:,} events in "
            f"{e['seconds']:.1f} s ({e['samples_per_s']:,.0f} samples/s), "
            f"{e['seconds_per_1M_scaled']:.1f} s per 1,000,000 events"
            + (" (scaled linearly from the measured epoch)" if e["events"] != 1_000_000 else ""),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all", help="comma-separated names, or all")
    parser.add_argument("--batch-sizes", default="256,1024,4096", help="training batch sizes")
    parser.add_argument("--train-rows", type=int, default=16_384, help="rows of each epoch")
    parser.add_argument(
        "--train-seconds", type=float, default=3.0, help="target length of each timed training run"
    )
    parser.add_argument(
        "--sample-conditions",
        default=None,
        help="condition rows a call (default 1000,10000; CUDA adds 100000)",
    )
    parser.add_argument("--samples", type=int, default=100, help="posterior samples a condition")
    parser.add_argument(
        "--max-chunk",
        type=int,
        default=None,
        help="max_chunk of sample() (default: the library's; 2**21 on CUDA)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs a measurement")
    parser.add_argument(
        "--sample-seconds",
        type=float,
        default=20.0,
        help="sampling calls expected to exceed this in all are repeated less (at least once)",
    )
    parser.add_argument("--simulator-events", type=int, default=100_000)
    parser.add_argument(
        "--simulator-compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: on for CPU, off for CUDA, as in simulate.py",
    )
    parser.add_argument(
        "--epoch-events",
        type=int,
        default=None,
        help=f"rows of the {EPOCH_MODEL} full epoch (default 1,000,000 on "
        "CUDA, 200,000 on CPU; 0 skips it)",
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4,096 rows, batches 256 and 1024, 1,000 x 20 samples, "
        "20,000 simulator events uncompiled, no full epoch",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.quick:
        args.train_rows = min(args.train_rows, 4_096)
        if args.batch_sizes == parser.get_default("batch_sizes"):
            args.batch_sizes = "256,1024"
        args.sample_conditions = args.sample_conditions or "1000"
        args.samples = min(args.samples, 20)
        args.train_seconds = min(args.train_seconds, 1.0)
        args.repeats = min(args.repeats, 2)
        args.sample_seconds = min(args.sample_seconds, 10.0)
        args.simulator_events = min(args.simulator_events, 20_000)
        if args.simulator_compile == "auto":
            args.simulator_compile = "off"  # compiling costs ~30 s a new shape on CPU
        args.epoch_events = 0
    if args.sample_conditions is None:
        args.sample_conditions = "1000,10000,100000" if cuda else "1000,10000"
    if args.epoch_events is None:
        args.epoch_events = 1_000_000 if cuda else 200_000
    if args.max_chunk is None:
        # Bigger chunks keep a GPU busy; on CPU the library's default is what users get.
        args.max_chunk = 1 << 21 if cuda else CPU_MAX_CHUNK
    batch_sizes, conditions = _ints(args.batch_sizes), _ints(args.sample_conditions)
    compile_flag = {"auto": device.type == "cpu", "on": True, "off": False}[args.simulator_compile]
    if args.tf32:
        # Only matmuls and convolutions on CUDA use it; CPU runs ignore the flags.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    names = list(MODELS) if args.models == "all" else args.models.split(",")
    names = [n for n in names if is_installed(n)]

    env = environment(device)
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    settings = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "out": str(args.out),
        "batch_sizes": batch_sizes,
        "sample_conditions": conditions,
        "samples_per_condition": args.samples,
        "tf32_effective": cuda and torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "simulator_compile": compile_flag,
        "torch_threads": torch.get_num_threads(),
        "command": command,
    }
    stem = "throughput_cuda" if cuda else "throughput"
    rows: list[dict] = []
    extra: dict = {}

    def save() -> None:
        payload = {**env, "settings": settings, "models": rows, **extra, "command": command}
        # Hyper-parameters may hold tuples or other non-JSON values: stored as text.
        payload = json.loads(json.dumps(payload, default=str))
        write_results(args.out, stem, payload, _table(env, settings, rows, extra))

    # Simulated once; the training rows are the first train_rows, the conditions follow.
    n_data = max(args.train_rows + max(conditions), args.epoch_events)
    print(f"simulating {n_data:,} OCS events on {device}", flush=True)
    ev = simulate_events(n_data, seed=args.seed, momentum_noise=0.01, device=device)
    x_all = torch.as_tensor(ev.positions, device=device)
    y_all = torch.as_tensor(ev.momenta, device=device)
    x, y = x_all[: args.train_rows], y_all[: args.train_rows]
    y_cond = y_all[args.train_rows : args.train_rows + max(conditions)]
    del ev

    models: dict[str, Any] = {}
    for name in names:
        model = fr.make(name, device=str(device), seed=args.seed)
        # Builds preprocessing and network; the tiny budget stops after one step (not timed).
        model.fit(
            x, y, epochs=1, max_minutes=1e-6, val_fraction=0.0, condition_density=False,
            quiet=True,
        )  # fmt: skip
        pipe = model.preprocessing_
        xm, ym = pipe.encode_x(x, y).float(), pipe.encode_y(y).float()
        n_params = sum(p.numel() for p in model.estimator_.parameters() if p.requires_grad)
        row: dict = {
            "model": name,
            "parameters": n_params,
            "hparams": hparam_defaults(name) | model.hparams_,
            "train": [],
            "sample": [],
        }
        for bs in batch_sizes:
            t = train_throughput(model, xm, ym, bs, args.train_seconds, args.repeats, device)
            row["train"].append(t)
            print(
                f"[{name}] train batch {bs:>6,}: {t['samples_per_s']:>12,.0f} samples/s "
                f"({t['epochs_per_run']} epochs of {t['rows']:,} rows a run)",
                flush=True,
            )
            if any(s != "completed" for s in t["stopped"]):
                print(f"[{name}]   training stopped early: {t['stopped']}", flush=True)
        for c in conditions:
            s = sample_throughput(
                model,
                y_cond,
                c,
                args.samples,
                args.repeats,
                args.sample_seconds,
                args.max_chunk,
                device,
            )
            row["sample"].append(s)
            print(
                f"[{name}] sample {c:>7,} x {args.samples}: {s['samples_per_s']:>12,.0f} "
                f"samples/s" + ("" if s["all_finite"] else " (non-finite samples!)"),
                flush=True,
            )
        rows.append(row)
        save()
        if name == EPOCH_MODEL and args.epoch_events > 0:
            models[name] = model  # kept for the full epoch below
        del model, xm, ym
        if cuda:
            torch.cuda.empty_cache()

    if args.epoch_events > 0 and EPOCH_MODEL in models:
        bs = max(batch_sizes)
        print(
            f"[{EPOCH_MODEL}] one epoch over {args.epoch_events:,} rows, batch {bs:,}", flush=True
        )
        e = epoch_time(
            models.pop(EPOCH_MODEL),
            x_all[: args.epoch_events],
            y_all[: args.epoch_events],
            bs,
            device,
        )
        extra["epoch"] = e
        print(
            f"[{EPOCH_MODEL}] epoch: {e['seconds']:.1f} s, "
            f"{e['seconds_per_1M_scaled']:.1f} s per 1M events",
            flush=True,
        )
        save()

    print(f"simulator: {args.simulator_events:,} events, compile={compile_flag}", flush=True)
    extra["simulator"] = simulator_throughput(args.simulator_events, compile_flag, device)
    save()
    table = _table(env, settings, rows, extra)
    print(table)
    return {**env, "settings": settings, "models": rows, **extra}


if __name__ == "__main__":
    main()
