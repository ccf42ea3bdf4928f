"""Autocorrelation times, equilibration detection and standard errors of Markov chains."""

from __future__ import annotations

import numpy as np
import pytest

from flowrecon.systems.lj.stats import (
    autocorrelation,
    batch_means_error,
    detect_equilibration,
    integrated_time,
    thinned_time,
)


def _ar1(phi: float, steps: int, chains: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(steps, chains))
    x = np.empty_like(noise)
    x[0] = noise[0] / np.sqrt(1 - phi**2)  # start in equilibrium
    for t in range(1, steps):
        x[t] = phi * x[t - 1] + noise[t]
    return x


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9, 0.97])
def test_integrated_time_of_an_ar1_process(phi):
    x = _ar1(phi, 20_000, 8)
    tau, window, error = integrated_time(x)
    exact = (1 + phi) / (1 - phi)
    assert abs(tau - exact) < 4 * error + 0.02, (tau, exact, error)
    assert window >= 5 * tau - 1


def test_autocorrelation_starts_at_one_and_decays_geometrically():
    rho = autocorrelation(_ar1(0.8, 50_000, 4, seed=1))
    assert rho[0] == pytest.approx(1.0)
    np.testing.assert_allclose(rho[1:6], 0.8 ** np.arange(1, 6), atol=0.02)


def test_thinned_time_counts_the_remaining_correlation():
    rho = 0.9 ** np.arange(500)
    assert thinned_time(rho, 1, 200) == pytest.approx(19.0, abs=1e-6)
    # Every 10th step: rho(10 k) = 0.9^(10 k), a geometric series.
    expected = 1 + 2 * 0.9**10 / (1 - 0.9**10)
    assert thinned_time(rho, 10, 200) == pytest.approx(expected, rel=1e-3)


def test_equilibration_is_found_after_the_transient():
    rng = np.random.default_rng(2)
    t = np.arange(3000)
    steady = _ar1(0.5, 3000, 1, seed=3)[:, 0]
    t0, g, n_eff = detect_equilibration(20 * np.exp(-t / 100) + steady, stride=5)
    assert 200 < t0 < 900
    assert 1.5 < g < 6 and n_eff > 300
    t0_flat, _, _ = detect_equilibration(rng.normal(size=1000))
    assert t0_flat < 100


def test_batch_means_error_of_independent_means():
    rng = np.random.default_rng(4)
    errors = [batch_means_error(rng.normal(size=100)) for _ in range(200)]
    assert np.mean(errors) == pytest.approx(0.1, rel=0.05)
    assert np.isnan(batch_means_error(np.array([1.0])))


def test_bad_series_are_rejected():
    with pytest.raises(ValueError, match="T >= 2"):
        autocorrelation(np.zeros(1))
    with pytest.raises(ValueError, match="at least 4 steps"):
        detect_equilibration(np.zeros((3,)))
