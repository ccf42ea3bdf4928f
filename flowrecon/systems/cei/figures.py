"""CEI figures: the energy mismatch of predicted geometries and posteriors per atom.

`posterior_in_plane` draws a planar three-atom molecule (OCS) in its molecular plane;
`posterior_per_atom` works for any molecule, planar or not: each atom's posterior
around its true position in the event's momentum frame, all three directions shown.

Built on the generic helpers of `flowrecon.plots` (Agg renderer, no pyplot state); each
function writes one PNG and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.lines import Line2D

from flowrecon.plots import DECADES, as_float_array, new_figure, save_figure, style_axes
from flowrecon.systems.cei.constants import ATOMS, MASSES
from flowrecon.systems.cei.frames import (
    choose_frame_atoms,
    molecule_frame,
    momentum_frame,
    to_frame,
)
from flowrecon.systems.cei.molecule import Molecule, load_molecule
from flowrecon.systems.cei.physics import remove_centre_of_mass

__all__ = ["energy_difference_histogram", "posterior_in_plane", "posterior_per_atom"]

PathLike = str | os.PathLike

#: CPK-like atom colours; sulfur is a darker yellow so that it reads on white.
_ATOM_COLOURS = {"C": "0.25", "O": "tab:red", "S": "#d4a017"}


def energy_difference_histogram(
    values: Any | Mapping[str, Any], out_path: PathLike, label: str | None = None
) -> Path:
    """Histogram of the relative energy mismatch ``|KE - PE| / KE`` with the median marked.

    The x axis is logarithmic when the values span more than two decades (zeros, which a
    log axis cannot show, are counted in the title). ``values`` may be a dict name ->
    values to overlay several models on the same bins.

    Args:
        values: Per-event (or per-sample) ``|KE - PE| / KE``, any shape; or a dict of them.
        out_path: PNG to write.
        label: Legend name when ``values`` is a single array.

    Example:
        >>> import tempfile
        >>> v = np.random.default_rng(0).lognormal(-6, 1.5, size=500)
        >>> energy_difference_histogram(v, Path(tempfile.mkdtemp()) / "e.png").name
        'e.png'
    """
    sets = dict(values) if isinstance(values, Mapping) else {label or "predicted": values}
    if not sets:
        raise ValueError("values must hold at least one set of energy differences")
    arrays: dict[str, np.ndarray] = {}
    notes = []
    for name, v in sets.items():
        a = as_float_array(v, f"energy differences {name!r}").ravel()
        finite = a[np.isfinite(a)]
        if finite.size == 0:
            raise ValueError(f"energy differences {name!r} hold no finite value ({a.size} given)")
        if (finite < 0).any():
            raise ValueError(
                f"energy differences {name!r} must be >= 0 (|KE - PE| / KE); "
                f"the smallest is {finite.min():g}"
            )
        if finite.size < a.size:
            notes.append(f"{name}: {a.size - finite.size} non-finite left out")
        arrays[str(name)] = finite
    pooled = np.concatenate(list(arrays.values()))
    positive = pooled[pooled > 0]
    log_x = positive.size > 1 and positive.max() / positive.min() > DECADES
    if log_x:
        edges = np.geomspace(positive.min(), positive.max(), 61)
        for name, a in arrays.items():
            if (zeros := int((a == 0).sum())) > 0:
                notes.append(f"{name}: {zeros} exact zeros not shown")
    else:
        hi = pooled.max() if pooled.max() > 0 else 1.0
        edges = np.linspace(0.0, hi, 61)

    fig, (ax,) = new_figure(1, 1, (6.4, 4.4))
    for i, (name, a) in enumerate(arrays.items()):
        colour = f"C{i}"
        ax.hist(a, edges, histtype="step", lw=1.6, color=colour, label=f"{name} ({a.size} values)")
        median = float(np.median(a))
        ax.axvline(median, color=colour, ls="--", lw=1.2, label=f"median {name}: {median:.2e}")
    if log_x:
        ax.set_xscale("log")
    style_axes(
        ax,
        "|KE - PE| / KE  (relative, dimensionless)",
        "count per bin",
        "Energy mismatch of predicted geometries"
        + (f"\n{'; '.join(notes)}" if notes else "\n0 for a perfect reconstruction"),
    )
    ax.legend(fontsize=9)
    return save_figure(fig, out_path)


def posterior_in_plane(
    samples: Any,
    truth: Any,
    momenta: Any,
    out_path: PathLike,
    events: Sequence[int],
    atoms: Sequence[str] = ATOMS,
    *,
    masses: Sequence[float] = MASSES,
    labels: Sequence[object] | None = None,
) -> Path:
    """Posterior samples of each atom drawn in the molecular plane, one panel per event.

    Positions are taken relative to their centre of mass and rotated into the event's
    momentum frame (``e1`` along p_S, ``e2`` along the part of p_C orthogonal to it), which
    the measured momenta alone define; the motion, and so the true geometry, lies in the
    e1-e2 plane. Each event gets a row: the whole molecule, then one zoomed panel per
    atom centred on its true position, where the posterior's spread is visible (at the
    scale of the molecule a good posterior hides under the marker). The rms out-of-plane
    (e3) spread of the samples is given in the first title.

    Args:
        samples: Posterior samples ``(n, B, 9)``, bohr, sample-first.
        truth: True positions ``(B, 9)``, bohr.
        momenta: Measured momenta ``(B, 9)``, a.u., which define each event's frame.
        out_path: PNG to write.
        events: Indices (into B) of the events to draw.
        atoms: Names of the three atoms, in column order.
        masses: Atom masses in electron masses, for the centre of mass.
        labels: Names of the events in the titles (e.g. their row in the data file);
            default their indices.

    Example:
        >>> import tempfile
        >>> rng = np.random.default_rng(0)
        >>> x = np.tile([0.0, 0, 0, -2.2, 0.1, 0, 2.9, 0.2, 0], (4, 1))
        >>> p = np.tile([0.0, 5, 0, -20, -3, 0, 20, -2, 0], (4, 1))
        >>> xs = x + 0.05 * rng.normal(size=(30, 4, 9))
        >>> posterior_in_plane(xs, x, p, Path(tempfile.mkdtemp()) / "pp.png", [0, 1]).name
        'pp.png'
    """
    s, t, p, idx = _checked(samples, truth, momenta, events, atoms)
    if labels is not None and len(labels) != len(idx):
        raise ValueError(f"labels has {len(labels)} entries for {len(idx)} events")
    frame = momentum_frame(p[idx])  # (k, 3, 3)
    xs = to_frame(remove_centre_of_mass(s[:, idx], masses), frame).reshape(s.shape[0], -1, 3, 3)
    xt = to_frame(remove_centre_of_mass(t[idx], masses), frame).reshape(-1, 3, 3)
    names = list(labels) if labels is not None else list(idx)
    fig, axes = new_figure(len(idx), 4, (3.6, 3.4))
    for k, name in enumerate(names):
        row = axes[4 * k : 4 * k + 4]
        _molecule_panel(row[0], xs[:, k], xt[k], atoms, name)
        for a, atom in enumerate(atoms):
            _zoom_panel(row[1 + a], xs[:, k, a, :2] - xt[k, a, :2], atom, _colour(atom, a))
    handles = [
        Line2D([], [], ls="", marker="o", ms=5, color=_colour(atom, a), label=f"{atom} samples")
        for a, atom in enumerate(atoms)
    ]
    handles.append(Line2D([], [], ls="", marker="x", ms=8, mew=2, color="black", label="true"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9)
    fig.suptitle("Posterior in the molecular plane (momentum frame, centre of mass at 0)")
    return save_figure(fig, out_path)


def _colour(atom: str, index: int) -> str:
    return _ATOM_COLOURS.get(atom, f"C{index}")


def _checked(samples: Any, truth: Any, momenta: Any, events: Sequence[int], atoms: Sequence[str]):
    """The figure's inputs as arrays, with messages that say what was expected."""
    s, t, p = (
        as_float_array(samples, "samples"),
        as_float_array(truth, "truth"),
        as_float_array(momenta, "momenta"),
    )
    if t.ndim != 2 or t.shape[1] != 9 or t.shape[0] == 0:
        raise ValueError(f"truth must have shape (B, 9) positions in bohr; got {t.shape}")
    b = t.shape[0]
    if s.ndim != 3 or s.shape[1:] != (b, 9) or s.shape[0] == 0:
        raise ValueError(
            f"samples must have shape (n, B, 9) = (n, {b}, 9), sample-first; got {s.shape}"
        )
    if p.shape != (b, 9):
        raise ValueError(f"momenta must have shape (B, 9) = ({b}, 9); got {p.shape}")
    if len(atoms) != 3:
        raise ValueError(f"atoms must name the 3 atoms in column order; got {list(atoms)}")
    events = list(events)
    if not events:
        raise ValueError("events must name at least one event index")
    bad = [e for e in events if not isinstance(e, int | np.integer) or not 0 <= e < b]
    if bad:
        raise ValueError(f"event indices must be integers in [0, {b}); got {bad}")
    return s, t, p, np.asarray(events, dtype=int)


