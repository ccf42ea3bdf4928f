"""Run directories for any System: fit, evaluate, sample and compare, as library functions.

What ``flowrecon fit``, ``evaluate``, ``sample`` and ``compare`` do, a script can do with
the same functions. A run directory holds everything needed to evaluate or sample later::

    RUN_DIR/
      model.pt          the fitted ConditionalGenerator (flowrecon.load)
      config.json       the resolved configuration: system, model, hparams, training,
                        data (path and checksum), split sizes, result
      split.npz         train / validation / test row indices, and checksums of the rows
                        used for fitting, so that evaluation never reuses them
      history.csv/json  per-epoch loss components, train and validation
      learning_curve_first10.png, learning_curve_rest.png, loss_components.png
      data.parquet      the built-in data set, when no data file was given
      evaluation/       what ``flowrecon evaluate`` writes by default

Every directory appears whole or not at all (`flowrecon.rundir`): a failed or interrupted
command leaves the previous output as it was, and nothing is replaced without
``overwrite=True``.

Example:
    >>> from flowrecon.runs import fit_run, evaluate_run   # doctest: +SKIP
    >>> run = fit_run("zuko-nsf", "runs/nsf", training={"max_minutes": 5})
    >>> evaluate_run("runs/nsf").metrics["ade"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowrecon.config import read_run_config
from flowrecon.rundir import check_output_dir, check_output_file, staged_directory
from flowrecon.system import (
    DEFAULT_SYSTEM,
    EvaluationContext,
    System,
    SystemFactory,
    coerce_options,
    make_system,
)

log = logging.getLogger(__name__)

__all__ = [
    "Evaluation",
    "Run",
    "Table",
    "compare_runs",
    "evaluate_run",
    "fit_run",
    "load_run",
    "read_system_table",
    "resolve_system",
    "row_hashes",
    "sample_run",
    "simulate_data",
]

#: Events whose draws are made and summarised together in ``evaluate``; with the seed it
#: fixes the draws, so it is part of what makes an evaluation reproducible.
EVAL_CHUNK = 8192
#: Levels of the calibration curve; 0.5 and 0.9 give ``coverage_50`` and ``coverage_90``.
LEVELS = np.round(np.linspace(0.05, 0.95, 19), 10)
#: Largest seed accepted everywhere (numpy and torch both take it).
MAX_SEED = 2**63 - 1


# -- systems and data ----------------------------------------------------------------------


def _system_spec(system: str | SystemFactory) -> str | None:
    """How ``config.json`` names a system so that `load_run` can remake it, or None."""
    if isinstance(system, str):
        head = system.rpartition(":")[0] if ":" in system else system
        if head.endswith(".py"):  # a user's file: keep it findable from anywhere
            attr = system.rpartition(":")[2] if ":" in system else "make_system"
            return f"{Path(head).resolve()}:{attr}"
        return system
    import importlib.util
    import sys

    module = getattr(system, "__module__", None)
    name = getattr(system, "__qualname__", "")
    if not module or "<" in name or "." in name:
        return None
    try:
        importable = module != "__main__" and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        importable = False
    if importable:
        return f"{module}:{name}"
    # A factory from a file (a script, or one loaded by path): name the file.
    code = getattr(system, "__code__", None)
    file = getattr(code, "co_filename", None) or getattr(sys.modules.get(module), "__file__", None)
    return f"{Path(file).resolve()}:{name}" if file and Path(file).is_file() else None


def resolve_system(
    system: str | SystemFactory | System = DEFAULT_SYSTEM,
    options: Mapping[str, Any] | None = None,
) -> tuple[System, str | None]:
    """A System and the spec `load_run` remakes it from (None: pass it to `load_run`).

    Example:
        >>> resolve_system("cei", {"charges": "2,1,1"})[0].options["charges"]
        [2.0, 1.0, 1.0]
    """
    if isinstance(system, System):
        if options:
            raise ValueError("options go to a system factory, not to a made System")
        return system, None
    return make_system(system, **dict(options or {})), _system_spec(system)


@dataclass
class Table:
    """Rows of a data file (or a simulation) as one System sees them.

    Attributes:
        frame: The table after the system's ``prepare`` (extra columns kept).
        x: Targets ``(N, Dx)``, or None when the file has no target columns.
        y: Conditions ``(N, Dy)``.
        rows: 0-based data row number in the file of each row (after ``drop_invalid``,
            these are the input rows kept, not a renumbering).
        path: The file, or None for simulated data.
        n_dropped: Rows dropped as invalid.
    """

    frame: Any
    x: np.ndarray | None
    y: np.ndarray
    rows: np.ndarray
    path: Path | None = None
    n_dropped: int = 0


def _prepared(system: System, frame: Any) -> Any:
    if system.prepare is None:
        return frame
    n = len(frame)
    frame = system.prepare(frame)
    if len(frame) != n:
        raise ValueError(f"system {system.name!r}: prepare() changed the number of rows")
    return frame


def _table_from_frame(system: System, frame: Any, rows: np.ndarray, path: Path | None) -> Table:
    frame = _prepared(system, frame)
    has_x = all(c in frame.columns for c in system.x_columns)
    x = frame[list(system.x_columns)].to_numpy(np.float64) if has_x else None
    y = frame[list(system.y_columns)].to_numpy(np.float64)
    return Table(frame, x, y, rows, path)


def read_system_table(
    system: System, path: str | os.PathLike, *, require_x: bool = True, drop_invalid: bool = False
) -> Table:
    """Reads a CSV or Parquet file with the system's columns (`flowrecon.data.read_table`).

    With ``require_x=False`` (sampling) the target columns may be absent, but a file with
    only some of them is refused: half a target is more likely a broken file.
    """
    from flowrecon.data import FLOAT32_MAX, DataError, read_table

    x_cols, y_cols = list(system.x_columns), list(system.y_columns)
    hint = system.column_hint
    checks = {"drop_invalid": drop_invalid, "hint": hint, "max_abs": FLOAT32_MAX}
    if require_x:
        frame, report = read_table(path, x_cols + y_cols, **checks)
    else:
        frame, report = read_table(path, y_cols, optional=x_cols, **checks)
        present = [c for c in x_cols if c in frame.columns]
        if 0 < len(present) < len(x_cols):
            absent = ", ".join(repr(c) for c in x_cols if c not in frame.columns)
            raise DataError(
                f"{path}: has some target columns but lacks {absent}; give all "
                f"{len(x_cols)} target columns or none"
            )
    table = _table_from_frame(system, frame, report.kept_rows, Path(path))
    table.n_dropped = report.n_rows_dropped
    return table


def simulate_data(
    system: System, n: int | None = None, *, seed: int | None = None, **kwargs: Any
) -> Any:
    """A simulated table: ``n`` rows with ``seed``, or the built-in data set without them.

    The built-in data set's settings (``system.builtin``, e.g. its detector noise) apply
    to it alone: ``simulate_data(system, 100, seed=1)`` uses the system's own options.
    """
    if system.simulate is None:
        raise ValueError(f"system {system.name!r} has no simulator: give --data FILE")
    if n is None and seed is None:
        params = {**system.builtin, **kwargs}
    elif n is None or seed is None:
        raise ValueError("give both n and seed, or neither (the built-in data set)")
    else:
        params = {"n": n, "seed": seed, **kwargs}
    frame = system.simulate(**params)
    values = frame[[*system.x_columns, *system.y_columns]].to_numpy(np.float64)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        rows = ", ".join(str(int(i)) for i in np.flatnonzero(bad)[:3])
        raise ValueError(
            f"system {system.name!r}: the simulation gave non-finite values in {int(bad.sum())} "
            f"of {len(frame)} rows (first: {rows}); check the system's options"
        )
    return frame


def row_hashes(*arrays: np.ndarray) -> np.ndarray:
    """A 64-bit checksum of each row of the arrays, from the exact bits of its values.

    Identical rows (bit for bit) get identical checksums; evaluation uses them to leave
    out the rows a model was fitted on, whatever file they come from.

    Example:
        >>> a = np.array([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0]])
        >>> h = row_hashes(a)
        >>> bool(h[0] == h[1]), bool(h[0] == h[2])
        (True, False)
    """
    v = np.ascontiguousarray(np.concatenate([np.asarray(a, np.float64) for a in arrays], 1))
    bits = v.view(np.uint64)
    h = np.full(len(v), 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(bits.shape[1]):  # FNV-style mixing, vectorised over rows
            h ^= bits[:, j]
            h *= np.uint64(0x100000001B3)
            h ^= h >> np.uint64(29)
    return h


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _check_seed(seed: int, option: str = "seed") -> int:
    if (
        isinstance(seed, bool)
        or not isinstance(seed, int | np.integer)
        or not 0 <= seed <= MAX_SEED
    ):
        raise ValueError(f"{option} must be an integer from 0 to 2^63-1, got {seed!r}")
    return int(seed)


# -- run records ---------------------------------------------------------------------------


@dataclass
class Run:
    """A fitted run: its directory, model, configuration, split and System."""

    directory: Path
    model: Any
    config: dict[str, Any]
    split: dict[str, np.ndarray] = field(default_factory=dict)
    system: System | None = None
    prior: Any = None  # the learned prior (`flowrecon.density.Density`), or None

    @property
    def log_prior(self) -> Callable[[Any], np.ndarray] | None:
        """The learned log-prior over x (`flowrecon.learned_prior.log_prior`), or None."""
        if self.prior is None or self.system is None:
            return None
        from flowrecon.learned_prior import log_prior

        return log_prior(self.system, self.prior)

    @property
    def interrupted(self) -> bool:
        """Whether training was interrupted (Ctrl-C, SIGTERM) and the best model kept."""
        return self.config.get("result", {}).get("stopped") == "interrupted"


def _data_path(run_dir: Path, data_info: Mapping[str, Any]) -> Path | None:
    """The run's data file: by its path relative to the run, else its absolute path."""
    for key in ("relpath", "path"):
        value = data_info.get(key)
        if isinstance(value, str) and value:
            path = run_dir / value if key == "relpath" else Path(value)
            if path.is_file():
                return path
    return None


