"""CEI metrics: hand-computed errors, exact re-simulation, DESIGN keys, chunking, tables."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from flowrecon.systems.cei.constants import DEFAULT_CHARGES, MASSES
from flowrecon.systems.cei.geometry import sample_ocs
from flowrecon.systems.cei.metrics import (
    DESIGN_KEYS,
    EXTRA_KEYS,
    cei_metrics,
    example_events_table,
    format_metrics_table,
)
from flowrecon.systems.cei.simulator import asymptotic_momenta

# Two linear molecules along x: C at the origin, O at -2, S at +3 (bohr).
TRUTH = np.array([[0.0, 0, 0, -2, 0, 0, 3, 0, 0]] * 2)
# Event 0: the whole molecule shifted by 0.1 along x. Event 1: O pulled out by 0.5 and
# S swung by 90 degrees onto the y axis (r_CS unchanged).
PRED = np.array(
    [
        [0.1, 0, 0, -1.9, 0, 0, 3.1, 0, 0],
        [0.0, 0, 0, -2.5, 0, 0, 0, 3, 0],
    ]
)
SPREAD = 0.01  # the two draws are PRED -/+ SPREAD in every coordinate


def two_event_metrics(**kwargs) -> dict:
    samples = np.stack([PRED - SPREAD, PRED + SPREAD])
    momenta = asymptotic_momenta(TRUTH)
    return cei_metrics(samples, TRUTH, momenta, charges=DEFAULT_CHARGES, **kwargs)


@pytest.fixture(scope="module")
def ocs_events() -> tuple[np.ndarray, np.ndarray]:
    """A few OCS geometries (4, 9) and their exact asymptotic momenta."""
    x = sample_ocs(4, torch.Generator().manual_seed(1)).numpy()
    return x, asymptotic_momenta(x)


def test_geometric_errors_by_hand() -> None:
    m = two_event_metrics(resimulate=False)
    s_miss = 3 * math.sqrt(2)  # S moved from (3, 0, 0) to (0, 3, 0)
    assert m["n"] == 2 and m["n_samples"] == 2
    assert m["ade"] == pytest.approx((3 * 0.1 + 0 + 0.5 + s_miss) / 6)
    assert m["ade_c"] == pytest.approx(0.1 / 2)
    assert m["ade_o"] == pytest.approx((0.1 + 0.5) / 2)
    assert m["ade_s"] == pytest.approx((0.1 + s_miss) / 2)
    assert m["bond_error_co"] == pytest.approx(0.5 / 2)
    assert m["bond_error_cs"] == pytest.approx(0.0, abs=1e-12)
    assert m["angle_error_deg"] == pytest.approx(90 / 2)
    assert m["mse"] == pytest.approx((3 * 0.01 + 0.25 + 9 + 9) / 18)
    assert m["posterior_std"] == pytest.approx(SPREAD)

    # Event 0 is a pure translation (RMSD 0); event 1 by hand with the mass-weighted COM.
    diff = np.array([[0.0, 0, 0], [-0.5, 0, 0], [-3.0, 3, 0]])
    com = (np.array(MASSES)[:, None] * diff).sum(0) / sum(MASSES)
    rmsd_1 = math.sqrt(((diff - com) ** 2).sum(1).mean())
    assert m["rmsd_com"] == pytest.approx(rmsd_1 / 2)

    # Single draws, one atom at a time.
    draws = np.stack([PRED - SPREAD, PRED + SPREAD]).reshape(2, 2, 3, 3)
    distances = [
        math.dist(draws[k, b, a], TRUTH.reshape(2, 3, 3)[b, a])
        for k in range(2)
        for b in range(2)
        for a in range(3)
    ]
    assert m["ade_sample"] == pytest.approx(sum(distances) / 12)

    # With two draws every central interval is [min, max] = PRED -/+ 0.01: it holds the
    # 6 unmoved coordinates of event 0 and the 6 of event 1 (C: 3, O: y z, S: z).
    assert m["coverage_50"] == pytest.approx(12 / 18)
    assert m["coverage_90"] == pytest.approx(12 / 18)
    assert m["resim_residual"] is None and m["resim_events"] == 0
    assert m["nll"] is None


def test_relative_errors_flag_zero_coordinates() -> None:
    m = two_event_metrics(resimulate=False)
    assert m["mre_small_coordinates"] == 14  # the 7 exact zeros of each event
    assert m["mre"] > 1e9  # 0.1 / 1e-10 and worse
    table = format_metrics_table(m)
    assert "warning: mre and mre2 are dominated by 14 near-zero true coordinates" in table


def test_true_geometries_resimulate_exactly(ocs_events) -> None:
    x, p = ocs_events
    m = cei_metrics(np.stack([x, x, x]), x, p, charges=DEFAULT_CHARGES)
    assert m["resim_events"] == 4
    assert m["resim_residual"] < 1e-6
    assert m["energy_diff"] < 1e-6 and m["energy_diff2"] < 1e-12
    for key in ("ade", "ade_sample", "rmsd_com", "bond_error_co", "angle_error_deg"):
        assert m[key] == pytest.approx(0.0, abs=1e-12), key
    assert m["coverage_50"] == m["coverage_90"] == 1.0


def test_other_charges_are_used_everywhere(ocs_events) -> None:
    x, _ = ocs_events
    charges = (2.0, 1.0, 1.0)
    p = asymptotic_momenta(x, charges=charges)
    m = cei_metrics(x[None], x, p, charges=charges)
    assert m["resim_residual"] < 1e-6 and m["energy_diff"] < 1e-6
    wrong = cei_metrics(x[None], x, p, charges=DEFAULT_CHARGES)
    assert wrong["resim_residual"] > 0.1 and wrong["energy_diff"] > 0.1


def test_every_design_key_present_and_json_serialisable(ocs_events) -> None:
    x, p = ocs_events
    samples = x + np.random.default_rng(0).normal(scale=0.05, size=(5, *x.shape))
    m = cei_metrics(
        samples, x, p, charges=DEFAULT_CHARGES, log_prob=-np.arange(4.0), levels=(0.68,)
    )
    assert list(m)[: len(DESIGN_KEYS)] == list(DESIGN_KEYS)
    assert set(EXTRA_KEYS) | {"coverage_68"} <= set(m)
    assert m["nll"] == pytest.approx(1.5)
    assert all(v is None or type(v) in (int, float) for v in m.values())
    json.dumps(m, allow_nan=False)


def test_chunked_callable_matches_array(ocs_events) -> None:
    x, p = ocs_events
    samples = x + np.random.default_rng(1).normal(scale=0.05, size=(7, *x.shape))
    whole = cei_metrics(samples, x, p, charges=DEFAULT_CHARGES)
    calls = []

    def draw(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        return torch.as_tensor(samples[:, start:stop])

    chunked = cei_metrics(draw, x, p, charges=DEFAULT_CHARGES, chunk_size=3)
    assert calls == [(0, 3), (3, 4)]
    assert chunked.keys() == whole.keys()
    for key, value in whole.items():
        if value is None:  # undefined in both (e.g. nll without log_prob): no tolerance applies
            assert chunked[key] is None, key
        else:
            assert chunked[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_resim_subset_and_skip(ocs_events) -> None:
    x, p = ocs_events
    m = cei_metrics(x[None], x, p, charges=DEFAULT_CHARGES, resim_max_events=2)
    assert m["resim_events"] == 2 and m["resim_residual"] < 1e-6


def test_undefined_values_become_none_with_a_warning(ocs_events) -> None:
    x, _ = ocs_events
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = cei_metrics(x[None], x, np.zeros_like(x), charges=DEFAULT_CHARGES)
    named = " ".join(str(w.message) for w in caught)
    for key in ("energy_diff", "energy_diff2", "resim_residual"):  # KE = 0, |p_obs| = 0
        assert m[key] is None and f"'{key}'" in named
    with pytest.warns(RuntimeWarning, match="1 NaN of 4"):
        m = cei_metrics(
            x[None], x, x, charges=DEFAULT_CHARGES, resimulate=False,
            log_prob=np.array([0.0, np.nan, 0, 0]),
        )  # fmt: skip
    assert m["nll"] is None
    json.dumps(m, allow_nan=False)


def test_bad_shapes_say_what_was_expected(ocs_events) -> None:
    x, p = ocs_events
    with pytest.raises(ValueError, match=r"\(n, 4, 9\)"):
        cei_metrics(np.zeros((2, 3, 9)), x, p, charges=DEFAULT_CHARGES)
    with pytest.raises(ValueError, match="momenta_obs has 3 events"):
        cei_metrics(x[None], x, p[:3], charges=DEFAULT_CHARGES)
    with pytest.raises(ValueError, match=r"events 0:4 must have shape \(n, 4, 9\)"):
        cei_metrics(lambda a, b: np.zeros((2, b - a, 8)), x, p, charges=DEFAULT_CHARGES)


def test_tables_are_readable() -> None:
    m = two_event_metrics()
    table = format_metrics_table(m)
    for text in ("2 events, 2 posterior draws each", "ade ", "bohr", "deg", "coverage_90"):
        assert text in table
    events = example_events_table(np.stack([PRED - SPREAD, PRED + SPREAD]), TRUTH, [1])
    assert "event 1" in events
    assert "( 3.000,  0.000,  0.000)" in events  # true S
    assert "( 0.000 ± 0.010,  3.000 ± 0.010,  0.000 ± 0.010)" in events  # predicted S
    assert "true 2.000, 3.000, 180.0; mean 2.500, 3.000, 90.0" in events
    labelled = example_events_table(np.stack([PRED, PRED]), TRUTH, [1, 0], labels=["17", "4"])
    assert labelled.startswith("event 17\n") and "\nevent 4\n" in labelled