def _molecule_panel(ax: Any, xs: np.ndarray, xt: np.ndarray, atoms: Sequence[str], name) -> None:
    """The whole molecule: samples ``(n, 3, 3)`` and truth ``(3, 3)`` in the plane."""
    # Bonds of the true geometry (C-O and C-S) help to read its shape at a glance.
    for other in (1, 2):
        ax.plot(xt[[0, other], 0], xt[[0, other], 1], color="0.6", lw=1.5, zorder=1)
    for a, atom in enumerate(atoms):
        ax.scatter(xs[:, a, 0], xs[:, a, 1], s=5, alpha=0.3, color=_colour(atom, a), lw=0,
                   zorder=2)  # fmt: skip
        ax.scatter(xt[a, 0], xt[a, 1], s=60, marker="x", color="black", lw=1.5, zorder=3)
    # Equal scales on a square box around truth and bulk of the samples; limits set
    # here (not left to "datalim") keep the constrained layout from clipping labels.
    pts = np.concatenate(
        [xt[:, :2], np.quantile(xs[:, :, :2], [0.01, 0.99], axis=0).reshape(-1, 2)]
    )
    centre = (pts.min(0) + pts.max(0)) / 2
    half = 0.55 * float((pts.max(0) - pts.min(0)).max()) + 0.2
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_aspect("equal", adjustable="box")
    out_of_plane = float(np.sqrt(np.mean(xs[:, :, 2] ** 2)))
    style_axes(
        ax,
        "e1, along p_S (bohr)",
        "e2 (bohr)",
        f"event {name}: {len(xs)} samples\nrms out-of-plane e3 = {out_of_plane:.2g} bohr",
    )