def load_run(
    run_dir: str | os.PathLike, *, device: str = "auto", system: System | None = None
) -> Run:
    """Opens a complete run directory written by `fit_run`.

    ``system`` is needed only for runs of a System made in a script (not from a name,
    file or module), which ``config.json`` cannot name.
    """
    import flowrecon as fr
    from flowrecon.rundir import output_kind

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if output_kind(run_dir) != "run" or not (run_dir / "model.pt").is_file():
        raise ValueError(f"{run_dir}: not a complete run (no model.pt or config.json)")
    config = read_run_config(run_dir)
    split: dict[str, np.ndarray] = {}
    if (run_dir / "split.npz").is_file():
        try:
            with np.load(run_dir / "split.npz", allow_pickle=False) as z:
                split = {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            raise ValueError(f"{run_dir / 'split.npz'}: not a readable split ({err})") from None
    model = fr.load(run_dir / "model.pt", device=device)
    resolved = config.get("resolved_model")
    if resolved and getattr(model, "model_", resolved) != resolved:
        raise ValueError(
            f"{run_dir / 'model.pt'} holds a {model.model_!r} model but {run_dir / 'config.json'} "
            f"records {resolved!r}: the run directory has been mixed; fit it again"
        )
    if system is None:
        info = config.get("system") or {"spec": DEFAULT_SYSTEM, "options": {}}
        spec = info.get("spec")
        if not spec:
            raise ValueError(
                f"{run_dir}: its system {info.get('name')!r} was made in a script; pass it "
                "to load_run(..., system=...)"
            )
        system = make_system(spec, **dict(info.get("options") or {}))
    from flowrecon.learned_prior import load_prior

    prior = load_prior(run_dir, system, device=str(model.device_))
    return Run(run_dir, model, config, split, system, prior)


# -- fit -----------------------------------------------------------------------------------


def _check_physics(system: System, weights: Mapping[str, Any] | None) -> dict[str, float]:
    checked = {}
    for term, value in (weights or {}).items():
        if term not in system.physics_terms:
            valid = ", ".join(system.physics_terms) or "(none)"
            raise ValueError(
                f"unknown physics term {term!r} of system {system.name!r}; valid: {valid}"
            )
        try:
            w = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"weight of {term} must be a number, got {value!r}") from None
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"weight of {term} must be finite and >= 0, got {value!r}")
        if w:
            checked[term] = w
    return checked


