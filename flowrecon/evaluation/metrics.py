"""Generic metrics of conditional generative models: errors, calibration, coverage.

Nothing here knows about atoms. ``samples`` are posterior draws, sample-first as
`ConditionalGenerator.sample` returns them, shape ``(n, B, D)``; ``truth`` holds the true
values, shape ``(B, D)``. Any trailing shape works as long as
``samples.shape[1:] == truth.shape``. Inputs may be numpy arrays or torch tensors (on any
device); results are numpy arrays or plain Python numbers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "DEFAULT_LEVELS",
    "RankTest",
    "RelativeErrors",
    "central_interval_coverage",
    "coverage_curve",
    "mse",
    "nll",
    "posterior_mean",
    "posterior_std",
    "rank_histogram_pvalue",
    "rank_histogram_test",
    "relative_errors",
    "sbc_ranks",
    "to_numpy",
]

ArrayLike = np.ndarray | torch.Tensor

#: Nominal levels of a calibration plot: 0.05, 0.10, ..., 0.95.
DEFAULT_LEVELS: np.ndarray = np.linspace(0.05, 0.95, 19)


def to_numpy(values: ArrayLike, name: str = "values") -> np.ndarray:
    """A float64 numpy copy-or-view of an array or tensor (detached, moved to the CPU).

    Example:
        >>> to_numpy(torch.ones(2)).dtype
        dtype('float64')
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numeric array or tensor; {err}") from None


