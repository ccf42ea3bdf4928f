"""Reading and writing tables of events, CSV or Parquet, with clear errors on bad input.

This layer knows nothing about physics: it reads a table, checks that the columns a caller
requires are there and hold finite numbers, and reports every problem as a one-line
:class:`DataError` that names the file, the column and the first offending rows. Row numbers
in messages are 1-based *data* rows: the header is not counted, so data row 1 is the first
row under the header (line 2 of a plain CSV file).

Example:
    >>> import pandas as pd, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "events.csv"
    >>> write_table(pd.DataFrame({"a": [1.0, 2.0], "tag": ["x", "y"]}), path)
    >>> df, report = read_table(path, required=["a"])
    >>> df["a"].tolist(), report.n_rows_read
    ([1.0, 2.0], 2)
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DataError",
    "ReadReport",
    "SUPPORTED_SUFFIXES",
    "TableWriter",
    "read_table",
    "write_table",
]

logger = logging.getLogger(__name__)

#: File name endings :func:`read_table` and :func:`write_table` understand.
SUPPORTED_SUFFIXES: tuple[str, ...] = (".csv", ".csv.gz", ".parquet", ".pq")

# How many offending row numbers a message quotes, and how many a ReadReport keeps.
_ROWS_IN_MESSAGE = 3
#: Largest finite float32: the networks compute in float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)
_ROWS_IN_REPORT = 10
_COLUMNS_IN_MESSAGE = 12

# pandas < 3 parses CSV floats with a fast converter that can be off by one ulp; pandas 3
# is exact by default and deprecates the option.
_CSV_FLOAT_OPTIONS = (
    {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
)


class DataError(ValueError):
    """Bad input data: the message is one line naming the file, column and rows at fault."""


@dataclass(frozen=True)
class ReadReport:
    """What :func:`read_table` read and, with ``drop_invalid=True``, what it dropped.

    Attributes:
        path: The file that was read.
        n_rows_read: Data rows in the file.
        n_rows_dropped: Rows removed because a required column held a non-numeric, missing,
            NaN or infinite value (always 0 unless ``drop_invalid=True``).
        first_dropped_rows: 1-based data row numbers of the first dropped rows (at most 10).
    """

    path: Path
    n_rows_read: int
    n_rows_dropped: int = 0
    first_dropped_rows: tuple[int, ...] = ()
    kept: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def kept_rows(self) -> np.ndarray:
        """0-based data row number in the file of each row returned (input row identity)."""
        return np.arange(self.n_rows_read) if self.kept is None else self.kept

    @property
    def n_rows(self) -> int:
        """Rows kept: ``n_rows_read - n_rows_dropped``."""
        return self.n_rows_read - self.n_rows_dropped


def read_table(
    path: str | os.PathLike[str],
    required: Sequence[str] | None = None,
    *,
    drop_invalid: bool = False,
    optional: Sequence[str] = (),
    max_abs: float | None = None,
    hint: Callable[[list[str]], str] | None = None,
) -> tuple[pd.DataFrame, ReadReport]:
    """Read a CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, ``.pq``) table.

    The ``required`` columns must be present and hold finite numbers; they are returned as
    float64. ``optional`` columns are checked and converted the same way when present. All
    other columns are kept as read, in file order. Rows keep their file order and the index
    is a fresh ``RangeIndex``.

    Args:
        path: The file; its suffix chooses the format.
        required: Columns that must exist and hold finite numbers.
        drop_invalid: Remove rows with a non-numeric, empty, NaN, infinite (or beyond
            ``max_abs``) value in a checked column instead of raising; the count is logged
            and kept in the report.
        optional: Columns checked like ``required`` when present, ignored when absent.
        max_abs: Finite values beyond this magnitude are invalid too, e.g. `FLOAT32_MAX`
            for data a float32 network will see.
        hint: ``hint(found_columns) -> text`` appended to the message about missing
            columns (a system says, e.g., which of its variants the file's columns fit).

    Returns:
        The table and a :class:`ReadReport`.

    Raises:
        DataError: Missing or unreadable file, unknown suffix, no rows, duplicated column
            names, missing required columns, or invalid values (unless ``drop_invalid``);
            with ``drop_invalid``, also when no valid row is left.

    Example:
        >>> import pandas as pd, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.parquet"
        >>> write_table(pd.DataFrame({"x": [1, 2], "y": [0.5, float("nan")]}), path)
        >>> df, report = read_table(path, ["x", "y"], drop_invalid=True)
        >>> df["x"].tolist(), report.n_rows_dropped, report.first_dropped_rows
        ([1.0], 1, (2,))
    """
    source = str(path)
    kind = _kind_of(path)
    file = Path(path)
    if not file.exists():
        raise DataError(f"{source}: file not found")
    if file.is_dir():
        raise DataError(f"{source}: is a directory, expected a {kind} file")
    frame = _read_csv(file, source) if kind == "CSV" else _read_parquet(file, source)

    n_read = len(frame)
    required = list(dict.fromkeys(required or ()))
    missing = [c for c in required if c not in frame.columns]
    if missing:
        message = _missing_message(source, missing, list(frame.columns))
        if hint is not None:
            message += hint([str(c) for c in frame.columns])
        raise DataError(message)
    checked = required + [c for c in dict.fromkeys(optional) if c in frame and c not in required]
    frame, dropped = _check_numeric(frame, checked, source, drop_invalid, max_abs)
    report = ReadReport(
        path=file,
        n_rows_read=n_read,
        n_rows_dropped=len(dropped),
        first_dropped_rows=tuple(int(i) + 1 for i in dropped[:_ROWS_IN_REPORT]),
        kept=np.setdiff1d(np.arange(n_read), dropped) if len(dropped) else None,
    )
    return frame, report


def write_table(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a table as CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, ``.pq``).

    Parent folders are created. The file appears atomically: it is written to a temporary
    file in the same folder and renamed over ``path``, so an interrupted write never leaves
    a truncated table behind. The index is not written. CSV floats are written with the
    shortest text that reads back to the same float64, so round trips are exact. Parquet
    pages carry CRC checksums, which :func:`read_table` verifies.

    Args:
        df: The table; column names must be unique.
        path: Destination; its suffix chooses the format.

    Raises:
        DataError: Unknown suffix or duplicated column names.

    Example:
        >>> import pandas as pd, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "sub" / "t.csv"
        >>> write_table(pd.DataFrame({"x": [0.1, 1 / 3]}), path)
        >>> path.read_text().splitlines()
        ['x', '0.1', '0.3333333333333333']
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"write_table expects a pandas DataFrame, got {type(df).__name__}")
    with TableWriter(path) as writer:
        writer.write(df)


class TableWriter:
    """Writes a table chunk by chunk, so that it need not fit in memory; atomic like
    :func:`write_table` (the file appears on a clean exit of the ``with`` block only).

    Example:
        >>> import pandas as pd, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.parquet"
        >>> with TableWriter(path) as w:
        ...     w.write(pd.DataFrame({"x": [1.0]})); w.write(pd.DataFrame({"x": [2.0]}))
        >>> read_table(path, ["x"])[0]["x"].tolist()
        [1.0, 2.0]
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.source = str(path)
        self.kind = _kind_of(path)
        self.target = Path(path)
        self.tmp = self.target.with_name(f".{self.target.name}.{uuid.uuid4().hex[:12]}.tmp")
        self._handle: BinaryIO | None = None
        self._stream: BinaryIO | None = None
        self._parquet: pq.ParquetWriter | None = None
        self._columns: list[str] | None = None
        self._chunks = 0

    def __enter__(self) -> TableWriter:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 lets the umask decide the permissions, as for an ordinary
        # file; tempfile.mkstemp would leave the final file readable by its owner only.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        self._handle = os.fdopen(os.open(self.tmp, flags, 0o666), "wb")
        self._stream = self._handle
        if self.kind == "CSV" and self.target.name.lower().endswith(".gz"):
            # mtime=0 keeps the gzip bytes reproducible for identical tables.
            self._stream = gzip.GzipFile(fileobj=self._handle, mode="wb", mtime=0)
        return self

    def write(self, df: pd.DataFrame) -> None:
        """Appends the rows of ``df``; every chunk must have the first chunk's columns."""
        columns = [str(c) for c in df.columns]
        if self._columns is None:
            duplicated = _duplicates(columns)
            if duplicated:
                raise DataError(f"{self.source}: cannot write duplicated column names {duplicated}")
            self._columns = columns
        elif columns != self._columns:
            raise DataError(f"{self.source}: a later chunk has other columns than the first")
        assert self._stream is not None, "use TableWriter in a with block"
        if self.kind == "CSV":
            df.to_csv(self._stream, index=False, header=self._chunks == 0, mode="wb",
                      encoding="utf-8")  # fmt: skip
            self._chunks += 1
            return
        table = pa.Table.from_pandas(df, preserve_index=False)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._stream, table.schema, write_page_checksum=True)
        self._parquet.write_table(table)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                if self._columns is None:
                    raise DataError(f"{self.source}: nothing was written")
                self._close()
                os.replace(self.tmp, self.target)
        finally:
            # Also on KeyboardInterrupt: never leave the temporary file behind.
            if self._handle is not None and not self._handle.closed:
                self._handle.close()
            self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        assert self._handle is not None and self._stream is not None
        if self._parquet is not None:
            self._parquet.close()
        if self._stream is not self._handle:
            self._stream.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()


