"""Generic diagnostic plots: learning curves, predicted vs true, distributions, calibration.

Every function writes one PNG (or a few, for :func:`learning_curves`) to the path it is
given, creating parent folders, and returns the path. Figures are built with
:class:`matplotlib.figure.Figure` and the Agg renderer directly, never through
``pyplot``: no display is needed, the user's own pyplot backend and open figures are left
alone, and nothing stays registered in pyplot's figure list after a function returns.

Arrays may be numpy arrays or torch tensors. Nothing here knows a physical system: column
names and units are passed in (a `flowrecon.system.System` supplies them), and systems
draw their own figures with the public helpers `new_figure`, `style_axes`,
`save_figure` and `as_float_array`. Axes are robust to runaway values: their limits come
from central quantiles, and the title says how many points fall outside. Bad inputs
raise ``ValueError`` with a message that says what was expected.
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
from matplotlib.ticker import MaxNLocator, PercentFormatter

if TYPE_CHECKING:
    import pandas as pd

    from flowrecon.training import History

__all__ = [
    "as_float_array",
    "calibration_curve",
    "calibration_curves",
    "compare_bars",
    "distributions",
    "learning_curves",
    "new_figure",
    "real_vs_predicted",
    "robust_limits",
    "save_figure",
    "style_axes",
]

PathLike = str | os.PathLike

DPI = 120
#: Train and validation keep these colours in every learning-curve plot.
_TRAIN_COLOUR, _VAL_COLOUR = "tab:blue", "tab:orange"
#: Truth and prediction keep these colours in every comparison plot.
_TRUE_COLOUR, _PRED_COLOUR = "0.35", "tab:blue"
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
#: Units and meanings of the metrics every evaluation and comparison has.
GENERIC_METRICS: dict[str, tuple[str, str]] = {
    "n": ("events", "test events"),
    "coverage_50": ("fraction", "coverage of 50 % intervals"),
    "coverage_90": ("fraction", "coverage of 90 % intervals"),
    "nll": ("nats / event", "negative log-likelihood"),
    "failure_rate": ("fraction", "events with a failed reconstruction"),
    "train_seconds": ("s", "training time"),
    "epochs": ("epochs", "epochs trained"),
    "sampling_samples_per_s": ("samples / s", "sampling speed"),
}
#: Nominal value of the coverage metrics, drawn as a reference line.
_NOMINAL = {"coverage_50": 0.5, "coverage_90": 0.9}
#: Values spanning more than this ratio get a logarithmic axis.
DECADES = 100.0


# --------------------------------------------------------------------------- helpers


def new_figure(nrows: int, ncols: int, panel: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure with a flat list of its axes (for systems' figures too)."""
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, axes


def save_figure(fig: Figure, path: PathLike) -> Path:
    """Writes the figure as a PNG, creating folders, and frees it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    # The figure was never registered with pyplot; clearing it frees its artists now
    # rather than whenever the garbage collector runs.
    fig.clear()
    return path


def as_float_array(a: Any, name: str) -> np.ndarray:
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


def style_axes(ax: Axes, xlabel: str, ylabel: str, title: str | None = None) -> None:
    """Labels, title, a light grid and small tick labels: the look of every figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)


def _with_unit(label: str, unit: str) -> str:
    return f"{label} ({unit})" if unit else label


def _spans_decades(values: np.ndarray) -> bool:
    """True when all values are positive and range over more than two decades."""
    v = values[np.isfinite(values)]
    return v.size > 1 and bool((v > 0).all()) and v.max() / v.min() > DECADES


def _paired(
    truth: Any, pred: Any, columns: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Checks ``truth`` and ``pred`` are both ``(B, D)`` with ``D = len(columns)``."""
    columns = list(columns)
    t, p = as_float_array(truth, "truth"), as_float_array(pred, "pred")
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
            a = as_float_array(v, f"history {split}[{k!r}]")
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
    fig, (ax,) = new_figure(1, 1, (6.4, 4.4))
    _curve_panel(ax, train[key], val.get(key), 1, min(10, n_epochs), best_epoch)
    style_axes(ax, "epoch", what, f"{what.capitalize()}, epochs 1-{min(10, n_epochs)}")
    ax.legend(fontsize=9)
    paths.append(save_figure(fig, out_dir / "learning_curve_first10.png"))

    # Epoch 11 to the end.
    fig, (ax,) = new_figure(1, 1, (6.4, 4.4))
    if n_epochs >= 11:
        _curve_panel(ax, train[key], val.get(key), 11, n_epochs, best_epoch)
        style_axes(ax, "epoch", what, f"{what.capitalize()}, epochs 11-{n_epochs}")
        ax.legend(fontsize=9)
    else:
        style_axes(ax, "epoch", what, f"{what.capitalize()}, epochs 11 onwards")
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
    paths.append(save_figure(fig, out_dir / "learning_curve_rest.png"))

    # One panel per component.
    names = _ordered_components(train, val)
    nrows, ncols = _grid(len(names))
    fig, axes = new_figure(nrows, ncols, (4.2, 3.2))
    for ax, name in zip(axes, names):
        t, v = train.get(name), val.get(name)
        _curve_panel(ax, t if t is not None else np.array([]), v, 1, n_epochs, best_epoch)
        both = np.concatenate([a for a in (t, v) if a is not None])
        if _spans_decades(both):
            ax.set_yscale("log")
        style_axes(ax, "epoch", name, _COMPONENT_TITLES.get(name, name))
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    # One legend for the figure: the same three entries in every panel.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9)
    fig.suptitle(f"Loss components per epoch ({n_epochs} epochs)")
    paths.append(save_figure(fig, out_dir / "loss_components.png"))
    return paths


# --------------------------------------------------------------------------- predicted vs true


def robust_limits(values: np.ndarray, q: float = 0.001, pad: float = 0.05) -> tuple[float, float]:
    """Axis limits from the central quantiles of the finite values, padded.

    A few runaway values (a sample 1e18 away) must not squeeze every other point into one
    pixel: the limits span the ``q`` to ``1 - q`` quantiles, widened by ``pad`` of the span.

    Example:
        >>> lo, hi = robust_limits(np.r_[np.linspace(0, 1, 10_000), 1e18])
        >>> hi < 2
        True
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.quantile(v, [q, 1 - q])) if v.size > 1 else (v[0], v[0])
    if hi <= lo:
        half = max(abs(lo), 1.0) * 0.05
        return lo - half, hi + half
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def _outside(values: np.ndarray, lo: float, hi: float) -> int:
    """How many values are not finite or fall outside [lo, hi]."""
    return int((~(np.isfinite(values) & (values >= lo) & (values <= hi))).sum())


