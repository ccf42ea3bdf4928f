"""Your own system: a projectile's launch speed and angle from where and when it lands.

A physicist's simulator, wrapped as a flowrecon System in a script of their own. The
target x is the launch speed v0 (m/s) and elevation angle theta (degrees) of a projectile
without drag; the condition y is what is measured, with relative noise: the range R
(m), the flight time T (s) and the apex height H (m):

    R = v0^2 sin(2 theta) / g,    T = 2 v0 sin(theta) / g,    H = (v0 sin theta)^2 / (2 g)

Use it from the command line, naming the file (and, optionally, the factory)::

    flowrecon simulate --system examples/projectile.py --n 20000 --out launches.parquet
    flowrecon fit --system examples/projectile.py --model nsf --data launches.parquet \\
        --out runs/projectile --set noise=0.02
    flowrecon evaluate --run runs/projectile
    flowrecon compare maf nsf --system examples/projectile.py --out runs/projectile-cmp

or from Python, with the same functions the command line uses::

    from flowrecon.runs import fit_run, evaluate_run
    run = fit_run("nsf", "runs/projectile", system="examples/projectile.py")
    print(evaluate_run("runs/projectile").metrics["speed_error"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flowrecon.plots import new_figure, robust_limits, save_figure, style_axes
from flowrecon.system import EvaluationContext, MetricInfo, System

G = 9.81  # m/s^2


def launch(v0: np.ndarray, theta_deg: np.ndarray, g: float = G) -> np.ndarray:
    """Range, flight time and apex height of launches, ``(N, 3)``."""
    theta = np.radians(theta_deg)
    vy = v0 * np.sin(theta)
    return np.stack([v0**2 * np.sin(2 * theta) / g, 2 * vy / g, vy**2 / (2 * g)], axis=1)


class ProjectileEvaluator:
    """Speed and angle errors of the posterior mean, and a figure of them."""

    def __init__(self, context: EvaluationContext) -> None:
        self.context = context
        self.errors: np.ndarray | None = None

    def update(self, start: int, stop: int, samples: np.ndarray) -> None:
        pass  # everything here needs only the posterior means

    def finish(self, posterior_mean: np.ndarray) -> dict[str, Any]:
        x = self.context.x
        self.errors = np.abs(posterior_mean - x)
        return {
            "speed_error": float(np.median(self.errors[:, 0] / x[:, 0])),
            "angle_error_deg": float(np.median(self.errors[:, 1])),
        }

    def figures(self, out: Path, shown: Sequence[int], examples: np.ndarray | None) -> dict:
        assert self.errors is not None
        fig, (ax,) = new_figure(1, 1, (5.0, 4.0))
        theta = self.context.x[:, 1]
        ax.scatter(theta, self.errors[:, 1], s=4, alpha=0.5)
        ax.set_ylim(0, robust_limits(self.errors[:, 1])[1])
        style_axes(ax, "true angle (deg)", "|angle error| (deg)", "Angle error by elevation")
        path = save_figure(fig, out / "angle_error.png")
        return {"angle_error": (path, "Angle error of the posterior mean against elevation")}

    def table(self, metrics: Mapping[str, Any]) -> str:
        return (
            f"projectile: {metrics['n']} launches; median relative speed error "
            f"{metrics['speed_error']:.3g}, median angle error {metrics['angle_error_deg']:.3g} "
            f"deg; coverage_90 {metrics['coverage_90']:.3f}; failure rate "
            f"{metrics['failure_rate']:.3g}"
        )


def make_system(*, noise: float = 0.02, g: float = G) -> System:
    """Projectile launches: speed and angle from range, flight time and apex height.

    Args:
        noise: Relative measurement noise of R, T and H.
        g: Gravitational acceleration, m/s^2.
    """
    if not (noise >= 0 and g > 0):
        raise ValueError(f"need noise >= 0 and g > 0, got {noise} and {g}")

    def simulate(n: int, *, seed: int = 0, progress: bool = False, device: str = "auto"):
        rng = np.random.default_rng(seed)
        v0 = rng.uniform(10.0, 50.0, n)
        theta = rng.uniform(15.0, 75.0, n)
        y = launch(v0, theta, g) * (1 + noise * rng.normal(size=(n, 3)))
        return pd.DataFrame(
            {"v0": v0, "theta": theta, "range": y[:, 0], "time": y[:, 1], "height": y[:, 2]}
        )

    return System(
        name="projectile",
        description="projectile launches without drag",
        x_columns=("v0", "theta"),
        y_columns=("range", "time", "height"),
        x_unit="m/s, deg",
        y_unit="m, s, m",
        simulate=simulate,
        builtin={"n": 20_000, "seed": 1},
        # Speed and angle have different units: compare relative errors, per event.
        error_name="rel_error",
        error_unit="ratio",
        event_error=lambda pred, truth: np.abs(pred / truth - 1).max(axis=-1),
        failure_threshold=0.2,
        metric_info={
            "speed_error": MetricInfo("ratio", "median |v0 error| / v0"),
            "angle_error_deg": MetricInfo("deg", "median |theta error|"),
        },
        summary_metrics=("speed_error", "angle_error_deg"),
        evaluator=lambda context: ProjectileEvaluator(context),
        options={"noise": noise, "g": g},
    )
