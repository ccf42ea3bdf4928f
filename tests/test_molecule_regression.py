"""OCS results pinned bit for bit on fixed seeds.

``tests/data/ocs_pin.npz`` was written by the simulator and the OCS sampler as they were
before the N-atom molecule support (commit 785f503): the same calls must keep giving
exactly the same numbers, so that every OCS data set, model and metric stays reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flowrecon.systems.cei.geometry import sample_ocs, simulate_events
from flowrecon.systems.cei.simulator import asymptotic_momenta

PIN = Path(__file__).parent / "data" / "ocs_pin.npz"


@pytest.fixture(scope="module")
def pin() -> dict[str, np.ndarray]:
    with np.load(PIN) as data:
        return {k: data[k] for k in data.files}


def test_ocs_events_are_unchanged(pin):
    ev = simulate_events(64, seed=12)
    np.testing.assert_array_equal(ev.positions, pin["plain_positions"])
    np.testing.assert_array_equal(ev.momenta, pin["plain_momenta"])


def test_noisy_ocs_events_in_another_channel_are_unchanged(pin):
    ev = simulate_events(64, seed=13, charges=(2, 1, 1), momentum_noise=0.01)
    np.testing.assert_array_equal(ev.positions, pin["noisy_positions"])
    np.testing.assert_array_equal(ev.true_momenta, pin["noisy_true"])
    np.testing.assert_array_equal(ev.momenta, pin["noisy_momenta"])


def test_ball_events_are_unchanged(pin):
    ev = simulate_events(32, seed=14, geometry="ball")
    np.testing.assert_array_equal(ev.positions, pin["ball_positions"])
    np.testing.assert_array_equal(ev.momenta, pin["ball_momenta"])


def test_explosion_with_initial_momenta_is_unchanged(pin):
    x = sample_ocs(16, torch.Generator().manual_seed(15))
    g = torch.Generator().manual_seed(16)
    p0 = 3.0 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    np.testing.assert_array_equal(x.numpy(), pin["p0_positions"])
    np.testing.assert_array_equal(p0.numpy(), pin["p0_initial"])
    np.testing.assert_array_equal(asymptotic_momenta(x, p0).numpy(), pin["p0_momenta"])