def _zoom_panel(ax: Any, d: np.ndarray, atom: str, colour: str) -> None:
    """One atom's samples relative to its true position ``(n, 2)``, bohr."""
    # The bulk of the posterior sets the scale; the title counts samples outside it.
    half = max(1.3 * float(np.quantile(np.abs(d), 0.975)), 1e-6)
    inside = (np.abs(d) <= half).all(axis=1)
    ax.scatter(d[inside, 0], d[inside, 1], s=8, alpha=0.5, color=colour, lw=0)
    ax.scatter(0, 0, s=80, marker="x", color="black", lw=2, zorder=3)
    ax.set_xlim(-half, half)
    ax.set_ylim(-half, half)
    ax.set_aspect("equal")
    rms = float(np.sqrt(np.mean(np.sum(d * d, axis=1))))
    outside = f", {int((~inside).sum())} outside" if not inside.all() else ""
    style_axes(ax, "delta e1 (bohr)", "delta e2 (bohr)",
               f"{atom}: rms distance {rms:.2g} bohr{outside}")  # fmt: skip


def posterior_per_atom(
    samples: Any,
    truth: Any,
    momenta: Any,
    out_path: PathLike,
    events: Sequence[int],
    molecule: Molecule | str,
    *,
    labels: Sequence[object] | None = None,
) -> Path:
    """Each atom's posterior around its true position, one row per event, any molecule.

    Deviations ``sample - truth`` are rotated into the event's momentum frame (the
    molecule's reference atoms, `flowrecon.systems.cei.frames.molecule_frame`), which the
    measured momenta alone define. A panel shows ``e1`` against ``e2``, the colour of a
    dot its ``e3`` component, so a non-planar molecule's out-of-plane error is seen too;
    the title gives the rms deviation along each axis. Axis limits follow the bulk of
    the posterior (97.5 % quantile) and the title counts the samples outside.

    Args:
        samples: Posterior samples ``(n, B, 3N)``, bohr, sample-first.
        truth: True positions ``(B, 3N)``, bohr.
        momenta: Measured momenta ``(B, 3N)``, a.u.
        out_path: PNG to write.
        events: Indices (into B) of the events to draw.
        molecule: The molecule (atoms, labels, frame atoms).
        labels: Names of the events in the titles; default their indices.

    Example:
        >>> import tempfile
        >>> from flowrecon.systems.cei.molecule import load_molecule
        >>> m = load_molecule("chbrclf")
        >>> rng = np.random.default_rng(0)
        >>> x = np.tile(np.ravel(m.geometry), (3, 1))
        >>> p = rng.normal(size=(3, 15))
        >>> xs = x + 0.05 * rng.normal(size=(20, 3, 15))
        >>> posterior_per_atom(xs, x, p, Path(tempfile.mkdtemp()) / "pa.png", [0, 2], m).name
        'pa.png'
    """
    m = load_molecule(molecule)
    s, t, p = (as_float_array(v, n) for v, n in ((samples, "samples"), (truth, "truth"),
                                                 (momenta, "momenta")))  # fmt: skip
    width = 3 * m.n_atoms
    if t.ndim != 2 or t.shape[1] != width or t.shape[0] == 0:
        raise ValueError(f"truth must have shape (B, {width}) for {m.name}; got {t.shape}")
    b = t.shape[0]
    if s.ndim != 3 or s.shape[1:] != (b, width) or s.shape[0] == 0:
        raise ValueError(f"samples must have shape (n, {b}, {width}), sample-first; got {s.shape}")
    if p.shape != (b, width):
        raise ValueError(f"momenta must have shape ({b}, {width}); got {p.shape}")
    idx = np.asarray(list(events), dtype=int)
    if idx.size == 0 or (idx < 0).any() or (idx >= b).any():
        raise ValueError(f"events must be indices in [0, {b}); got {list(events)}")
    if labels is not None and len(labels) != len(idx):
        raise ValueError(f"labels has {len(labels)} entries for {len(idx)} events")
    reference = m.frame if m.frame is not None else choose_frame_atoms(p)
    frame = molecule_frame(p[idx], reference)
    d = to_frame(s[:, idx] - t[idx], frame).reshape(s.shape[0], len(idx), m.n_atoms, 3)
    names = list(labels) if labels is not None else list(idx)
    fig, axes = new_figure(len(idx), m.n_atoms, (3.2, 3.2))
    for k, name in enumerate(names):
        for a, label in enumerate(m.labels):
            ax = axes[m.n_atoms * k + a]
            _deviation_panel(ax, d[:, k, a], f"event {name}, {label}")
    fig.suptitle(
        f"{m.name}: posterior minus truth per atom in the momentum frame "
        f"(e1 along p_{m.labels[reference[0]]}); colour = e3"
    )
    return save_figure(fig, out_path)


