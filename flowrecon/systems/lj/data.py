"""Data tables of the Lennard-Jones system: simulation, columns, splits, canonical order.

A table has one row per configuration: the coordinates ``x0 y0 z0 x1 y1 z1 ...`` (in 2-D
``x0 y0 x1 y1 ...``, gravity along y; in 1-D ``x0 x1 ...``), the conditions ``gamma``
and ``temperature``, the total potential energy ``energy`` (U, Lennard-Jones plus
gravity, of the whole configuration, in epsilon), the Markov chain ``chain`` and the
sweep ``step`` at which it was saved. Rows of one chain are correlated (they are saved
about ``thin`` autocorrelation times apart), so `split` keeps chains whole.

Example:
    >>> coordinate_columns(2, 3)
    ('x0', 'y0', 'z0', 'x1', 'y1', 'z1')
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from flowrecon.systems.lj.geometry import canonical_order
from flowrecon.systems.lj.sampler import run_metropolis

__all__ = [
    "CONDITION_COLUMNS",
    "condition_grid",
    "coordinate_columns",
    "prepare",
    "simulate",
    "split",
]

#: The condition y of the models.
CONDITION_COLUMNS: tuple[str, str] = ("gamma", "temperature")

_AXES = {1: "x", 2: "xy", 3: "xyz"}


def coordinate_columns(n_particles: int, dim: int) -> tuple[str, ...]:
    """Column names of the coordinates, particle by particle."""
    if dim not in _AXES:
        raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
    return tuple(f"{a}{i}" for i in range(int(n_particles)) for a in _AXES[dim])


def condition_grid(
    gamma: Sequence[float], temperature: Sequence[float]
) -> list[tuple[float, float]]:
    """All pairs (gamma, temperature), gamma varying slowest.

    Example:
        >>> condition_grid((0.05, 1.0), (1.5,))
        [(0.05, 1.5), (1.0, 1.5)]
    """
    gs, ts = [float(g) for g in gamma], [float(t) for t in temperature]
    if not gs or not ts:
        raise ValueError("gamma and temperature need at least one value each")
    return list(itertools.product(gs, ts))


def _auto_chains(rows: int) -> int:
    """About 20 configurations a chain, 32 to 512 chains a condition (fewer if few rows)."""
    return int(min(rows, max(32, min(512, math.ceil(rows / 20)))))


def simulate(
    n: int,
    *,
    seed: int = 0,
    progress: bool = False,
    device: str = "auto",
    n_particles: int = 30,
    box: float = 5.0,
    dim: int = 3,
    gamma: Sequence[float] = (0.05, 0.25, 1.0),
    temperature: Sequence[float] = (1.5,),
    chains: int = 0,
    thin: float = 2.0,
    target_acceptance: float = 0.4,
    dtype: str = "float64",
    compile: bool | None = None,
) -> pd.DataFrame:
    """n equilibrated configurations, split evenly over the grid of (gamma, temperature).

    Each condition runs ``chains`` Markov chains (0: about one per 20 rows, 32 to 512)
    with the protocol of `flowrecon.systems.lj.sampler.run_metropolis`; its diagnostics
    (acceptance, autocorrelation time, effective sample size, ...) are kept in
    ``table.attrs["lj"]``. Rows come in the particles' simulated (labelled) order; use
    `prepare` for the canonical order.

    Example:
        >>> t = simulate(64, seed=1, n_particles=4, box=3.0, gamma=(0.5,), device="cpu")
        >>> t.shape, sorted(t["chain"].unique().tolist())[:3]
        ((64, 17), [0, 1, 2])
    """
    if int(n) < 1:
        raise ValueError(f"n must be a positive number of configurations, got {n}")
    conds = condition_grid(gamma, temperature)
    per = [int(n) // len(conds) + (c < int(n) % len(conds)) for c in range(len(conds))]
    most = max(per)
    n_chains = int(chains) if chains else _auto_chains(most)
    if n_chains < 1:
        raise ValueError(f"chains must be a positive integer (or 0 for automatic), got {chains}")
    samples = math.ceil(most / n_chains)
    run = run_metropolis(
        conds,
        chains=n_chains,
        samples=samples,
        n_particles=n_particles,
        box=box,
        dim=dim,
        target_acceptance=target_acceptance,
        thin=thin,
        seed=seed,
        device=device,
        dtype=dtype,
        compile=compile,
        progress=progress,
    )
    cols = coordinate_columns(n_particles, dim)
    parts = []
    for c, (g, t) in enumerate(conds):
        pos, energy, sweeps = run.positions[c], run.energy[c], run.sweeps[c]
        # Chain-major rows (all samples of chain 0, then chain 1, ...): a table cut to
        # `per[c]` rows loses samples of the last chains only.
        order = np.swapaxes(pos, 0, 1).reshape(-1, n_particles * dim)[: per[c]]
        part = pd.DataFrame(order, columns=list(cols))
        part["gamma"], part["temperature"] = g, t
        part["energy"] = energy.T.reshape(-1)[: per[c]]
        chain_ids = np.repeat(np.arange(n_chains), samples) + c * n_chains
        part["chain"] = chain_ids[: per[c]]
        part["step"] = np.tile(sweeps, n_chains)[: per[c]]
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    table.attrs["lj"] = {
        "settings": run.settings,
        "conditions": [r.to_dict() for r in run.reports],
        "moves": run.moves,
        "seconds": run.seconds,
    }
    table.attrs["report"] = run_report(table.attrs["lj"])
    return table


def run_report(diagnostics: dict[str, Any]) -> str:
    """The sampler's diagnostics per condition as lines of text (``simulate`` prints them).

    Example:
        >>> print(run_report({"moves": 3e6, "seconds": 2.0, "conditions": [
        ...     {"gamma": 0.5, "temperature": 1.5, "chains": 8, "acceptance": 0.41,
        ...      "step": 0.5, "tau": 30.0, "thin": 60, "ess": 150.2, "converged": True}]}))
        Metropolis min(1, exp(-dU/T)): 3,000,000 moves, 2.0 s, 1.5 M/s; tau, thin in sweeps
          gamma 0.5, T 1.5: 8 chains, acceptance 0.41, step 0.5, tau 30.0, thin 60, ESS 150
    """
    moves, seconds = float(diagnostics["moves"]), float(diagnostics["seconds"])
    lines = [
        f"Metropolis min(1, exp(-dU/T)): {moves:,.0f} moves, {seconds:.1f} s, "
        f"{moves / max(seconds, 1e-9) / 1e6:.1f} M/s; tau, thin in sweeps"
    ]
    for c in diagnostics["conditions"]:
        line = (
            f"  gamma {c['gamma']:g}, T {c['temperature']:g}: {c['chains']} chains, acceptance "
            f"{c['acceptance']:.2f}, step {c['step']:.3g}, tau {c['tau']:.1f}, thin {c['thin']}, "
            f"ESS {c['ess']:.0f}"
        )
        lines.append(line + ("" if c.get("converged", True) else " (NOT converged)"))
    return "\n".join(lines)


def _check_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what}: the table has no column(s) {', '.join(missing[:5])}")


def prepare(table: pd.DataFrame, n_particles: int, dim: int) -> pd.DataFrame:
    """The table with each row's particles in canonical order (sorted by height).

    Only the coordinate columns change; the function is idempotent. A table of
    conditions alone (no coordinate column, as ``flowrecon sample`` reads) is returned
    as it is.

    Example:
        >>> t = pd.DataFrame({"x0": [0.0], "y0": [2.0], "x1": [1.0], "y1": [1.0]})
        >>> prepare(t, 2, 2).iloc[0].tolist()
        [1.0, 1.0, 0.0, 2.0]
    """
    cols = list(coordinate_columns(n_particles, dim))
    if not any(c in table.columns for c in cols):
        return table
    _check_columns(table, cols, "canonical order")
    values = table[cols].to_numpy(dtype=np.float64)
    ordered = canonical_order(values.reshape(-1, n_particles, dim)).reshape(values.shape)
    out = table.copy()
    out[cols] = ordered
    return out


def symmetric_copies(
    x: np.ndarray, y: np.ndarray, n_particles: int, dim: int, box: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(n, N * D)`` and their images under the box's horizontal symmetries.

    Gravity singles out the height; the closed box [0, L]^D is symmetric under reflecting
    any horizontal axis (c -> L - c) and, in 3-D, swapping x and y: 8 images in 3-D
    (the square's symmetry group), 2 in 2-D. Each image has the same energy and the same
    heights, so the same Boltzmann weight and the same canonical order. Returns the
    images stacked (the originals first) and ``y`` repeated to match.

    Example:
        >>> x = np.array([[1.0, 2.0, 0.5, 4.0, 3.0, 1.5]])
        >>> xs, ys = symmetric_copies(x, np.array([[0.1, 1.5]]), 2, 3, 5.0)
        >>> xs.shape, ys.shape, xs[:, 2::3].tolist() == [[0.5, 1.5]] * 8
        ((8, 6), (8, 2), True)
    """
    c = np.asarray(x, dtype=np.float64).reshape(len(x), n_particles, dim)
    horizontal = list(range(dim - 1))
    orders = [horizontal] + ([horizontal[::-1]] if dim == 3 else [])
    images = []
    for order in orders:
        for flips in itertools.product((False, True), repeat=dim - 1):
            image = c.copy()
            image[..., horizontal] = c[..., order]
            for axis, flip in zip(horizontal, flips):
                if flip:
                    image[..., axis] = box - image[..., axis]
            images.append(image.reshape(len(x), -1))
    return np.concatenate(images), np.tile(np.asarray(y), (len(images), 1))


