"""Tests of flowrecon.data: table I/O and its error messages."""

from __future__ import annotations

import gzip
import logging
import os
import stat
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowrecon.data import DataError, ReadReport, read_table, write_table


def error_of(path, *args, **kwargs) -> str:
    """The DataError message read_table gives; it must be a single line."""
    with pytest.raises(DataError) as info:
        read_table(path, *args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def write_text(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------
# Files and formats


def test_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    assert error_of(path) == f"{path}: file not found"


def test_directory_is_not_a_file(tmp_path):
    path = tmp_path / "folder.parquet"
    path.mkdir()
    assert error_of(path) == f"{path}: is a directory, expected a Parquet file"


@pytest.mark.parametrize(
    ("name", "what"),
    [("data.txt", "unsupported file type '.txt'"), ("data", "no file extension")],
)
def test_unknown_suffix(tmp_path, name, what):
    path = write_text(tmp_path / name, "a\n1\n")
    expected = f"{path}: {what}; supported: .csv, .csv.gz, .parquet, .pq"
    assert error_of(path) == expected
    with pytest.raises(DataError, match="supported: .csv"):
        write_table(pd.DataFrame({"a": [1]}), path)


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_csv(tmp_path, text):
    path = write_text(tmp_path / "empty.csv", text)
    assert error_of(path, ["a"]) == f"{path}: file is empty"


def test_empty_gzip_csv(tmp_path):
    path = tmp_path / "empty.csv.gz"
    path.write_bytes(gzip.compress(b""))
    assert error_of(path) == f"{path}: file is empty"


def test_empty_parquet(tmp_path):
    path = tmp_path / "empty.parquet"
    path.write_bytes(b"")
    assert error_of(path) == f"{path}: file is empty"


def test_header_only_csv(tmp_path):
    path = write_text(tmp_path / "head.csv", "a,b\n")
    assert error_of(path, ["a"]) == f"{path}: has a header but no data rows"


def test_parquet_without_rows(tmp_path):
    path = tmp_path / "none.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.float64())}), path)
    assert error_of(path, ["a"]) == f"{path}: has no rows"


def test_corrupt_parquet(tmp_path):
    path = write_text(tmp_path / "fake.parquet", "a,b\n1,2\n")
    assert error_of(path).startswith(f"{path}: not a readable Parquet file: ")


def test_corrupt_gzip_csv(tmp_path):
    path = write_text(tmp_path / "fake.csv.gz", "a,b\n1,2\n")
    assert error_of(path).startswith(f"{path}: cannot read CSV: ")


def test_csv_gz_reads(tmp_path):
    path = tmp_path / "ok.csv.gz"
    path.write_bytes(gzip.compress(b"a,b\n1,2\n3,4\n"))
    df, report = read_table(path, ["a"])
    assert df["a"].tolist() == [1.0, 3.0]
    assert report == ReadReport(path=path, n_rows_read=2)


def test_byte_order_mark_and_spaces_after_commas(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffa, b\n1, 2\n".encode())
    df, _ = read_table(path, ["a", "b"])
    assert list(df.columns) == ["a", "b"]
    assert df.to_numpy().tolist() == [[1.0, 2.0]]


# ---------------------------------------------------------------------------------------
# Header and columns


def test_duplicated_header_csv(tmp_path):
    path = write_text(tmp_path / "dup.csv", "a,b,a,c,b\n1,2,3,4,5\n")
    expected = (
        f"{path}: duplicated column names in the header: 'a' (columns 1, 3), 'b' (columns 2, 5)"
    )
    assert error_of(path) == expected


def test_duplicated_names_parquet(tmp_path):
    path = tmp_path / "dup.parquet"
    table = pa.Table.from_arrays([pa.array([1.0]), pa.array([2.0])], names=["x", "x"])
    pq.write_table(table, path)
    assert error_of(path, ["x"]) == f"{path}: duplicated column names: 'x' (columns 1, 2)"


def test_missing_columns_listed_with_found(tmp_path):
    path = write_text(tmp_path / "cols.csv", "a,b\n1,2\n")
    expected = f"{path}: missing required columns 'c', 'd'; found 'a', 'b'"
    assert error_of(path, ["a", "c", "b", "d"]) == expected
    assert error_of(path, ["c"]) == f"{path}: missing required column 'c'; found 'a', 'b'"


def test_missing_column_hints(tmp_path):
    semicolons = write_text(tmp_path / "semi.csv", "a;b\n1;2\n")
    assert "looks ';'-separated" in error_of(semicolons, ["a"])
    case = write_text(tmp_path / "case.csv", "A,b\n1,2\n")
    assert "column 'A' would match 'a'" in error_of(case, ["a"])
    no_header = write_text(tmp_path / "numbers.csv", "1.5,2\n3,4\n")
    assert "needs a header" in error_of(no_header, ["a"])


# ---------------------------------------------------------------------------------------
# Values


def column_with(values: dict[int, str], n: int = 12) -> str:
    """CSV text with columns (t, pcx); data row r (1-based) of pcx set from ``values``."""
    rows = [f"{r},{values.get(r, str(r / 10))}" for r in range(1, n + 1)]
    return "t,pcx\n" + "\n".join(rows) + "\n"


def test_non_numeric_value_with_rows(tmp_path):
    path = write_text(tmp_path / "data.csv", column_with({4: "abc", 9: "1,2", 12: "x"}))
    # "1,2" unquoted would be a ragged row; quote it to keep this test about the value.
    path.write_text(path.read_text().replace("1,2", '"1,2"'))
    expected = (
        f"{path}: column 'pcx' has 3 non-numeric values, first at data rows 4, 9, 12 (e.g. 'abc')"
    )
    assert error_of(path, ["t", "pcx"]) == expected


def test_non_numeric_single_and_other_columns(tmp_path):
    path = write_text(tmp_path / "data.csv", "t,pcx,pcy\n1,2,3\nx,nan,inf\n")
    expected = (
        f"{path}: column 't' has 1 non-numeric value, at data row 2 (e.g. 'x'); "
        "also invalid values in column(s) 'pcx', 'pcy'"
    )
    assert error_of(path, ["t", "pcx", "pcy"]) == expected


@pytest.mark.parametrize("missing", ["", "nan", "NaN", "NA"])
def test_nan_or_empty(tmp_path, missing):
    path = write_text(tmp_path / "nan.csv", column_with({2: missing, 5: missing}))
    expected = f"{path}: column 'pcx' has 2 empty or NaN values, first at data rows 2, 5"
    assert error_of(path, ["pcx"]) == expected


@pytest.mark.parametrize("infinity", ["inf", "-inf", "Infinity"])
def test_infinite(tmp_path, infinity):
    path = write_text(tmp_path / "inf.csv", column_with({7: infinity}))
    assert error_of(path, ["pcx"]) == f"{path}: column 'pcx' has 1 infinite value, at data row 7"


def test_parquet_text_and_bool_columns_are_not_numbers(tmp_path):
    path = tmp_path / "types.parquet"
    frame = pd.DataFrame({"s": ["1.5", "oops", "2"], "b": [True, False, True], "f": [1.0] * 3})
    write_table(frame, path)
    assert error_of(path, ["s"]) == (
        f"{path}: column 's' has 1 non-numeric value, at data row 2 (e.g. 'oops')"
    )
    assert "column 'b' has 3 non-numeric values" in error_of(path, ["b"])
    df, _ = read_table(path, ["s"], drop_invalid=True)
    assert df["s"].tolist() == [1.5, 2.0]


def test_ragged_csv_too_many_fields(tmp_path):
    path = write_text(tmp_path / "ragged.csv", "a,b\n1,2\n3,4,5\n6,7\n")
    assert error_of(path) == f"{path}: data row 2 (line 3) has 3 fields, the header has 2"


def test_ragged_csv_too_few_fields(tmp_path):
    # pandas would pad the short row with NaN silently; the message must name the row.
    path = write_text(tmp_path / "short.csv", "a,b,c\n1,2,3\n4,5\n")
    assert error_of(path) == f"{path}: data row 2 (line 3) has 2 fields, the header has 3"


def test_every_row_one_field_longer_than_header(tmp_path):
    # pandas would silently make the first column the index here.
    path = write_text(tmp_path / "shifted.csv", "a,b\n0,1,2\n1,3,4\n")
    assert error_of(path) == f"{path}: data row 1 (line 2) has 3 fields, the header has 2"


def test_empty_trailing_cell_is_nan_not_ragged(tmp_path):
    path = write_text(tmp_path / "trail.csv", "a,b\n1,2\n3,\n")
    assert error_of(path, ["b"]) == f"{path}: column 'b' has 1 empty or NaN value, at data row 2"


# ---------------------------------------------------------------------------------------
# drop_invalid


def test_drop_invalid_reports_and_keeps_order(tmp_path, caplog):
    text = column_with({3: "abc", 5: "", 8: "inf"}, n=10)
    path = write_text(tmp_path / "drop.csv", text)
    with caplog.at_level(logging.WARNING, logger="flowrecon.data"):
        df, report = read_table(path, ["t", "pcx"], drop_invalid=True)
    assert report == ReadReport(
        path, n_rows_read=10, n_rows_dropped=3, first_dropped_rows=(3, 5, 8)
    )
    assert report.n_rows == 7
    assert df["t"].tolist() == [1.0, 2.0, 4.0, 6.0, 7.0, 9.0, 10.0]
    assert df["pcx"].tolist() == [r / 10 for r in (1, 2, 4, 6, 7, 9, 10)]
    assert df.index.equals(pd.RangeIndex(7))
    assert df["pcx"].dtype == np.float64
    assert "dropped 3 of 10 rows" in caplog.text and "first at data rows 3, 5, 8" in caplog.text


def test_drop_invalid_all_rows_raises(tmp_path):
    path = write_text(tmp_path / "bad.csv", "a\nx\ny\n")
    message = error_of(path, ["a"], drop_invalid=True)
    assert message.startswith(f"{path}: all 2 rows are invalid; column 'a' has 2 non-numeric")


def test_without_required_nothing_is_checked(tmp_path):
    path = write_text(tmp_path / "any.csv", "a,b\nx,1\n,2\n")
    df, report = read_table(path)
    assert df["b"].tolist() == [1, 2] and df["a"].isna().tolist() == [False, True]
    assert report.n_rows_dropped == 0


def test_optional_columns_checked_when_present(tmp_path):
    path = write_text(tmp_path / "opt.csv", "a,b\n1,2\n3,nan\n")
    assert "column 'b' has 1 empty or NaN value" in error_of(path, ["a"], optional=["b"])
    df, _ = read_table(path, ["a"], optional=["zz"])
    assert df["b"].isna().sum() == 1


# ---------------------------------------------------------------------------------------
# Round trips and writing


SUFFIXES = [".csv", ".csv.gz", ".parquet", ".pq"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_float64_round_trip_is_exact(tmp_path, suffix):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(200, 3)) * 10.0 ** rng.integers(-30, 30, size=(200, 3))
    values[:6, 0] = [0.1, 1 / 3, 5e-324, 1.7976931348623157e308, -2.2250738585072014e-308, 1.0]
    frame = pd.DataFrame(values, columns=["x", "y", "z"])
    path = tmp_path / f"exact{suffix}"
    write_table(frame, path)
    df, _ = read_table(path, ["x", "y", "z"])
    np.testing.assert_array_equal(df.to_numpy().view(np.int64), values.view(np.int64))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_extra_columns_kept_in_order_with_dtypes(tmp_path, suffix):
    frame = pd.DataFrame(
        {
            "run": np.array([7, 7, 8], dtype=np.int64),
            "x": [0.5, -1.5, 2.0],
            "label": ["a", "b c", 'q"uote'],
            "weight": [1.0, 2.0, 3.0],  # integral floats must stay floats
            "flag": [True, False, True],
            "y": [1, 2, 3],  # required: read as float64
        }
    )
    path = tmp_path / f"extra{suffix}"
    write_table(frame, path)
    df, _ = read_table(path, ["x", "y"])
    assert list(df.columns) == list(frame.columns)
    assert df["run"].dtype == np.int64 and df["run"].tolist() == [7, 7, 8]
    assert df["weight"].dtype == np.float64 and df["flag"].dtype == bool
    assert df["label"].tolist() == ["a", "b c", 'q"uote']
    assert df["y"].dtype == np.float64 and df["y"].tolist() == [1.0, 2.0, 3.0]


def test_parquet_index_from_pandas(tmp_path):
    named = tmp_path / "named.parquet"
    pd.DataFrame({"x": [1.0, 2.0]}, index=pd.Index([10, 20], name="event")).to_parquet(named)
    df, _ = read_table(named, ["x"])
    assert list(df.columns) == ["event", "x"] and df.index.equals(pd.RangeIndex(2))
    filtered = tmp_path / "filtered.parquet"
    pd.DataFrame({"x": [1.0, 2.0, 3.0]}).iloc[[2, 0]].to_parquet(filtered)
    df, _ = read_table(filtered, ["x"])
    assert list(df.columns) == ["x"] and df["x"].tolist() == [3.0, 1.0]
    assert df.index.equals(pd.RangeIndex(2))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_write_is_atomic_and_leaves_no_temp_files(tmp_path, suffix):
    path = tmp_path / "deep" / "er" / f"out{suffix}"
    write_table(pd.DataFrame({"x": [1.0]}), path)
    write_table(pd.DataFrame({"x": [2.0, 3.0]}), path)  # overwrite
    assert os.listdir(path.parent) == [path.name]
    assert read_table(path, ["x"])[0]["x"].tolist() == [2.0, 3.0]


def test_failed_write_keeps_old_file_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "keep.csv"
    write_table(pd.DataFrame({"x": [1.0]}), path)
    before = path.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_table(pd.DataFrame({"x": [2.0]}), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.csv"]


def test_write_rejects_duplicated_columns(tmp_path):
    frame = pd.DataFrame([[1.0, 2.0]], columns=["x", "x"])
    with pytest.raises(
        DataError, match=r"cannot write duplicated column names 'x' \(columns 1, 2\)"
    ):
        write_table(frame, tmp_path / "dup.csv")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_written_file_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_table(pd.DataFrame({"x": [1.0]}), tmp_path / "mode.parquet")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "mode.parquet").stat().st_mode) == 0o644