def _deviation_panel(ax: Any, d: np.ndarray, title: str) -> None:
    """Samples' deviations ``(n, 3)`` from the truth: e1 vs e2, colour e3."""
    half = max(1.3 * float(np.quantile(np.abs(d), 0.975)), 1e-6)
    inside = (np.abs(d) <= half).all(axis=1)
    # A dark edge keeps dots with e3 ~ 0 (the light middle of the colour map) visible.
    ax.scatter(d[inside, 0], d[inside, 1], c=d[inside, 2], cmap="coolwarm", vmin=-half,
               vmax=half, s=10, alpha=0.8, edgecolors="0.3", linewidths=0.3)  # fmt: skip
    ax.scatter(0, 0, s=80, marker="x", color="black", lw=2, zorder=3)
    ax.set_xlim(-half, half)
    ax.set_ylim(-half, half)
    ax.set_aspect("equal")
    rms = np.sqrt(np.mean(d * d, axis=0))
    outside = f", {int((~inside).sum())} outside" if not inside.all() else ""
    spread = f"rms e1 {rms[0]:.2g}, e2 {rms[1]:.2g}, e3 {rms[2]:.2g}"
    style_axes(ax, "delta e1 (bohr)", "delta e2 (bohr)", f"{title}{outside}\n{spread}")