def _unit_suffix(unit: str) -> str:
    return f" {unit}" if unit else ""


def real_vs_predicted(
    truth: Any,
    pred: Any,
    out_path: PathLike,
    columns: Sequence[str],
    *,
    unit: str = "",
    max_scatter: int = 5000,
) -> Path:
    """Predicted against true value, one panel per column, with the y = x line.

    Up to ``max_scatter`` events are drawn as points; above that as a 2-D histogram with a
    logarithmic colour scale, so that dense regions do not saturate. Axis limits are
    robust (`robust_limits` of the true values); each title gives the RMSE and median
    absolute error and says how many events fall outside the axes or are not finite.

    Args:
        truth: True values, ``(B, D)``.
        pred: Predicted values (e.g. the posterior mean), ``(B, D)``.
        out_path: PNG to write.
        columns: The ``D`` column names.
        unit: Unit of the values, for the labels.
        max_scatter: Largest B drawn as a scatter plot.

    Example:
        >>> import tempfile
        >>> x = np.random.default_rng(0).normal(size=(50, 2))
        >>> real_vs_predicted(x, x + 0.1, Path(tempfile.mkdtemp()) / "rvp.png", ["a", "b"]).name
        'rvp.png'
    """
    t, p, columns = _paired(truth, pred, columns)
    nrows, ncols = _grid(len(columns))
    fig, axes = new_figure(nrows, ncols, (3.6, 3.5))
    big = t.shape[0] > max_scatter
    for j, (ax, col) in enumerate(zip(axes, columns)):
        tj, pj = t[:, j], p[:, j]
        ok = np.isfinite(tj) & np.isfinite(pj)
        err = pj[ok] - tj[ok]
        rmse = float(np.sqrt(np.mean(err**2))) if ok.any() else math.nan
        mae = float(np.median(np.abs(err))) if ok.any() else math.nan
        # Same limits on both axes, from the truth's bulk: y = x is the panel's diagonal.
        lo, hi = robust_limits(tj[ok] if ok.any() else tj)
        inside = ok & (tj >= lo) & (tj <= hi) & (pj >= lo) & (pj <= hi)
        if big:
            ax.hist2d(
                tj[inside], pj[inside], bins=80, range=[[lo, hi], [lo, hi]], norm=LogNorm(), cmin=1
            )
        else:
            ax.scatter(tj[inside], pj[inside], s=6, alpha=0.5, color=_PRED_COLOUR, lw=0)
        ax.plot([lo, hi], [lo, hi], color="tab:red", lw=1, ls="--", label="y = x")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal", adjustable="box")
        n_out = int((~inside).sum())
        outside = f"\n{n_out} of {t.shape[0]} outside the axes or not finite" if n_out else ""
        style_axes(
            ax,
            _with_unit(f"true {col}", unit),
            _with_unit(f"predicted {col}", unit),
            f"{col}: RMSE {rmse:.3g}, median |error| {mae:.2g}{_unit_suffix(unit)}{outside}",
        )
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=9)
    how = "2-D histogram, colour: events per bin (log scale)" if big else "one point per event"
    fig.suptitle(f"Predicted vs true, {t.shape[0]} events ({how})")
    return save_figure(fig, out_path)


