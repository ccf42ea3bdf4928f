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
