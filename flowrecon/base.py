"""`ConditionalGenerator`: the library API shared by every model.

It checks shapes, runs the preprocessing (`flowrecon.preprocessing.Pipeline`), builds the
estimator from the registry, trains it with the one loop (`flowrecon.training.train`),
samples and evaluates densities in the user's own space, and saves and loads models as
state dicts plus plain values (never pickled modules).

Trust on every event. ``sample`` keeps draws inside the sane region of model space learned
from the training targets (`flowrecon.guard`), redrawing the rare runaway and counting
per event what it redrew; ``fit`` also fits a small density of the conditions
(`flowrecon.density.Density`), so that ``sample(..., return_diagnostics=True)``,
``condition_log_prob`` and ``in_domain`` say which events are unlike the training data.

Example:
    >>> import numpy as np, flowrecon as fr
    >>> rng = np.random.default_rng(0)
    >>> y = rng.normal(size=(200, 2)); x = y @ [[1.0, 0, 2], [0, 1, 1]] + rng.normal(size=(200, 3))
    >>> model = fr.make("zuko-maf", transforms=2, hidden=16).fit(x, y, epochs=2, quiet=True)
    >>> model.sample(y[:5], n=10).shape
    (10, 5, 3)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from flowrecon import registry
from flowrecon._io import read_state
from flowrecon.density import Density
from flowrecon.guard import Support, redraw
from flowrecon.models._estimator import Estimator, standard_normal_log_prob
from flowrecon.preprocessing import Pipeline, resolve_transform
from flowrecon.training import (
    History,
    _save_atomic,
    check_training_options,
    split_indices,
    train,
    training_options,
)

FORMAT = "flowrecon.ConditionalGenerator"
#: 2: every hyper-parameter saved (defaults included), the sane region of model space,
#: the condition density and the calibration record.
FORMAT_VERSION = 2

#: Hyper-parameters added since format 1 whose default changed the model: files of
#: format 1 are rebuilt with these values (what those files were trained with).
LEGACY_HPARAMS: dict[str, dict[str, Any]] = {
    "cvae": {"decoder": "deterministic"},
    "freia-allinone": {"bounded": False},
    "freia-cinn": {"bounded": False},
    "nflows-maf": {"bounded": False},
    "zuko-maf": {"bounded": False},
    "zuko-realnvp": {"bounded": False},
}

#: Largest magnitude a value may have: the networks compute in float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)

#: A condition (or, in ``log_prob``, a target) whose model-space value lies more than
#: this many times beyond the training data's largest magnitude (at least 1) is beyond
#: what the float32 networks represent faithfully: ``sample`` and ``log_prob`` reject it.
REPRESENTABLE = 1e6

#: Fewest rows ``fit`` accepts (training and validation together).
MIN_FIT_ROWS = 10

#: Keyword arguments of `make` that configure the generator rather than the model.
GENERATOR_OPTIONS: tuple[str, ...] = (
    "x_scaler",
    "y_scaler",
    "whitening",
    "transform",
    "device",
    "seed",
    "training",
)

#: Default bound on samples (n times condition rows) drawn, or densities evaluated, in
#: one chunk: on CUDA, and on the CPU. Autoregressive spline flows invert one dimension at
#: a time and hold several hundred bytes of intermediates per sample and pass; chunks of
#: 2^18 on the CPU drove the process's memory past 10 GB (zuko-nsf, 400,000 samples),
#: while 2^15 keeps it flat at no cost in speed.
MAX_CHUNK, CPU_MAX_CHUNK = 2**18, 2**15


def _chunk(max_chunk: int | None, device: torch.device) -> int:
    if max_chunk is None:
        return MAX_CHUNK if device.type == "cuda" else CPU_MAX_CHUNK
    if int(max_chunk) < 1:
        raise ValueError(f"max_chunk must be a positive integer, got {max_chunk}")
    return int(max_chunk)


#: Attributes that `ConditionalGenerator.fit` (or `load`) sets.
_FITTED = (
    "model_",
    "hparams_",
    "x_dim_",
    "y_dim_",
    "device_",
    "preprocessing_",
    "estimator_",
    "history_",
    "temperature_",
    "hparams_full_",
    "support_",
    "condition_scale_",
    "condition_density_",
    "calibration_",
)


class SampleDiagnostics(NamedTuple):
    """What ``sample(..., return_diagnostics=True)`` returns.

    Per-event fields have the leading shape of y (``y.shape[:-1]``) and follow the
    samples' type (numpy for numpy y, torch on y's device for torch y).

    Attributes:
        samples: ``(n, *y.shape[:-1], Dx)``, as `ConditionalGenerator.sample` returns.
        redrawn: Draws of the event that fell outside the sane region of model space
            (`flowrecon.guard.Support`) and were drawn again (int64).
        unresolved: Of those, draws still outside after the redraw rounds, replaced by
            accepted draws of the same event (or projected, when none was accepted);
            non-zero means the samples of this event are not to be trusted (int64).
        condition_log_prob: Log-density of the condition under the model's condition
            density (float64), or None for a model without one.
        in_domain: Whether the condition lies where the training conditions did (bool),
            or None for a model without a condition density.
    """

    samples: Any
    redrawn: Any
    unresolved: Any
    condition_log_prob: Any
    in_domain: Any


class NotFittedError(RuntimeError):
    """A model was used before ``fit`` (or ``flowrecon.load``)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> the current CUDA device when available, else the CPU."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Runs the block with torch's RNG seeded, restoring the caller's RNG state after."""
    if seed is None:
        yield
        return
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(int(seed))
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(int(seed))
        yield


def _as_tensor(a: Any, what: str, device: torch.device, *, finite: bool = True) -> Tensor:
    """Numeric array-like or tensor -> float64 tensor on device; rejects NaN/Inf if finite."""
    if isinstance(a, Tensor):
        if a.is_complex() or a.dtype == torch.bool:
            raise ValueError(f"{what} must be real numbers, got dtype {a.dtype}")
        t = a.to(device=device, dtype=torch.float64)
    else:
        arr = np.asarray(a)
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ValueError(f"{what} must be real numbers, got dtype {arr.dtype}")
        if not arr.flags.writeable:  # arrays from Parquet often are read-only; torch warns
            arr = arr.copy()
        t = torch.as_tensor(arr, dtype=torch.float64, device=device)
    if t.dim() == 0:
        raise ValueError(f"{what} must have at least one dimension (its columns), got a scalar")
    bad = ~torch.isfinite(t).reshape(-1, t.shape[-1]).all(-1) if t.numel() and finite else None
    if bad is not None and bad.any():
        rows = bad.nonzero().flatten()
        first = ", ".join(str(int(r)) for r in rows[:5])
        raise ValueError(f"{what} contains NaN or Inf in {len(rows)} rows (first: {first})")
    return t


