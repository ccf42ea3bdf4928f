"""Writing evaluations and comparisons: metrics.json, figures, report.md, tables.

Generic: columns, units and metric meanings come from the run's `flowrecon.system.System`;
the system's evaluator adds its own figures and text. Every report ends with the
definitions of the metrics it shows, so it reads on its own.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowrecon.system import System

__all__ = [
    "examples_table",
    "markdown_table",
    "metrics_table",
    "write_comparison",
    "write_evaluation",
]

#: Generic metrics shown in comparison tables after the error summaries.
_COMPARE_TAIL = (
    "coverage_50",
    "coverage_90",
    "nll",
    "train_seconds",
    "epochs",
    "sampling_samples_per_s",
)


def _info(system: System) -> dict[str, tuple[str, str]]:
    """Metric -> (unit, meaning): the generic ones, the error summaries, the system's."""
    from flowrecon.plots import GENERIC_METRICS

    err = system.error_name
    unit = system.x_unit if system.error_unit is None else system.error_unit
    threshold = system.failure_threshold
    failure = (
        f"events with {err} > {threshold:g} {unit} or not finite".replace("  ", " ")
        if threshold is not None
        else f"events whose {err} is not finite"
    )
    info = dict(GENERIC_METRICS)
    info.update(
        {
            err: (unit, f"mean over events of the per-event {err} (posterior mean)"),
            f"{err}_median": (unit, f"median over events of {err}"),
            f"{err}_p95": (unit, f"95th percentile over events of {err}"),
            "failure_rate": ("fraction", failure),
            "n_samples": ("draws", "posterior draws per event"),
        }
    )
    info.update({k: (v.unit, v.description) for k, v in system.metric_info.items()})
    return info


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metrics_table(metrics: Mapping[str, Any], system: System) -> str:
    """An aligned plain-text table of metrics with units and meanings.

    Example:
        >>> from flowrecon.system import System
        >>> s = System("toy", "a toy", ("a",), ("b",), x_unit="m")
        >>> print(metrics_table({"n": 3, "rmse": 0.25, "failure_rate": 0.0}, s))
        metrics: 3 events
          rmse          0.25  m         mean over events of the per-event rmse (posterior mean)
          failure_rate     0  fraction  events whose rmse is not finite
    """
    info = _info(system)
    rows = [(k, _fmt(v), *info.get(k, ("", ""))) for k, v in metrics.items() if k != "n"]
    rows = [r for r in rows if not isinstance(metrics[r[0]], dict | list)]
    widths = [max((len(r[c]) for r in rows), default=0) for c in range(3)]
    lines = [f"metrics: {metrics.get('n', '?')} events"]
    lines += [
        f"  {k:<{widths[0]}}  {v:>{widths[1]}}  {u:<{widths[2]}}  {m}".rstrip()
        for k, v, u, m in rows
    ]
    return "\n".join(lines)