# --------------------------------------------------------------------------------------
# Formats


def _kind_of(path: str | os.PathLike[str]) -> str:
    """Return "CSV" or "Parquet" from the file name, or raise DataError."""
    name = Path(path).name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return "CSV"
    if name.endswith((".parquet", ".pq")):
        return "Parquet"
    suffix = "".join(Path(name).suffixes[-2:])
    what = f"unsupported file type '{suffix}'" if suffix else "no file extension"
    raise DataError(f"{path}: {what}; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def _open_text(file: Path) -> TextIO:
    """Open a CSV file as text, decompressing .gz; utf-8-sig drops a byte-order mark."""
    if file.name.lower().endswith(".gz"):
        return gzip.open(file, "rt", encoding="utf-8-sig", newline="")
    return open(file, encoding="utf-8-sig", newline="")


def _csv_rows(file: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) for each non-blank CSV row, as pandas sees the rows."""
    with _open_text(file) as handle:
        reader = csv.reader(handle, skipinitialspace=True)
        for fields in reader:
            if fields:  # pandas skips blank lines, so they are not rows
                yield reader.line_num, fields


def _csv_header(file: Path, source: str) -> list[str] | None:
    """The header's fields, or None for a file without any row."""
    try:
        with closing(_csv_rows(file)) as rows:
            first = next(rows, None)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{source}: cannot read CSV: {_one_line(err)}") from None
    return None if first is None else first[1]


def _read_csv(file: Path, source: str) -> pd.DataFrame:
    # The header is read here rather than by pandas because pandas renames duplicated
    # names ('x', 'x.1') before anyone can see that they were duplicated.
    names = _csv_header(file, source)
    if names is None:
        raise DataError(f"{source}: file is empty")
    duplicated = _duplicates(n for n in names if n)
    if duplicated:
        raise DataError(f"{source}: duplicated column names in the header: {duplicated}")

    try:
        with warnings.catch_warnings():
            # A ParserWarning means pandas dropped fields of a ragged row: make it an error.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                file,
                skipinitialspace=True,
                index_col=False,  # never turn the first column into the index
                low_memory=False,  # infer one dtype per column, not one per chunk
                encoding="utf-8-sig",
                compression="gzip" if file.name.lower().endswith(".gz") else None,
                **_CSV_FLOAT_OPTIONS,
            )
    except (ValueError, OSError, EOFError, pd.errors.ParserWarning) as err:
        # ParserError and UnicodeDecodeError are ValueErrors; find the ragged row ourselves
        # so the message names it, else pass on pandas' reason in one line.
        _raise_on_ragged_row(file, source, len(names))
        raise DataError(f"{source}: cannot parse CSV: {_one_line(err)}") from None

    # pandas pads short rows with NaN without a word; a short row always leaves the last
    # column empty, so only then is the (slower) row-by-row check needed.
    if len(frame.columns) and frame.iloc[:, -1].isna().any():
        _raise_on_ragged_row(file, source, len(names))
    if frame.empty:
        raise DataError(f"{source}: has a header but no data rows")
    return frame


