"""Figures of the Lennard-Jones evaluation: one panel per condition (gamma, T).

Built with `matplotlib.figure.Figure` and the Agg canvas, never pyplot, like
`flowrecon.plots`: no display needed, the user's pyplot state untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle

from flowrecon.systems.lj.physics import ideal_pair_distances

__all__ = [
    "all_figures",
    "density_profiles",
    "energy_histograms",
    "latent_map",
    "pair_distributions",
    "snapshots",
]

DPI = 120
_MC, _GEN = "0.3", "tab:blue"


def _panels(n: int, size: tuple[float, float] = (4.0, 3.2)) -> tuple[Figure, list[Axes]]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _title(row: dict[str, Any]) -> str:
    return f"gamma = {row['gamma']:g}, T = {row['temperature']:g}"


def _robust_range(*arrays: np.ndarray) -> tuple[float, float]:
    """1st to 99th percentile of the Monte Carlo (first) array, widened to the others' core."""
    ref = np.asarray(arrays[0])
    lo, hi = np.percentile(ref[np.isfinite(ref)], [0.5, 99.5])
    for a in arrays[1:]:
        a = np.asarray(a)
        a = a[np.isfinite(a)]
        if a.size:
            q = np.percentile(a, [5, 95])
            lo, hi = min(lo, q[0]), max(hi, q[1])
    pad = 0.05 * (hi - lo or 1.0)
    return float(lo - pad), float(hi + pad)