def split(
    table: pd.DataFrame, seed: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/validation/test row indices with whole chains, stratified by condition.

    Within each condition (gamma, temperature) the chains are shuffled with ``seed`` and
    dealt out in the given fractions of chains (each part gets at least one chain when
    the condition has three or more), so that no chain's correlated rows straddle two
    parts. Without a ``chain`` column every row counts as its own chain.

    Example:
        >>> t = pd.DataFrame({"gamma": [0.1] * 40, "temperature": 1.5,
        ...                   "chain": np.repeat(np.arange(20), 2)})
        >>> [len(i) for i in split(t, seed=0)]
        [28, 6, 6]
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    frac = np.asarray(fractions, dtype=np.float64) / sum(fractions)
    chain = table["chain"].to_numpy() if "chain" in table.columns else np.arange(len(table))
    keys = [c for c in CONDITION_COLUMNS if c in table.columns]
    groups = table.groupby(keys, sort=True).indices if keys else {(): np.arange(len(table))}
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for _, rows in sorted(groups.items()):
        ids = np.unique(chain[rows])
        ids = ids[rng.permutation(len(ids))]
        counts = _deal(len(ids), frac)
        bounds = np.cumsum([0, *counts])
        for p in range(3):
            chosen = ids[bounds[p] : bounds[p + 1]]
            parts[p].append(rows[np.isin(chain[rows], chosen)])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)  # type: ignore[return-value]


def _deal(n: int, frac: np.ndarray) -> list[int]:
    """Chains per part: rounded fractions, each non-empty part at least one chain."""
    counts = np.floor(frac * n).astype(int)
    for i in np.argsort(-(frac * n - counts))[: n - counts.sum()]:
        counts[i] += 1
    if n >= 3:
        for i in np.flatnonzero((counts == 0) & (frac > 0)):
            j = int(np.argmax(counts))
            counts[j] -= 1
            counts[i] += 1
    return counts.tolist()


def table_summary(table: pd.DataFrame) -> dict[str, Any]:
    """Rows and chains per condition of a table (for reports)."""
    keys = [c for c in CONDITION_COLUMNS if c in table.columns]
    out = []
    for key, rows in table.groupby(keys).groups.items():
        g, t = key if isinstance(key, tuple) else (key, math.nan)
        chains = table.loc[rows, "chain"].nunique() if "chain" in table.columns else len(rows)
        out.append({"gamma": g, "temperature": t, "rows": len(rows), "chains": int(chains)})
    return {"conditions": out}