def _samples_and_truth(samples: ArrayLike, truth: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s, t = to_numpy(samples, "samples"), to_numpy(truth, "truth")
    if s.ndim != t.ndim + 1 or s.shape[1:] != t.shape:
        raise ValueError(
            f"samples must have shape (n, *truth.shape) = (n, {', '.join(map(str, t.shape))}) "
            f"(sample-first); got samples {s.shape} and truth {t.shape}"
        )
    if s.shape[0] == 0:
        raise ValueError("samples holds no draws (n = 0)")
    return s, t


def _check_levels(levels: ArrayLike | float) -> np.ndarray:
    lv = np.atleast_1d(to_numpy(levels, "levels")).ravel()
    if lv.size == 0 or not np.all((lv > 0) & (lv < 1)):
        raise ValueError(f"coverage levels must lie strictly between 0 and 1; got {lv}")
    return lv


def coverage_curve(
    samples: ArrayLike, truth: ArrayLike, levels: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Empirical coverage of central posterior intervals at several nominal levels.

    For each coordinate the central ``level`` interval runs from the ``(1 - level) / 2``
    to the ``(1 + level) / 2`` quantile of the samples. The quantiles use the Weibull
    plotting position ``(n + 1) p``: the true value of a calibrated posterior is then
    inside with probability ``level`` even for small ``n`` (numpy's default position
    ``(n - 1) p`` would make 100 perfect samples look 2 % over-confident at 90 %).

    Args:
        samples: Posterior draws, ``(n, B, D)``.
        truth: True values, ``(B, D)``.
        levels: Nominal levels in (0, 1); default `DEFAULT_LEVELS`.

    Returns:
        The levels and the fraction of true coordinates inside each interval, both
        of shape ``(L,)``. A calibrated model gives points on the diagonal.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> levels, empirical = coverage_curve(rng.normal(size=(100, 500, 2)),
        ...                                    rng.normal(size=(500, 2)))
        >>> bool(np.all(abs(empirical - levels) < 0.05))
        True
    """
    s, t = _samples_and_truth(samples, truth)
    lv = _check_levels(DEFAULT_LEVELS if levels is None else levels)
    # One partial sort for every bound of every level.
    bounds = np.quantile(s, np.concatenate([(1 - lv) / 2, (1 + lv) / 2]), axis=0, method="weibull")
    inside = (bounds[: lv.size] <= t) & (t <= bounds[lv.size :])
    return lv, inside.reshape(lv.size, -1).mean(axis=1)


def central_interval_coverage(samples: ArrayLike, truth: ArrayLike, level: float = 0.9) -> float:
    """Fraction of true coordinates inside the central ``level`` posterior interval.

    See `coverage_curve` for the interval. Near ``level`` means calibrated, far below
    means over-confident (too narrow), far above under-confident.

    Example:
        >>> samples = np.stack([np.zeros((2, 1)), np.ones((2, 1))] * 50)  # 0 or 1
        >>> central_interval_coverage(samples, np.array([[0.5], [3.0]]), 0.9)
        0.5
    """
    return float(coverage_curve(samples, truth, [level])[1][0])


def sbc_ranks(samples: ArrayLike, truth: ArrayLike) -> np.ndarray:
    """Rank of each true coordinate among its ``n`` posterior draws, ``(B, D)`` ints.

    The rank is the number of draws strictly below the truth, in ``0 .. n``. For a
    calibrated posterior it is uniform on those ``n + 1`` values (simulation-based
    calibration); a U shape means over-confident, a hump under-confident, a slope bias.

    Example:
        >>> sbc_ranks(np.arange(4.0).reshape(4, 1, 1), np.array([[2.5]]))
        array([[3]])
    """
    s, t = _samples_and_truth(samples, truth)
    return (s < t).sum(axis=0)


class RankTest(NamedTuple):
    """Chi-square test of uniform ranks: statistic, degrees of freedom and p-value."""

    statistic: float
    dof: int
    pvalue: float


def rank_histogram_test(ranks: ArrayLike, n_samples: int, bins: int | None = None) -> RankTest:
    """Chi-square test that SBC ranks (from `sbc_ranks`) are uniform on ``0 .. n_samples``.

    Ranks are pooled over all coordinates; pass one column to test a coordinate alone.
    With ``bins`` smaller than ``n_samples + 1`` neighbouring rank values are merged and
    each bin's expected count follows from how many rank values it holds, so any
    ``bins`` is exact. Note that with very many ranks even a harmless miscalibration
    gives a tiny p-value: read it together with `coverage_curve`.

    Args:
        ranks: Integer ranks, any shape.
        n_samples: The number of draws the ranks were computed from.
        bins: Histogram bins, 2 .. ``n_samples + 1``; default ``min(n_samples + 1, 20)``.

    Example:
        >>> ranks = np.tile(np.arange(11), 30)  # perfectly flat
        >>> rank_histogram_test(ranks, 10)
        RankTest(statistic=0.0, dof=10, pvalue=1.0)
    """
    r = np.asarray(to_numpy(ranks, "ranks")).ravel()
    if r.size == 0:
        raise ValueError("ranks is empty")
    if not np.all((r == np.round(r)) & (r >= 0) & (r <= n_samples)):
        raise ValueError(f"ranks must be integers in 0 .. n_samples = {n_samples}")
    bins = min(n_samples + 1, 20) if bins is None else int(bins)
    if not 2 <= bins <= n_samples + 1:
        raise ValueError(f"bins must be between 2 and n_samples + 1 = {n_samples + 1}; got {bins}")
    bin_of = np.arange(n_samples + 1) * bins // (n_samples + 1)
    expected = np.bincount(bin_of, minlength=bins) / (n_samples + 1) * r.size
    observed = np.bincount(bin_of[r.astype(np.int64)], minlength=bins)
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = bins - 1
    # Chi-square survival function = regularised upper incomplete gamma; torch has it,
    # so scipy stays an optional extra.
    pvalue = torch.special.gammaincc(
        torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)
    )
    return RankTest(statistic, dof, float(pvalue))


def rank_histogram_pvalue(ranks: ArrayLike, n_samples: int, bins: int | None = None) -> float:
    """p-value of `rank_histogram_test`: small means the ranks are not uniform.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ranks = sbc_ranks(rng.normal(size=(50, 400, 3)), rng.normal(size=(400, 3)))
        >>> rank_histogram_pvalue(ranks, 50) > 0.01
        True
    """
    return rank_histogram_test(ranks, n_samples, bins).pvalue


def posterior_mean(samples: ArrayLike) -> np.ndarray:
    """Mean over the sample axis: ``(n, B, D) -> (B, D)``.

    Example:
        >>> posterior_mean(np.array([[[1.0]], [[3.0]]]))
        array([[2.]])
    """
    s = to_numpy(samples, "samples")
    if s.ndim == 0 or s.shape[0] == 0:
        raise ValueError(f"samples must have a non-empty leading sample axis; got {s.shape}")
    return s.mean(axis=0)


def posterior_std(samples: ArrayLike, ddof: int = 0) -> np.ndarray:
    """Standard deviation over the sample axis: ``(n, B, D) -> (B, D)``.

    Example:
        >>> posterior_std(np.array([[[1.0]], [[3.0]]]))
        array([[1.]])
    """
    s = to_numpy(samples, "samples")
    if s.ndim == 0 or s.shape[0] == 0:
        raise ValueError(f"samples must have a non-empty leading sample axis; got {s.shape}")
    return s.std(axis=0, ddof=ddof)


def _pred_and_truth(pred: ArrayLike, truth: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, t = to_numpy(pred, "pred"), to_numpy(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred and truth must have the same shape; got {p.shape} and {t.shape}")
    if p.size == 0:
        raise ValueError("pred and truth are empty")
    return p, t


def mse(pred: ArrayLike, truth: ArrayLike) -> float:
    """Mean squared error over all entries.

    Example:
        >>> mse(np.array([1.0, 2.0]), np.array([1.0, 4.0]))
        2.0
    """
    p, t = _pred_and_truth(pred, truth)
    return float(np.mean((p - t) ** 2))


def nll(log_prob: ArrayLike) -> float:
    """Mean negative log-likelihood of the true values, from the model's ``log_prob``.

    Raises:
        ValueError: If ``log_prob`` is empty or holds NaN (a model bug, never averaged
            away). ``-inf`` (zero density at the truth) gives ``inf``.

    Example:
        >>> nll(np.array([-1.0, -2.0]))
        1.5
    """
    lp = to_numpy(log_prob, "log_prob")
    if lp.size == 0:
        raise ValueError("log_prob is empty")
    bad = int(np.isnan(lp).sum())
    if bad:
        raise ValueError(f"log_prob holds {bad} NaN of {lp.size} values")
    return float(-lp.mean()) + 0.0  # + 0.0 turns -0.0 into 0.0


class RelativeErrors(NamedTuple):
    """The seed decks' relative errors (percent) and the near-zero coordinates behind them.

    Attributes:
        mre: ``mean(|pred - truth| / (|truth| + eps)) * 100``.
        mre2: ``mean(((pred - truth) / (truth + eps))^2) * 100``.
        n_small: Entries with ``|truth| <= threshold``; each can dominate both means.
        threshold: The cut used for ``n_small``.
    """

    mre: float
    mre2: float
    n_small: int
    threshold: float


def relative_errors(
    pred: ArrayLike, truth: ArrayLike, eps: float = 1e-10, small_fraction: float = 1e-3
) -> RelativeErrors:
    """The seed decks' MRE and MRE2, exactly as they define them, plus a warning count.

    Relative errors divide by the true value, so a single coordinate that is ~0 (an
    out-of-plane one, an atom at the origin) makes them explode. ``n_small`` counts the
    entries with ``|truth| <= small_fraction * mean(|truth|)`` so that a report can say
    so. The scale is the mean rather than the median of ``|truth|``: in frames where most
    coordinates are zero (a planar, linear molecule) the median is 0 and would hide them.

    Example:
        >>> errors = relative_errors(np.array([1.1, 0.1]), np.array([1.0, 0.0]))
        >>> f"{errors.mre:.1e} %", errors.n_small  # the error on the zero coordinate rules
        ('5.0e+10 %', 1)
    """
    p, t = _pred_and_truth(pred, truth)
    mre = float(np.mean(np.abs(p - t) / (np.abs(t) + eps)) * 100)
    mre2 = float(np.mean(((p - t) / (t + eps)) ** 2) * 100)
    threshold = float(small_fraction * np.mean(np.abs(t)))
    n_small = int(np.count_nonzero(np.abs(t) <= threshold))
    return RelativeErrors(mre, mre2, n_small, threshold)


def robust_summary(errors: ArrayLike, failure_threshold: float | None = None) -> dict[str, Any]:
    """Mean, median, 95th percentile and failure rate of per-event errors.

    A few runaway events can make a mean meaningless; the median and the 95th percentile
    say what a typical and a bad event look like, and the failure rate how many events
    went wrong: error above ``failure_threshold`` or not finite (NaN, inf). The mean and
    the percentiles are over the finite errors; a value that cannot be given is None.

    Example:
        >>> s = robust_summary(np.array([0.01, 0.02, 0.03, 1e18, np.nan]), 0.1)
        >>> s["median"], s["failure_rate"]
        (0.025, 0.4)
    """
    e = to_numpy(errors, "errors").ravel()
    if e.size == 0:
        raise ValueError("errors is empty")
    finite = e[np.isfinite(e)]
    failed = ~np.isfinite(e)
    if failure_threshold is not None:
        failed |= np.isfinite(e) & (e > failure_threshold)

    def plain(v: float) -> float | None:
        return float(v) if np.isfinite(v) else None

    return {
        "mean": plain(finite.mean()) if finite.size else None,
        "median": plain(np.median(finite)) if finite.size else None,
        "p95": plain(np.quantile(finite, 0.95)) if finite.size else None,
        "failure_rate": float(failed.mean()),
        "n_not_finite": int((~np.isfinite(e)).sum()),
    }