def _make_generator(model: str, system: System, hparams, preprocessing, seed: int, device: str):
    """The generator, checked before any data is read: names, types and ranges."""
    import flowrecon as fr
    from flowrecon import registry

    prep = dict(preprocessing or {})
    unknown = sorted(set(prep) - {"x_scaler", "y_scaler", "whitening"})
    if unknown:
        raise ValueError(f"unknown preprocessing option(s) {', '.join(unknown)}")
    given = system.model_hparams.get(registry.resolve(model)[0], {})
    generator = fr.make(
        model,
        **{**given, **dict(hparams or {})},
        transform=system.transform or "none",
        seed=seed,
        device=device,
        **prep,
    )
    # A trial build at the system's widths catches out-of-range values (hidden=0) now,
    # not after a simulation; the model-space widths at fit time may be smaller.
    name, resolved, _ = registry.resolve(model, generator.hparams)
    try:
        registry.build_estimator(name, system.x_dim, system.y_dim, **resolved)
    except (ValueError, TypeError) as err:
        raise ValueError(f"model {model!r}: {err}") from None
    return generator


def _training_options(training: Mapping[str, Any] | None) -> dict[str, Any]:
    from flowrecon.training import train

    return coerce_options(train, dict(training or {}), "the training loop")


def _load_fit_data(system: System, data, stage: Path, drop_invalid: bool, progress: bool):
    """The table to fit and its description for config.json (built-in data into stage)."""
    from flowrecon.data import write_table

    if data is None:
        log.info("simulating the built-in data set: %s", dict(system.builtin))
        frame = simulate_data(system, progress=progress)
        path = stage / "data.parquet"
        write_table(frame, path)
        table = _table_from_frame(system, frame, np.arange(len(frame)), path)
        info = {
            "path": "data.parquet",
            "relpath": "data.parquet",
            # The options say what was simulated; the built-in set's own values (its
            # detector noise) win over an option left unset (None).
            "builtin": {**dict(system.options), **dict(system.builtin)},
            "sha256": _file_digest(path),
            "rows": len(frame),
        }
        return table, info
    table = read_system_table(system, data, drop_invalid=drop_invalid)
    resolved = Path(data).resolve()
    info = {
        "path": str(resolved),
        "relpath": os.path.relpath(resolved, stage.resolve()),
        "sha256": _file_digest(Path(data)),
        "rows": len(table.y),
        "rows_dropped": table.n_dropped,
    }
    return table, info


def _split(system: System, table: Table, seed: int, data: Any) -> tuple[np.ndarray, ...]:
    """The system's train/validation/test split, each part big enough to use."""
    n = len(table.y)
    where = data if data is not None else "the simulated data"
    try:
        parts = system.split(table.frame, seed)
    except ValueError as err:
        raise ValueError(f"{where}: cannot split {n} rows: {err}") from None
    sizes = [len(p) for p in parts]
    if min(sizes) < 1 or sizes[0] < 2:
        raise ValueError(
            f"{where}: {n} rows are too few to split into training, validation and test rows "
            f"(got {sizes[0]}, {sizes[1]} and {sizes[2]}); give at least 20 rows"
        )
    return parts


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


