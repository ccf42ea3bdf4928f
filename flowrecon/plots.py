"""Diagnostic plots: learning curves, predicted vs true, distributions, calibration, physics.

Every function writes one PNG (or a few, for :func:`learning_curves`) to the path it is
given, creating parent folders, and returns the path. Figures are built with
:class:`matplotlib.figure.Figure` and the Agg renderer directly, never through
``pyplot``: no display is needed, the user's own pyplot backend and open figures are left
alone, and nothing stays registered in pyplot's figure list after a function returns.

Arrays may be numpy arrays or torch tensors. Positions are in bohr and momenta in atomic
units; axis labels say so. Bad inputs raise ``ValueError`` with a message that says what
was expected.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from flowrecon.systems.cei.constants import ATOMS, MASSES, MOMENTUM_COLUMNS, POSITION_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

    from flowrecon.training import History

__all__ = [
    "calibration_curve",
    "calibration_curves",
    "compare_bars",
    "distributions",
    "energy_difference_histogram",
    "learning_curves",
    "posterior_in_plane",
    "real_vs_predicted",
]

PathLike = str | os.PathLike

DPI = 120
#: Train and validation keep these colours in every learning-curve plot.
_TRAIN_COLOUR, _VAL_COLOUR = "tab:blue", "tab:orange"
#: Truth and prediction keep these colours in every comparison plot.
_TRUE_COLOUR, _PRED_COLOUR = "0.35", "tab:blue"
#: CPK-like atom colours; sulfur is a darker yellow so that it reads on white.
_ATOM_COLOURS = {"C": "0.25", "O": "tab:red", "S": "#d4a017"}
#: Order in which loss components are shown; others follow alphabetically.
_COMPONENT_ORDER = ("total", "loss", "nll", "recon", "kl", "l1", "l2", "physics")
#: Titles of the loss components logged by `flowrecon.training.train`.
_COMPONENT_TITLES = {
    "total": "total (minimised)",
    "loss": "loss (unregularised)",
    "nll": "negative log-likelihood",
    "recon": "reconstruction",
    "kl": "KL divergence",
    "l1": "L1 penalty (weighted)",
    "l2": "L2 penalty (weighted)",
    "physics": "physics terms (weighted sum)",
}
#: Units and short descriptions of the metrics written by ``flowrecon evaluate``.
_METRICS: dict[str, tuple[str, str]] = {
    "n": ("events", "test events"),
    "ade": ("bohr", "mean atom error (posterior mean)"),
    "ade_sample": ("bohr", "mean atom error (one draw)"),
    "rmsd_com": ("bohr", "RMSD after removing COM"),
    "bond_error_co": ("bohr", "|error| of r_CO"),
    "bond_error_cs": ("bohr", "|error| of r_CS"),
    "angle_error_deg": ("degrees", "|error| of O-C-S angle"),
    "mre": ("%", "mean relative error"),
    "mre2": ("%", "mean squared relative error"),
    "mse": ("bohr²", "mean squared coordinate error"),
    "energy_diff": ("relative", "mean |KE - PE| / KE"),
    "energy_diff2": ("relative", "mean ((KE - PE) / KE)²"),
    "resim_residual": ("relative", "median re-simulation residual"),
    "coverage_50": ("fraction", "coverage of 50 % intervals"),
    "coverage_90": ("fraction", "coverage of 90 % intervals"),
    "nll": ("nats / event", "negative log-likelihood"),
    "train_seconds": ("s", "training time"),
    "epochs": ("epochs", "epochs trained"),
    "sampling_samples_per_s": ("samples / s", "sampling speed"),
}
#: Nominal value of the coverage metrics, drawn as a reference line.
_NOMINAL = {"coverage_50": 0.5, "coverage_90": 0.9}
#: Values spanning more than this ratio get a logarithmic axis.
_DECADES = 100.0


# --------------------------------------------------------------------------- helpers


def _figure(nrows: int, ncols: int, panel: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure with a flat list of its axes."""
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, axes


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    # The figure was never registered with pyplot; clearing it frees its artists now
    # rather than whenever the garbage collector runs.
    fig.clear()
    return path


