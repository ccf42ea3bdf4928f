"""Tests of flowrecon.systems.cei.data: CEI event files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flowrecon.data import DataError, write_table
from flowrecon.systems.cei.constants import ALL_COLUMNS, MOMENTUM_COLUMNS, POSITION_COLUMNS
from flowrecon.systems.cei.data import events_to_frame, load_events, save_events

FORMATS = [".csv", ".parquet"]


@pytest.fixture
def arrays():
    rng = np.random.default_rng(1)
    return rng.normal(size=(20, 9)) * 2.0, rng.normal(size=(20, 9)) * 30.0


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_with_extra_columns(tmp_path, arrays, suffix):
    positions, momenta = arrays
    path = tmp_path / f"events{suffix}"
    save_events(path, positions, momenta, extra={"run": np.arange(20), "tag": ["a"] * 20})
    events = load_events(path)
    np.testing.assert_array_equal(events.positions, positions)
    np.testing.assert_array_equal(events.momenta, momenta)
    assert events.positions.dtype == events.momenta.dtype == np.float64
    assert list(events.frame.columns) == [*ALL_COLUMNS, "run", "tag"]
    assert list(events.extra_columns.columns) == ["run", "tag"]
    assert len(events) == 20 and events.report.n_rows_read == 20

    # Rewriting keeps the extra columns.
    again = tmp_path / f"again{suffix}"
    save_events(again, events.positions, events.momenta, extra=events.extra_columns)
    pd.testing.assert_frame_equal(load_events(again).frame, events.frame)


@pytest.mark.parametrize("suffix", FORMATS)
def test_columns_in_any_order(tmp_path, arrays, suffix):
    positions, momenta = arrays
    frame = events_to_frame(positions, momenta, extra={"note": ["x"] * 20})
    shuffled = frame[["note", *MOMENTUM_COLUMNS[::-1], *POSITION_COLUMNS]]
    path = tmp_path / f"shuffled{suffix}"
    write_table(shuffled, path)
    events = load_events(path)
    np.testing.assert_array_equal(events.positions, positions)
    np.testing.assert_array_equal(events.momenta, momenta)
    assert list(events.frame.columns) == list(shuffled.columns)  # file order kept


@pytest.mark.parametrize("suffix", FORMATS)
def test_momenta_only(tmp_path, arrays, suffix):
    _, momenta = arrays
    path = tmp_path / f"measured{suffix}"
    save_events(path, None, momenta)
    events = load_events(path, require_positions=False)
    assert events.positions is None
    np.testing.assert_array_equal(events.momenta, momenta)
    with pytest.raises(DataError, match=r"missing required columns 'cx', 'cy', .*; found 'pcx'"):
        load_events(path)


def test_momenta_only_mode_still_loads_positions(tmp_path, arrays):
    positions, momenta = arrays
    path = tmp_path / "both.parquet"
    save_events(path, positions, momenta)
    events = load_events(path, require_positions=False)
    np.testing.assert_array_equal(events.positions, positions)


def test_partial_positions_rejected(tmp_path, arrays):
    positions, momenta = arrays
    frame = events_to_frame(positions, momenta).drop(columns=["sy", "sz"])
    path = tmp_path / "partial.csv"
    write_table(frame, path)
    with pytest.raises(
        DataError, match=r"partial.csv: has some position columns but lacks 'sy', 'sz'"
    ):
        load_events(path, require_positions=False)


def test_drop_invalid(tmp_path, arrays):
    positions, momenta = arrays
    momenta = momenta.copy()
    momenta[[3, 11], 4] = np.nan
    path = tmp_path / "gaps.csv"
    save_events(path, positions, momenta)
    with pytest.raises(
        DataError, match="column 'poy' has 2 empty or NaN values, first at data rows 4, 12"
    ):
        load_events(path)
    events = load_events(path, drop_invalid=True)
    assert events.report.n_rows_dropped == 2 and events.report.first_dropped_rows == (4, 12)
    keep = np.setdiff1d(np.arange(20), [3, 11])
    np.testing.assert_array_equal(events.positions, positions[keep])
    np.testing.assert_array_equal(events.momenta, momenta[keep])


def test_events_to_frame_shapes(arrays):
    positions, momenta = arrays
    frame = events_to_frame(positions.reshape(20, 3, 3), momenta)
    assert list(frame.columns) == list(ALL_COLUMNS)
    np.testing.assert_array_equal(frame[list(POSITION_COLUMNS)].to_numpy(), positions)
    with pytest.raises(
        ValueError, match=r"momenta must have shape \(N, 9\) or \(N, 3, 3\), got \(20, 8\)"
    ):
        events_to_frame(positions, momenta[:, :8])
    with pytest.raises(ValueError, match="same number of events, got 19 and 20"):
        events_to_frame(positions[:19], momenta)
    with pytest.raises(ValueError, match="'pcx' clashes with a contract column"):
        events_to_frame(positions, momenta, extra={"pcx": np.zeros(20)})
    with pytest.raises(ValueError, match="'w' has 3 values, expected 20"):
        events_to_frame(positions, momenta, extra={"w": [1, 2, 3]})