def _raise_on_ragged_row(file: Path, source: str, n_fields: int) -> None:
    """Raise DataError for the first row whose field count differs from the header's."""
    try:
        with closing(_csv_rows(file)) as rows:
            next(rows, None)  # header
            for row, (line, fields) in enumerate(rows, start=1):
                if len(fields) != n_fields:
                    raise DataError(
                        f"{source}: data row {row} (line {line}) has {len(fields)} fields, "
                        f"the header has {n_fields}{_separator_hint(_csv_header(file, source))}"
                    )
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{source}: cannot read CSV: {_one_line(err)}") from None


def _read_parquet(file: Path, source: str) -> pd.DataFrame:
    if file.stat().st_size == 0:
        raise DataError(f"{source}: file is empty")
    try:
        # Pages written with checksums (flowrecon writes them) are verified: a damaged
        # file is refused instead of read as values like 9e33.
        with pq.ParquetFile(file, page_checksum_verification=True) as parquet:
            names = parquet.schema_arrow.names
            duplicated = _duplicates(names)
            if duplicated:
                raise DataError(f"{source}: duplicated column names: {duplicated}")
            table = parquet.read()
        frame = table.to_pandas()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{source}: not a readable Parquet file: {_one_line(err)}") from None
    if frame.empty:
        raise DataError(f"{source}: has no rows")
    # pandas may have stored its index in the file: named levels are data (keep them as
    # columns), an unnamed index is row bookkeeping (drop it).
    named = [n for n in frame.index.names if n is not None]
    if named:
        frame = frame.reset_index(level=named)
    return frame.reset_index(drop=True)