def distributions(
    truth: Any,
    pred: Any,
    out_path: PathLike,
    columns: Sequence[str],
    *,
    unit: str = "",
    bins: int | None = None,
) -> Path:
    """Overlaid histograms of true and predicted values, one panel per column.

    Histograms are normalised to unit area, so ``pred`` may hold a different number of
    rows than ``truth``, for example all posterior samples ``(n, B, D)`` flattened. The
    range is robust (`robust_limits` of both); values outside it are counted in the title.

    Args:
        truth: True values, ``(..., D)``.
        pred: Predicted values or posterior samples, ``(..., D)``.
        out_path: PNG to write.
        columns: The ``D`` column names.
        unit: Unit of the values, for the labels.
        bins: Number of bins, shared by truth and prediction in each panel; by default
            about the square root of the smaller sample (10 to 60), so that a few hundred
            events give a smooth histogram rather than bin-to-bin noise.

    Example:
        >>> import tempfile
        >>> x = np.random.default_rng(0).normal(size=(200, 2))
        >>> distributions(x, x + 0.1, Path(tempfile.mkdtemp()) / "d.png", ["a", "b"]).name
        'd.png'
    """
    columns = list(columns)
    d = len(columns)
    t, p = as_float_array(truth, "truth"), as_float_array(pred, "pred")
    for name, a in (("truth", t), ("pred", p)):
        if a.ndim < 1 or a.shape[-1] != d or a.size == 0:
            raise ValueError(
                f"{name} must have shape (..., {d}) with at least one row, one column per name "
                f"in columns={columns}; got {a.shape}"
            )
    t, p = t.reshape(-1, d), p.reshape(-1, d)
    if bins is None:
        bins = int(np.clip(round(math.sqrt(min(t.shape[0], p.shape[0]))), 10, 60))
    elif bins < 1:
        raise ValueError(f"bins must be at least 1; got {bins}")
    nrows, ncols = _grid(d)
    fig, axes = new_figure(nrows, ncols, (3.6, 2.9))
    for j, (ax, col) in enumerate(zip(axes, columns)):
        lo, hi = robust_limits(np.concatenate([t[:, j], p[:, j]]))
        edges = np.linspace(lo, hi, bins + 1)
        tj, pj = t[:, j], p[:, j]
        ax.hist(
            tj[(tj >= lo) & (tj <= hi)],
            edges,
            density=True,
            color=_TRUE_COLOUR,
            alpha=0.35,
            label="true",
        )
        ax.hist(
            pj[(pj >= lo) & (pj <= hi)],
            edges,
            density=True,
            histtype="step",
            lw=1.5,
            color=_PRED_COLOUR,
            label="predicted",
        )
        n_out = _outside(pj, lo, hi)
        title = col + (f"\n{n_out} predicted values outside the axes" if n_out else "")
        style_axes(
            ax, _with_unit(col, unit), _with_unit("density", f"1/{unit}" if unit else ""), title
        )
    for ax in axes[d:]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle(f"Distributions: {t.shape[0]} true vs {p.shape[0]} predicted values per column")
    return save_figure(fig, out_path)


# --------------------------------------------------------------------------- calibration


def _calibration_arrays(name: str, levels: Any, empirical: Any) -> tuple[np.ndarray, np.ndarray]:
    lv, em = (
        as_float_array(levels, f"levels of {name!r}"),
        as_float_array(empirical, f"empirical of {name!r}"),
    )
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
    fig, (ax,) = new_figure(1, 1, (5.6, 5.2))
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
    style_axes(
        ax,
        "nominal coverage of central interval",
        "empirical coverage (true value inside)",
        title or "Posterior calibration\nbelow diagonal: over-confident, above: under-confident",
    )
    ax.legend(loc="upper left", fontsize=9)
    return save_figure(fig, out_path)


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


# --------------------------------------------------------------------------- model comparison


def compare_bars(
    table: pd.DataFrame,
    metrics: Sequence[str],
    out_path: PathLike,
    info: Mapping[str, tuple[str, str]] | None = None,
) -> Path:
    """Bar charts of selected metrics across models, one panel per metric.

    A metric whose positive values span more than two decades gets a log axis; missing
    values (e.g. ``nll`` of the cVAE, which has no density) are written as "n/a". Coverage
    metrics show their nominal value as a dashed line.

    Args:
        table: One row per model, a ``model`` column and one column per metric (as from
            ``flowrecon compare``).
        metrics: Columns to draw.
        out_path: PNG to write.
        info: Metric -> (unit, meaning) for the labels (`GENERIC_METRICS` are known).

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
    fig, axes = new_figure(nrows, ncols, (width, 3.6))
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
                f"{v[i]:.3g}",
                (x[i], v[i]),
                xytext=(0, 2 if v[i] >= 0 else -2),
                textcoords="offset points",
                ha="center",
                va="bottom" if v[i] >= 0 else "top",
                fontsize=8,
                bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 0.5},
            )
        for i in np.flatnonzero(~finite):
            # x in data, y in axes coordinates: visible whatever the scale.
            ax.text(
                x[i],
                0.5,
                "n/a",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="center",
                fontsize=9,
                color="0.4",
                style="italic",
            )
        unit, description = {**GENERIC_METRICS, **(info or {})}.get(metric, ("", metric))
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
        style_axes(ax, "", _with_unit(metric, unit), description)
        ax.grid(False, axis="x")
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle(f"Model comparison ({len(models)} models)")
    return save_figure(fig, out_path)