def _first_rows(mask: Tensor) -> tuple[int, str]:
    rows = mask.reshape(-1).nonzero().flatten()
    return len(rows), ", ".join(str(int(r)) for r in rows[:5])


def _check_float32_range(t: Tensor, what: str) -> None:
    """Rejects rows with a value beyond the float32 range, naming them."""
    big = (t.abs() > FLOAT32_MAX).reshape(-1, t.shape[-1]).any(-1)
    if big.any():
        count, first = _first_rows(big)
        raise ValueError(
            f"{what} has values beyond the float32 range (|value| > {FLOAT32_MAX:.3g}) in "
            f"{count} rows (first: {first}); the networks compute in float32"
        )


def _check_columns(t: Tensor, what: str, expected: int, like: str) -> None:
    if t.shape[-1] != expected:
        raise ValueError(f"{what} must have {expected} columns like the {like}, got {t.shape[-1]}")


def _check_2d(t: Tensor, what: str) -> None:
    if t.dim() != 2:
        raise ValueError(
            f"{what} must be 2-D (rows, columns), got shape {tuple(t.shape)}"
            + (f"; use {what}.reshape(-1, 1) for a single column" if t.dim() == 1 else "")
        )


def _split(
    x: Any, y: Any, x_val: Any, y_val: Any, val_fraction: float, seed: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Checks the training data and returns (x_train, y_train, x_val, y_val) on device."""
    x_all, y_all = _as_tensor(x, "x", device), _as_tensor(y, "y", device)
    _check_2d(x_all, "x")
    _check_2d(y_all, "y")
    _check_rows(x_all, y_all, "x", "y")
    _check_float32_range(x_all, "x")
    _check_float32_range(y_all, "y")
    if (x_val is None) != (y_val is None):
        raise ValueError("give both x_val and y_val, or neither")
    if x_val is not None:
        x_va, y_va = _as_tensor(x_val, "x_val", device), _as_tensor(y_val, "y_val", device)
        _check_2d(x_va, "x_val")
        _check_2d(y_va, "y_val")
        _check_columns(x_va, "x_val", x_all.shape[1], "training target")
        _check_columns(y_va, "y_val", y_all.shape[1], "training condition")
        _check_rows(x_va, y_va, "x_val", "y_val")
        _check_float32_range(x_va, "x_val")
        _check_float32_range(y_va, "y_val")
        _check_enough_rows(x_all.shape[0], x_va.shape[0], "given")
        return x_all, y_all, x_va, y_va
    if not (isinstance(val_fraction, int | float) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if val_fraction == 0:
        _check_enough_rows(x_all.shape[0], 0, "none")
        return x_all, y_all, None, None
    _check_enough_rows(x_all.shape[0], 0, "split")
    parts = split_indices(x_all.shape[0], seed, (1 - val_fraction, val_fraction))
    if len(parts[0]) < 2 or len(parts[1]) < 1:
        raise ValueError(
            f"val_fraction={val_fraction} of {x_all.shape[0]} rows leaves {len(parts[0])} "
            f"training and {len(parts[1])} validation rows; need at least 2 and 1"
        )
    i_tr, i_va = (torch.as_tensor(i, device=device) for i in parts)
    return x_all[i_tr], y_all[i_tr], x_all[i_va], y_all[i_va]


def _check_enough_rows(n_train: int, n_val: int, validation: str) -> None:
    """At least `MIN_FIT_ROWS` rows in all, 2 of them for training (and 1 to validate)."""
    total = n_train + n_val
    if total < MIN_FIT_ROWS or n_train < 2 or (validation == "given" and n_val < 1):
        raise ValueError(
            f"fit needs at least {MIN_FIT_ROWS} rows (at least 2 to train on and, with "
            f"validation data, 1 to validate on); got {n_train} training and {n_val} "
            "validation rows"
            if validation == "given"
            else f"fit needs at least {MIN_FIT_ROWS} rows of x and y, got {n_train}"
        )


def _check_rows(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same number of rows, "
            f"got {a.shape[0]} and {b.shape[0]}"
        )


def _output(t: Tensor, like: Any) -> Any:
    """Numpy in -> numpy out (float64, or the input's float dtype); torch in -> torch out.

    Integer and boolean results (counts, flags) keep their dtype.
    """
    if not t.is_floating_point():
        return t.to(like.device) if isinstance(like, Tensor) else t.detach().cpu().numpy()
    if isinstance(like, Tensor):
        dtype = like.dtype if like.is_floating_point() else torch.float64
        return t.to(device=like.device, dtype=dtype)
    dtype = np.asarray(like).dtype
    return (
        t.detach().cpu().numpy().astype(dtype if np.issubdtype(dtype, np.floating) else np.float64)
    )


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is made of None, bool, int, float, str, lists, tuples and dicts."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _backend_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _encode(
    pipeline: Pipeline, x: Tensor, y: Tensor, xname: str, yname: str
) -> tuple[Tensor, Tensor]:
    """Training rows in model space, float32; rows that overflow on the way are an error."""
    xm, ym = pipeline.encode_x(x, y), pipeline.encode_y(y)
    for t, what in ((xm, xname), (ym, yname)):
        bad = ~torch.isfinite(t.float()).all(-1)
        if bad.any():
            count, first = _first_rows(bad)
            raise ValueError(
                f"{what} overflows in preprocessing (pair transform, whitening, scaling) in "
                f"{count} rows (first: {first}); check these rows for extreme values"
            )
    return xm.float(), ym.float()


#: Defaults of the condition density `fit` trains (options of `flowrecon.density.Density`
#: and of its ``fit``). Small and quick: a seeded subset of at most 50,000 rows, a few
#: epochs, and at most 2 minutes (or a quarter of the fit's own ``max_minutes``).
CONDITION_DENSITY: dict[str, Any] = {
    "transforms": 3,
    "hidden": 64,
    "hidden_layers": 2,
    "bins": 8,
    "quantile": 1e-3,
    "epochs": 30,
    "batch_size": 512,
    "lr": 2e-3,
    "patience": 3,
    "max_minutes": 2.0,
    "max_rows": 50_000,
}


def _condition_density_options(
    setting: bool | Mapping[str, Any], training: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The condition density's options from ``fit``'s argument (None: none is fitted)."""
    if setting is False or setting is None:
        return None
    given = {} if setting is True else dict(setting)
    unknown = set(given) - set(CONDITION_DENSITY)
    if unknown:
        raise ValueError(
            f"unknown condition_density option {sorted(unknown)[0]!r}; valid: "
            + ", ".join(CONDITION_DENSITY)
        )
    options = {**CONDITION_DENSITY, **given}
    if "max_minutes" not in given and training.get("max_minutes") is not None:
        options["max_minutes"] = min(options["max_minutes"], 0.25 * training["max_minutes"])
    return options


def _fit_condition_density(
    pipeline: Pipeline,
    y_tr: Tensor,
    y_va: Tensor | None,
    options: Mapping[str, Any],
    seed: int,
    device: torch.device,
) -> Density | None:
    """Fits the density of the conditions after the pair transform; None (and a warning)
    when it cannot be fitted, since the model itself is still usable."""
    made = set(inspect.signature(Density).parameters)
    density = Density(
        **{k: v for k, v in options.items() if k in made}, seed=seed, device=str(device)
    )
    features = pipeline.pair.forward_y(y_tr)
    features_val = None if y_va is None else pipeline.pair.forward_y(y_va)
    try:
        return density.fit(
            features, features_val, **{k: v for k, v in options.items() if k not in made}
        )
    except ValueError as err:
        warnings.warn(
            f"no condition density (out-of-distribution flags) for this model: {err}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


#: Fewest validation rows `fit` calibrates the temperature on, most rounds it takes, and
#: the distance from the nominal coverage at which it stops.
_MIN_CALIBRATION_ROWS, _CALIBRATION_ROUNDS, _CALIBRATION_TOL = 50, 8, 0.002

#: Range of temperatures `calibrate` may set, and how much it may let the posterior
#: mean's typical error on the calibration rows grow (a fraction of it): a temperature
#: exists to widen or narrow the posterior, not to move it.
_TEMPERATURE_RANGE, _MEAN_ERROR_GROWTH = (0.01, 100.0), 0.10

#: Seconds `fit` lets calibration take at least, and as a fraction of the training time:
#: a slow sampler (an autoregressive spline flow on five atoms draws ~1,000 samples a
#: second on one core) calibrates on fewer rows instead of taking longer than training.
_CALIBRATION_MIN_SECONDS, _CALIBRATION_TIME_FRACTION = 120.0, 0.2
#: Rounds the time budget plans for (flows need two or three) and rows of the probe draw.
_PLANNED_ROUNDS, _PROBE_ROWS = 3, 100


def _mean_error(draws: np.ndarray, truth: np.ndarray) -> float:
    """Median over rows of the distance between the posterior mean and the truth.

    The median, since a few rows with a wide or multimodal posterior have sample means
    that swing with any change of the draws and would dominate a mean over rows.
    """
    return float(np.median(np.linalg.norm(draws.mean(0) - truth, axis=-1)))


def _coverage_and_scale(draws: np.ndarray, truth: np.ndarray, level: float) -> tuple[float, float]:
    """Coverage of central ``level`` intervals, and the spread factor that makes it exact.

    ``draws`` ``(n, B, D)``, ``truth`` ``(B, D)``. Scaling every event's samples about
    their mean by s scales its interval ends about the mean by s, so each coordinate is
    covered exactly when s is at least (t - mean) / (end - mean) for the end on the truth's
    side: the ``level`` quantile of those ratios is the factor. Coordinates without spread
    are left out.
    """
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0, method="weibull")
    mean = draws.mean(0)
    ok = (hi - lo) > 1e-12 * (np.abs(mean) + 1)
    if not ok.any():
        return float("nan"), float("nan")
    t, m, lo, hi = truth[ok], mean[ok], lo[ok], hi[ok]
    coverage = float(((lo <= t) & (t <= hi)).mean())
    end = np.where(t >= m, hi, lo)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(end != m, (t - m) / (end - m), np.inf)
    ratio = np.where(ratio < 0, np.inf, ratio)  # an end on the wrong side of the mean
    return coverage, float(np.quantile(ratio, level))


class ConditionalGenerator:
    """A conditional generative model p(x | y) with sampling and, for flows, densities.

    ``__init__`` only stores its arguments; ``fit`` builds the preprocessing and the
    estimator from the data. Attributes learned in ``fit`` end with ``_``. Use
    `flowrecon.make` to build one with validated hyper-parameters.

    Args:
        name: A registered model (``flowrecon.available_models()``) or preset name.
        hparams: Builder hyper-parameters overriding the defaults (and the preset's).
        x_scaler: ``"standard"``, ``"minmax"``, ``"robust"`` or ``"none"`` for x.
        y_scaler: The same for y.
        whitening: Drop null directions of x and whiten it (`Whitening`); a float sets
            its relative tolerance; False turns it off.
        transform: Pair transform applied first: ``"none"``/``"lab"`` (the user's own
            frame, the default) or a registered name such as ``"cei-momentum-frame"``
            (a `flowrecon.system.System` names its own as ``system.transform``).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        seed: Seed of initialisation, the internal validation split and batch order.
        training: Default keyword arguments of `fit` (e.g. ``{"epochs": 50}``).
    """

    def __init__(
        self,
        name: str,
        hparams: Mapping[str, Any] | None = None,
        *,
        x_scaler: str = "standard",
        y_scaler: str = "standard",
        whitening: bool | float = True,
        transform: str = "none",
        device: str = "auto",
        seed: int = 0,
        training: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.hparams = dict(hparams or {})
        self.x_scaler = x_scaler
        self.y_scaler = y_scaler
        self.whitening = whitening
        self.transform = transform
        self.device = device
        self.seed = seed
        self.training = dict(training or {})

    def __repr__(self) -> str:
        fitted = "fitted" if self.is_fitted else "not fitted"
        return f"ConditionalGenerator({self.name!r}, hparams={self.hparams}, {fitted})"

    # -- state -------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "estimator_")

    def _check_fitted(self, action: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"this {self.name!r} model is not fitted yet: call fit(x, y) or "
                f"flowrecon.load(path) before {action}"
            )

    @property
    def has_density(self) -> bool:
        """Whether ``log_prob`` is available (known from the registry before fitting)."""
        if self.is_fitted:
            return bool(self.estimator_.has_density)
        return registry.get_spec(registry.resolve(self.name, self.hparams)[0]).has_density

    # -- fit ---------------------------------------------------------------------------

    def fit(
        self,
        x: Any,
        y: Any,
        x_val: Any = None,
        y_val: Any = None,
        *,
        val_fraction: float = 0.15,
        calibrate: bool = True,
        condition_density: bool | Mapping[str, Any] = True,
        support: bool = True,
        **train_kwargs: Any,
    ) -> ConditionalGenerator:
        """Builds preprocessing and estimator from the data and trains; returns self.

        Args:
            x: Targets ``(N, Dx)``, numpy or torch; at least `MIN_FIT_ROWS` rows, finite
                and within the float32 range.
            y: Conditions ``(N, Dy)``.
            x_val, y_val: Validation data; when absent a seeded ``val_fraction`` of the
                rows is held out (``val_fraction=0`` trains on all rows and monitors the
                training loss).
            val_fraction: Fraction held out when no validation data are given.
            calibrate: After training, set the sampling temperature so that 90 % central
                intervals cover 90 % of the validation data (`calibrate`); skipped
                without validation data.
            condition_density: Also fit a small density of the conditions
                (`flowrecon.density.Density`, after the pair transform) that flags events
                unlike the training data (`in_domain`). A mapping sets its options:
                those of ``Density`` (transforms, hidden, hidden_layers, bins, quantile)
                and of ``Density.fit`` (epochs, batch_size, lr, patience, max_minutes,
                max_rows); see `CONDITION_DENSITY` for the defaults. False skips it.
            support: Learn the sane region of model space from the training targets
                (`flowrecon.guard`), outside which `sample` draws again. False redraws
                only non-finite draws: for targets whose pair transform already bounds
                them in the user's space, where a far draw in model space is a valid
                extreme (a particle against a wall), not a numerical runaway.
            **train_kwargs: Options of `flowrecon.training.train` (epochs, batch_size,
                lr, patience, min_delta, clip_grad, l1, l2, physics_loss,
                physics_weights, max_minutes, checkpoint_path, quiet, ...), overriding
                the preset's and ``training``; their ranges are checked before any work
                (`flowrecon.training.check_training_options`). ``checkpoint_path`` saves
                the whole generator (loadable with `flowrecon.load`) at every improvement.
        """
        model, hparams, preset_training = registry.resolve(self.name, self.hparams)
        options = {**preset_training, **self.training, **train_kwargs}
        valid = training_options()
        for key in options:
            if key not in valid:
                raise ValueError(
                    f"unknown training option {key!r}.{registry.did_you_mean(key, list(valid))} "
                    f"Valid: {', '.join(valid)}"
                )
        check_training_options(options)
        density_options = _condition_density_options(condition_density, options)
        device = resolve_device(self.device)
        x_tr, y_tr, x_va, y_va = _split(x, y, x_val, y_val, val_fraction, self.seed, device)

        pipeline = Pipeline(self.x_scaler, self.y_scaler, self.whitening, self.transform)
        pipeline.fit(x_tr, y_tr)
        xm, ym = _encode(pipeline, x_tr, y_tr, "x", "y")
        xm_va = ym_va = None
        if x_va is not None and y_va is not None:
            xm_va, ym_va = _encode(pipeline, x_va, y_va, "x_val", "y_val")

        if options.get("physics_loss") is not None:
            users = {"train": (x_tr, y_tr), "val": (x_va, y_va)}

            def user_view(xs: Tensor, idx: Tensor, split: str) -> tuple[Tensor, Tensor, Tensor]:
                xu, yu = users[split]
                yb = yu[idx]
                return pipeline.decode_x(xs.to(torch.float64), yb), xu[idx], yb

            options["user_view"] = user_view
        checkpoint = options.pop("checkpoint_path", None)

        with seeded(self.seed, device):
            try:
                estimator = registry.build_estimator(model, xm.shape[1], ym.shape[1], **hparams)
            except ValueError as err:
                w = pipeline.whitening
                dropped = f", whitening dropped {w.n_dropped} null directions" if w else ""
                raise ValueError(
                    f"{err} (in model space x has {xm.shape[1]} columns{dropped}; "
                    f"y has {ym.shape[1]})"
                ) from None
            estimator = estimator.to(device)
            # Set the fitted attributes now, so that a checkpoint is a loadable model.
            self.model_, self.hparams_ = model, hparams
            self.hparams_full_ = {**registry.hparam_defaults(model), **hparams}
            self.x_dim_, self.y_dim_ = x_tr.shape[1], y_tr.shape[1]
            self.device_, self.preprocessing_, self.estimator_ = device, pipeline, estimator
            self.history_ = History()
            self.temperature_ = 1.0
            self.support_ = Support.fit(xm) if support else None
            self.condition_scale_ = ym.abs().amax(0).double().clamp_min(1.0)
            self.condition_density_ = None
            self.calibration_ = None
            if checkpoint is not None:
                options["on_checkpoint"] = lambda epoch: self.save(checkpoint)
            try:
                self.history_ = train(estimator, xm, ym, xm_va, ym_va, seed=self.seed, **options)
            except BaseException:
                for attr in _FITTED:  # a failed fit leaves the model unfitted
                    self.__dict__.pop(attr, None)
                raise
        if self.history_.stopped == "interrupted":
            # The user asked to stop: the best state is kept, the extras are not fitted.
            warnings.warn(
                "training was interrupted: the model keeps its best state but has no "
                "condition density and no calibrated temperature",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            if density_options is not None:
                self.condition_density_ = _fit_condition_density(
                    pipeline, y_tr, y_va, density_options, self.seed, device
                )
            if calibrate and x_va is not None and x_va.shape[0] >= _MIN_CALIBRATION_ROWS:
                budget = max(
                    _CALIBRATION_MIN_SECONDS, _CALIBRATION_TIME_FRACTION * self.history_.seconds
                )
                self.calibrate(x_va, y_va, seed=self.seed, max_seconds=budget)
        if checkpoint is not None:
            self.save(checkpoint)  # the final state: best weights, end-of-fit statistics, history
        return self

    # -- inference ---------------------------------------------------------------------

    def _condition(self, y: Any, *, finite: bool = True) -> Tensor:
        yt = _as_tensor(y, "y", self.device_, finite=finite)
        _check_columns(yt, "y", self.y_dim_, "training condition")
        return yt

    def _model_condition(self, yf: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``(B, Dy)`` in model space (float64), and which are representable."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # overflow in the pair transform is reported below
            ym = self.preprocessing_.encode_y(yf)
        limit = REPRESENTABLE * (
            self.condition_scale_.to(ym) if self.condition_scale_ is not None else 1.0
        )
        ok = torch.isfinite(ym).all(-1) & (ym.abs() <= limit).all(-1)
        return ym, ok

    def representable(self, y: Any) -> Any:
        """Whether each condition row is within what the model can represent, ``y.shape[:-1]``.

        False for rows with NaN or Inf, rows that overflow in preprocessing, and rows more
        than `REPRESENTABLE` times beyond the training conditions' largest model-space
        magnitude; ``sample`` and ``log_prob`` reject such rows, so screen with this first
        to drop and count them.
        """
        self._check_fitted("representable()")
        yt = self._condition(y, finite=False)
        _, ok = self._model_condition(yt.reshape(-1, self.y_dim_))
        return _output(ok.reshape(yt.shape[:-1]), y)

    def _representable_or_raise(self, yf: Tensor) -> Tensor:
        ym, ok = self._model_condition(yf)
        if not ok.all():
            count, first = _first_rows(~ok)
            raise ValueError(
                f"y is beyond the range the model can represent in {count} rows (first: "
                f"{first}): in model space they overflow or lie over {REPRESENTABLE:.0e} times "
                "beyond the training conditions; screen rows with model.representable(y)"
            )
        return ym

    def sample(
        self,
        y: Any,
        n: int = 1,
        *,
        seed: int | None = None,
        max_chunk: int | None = None,
        temperature: float | None = None,
        guard: bool = True,
        return_diagnostics: bool = False,
    ) -> Any:
        """Draws n samples of x for each condition row, in the user's space.

        Every draw is finite and inside the sane region of model space learned from the
        training targets: draws outside it are drawn again (see `flowrecon.guard`), and
        ``return_diagnostics=True`` says per event how many were.

        Args:
            y: Conditions ``(..., Dy)``, numpy or torch. Rows with NaN or Inf, or beyond
                what the model can represent (`representable`), are an error.
            n: Samples per condition.
            seed: Seed for reproducible samples (the caller's RNG state is untouched).
                The same seed gives the same samples on the same device and with the
                same ``max_chunk``.
            max_chunk: Bound on the samples (over all conditions) drawn at once, to bound
                memory (default 2^15 on the CPU, 2^18 on CUDA); results move to the host
                chunk by chunk for numpy input.
            temperature: Scale of the latent draw, z ~ N(0, T^2 I); None uses the
                model's calibrated ``temperature_`` (1 for an uncalibrated model).
            guard: Redraw draws outside the sane region (default); False returns the
                estimator's raw draws, runaways included.
            return_diagnostics: Return a `SampleDiagnostics` (samples, per-event redrawn
                and unresolved counts, condition log-density and in-domain flag) instead
                of the samples alone.

        Returns:
            ``(n, *y.shape[:-1], Dx)``: numpy for numpy input, torch (on y's device) for
            torch input; or a `SampleDiagnostics` holding them.
        """
        self._check_fitted("sample()")
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or int(n) < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        n = int(n)
        temp = self._temperature(temperature)
        yt = self._condition(y)
        batch_shape = yt.shape[:-1]
        yf = yt.reshape(-1, self.y_dim_)
        ym = self._representable_or_raise(yf)
        support = None
        if guard:  # files of format 1 have no support: then only non-finite draws are redrawn
            support = self.support_
            if support is None:
                support = Support.unbounded(self.preprocessing_.model_x_dim)
        with torch.no_grad(), seeded(seed, self.device_):
            out, redrawn, unresolved = self._draw(
                yf, ym, n, temp, _chunk(max_chunk, self.device_), support, not isinstance(y, Tensor)
            )
        samples = _output(out.reshape(n, *batch_shape, self.x_dim_), y)
        if not return_diagnostics:
            return samples
        lp = inside = None
        if self.condition_density_ is not None:
            features = self._pair_features(yf)
            lp = self.condition_density_._log_prob(features).reshape(batch_shape)
            inside = self.condition_density_.in_domain(features).reshape(batch_shape)
        return SampleDiagnostics(
            samples,
            _output(redrawn.reshape(batch_shape), y),
            _output(unresolved.reshape(batch_shape), y),
            None if lp is None else _output(lp, y),
            None if inside is None else _output(inside, y),
        )

    def _draw(
        self,
        yf: Tensor,
        ym: Tensor,
        n: int,
        temp: float,
        max_chunk: int,
        support: Support | None,
        to_host: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """n draws per condition, chunk by chunk, guarded; with per-event redraw counts.

        ``yf`` ``(B, Dy)`` user conditions, ``ym`` the same in model space (float64).
        Returns the samples ``(n, B, Dx)`` in the user's space (on the host when
        ``to_host``) and the redrawn and unresolved counts ``(B,)``.
        """
        per_draw = max(1, min(n, max_chunk))  # samples per condition drawn at once
        rows = max(1, max_chunk // per_draw)  # conditions per chunk
        redrawn = torch.zeros(yf.shape[0], dtype=torch.int64, device=self.device_)
        unresolved = torch.zeros_like(redrawn)
        est, pipe = self.estimator_, self.preprocessing_
        est.eval()
        chunks = []
        for start in range(0, yf.shape[0], rows):
            yc, ymc = yf[start : start + rows], ym[start : start + rows].float()

            def again(m: int, events: Tensor, ymc: Tensor = ymc) -> Tensor:
                return est.sample(m, ymc[events], temperature=temp)

            draws = []
            for done in range(0, n, per_draw):
                xs = est.sample(min(per_draw, n - done), ymc, temperature=temp)
                if support is not None:
                    xs, r, u = redraw(xs, again, support)
                    redrawn[start : start + rows] += r
                    unresolved[start : start + rows] += u
                xu = pipe.decode_x(xs.to(torch.float64), yc)
                draws.append(xu.cpu() if to_host else xu)
            chunks.append(torch.cat(draws, 0))
        out = torch.cat(chunks, 1) if chunks else yf.new_zeros(n, 0, self.x_dim_)
        return out, redrawn, unresolved

    def condition_log_prob(self, y: Any) -> Any:
        """Log-density of each condition row under the model's condition density.

        Shape ``y.shape[:-1]``, float64; -inf for rows with NaN or Inf or too far out to
        evaluate. The density is over the conditions after the pair transform (for CEI,
        the momenta in their own frame), on the subspace the training conditions span.

        Raises:
            ValueError: The model has no condition density (``fit(condition_density=False)``
                or a file written before it existed).
        """
        density = self._condition_density("condition_log_prob()")
        yt = self._condition(y, finite=False)
        features = self._pair_features(yt.reshape(-1, self.y_dim_))
        return _output(density._log_prob(features).reshape(yt.shape[:-1]), y)

    def in_domain(self, y: Any) -> Any:
        """Whether each condition row lies where the training conditions did, ``y.shape[:-1]``.

        True when its condition log-density is at least the model's threshold (the 0.1 %
        quantile over the validation conditions, `CONDITION_DENSITY`) and it has no
        component along a direction the training conditions never varied in. Rows with
        NaN or Inf are False.
        """
        density = self._condition_density("in_domain()")
        yt = self._condition(y, finite=False)
        features = self._pair_features(yt.reshape(-1, self.y_dim_))
        return _output(density.in_domain(features).reshape(yt.shape[:-1]), y)

    def _condition_density(self, action: str) -> Density:
        self._check_fitted(action)
        if self.condition_density_ is None:
            raise ValueError(
                f"this model has no condition density, so {action} is unavailable: fit it "
                "with condition_density=True (the default) to get out-of-distribution flags"
            )
        return self.condition_density_

    def _pair_features(self, yf: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.preprocessing_.pair.forward_y(yf)

    def log_prob(
        self, x: Any, y: Any, *, max_chunk: int | None = None, temperature: float | None = None
    ) -> Any:
        """Natural-log density of x given y in the user's space, shape ``(...)``.

        x ``(..., Dx)`` and y ``(..., Dy)`` broadcast over their leading shapes (e.g.
        samples ``(n, B, Dx)`` against conditions ``(B, Dy)``). With whitening, this is the
        density on the subspace spanned by the training x (see `flowrecon.preprocessing`).
        Gradients flow when a torch input requires them. It is the density that `sample`
        draws from: at the model's calibrated ``temperature_`` unless ``temperature`` is
        given (1 gives the trained flow's own density). Rows of y (or x) beyond what the
        model can represent (`representable`) are an error, as are NaN and Inf.
        """
        self._check_fitted("log_prob()")
        if not self.has_density:
            raise ValueError(
                f"model {self.model_!r} has no tractable density, so log_prob is unavailable; "
                "use sample() (models with a density: "
                + ", ".join(m["name"] for m in registry.available_models() if m["has_density"])
                + ")"
            )
        xt = _as_tensor(x, "x", self.device_)
        _check_columns(xt, "x", self.x_dim_, "training target")
        yt = self._condition(y)
        try:
            shape = torch.broadcast_shapes(xt.shape[:-1], yt.shape[:-1])
        except RuntimeError:
            raise ValueError(
                "x and y must have matching leading shapes, "
                f"got {tuple(xt.shape)} and {tuple(yt.shape)}"
            ) from None
        with torch.no_grad():
            self._representable_or_raise(yt.reshape(-1, self.y_dim_))
        xf = xt.expand(*shape, self.x_dim_).reshape(-1, self.x_dim_)
        yf = yt.expand(*shape, self.y_dim_).reshape(-1, self.y_dim_)
        grad = any(isinstance(a, Tensor) and a.requires_grad for a in (x, y))
        temp = self._temperature(temperature)
        est, pipe = self.estimator_, self.preprocessing_
        est.eval()
        out = []
        with torch.set_grad_enabled(grad):
            max_chunk = _chunk(max_chunk, self.device_)
            for start in range(0, xf.shape[0], max_chunk):
                xc, yc = xf[start : start + max_chunk], yf[start : start + max_chunk]
                xm64 = pipe.encode_x(xc, yc)
                self._check_target_range(xm64, start)
                xm, ym = xm64.float(), pipe.encode_y(yc).float()
                if temp == 1.0:
                    lp = est.log_prob(xm, ym)
                else:  # z = f(x) ~ N(0, T^2 I): the density the tempered samples follow
                    z, ladj = est.to_latent(xm, ym)
                    lp = standard_normal_log_prob(z / temp) - z.shape[-1] * math.log(temp) + ladj
                out.append(lp.to(torch.float64) + pipe.log_abs_det_x(xc, yc))
        lp = torch.cat(out) if out else xf.new_zeros(0)
        return _output(lp.reshape(shape), x)

    @property
    def has_latent(self) -> bool:
        """Whether the model has an encoder q(z | x, y) (the cVAE), so `latent` works."""
        self._check_fitted("has_latent")
        return callable(getattr(self.estimator_, "encode", None))

    def _model_rows(self, x: Any, y: Any, max_chunk: int | None) -> Iterator[tuple]:
        """Chunks ``(user x, user y, model x, model y)`` of rows x ``(B, Dx)``, y ``(B, Dy)``."""
        xt = _as_tensor(x, "x", self.device_)
        _check_columns(xt, "x", self.x_dim_, "training target")
        _check_2d(xt, "x")
        yt = self._condition(y)
        _check_rows(xt, yt, "x", "y")
        self._representable_or_raise(yt)
        pipe, step = self.preprocessing_, _chunk(max_chunk, self.device_)
        for start in range(0, xt.shape[0], step):
            xc, yc = xt[start : start + step], yt[start : start + step]
            xm = pipe.encode_x(xc, yc)
            self._check_target_range(xm, start)
            yield xc, yc, xm.float(), pipe.encode_y(yc).float()

    def latent(self, x: Any, y: Any, *, max_chunk: int | None = None) -> Any:
        """The encoder's mean of q(z | x, y) for each row, ``(B, latent_dim)``.

        Only for models with an encoder (`has_latent`): the cVAE.

        Example:
            >>> import numpy as np, flowrecon as fr
            >>> rng = np.random.default_rng(0)
            >>> y = rng.normal(size=(200, 1)); x = y + 0.1 * rng.normal(size=(200, 2))
            >>> m = fr.make("cvae", latent_dim=3, seed=0, device="cpu")
            >>> m.fit(x, y, epochs=1, quiet=True, calibrate=False).latent(x[:4], y[:4]).shape
            (4, 3)
        """
        self._check_fitted("latent()")
        if not self.has_latent:
            raise ValueError(f"model {self.model_!r} has no encoder, so latent() is unavailable")
        est = self.estimator_
        est.eval()
        with torch.no_grad():
            out = [est.encode(xm, ym)[0] for _, _, xm, ym in self._model_rows(x, y, max_chunk)]
        z = torch.cat(out).to(torch.float64) if out else torch.zeros(0, 0, dtype=torch.float64)
        return _output(z, x)

    def anomaly_score(self, x: Any, y: Any, *, max_chunk: int | None = None) -> Any:
        """How unlike the training data each row x is given its y, ``(B,)``: larger is stranger.

        For models with a density, -log p(x | y) in the user's space (temperature 1);
        for the cVAE, the negative ELBO at the encoder mean (`flowrecon.models.cvae`) minus
        the preprocessing's log|det|: an upper bound on the same -log p(x | y).
        """
        self._check_fitted("anomaly_score()")
        est, pipe = self.estimator_, self.preprocessing_
        bound = getattr(est, "negative_elbo", None)
        if not self.has_density and not callable(bound):
            raise ValueError(f"model {self.model_!r} has neither a density nor an ELBO")
        est.eval()
        out = []
        with torch.no_grad():
            for xc, yc, xm, ym in self._model_rows(x, y, max_chunk):
                score = -est.log_prob(xm, ym) if self.has_density else bound(xm, ym)
                out.append(score.to(torch.float64) - pipe.log_abs_det_x(xc, yc))
        scores = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
        return _output(scores, x)

    def _check_target_range(self, xm: Tensor, offset: int) -> None:
        """Rejects x rows (of the broadcast, flattened batch) beyond the representable range."""
        if self.support_ is None:
            return
        limit = REPRESENTABLE * self.support_.limit().to(xm)
        bad = ~(torch.isfinite(xm).all(-1) & (xm.detach().abs() <= limit).all(-1))
        if bad.any():
            count, first = _first_rows(bad)
            first = ", ".join(str(offset + int(r)) for r in first.split(", "))
            raise ValueError(
                f"x is beyond the range the model can represent in {count} rows of the "
                f"broadcast batch (first: {first}): in model space they overflow or lie over "
                f"{REPRESENTABLE:.0e} times beyond the training targets"
            )

    def _temperature(self, temperature: float | None) -> float:
        t = self.temperature_ if temperature is None else float(temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        return t

    def calibrate(
        self,
        x: Any,
        y: Any,
        *,
        level: float = 0.9,
        n: int = 50,
        max_rows: int = 4000,
        seed: int = 0,
        max_seconds: float | None = None,
    ) -> float:
        """Sets ``temperature_`` so that central ``level`` intervals cover held-out data.

        A flow trained by maximum likelihood for a limited time is usually too wide on
        data whose posterior is narrow (noise-free momenta): one scale of the latent
        draw, z ~ N(0, T^2 I), fixes the calibration. T is found on held-out rows (never
        the test set): the scale of the samples about their mean that would make the
        empirical coverage equal ``level`` is computed in closed form, T is multiplied by
        it, and this is repeated until the coverage is within 0.002 of ``level`` (or half
        its binomial error on fewer than ~5,000 rows; at most eight rounds, flows need
        two or three). The coverage of correlated
        coordinates of one event moves together, so its statistical error is about that
        of a binomial over the rows: +-0.005 for the default 4,000 rows.

        Guards, so that a temperature never does harm: T stays within [0.01, 100]; a T
        that makes the posterior mean's typical error on these rows (the median over
        rows) grow by more than 10 % (a decoder that answers a large latent scale by
        moving its output, not widening it) is not taken, the last one that did not is
        kept. When the coverage was not
        reached, a `RuntimeWarning` says why, and ``calibration_`` records it: the
        temperature, the coverage before and after, rounds, ``converged``, ``reason``.

        Args:
            x, y: Held-out targets and conditions (e.g. the validation split).
            level: Nominal level of the central intervals (per coordinate).
            n: Samples per row.
            max_rows: Rows used at most (the first ones).
            seed: Seed of the samples.
            max_seconds: Time the calibration should take at most: when a probe draw
                shows that three rounds on ``max_rows`` rows would take longer, fewer
                rows are used (at least 50; the tolerance widens with the binomial
                error) and ``calibration_["rows_limited_by_time"]`` says so. None: no
                limit. `fit` allows the larger of 120 s and a fifth of the training time.

        Returns:
            The new temperature (also stored as ``temperature_``; `save` keeps it).
        """
        self._check_fitted("calibrate()")
        if not 0 < level < 1:
            raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
        xt = _as_tensor(x, "x", self.device_)[:max_rows]
        yt = self._condition(y)[:max_rows]
        _check_rows(xt, yt, "x", "y")
        rows = self._calibration_rows(yt, n, seed, max_seconds)
        limited = rows < xt.shape[0]
        xt, yt = xt[:rows], yt[:rows]
        truth = xt.reshape(-1, self.x_dim_).cpu().numpy()
        lo, hi = _TEMPERATURE_RANGE
        # Half the coverage's binomial error, so that few rows do not chase noise.
        tolerance = max(_CALIBRATION_TOL, 0.5 * math.sqrt(level * (1 - level) / truth.shape[0]))
        temp, good, reason = 1.0, None, ""
        record: dict[str, Any] = {
            "level": level,
            "rows": int(truth.shape[0]),
            "rows_limited_by_time": limited,
            "rounds": 0,
        }
        for _ in range(_CALIBRATION_ROUNDS):
            draws = self.sample(yt, n, seed=seed, temperature=temp).cpu().numpy()
            record["rounds"] += 1
            coverage, scale = _coverage_and_scale(draws, truth, level)
            error = _mean_error(draws, truth)
            if good is None:
                record.update(coverage_before=coverage, mean_error_before=error)
            elif not error <= (1 + _MEAN_ERROR_GROWTH) * record["mean_error_before"]:
                reason = (
                    f"temperature {temp:.3g} moved the posterior mean (its error grew from "
                    f"{record['mean_error_before']:.3g} to {error:.3g}); kept {good[0]:.3g}"
                )
                break
            good = (temp, coverage, error)
            if abs(coverage - level) <= tolerance:
                break
            if not math.isfinite(scale):
                reason = "the samples have no spread to scale"
                break
            wanted = temp * scale
            if not lo <= wanted <= hi:
                if temp in (lo, hi):
                    reason = f"the temperature reached its bound {temp:g} (wanted {wanted:.3g})"
                    break
                wanted = min(max(wanted, lo), hi)
            temp = float(wanted)
        else:
            reason = f"the coverage did not reach {level} within {_CALIBRATION_ROUNDS} rounds"
        assert good is not None
        temp, coverage, error = good
        converged = abs(coverage - level) <= tolerance
        record.update(
            temperature=temp,
            coverage_after=coverage,
            mean_error_after=error,
            converged=converged,
            reason="" if converged else reason,
        )
        if not converged:
            warnings.warn(
                f"calibration of {self.model_!r} stopped at temperature {temp:.3g} with "
                f"coverage {coverage:.3f} instead of {level}: {reason}",
                RuntimeWarning,
                stacklevel=2,
            )
        self.temperature_, self.calibration_ = temp, record
        return temp

    def _calibration_rows(self, y: Tensor, n: int, seed: int, max_seconds: float | None) -> int:
        """Rows that `calibrate` can afford: all of ``y``, or fewer within ``max_seconds``.

        A probe draw on the first rows measures the sampler; rows are cut so that the
        planned rounds fit the budget. Fast samplers never reach the cut, so their
        calibration (and every pinned result) is the same as without a budget.
        """
        rows = int(y.shape[0])
        if max_seconds is None or rows <= _MIN_CALIBRATION_ROWS:
            return rows
        probe = min(rows, _PROBE_ROWS)
        t0 = time.perf_counter()
        self.sample(y[:probe], n, seed=seed)
        per_row = (time.perf_counter() - t0) / probe
        affordable = int(max_seconds / (_PLANNED_ROUNDS * max(per_row, 1e-12)))
        return max(_MIN_CALIBRATION_ROWS, min(rows, affordable))

    # -- persistence -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything `save` writes: tensors and plain values only."""
        self._check_fitted("save()")

        def cpu(d: Any) -> Any:
            if isinstance(d, Tensor):
                return d.detach().cpu()
            if isinstance(d, dict):
                return {k: cpu(v) for k, v in d.items()}
            return d

        from flowrecon import __version__

        backend = registry.get_spec(self.model_).backend
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "versions": {
                "flowrecon": __version__,
                "torch": str(torch.__version__),
                backend: _backend_version(backend),
            },
            "name": self.name,
            "model": self.model_,
            "hparams": self.hparams,
            "hparams_resolved": self.hparams_,
            # Every hyper-parameter, defaults included: a later flowrecon with other
            # defaults rebuilds the same network.
            "hparams_full": self.hparams_full_,
            "options": {
                "x_scaler": self.x_scaler,
                "y_scaler": self.y_scaler,
                "whitening": self.whitening,
                "transform": self.transform,
                "seed": self.seed,
            },
            # Callables (a physics loss) cannot be saved as plain values: left out.
            "training": {k: v for k, v in self.training.items() if _is_plain(v)},
            "x_dim": self.x_dim_,
            "y_dim": self.y_dim_,
            "preprocessing": cpu(self.preprocessing_.state_dict()),
            "estimator": cpu(self.estimator_.state_dict()),
            "history": self.history_.to_dict(),
            "temperature": self.temperature_,
            "calibration": self.calibration_,
            "support": None if self.support_ is None else self.support_.state_dict(),
            "condition_scale": cpu(self.condition_scale_),
            "condition_density": (
                None if self.condition_density_ is None else self.condition_density_.state_dict()
            ),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the fitted model to ``path`` atomically (read it with `flowrecon.load`)."""
        _save_atomic(self.state_dict(), path)


def make(name: str, **kwargs: Any) -> ConditionalGenerator:
    """A `ConditionalGenerator` for a model or preset name, with validated options.

    Keyword arguments named like `ConditionalGenerator` options (x_scaler, y_scaler,
    whitening, transform, device, seed, training) configure the generator; all others are
    hyper-parameters of the model's builder.

    Example:
        >>> import flowrecon as fr
        >>> fr.make("cvae", latent_dim=8)
        ConditionalGenerator('cvae', hparams={'latent_dim': 8}, not fitted)
        >>> fr.make("zuko-nfs")
        Traceback (most recent call last):
        ...
        ValueError: unknown model 'zuko-nfs'. Did you mean 'zuko-nsf'? ...
    """
    options = {k: kwargs.pop(k) for k in GENERATOR_OPTIONS if k in kwargs}
    model = registry.resolve(name, kwargs)[0]  # raises on unknown names and hyper-parameters
    options = {**registry.MODELS[model].preprocessing, **options}
    # Preprocessing choices fail here, not after loading the data in fit.
    Pipeline(
        options.get("x_scaler", "standard"),
        options.get("y_scaler", "standard"),
        options.get("whitening", True),
    )
    resolve_transform(options.get("transform", "none"))
    resolve_device(options.get("device", "auto"))
    return ConditionalGenerator(name, kwargs, **options)


def load(
    path: str | os.PathLike, *, device: str = "auto", model: str | None = None
) -> ConditionalGenerator:
    """Reads a model written by `ConditionalGenerator.save`.

    Only tensors and plain values are read (``torch.load(weights_only=True)``): a model
    file cannot run code. Every way a file can be wrong (not a PyTorch file, another kind
    of file, missing or mistyped entries, hyper-parameters this flowrecon does not know,
    weights that do not fit the saved model) is a one-line ``ValueError`` naming the file.

    Args:
        path: The model file.
        device: Where to put the model (``"auto"``, ``"cpu"``, ``"cuda"``, ...).
        model: The model the caller expects (a registered name, short name or preset);
            a file holding another model is an error.
    """
    state = read_state(path, FORMAT, "flowrecon model file")
    version = state.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path} is not a valid flowrecon model file (no format version)")
    if version > FORMAT_VERSION:
        written = (state.get("versions") or {}).get("flowrecon")
        raise ValueError(f"{path} was written by a newer flowrecon ({written}); upgrade to read it")
    dev = resolve_device(device)
    try:
        gen = _from_state(state, dev, device)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        raise ValueError(f"{path} is not a valid flowrecon model file ({_one_line(err)})") from None
    if model is not None:
        expected = registry.resolve(model)[0]
        if gen.model_ != expected:
            raise ValueError(f"{path} holds a {gen.model_!r} model, not {expected!r}")
    return gen


def _one_line(err: BaseException) -> str:
    """The first line of an error's message, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _saved_hparams(state: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters to rebuild the saved network with, checked against the builder.

    Files of format 1 saved only the hyper-parameters a user set: the rest are today's
    defaults, except those whose default has changed since (`LEGACY_HPARAMS`).
    """
    name = state["model"]
    if not isinstance(name, str) or name not in registry.MODELS:
        raise ValueError(f"it holds an unknown model {name!r}")
    if state["format_version"] >= 2:
        saved = state["hparams_full"]
    else:
        saved = {**LEGACY_HPARAMS.get(name, {}), **state["hparams_resolved"]}
    if not isinstance(saved, dict):
        raise ValueError("its hyper-parameters are not a mapping")
    known = registry.hparam_defaults(name)
    unknown = sorted(set(saved) - set(known))
    if unknown:
        raise ValueError(
            f"it was saved with hyper-parameter {unknown[0]!r}, which model {name!r} of this "
            "flowrecon does not have"
        )
    return registry.coerce_hparams(name, saved)


def _from_state(state: Mapping[str, Any], dev: torch.device, device: str) -> ConditionalGenerator:
    """Rebuilds a fitted generator from a checked `read_state` dict."""
    hparams_full = _saved_hparams(state)
    gen = ConditionalGenerator(
        state["name"],
        state["hparams"],
        device=device,
        training=state["training"],
        **state["options"],
    )
    pipeline = Pipeline.from_state(state["preprocessing"]).to(dev)
    if (pipeline.x_dim, pipeline.y_dim) != (state["x_dim"], state["y_dim"]):
        raise ValueError("its preprocessing does not match its x and y widths")
    with seeded(gen.seed, dev):
        estimator: Estimator = registry.build_estimator(
            state["model"], pipeline.model_x_dim, pipeline.model_y_dim, **hparams_full
        )
    try:
        estimator.load_state_dict(state["estimator"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise ValueError(
            f"its weights do not fit model {state['model']!r} with the saved hyper-parameters "
            f"({_one_line(err)})"
        ) from None
    estimator.to(dev).eval()
    gen.model_, gen.hparams_ = state["model"], dict(state["hparams_resolved"])
    gen.hparams_full_ = hparams_full
    gen.x_dim_, gen.y_dim_ = int(state["x_dim"]), int(state["y_dim"])
    gen.device_, gen.preprocessing_, gen.estimator_ = dev, pipeline, estimator
    gen.history_ = History.from_dict(state["history"])
    gen.temperature_ = float(state.get("temperature", 1.0))  # files from before calibration
    if not (math.isfinite(gen.temperature_) and gen.temperature_ > 0):
        raise ValueError(f"its temperature {gen.temperature_} is not a positive number")
    # Format 1 files have no support, condition scale, density or calibration record.
    support = state.get("support")
    gen.support_ = None if support is None else Support.from_state(support).to(dev)
    if gen.support_ is not None and gen.support_.lo.shape != (pipeline.model_x_dim,):
        raise ValueError("its support does not match the target's width in model space")
    scale = state.get("condition_scale")
    if scale is not None and not (
        isinstance(scale, Tensor)
        and scale.shape == (pipeline.model_y_dim,)
        and bool(torch.isfinite(scale).all() and (scale > 0).all())
    ):
        raise ValueError("its condition scale is not a positive vector of the condition's width")
    gen.condition_scale_ = None if scale is None else scale.to(dev, torch.float64)
    density = state.get("condition_density")
    gen.condition_density_ = (
        None if density is None else Density.from_state(density, device=str(dev), source="it")
    )
    gen.calibration_ = state.get("calibration")
    return gen
