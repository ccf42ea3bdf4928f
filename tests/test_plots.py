"""Every figure is written as a non-empty PNG, and bad inputs get clear messages."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from flowrecon import plots
from flowrecon.systems.cei import figures
from flowrecon.systems.cei.constants import POSITION_COLUMNS
from flowrecon.systems.cei.geometry import sample_ocs
from flowrecon.systems.cei.simulator import asymptotic_momenta
from flowrecon.training import History


def _png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


@pytest.fixture(scope="module")
def events():
    x = sample_ocs(60, torch.Generator().manual_seed(0))
    p = asymptotic_momenta(x)
    rng = np.random.default_rng(0)
    samples = x.numpy() + 0.01 * rng.normal(size=(20, 60, 9))
    return x.numpy(), p.numpy(), samples


def _history(epochs: int) -> History:
    loss = list(np.linspace(3.0, 1.0, epochs))
    return History(
        train={"total": loss, "loss": loss, "nll": loss},
        val={"total": [v + 0.1 for v in loss], "loss": [v + 0.1 for v in loss]},
        best_epoch=epochs,
    )


@pytest.mark.parametrize("epochs", [5, 30])
def test_learning_curves(tmp_path, epochs):
    paths = plots.learning_curves(_history(epochs), tmp_path)
    names = {p.name for p in paths}
    assert {"learning_curve_first10.png", "learning_curve_rest.png", "loss_components.png"} <= names
    assert all(_png(p) for p in paths)


def test_learning_curves_from_dict(tmp_path):
    # The to_dict() form (as saved in history.json) works too, without validation data.
    history = _history(12).to_dict()
    history["val"] = {}
    assert all(_png(p) for p in plots.learning_curves(history, tmp_path))


def test_position_figures(tmp_path, events):
    x, p, samples = events
    pred = samples.mean(0)
    assert _png(plots.real_vs_predicted(x, pred, tmp_path / "rvp.png", POSITION_COLUMNS))
    assert _png(plots.distributions(x, pred, tmp_path / "dist.png", POSITION_COLUMNS, unit="bohr"))
    assert _png(
        figures.energy_difference_histogram(
            np.abs(np.random.default_rng(1).normal(size=60)) * 1e-3, tmp_path / "e.png"
        )
    )
    path = figures.posterior_in_plane(samples, x, p, tmp_path / "pp.png", [0, 5], labels=[10, 15])
    assert _png(path)


def test_calibration_and_comparison(tmp_path):
    levels = np.linspace(0.05, 0.95, 19)
    assert _png(plots.calibration_curve(levels, levels * 0.9, tmp_path / "c.png", label="m"))
    curves = {"a": (levels, levels), "b": (levels, np.sqrt(levels))}
    assert _png(plots.calibration_curves(curves, tmp_path / "cc.png"))
    table = pd.DataFrame({"model": ["a", "b"], "ade": [0.01, 0.001], "coverage_90": [0.9, 0.8]})
    assert _png(plots.compare_bars(table, ["ade", "coverage_90"], tmp_path / "bars.png"))


def test_bad_inputs_have_clear_messages(tmp_path, events):
    x, p, samples = events
    with pytest.raises(ValueError):
        plots.real_vs_predicted(x, x[:, :8], tmp_path / "bad.png", POSITION_COLUMNS)
    with pytest.raises(ValueError, match=r"samples must have shape \(n, B, 9\)"):
        figures.posterior_in_plane(samples[:, :10], x, p, tmp_path / "bad.png", [0])
    with pytest.raises(ValueError, match="event indices"):
        figures.posterior_in_plane(samples, x, p, tmp_path / "bad.png", [99])
    with pytest.raises(ValueError, match="labels has 1 entries for 2 events"):
        figures.posterior_in_plane(samples, x, p, tmp_path / "bad.png", [0, 1], labels=[3])


def test_more_bad_inputs(tmp_path):
    levels = np.linspace(0.05, 0.95, 19)
    with pytest.raises(ValueError, match="fractions in \\[0, 1\\]"):
        plots.calibration_curve(100 * levels, 100 * levels, tmp_path / "c.png")
    with pytest.raises(ValueError, match="same length"):
        plots.calibration_curve(levels, levels[:-1], tmp_path / "c.png")
    with pytest.raises(ValueError, match="no epochs"):
        plots.learning_curves({"train": {"loss": []}, "val": {}}, tmp_path)
    with pytest.raises(ValueError, match="'train' dict"):
        plots.learning_curves({"val": {"loss": [1.0]}}, tmp_path)
    table = pd.DataFrame({"model": ["a", "b"], "ade": [0.1, 0.2]})
    with pytest.raises(ValueError, match=r"\['nope'\] are not columns"):
        plots.compare_bars(table, ["nope"], tmp_path / "b.png")
    with pytest.raises(ValueError, match="'model' column"):
        plots.compare_bars(table.drop(columns="model"), ["ade"], tmp_path / "b.png")
    with pytest.raises(ValueError, match=">= 0"):
        figures.energy_difference_histogram(np.array([-1.0, 0.5]), tmp_path / "e.png")
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 9\)"):
        plots.distributions(
            np.zeros((5, 9)), np.zeros((5, 3)), tmp_path / "d.png", POSITION_COLUMNS
        )


def test_edge_cases_still_draw(tmp_path):
    # Torch inputs, a missing metric value, several energy sets with zeros, nested folders.
    x = torch.randn(40, 9, dtype=torch.float64)
    assert _png(plots.real_vs_predicted(x, x + 0.1, tmp_path / "a" / "b" / "rvp.png", "abcdefghi"))
    table = pd.DataFrame({"model": ["cvae", "zuko-nsf"], "nll": [np.nan, -3.0]})
    assert _png(plots.compare_bars(table, ["nll"], tmp_path / "bars.png"))
    sets = {"a": np.r_[0.0, np.geomspace(1e-6, 1e-1, 50)], "b": np.geomspace(1e-4, 1, 50)}
    assert _png(figures.energy_difference_histogram(sets, tmp_path / "e.png"))
    # A run stopped by a non-finite loss logs inf; it is drawn as a gap.
    hist = {"train": {"loss": [2.0, 1.0, float("inf")]}, "val": {}, "best_epoch": 2}
    assert all(_png(p) for p in plots.learning_curves(hist, tmp_path / "inf"))


def test_robust_limits_ignore_runaway_values() -> None:
    bulk = np.random.default_rng(0).normal(size=10_000)
    lo, hi = plots.robust_limits(np.r_[bulk, 8.6e18, -1e30, np.nan, np.inf])
    assert -5 < lo < -2 and 2 < hi < 5  # the bulk sets the axes, not the runaways
    assert plots.robust_limits(np.array([np.nan])) == (0.0, 1.0)
    lo, hi = plots.robust_limits(np.full(5, 3.0))
    assert lo < 3.0 < hi


def test_figures_with_runaway_samples_still_show_the_bulk(tmp_path) -> None:
    # A few events whose posterior mean ran away (as a model did on sparse tails) must not
    # squeeze the rest into a dot: the figure is drawn on robust axes and counts them.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 2))
    pred = x + 0.01 * rng.normal(size=x.shape)
    pred[:4] = [[8.6e18, 1e12], [np.nan, 0.0], [-1e9, 3.0], [np.inf, 1.0]]
    assert _png(plots.real_vs_predicted(x, pred, tmp_path / "rvp.png", ["a", "b"], unit="m"))
    assert _png(plots.distributions(x, pred, tmp_path / "d.png", ["a", "b"]))
    # The 4 runaways, and at most the tail of the bulk that the 0.1 % quantiles leave out.
    assert 4 <= plots._outside(pred[:, 0], *plots.robust_limits(x[:, 0])) <= 6
