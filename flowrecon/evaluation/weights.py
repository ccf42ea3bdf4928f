"""Self-normalised importance weights for posterior samples, and weighted summaries.

With samples x_k ~ q(x | y) from a model and a target posterior
pi(x | y) ∝ L(y | x) p(x), the weights w_k ∝ L(y | x_k) p(x_k) / q(x_k | y) make weighted
averages estimate posterior expectations even where q is off. The effective sample size
ESS = (sum w)^2 / sum w^2 says how many of the K samples still count.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flowrecon.evaluation.metrics import to_numpy

__all__ = ["ImportanceWeights", "importance_weights", "weighted_coverage", "weighted_quantile"]


class ImportanceWeights(NamedTuple):
    """Normalised weights (K, B), summing to 1 over K, and the ESS of each event (B,)."""

    weights: np.ndarray
    ess: np.ndarray


def importance_weights(log_weights) -> ImportanceWeights:
    """Normalise log importance weights (K, B) per event (over K), stably.

    Non-finite log weights (a sample the target rules out) get weight 0; an event whose
    every weight is 0 gets uniform weights and ESS 0.

    Example:
        >>> w = importance_weights(np.log([[1.0], [3.0]]))
        >>> w.weights[:, 0].tolist(), float(w.ess[0])
        ([0.25, 0.75], 1.6)
    """
    lw = to_numpy(log_weights, "log_weights")
    if lw.ndim != 2:
        raise ValueError(f"log_weights must have shape (K, B), got {lw.shape}")
    finite = np.isfinite(lw)
    safe = np.where(finite, lw, -np.inf)
    top = np.max(np.where(finite, lw, -np.inf), axis=0)
    dead = ~np.isfinite(top)
    w = np.where(finite, np.exp(safe - np.where(dead, 0.0, top)), 0.0)
    total = w.sum(0)
    w = np.where(dead, 1.0 / lw.shape[0], w / np.where(total > 0, total, 1.0))
    ess = np.where(dead, 0.0, 1.0 / np.sum(w * w, axis=0))
    return ImportanceWeights(w, ess)


def weighted_quantile(samples, weights, q) -> np.ndarray:
    """Weighted quantiles per event and coordinate.

    Args:
        samples: (K, B, D).
        weights: (K, B), normalised over K.
        q: quantile levels, shape (L,).

    Returns:
        (L, B, D), interpolating the weighted empirical distribution function, with
        cumulative weights scaled by ESS / (ESS + 1) (for equal weights the Weibull
        positions k / (K + 1), as in `flowrecon.evaluation.metrics.coverage_curve`).
    """
    x = to_numpy(samples, "samples")
    w = to_numpy(weights, "weights")
    qs = np.atleast_1d(np.asarray(q, dtype=float))
    if x.ndim != 3 or w.shape != x.shape[:2]:
        raise ValueError(f"need samples (K, B, D) and weights (K, B); got {x.shape}, {w.shape}")
    order = np.argsort(x, axis=0)
    xs = np.take_along_axis(x, order, axis=0)
    ws = np.take_along_axis(np.broadcast_to(w[:, :, None], x.shape), order, axis=0)
    # Plotting positions k / (n + 1) with n the effective sample size: for equal weights
    # exactly the Weibull positions of the unweighted coverage, so the two agree.
    ess = 1.0 / np.sum(w * w, axis=0)
    cdf = np.cumsum(ws, axis=0) * (ess / (ess + 1.0))[None, :, None]
    k = x.shape[0]
    out = np.empty((len(qs), *x.shape[1:]))
    for i, level in enumerate(qs):
        # Linear interpolation of (cdf, x) at `level`, for every column at once; beyond
        # the first or last midpoint the extreme sample is the quantile (as np.interp).
        above = np.clip((cdf < level).sum(0), 1, k - 1)
        c0 = np.take_along_axis(cdf, above[None] - 1, 0)[0]
        c1 = np.take_along_axis(cdf, above[None], 0)[0]
        x0 = np.take_along_axis(xs, above[None] - 1, 0)[0]
        x1 = np.take_along_axis(xs, above[None], 0)[0]
        frac = np.clip((level - c0) / np.where(c1 > c0, c1 - c0, 1.0), 0.0, 1.0)
        out[i] = x0 + frac * (x1 - x0)
    return out


def weighted_coverage(samples, weights, truth, level: float) -> float:
    """Fraction of true coordinates inside the weighted central ``level`` interval.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> s = rng.normal(size=(400, 300, 1)); t = rng.normal(size=(300, 1))
        >>> round(weighted_coverage(s, np.full((400, 300), 1 / 400), t, 0.9), 1)
        0.9
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = weighted_quantile(samples, weights, [(1 - level) / 2, (1 + level) / 2])
    t = to_numpy(truth, "truth")
    return float(np.mean((t >= lo) & (t <= hi)))
