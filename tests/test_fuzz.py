"""Fuzzing the loaders and the command line: any input ends in data or a one-line error."""

from __future__ import annotations

import os
import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrecon.cli import main
from flowrecon.data import DataError, read_table, write_table

FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_cells = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**20), 10**20),
    st.text(alphabet=string.printable, max_size=8),
    st.none(),
    st.booleans(),
)


@FUZZ
@given(
    columns=st.lists(st.text(alphabet="abcxyz_ ", min_size=1, max_size=4), min_size=1,
                     max_size=4),
    rows=st.integers(0, 6),
    data=st.data(),
    suffix=st.sampled_from([".csv", ".parquet", ".csv.gz"]),
    drop=st.booleans(),
)  # fmt: skip
def test_read_table_returns_finite_numbers_or_raises_data_error(
    tmp_path_factory, columns, rows, data, suffix, drop
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / f"t{suffix}"
    values = {c: [data.draw(_cells) for _ in range(rows)] for c in dict.fromkeys(columns)}
    frame = pd.DataFrame(values, dtype=object)
    try:
        if suffix == ".parquet":
            frame.astype(str).to_parquet(path)
        else:
            frame.to_csv(path, index=False)
    except Exception:  # pandas cannot write it: nothing to read
        return
    required = list(dict.fromkeys(columns))[:2]
    try:
        table, report = read_table(path, required, drop_invalid=drop)
    except DataError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
        return
    numbers = table[required].to_numpy()
    assert numbers.dtype == np.float64 and np.isfinite(numbers).all()
    assert report.n_rows == len(table) and len(report.kept_rows) == len(table)


@FUZZ
@given(blob=st.binary(min_size=0, max_size=400), suffix=st.sampled_from([".csv", ".parquet"]))
def test_random_bytes_are_refused_in_one_line(tmp_path_factory, blob, suffix) -> None:
    path = tmp_path_factory.mktemp("bytes") / f"b{suffix}"
    path.write_bytes(blob)
    try:
        read_table(path, ["cx"])
    except DataError as err:
        assert "\n" not in str(err)


def test_damaged_parquet_written_by_flowrecon_is_refused(tmp_path) -> None:
    path = tmp_path / "d.parquet"
    write_table(pd.DataFrame({"cx": np.random.default_rng(0).random(2000)}), path)
    raw = bytearray(path.read_bytes())
    for i in range(200, 2200):  # scramble 2,000 bytes of the data pages
        raw[i] ^= 0x5A
    path.write_bytes(raw)
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_table(path, ["cx"])


def _one_line_failure(result) -> None:
    """A clean refusal: exit 1 (bad input) or 2 (usage), no traceback, one error line."""
    assert result.exit_code in (1, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output


_text = st.text(alphabet=string.printable.replace("\x0b", "").replace("\x0c", ""), max_size=12)


@FUZZ
@given(
    option=st.sampled_from(["--charges", "--geometry", "--momentum-noise", "--frame", "--seed",
                            "--epochs", "--lr", "--batch-size", "--patience", "--max-minutes"]),
    value=st.one_of(_text, st.floats().map(repr), st.integers(-(10**30), 10**30).map(str)),
)  # fmt: skip
def test_fit_options_end_in_one_line(tmp_path_factory, option, value) -> None:
    # Any value either is refused or passes the checks and then meets the missing file.
    missing = str(tmp_path_factory.mktemp("fit") / "missing.csv")
    args = ["fit", "--model", "nsf", "--data", missing, "--out", str(Path(missing).parent / "r")]
    result = CliRunner().invoke(main, [*args, option, value])
    _one_line_failure(result)


@FUZZ
@given(key=st.sampled_from(["charges", "geometry", "momentum_noise", "frame", "nosuch"]),
       value=_text)  # fmt: skip
def test_simulate_set_values_end_in_data_or_one_line(tmp_path_factory, key, value) -> None:
    out = tmp_path_factory.mktemp("sim") / "s.csv"
    result = CliRunner().invoke(
        main, ["simulate", "--n", "3", "--out", str(out), "--set", f"{key}={value}", "--quiet"]
    )
    if result.exit_code == 0:
        table = pd.read_csv(out)
        assert len(table) == 3 and np.isfinite(table.to_numpy()).all()
    else:
        _one_line_failure(result)
        assert not out.exists()


@FUZZ
@given(key=st.sampled_from(["refine", "refine_samples", "weights", "noise", "prior", "x"]),
       value=_text)  # fmt: skip
def test_evaluate_set_values_end_in_one_line(tmp_path_factory, tiny_run_dir, key, value) -> None:
    missing = str(tmp_path_factory.mktemp("ev") / "missing.csv")
    result = CliRunner().invoke(
        main, ["evaluate", "--run", str(tiny_run_dir), "--data", missing, "--set", f"{key}={value}"]
    )
    _one_line_failure(result)


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory) -> Path:
    from flowrecon.runs import fit_run
    from flowrecon.system import make_system

    data = tmp_path_factory.mktemp("tiny") / "d.parquet"
    write_table(make_system("cei").simulate(100, seed=1), data)
    out = data.parent / "run"
    fit_run("maf", out, data=data, hparams={"transforms": 1, "hidden": 8},
            training={"epochs": 1}, device="cpu", quiet=True)  # fmt: skip
    assert os.path.isdir(out)
    return out