# --------------------------------------------------------------------------------------
# Checks


def _check_numeric(
    frame: pd.DataFrame,
    columns: Sequence[str],
    source: str,
    drop_invalid: bool,
    max_abs: float | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Convert ``columns`` to float64; raise on bad values, or drop their rows.

    Returns the frame and the 0-based positions of the dropped rows.
    """
    n_rows = len(frame)
    problems: list[tuple[str, str]] = []  # (column, description), in column order
    invalid = np.zeros(n_rows, dtype=bool)
    converted = {}
    for column in columns:
        values, non_numeric, example = _to_float64(frame[column])
        nan = np.isnan(values) & ~non_numeric
        inf = np.isinf(values)
        huge = np.isfinite(values) & (np.abs(values) > (math.inf if max_abs is None else max_abs))
        for mask, what in (
            (non_numeric, "non-numeric value"),
            (nan, "empty or NaN value"),
            (inf, "infinite value"),
            (huge, f"value beyond {max_abs or math.inf:.3g} in magnitude"),
        ):
            if mask.any():
                detail = f" (e.g. {example})" if mask is non_numeric else ""
                problems.append((column, f"{_count(mask, what)}{_where(mask)}{detail}"))
                invalid |= mask
        converted[column] = values

    for column, values in converted.items():
        frame[column] = values  # same position, now float64
    if not problems:
        return frame, np.empty(0, dtype=np.intp)

    first_column, first = problems[0]
    others = list(dict.fromkeys(c for c, _ in problems[1:]))
    also = f"; also invalid values in column(s) {_quoted(others)}" if others else ""
    message = f"column {first_column!r} has {first}{also}"
    if not drop_invalid:
        raise DataError(f"{source}: {message}")
    if invalid.all():
        raise DataError(f"{source}: all {n_rows} rows are invalid; {message}")

    dropped = np.flatnonzero(invalid)
    logger.warning(
        "%s: dropped %d of %d rows with non-numeric, empty, NaN, infinite or out-of-range "
        "values in required columns%s",
        source,
        len(dropped),
        n_rows,
        _where(invalid),
    )
    return frame.loc[~invalid].reset_index(drop=True), dropped


def _to_float64(series: pd.Series) -> tuple[np.ndarray, np.ndarray, str]:
    """Return float64 values (NaN where not a number), the non-numeric mask, an example."""
    n = len(series)
    dtype = series.dtype
    if pd.api.types.is_numeric_dtype(dtype) and not (
        pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_complex_dtype(dtype)
    ):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        return values, np.zeros(n, dtype=bool), ""

    # Text (a CSV column with a stray word), booleans, dates, mixed objects: go value by
    # value with Python's float(), which is exact and says precisely what it cannot read.
    values = np.full(n, np.nan)
    non_numeric = np.zeros(n, dtype=bool)
    example = ""
    for i, value in enumerate(series.to_numpy(dtype=object)):
        number = _parse_number(value)
        if number is None:
            non_numeric[i] = True
            if not example:
                text = repr(value)
                example = text if len(text) <= 40 else text[:37] + "..."
        else:
            values[i] = number
    return values, non_numeric, example


def _parse_number(value: object) -> float | None:
    """float(value), NaN for a missing value, or None if it is not a number."""
    if value is None or value is pd.NA or value is pd.NaT:
        return math.nan
    if isinstance(value, (bool, np.bool_)):
        return None  # float(True) works, but True is not a coordinate
    if isinstance(value, str):
        if "_" in value:
            return None  # float() accepts '1_000'; no CSV reader does
        value = value.strip()
        if not value:
            return math.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None


# --------------------------------------------------------------------------------------
# Messages


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _quoted(names: Sequence[object]) -> str:
    shown = ", ".join(repr(str(n)) for n in names[:_COLUMNS_IN_MESSAGE])
    more = len(names) - _COLUMNS_IN_MESSAGE
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _duplicates(names: Iterable[str]) -> str:
    """Describe duplicated names with their 1-based column numbers, or return ''."""
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(names, start=1):
        positions.setdefault(name, []).append(i)
    repeated = [
        f"{name!r} (columns {', '.join(map(str, where))})"
        for name, where in positions.items()
        if len(where) > 1
    ]
    return ", ".join(repeated)


def _count(mask: np.ndarray, what: str) -> str:
    k = int(mask.sum())
    return f"{k} {what}" if k == 1 else f"{k} {what}s"


def _where(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)[:_ROWS_IN_MESSAGE] + 1
    if mask.sum() == 1:
        return f", at data row {rows[0]}"
    return f", first at data rows {', '.join(map(str, rows))}"


def _separator_hint(header: Sequence[object] | None) -> str:
    """A hint when a one-field header looks separated by something other than commas."""
    if header is None or len(header) != 1:
        return ""
    for separator, label in ((";", "';'"), ("\t", "tab"), (" ", "space")):
        if separator in str(header[0]).strip():
            decimal = " and decimal points" if separator == ";" else ""
            return f" (the file looks {label}-separated; CSV files must use commas{decimal})"
    return ""


def _missing_message(source: str, missing: list[str], found: list[object]) -> str:
    plural = "s" if len(missing) > 1 else ""
    message = f"{source}: missing required column{plural} {_quoted(missing)}"
    message += f"; found {_quoted(found)}" if found else "; found no columns"
    # Two common near misses: another separator, and names differing in case or spaces.
    message += _separator_hint(found)
    if found and all(_parse_number(str(f)) is not None for f in found):
        message += " (the first line holds numbers: the file needs a header naming the columns)"
    normalised = {str(f).strip().lstrip("#").strip().lower(): f for f in found}
    near = [(m, normalised[m.lower()]) for m in missing if m.lower() in normalised]
    if near:
        wanted, got = near[0]
        message += f" (column {str(got)!r} would match {wanted!r}; names are exact)"
    return message
