"""Two processes tune one study on a real PostgreSQL server, as two machines would.

The server runs from a temporary directory (``initdb``, ``pg_ctl``) on a Unix socket there
and a free port; as root it runs as the ``postgres`` user, since ``initdb`` refuses root.
The test is skipped, with the reason, where PostgreSQL or psycopg is not installed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip(
    "psycopg", reason="psycopg is not installed (pip install 'flowrecon[postgres]')"
)

REPO = Path(__file__).resolve().parents[1]


def _postgres_bin() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, else the newest Debian layout."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(versions[0]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> list[str]:
    """The command prefix that runs PostgreSQL's tools: ``runuser -u postgres --`` as root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run the server as")
    if shutil.which("runuser") is None:
        pytest.skip("running as root and runuser is not installed")
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server; yields its URL (Unix socket, trust authentication)."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or /usr/lib/postgresql)")
    prefix = _as_server_user()
    # Not pytest's tmp_path: the server user must be able to enter the directory.
    root = Path(tempfile.mkdtemp(prefix="flowrecon-pg-"))
    if prefix:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    try:
        subprocess.run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
            **run,
        )
        options = f"-k {root} -p {port} -c listen_addresses=''"
        subprocess.run(
            [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options,
             "-l", str(root / "server.log"), "-w", "start"],
            **run,
        )  # fmt: skip
    except subprocess.CalledProcessError as err:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {err.stderr or err.stdout}{log}")
    try:
        yield f"postgresql://postgres@/postgres?host={root}&port={port}"
    finally:
        subprocess.run(
            [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


#: What each "machine" runs: the same call, against the same storage and study. A file
#: barrier makes both start together, so that both take part.
WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_tune import SEARCH, _data
    from flowrecon.tune import tune

    barrier = Path({barrier!r})
    (barrier / sys.argv[1]).touch()
    while len(list(barrier.iterdir())) < 2:
        time.sleep(0.05)
    tune("zuko-maf", *_data(), out=sys.argv[2], storage={url!r}, study="shared",
         search=SEARCH, training={{"epochs": 1}}, trials=8, figures=False)
    """
)


def test_two_processes_share_one_study_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    from optuna.trial import TrialState

    from flowrecon.tune import storage_url

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    script = WORKER.format(tests=str(REPO / "tests"), barrier=str(barrier), url=postgres_url)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, name, str(tmp_path / name)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("machine-a", "machine-b")
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output

    study = optuna.load_study(study_name="shared", storage=storage_url(postgres_url, tmp_path))
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(8))  # every trial once, none extra
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    workers = {t.user_attrs["worker"] for t in trials}
    assert workers == {f"{socket.gethostname()}:{p.pid}" for p in procs}  # both took part
    for name in ("machine-a", "machine-b"):  # each wrote the study's results
        assert (tmp_path / name / "best.toml").is_file()
        assert (tmp_path / name / "trials.csv").read_text().count("\n") == 9