def fit_run(
    model: str,
    out: str | os.PathLike,
    *,
    system: str | SystemFactory | System = DEFAULT_SYSTEM,
    system_options: Mapping[str, Any] | None = None,
    data: str | os.PathLike | None = None,
    hparams: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    physics_weights: Mapping[str, float] | None = None,
    seed: int = 0,
    device: str = "auto",
    drop_invalid: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    progress: bool = False,
    learned_prior: bool = True,
) -> Run:
    """Fits ``model`` on a system's data with the system's split and writes a run directory.

    Args:
        model: A registered model, preset or short name (``flowrecon models``).
        out: The run directory; an existing run there is replaced only with ``overwrite``.
        system: A system name (``flowrecon systems``), ``FILE.py[:factory]``,
            ``module:factory``, a factory, or a made `System`.
        system_options: Options of the system's factory (strings are typed).
        data: CSV or Parquet with the system's columns; None simulates the built-in set.
        hparams: Builder hyper-parameters.
        training: Options of the training loop (epochs, batch_size, lr, patience,
            min_delta, clip_grad, l1, l2, max_minutes, lr_schedule...).
        preprocessing: ``x_scaler``, ``y_scaler`` (standard, minmax, robust, none) and
            ``whitening`` (True, False or a relative tolerance).
        physics_weights: Weights of the system's physics loss terms.
        seed: Seed of the split, initialisation and batch order.
        device: ``auto``, ``cpu`` or ``cuda``.
        drop_invalid: Drop rows with invalid values (and report how many) instead of failing.
        overwrite: Replace an earlier run at ``out``.
        quiet: No progress bar.
        progress: Show progress bars (the CLI sets it when on a terminal).
        learned_prior: Also fit the learned prior over x (`flowrecon.learned_prior`) on
            the training split, for systems that declare prior features; saved as
            ``prior.pt``.

    Returns:
        The `Run`. Training interrupted by Ctrl-C or SIGTERM still gives a complete run,
        with the best model kept and ``run.interrupted`` True.
    """
    seed = _check_seed(seed)
    system_obj, spec = resolve_system(system, system_options)
    out = check_output_dir(out, kind="run", overwrite=overwrite, inputs=[data])
    generator = _make_generator(model, system_obj, hparams, preprocessing, seed, device)
    weights = _check_physics(system_obj, physics_weights)
    options = _training_options(training)
    options.setdefault("quiet", quiet or not progress)
    if weights:
        if system_obj.physics_loss is None:
            raise ValueError(f"system {system_obj.name!r} has no physics loss terms")
        options["physics_loss"] = system_obj.physics_loss()
        options["physics_weights"] = weights
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"{data}: no such data file")

    with staged_directory(out, kind="run") as stage:
        table, data_info = _load_fit_data(system_obj, data, stage, drop_invalid, progress)
        train_idx, val_idx, test_idx = _split(system_obj, table, seed, data)
        fit_rows = np.concatenate([train_idx, val_idx])
        np.savez(
            stage / "split.npz",
            train=train_idx,
            val=val_idx,
            test=test_idx,
            fit_hashes=np.unique(row_hashes(table.x[fit_rows], table.y[fit_rows])),
        )
        x, y = table.x, table.y
        generator.fit(
            *_training_rows(system_obj, x[train_idx], y[train_idx]),
            x[val_idx],
            y[val_idx],
            checkpoint_path=stage / "model.pt",
            **dict(system_obj.fit_options),
            **options,
        )
        config = _run_record(
            model,
            generator,
            system_obj,
            spec,
            options,
            weights,
            data_info,
            (train_idx, val_idx, test_idx),
            seed,
            preprocessing,
        )
        prior = None
        if learned_prior and system_obj.prior_features is not None:
            prior = _fit_learned_prior(
                system_obj, generator, x[train_idx], x[val_idx], options, stage
            )
            config["prior"] = prior[1] if prior else None
            prior = prior[0] if prior else None
        _write_run_files(generator, config, stage)
    split = {"train": train_idx, "val": val_idx, "test": test_idx}
    return Run(out, generator, config, split, system_obj, prior)


