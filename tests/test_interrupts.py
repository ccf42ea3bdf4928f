"""SIGINT and SIGTERM at random moments: outputs are the previous ones or new complete ones.

Each trial starts a real ``python -m flowrecon`` process that writes over an existing
output with ``--overwrite``, interrupts it after a random delay, and then checks: the
process exited 0 (it finished first), 130, or died of the signal while shutting down
after its work; the output is byte for byte the previous one or a new complete one that
``evaluate`` accepts; no staging directory is left. The
default run makes a few trials per command; ``pytest -m slow`` makes 20 per command and
signal.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowrecon.data import read_table, write_table
from flowrecon.rundir import output_kind
from flowrecon.runs import fit_run, load_run
from flowrecon.system import make_system

ROOT = Path(__file__).resolve().parents[1]
N_EVENTS = 1500
TINY = ["--hparam", "transforms=1", "--hparam", "hidden=8", "--device", "cpu", "--quiet"]


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("interrupts")
    data = tmp / "data.parquet"
    write_table(make_system("cei").simulate(N_EVENTS, seed=5), data)
    run = tmp / "run"
    fit_run("maf", run, data=data, hparams={"transforms": 1, "hidden": 8},
            training={"epochs": 1}, device="cpu", quiet=True)  # fmt: skip
    return {"tmp": tmp, "data": data, "run": run}


def _commands(s: dict[str, Path]) -> dict[str, tuple[list[str], Path]]:
    run, data, tmp = str(s["run"]), str(s["data"]), s["tmp"]
    return {
        "fit": (["fit", "--model", "maf", "--data", data, "--out", str(tmp / "refit"),
                 "--epochs", "20", *TINY], tmp / "refit"),
        "evaluate": (["evaluate", "--run", run, "--samples", "40", "--out", str(tmp / "ev"),
                      "--quiet", "--device", "cpu"], tmp / "ev"),
        "sample": (["sample", "--run", run, "--data", data, "--n", "50", "--out",
                    str(tmp / "s.parquet"), "--quiet", "--device", "cpu"], tmp / "s.parquet"),
        "compare": (["compare", "cvae", "maf", "--data", data, "--out", str(tmp / "cmp"),
                     "--epochs", "3", "--samples", "5", "--quiet", "--device", "cpu"],
                    tmp / "cmp"),
    }  # fmt: skip


def _check_complete(kind: str, out: Path) -> None:
    if kind == "fit":
        assert output_kind(out) == "run"
        load_run(out)
        evaluate = subprocess.run(
            [sys.executable, "-m", "flowrecon", "evaluate", "--run", str(out), "--samples", "3",
             "--max-events", "5", "--out", str(out.parent / "check"), "--overwrite", "--quiet"],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        assert evaluate.returncode == 0, evaluate.stderr
    elif kind == "evaluate":
        assert output_kind(out) == "evaluation"
        assert json.loads((out / "metrics.json").read_text())["n"] > 0
        assert (out / "report.md").is_file()
    elif kind == "sample":
        table, _ = read_table(out, ["event", "sample", "cx"])
        assert len(table) == N_EVENTS * 50
    else:
        assert output_kind(out) == "comparison" and (out / "comparison.csv").is_file()


def _trial(kind: str, args: list[str], out: Path, sig: int, delay: float) -> None:
    if not out.exists():  # the first trial of a command makes the "previous" output
        done = subprocess.run([sys.executable, "-m", "flowrecon", *args], cwd=ROOT,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
    before = _snapshot(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowrecon", *args, "--overwrite"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(delay)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    # -sig: the signal came while the interpreter was shutting down after the work was
    # done, when CPython has already put the default handlers back; the output must
    # still be whole, which the checks below verify.
    assert proc.returncode in (0, 130, -sig), (proc.returncode, stderr)
    assert "Traceback" not in stderr
    leftovers = [p.name for p in out.parent.iterdir() if ".partial-" in p.name or ".tmp" in p.name]
    assert not leftovers, leftovers
    if proc.returncode != 0 and _snapshot(out) == before:
        return  # interrupted: the previous output, byte for byte
    _check_complete(kind, out)  # a new output (an interrupted fit keeps its best model)


def _run_trials(setup: dict[str, Path], trials: int, seed: int, kinds: tuple[str, ...]) -> None:
    rng = random.Random(seed)
    for kind in kinds:
        args, out = _commands(setup)[kind]
        for _ in range(trials):
            sig = rng.choice([signal.SIGINT, signal.SIGTERM])
            _trial(kind, args, out, sig, delay=rng.uniform(0.5, 8.0))


def test_interrupts_leave_whole_outputs(setup) -> None:
    seed = int(os.environ.get("FLOWRECON_INTERRUPT_SEED", 0))
    _run_trials(setup, trials=1, seed=seed, kinds=("fit", "sample"))


@pytest.mark.slow
def test_interrupts_twenty_times_each(setup) -> None:
    _run_trials(setup, trials=20, seed=1, kinds=("fit", "evaluate", "sample", "compare"))