def examples_table(
    draws: np.ndarray, truth: np.ndarray, rows: Sequence[int], system: System
) -> str:
    """True value and posterior mean ± std of each target column, for a few events."""
    blocks = []
    for k, row in enumerate(rows):
        s, t = draws[:, k], truth[k]
        lines = [f"event {int(row)} (data row)", f"  {'column':<12}{'true':>12}  posterior"]
        for j, col in enumerate(system.x_columns):
            lines.append(f"  {col:<12}{t[j]:>12.4g}  {s[:, j].mean():.4g} ± {s[:, j].std():.2g}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _summary_line(metrics: Mapping[str, Any], system: System) -> str:
    err = system.error_name
    unit = system.x_unit if system.error_unit is None else system.error_unit
    n = metrics.get("n", 0)
    rate = metrics.get("failure_rate")
    failed = "" if rate is None else f" ({round(rate * n)} of {n} events)"
    return (
        f"- {err}: mean {_fmt(metrics.get(err))}, median {_fmt(metrics.get(f'{err}_median'))}, "
        f"95th percentile {_fmt(metrics.get(f'{err}_p95'))} {unit}; failure rate "
        f"{_fmt(rate)}{failed}. When the mean is far above the median, a few events "
        "dominate it: read the median and the failures."
    )


def _definitions(metrics: Mapping[str, Any], system: System) -> list[str]:
    info = _info(system)
    lines = ["## Definitions", "", "| key | unit | meaning |", "|---|---|---|"]
    for key in metrics:
        if key in info:
            unit, meaning = info[key]
            lines.append(f"| `{key}` | {unit} | {meaning} |")
    lines += [
        "",
        "Targets are in the user's own frame and units. Coverages are the fraction of true "
        "coordinates inside the central 50 % / 90 % posterior intervals (ideal: 0.5 / 0.9). "
        "More: docs/metrics.md in the flowrecon sources.",
        "",
    ]
    return lines


def _generic_figures(run: Any, result: Any, stage: Path) -> dict[str, tuple[Path, str]]:
    from flowrecon import plots

    system, ctx = run.system, result.context
    cols, unit = list(system.x_columns), system.x_unit
    label = str(run.config.get("model"))
    return {
        "real_vs_predicted": (
            plots.real_vs_predicted(
                ctx.x, result.post_mean, stage / "real_vs_predicted.png", cols, unit=unit
            ),
            "Posterior mean against truth, per coordinate",
        ),
        "distributions": (
            plots.distributions(
                ctx.x, result.post_mean, stage / "distributions.png", cols, unit=unit
            ),
            "Distributions of true and predicted (posterior mean) coordinates",
        ),
        "calibration": (
            plots.calibration_curve(
                result.levels, result.calibration, stage / "calibration.png", label=label
            ),
            "Calibration: empirical against nominal coverage of central intervals",
        ),
    }


def write_evaluation(run: Any, result: Any, stage: Path, what: str, samples: int) -> dict:
    """Writes metrics.json, calibration.npz, figures and report.md into ``stage``.

    Returns figure name -> path (in ``stage``).
    """
    (stage / "metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
    np.savez(stage / "calibration.npz", levels=result.levels, empirical=result.calibration)
    figures = _generic_figures(run, result, stage)
    if result.evaluator is not None:
        figures.update(result.evaluator.figures(stage, result.shown, result.example_draws))
    _write_report(run, result, stage, what, samples, figures)
    return {name: path for name, (path, _) in figures.items()}


def _write_report(run, result, stage: Path, what: str, samples: int, figures: dict) -> None:
    system, metrics = run.system, result.metrics
    res = run.config.get("result", {})
    best = res.get("best_val_loss")
    best_text = f"{best:.4g}" if isinstance(best, int | float) else "n/a"
    lines = [
        f"# flowrecon report: {run.config.get('model', 'model')} ({system.description})",
        "",
        f"- run: `{run.directory}`; evaluated on {what}",
        f"- {samples} posterior samples per event; only the conditions "
        f"({', '.join(system.y_columns[:4])}{', ...' if system.y_dim > 4 else ''}) went into "
        "the model",
        f"- training: {res.get('epochs', '?')} epochs, stopped by {res.get('stopped', '?')}, "
        f"best validation loss {best_text} at epoch {res.get('best_epoch', '?')}",
        f"- sampling: {metrics.get('sampling_samples_per_s', 0):,.0f} samples/s",
        _summary_line(metrics, system),
        "",
        "## Metrics",
        "",
        "```",
        result.table,
        "```",
        "",
        "## Figures",
        "",
    ]
    for name, (path, caption) in figures.items():
        lines += [f"### {caption}", "", f"![{name}]({os.path.relpath(path, stage)})", ""]
    for name in ("learning_curve_first10.png", "learning_curve_rest.png"):
        if (run.directory / name).is_file():
            rel = os.path.relpath(run.directory / name, stage.parent / "evaluation")
            lines += [f"![{name}]({rel})", ""]
    if result.examples_text:
        lines += ["## Random test events", "", "```", result.examples_text, "```", ""]
    lines += _definitions(metrics, system)
    (stage / "report.md").write_text("\n".join(lines))


def markdown_table(frame: Any) -> str:
    """A DataFrame as a GitHub markdown table (4 significant digits)."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_comparison(
    rows: list[dict[str, Any]],
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    stage: Path,
    system: System,
) -> Any:
    """comparison.csv, comparison.md, calibration.png and comparison.png; returns the table."""
    import pandas as pd

    from flowrecon import plots

    table = pd.DataFrame(rows)
    table.to_csv(stage / "comparison.csv", index=False)
    err = system.error_name
    shown = [
        "model",
        err,
        f"{err}_median",
        f"{err}_p95",
        "failure_rate",
        *system.summary_metrics,
        *_COMPARE_TAIL,
    ]
    shown = [c for c in dict.fromkeys(shown) if c in table.columns]
    (stage / "comparison.md").write_text(markdown_table(table[shown]) + "\n")
    plots.calibration_curves(curves, stage / "calibration.png")
    bars = [
        m
        for m in (err, f"{err}_median", "failure_rate", "coverage_90", "nll", "train_seconds")
        if m in table
    ]
    plots.compare_bars(table, bars, stage / "comparison.png", info=_info(system))
    return table