def energy_histograms(rows: Sequence[dict], curves: Sequence[dict], path: Path) -> Path:
    """Histograms of U/N, generated vs Monte Carlo, per condition."""
    fig, axes = _panels(len(rows))
    for ax, row, c in zip(axes, rows, curves):
        lo, hi = _robust_range(c["u_mc"], c["u_gen"])
        edges = np.linspace(lo, hi, 50)
        ax.hist(
            c["u_mc"],
            edges,
            density=True,
            histtype="stepfilled",
            color=_MC,
            alpha=0.35,
            label="Monte Carlo",
        )
        gen = np.asarray(c["u_gen"])
        outside = int(((gen < lo) | (gen > hi) | ~np.isfinite(gen)).sum())
        ax.hist(
            gen[np.isfinite(gen)],
            edges,
            density=True,
            histtype="step",
            color=_GEN,
            lw=1.5,
            label="generated" + (f" ({outside} off scale)" if outside else ""),
        )
        ax.set_title(f"{_title(row)}\nW1 = {row['energy_w1']:.3f}", fontsize=9)
        ax.set_xlabel("U / N (epsilon)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    return _save(fig, path)


def density_profiles(rows: Sequence[dict], curves: Sequence[dict], path: Path) -> Path:
    """Number density along the height, generated vs Monte Carlo, per condition."""
    fig, axes = _panels(len(rows))
    for ax, row, c in zip(axes, rows, curves):
        ax.plot(c["centres"], c["rho_mc"], "o-", color=_MC, ms=3, label="Monte Carlo")
        ax.plot(c["centres"], c["rho_gen"], "s--", color=_GEN, ms=3, label="generated")
        ax.axhline(
            0.1 * np.max(c["rho_mc"]), color="0.7", lw=0.8, ls=":", label="a tenth of the maximum"
        )
        ax.set_title(
            f"{_title(row)}\nlargest rel. error {row['density_rel_error_max']:.1%}", fontsize=9
        )
        ax.set_xlabel("height (sigma)")
        ax.set_ylabel("rho (sigma^-3)")
        ax.legend(fontsize=7)
    return _save(fig, path)


def pair_distributions(
    rows: Sequence[dict], curves: Sequence[dict], box: float, dim: int, path: Path
) -> Path:
    """g(r): pair-distance density over that of uniform points in the same box."""
    ref = ideal_pair_distances(box, dim)
    edges = np.linspace(0.0, min(box * math.sqrt(dim), 4.0), 81)
    ideal, _ = np.histogram(ref, edges, density=True)
    centres = 0.5 * (edges[1:] + edges[:-1])
    fig, axes = _panels(len(rows))
    for ax, row, c in zip(axes, rows, curves):
        for key, colour, label in (("r_mc", _MC, "Monte Carlo"), ("r_gen", _GEN, "generated")):
            h, _ = np.histogram(c[key], edges, density=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                g = np.where(ideal > 0, h / ideal, np.nan)
            ax.plot(centres, g, color=colour, label=label)
        ax.axvline(0.8, color="tab:red", lw=0.8, ls=":", label="overlap (0.8)")
        ax.set_title(f"{_title(row)}\nW1(r) = {row['pair_w1']:.3f}", fontsize=9)
        ax.set_xlabel("r (sigma)")
        ax.set_ylabel("g(r) (closed box)")
        ax.legend(fontsize=7)
    return _save(fig, path)


def _draw_configuration(ax: Axes, conf: np.ndarray, box: float, colour: str) -> None:
    ax.add_patch(Rectangle((0, 0), box, box, fill=False, color="0.5", lw=1))
    x = conf[:, 0]
    h = conf[:, -1]
    for xi, hi in zip(x, h):
        ax.add_patch(Circle((xi, hi), 0.5, color=colour, alpha=0.45, lw=0))
    ax.set_xlim(-0.7, box + 0.7)
    ax.set_ylim(-0.7, box + 0.7)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def snapshots(
    rows: Sequence[dict],
    gens: Sequence[np.ndarray],
    mcs: Sequence[np.ndarray],
    box: float,
    path: Path,
) -> Path:
    """One Monte Carlo and one generated configuration per condition, side by side.

    Particles are drawn as discs of diameter sigma in the (x, height) plane (a
    projection in 3-D), so overlaps and the layering under gravity are visible.
    """
    n = len(rows)
    fig = Figure(figsize=(2.6 * n, 5.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for j, (row, gen, mc) in enumerate(zip(rows, gens, mcs)):
        _draw_configuration(axes[0, j], mc[0], box, _MC)
        _draw_configuration(axes[1, j], gen[0], box, _GEN)
        axes[0, j].set_title(_title(row), fontsize=9)
    axes[0, 0].set_ylabel("Monte Carlo")
    axes[1, 0].set_ylabel("generated")
    return _save(fig, path)


def latent_map(latent: dict[str, np.ndarray], path: Path) -> Path:
    """Latent means on their first two principal components, one colour per gamma."""
    fig, (ax,) = _panels(1, (5.0, 4.2))
    pcs, gamma = latent["pcs"], latent["gamma"]
    values = np.unique(np.round(gamma, 9))
    colours = [f"C{i % 10}" for i in range(len(values))]
    for value, colour in zip(values, colours):
        mine = np.isclose(gamma, value)
        second = pcs[mine, 1] if pcs.shape[1] > 1 else np.zeros(mine.sum())
        ax.scatter(pcs[mine, 0], second, s=4, alpha=0.5, color=colour, label=f"gamma = {value:g}")
    ax.set_xlabel("latent PC 1")
    ax.set_ylabel("latent PC 2")
    ax.legend(markerscale=3, fontsize="small")
    return _save(fig, path)


def all_figures(
    out: Path,
    rows: Sequence[dict],
    curves: Sequence[dict],
    gens: Sequence[np.ndarray],
    mcs: Sequence[np.ndarray],
    box: float,
) -> dict[str, tuple[Path, str]]:
    """Every figure of the evaluation: ``{name: (path, caption)}``."""
    dim = mcs[0].shape[-1]
    return {
        "lj_energy": (
            energy_histograms(rows, curves, out / "lj_energy.png"),
            "Energy per particle U/N: generated vs held-out Monte Carlo, per condition",
        ),
        "lj_density": (
            density_profiles(rows, curves, out / "lj_density.png"),
            "Density profile along the gravity axis; errors count above the dotted line",
        ),
        "lj_pairs": (
            pair_distributions(rows, curves, box, dim, out / "lj_pairs.png"),
            "Pair-distance distribution g(r) relative to uniform points in the box",
        ),
        "lj_snapshots": (
            snapshots(rows, gens, mcs, box, out / "lj_snapshots.png"),
            "A Monte Carlo (top) and a generated (bottom) configuration per condition",
        ),
    }
