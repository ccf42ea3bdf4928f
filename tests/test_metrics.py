"""Generic metrics: hand-computed values, calibration of coverage and SBC ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowrecon.evaluation import (
    DEFAULT_LEVELS,
    central_interval_coverage,
    coverage_curve,
    mse,
    nll,
    posterior_mean,
    posterior_std,
    rank_histogram_pvalue,
    rank_histogram_test,
    relative_errors,
    sbc_ranks,
)

# Every event draws the values 1, 2, ..., 9 for its single coordinate.
ONE_TO_NINE = np.broadcast_to(np.arange(1.0, 10.0)[:, None, None], (9, 4, 1))


def gaussian_problem(
    shrink: float = 1.0, n: int = 100, events: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Truth and posterior draws of a toy Gaussian posterior, (n, B, 3) and (B, 3).

    ``shrink = 1`` draws from the true posterior; ``shrink = 3`` is over-confident.
    """
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(events, 3))
    sigma = rng.uniform(0.5, 2.0, size=(events, 3))
    truth = mu + sigma * rng.normal(size=(events, 3))
    samples = mu + sigma / shrink * rng.normal(size=(n, events, 3))
    return samples, truth


def test_coverage_by_hand() -> None:
    # Weibull positions (n + 1) p with n = 9: the 80 % interval is [x_(1), x_(9)] = [1, 9]
    # and the 50 % interval [x_(2.5), x_(7.5)] = [2.5, 7.5]; bounds count as inside.
    assert central_interval_coverage(ONE_TO_NINE, np.array([[0.5], [5], [9], [9.5]]), 0.8) == 0.5
    assert central_interval_coverage(ONE_TO_NINE, np.array([[2], [3], [7.5], [8]]), 0.5) == 0.5


def test_coverage_curve_shapes_and_torch_input() -> None:
    samples, truth = gaussian_problem(events=50, n=20)
    levels, empirical = coverage_curve(torch.as_tensor(samples), torch.as_tensor(truth))
    np.testing.assert_allclose(levels, DEFAULT_LEVELS)
    assert empirical.shape == (19,)
    assert np.all(np.diff(empirical) >= 0)  # wider intervals never cover less


def test_coverage_is_nominal_when_calibrated() -> None:
    levels, empirical = coverage_curve(*gaussian_problem())
    assert np.max(np.abs(empirical - levels)) < 0.02
    for level in (0.5, 0.9):
        assert abs(central_interval_coverage(*gaussian_problem(), level) - level) < 0.02


def test_coverage_is_low_when_over_confident() -> None:
    samples, truth = gaussian_problem(shrink=3.0)
    # A third of the true width covers P(|z| < 1.645 / 3) = 0.42 instead of 0.9.
    assert central_interval_coverage(samples, truth, 0.9) < 0.5
    assert central_interval_coverage(samples, truth, 0.5) < 0.25


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5])
def test_coverage_rejects_bad_levels(level: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        central_interval_coverage(ONE_TO_NINE, np.ones((4, 1)), level)


def test_shape_mismatch_says_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"= \(n, 4, 2\) \(sample-first\)"):
        coverage_curve(np.zeros((10, 4, 3)), np.zeros((4, 2)))


def test_sbc_ranks_by_hand() -> None:
    truth = np.array([[0.5], [5.0], [9.5], [1.0]])
    np.testing.assert_array_equal(sbc_ranks(ONE_TO_NINE, truth), [[0], [4], [9], [0]])
    assert sbc_ranks(ONE_TO_NINE, truth).dtype.kind == "i"


def test_rank_histogram_test_by_hand() -> None:
    # n = 1: ranks 0 or 1, expected 2 and 2, observed 3 and 1 -> chi2 = 1 with 1 dof.
    result = rank_histogram_test(np.array([0, 0, 0, 1]), n_samples=1)
    assert result.statistic == pytest.approx(1.0)
    assert result.dof == 1
    assert result.pvalue == pytest.approx(math.erfc(1 / math.sqrt(2)))
    # Three bins over the 5 rank values 0..4 hold 2, 2 and 1 of them: (0,1), (2,3), (4).
    flat = np.array([0, 1, 2, 3, 4] * 10)
    assert rank_histogram_test(flat, n_samples=4, bins=3).statistic == pytest.approx(0.0)


def test_ranks_uniform_when_calibrated_and_not_when_over_confident() -> None:
    samples, truth = gaussian_problem(n=50)
    assert rank_histogram_pvalue(sbc_ranks(samples, truth), 50) > 0.01
    samples, truth = gaussian_problem(shrink=3.0, n=50)
    ranks = sbc_ranks(samples, truth)
    assert rank_histogram_pvalue(ranks, 50) < 1e-6
    # Over-confident: the truth falls outside all draws far more often than 2 / 51.
    assert np.mean((ranks == 0) | (ranks == 50)) > 0.3


def test_rank_histogram_rejects_bad_ranks() -> None:
    with pytest.raises(ValueError, match="integers in 0 .. n_samples = 3"):
        rank_histogram_test(np.array([0, 4]), n_samples=3)
    with pytest.raises(ValueError, match="bins"):
        rank_histogram_test(np.array([0, 1]), n_samples=3, bins=5)


def test_point_metrics_by_hand() -> None:
    samples = np.array([[[1.0, 2.0]], [[3.0, 6.0]]])  # n = 2, B = 1, D = 2
    np.testing.assert_allclose(posterior_mean(samples), [[2.0, 4.0]])
    np.testing.assert_allclose(posterior_std(samples), [[1.0, 2.0]])
    np.testing.assert_allclose(posterior_std(torch.as_tensor(samples), ddof=1), [[2**0.5, 8**0.5]])
    assert mse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 0.0])) == pytest.approx(13 / 3)
    assert nll(torch.tensor([-1.0, -2.0, -6.0])) == pytest.approx(3.0)
    assert nll(np.array([-np.inf, 0.0])) == math.inf


def test_nll_refuses_nan_and_mse_refuses_mismatch() -> None:
    with pytest.raises(ValueError, match="1 NaN of 2"):
        nll(np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="same shape"):
        mse(np.zeros(3), np.zeros(2))


def test_relative_errors_exactly_as_the_seed_decks_define_them() -> None:
    eps = 1e-10
    pred = np.array([2.0, 1.0, 3.0, -2.0])
    truth = np.array([1.0, 0.0, 4.0, -1.0])
    result = relative_errors(pred, truth, eps=eps)
    expected_mre = (1 / (1 + eps) + 1 / eps + 1 / (4 + eps) + 1 / (1 + eps)) / 4 * 100
    # MRE2 divides by truth + eps (not |truth| + eps), as the decks wrote it.
    expected_mre2 = (
        (1 / (1 + eps)) ** 2 + (1 / eps) ** 2 + (1 / (4 + eps)) ** 2 + (1 / (-1 + eps)) ** 2
    ) / 4 * 100  # fmt: skip
    assert result.mre == pytest.approx(expected_mre, rel=1e-12)
    assert result.mre2 == pytest.approx(expected_mre2, rel=1e-12)
    assert result.threshold == pytest.approx(1e-3 * 6 / 4)
    assert result.n_small == 1


def test_relative_errors_count_small_coordinates() -> None:
    truth = np.array([[1.0, 1e-5, 0.0], [2.0, -3e-3, 0.5]])
    result = relative_errors(truth + 0.01, truth, small_fraction=1e-3)
    assert result.threshold == pytest.approx(1e-3 * np.abs(truth).mean())
    assert result.n_small == 2  # 1e-5 and 0 lie below 5.8e-4; -3e-3 does not