def _training_rows(system: System, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """The training rows, with the system's symmetric copies where it has any."""
    if system.augment is None:
        return x, y
    xa, ya = system.augment(x, y)
    if xa.shape[1:] != x.shape[1:] or ya.shape[1:] != y.shape[1:] or len(xa) != len(ya):
        raise ValueError(
            f"system {system.name!r}: augment returned x {xa.shape} and y {ya.shape} for "
            f"x {x.shape} and y {y.shape}"
        )
    return xa, ya


def _fit_learned_prior(
    system: System,
    generator: Any,
    x_train: np.ndarray,
    x_val: np.ndarray,
    options: Mapping[str, Any],
    stage: Path,
) -> tuple[Any, dict[str, Any]] | None:
    """The learned prior of a fresh run, saved into ``stage``; None when it is skipped."""
    from flowrecon.density import MIN_ROWS
    from flowrecon.learned_prior import PRIOR_FILE, PRIOR_OPTIONS, fit_prior, record

    if generator.history_.stopped == "interrupted":
        warnings.warn("training was interrupted: the run has no learned prior", stacklevel=3)
        return None
    budget = dict(PRIOR_OPTIONS)
    if options.get("max_minutes") is not None:  # a quarter of the training budget at most
        budget["max_minutes"] = min(budget["max_minutes"], 0.25 * options["max_minutes"])
    if len(x_train) < MIN_ROWS:
        warnings.warn(
            f"{len(x_train)} training rows are too few for a learned prior (at least "
            f"{MIN_ROWS}): the run has none",
            stacklevel=3,
        )
        return None
    density = fit_prior(system, x_train, x_val, device=str(generator.device_), **budget)
    if density.history_.stopped == "interrupted":
        warnings.warn("interrupted while fitting the learned prior: the run has none", stacklevel=3)
        return None
    density.save(stage / PRIOR_FILE)
    return density, record(density, budget)


def _write_run_files(generator: Any, config: dict[str, Any], stage: Path) -> None:
    from flowrecon.plots import learning_curves

    generator.save(stage / "model.pt")  # the final state: best weights and calibration
    _write_history(generator.history_, stage)
    learning_curves(generator.history_, stage)
    (stage / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")


def _run_record(
    model, generator, system, spec, options, weights, data_info, split, seed, preprocessing
) -> dict[str, Any]:
    import flowrecon as fr

    history = generator.history_
    train_idx, val_idx, test_idx = split
    return {
        "model": model,
        "resolved_model": generator.model_,
        "hparams": generator.hparams_,
        "system": {"name": system.name, "spec": spec, "options": dict(system.options)},
        "training": {k: v for k, v in options.items() if k != "physics_loss"},
        "preprocessing": {
            "transform": system.transform,
            "x_scaler": generator.x_scaler,
            "y_scaler": generator.y_scaler,
            "whitening": generator.whitening,
            **dict(preprocessing or {}),
        },
        "physics": {"weights": weights},
        "fit_options": dict(system.fit_options),
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


# -- evaluate ------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Results of `evaluate_run`: metrics, where they were written, and what was evaluated."""

    metrics: dict[str, Any]
    out: Path
    events: str
    figures: dict[str, Path]
    examples: str
    table: str


def training_rows(run: Run) -> Callable[[], tuple[np.ndarray, np.ndarray]] | None:
    """A loader of the run's training rows (x, y), or None without its data file.

    Reading is deferred to the call: most evaluations never need the training rows.
    """
    path = _data_path(run.directory, run.config["data"])
    if path is None or "train" not in run.split or run.system is None:
        return None
    system, idx = run.system, run.split["train"]
    drop = bool(run.config["data"].get("rows_dropped"))

    def load() -> tuple[np.ndarray, np.ndarray]:
        table = read_system_table(system, path, drop_invalid=drop)
        return table.x[idx], table.y[idx]

    return load


def _events_to_evaluate(run: Run, data, drop_invalid: bool) -> tuple[Table, str]:
    """The events to evaluate: never rows the model was fitted on.

    Rows of the fit (training and validation) are recognised by content (`row_hashes`),
    whatever file they are in; given the run's own data file, what remains is the
    held-out test split, in the split's order.
    """
    system = run.system
    assert system is not None
    run_data = _data_path(run.directory, run.config["data"])
    if data is None:
        if run_data is None:
            raise ValueError(
                f"{run.directory}: give --data; the run's data file "
                f"{run.config['data'].get('path') or '(unknown)'} is not there any more"
            )
        data = run_data
    table = read_system_table(system, data, drop_invalid=drop_invalid)
    name = Path(data).name
    fit_hashes = run.split.get("fit_hashes")
    own = table.n_dropped == 0 and _file_digest(Path(data)) == run.config["data"].get("sha256")
    if own and "test" in run.split:
        idx = run.split["test"]
        reused = (
            fit_hashes is not None
            and np.isin(row_hashes(table.x[idx], table.y[idx]), fit_hashes).any()
        )
        if not reused:
            what = f"{len(idx)} held-out test events of {name} (the run's own data, split seed)"
            return _subset(table, idx), what
    if fit_hashes is None:
        what = (
            f"all {len(table.y)} events of {name} (this run does not record which rows it was "
            "fitted on: if the file holds training rows, they are evaluated too)"
        )
        return table, what
    used = np.isin(row_hashes(table.x, table.y), fit_hashes)
    if used.all():
        raise ValueError(f"{data}: every row was used to fit the run: nothing held out to evaluate")
    what = f"{int((~used).sum())} events of {name}"
    if used.any():
        what += f" ({int(used.sum())} rows used to fit the model left out)"
    return _subset(table, np.flatnonzero(~used)), what


def _representable_rows(model: Any, table: Table, drop_invalid: bool, data: Any) -> Table:
    """The rows whose conditions the model can represent; the others dropped and counted
    with ``drop_invalid``, else a one-line error naming their data rows."""
    ok = np.asarray(model.representable(table.y), dtype=bool)
    if ok.all():
        return table
    bad = table.rows[~ok]
    if not drop_invalid:
        # 1-based data rows, as every message about a file's rows (flowrecon.data), and
        # the event id (0-based) that sample and evaluate outputs would give them.
        named = ", ".join(f"{int(r) + 1} (event {int(r)})" for r in bad[:3])
        more = ", ..." if len(bad) > 3 else ""
        some = (
            f"1 row (data row {named}) has"
            if len(bad) == 1
            else (f"{len(bad)} rows (data rows {named}{more}) have")
        )
        raise ValueError(
            f"{data}: {some} conditions beyond what the model can represent (over 1e6 "
            "times the training range, or overflowing); remove them or pass --drop-invalid"
        )
    if not ok.any():
        raise ValueError(f"{data}: no row has conditions the model can represent")
    log.warning(
        "dropped %d rows the model cannot represent (events %s)", len(bad), bad[:5].tolist()
    )
    kept = _subset(table, np.flatnonzero(ok))
    return dataclasses.replace(kept, n_dropped=table.n_dropped + len(bad))


def _subset(table: Table, idx: np.ndarray) -> Table:
    return Table(
        table.frame.iloc[idx].reset_index(drop=True),
        None if table.x is None else table.x[idx],
        table.y[idx],
        table.rows[idx],
        table.path,
        table.n_dropped,
    )


def evaluate_run(
    run_dir: str | os.PathLike,
    data: str | os.PathLike | None = None,
    *,
    samples: int = 100,
    out: str | os.PathLike | None = None,
    max_events: int | None = None,
    examples: int = 3,
    seed: int = 0,
    device: str = "auto",
    drop_invalid: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    options: Mapping[str, Any] | None = None,
    system: System | None = None,
) -> Evaluation:
    """Evaluates a fitted run on held-out events: metrics.json, figures and report.md.

    Only the conditions go into the model. Rows the model was fitted on are left out
    (see `_events_to_evaluate`); given the run's own data file, its test split is
    evaluated.

    Args:
        run_dir: A run directory written by `fit_run`.
        data: CSV or Parquet with the system's columns; default the run's own data.
        samples: Posterior draws per event.
        out: Output directory; default ``RUN_DIR/evaluation``. An earlier evaluation there
            is replaced only with ``overwrite``.
        max_events: Evaluate at most this many events (the first ones).
        examples: Random events printed and drawn with their posterior samples.
        seed: Seed of the posterior draws and the example events.
        device: ``auto``, ``cpu`` or ``cuda``.
        drop_invalid: Drop invalid rows of ``data`` (reported) instead of failing.
        overwrite: Replace an earlier evaluation at ``out``.
        progress: Show a progress bar over chunks of events.
        options: The system's evaluation options (``flowrecon systems`` lists them; CEI:
            ``refine``, ``refine_samples``, ``weights``, ``noise``, ``prior``).
        system: The System, for runs of a System made in a script.
    """
    from flowrecon.report import write_evaluation

    if samples < 2:
        raise ValueError(f"need at least 2 posterior samples per event, got {samples}")
    seed = _check_seed(seed)
    run = load_run(run_dir, device=device, system=system)
    assert run.system is not None
    eval_options = _hook_options(run.system.evaluator, options, "evaluation")
    out = Path(out) if out is not None else run.directory / "evaluation"
    inputs = [data, run.directory / "model.pt", run.directory / "config.json"]
    check_output_dir(out, kind="evaluation", overwrite=overwrite, inputs=inputs)
    table, what = _events_to_evaluate(run, data, drop_invalid)
    n_before = len(table.y)
    table = _representable_rows(run.model, table, drop_invalid, data or "the run's data")
    if len(table.y) < n_before:
        what += f" ({n_before - len(table.y)} rows beyond the model's range dropped)"
    if max_events is not None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        table = _subset(table, np.arange(min(max_events, len(table.y))))
        what += f" (first {len(table.y)})"
    with staged_directory(out, kind="evaluation") as stage:
        result = _evaluate(run, table, samples, seed, eval_options, examples, progress)
        figures = write_evaluation(run, result, stage, what, samples)
    final = {name: out / Path(path).name for name, path in figures.items()}
    return Evaluation(result.metrics, out, what, final, result.examples_text, result.table)


def _hook_options(hook: Any, options: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    if not options:
        return {}
    if hook is None:
        raise ValueError(f"this system has no {what} options; got {', '.join(options)}")
    return coerce_options(hook, options, f"the {what}")


@dataclass
class EvaluationResult:
    """What the evaluation loop found, before it is written."""

    metrics: dict[str, Any]
    table: str
    examples_text: str
    post_mean: np.ndarray
    levels: np.ndarray
    calibration: np.ndarray
    shown: np.ndarray
    example_draws: np.ndarray | None
    evaluator: Any
    context: EvaluationContext
    events: Any = None  # pandas DataFrame, one row an event (`_EventDiagnostics.table`)


def _evaluate(
    run: Run,
    table: Table,
    samples: int,
    seed: int,
    options: Mapping[str, Any],
    examples: int,
    progress: bool,
) -> EvaluationResult:
    """Draws the posterior chunk by chunk, feeding the generic summaries and the system."""
    system, model = run.system, run.model
    assert system is not None and table.x is not None
    x, y = table.x, table.y
    n_events = len(y)
    context = EvaluationContext(
        model, x, y, samples, seed, run.config, table.rows, table.frame, progress,
        training_rows(run), run.log_prior,
    )  # fmt: skip
    evaluator = system.evaluator(context, **options) if system.evaluator else None
    shown = np.sort(
        np.random.default_rng(seed).choice(n_events, min(examples, n_events), replace=False)
    )
    post_mean = np.empty_like(x)
    diagnostics = _EventDiagnostics(n_events)
    hits = np.zeros(LEVELS.size)
    kept: dict[int, np.ndarray] = {}
    seconds = draws = 0.0
    bar = _progress_bar(progress, n_events)
    for start in range(0, n_events, EVAL_CHUNK):
        stop = min(start + EVAL_CHUNK, n_events)
        t0 = time.perf_counter()
        drawn = model.sample(y[start:stop], n=samples, seed=seed + start, return_diagnostics=True)
        seconds += time.perf_counter() - t0
        xs = np.asarray(drawn.samples)
        diagnostics.update(start, stop, drawn)
        draws += xs.shape[0] * xs.shape[1]
        post_mean[start:stop] = xs.mean(0)
        hits += _coverage(xs, x[start:stop]) * (stop - start)
        for i in shown[(shown >= start) & (shown < stop)]:
            kept[int(i)] = xs[:, i - start]
        if evaluator is not None:
            evaluator.update(start, stop, xs)
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    calibration = hits / n_events
    err = system.event_error(post_mean, x)  # per event: summarised, and listed in events.csv
    metrics = _generic_metrics(system, model, x, y, err, calibration, samples)
    metrics.update(diagnostics.metrics(samples))
    if evaluator is not None:
        metrics.update(evaluator.finish(post_mean))
    metrics["sampling_samples_per_s"] = draws / max(seconds, 1e-12)
    metrics = _ordered(metrics, system)
    example_draws = np.stack([kept[int(i)] for i in shown], 1) if len(shown) else None
    text, examples_text = _texts(system, evaluator, metrics, example_draws, shown, context)
    events = diagnostics.table(table.rows, system.error_name, err)
    for name, values in getattr(evaluator, "event_columns", dict)().items():
        events[name] = values
    return EvaluationResult(
        metrics,
        text,
        examples_text,
        post_mean,
        LEVELS,
        calibration,
        shown,
        example_draws,
        evaluator,
        context,
        events,
    )


class _EventDiagnostics:
    """Per-event sampling diagnostics gathered chunk by chunk (`SampleDiagnostics`)."""

    def __init__(self, n_events: int) -> None:
        self.redrawn = np.zeros(n_events, dtype=np.int64)
        self.unresolved = np.zeros(n_events, dtype=np.int64)
        self.in_domain: np.ndarray | None = None

    def update(self, start: int, stop: int, drawn: Any) -> None:
        self.redrawn[start:stop] = np.asarray(drawn.redrawn)
        self.unresolved[start:stop] = np.asarray(drawn.unresolved)
        if drawn.in_domain is not None:
            if self.in_domain is None:
                self.in_domain = np.ones(len(self.redrawn), dtype=bool)
            self.in_domain[start:stop] = np.asarray(drawn.in_domain)

    def metrics(self, samples: int) -> dict[str, Any]:
        """``out_of_domain`` (None without a condition density), ``redrawn_fraction``,
        ``unresolved_events``."""
        n = max(len(self.redrawn), 1)
        return {
            "out_of_domain": None if self.in_domain is None else float(1 - self.in_domain.mean()),
            "redrawn_fraction": float(self.redrawn.sum() / (n * samples)),
            "unresolved_events": int((self.unresolved > 0).sum()),
        }

    def table(self, rows: np.ndarray, error_name: str, error: np.ndarray) -> Any:
        """One row an event: its data row, error, in-domain flag and redraw counts."""
        import pandas as pd

        frame = pd.DataFrame({"event": rows, error_name: error})
        if self.in_domain is not None:
            frame["in_domain"] = self.in_domain
        frame["redrawn"] = self.redrawn
        frame["unresolved"] = self.unresolved
        return frame


def _progress_bar(progress: bool, total: int) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="event", desc="evaluate")


def _coverage(xs: np.ndarray, truth: np.ndarray) -> np.ndarray:
    from flowrecon.evaluation.metrics import coverage_curve

    return coverage_curve(xs, truth, LEVELS)[1]


def _plain(value: Any) -> float | None:
    """A JSON-safe float: non-finite values become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def _generic_metrics(
    system: System,
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    err: np.ndarray,
    calibration: np.ndarray,
    samples: int,
) -> dict[str, Any]:
    """What every system's evaluation reports: summaries of the per-event errors ``err``,
    coverage, NLL."""
    from flowrecon.evaluation.metrics import nll, robust_summary

    name = system.error_name
    summary = robust_summary(err, system.failure_threshold)
    metrics: dict[str, Any] = {"n": len(y), "n_samples": samples}
    metrics[name] = summary["mean"]
    metrics[f"{name}_median"] = summary["median"]
    metrics[f"{name}_p95"] = summary["p95"]
    metrics["failure_rate"] = summary["failure_rate"]
    metrics["coverage_50"] = float(calibration[np.isclose(LEVELS, 0.5)][0])
    metrics["coverage_90"] = float(calibration[np.isclose(LEVELS, 0.9)][0])
    metrics["nll"] = None
    if model.has_density:
        lp = np.asarray(model.log_prob(x, y), dtype=float)
        metrics["nll"] = None if np.isnan(lp).any() else _plain(nll(lp))
    return metrics


def _ordered(metrics: dict[str, Any], system: System) -> dict[str, Any]:
    """The system's metrics in the order it declares them, then the rest."""
    first = [k for k in system.metric_info if k in metrics]
    rest = {k: v for k, v in metrics.items() if k not in first}
    return {**{k: metrics[k] for k in first}, **rest}


def _texts(system, evaluator, metrics, example_draws, shown, context) -> tuple[str, str]:
    from flowrecon.report import examples_table, metrics_table

    text = evaluator.table(metrics) if evaluator is not None else metrics_table(metrics, system)
    examples_text = ""
    if example_draws is not None:
        describe = getattr(evaluator, "examples_text", None)
        examples_text = (
            describe(example_draws, shown)
            if callable(describe)
            else examples_table(example_draws, context.x[shown], context.rows[shown], system)
        )
    return text, examples_text


# -- sample --------------------------------------------------------------------------------


def sample_run(
    run_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    n: int = 100,
    seed: int = 0,
    device: str = "auto",
    drop_invalid: bool = False,
    chunk_events: int = 65536,
    overwrite: bool = False,
    options: Mapping[str, Any] | None = None,
    system: System | None = None,
) -> int:
    """Posterior samples for every row of a file of conditions, with event and sample ids.

    The output has columns ``event`` (the row's 0-based data row number in ``data``, also
    after ``drop_invalid``), ``sample`` and the target columns, one row per draw (``n``
    rows an event), in the user's frame and units, plus any columns of the system's
    sampling options (CEI ``refine``: ``residual``, ``converged``, ``solution``), and two
    columns per event: ``in_domain`` (its conditions lie where the training ones did; absent
    for a model without a condition density) and ``unresolved`` (draws that stayed outside
    the training targets' region after redrawing; non-zero: do not trust them). It is
    written atomically; an existing file is replaced only with ``overwrite``, an input
    never. Returns the rows written.
    """
    import pandas as pd

    from flowrecon.data import TableWriter

    if n < 1:
        raise ValueError(f"need at least one sample per event, got {n}")
    seed = _check_seed(seed)
    run = load_run(run_dir, device=device, system=system)
    assert run.system is not None
    hook_options = _hook_options(run.system.sampler, options, "sampling")
    inputs = [data, *(run.directory / f for f in ("model.pt", "config.json", "split.npz"))]
    out = check_output_file(out, overwrite=overwrite, inputs=inputs)
    table = read_system_table(run.system, data, require_x=False, drop_invalid=drop_invalid)
    table = _representable_rows(run.model, table, drop_invalid, data)
    x_cols = list(run.system.x_columns)
    loader, log_prior = training_rows(run), run.log_prior
    rows = 0
    with TableWriter(out) as writer:
        for start in range(0, len(table.y), chunk_events):
            stop = min(start + chunk_events, len(table.y))
            drawn = run.model.sample(
                table.y[start:stop], n=n, seed=seed + start, return_diagnostics=True
            )
            xs = np.asarray(drawn.samples)
            extra: dict[str, np.ndarray] = {}
            if run.system.sampler is not None:
                context = EvaluationContext(
                    run.model, None, table.y[start:stop], n, seed, run.config,
                    table.rows[start:stop], training_rows=loader, log_prior=log_prior,
                )  # fmt: skip
                xs, extra = run.system.sampler(context, xs, **hook_options)
            b = stop - start
            frame = pd.DataFrame(
                np.transpose(xs, (1, 0, 2)).reshape(b * n, len(x_cols)), columns=x_cols
            )
            frame.insert(0, "sample", np.tile(np.arange(n), b))
            frame.insert(0, "event", np.repeat(table.rows[start:stop], n))
            for name, values in extra.items():
                frame[name] = np.asarray(values).T.reshape(-1)
            if drawn.in_domain is not None:
                frame["in_domain"] = np.repeat(np.asarray(drawn.in_domain), n)
            frame["unresolved"] = np.repeat(np.asarray(drawn.unresolved), n)
            writer.write(frame)
            rows += len(frame)
    return rows


# -- compare -------------------------------------------------------------------------------


def compare_runs(
    models: Sequence[str],
    out: str | os.PathLike,
    *,
    system: str | SystemFactory = DEFAULT_SYSTEM,
    system_options: Mapping[str, Any] | None = None,
    data: str | os.PathLike | None = None,
    training: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    samples: int = 100,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    quiet: bool = False,
    progress: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """Fits every model on the same split with the same budget and evaluates all alike.

    Writes ``OUT/<model>/`` run directories (with their evaluations), and
    ``comparison.csv``, ``comparison.md`` and side-by-side figures in ``OUT``, all at
    once when every model is done. Returns the comparison table (a pandas DataFrame, one
    row a model).
    """
    from flowrecon.registry import canonical_name, resolve
    from flowrecon.report import write_comparison

    if not models:
        raise ValueError("name at least one model to compare")
    for name in models:
        resolve(name)  # every name is checked before any training starts
    # Short names stand for registered ones: `compare cinn freia-cinn` names one model twice.
    models = [canonical_name(name) for name in models]
    if len(set(models)) != len(models):
        raise ValueError(f"a model is named twice in {models}")
    system_obj, _ = resolve_system(system, system_options)
    _hook_options(system_obj.evaluator, options, "evaluation")
    _training_options(training)
    out = check_output_dir(out, kind="comparison", overwrite=overwrite, inputs=[data])
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"{data}: no such data file")
    rows, curves = [], {}
    with staged_directory(out, kind="comparison") as stage:
        if data is None:
            # Simulate the built-in set once, so every model sees the very same events.
            from flowrecon.data import write_table

            data = stage / "data.parquet"
            write_table(simulate_data(system_obj, progress=progress), data)
        for name in models:
            run = fit_run(
                name,
                stage / name,
                system=system,
                system_options=system_options,
                data=data,
                training=training,
                preprocessing=preprocessing,
                seed=seed,
                device=device,
                quiet=quiet,
                progress=progress,
            )
            if run.interrupted:
                raise KeyboardInterrupt
            ev = evaluate_run(
                run.directory, data, samples=samples, seed=seed, device=device, options=options
            )
            with np.load(ev.out / "calibration.npz") as z:
                curves[name] = (z["levels"], z["empirical"])
            result = run.config["result"]
            rows.append(
                {
                    "model": name,
                    **ev.metrics,
                    "train_seconds": result["seconds"],
                    "epochs": result["epochs"],
                    "stopped": result["stopped"],
                }
            )
        table = write_comparison(rows, curves, stage, system_obj)
    return table


# -- tune ----------------------------------------------------------------------------------


def validation_error(
    spec: str, options: Mapping[str, Any], samples: int, model: Any, x: Any, y: Any
) -> float:
    """The system's mean per-event error of the posterior mean on held-out rows.

    A module-level function of plain arguments, so that tuning workers in other processes
    can call it (with `functools.partial` over ``spec``, ``options`` and ``samples``).
    """
    system = make_system(spec, **dict(options))
    y = np.asarray(y, dtype=np.float64)
    mean = np.asarray(model.sample(y, n=samples, seed=0)).mean(0)
    err = system.event_error(mean, np.asarray(x, dtype=np.float64))
    return float(np.mean(err)) if np.isfinite(err).all() else float("inf")


def tune_run(
    model: str,
    out: str | os.PathLike,
    *,
    system: str | SystemFactory = DEFAULT_SYSTEM,
    system_options: Mapping[str, Any] | None = None,
    data: str | os.PathLike | None = None,
    metric: str = "val_loss",
    seed: int = 0,
    drop_invalid: bool = False,
    progress: bool = False,
    **tune_options: Any,
) -> Any:
    """Tunes ``model`` on a system's data: `flowrecon.tune.tune` on the run split.

    The data are split as `fit_run` splits them (same system, same seed), the search runs
    on the training and validation rows, and the test rows stay untouched, so that
    ``flowrecon fit --config OUT/best.toml`` followed by ``evaluate`` scores the tuned
    configuration on events the search never saw. ``metric`` is ``val_loss`` or the
    system's error name (``ade`` for CEI): its mean on the validation rows. Re-running
    the same call resumes the study. Other options go to `flowrecon.tune.tune`.
    """
    import functools

    from flowrecon.tune import tune

    seed = _check_seed(seed)
    system_obj, spec = resolve_system(system, system_options)
    metric_fn = None
    if metric != "val_loss":
        if metric != system_obj.error_name:
            raise ValueError(
                f"unknown metric {metric!r}; choose val_loss or {system_obj.error_name!r} "
                f"(the mean per-event error of system {system_obj.name!r})"
            )
        if spec is None:
            raise ValueError("a metric of a System made in a script needs its factory by name")
        metric_fn = functools.partial(validation_error, spec, dict(system_obj.options), 20)
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"{data}: no such data file")
    if data is None:
        table = _table_from_frame(system_obj, simulate_data(system_obj, progress=progress), None,
                                  None)  # fmt: skip
    else:
        table = read_system_table(system_obj, data, drop_invalid=drop_invalid)
    train_idx, val_idx, _ = _split(system_obj, table, seed, data)
    generator = {
        "transform": system_obj.transform or "none",
        **tune_options.pop("generator_options", {}),
    }
    # TOML has no None: an option left at None is its default, which fit applies too.
    options = {k: v for k, v in system_obj.options.items() if v is not None}
    sections: dict[str, Any] = {"system": {"name": spec or system_obj.name, **options}}
    if data is not None:
        sections["data"] = {"path": str(Path(data).resolve())}
    return tune(
        model, *_training_rows(system_obj, table.x[train_idx], table.y[train_idx]),
        table.x[val_idx], table.y[val_idx],
        out=out, metric=metric, metric_fn=metric_fn, seed=seed, progress=progress,
        generator_options=generator, best_sections=sections,
        fit_options=dict(system_obj.fit_options), **tune_options,
    )  # fmt: skip
