"""Outputs that appear whole or not at all, and never overwrite inputs or earlier results.

Every command writes its outputs through this module:

- A *directory* output (a run, an evaluation, a comparison) is built in a hidden staging
  directory beside its destination, ``.NAME.partial-PID-ID``, and moved into place in one
  step when it is complete. Until then the destination keeps whatever it held before (a
  previous complete run, or nothing). An existing destination is replaced only with
  ``overwrite=True``, and only when it is a flowrecon output of the same kind or empty: a
  folder of the user's own files is never replaced.
- A *file* output is written to a temporary file and renamed (`flowrecon.data.write_table`
  does that); `check_output_file` refuses an existing file without ``overwrite`` and any
  output that is one of the command's inputs, with or without it.

Staging directories left by a killed process (SIGKILL, power loss) are removed by the next
command that writes to the same destination, once their process is gone.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "run"
    >>> with staged_directory(out, kind="run") as stage:
    ...     _ = (stage / "model.pt").write_text("weights")
    >>> sorted(p.name for p in out.iterdir())
    ['.flowrecon-output.json', 'model.pt']
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "MARKER",
    "OutputError",
    "check_output_dir",
    "check_output_file",
    "output_kind",
    "staged_directory",
]

#: File that marks a directory as a complete flowrecon output, and says of what kind.
MARKER = ".flowrecon-output.json"

_PARTIAL = ".partial-"


class OutputError(ValueError):
    """An output location that cannot be written: exists, is an input, or is not ours."""


def output_kind(directory: str | os.PathLike) -> str | None:
    """The kind of flowrecon output a directory holds (``run``, ``evaluation``, ...), or None.

    Runs written before the marker existed count as runs when they hold ``config.json``
    and ``model.pt``.
    """
    directory = Path(directory)
    marker = directory / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            return None
        return kind if isinstance(kind, str) else None
    if (directory / "config.json").is_file() and (directory / "model.pt").is_file():
        return "run"
    return None


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def _check_writable(out: Path, option: str) -> None:
    """Fails early when the output cannot be created (before hours of work, not after)."""
    parent = out if out.is_dir() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {out}: cannot write in {parent} (permission denied)")


def check_output_dir(
    out: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    option: str = "--out",
) -> Path:
    """Checks that a directory output may be written; returns it as a Path.

    Raises:
        OutputError: ``out`` is a file; holds an output of this kind and ``overwrite`` is
            False; holds anything else (another kind, or the user's own files); or
            contains one of ``inputs`` (which replacing it would delete).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out}: is a file, expected a directory")
    _check_writable(out.parent, option)
    for item in inputs:
        if item is not None and _inside(Path(item), out):
            raise OutputError(
                f"{option} {out}: holds the input {item}; write the {kind} somewhere else"
            )
    if not out.exists() or _is_empty_dir(out):
        return out
    found = output_kind(out)
    if found == kind:
        if not overwrite:
            raise OutputError(
                f"{option} {out}: holds an earlier {kind}; give --overwrite to replace it "
                f"or choose another {option}"
            )
        return out
    what = f"a flowrecon {found}" if found else "other files"
    raise OutputError(
        f"{option} {out}: holds {what}, not a {kind}; choose a new or empty directory"
    )


def check_output_file(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    option: str = "--out",
) -> Path:
    """Checks that a file output may be written: never over an input, over others only
    with ``overwrite``; returns it as a Path."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{option} {out}: is a directory, expected a file name")
    _check_writable(out.parent, option)
    for item in inputs:
        if item is None:
            continue
        same = Path(item).exists() and out.exists() and os.path.samefile(item, out)
        if same or Path(item).resolve() == out.resolve():
            raise OutputError(f"{option} {out}: is also an input; write to another file")
    if out.exists() and not overwrite:
        raise OutputError(
            f"{option} {out}: exists; give --overwrite to replace it or choose another name"
        )
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> None:
    """Removes staging directories of ``out`` whose process is gone."""
    parent = out.parent if out.parent.exists() else None
    if parent is None:
        return
    prefix = f".{out.name}{_PARTIAL}"
    for path in parent.glob(f"{prefix}*"):
        pid_text = path.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux renameat2); False where unsupported."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _move_into_place(stage: Path, out: Path) -> None:
    """Moves the complete staging directory to ``out``, replacing what was there."""
    if not out.exists():
        os.rename(stage, out)
        return
    if _exchange(stage, out):  # out is new; stage now holds the old output
        shutil.rmtree(stage, ignore_errors=True)
        return
    # Two renames: for an instant neither is at `out`, but the old output stays whole
    # under its backup name until the new one is in place.
    backup = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.rename(out, backup)
    os.rename(stage, out)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, *, kind: str) -> Iterator[Path]:
    """Yields a staging directory; on success it replaces ``out`` whole, else vanishes.

    Check the destination first with `check_output_dir` (this function replaces whatever
    is at ``out``). On any exception, Ctrl-C included, the staging directory is removed
    and ``out`` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    stage = out.with_name(f".{out.name}{_PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    stage.mkdir()
    try:
        yield stage
        (stage / MARKER).write_text(json.dumps({"kind": kind, "format": 1}) + "\n")
        _move_into_place(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
