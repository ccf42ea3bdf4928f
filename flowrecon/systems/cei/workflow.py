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
