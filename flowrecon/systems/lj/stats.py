"""Time-series statistics of Markov chains: autocorrelation time, equilibration, errors.

Conventions. The integrated autocorrelation time of a stationary series is
tau = 1 + 2 * sum_{t >= 1} rho(t) (so that n correlated samples carry the information of
n / tau independent ones, the effective sample size), estimated with Sokal's automatic
window: the sum runs to the first W with W >= c * tau(W), c = 5. Equilibration is found
with Chodera's rule (J. Chem. Theory Comput. 12, 1799 (2016)): discard the t0 that
maximises the effective number of samples (T - t0) / g(t0) of what is left.

Example:
    >>> rng = np.random.default_rng(0)
    >>> x = np.zeros((200_000, 4))
    >>> for t in range(1, len(x)):
    ...     x[t] = 0.8 * x[t - 1] + rng.normal(size=4)
    >>> round(integrated_time(x)[0], 1)  # (1 + 0.8) / (1 - 0.8) = 9
    9.0
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "autocorrelation",
    "batch_means_error",
    "detect_equilibration",
    "integrated_time",
    "thinned_time",
]


def autocorrelation(series: np.ndarray) -> np.ndarray:
    """Normalised autocorrelation rho(t), t = 0..T-1, of one or several chains.

    ``series`` is ``(T,)`` or ``(T, chains)``; chains are independent realisations of one
    process, so their autocovariances (each about the common mean) are averaged before
    normalising. Computed with the FFT, O(T log T).
    """
    x = np.asarray(series, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"series must be (T,) or (T, chains) with T >= 2, got {x.shape}")
    n = x.shape[0]
    x = x - x.mean()
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(x, size, axis=0)
    acov = np.fft.irfft(f * np.conj(f), size, axis=0)[:n].mean(1)
    acov /= n - np.arange(n)  # unbiased lags; the window keeps the noisy tail out
    if acov[0] <= 0:
        return np.ones(n) if n else acov
    return acov / acov[0]


def integrated_time(series: np.ndarray, c: float = 5.0) -> tuple[float, int, float]:
    """Integrated autocorrelation time with Sokal's window.

    Returns ``(tau, window, error)``: tau in units of the series' step, the window W, and
    Sokal's standard error tau * sqrt(2 (2W + 1) / (T * chains)). tau >= 1 always (a
    series anticorrelated at lag one is reported as uncorrelated).
    """
    rho = autocorrelation(series)
    n = len(rho)
    chains = 1 if np.ndim(series) == 1 else np.shape(series)[1]
    taus = 1.0 + 2.0 * np.cumsum(rho[1:])
    window = n - 1
    for w in range(1, n):
        if w >= c * taus[w - 1]:
            window = w
            break
    tau = float(max(taus[window - 1], 1.0)) if n > 1 else 1.0
    error = tau * math.sqrt(2.0 * (2 * window + 1) / (n * chains))
    return tau, window, error


def thinned_time(rho: np.ndarray, thin: int, window: int) -> float:
    """tau of a series kept every ``thin`` steps, from the full series' rho and window.

    Example:
        >>> rho = 0.8 ** np.arange(200)
        >>> round(thinned_time(rho, 1, 100), 3), round(thinned_time(rho, 50, 100), 3)
        (9.0, 1.0)
    """
    lags = np.arange(thin, min(window, len(rho) - 1) + 1, thin)
    return float(max(1.0, 1.0 + 2.0 * rho[lags].sum()))


def detect_equilibration(trace: np.ndarray, stride: int = 1) -> tuple[int, float, float]:
    """Start of the equilibrated part of a trace (Chodera's rule).

    Args:
        trace: ``(T,)`` observable per step, e.g. the energy averaged over many chains.
        stride: Candidate starts are multiples of ``stride``.

    Returns:
        ``(t0, g, n_eff)``: the first step to keep, the statistical inefficiency
        g = tau of ``trace[t0:]``, and the effective samples (T - t0) / g.

    Example:
        >>> rng = np.random.default_rng(1)
        >>> t = np.arange(2000)
        >>> t0, _, _ = detect_equilibration(10 * np.exp(-t / 50) + rng.normal(size=2000))
        >>> 100 < t0 < 300
        True
    """
    x = np.asarray(trace, dtype=np.float64)
    if x.ndim != 1 or x.size < 4:
        raise ValueError(f"trace must be 1-D with at least 4 steps, got shape {x.shape}")
    best = (0, 1.0, -1.0)
    # Candidates in the first three quarters only: the tail is too short to judge.
    for t0 in range(0, (3 * x.size) // 4, max(1, int(stride))):
        g = integrated_time(x[t0:])[0]
        n_eff = (x.size - t0) / g
        if n_eff > best[2]:
            best = (t0, g, n_eff)
    return best


def batch_means_error(values: np.ndarray) -> float:
    """Standard error of the mean of independent realisations (e.g. per-chain means).

    Example:
        >>> round(batch_means_error(np.array([1.0, 2.0, 3.0, 4.0])), 4)
        0.6455
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size < 2:
        return math.nan
    return float(v.std(ddof=1) / math.sqrt(v.size))
