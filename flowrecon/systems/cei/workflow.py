"""CEI runs: what ``flowrecon fit`` does, as library functions a script can call too.

A run directory holds everything needed to evaluate or sample later::

    RUN_DIR/
      model.pt          the fitted ConditionalGenerator (flowrecon.load)
      config.json       the resolved configuration (model, hparams, training, data, split)
      split.npz         train / validation / test row indices into the data file
      history.csv/json  per-epoch loss components, train and validation
      learning_curve_first10.png, learning_curve_rest.png, loss_components.png
      data.parquet      the built-in data set, when no data file was given

Example:
    >>> from flowrecon.systems.cei.workflow import fit_run   # doctest: +SKIP
    >>> run = fit_run("zuko-nsf", out="runs/nsf", training={"max_minutes": 5})
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowrecon.systems.cei.constants import DEFAULT_CHARGES, MASSES

log = logging.getLogger(__name__)

#: The built-in data set ``flowrecon fit`` simulates when no ``--data`` is given:
#: OCS near equilibrium, random orientation, channel (2,2,2), 1 % detector resolution.
BUILTIN_DATASET: dict[str, Any] = {
    "n": 100_000,
    "geometry": "ocs",
    "charges": list(DEFAULT_CHARGES),
    "momentum_noise": 0.01,
    "seed": 2026,
}

#: Frame choices of the CLI: the momentum frame (default) or the user's lab frame.
FRAMES = {"momentum": "cei-momentum-frame", "lab": "none"}


@dataclass
class Run:
    """A fitted run: its directory, model, configuration and split."""

    directory: Path
    model: Any
    config: dict[str, Any]
    split: dict[str, np.ndarray] = field(default_factory=dict)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_training_data(
    data: str | Path | None,
    out: Path,
    *,
    drop_invalid: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Positions and momenta from a data file, or the built-in data set written to ``out``.

    Returns x, y and a description of the data for the run's config.
    """
    from flowrecon.systems.cei.data import load_events, save_events

    if data is None:
        from flowrecon.systems.cei.geometry import simulate_events

        spec = BUILTIN_DATASET
        log.info("simulating the built-in data set: %s", spec)
        ev = simulate_events(
            spec["n"],
            seed=spec["seed"],
            geometry=spec["geometry"],
            charges=spec["charges"],
            momentum_noise=spec["momentum_noise"],
            progress=progress,
        )
        path = out / "data.parquet"
        save_events(path, ev.positions, ev.momenta)
        info = {"path": str(path), "builtin": dict(spec), "sha256": _file_digest(path)}
        return ev.positions, ev.momenta, info
    events = load_events(data, drop_invalid=drop_invalid)
    info = {
        "path": str(Path(data).resolve()),
        "sha256": _file_digest(Path(data)),
        "rows": len(events),
        "rows_dropped": events.report.n_rows_dropped,
    }
    return events.positions, events.momenta, info


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML run configuration; see ``examples/fit.toml``.

    Sections: ``model`` (``name``), ``hparams``, ``training``, ``preprocessing``
    (``frame``, ``x_scaler``, ``y_scaler``, ``whitening``), ``physics`` (``charges``,
    ``weights``), ``data`` (``path``), and top-level ``seed`` and ``device``.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no configuration file at {path}")
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    known = {"model", "hparams", "training", "preprocessing", "physics", "data", "seed", "device"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown section(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    return config


def fit_run(
    model: str,
    out: str | Path,
    *,
    data: str | Path | None = None,
    hparams: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    frame: str = "momentum",
    x_scaler: str = "standard",
    y_scaler: str = "standard",
    charges: tuple[float, float, float] = DEFAULT_CHARGES,
    physics_weights: Mapping[str, float] | None = None,
    seed: int = 0,
    device: str = "auto",
    drop_invalid: bool = False,
    quiet: bool = False,
    progress: bool = False,
) -> Run:
    """Fit ``model`` on CEI data with the seeded 70/15/15 split and write a run directory.

    Args:
        model: A registered model or preset name (``flowrecon models``).
        out: The run directory (created; an existing model there is replaced).
        data: CSV or Parquet with the column contract; None simulates the built-in set.
        hparams: Builder hyper-parameters.
        training: Options of the training loop (epochs, batch_size, lr, patience,
            min_delta, clip_grad, l1, l2, max_minutes, ...).
        frame: ``"momentum"`` (rotate into the frame built from the momenta) or ``"lab"``.
        x_scaler, y_scaler: ``standard``, ``minmax``, ``robust`` or ``none``.
        charges: The explosion channel, for the physics loss terms.
        physics_weights: Weights of the physics terms (``energy_diff2``, ``rel_err2``).
        seed: Seed of the split, initialisation and batch order.
        device: ``auto``, ``cpu`` or ``cuda``.
        drop_invalid: Drop rows with invalid values (and report how many) instead of failing.
        quiet: No progress bar.
        progress: Show progress bars (the CLI sets it when on a terminal).

    Returns:
        The `Run` with the fitted model.
    """
    import flowrecon as fr
    from flowrecon.plots import learning_curves
    from flowrecon.systems.cei.losses import TERMS, physics_loss
    from flowrecon.training import split_indices

    if frame not in FRAMES:
        raise ValueError(f"unknown frame {frame!r}; choose one of {', '.join(FRAMES)}")
    out = Path(out)
    # Validate everything cheap before any data is simulated or read.
    generator = fr.make(
        model,
        **dict(hparams or {}),
        transform=FRAMES[frame],
        x_scaler=x_scaler,
        y_scaler=y_scaler,
        seed=seed,
        device=device,
    )
    weights = {k: float(v) for k, v in (physics_weights or {}).items() if float(v) != 0.0}
    unknown = sorted(set(weights) - set(TERMS))
    if unknown:
        raise ValueError(f"unknown physics term(s) {', '.join(unknown)}; valid: {', '.join(TERMS)}")
    out.mkdir(parents=True, exist_ok=True)

    x, y, data_info = load_training_data(data, out, drop_invalid=drop_invalid, progress=progress)
    train_idx, val_idx, test_idx = split_indices(len(x), seed=seed)
    np.savez(out / "split.npz", train=train_idx, val=val_idx, test=test_idx)

    options = dict(training or {})
    options.setdefault("quiet", quiet or not progress)
    if weights:
        options["physics_loss"] = physics_loss(charges, MASSES)
        options["physics_weights"] = weights
    generator.fit(
        x[train_idx],
        y[train_idx],
        x[val_idx],
        y[val_idx],
        checkpoint_path=out / "model.pt",
        **options,
    )

    history = generator.history_
    _write_history(history, out)
    learning_curves(history, out)
    config = {
        "model": model,
        "resolved_model": generator.model_,
        "hparams": generator.hparams_,
        "training": {k: v for k, v in options.items() if k != "physics_loss"},
        "preprocessing": {"frame": frame, "x_scaler": x_scaler, "y_scaler": y_scaler},
        "physics": {"charges": list(charges), "weights": weights},
        "data": data_info,
        "split": {
            "seed": seed,
            "train": len(train_idx),
            "val": len(val_idx),
            "test": len(test_idx),
        },
        "seed": seed,
        "device": str(generator.device_),
        "result": {
            "epochs": history.epochs,
            "best_epoch": history.best_epoch,
            "best_val_loss": history.best,
            "stopped": history.stopped,
            "message": history.message,
            "seconds": history.seconds,
            "temperature": generator.temperature_,
        },
        "flowrecon_version": fr.__version__,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    split = {"train": train_idx, "val": val_idx, "test": test_idx}
    return Run(directory=out, model=generator, config=config, split=split)


def _write_history(history: Any, out: Path) -> None:
    import pandas as pd

    (out / "history.json").write_text(json.dumps(history.to_dict(), indent=2) + "\n")
    columns: dict[str, list[float]] = {}
    for split_name, comps in (("train", history.train), ("val", history.val)):
        for name, values in comps.items():
            columns[f"{split_name}_{name}"] = list(values)
    n = max((len(v) for v in columns.values()), default=0)
    frame = pd.DataFrame({k: v + [float("nan")] * (n - len(v)) for k, v in columns.items()})
    frame.insert(0, "epoch", np.arange(1, n + 1))
    frame.to_csv(out / "history.csv", index=False)


def load_run(run_dir: str | Path, *, device: str = "auto") -> Run:
    """Open a run directory written by `fit_run`."""
    import flowrecon as fr

    run_dir = Path(run_dir)
    model_path = run_dir / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no model.pt in it")
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    split: dict[str, np.ndarray] = {}
    if (run_dir / "split.npz").is_file():
        with np.load(run_dir / "split.npz") as z:
            split = {k: z[k] for k in z.files}
    return Run(
        directory=run_dir, model=fr.load(model_path, device=device), config=config, split=split
    )


# -- evaluation ---------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Results of `evaluate_run`: metrics, where they were written, and what was evaluated."""

    metrics: dict[str, Any]
    out: Path
    events: str
    figures: dict[str, Path]
    examples: str
    table: str


def _events_to_evaluate(
    run: Run, data: str | Path | None, drop_invalid: bool
) -> tuple[np.ndarray, np.ndarray, str, Path]:
    """Test events: the run's held-out split when ``data`` is the run's own data file."""
    from flowrecon.systems.cei.data import load_events

    path = Path(data) if data is not None else Path(run.config.get("data", {}).get("path", ""))
    if data is None and not path.is_file():
        raise ValueError(f"{run.directory}: give --data; the run's data file {path} is not there")
    events = load_events(path, drop_invalid=drop_invalid)
    same_file = _file_digest(path) == run.config.get("data", {}).get("sha256")
    if same_file and "test" in run.split and events.report.n_rows_dropped == 0:
        idx = run.split["test"]
        what = f"{len(idx)} held-out test events of {path.name} (the run's own data, split seed)"
        return events.positions[idx], events.momenta[idx], what, path
    return events.positions, events.momenta, f"all {len(events)} events of {path.name}", path


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    samples: int = 100,
    out: str | Path | None = None,
    max_events: int | None = None,
    resim_max_events: int | None = 20_000,
    examples: int = 3,
    seed: int = 0,
    device: str = "auto",
    drop_invalid: bool = False,
    progress: bool = False,
    refine: bool = False,
    refine_samples: int = 8,
    weights: bool = False,
    noise: float | None = None,
    prior: str | None = None,
) -> Evaluation:
    """Evaluate a fitted run on test events: metrics.json, figures and report.md.

    Only the momenta go into the model. When ``data`` is the file the run was fitted on
    (same content), only its held-out test split is evaluated; any other file is
    evaluated whole.

    Args:
        run_dir: A run directory written by `fit_run`.
        data: CSV or Parquet with positions and momenta; default the run's own data.
        samples: Posterior draws per event.
        out: Output directory; default the run directory.
        max_events: Evaluate at most this many events (the first ones).
        resim_max_events: Re-simulate at most this many events for ``resim_residual``.
        examples: Random events printed and drawn with their posterior samples.
        seed: Seed of the posterior draws and the random example events.
        device: ``auto``, ``cpu`` or ``cuda``.
        drop_invalid: Drop invalid rows of ``data`` (reported) instead of failing.
        progress: Show a progress bar over chunks of events.
        refine: Also refine ``refine_samples`` posterior samples per event through the
            simulator (`flowrecon.systems.cei.refine`) and report the refined
            predictions' metrics beside the raw ones, under ``refined_`` keys.
        refine_samples: Samples per event that are refined.
        weights: Also weight the posterior samples by the likelihood of the observed
            momenta under the detector noise model and the prior, over the model's own
            density (importance weights, `flowrecon.systems.cei.likelihood`), and report
            the weighted posterior's coverage and effective sample size under
            ``weighted_`` keys. Needs a model with a density.
        noise: Relative momentum resolution of the data; default the run's built-in
            data set's.
        prior: ``"ocs"`` (the simulated OCS geometry distribution) or ``"flat"``;
            default ``"ocs"`` for the built-in data set, else ``"flat"``. With ``"ocs"``,
            refinement also takes, for an event with several exact solutions, the one of
            largest posterior mass (`flowrecon.systems.cei.refine.solution_log_mass`).
    """
    import time

    from flowrecon import plots
    from flowrecon.evaluation.metrics import coverage_curve
    from flowrecon.systems.cei.metrics import (
        cei_metrics,
        example_events_table,
        format_metrics_table,
    )
    from flowrecon.systems.cei.physics import energy_difference

    if samples < 2:
        raise ValueError(f"need at least 2 posterior samples per event, got {samples}")
    run = load_run(run_dir, device=device)
    builtin = run.config.get("data", {}).get("builtin")
    prior = prior or ("ocs" if builtin and builtin.get("geometry") == "ocs" else "flat")
    if weights:
        if not run.model.has_density:
            raise ValueError(
                f"weights need a model with a density; {run.config.get('model')} has none"
            )
        noise = noise if noise is not None else (builtin or {}).get("momentum_noise")
        if not noise:
            raise ValueError("weights need the data's momentum noise: give --noise SIGMA (> 0)")
    out = Path(out) if out is not None else run.directory
    out.mkdir(parents=True, exist_ok=True)
    x_true, p_obs, what, data_path = _events_to_evaluate(run, data, drop_invalid)
    if max_events is not None:
        x_true, p_obs = x_true[:max_events], p_obs[:max_events]
        what += f" (first {len(x_true)})"
    charges = tuple(run.config.get("physics", {}).get("charges", (2.0, 2.0, 2.0)))
    model = run.model
    n_events = len(x_true)
    rng = np.random.default_rng(seed)
    shown = np.sort(rng.choice(n_events, size=min(examples, n_events), replace=False))

    # One pass over chunks of events: the metrics pull draws through this function, and
    # it keeps what the figures need (means, calibration counts, the example events).
    levels = np.linspace(0.05, 0.95, 19)
    post_mean = np.empty_like(x_true)
    k_refine = min(refine_samples, samples) if refine else 0
    refine_starts = np.empty((k_refine, n_events, 9))
    weighted = {"hits50": 0.0, "hits90": 0.0, "ess": [], "mean": np.empty_like(x_true)}
    hits = np.zeros_like(levels)
    kept: dict[int, np.ndarray] = {}
    timing = {"seconds": 0.0, "draws": 0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_events, unit="event", desc="evaluate")

    def draw(start: int, stop: int) -> np.ndarray:
        t0 = time.perf_counter()
        xs = model.sample(p_obs[start:stop], n=samples, seed=seed + start)
        timing["seconds"] += time.perf_counter() - t0
        timing["draws"] += xs.shape[0] * xs.shape[1]
        post_mean[start:stop] = xs.mean(0)
        refine_starts[:, start:stop] = xs[:k_refine]
        if weights:
            _weigh_chunk(weighted, model, xs, x_true, p_obs, start, stop, noise, prior, charges)
        _, empirical = coverage_curve(xs, x_true[start:stop], levels)
        hits[:] += empirical * (stop - start)
        for i in shown[(shown >= start) & (shown < stop)]:
            kept[int(i)] = xs[:, i - start]
        if bar is not None:
            bar.update(stop - start)
        return xs

    log_prob = model.log_prob(x_true, p_obs) if model.has_density else None
    metrics = cei_metrics(
        draw,
        x_true,
        p_obs,
        charges=charges,
        log_prob=log_prob,
        resim_max_events=resim_max_events,
        seed=seed,
    )
    if bar is not None:
        bar.close()
    metrics["sampling_samples_per_s"] = timing["draws"] / max(timing["seconds"], 1e-12)
    if refine:
        metrics.update(
            _refined_metrics(refine_starts, x_true, p_obs, charges, resim_max_events, prior)
        )
    if weights:
        ess = np.concatenate(weighted["ess"])
        w_err = np.linalg.norm((weighted["mean"] - x_true).reshape(-1, 3, 3), axis=-1)
        metrics.update(
            {
                "weighted_coverage_50": weighted["hits50"] / n_events,
                "weighted_coverage_90": weighted["hits90"] / n_events,
                "weighted_ade": float(w_err.mean()),
                "weights_ess_median": float(np.median(ess)),
                "weights_ess_mean": float(ess.mean()),
                "weights_noise": float(noise),
                "weights_prior": prior,
            }
        )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    calibration = hits / max(n_events, 1)
    example_samples = np.stack([kept[int(i)] for i in shown], 1) if len(shown) else None
    ediff = energy_difference(post_mean, p_obs, charges)
    figures = {
        "real_vs_predicted": plots.real_vs_predicted(
            x_true, post_mean, out / "real_vs_predicted.png"
        ),
        "distributions": plots.distributions(x_true, post_mean, out / "distributions.png"),
        "calibration": plots.calibration_curve(
            levels, calibration, out / "calibration.png", label=run.config.get("model")
        ),
        "energy_difference": plots.energy_difference_histogram(
            ediff, out / "energy_difference.png", label=run.config.get("model")
        ),
    }
    if example_samples is not None:
        figures["posterior_in_plane"] = plots.posterior_in_plane(
            example_samples,
            x_true[shown],
            p_obs[shown],
            out / "posterior_in_plane.png",
            events=list(range(len(shown))),
            labels=[int(i) for i in shown],
        )
    np.savez(out / "calibration.npz", levels=levels, empirical=calibration)
    table = format_metrics_table(metrics)
    if refine:
        table += "\n" + _format_refined(metrics)
    if weights:
        table += (
            f"\nImportance-weighted posterior (noise {noise:g}, prior {prior}): coverage_50 "
            f"{metrics['weighted_coverage_50']:.3f}, coverage_90 "
            f"{metrics['weighted_coverage_90']:.3f}, ade {metrics['weighted_ade']:.4g} bohr, "
            f"effective sample size median {metrics['weights_ess_median']:.1f} of {samples}"
        )
    examples_text = (
        example_events_table(
            example_samples, x_true[shown], range(len(shown)), labels=[int(i) for i in shown]
        )
        if example_samples is not None
        else ""
    )
    _write_report(run, out, what, data_path, samples, metrics, table, examples_text, figures)
    return Evaluation(metrics, out, what, figures, examples_text, table)


def _weigh_chunk(acc, model, xs, x_true, p_obs, start, stop, noise, prior, charges) -> None:
    """Importance-weight one chunk of posterior samples and accumulate its summaries."""
    from flowrecon.evaluation.weights import weighted_coverage
    from flowrecon.systems.cei.likelihood import posterior_weights

    b = stop - start
    log_q = model.log_prob(xs, np.broadcast_to(p_obs[start:stop], xs.shape))
    w = posterior_weights(xs, p_obs[start:stop], log_q, noise, prior=prior, charges=charges)
    truth = x_true[start:stop]
    acc["hits50"] += weighted_coverage(xs, w.weights, truth, 0.5) * b
    acc["hits90"] += weighted_coverage(xs, w.weights, truth, 0.9) * b
    acc["ess"].append(w.ess)
    acc["mean"][start:stop] = np.einsum("kb,kbd->bd", w.weights, xs)


#: Point metrics reported for refined predictions (with a ``refined_`` prefix).
REFINED_KEYS = (
    "ade", "rmsd_com", "bond_error_co", "bond_error_cs", "angle_error_deg", "mse",
    "energy_diff", "resim_residual",
)  # fmt: skip


def _refined_metrics(
    starts: np.ndarray,
    x_true: np.ndarray,
    p_obs: np.ndarray,
    charges: tuple[float, ...],
    resim_max_events: int | None,
    prior: str | None = None,
) -> dict[str, Any]:
    """Refine posterior samples and compute the point metrics of the refined predictions."""
    from flowrecon.systems.cei.likelihood import ocs_log_prior
    from flowrecon.systems.cei.metrics import cei_metrics
    from flowrecon.systems.cei.refine import refine_posterior

    log_prior = ocs_log_prior if prior == "ocs" else None
    refined = refine_posterior(starts, p_obs, charges=charges, log_prior=log_prior)
    # One refined prediction an event: a single "sample", so only point metrics apply.
    point = cei_metrics(
        refined.best[None], x_true, p_obs, charges=charges, resim_max_events=resim_max_events
    )
    out: dict[str, Any] = {f"refined_{k}": point[k] for k in REFINED_KEYS}
    n_starts = refined.converged.size
    # Yardsticks of exact recovery: every atom within 1e-5 bohr of the truth and a
    # momentum residual <= 1e-8.
    atom_err = refined.atom_error(x_true)
    best_res = refined.best_residual
    out.update(
        {
            "refine_samples": int(starts.shape[0]),
            "refine_converged_fraction": float(refined.converged.mean()),
            "refine_events_with_solution": float((refined.n_solutions > 0).mean()),
            "refine_events_multiple_solutions": float((refined.n_solutions > 1).mean()),
            "refine_events_within_1e-5_bohr": float((atom_err <= 1e-5).mean()),
            "refine_events_residual_below_1e-8": float((best_res <= 1e-8).mean()),
            "refined_median_atom_error": float(np.median(atom_err)),
            "refine_samples_per_s": n_starts / max(refined.seconds, 1e-12),
        }
    )
    return out


def _format_refined(metrics: dict[str, Any]) -> str:
    """The refined predictions' metrics beside the raw ones, as text."""
    lines = [
        f"Refined through the simulator ({metrics['refine_samples']} samples an event, "
        f"{metrics['refine_samples_per_s']:,.0f} samples/s): "
        f"{100 * metrics['refine_converged_fraction']:.1f} % of samples converged, "
        f"{100 * metrics['refine_events_multiple_solutions']:.2f} % of events have more "
        "than one solution;",
        f"{100 * metrics['refine_events_within_1e-5_bohr']:.2f} % of events within 1e-5 bohr "
        f"of the truth, {100 * metrics['refine_events_residual_below_1e-8']:.2f} % with "
        f"momentum residual <= 1e-8 (median atom error "
        f"{metrics['refined_median_atom_error']:.2g} bohr)",
        f"  {'metric':<18}{'raw':>12}{'refined':>12}",
    ]
    for key in REFINED_KEYS:
        raw, ref = metrics.get(key), metrics.get(f"refined_{key}")
        fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
        lines.append(f"  {key:<18}{fmt(raw):>12}{fmt(ref):>12}")
    return "\n".join(lines)


def _write_report(
    run: Run,
    out: Path,
    what: str,
    data_path: Path,
    samples: int,
    metrics: dict[str, Any],
    table: str,
    examples_text: str,
    figures: dict[str, Path],
) -> None:
    import os

    def rel(path: Path) -> str:
        return os.path.relpath(path, out)

    result = run.config.get("result", {})
    lines = [
        f"# flowrecon report: {run.config.get('model', 'model')}",
        "",
        f"- run: `{run.directory}`; evaluated on {what} (`{data_path}`)",
        f"- {samples} posterior samples per event; only the momenta went into the model",
        f"- training: {result.get('epochs', '?')} epochs, stopped by "
        f"{result.get('stopped', '?')}, best validation loss "
        f"{result.get('best_val_loss', float('nan')):.4g} at epoch {result.get('best_epoch', '?')}",
        f"- sampling: {metrics.get('sampling_samples_per_s', 0):,.0f} samples/s",
        "",
        "## Metrics",
        "",
        "```",
        table,
        "```",
        "",
        "Definitions: DESIGN section 3. Positions in bohr in your own frame; `ade` uses the "
        "posterior mean, `ade_sample` single draws; coverages are the fraction of true "
        "coordinates inside the central 50 % / 90 % posterior intervals (nominal: 0.5 / 0.9).",
        "",
        "## Figures",
        "",
    ]
    captions = {
        "real_vs_predicted": "Posterior mean against truth, per coordinate",
        "distributions": "Distributions of true and predicted coordinates",
        "calibration": "Calibration: empirical against nominal coverage of central intervals",
        "energy_difference": "|KE(observed momenta) - PE(predicted positions)| / KE",
        "posterior_in_plane": "Posterior samples of random events in the molecular plane",
    }
    for name, path in figures.items():
        lines += [f"### {captions.get(name, name)}", "", f"![{name}]({rel(path)})", ""]
    for name in ("learning_curve_first10.png", "learning_curve_rest.png"):
        if (run.directory / name).is_file():
            lines += [f"![{name}]({rel(run.directory / name)})", ""]
    if examples_text:
        lines += ["## Random test events", "", "```", examples_text, "```", ""]
    (out / "report.md").write_text("\n".join(lines))


def sample_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    n: int = 100,
    seed: int = 0,
    device: str = "auto",
    drop_invalid: bool = False,
    chunk_events: int = 65536,
    refine: bool = False,
    charges: tuple[float, float, float] | None = None,
) -> int:
    """Posterior samples for every event of a momenta file, written with event and sample ids.

    The output has columns ``event``, ``sample`` and the position columns, one row per
    draw (``n`` rows an event), in the user's frame and units. With ``refine`` every
    sample is refined through the simulator first, and the columns ``residual``
    (relative momentum residual), ``converged`` and ``solution`` (which of the event's
    distinct geometries the sample reached, 0 the most common, -1 none) are added.
    ``charges`` default to the run's. Returns the rows written.
    """
    import pandas as pd

    from flowrecon.data import write_table
    from flowrecon.systems.cei.constants import POSITION_COLUMNS
    from flowrecon.systems.cei.data import load_events
    from flowrecon.systems.cei.refine import refine_posterior

    if n < 1:
        raise ValueError(f"need at least one sample per event, got {n}")
    run = load_run(run_dir, device=device)
    events = load_events(data, drop_invalid=drop_invalid, require_positions=False)
    frames = []
    for start in range(0, len(events), chunk_events):
        stop = min(start + chunk_events, len(events))
        xs = run.model.sample(events.momenta[start:stop], n=n, seed=seed + start)  # (n, b, 9)
        b = stop - start
        extra = {}
        if refine:
            ch = charges or tuple(run.config.get("physics", {}).get("charges", (2.0, 2.0, 2.0)))
            refined = refine_posterior(xs, events.momenta[start:stop], charges=ch)
            xs = refined.samples
            extra = {
                "residual": refined.residual.T.reshape(-1),
                "converged": refined.converged.T.reshape(-1),
                "solution": _solution_ids(refined).T.reshape(-1),
            }
        flat = np.transpose(xs, (1, 0, 2)).reshape(b * n, 9)  # event-major rows
        frame = pd.DataFrame(flat, columns=list(POSITION_COLUMNS))
        frame.insert(0, "sample", np.tile(np.arange(n), b))
        frame.insert(0, "event", np.repeat(np.arange(start, stop), n))
        for name, values in extra.items():
            frame[name] = values
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    write_table(table, out)
    return len(table)


def compare_runs(
    models: list[str],
    out: str | Path,
    *,
    data: str | Path | None = None,
    training: Mapping[str, Any] | None = None,
    samples: int = 100,
    seed: int = 0,
    device: str = "auto",
    frame: str = "momentum",
    quiet: bool = False,
    progress: bool = False,
) -> Any:
    """Fit every model on the same split with the same budget and evaluate all alike.

    Writes ``OUT/<model>/`` run directories (with their own reports), and
    ``comparison.csv``, ``comparison.md`` and side-by-side figures in ``OUT``. Returns
    the comparison table (a pandas DataFrame, one row a model).
    """
    import pandas as pd

    from flowrecon import plots
    from flowrecon.registry import canonical_name, resolve

    if not models:
        raise ValueError("name at least one model to compare")
    for name in models:
        resolve(name)  # every name is checked before any training starts
    # Short names stand for registered ones: `compare cinn freia-cinn` names one model twice.
    models = [canonical_name(name) for name in models]
    if len(set(models)) != len(models):
        raise ValueError(f"a model is named twice in {models}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        # Simulate the built-in set once, so every model sees the very same events.
        x, y, _ = load_training_data(None, out, progress=progress)
        data = out / "data.parquet"
    rows = []
    curves = {}
    energy = {}
    for name in models:
        run = fit_run(
            name,
            out / name,
            data=data,
            training=training,
            frame=frame,
            seed=seed,
            device=device,
            quiet=quiet,
            progress=progress,
        )
        ev = evaluate_run(run.directory, data, samples=samples, seed=seed, device=device)
        with np.load(ev.out / "calibration.npz") as z:
            curves[name] = (z["levels"], z["empirical"])
        result = run.config["result"]
        rows.append(
            {
                "model": name,
                **{k: v for k, v in ev.metrics.items()},
                "train_seconds": result["seconds"],
                "epochs": result["epochs"],
                "stopped": result["stopped"],
            }
        )
        energy[name] = ev.out / "energy_difference.png"
    table = pd.DataFrame(rows)
    table.to_csv(out / "comparison.csv", index=False)
    shown = [
        "model", "ade", "ade_sample", "rmsd_com", "bond_error_co", "bond_error_cs",
        "angle_error_deg", "energy_diff", "resim_residual", "coverage_50", "coverage_90",
        "nll", "train_seconds", "epochs", "sampling_samples_per_s",
    ]  # fmt: skip
    shown = [c for c in shown if c in table.columns]
    (out / "comparison.md").write_text(_markdown_table(table[shown]) + "\n")
    plots.calibration_curves(curves, out / "calibration.png")
    plots.compare_bars(
        table,
        [
            m
            for m in ("ade", "angle_error_deg", "coverage_90", "nll", "train_seconds")
            if m in table
        ],
        out / "comparison.png",
    )
    return table


def _markdown_table(frame: Any) -> str:
    """A DataFrame as a GitHub markdown table (4 significant digits)."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _solution_ids(refined: Any) -> np.ndarray:
    """(K, B) index of the distinct solution each refined sample reached (-1: none)."""
    from flowrecon.systems.cei.refine import distinct_solutions

    ids = np.empty(refined.converged.shape, dtype=int)
    for i in range(ids.shape[1]):
        ids[:, i] = distinct_solutions(
            refined.samples[:, i], refined.residual[:, i], refined.converged[:, i]
        ).labels
    return ids
