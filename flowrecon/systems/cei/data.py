"""CEI event files: initial positions and final momenta of C, O and S, one event per row.

The column contract is :data:`~flowrecon.systems.cei.constants.POSITION_COLUMNS` (bohr)
and :data:`~flowrecon.systems.cei.constants.MOMENTUM_COLUMNS` (atomic units). Any other
columns are carried along untouched. Files are CSV or Parquet, see :mod:`flowrecon.data`.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "events.parquet"
    >>> save_events(path, np.zeros((2, 9)), np.ones((2, 9)), extra={"run": [7, 7]})
    >>> events = load_events(path)
    >>> events.positions.shape, events.momenta.shape, list(events.extra_columns)
    ((2, 9), (2, 9), ['run'])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from flowrecon.data import DataError, ReadReport, read_table, write_table
from flowrecon.systems.cei.constants import ALL_COLUMNS, MOMENTUM_COLUMNS, POSITION_COLUMNS

__all__ = ["Events", "events_to_frame", "load_events", "save_events"]


@dataclass(frozen=True)
class Events:
    """Events read from a file.

    Attributes:
        positions: Initial positions, shape (N, 9), float64, ordered as ``POSITION_COLUMNS``;
            None for a file with momenta only.
        momenta: Final momenta, shape (N, 9), float64, ordered as ``MOMENTUM_COLUMNS``.
        frame: The whole table, contract columns as float64 and extra columns as read.
        report: How many rows were read and dropped.
    """

    positions: np.ndarray | None
    momenta: np.ndarray
    frame: pd.DataFrame
    report: ReadReport

    def __len__(self) -> int:
        return len(self.momenta)

    @property
    def extra_columns(self) -> pd.DataFrame:
        """The columns outside the contract, e.g. to pass on as ``extra`` to :func:`save_events`."""
        return self.frame.drop(columns=[c for c in ALL_COLUMNS if c in self.frame.columns])


def load_events(
    path: str | os.PathLike[str], *, drop_invalid: bool = False, require_positions: bool = True
) -> Events:
    """Load CEI events from a CSV or Parquet file.

    Args:
        path: The file (``.csv``, ``.csv.gz``, ``.parquet`` or ``.pq``).
        drop_invalid: Drop rows with non-numeric, empty, NaN or infinite values in the
            contract columns instead of raising; the count is in ``report``.
        require_positions: False for files with momenta only (inference). Position
            columns are still loaded when all nine are present.

    Returns:
        The :class:`Events`.

    Raises:
        DataError: The file cannot be read or breaks the column contract; also when
            ``require_positions`` is False and only some position columns are present.
    """
    if require_positions:
        frame, report = read_table(path, ALL_COLUMNS, drop_invalid=drop_invalid)
    else:
        frame, report = read_table(
            path, MOMENTUM_COLUMNS, drop_invalid=drop_invalid, optional=POSITION_COLUMNS
        )
    present = [c for c in POSITION_COLUMNS if c in frame.columns]
    if 0 < len(present) < len(POSITION_COLUMNS):
        # Half a geometry is more likely a broken file than a momenta-only one.
        absent = ", ".join(repr(c) for c in POSITION_COLUMNS if c not in frame.columns)
        raise DataError(
            f"{path}: has some position columns but lacks {absent}; "
            "give all nine position columns or none"
        )
    positions = frame[list(POSITION_COLUMNS)].to_numpy(np.float64) if present else None
    momenta = frame[list(MOMENTUM_COLUMNS)].to_numpy(np.float64)
    return Events(positions=positions, momenta=momenta, frame=frame, report=report)


def events_to_frame(
    positions: Any | None,
    momenta: Any,
    extra: Mapping[str, Any] | pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Build an event table with the contract columns in contract order, then ``extra``.

    Args:
        positions: Array-like of shape (N, 9) or (N, 3, 3) (atoms C, O, S by x, y, z), or
            None to write momenta only.
        momenta: Array-like of shape (N, 9) or (N, 3, 3).
        extra: Further columns, name to length-N values, appended in the given order.

    Returns:
        The table; contract columns are float64.

    Raises:
        ValueError: Wrong shapes, lengths, or an extra name that clashes with the contract.

    Example:
        >>> import numpy as np
        >>> frame = events_to_frame(np.zeros((1, 3, 3)), np.ones((1, 9)))
        >>> list(frame.columns[:4]), frame.shape
        (['cx', 'cy', 'cz', 'ox'], (1, 18))
    """
    momenta = _as_events_array(momenta, "momenta")
    data = {}
    if positions is not None:
        positions = _as_events_array(positions, "positions")
        if len(positions) != len(momenta):
            raise ValueError(
                f"positions and momenta must have the same number of events, "
                f"got {len(positions)} and {len(momenta)}"
            )
        data.update(zip(POSITION_COLUMNS, positions.T, strict=True))
    data.update(zip(MOMENTUM_COLUMNS, momenta.T, strict=True))
    frame = pd.DataFrame(data)

    for name, values in extra.items() if extra is not None else ():
        if name in ALL_COLUMNS:
            raise ValueError(f"extra column {name!r} clashes with a contract column")
        if name in frame.columns:
            raise ValueError(f"extra column {name!r} given twice")
        if len(values) != len(momenta):
            raise ValueError(
                f"extra column {name!r} has {len(values)} values, expected {len(momenta)}"
            )
        if isinstance(values, pd.Series):
            # Keep its dtype, but take the values in order whatever its index says.
            frame[name] = values.reset_index(drop=True)
        else:
            frame[name] = np.asarray(values)
    return frame


def save_events(
    path: str | os.PathLike[str],
    positions: Any | None,
    momenta: Any,
    extra: Mapping[str, Any] | pd.DataFrame | None = None,
) -> None:
    """Write events to a CSV or Parquet file (chosen by suffix), atomically.

    Arguments are those of :func:`events_to_frame`; :func:`load_events` reads the file back
    exactly, float64 values included.

    Example:
        >>> import numpy as np, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "predicted.csv"
        >>> save_events(path, None, np.full((3, 9), 0.1))
        >>> load_events(path, require_positions=False).positions is None
        True
    """
    write_table(events_to_frame(positions, momenta, extra), path)


def _as_events_array(values: Any, name: str) -> np.ndarray:
    """Return a (N, 9) float64 array from (N, 9) or (N, 3, 3) numpy or torch data."""
    if hasattr(values, "detach"):  # a torch tensor, possibly on a GPU
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 3 and array.shape[1:] == (3, 3):
        array = array.reshape(len(array), 9)
    if array.ndim != 2 or array.shape[1] != 9:
        raise ValueError(f"{name} must have shape (N, 9) or (N, 3, 3), got {array.shape}")
    return array
