"""The bad-input probe, rerun: every case a careful new user or a QA engineer tried.

Usage:
    python benchmarks/probe.py            # about 30 cases, a few minutes on a CPU

Each case runs the real command line (``python -m flowrecon ...``) in a scratch folder
and checks what a user would: the exit code (non-zero for bad input, 0 where the input
is fine), no traceback, a one-line ``Error:`` message without terminal escape codes, the
words the message must contain, and that no input or earlier output changed. Cases are
grouped by the classes of the probe: mixed or lost data, exit 0 on bad input, tracebacks
instead of messages, unclear messages. Writes ``probe.json`` and ``probe.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hparam", "transforms=1", "--hparam", "hidden=8", "--epochs", "1", "--device", "cpu"]


def flowrecon(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flowrecon", *map(str, args), "--quiet"]
                          if args and args[0] not in ("models",) else
                          [sys.executable, "-m", "flowrecon", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True)  # fmt: skip


def digest(path: Path) -> str:
    """A hash of a file, or of every file under a folder (names and bytes)."""
    if not path.exists():
        return "absent"
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@dataclass
class Case:
    group: str
    name: str
    args: list
    ok: bool = False  # the input is fine: exit 0 expected
    words: tuple[str, ...] = ()
    untouched: tuple[str, ...] = ()  # paths (in the scratch folder) that must not change
    check: Callable[[Path], str | None] | None = None  # extra check; returns a failure
    setup: Callable[[Path], None] | None = None
    result: dict = field(default_factory=dict)


def judge(case: Case, done: subprocess.CompletedProcess, before: dict, tmp: Path) -> dict:
    err = done.stderr.strip()
    lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln]
    problems = []
    if case.ok and done.returncode != 0:
        problems.append(f"exit {done.returncode} on good input")
    if not case.ok and done.returncode == 0:
        problems.append("exit 0 on bad input")
    if "Traceback" in err:
        problems.append("traceback")
    if "\x1b[" in err:
        problems.append("escape codes")
    if not case.ok:
        errors = [ln for ln in lines if ln.startswith("Error")]
        if len(errors) != 1:
            problems.append(f"{len(errors)} 'Error:' lines")
        for word in case.words:
            if word.lower() not in err.lower():
                problems.append(f"message lacks {word!r}")
    for rel, old in before.items():
        if digest(tmp / rel) != old:
            problems.append(f"{rel} changed")
    if case.check is not None and (why := case.check(tmp)):
        problems.append(why)
    message = next((ln for ln in lines if ln.startswith("Error")), lines[-1] if lines else "")
    return {"exit": done.returncode, "message": message[:200], "problems": problems}


def _mode_644(tmp: Path) -> str | None:
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp / "R2").iterdir() if p.is_file()}
    odd = {k: v for k, v in modes.items() if v != oct(0o666 & ~0o022)}
    return f"modes {odd}" if odd else None


def _no_stale(tmp: Path) -> str | None:
    if (tmp / "R3" / "evaluation").exists():
        return "the old evaluation survived the re-fit"
    return (
        None
        if json.loads((tmp / "R3" / "config.json").read_text())["model"] == "cvae"
        else ("config.json does not name the new model")
    )


def _ids_kept(tmp: Path) -> str | None:
    ids = pd.read_csv(tmp / "s_drop.csv")["event"].unique().tolist()
    return None if ids[:4] == [0, 2, 3, 4] else f"event ids {ids[:4]}"


def _held_out_only(tmp: Path) -> str | None:
    n = json.loads((tmp / "ev_drop" / "metrics.json").read_text())["n"]
    test = len(np.load(tmp / "R4" / "split.npz")["test"])
    return None if n == test else f"evaluated {n} events, the held-out split has {test}"


def cases(tmp: Path) -> list[Case]:
    mixed, exit0, trace, unclear = (
        "mixed or lost data", "exit 0 on bad input", "traceback", "unclear message",
    )  # fmt: skip
    return [
        Case(
            mixed,
            "fit fails late into an existing run",
            [
                "fit",
                "--model",
                "maf",
                "--data",
                "other.csv",
                "--out",
                "R",
                *TINY,
                "--hparam",
                "hidden=0",
                "--overwrite",
            ],
            words=("hidden",),
            untouched=("R",),
        ),  # fmt: skip
        Case(
            mixed,
            "re-fit with another model replaces the whole run",
            [
                "fit",
                "--model",
                "cvae",
                "--data",
                "data.csv",
                "--out",
                "R3",
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--overwrite",
            ],
            ok=True,
            check=_no_stale,
        ),  # fmt: skip
        Case(
            mixed,
            "sample --out its own input",
            ["sample", "--run", "R", "--data", "data.csv", "--out", "data.csv"],
            words=("input",),
            untouched=("data.csv",),
        ),  # fmt: skip
        Case(
            mixed,
            "simulate over an existing file",
            ["simulate", "--n", "10", "--out", "data.csv"],
            words=("--overwrite",),
            untouched=("data.csv",),
        ),  # fmt: skip
        Case(
            mixed,
            "sample --drop-invalid keeps input row ids",
            [
                "sample",
                "--run",
                "R",
                "--data",
                "holes.csv",
                "--n",
                "2",
                "--out",
                "s_drop.csv",
                "--drop-invalid",
            ],
            ok=True,
            check=_ids_kept,
        ),  # fmt: skip
        Case(
            mixed,
            "evaluate --drop-invalid evaluates the held-out rows only",
            [
                "evaluate",
                "--run",
                "R4",
                "--data",
                "holes.csv",
                "--samples",
                "3",
                "--out",
                "ev_drop",
                "--drop-invalid",
            ],
            ok=True,
            check=_held_out_only,
        ),  # fmt: skip
        Case(
            mixed,
            "fit --epochs 0",
            [
                "fit",
                "--model",
                "maf",
                "--data",
                "data.csv",
                "--out",
                "R",
                *TINY,
                "--epochs",
                "0",
                "--overwrite",
            ],
            words=("epochs",),
            untouched=("R",),
        ),  # fmt: skip
        Case(
            mixed,
            "NaN physics weight",
            [
                "fit",
                "--model",
                "maf",
                "--data",
                "data.csv",
                "--out",
                "R",
                *TINY,
                "--physics-weight",
                "energy_diff2=nan",
                "--overwrite",
            ],
            words=("energy_diff2",),
            untouched=("R",),
        ),  # fmt: skip
        Case(
            mixed,
            "files follow the umask",
            ["fit", "--model", "maf", "--data", "data.csv", "--out", "R2", *TINY, "--overwrite"],
            ok=True,
            check=_mode_644,
        ),  # fmt: skip
        Case(
            exit0,
            "a momentum of 1e300 in sample",
            ["sample", "--run", "R", "--data", "huge.csv", "--out", "s_huge.csv"],
            words=("data row 4 (event 3)", "--drop-invalid"),
        ),
        Case(
            exit0,
            "a momentum of 1e300 in evaluate",
            ["evaluate", "--run", "R", "--data", "huge.csv", "--out", "ev_huge"],
            words=("data row 4 (event 3)",),
        ),  # fmt: skip
        Case(
            exit0,
            "simulate --charges 1e308,1e308,1e308",
            ["simulate", "--n", "5", "--charges", "1e308,1e308,1e308", "--out", "c.csv"],
            words=("charges",),
        ),
        Case(
            exit0,
            "Parquet with scrambled bytes",
            ["sample", "--run", "R", "--data", "scrambled.parquet", "--out", "s_scr.csv"],
            words=("scrambled.parquet",),
        ),
        Case(
            exit0,
            "a cVAE model.pt copied into a maf run",
            ["evaluate", "--run", "R5", "--out", "ev5"],
            words=("model.pt",),
        ),  # fmt: skip
        Case(
            exit0,
            "--physics-weight energy_diff2=-1",
            [
                "fit",
                "--model",
                "maf",
                "--data",
                "data.csv",
                "--out",
                "R6",
                *TINY,
                "--physics-weight",
                "energy_diff2=-1",
            ],
            words=("energy_diff2",),
        ),  # fmt: skip
        Case(
            exit0,
            "simulate --seed -1",
            ["simulate", "--n", "5", "--seed", "-1", "--out", "neg.csv"],
            words=("--seed",),
        ),  # fmt: skip
        Case(
            exit0,
            "sample --seed -1",
            ["sample", "--run", "R", "--data", "data.csv", "--seed", "-1", "--out", "neg.csv"],
            words=("--seed",),
        ),  # fmt: skip
        Case(
            trace,
            "fit on 3 rows",
            ["fit", "--model", "maf", "--data", "three.csv", "--out", "R7", *TINY],
            words=("rows",),
        ),  # fmt: skip
        Case(
            trace,
            "fit on a file with 1e300",
            ["fit", "--model", "maf", "--data", "huge.csv", "--out", "R8", *TINY],
            words=("huge.csv",),
        ),  # fmt: skip
        Case(
            trace,
            "--device mps",
            ["fit", "--model", "maf", "--data", "data.csv", "--out", "R9", "--device", "mps"],
            words=("mps",),
        ),  # fmt: skip
        Case(
            trace,
            "an output under a file",
            ["sample", "--run", "R", "--data", "data.csv", "--out", "data.csv/s.csv"],
            words=("is a file, not a folder",),
        ),  # fmt: skip
        Case(
            trace,
            "config.json edited to a list",
            ["evaluate", "--run", "R10", "--out", "ev10"],
            words=("config.json",),
        ),  # fmt: skip
        Case(
            trace,
            'config.json with "data": null',
            ["evaluate", "--run", "R11", "--out", "ev11"],
            words=("config.json",),
        ),  # fmt: skip
        Case(
            trace,
            'TOML [training] epochs="abc"',
            ["fit", "--config", "bad.toml", "--data", "data.csv", "--out", "R12"],
            words=("bad.toml", "epochs"),
        ),  # fmt: skip
        Case(
            trace,
            'TOML top-level model="cvae"',
            [
                "fit",
                "--config",
                "short.toml",
                "--data",
                "data.csv",
                "--out",
                "R13",
                "--device",
                "cpu",
            ],
            ok=True,
        ),  # fmt: skip
        Case(
            unclear,
            "random bytes as model.pt",
            ["evaluate", "--run", "R14", "--out", "ev14"],
            words=("model.pt",),
        ),  # fmt: skip
        Case(
            unclear,
            "--model ZUKO-NSF",
            ["fit", "--model", "ZUKO-NSF", "--data", "data.csv", "--out", "R15", *TINY],
            ok=True,
        ),  # fmt: skip
        Case(
            unclear,
            "--model cinn (short name)",
            [
                "fit",
                "--model",
                "cinn",
                "--data",
                "data.csv",
                "--out",
                "R16",
                "--epochs",
                "1",
                "--device",
                "cpu",
            ],
            ok=True,
        ),
        Case(
            unclear,
            "semicolon CSV with decimal commas",
            ["sample", "--run", "R", "--data", "semi.csv", "--out", "s_semi.csv"],
            words=("separator",),
        ),  # fmt: skip
        Case(
            unclear,
            "evaluate on all-infinite data",
            ["evaluate", "--run", "R", "--data", "inf.csv", "--out", "ev_inf"],
            words=("inf.csv",),
            check=lambda t: "metrics written" if (t / "ev_inf").exists() else None,
        ),
    ]


def prepare(tmp: Path) -> None:
    """Data files and runs the cases start from."""
    assert flowrecon("simulate", "--n", "1500", "--seed", "1", "--out", "data.csv",
                     cwd=tmp).returncode == 0  # fmt: skip
    assert flowrecon("simulate", "--n", "400", "--seed", "2", "--out", "other.csv",
                     cwd=tmp).returncode == 0  # fmt: skip
    data = pd.read_csv(tmp / "data.csv")
    for run in ("R", "R3", "R10", "R11", "R14"):
        done = flowrecon("fit", "--model", "maf", "--data", "data.csv", "--out", run, *TINY,
                         cwd=tmp)  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert flowrecon("evaluate", "--run", "R3", "--samples", "3", cwd=tmp).returncode == 0
    holes = data.copy()
    holes.loc[1, "cx"] = np.nan
    holes.to_csv(tmp / "holes.csv", index=False)
    assert flowrecon("fit", "--model", "maf", "--data", "holes.csv", "--out", "R4", *TINY,
                     "--drop-invalid", cwd=tmp).returncode == 0  # fmt: skip
    huge = data.head(20).copy()
    huge.loc[3, "pcx"] = 1e300
    huge.to_csv(tmp / "huge.csv", index=False)
    data.head(3).to_csv(tmp / "three.csv", index=False)
    inf = data.head(20).copy()
    inf[[c for c in inf.columns if c.startswith("p")]] = np.inf
    inf.to_csv(tmp / "inf.csv", index=False)
    data.head(50).to_csv(tmp / "semi.csv", index=False, sep=";", decimal=",")
    data.head(200).to_parquet(tmp / "scrambled.parquet")
    raw = bytearray((tmp / "scrambled.parquet").read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.choice(np.arange(100, len(raw) - 100), 2000, replace=False):
        raw[i] = int(rng.integers(0, 256))
    (tmp / "scrambled.parquet").write_bytes(bytes(raw))
    shutil.copytree(tmp / "R", tmp / "R5")
    assert flowrecon("fit", "--model", "cvae", "--data", "data.csv", "--out", "cv", "--epochs",
                     "1", "--device", "cpu", cwd=tmp).returncode == 0  # fmt: skip
    shutil.copy(tmp / "cv" / "model.pt", tmp / "R5" / "model.pt")
    (tmp / "R10" / "config.json").write_text("[1, 2]")
    cfg = json.loads((tmp / "R11" / "config.json").read_text())
    cfg["data"] = None
    (tmp / "R11" / "config.json").write_text(json.dumps(cfg))
    (tmp / "R14" / "model.pt").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp / "bad.toml").write_text('model = "maf"\n[training]\nepochs = "abc"\n')
    (tmp / "short.toml").write_text('model = "cvae"\n[training]\nepochs = 1\n')


def main() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="probe_"))
    t0 = time.time()
    prepare(tmp)
    rows = []
    for case in cases(tmp):
        before = {rel: digest(tmp / rel) for rel in case.untouched}
        done = flowrecon(*case.args, cwd=tmp)
        result = judge(case, done, before, tmp)
        rows.append({"group": case.group, "case": case.name, **result})
        mark = "ok  " if not result["problems"] else "FAIL"
        print(f"{mark} {case.group:<22} {case.name:<55} exit {result['exit']}: "
              f"{'; '.join(result['problems']) or result['message']}", flush=True)  # fmt: skip
    failed = sum(bool(r["problems"]) for r in rows)
    head = (
        f"Bad-input probe rerun, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{len(rows) - failed} of {len(rows)} cases as a user should see them "
        f"({time.time() - t0:.0f} s)."
    )
    lines = [head, "", "| class | case | exit | verdict / message |", "|---|---|---:|---|"]
    for r in rows:
        verdict = "; ".join(r["problems"]) if r["problems"] else r["message"].replace("|", "/")
        lines.append(f"| {r['group']} | {r['case']} | {r['exit']} | {verdict} |")
    out = Path(__file__).resolve().parent / "results"
    payload = {"command": "python benchmarks/probe.py", "rows": rows, "failed": failed}
    (out / "probe.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "probe.md").write_text("\n".join(lines) + "\n")
    print(head)
    shutil.rmtree(tmp, ignore_errors=True)
    return payload


if __name__ == "__main__":
    main()
