"""Shared helpers of the benchmark scripts: environment description and result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    """A human-readable name of the device a benchmark ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment(device: torch.device) -> dict:
    """Date, device, torch version and host: recorded with every benchmark result."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_results(out_dir: Path, stem: str, payload: dict, table: str) -> None:
    """Write ``stem.json`` and ``stem.md`` (a markdown table) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(table + "\n")


#: Hyper-parameters used in the benchmarks where a model's defaults are too small for
#: 200k events.
SETTINGS: dict[str, dict] = {
    "cvae": {"hidden_dim": 128, "num_layers": 3, "latent_dim": 8},
}


def add_run_arguments(parser) -> None:
    """The options every CEI accuracy benchmark shares: data sizes, training, noise, device.

    ``--n-train``, ``--n-test``, ``--samples``, ``--batch-size``, ``--lr``, ``--noise``
    (repeatable), ``--device`` and ``--seed``, with the same defaults everywhere.
    """
    parser.add_argument("--n-train", type=int, default=200_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--noise", type=float, action="append", help="relative momentum noise")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)


def fit_for(
    name: str,
    x,
    y,
    *,
    minutes: float,
    batch_size: int,
    lr: float,
    device,
    seed: int,
    transform: str | None = None,
    hparams: dict | None = None,
):
    """Make ``name`` and train it for at most ``minutes`` of wall-clock time.

    The same recipe in every benchmark: cosine learning-rate schedule over the budget, no
    early stopping (the budget ends training), the best validation state restored.
    ``transform`` is the pair transform (a System's own, e.g. ``system.transform``);
    ``hparams`` override the model's defaults and the benchmark's ``SETTINGS``.
    """
    import flowrecon as fr

    frame = {} if transform is None else {"transform": transform}
    chosen = {**SETTINGS.get(name, {}), **(hparams or {})}
    model = fr.make(name, **chosen, **frame, device=str(device), seed=seed)
    model.fit(
        x,
        y,
        epochs=100_000,
        batch_size=batch_size,
        lr=lr,
        lr_schedule="cosine",
        patience=0,
        max_minutes=minutes,
        quiet=True,
    )
    return model


def markdown_table(head: str, columns: tuple[str, ...], rows: list[dict]) -> str:
    """A markdown table of ``rows`` (dicts) under a one-line ``head``; floats to 4 digits."""

    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