def _array(a: Any, name: str) -> np.ndarray:
    """A float64 numpy copy of a numpy array, torch tensor or nested sequence."""
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        a = a.detach().cpu().numpy()
    try:
        return np.array(a, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be an array of numbers; {err}") from None


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    ncols = min(max_cols, n)
    return math.ceil(n / ncols), ncols


def _style(ax: Axes, xlabel: str, ylabel: str, title: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)


def _default_unit(columns: Sequence[str]) -> str:
    if all(c in POSITION_COLUMNS for c in columns):
        return "bohr"
    if all(c in MOMENTUM_COLUMNS for c in columns):
        return "a.u."
    return ""


def _column_label(column: str) -> str:
    """``"cx"`` -> ``"C x"``, ``"psy"`` -> ``"S p_y"``; other names unchanged."""
    if column in POSITION_COLUMNS:
        return f"{column[0].upper()} {column[1]}"
    if column in MOMENTUM_COLUMNS:
        return f"{column[1].upper()} p_{column[2]}"
    return column


def _with_unit(label: str, unit: str) -> str:
    return f"{label} ({unit})" if unit else label


def _spans_decades(values: np.ndarray) -> bool:
    """True when all values are positive and range over more than two decades."""
    v = values[np.isfinite(values)]
    return v.size > 1 and bool((v > 0).all()) and v.max() / v.min() > _DECADES


def _paired(
    truth: Any, pred: Any, columns: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Checks ``truth`` and ``pred`` are both ``(B, D)`` with ``D = len(columns)``."""
    columns = list(columns)
    t, p = _array(truth, "truth"), _array(pred, "pred")
    d = len(columns)
    for name, a in (("truth", t), ("pred", p)):
        if a.ndim != 2 or a.shape[1] != d or a.shape[0] == 0:
            hint = (
                " (posterior samples? pass their mean over the first axis)" if a.ndim == 3 else ""
            )
            raise ValueError(
                f"{name} must have shape (B, {d}) with B >= 1, one column per name in "
                f"columns={columns}; got {a.shape}{hint}"
            )
    if t.shape != p.shape:
        raise ValueError(f"truth and pred must have the same shape; got {t.shape} and {p.shape}")
    return t, p, columns


# --------------------------------------------------------------------------- learning curves


def _history_parts(history: History | Mapping[str, Any]) -> tuple[dict, dict, int]:
    if isinstance(history, Mapping):
        d = history
    elif hasattr(history, "to_dict"):
        d = history.to_dict()
    else:
        raise ValueError(
            f"history must be a flowrecon.training.History or its to_dict() form; "
            f"got {type(history).__name__}"
        )
    train = d.get("train")
    if not isinstance(train, Mapping) or not train:
        raise ValueError("history has no training log: expected a non-empty 'train' dict")
    val = d.get("val") or {}
    if not isinstance(val, Mapping):
        raise ValueError(f"history 'val' must be a dict of lists; got {type(val).__name__}")

    def clean(log: Mapping[str, Any], split: str) -> dict[str, np.ndarray]:
        out = {}
        for k, v in log.items():
            a = _array(v, f"history {split}[{k!r}]")
            if a.ndim != 1:
                raise ValueError(
                    f"history {split}[{k!r}] must be a list of per-epoch values; got shape "
                    f"{a.shape}"
                )
            # A run stopped for a non-finite loss logs inf; plot it as a gap, not as the
            # axis limit.
            a[~np.isfinite(a)] = np.nan
            out[str(k)] = a
        return out

    return clean(train, "train"), clean(val, "val"), int(d.get("best_epoch", 0) or 0)


def _ordered_components(train: Mapping[str, Any], val: Mapping[str, Any]) -> list[str]:
    names = set(train) | set(val)
    first = [k for k in _COMPONENT_ORDER if k in names]
    return first + sorted(names - set(first))


def _curve_panel(
    ax: Axes,
    train: np.ndarray,
    val: np.ndarray | None,
    first: int,
    last: int,
    best_epoch: int,
) -> None:
    """Train and validation values of epochs ``first..last`` (1-based) on one axes."""
    for values, label, colour in (
        (train, "train", _TRAIN_COLOUR),
        (val, "validation", _VAL_COLOUR),
    ):
        if values is None or len(values) < first:
            continue
        stop = min(last, len(values))
        epochs = np.arange(first, stop + 1)
        # Markers help to read a few epochs; over many they only thicken the line.
        style = "o-" if len(epochs) <= 30 else "-"
        ax.plot(epochs, values[first - 1 : stop], style, ms=3, lw=1.5, color=colour, label=label)
    if first <= best_epoch <= last:
        ax.axvline(
            best_epoch, color="tab:green", ls="--", lw=1.2, label=f"best epoch ({best_epoch})"
        )
    elif best_epoch > 0:
        # Say where the restored state is even when it lies outside this range.
        ax.plot([], [], " ", label=f"best epoch: {best_epoch} (not in range)")
    else:
        ax.plot([], [], " ", label="best: initial state")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def learning_curves(history: History | Mapping[str, Any], out_dir: PathLike) -> list[Path]:
    """Learning curves of the unregularised loss and every logged loss component.

    Writes three PNGs to ``out_dir``:

    - ``learning_curve_first10.png``: the unregularised loss (``"loss"``), train and
      validation on the same axes, epochs 1-10;
    - ``learning_curve_rest.png``: the same from epoch 11 to the end (a note says so when
      training was shorter), so the slow late decrease is not flattened by the first drop;
    - ``loss_components.png``: one panel per logged component, train and validation.

    The best epoch (the state restored at the end of training) is marked in each.

    Args:
        history: A `flowrecon.training.History` or its ``to_dict()`` form.
        out_dir: Folder to write to; created if missing.

    Returns:
        The three paths, in the order above.

    Example:
        >>> import tempfile
        >>> h = {"train": {"loss": [3.0, 2.0, 1.5]}, "val": {"loss": [3.1, 2.2, 1.9]},
        ...      "best_epoch": 3}
        >>> [p.name for p in learning_curves(h, tempfile.mkdtemp())]
        ['learning_curve_first10.png', 'learning_curve_rest.png', 'loss_components.png']
    """
    train, val, best_epoch = _history_parts(history)
    out_dir = Path(out_dir)
    key = "loss" if "loss" in train else "total"
    if key not in train:
        raise ValueError(
            f"history has neither a 'loss' nor a 'total' component to draw; it logs {sorted(train)}"
        )
    what = "unregularised loss" if key == "loss" else "total loss (no 'loss' component logged)"
    n_epochs = max(len(v) for v in train.values())
    if n_epochs == 0:
        raise ValueError("history has no epochs to plot (every component is empty)")
    paths = []

    # First ten epochs.
    fig, (ax,) = _figure(1, 1, (6.4, 4.4))
    _curve_panel(ax, train[key], val.get(key), 1, min(10, n_epochs), best_epoch)
    _style(ax, "epoch", what, f"{what.capitalize()}, epochs 1-{min(10, n_epochs)}")
    ax.legend(fontsize=9)
    paths.append(_save(fig, out_dir / "learning_curve_first10.png"))

    # Epoch 11 to the end.
    fig, (ax,) = _figure(1, 1, (6.4, 4.4))
    if n_epochs >= 11:
        _curve_panel(ax, train[key], val.get(key), 11, n_epochs, best_epoch)
        _style(ax, "epoch", what, f"{what.capitalize()}, epochs 11-{n_epochs}")
        ax.legend(fontsize=9)
    else:
        _style(ax, "epoch", what, f"{what.capitalize()}, epochs 11 onwards")
        ax.text(
            0.5,
            0.5,
            f"Training ran {n_epochs} epoch{'s' if n_epochs != 1 else ''}:\n"
            "nothing after epoch 10 to show.\nSee learning_curve_first10.png.",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=11,
        )
        ax.set_xlim(11, 20)
        ax.set_yticks([])
    paths.append(_save(fig, out_dir / "learning_curve_rest.png"))

    # One panel per component.
    names = _ordered_components(train, val)
    nrows, ncols = _grid(len(names))
    fig, axes = _figure(nrows, ncols, (4.2, 3.2))
    for ax, name in zip(axes, names):
        t, v = train.get(name), val.get(name)
        _curve_panel(ax, t if t is not None else np.array([]), v, 1, n_epochs, best_epoch)
        both = np.concatenate([a for a in (t, v) if a is not None])
        if _spans_decades(both):
            ax.set_yscale("log")
        _style(ax, "epoch", name, _COMPONENT_TITLES.get(name, name))
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    # One legend for the figure: the same three entries in every panel.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9)
    fig.suptitle(f"Loss components per epoch ({n_epochs} epochs)")
    paths.append(_save(fig, out_dir / "loss_components.png"))
    return paths


# --------------------------------------------------------------------------- predicted vs true


def real_vs_predicted(
    truth: Any,
    pred: Any,
    out_path: PathLike,
    columns: Sequence[str] = POSITION_COLUMNS,
    *,
    unit: str | None = None,
    max_scatter: int = 5000,
) -> Path:
    """Predicted against true value, one panel per column, with the y = x line and RMSE.

    Up to ``max_scatter`` events are drawn as points; above that as a 2-D histogram with a
    logarithmic colour scale, so that dense regions do not saturate.

    Args:
        truth: True values, ``(B, D)``.
        pred: Predicted values (e.g. the posterior mean), ``(B, D)``.
        out_path: PNG to write.
        columns: The ``D`` column names, e.g. ``POSITION_COLUMNS``.
        unit: Unit for the labels; by default bohr for positions, a.u. for momenta.
        max_scatter: Largest B drawn as a scatter plot.

    Example:
        >>> import tempfile
        >>> x = np.random.default_rng(0).normal(size=(50, 9))
        >>> real_vs_predicted(x, x + 0.1, Path(tempfile.mkdtemp()) / "rvp.png").name
        'rvp.png'
    """
    t, p, columns = _paired(truth, pred, columns)
    unit = _default_unit(columns) if unit is None else unit
    nrows, ncols = _grid(len(columns))
    fig, axes = _figure(nrows, ncols, (3.6, 3.5))
    big = t.shape[0] > max_scatter
    for j, (ax, col) in enumerate(zip(axes, columns)):
        ok = np.isfinite(t[:, j]) & np.isfinite(p[:, j])
        tj, pj = t[ok, j], p[ok, j]
        rmse = float(np.sqrt(np.mean((pj - tj) ** 2))) if ok.any() else math.nan
        # Same limits on both axes so that the y = x line is the diagonal of the panel.
        lo = float(min(tj.min(), pj.min())) if ok.any() else 0.0
        hi = float(max(tj.max(), pj.max())) if ok.any() else 1.0
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo), 1.0) * 0.05
        lo, hi = lo - pad, hi + pad
        if big:
            ax.hist2d(tj, pj, bins=80, range=[[lo, hi], [lo, hi]], norm=LogNorm(), cmin=1)
        else:
            ax.scatter(tj, pj, s=6, alpha=0.5, color=_PRED_COLOUR, lw=0)
        ax.plot([lo, hi], [lo, hi], color="tab:red", lw=1, ls="--", label="y = x")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal", adjustable="box")
        label = _column_label(col)
        dropped = f", {int((~ok).sum())} non-finite" if not ok.all() else ""
        _style(
            ax,
            _with_unit(f"true {label}", unit),
            _with_unit(f"predicted {label}", unit),
            f"{label}: RMSE {rmse:.3g}{' ' + unit if unit else ''}{dropped}",
        )
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=9)
    how = "2-D histogram, colour: events per bin (log scale)" if big else "one point per event"
    fig.suptitle(f"Predicted vs true, {t.shape[0]} events ({how})")
    return _save(fig, out_path)


def distributions(
    truth: Any,
    pred: Any,
    out_path: PathLike,
    columns: Sequence[str] = POSITION_COLUMNS,
    *,
    unit: str | None = None,
    bins: int | None = None,
) -> Path:
    """Overlaid histograms of true and predicted values, one panel per column.

    Histograms are normalised to unit area, so ``pred`` may hold a different number of
    rows than ``truth``, for example all posterior samples ``(n, B, D)`` flattened.

    Args:
        truth: True values, ``(..., D)``.
        pred: Predicted values or posterior samples, ``(..., D)``.
        out_path: PNG to write.
        columns: The ``D`` column names.
        unit: Unit for the labels; by default bohr for positions, a.u. for momenta.
        bins: Number of bins, shared by truth and prediction in each panel; by default
            about the square root of the smaller sample (10 to 60), so that a few hundred
            events give a smooth histogram rather than bin-to-bin noise.

    Example:
        >>> import tempfile
        >>> x = np.random.default_rng(0).normal(size=(200, 9))
        >>> distributions(x, x + 0.1, Path(tempfile.mkdtemp()) / "d.png").name
        'd.png'
    """
    columns = list(columns)
    d = len(columns)
    t, p = _array(truth, "truth"), _array(pred, "pred")
    for name, a in (("truth", t), ("pred", p)):
        if a.ndim < 1 or a.shape[-1] != d or a.size == 0:
            raise ValueError(
                f"{name} must have shape (..., {d}) with at least one row, one column per name "
                f"in columns={columns}; got {a.shape}"
            )
    t, p = t.reshape(-1, d), p.reshape(-1, d)
    unit = _default_unit(columns) if unit is None else unit
    if bins is None:
        bins = int(np.clip(round(math.sqrt(min(t.shape[0], p.shape[0]))), 10, 60))
    elif bins < 1:
        raise ValueError(f"bins must be at least 1; got {bins}")
    nrows, ncols = _grid(d)
    fig, axes = _figure(nrows, ncols, (3.6, 2.9))
    for j, (ax, col) in enumerate(zip(axes, columns)):
        tj, pj = t[np.isfinite(t[:, j]), j], p[np.isfinite(p[:, j]), j]
        both = np.concatenate([tj, pj])
        lo, hi = (both.min(), both.max()) if both.size else (0.0, 1.0)
        if hi <= lo:  # a constant column: give it a visible bin
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        ax.hist(tj, edges, density=True, color=_TRUE_COLOUR, alpha=0.35, label="true")
        ax.hist(
            pj, edges, density=True, histtype="step", lw=1.5, color=_PRED_COLOUR, label="predicted"
        )
        label = _column_label(col)
        _style(
            ax, _with_unit(label, unit), _with_unit("density", f"1/{unit}" if unit else ""), label
        )
    for ax in axes[d:]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle(f"Distributions: {t.shape[0]} true vs {p.shape[0]} predicted values per column")
    return _save(fig, out_path)


# --------------------------------------------------------------------------- calibration


def _calibration_arrays(name: str, levels: Any, empirical: Any) -> tuple[np.ndarray, np.ndarray]:
    lv, em = _array(levels, f"levels of {name!r}"), _array(empirical, f"empirical of {name!r}")
    if lv.ndim != 1 or lv.shape != em.shape or lv.size == 0:
        raise ValueError(
            f"calibration of {name!r}: levels and empirical must be 1-D of the same length; "
            f"got {lv.shape} and {em.shape}"
        )
    both = np.concatenate([lv, em])
    if not np.isfinite(both).all() or both.min() < 0 or both.max() > 1:
        raise ValueError(
            f"calibration of {name!r}: levels and empirical coverage must be finite fractions "
            f"in [0, 1] (0.9, not 90); got values from {np.nanmin(both):g} to {np.nanmax(both):g}"
        )
    order = np.argsort(lv)
    return lv[order], em[order]


def calibration_curves(
    curves: Mapping[str, tuple[Any, Any]], out_path: PathLike, *, title: str | None = None
) -> Path:
    """Empirical against nominal coverage of central posterior intervals, several models.

    A calibrated posterior follows the diagonal; below it intervals are too narrow
    (over-confident), above it too wide. The empirical coverage at the nominal 90 % is
    marked and given in the legend.

    Args:
        curves: Model name -> ``(levels, empirical)``, both 1-D fractions in [0, 1].
        out_path: PNG to write.
        title: Plot title; a default one explains the axes.

    Example:
        >>> import tempfile
        >>> lv = np.linspace(0.05, 0.95, 19)
        >>> calibration_curves({"a": (lv, lv**1.2), "b": (lv, lv)},
        ...                    Path(tempfile.mkdtemp()) / "c.png").name
        'c.png'
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty dict: model name -> (levels, empirical)")
    fig, (ax,) = _figure(1, 1, (5.6, 5.2))
    ax.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1, label="ideal (calibrated)")
    ax.axvline(0.9, color="0.7", ls=":", lw=1)
    for i, (name, pair) in enumerate(curves.items()):
        try:
            levels, empirical = pair
        except (TypeError, ValueError):
            raise ValueError(
                f"calibration of {name!r} must be a pair (levels, empirical)"
            ) from None
        lv, em = _calibration_arrays(str(name), levels, empirical)
        colour = f"C{i}"
        label = str(name)
        if lv[0] <= 0.9 <= lv[-1]:
            at90 = float(np.interp(0.9, lv, em))
            ax.plot([0.9], [at90], "D", color=colour, ms=7, mec="black", zorder=3)
            label += f" (90 % -> {100 * at90:.1f} %)"
        ax.plot(lv, em, "o-", ms=3, lw=1.5, color=colour, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    _style(
        ax,
        "nominal coverage of central interval",
        "empirical coverage (true value inside)",
        title or "Posterior calibration\nbelow diagonal: over-confident, above: under-confident",
    )
    ax.legend(loc="upper left", fontsize=9)
    return _save(fig, out_path)


def calibration_curve(
    levels: Any, empirical: Any, out_path: PathLike, label: str | None = None
) -> Path:
    """Calibration curve of one model; see :func:`calibration_curves`.

    Example:
        >>> import tempfile
        >>> lv = np.linspace(0.05, 0.95, 19)
        >>> calibration_curve(lv, lv**1.2, Path(tempfile.mkdtemp()) / "c.png").name
        'c.png'
    """
    return calibration_curves({label or "model": (levels, empirical)}, out_path)


# --------------------------------------------------------------------------- physics checks


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
        a = _array(v, f"energy differences {name!r}").ravel()
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
    log_x = positive.size > 1 and positive.max() / positive.min() > _DECADES
    if log_x:
        edges = np.geomspace(positive.min(), positive.max(), 61)
        for name, a in arrays.items():
            if (zeros := int((a == 0).sum())) > 0:
                notes.append(f"{name}: {zeros} exact zeros not shown")
    else:
        hi = pooled.max() if pooled.max() > 0 else 1.0
        edges = np.linspace(0.0, hi, 61)

    fig, (ax,) = _figure(1, 1, (6.4, 4.4))
    for i, (name, a) in enumerate(arrays.items()):
        colour = f"C{i}"
        ax.hist(a, edges, histtype="step", lw=1.6, color=colour, label=f"{name} ({a.size} values)")
        median = float(np.median(a))
        ax.axvline(median, color=colour, ls="--", lw=1.2, label=f"median {name}: {median:.2e}")
    if log_x:
        ax.set_xscale("log")
    _style(
        ax,
        "|KE - PE| / KE  (relative, dimensionless)",
        "count per bin",
        "Energy mismatch of predicted geometries"
        + (f"\n{'; '.join(notes)}" if notes else "\n0 for a perfect reconstruction"),
    )
    ax.legend(fontsize=9)
    return _save(fig, out_path)


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
    # The physics layer pulls in torch; import it only when this plot is asked for.
    from flowrecon.systems.cei.frames import momentum_frame, to_frame
    from flowrecon.systems.cei.physics import remove_centre_of_mass

    s, t, p = _array(samples, "samples"), _array(truth, "truth"), _array(momenta, "momenta")
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
    idx = np.asarray(events, dtype=int)

    frame = momentum_frame(p[idx])  # (k, 3, 3)
    xs = to_frame(remove_centre_of_mass(s[:, idx], masses), frame).reshape(s.shape[0], -1, 3, 3)
    xt = to_frame(remove_centre_of_mass(t[idx], masses), frame).reshape(-1, 3, 3)

    if labels is not None and len(labels) != len(events):
        raise ValueError(f"labels has {len(labels)} entries for {len(events)} events")
    names = list(labels) if labels is not None else events
    fig, axes = _figure(len(events), 4, (3.6, 3.4))
    for k, name in enumerate(names):
        row = axes[4 * k : 4 * k + 4]
        ax = row[0]
        # Bonds of the true geometry (C-O and C-S) help to read its shape at a glance.
        for other in (1, 2):
            ax.plot(xt[k, [0, other], 0], xt[k, [0, other], 1], color="0.6", lw=1.5, zorder=1)
        for a, atom in enumerate(atoms):
            colour = _ATOM_COLOURS.get(atom, f"C{a}")
            ax.scatter(xs[:, k, a, 0], xs[:, k, a, 1], s=5, alpha=0.3, color=colour, lw=0, zorder=2)
            ax.scatter(xt[k, a, 0], xt[k, a, 1], s=60, marker="x", color="black", lw=1.5, zorder=3)
            # Zoom: samples relative to the true position, in bohr.
            zoom = row[1 + a]
            d = xs[:, k, a, :2] - xt[k, a, :2]
            zoom.scatter(d[:, 0], d[:, 1], s=8, alpha=0.5, color=colour, lw=0)
            zoom.scatter(0, 0, s=80, marker="x", color="black", lw=2, zorder=3)
            # The bulk of the posterior sets the scale; a rare outlier may fall outside.
            half = max(1.3 * float(np.quantile(np.abs(d), 0.975)), 1e-6)
            zoom.set_xlim(-half, half)
            zoom.set_ylim(-half, half)
            zoom.set_aspect("equal")
            rms = float(np.sqrt(np.mean(np.sum(d * d, axis=1))))
            _style(
                zoom, "delta e1 (bohr)", "delta e2 (bohr)", f"{atom}: rms distance {rms:.2g} bohr"
            )
        # Equal scales on a square box around truth and bulk of the samples; limits set
        # here (not left to "datalim") keep the constrained layout from clipping labels.
        pts = np.concatenate(
            [xt[k, :, :2], np.quantile(xs[:, k, :, :2], [0.01, 0.99], axis=0).reshape(-1, 2)]
        )
        centre = (pts.min(0) + pts.max(0)) / 2
        half = 0.55 * float((pts.max(0) - pts.min(0)).max()) + 0.2
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] - half, centre[1] + half)
        ax.set_aspect("equal", adjustable="box")
        out_of_plane = float(np.sqrt(np.mean(xs[:, k, :, 2] ** 2)))
        _style(
            ax,
            "e1, along p_S (bohr)",
            "e2 (bohr)",
            f"event {name}: {s.shape[0]} samples\nrms out-of-plane e3 = {out_of_plane:.2g} bohr",
        )
    handles = [
        Line2D([], [], ls="", marker="o", ms=5, color=_ATOM_COLOURS.get(atom, f"C{a}"),
               label=f"{atom} samples")
        for a, atom in enumerate(atoms)
    ]  # fmt: skip
    handles.append(Line2D([], [], ls="", marker="x", ms=8, mew=2, color="black", label="true"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9)
    fig.suptitle("Posterior in the molecular plane (momentum frame, centre of mass at 0)")
    return _save(fig, out_path)


# --------------------------------------------------------------------------- model comparison


def compare_bars(table: pd.DataFrame, metrics: Sequence[str], out_path: PathLike) -> Path:
    """Bar charts of selected metrics across models, one panel per metric.

    A metric whose positive values span more than two decades gets a log axis; missing
    values (e.g. ``nll`` of the cVAE, which has no density) are written as "n/a". Coverage
    metrics show their nominal value as a dashed line.

    Args:
        table: One row per model, a ``model`` column and one column per metric (as from
            ``flowrecon compare``).
        metrics: Columns to draw.
        out_path: PNG to write.

    Example:
        >>> import tempfile, pandas as pd
        >>> t = pd.DataFrame({"model": ["cvae", "zuko-nsf"], "ade": [0.3, 0.02]})
        >>> compare_bars(t, ["ade"], Path(tempfile.mkdtemp()) / "b.png").name
        'b.png'
    """
    if not hasattr(table, "columns") or "model" not in table.columns:
        raise ValueError("table must be a pandas DataFrame with a 'model' column")
    if len(table) == 0:
        raise ValueError("table has no rows: nothing to compare")
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics must name at least one column to draw")
    missing = [m for m in metrics if m not in table.columns]
    if missing:
        available = [c for c in table.columns if c != "model"]
        raise ValueError(f"metrics {missing} are not columns of the table; it has {available}")
    models = [str(m) for m in table["model"]]
    if len(set(models)) != len(models):
        raise ValueError(f"each model must appear once in the table; got {models}")

    nrows, ncols = _grid(len(metrics))
    width = max(3.6, 0.7 * len(models) + 1.6)
    fig, axes = _figure(nrows, ncols, (width, 3.6))
    x = np.arange(len(models))
    colours = [f"C{i % 10}" for i in range(len(models))]
    # Rotate the model names only when they would not fit side by side (~0.075 in a char).
    long_names = sum(len(m) + 2 for m in models) * 0.075 > 0.85 * width
    for ax, metric in zip(axes, metrics):
        try:
            v = table[metric].to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError):
            raise ValueError(f"metric {metric!r} must hold numbers") from None
        finite = np.isfinite(v)
        log_y = _spans_decades(v[finite])
        ax.bar(x[finite], v[finite], color=[c for c, f in zip(colours, finite) if f], width=0.7)
        if log_y:
            ax.set_yscale("log")
            lo, hi = v[finite].min(), v[finite].max()
            ax.set_ylim(lo / 3, hi * 3)
        for i in np.flatnonzero(finite):
            # A white box keeps the value readable where it crosses a reference line.
            ax.annotate(
                f"{v[i]:.3g}", (x[i], v[i]), xytext=(0, 2 if v[i] >= 0 else -2),
                textcoords="offset points", ha="center", va="bottom" if v[i] >= 0 else "top",
                fontsize=8, bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 0.5},
            )  # fmt: skip
        for i in np.flatnonzero(~finite):
            # x in data, y in axes coordinates: visible whatever the scale.
            ax.text(
                x[i], 0.5, "n/a", transform=ax.get_xaxis_transform(), ha="center", va="center",
                fontsize=9, color="0.4", style="italic",
            )  # fmt: skip
        unit, description = _METRICS.get(metric, ("", metric))
        if metric in _NOMINAL:
            ax.axhline(_NOMINAL[metric], color="0.3", ls="--", lw=1, zorder=1)
            description += f"\n(dashed: nominal {_NOMINAL[metric]:g})"
        if not log_y and finite.any():
            # Room above the tallest bar for its value label.
            top = max(0.0, v[finite].max(), _NOMINAL.get(metric, 0.0))
            bottom = min(0.0, v[finite].min())
            span = (top - bottom) or 1.0
            ax.set_ylim(bottom - (0.12 * span if bottom < 0 else 0), top + 0.15 * span)
        ax.set_xlim(-0.6, len(models) - 0.4)  # keep the slot of a model without a value
        ax.set_xticks(
            x, models, rotation=30 if long_names else 0, ha="right" if long_names else "center"
        )
        _style(ax, "", _with_unit(metric, unit), description)
        ax.grid(False, axis="x")
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle(f"Model comparison ({len(models)} models)")
    return _save(fig, out_path)
