"""`ConditionalGenerator`: the library API shared by every model.

It checks shapes, runs the preprocessing (`flowrecon.preprocessing.Pipeline`), builds the
estimator from the registry, trains it with the one loop (`flowrecon.training.train`),
samples and evaluates densities in the user's own space, and saves and loads models as
state dicts plus plain values (never pickled modules).

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
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowrecon import registry
from flowrecon.models._estimator import Estimator, standard_normal_log_prob
from flowrecon.preprocessing import Pipeline, resolve_transform
from flowrecon.training import History, _save_atomic, split_indices, train, training_options

FORMAT = "flowrecon.ConditionalGenerator"
FORMAT_VERSION = 1

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
)


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


def _as_tensor(a: Any, what: str, device: torch.device) -> Tensor:
    """Numeric array-like or tensor -> float64 tensor on device; rejects NaN/Inf."""
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
    bad = ~torch.isfinite(t).reshape(-1, t.shape[-1]).all(-1) if t.numel() else None
    if bad is not None and bad.any():
        rows = bad.nonzero().flatten()
        first = ", ".join(str(int(r)) for r in rows[:5])
        raise ValueError(f"{what} contains NaN or Inf in {len(rows)} rows (first: {first})")
    return t


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
    if (x_val is None) != (y_val is None):
        raise ValueError("give both x_val and y_val, or neither")
    if x_val is not None:
        x_va, y_va = _as_tensor(x_val, "x_val", device), _as_tensor(y_val, "y_val", device)
        _check_2d(x_va, "x_val")
        _check_2d(y_va, "y_val")
        _check_columns(x_va, "x_val", x_all.shape[1], "training target")
        _check_columns(y_va, "y_val", y_all.shape[1], "training condition")
        _check_rows(x_va, y_va, "x_val", "y_val")
        return x_all, y_all, x_va, y_va
    if val_fraction == 0:
        return x_all, y_all, None, None
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if x_all.shape[0] < 2:
        raise ValueError("need at least 2 rows to hold out a validation set")
    parts = split_indices(x_all.shape[0], seed, (1 - val_fraction, val_fraction))
    i_tr, i_va = (torch.as_tensor(i, device=device) for i in parts)
    return x_all[i_tr], y_all[i_tr], x_all[i_va], y_all[i_va]


def _check_rows(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same number of rows, "
            f"got {a.shape[0]} and {b.shape[0]}"
        )


def _output(t: Tensor, like: Any) -> Any:
    """Numpy in -> numpy out (float64, or the input's float dtype); torch in -> torch out."""
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


#: Fewest validation rows `fit` calibrates the temperature on, most rounds it takes, and
#: the distance from the nominal coverage at which it stops.
_MIN_CALIBRATION_ROWS, _CALIBRATION_ROUNDS, _CALIBRATION_TOL = 50, 8, 0.002


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
        **train_kwargs: Any,
    ) -> ConditionalGenerator:
        """Builds preprocessing and estimator from the data and trains; returns self.

        Args:
            x: Targets ``(N, Dx)``, numpy or torch.
            y: Conditions ``(N, Dy)``.
            x_val, y_val: Validation data; when absent a seeded ``val_fraction`` of the
                rows is held out (``val_fraction=0`` trains on all rows and monitors the
                training loss).
            val_fraction: Fraction held out when no validation data are given.
            calibrate: After training, set the sampling temperature so that 90 % central
                intervals cover 90 % of the validation data (`calibrate`); skipped
                without validation data.
            **train_kwargs: Options of `flowrecon.training.train` (epochs, batch_size,
                lr, patience, min_delta, clip_grad, l1, l2, physics_loss,
                physics_weights, max_minutes, checkpoint_path, quiet, ...), overriding
                the preset's and ``training``. ``checkpoint_path`` saves the whole
                generator (loadable with `flowrecon.load`) at every improvement.
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
        device = resolve_device(self.device)
        x_tr, y_tr, x_va, y_va = _split(x, y, x_val, y_val, val_fraction, self.seed, device)

        pipeline = Pipeline(self.x_scaler, self.y_scaler, self.whitening, self.transform)
        pipeline.fit(x_tr, y_tr)
        xm, ym = pipeline.encode_x(x_tr, y_tr).float(), pipeline.encode_y(y_tr).float()
        xm_va = ym_va = None
        if x_va is not None and y_va is not None:
            xm_va, ym_va = pipeline.encode_x(x_va, y_va).float(), pipeline.encode_y(y_va).float()

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
            self.x_dim_, self.y_dim_ = x_tr.shape[1], y_tr.shape[1]
            self.device_, self.preprocessing_, self.estimator_ = device, pipeline, estimator
            self.history_ = History()
            self.temperature_ = 1.0
            if checkpoint is not None:
                options["on_checkpoint"] = lambda epoch: self.save(checkpoint)
            try:
                self.history_ = train(estimator, xm, ym, xm_va, ym_va, seed=self.seed, **options)
            except BaseException:
                for attr in _FITTED:  # a failed fit leaves the model unfitted
                    self.__dict__.pop(attr, None)
                raise
        if calibrate and x_va is not None and x_va.shape[0] >= _MIN_CALIBRATION_ROWS:
            self.calibrate(x_va, y_va, seed=self.seed)
        if checkpoint is not None:
            self.save(checkpoint)  # the final state: best weights, end-of-fit statistics, history
        return self

    # -- inference ---------------------------------------------------------------------

    def _condition(self, y: Any) -> Tensor:
        yt = _as_tensor(y, "y", self.device_)
        _check_columns(yt, "y", self.y_dim_, "training condition")
        return yt

    def sample(
        self,
        y: Any,
        n: int = 1,
        *,
        seed: int | None = None,
        max_chunk: int | None = None,
        temperature: float | None = None,
    ) -> Any:
        """Draws n samples of x for each condition row, in the user's space.

        Args:
            y: Conditions ``(..., Dy)``, numpy or torch.
            n: Samples per condition.
            seed: Seed for reproducible samples (the caller's RNG state is untouched).
                The same seed gives the same samples on the same device and with the
                same ``max_chunk``.
            max_chunk: Bound on the samples (over all conditions) drawn at once, to bound
                memory (default 2^15 on the CPU, 2^18 on CUDA); results move to the host
                chunk by chunk for numpy input.
            temperature: Scale of the latent draw, z ~ N(0, T^2 I); None uses the
                model's calibrated ``temperature_`` (1 for an uncalibrated model).

        Returns:
            ``(n, *y.shape[:-1], Dx)``: numpy for numpy input, torch (on y's device) for
            torch input.
        """
        self._check_fitted("sample()")
        if int(n) < 1:
            raise ValueError(f"n must be a positive integer, got {n}")
        n = int(n)
        temp = self._temperature(temperature)
        yt = self._condition(y)
        batch_shape = yt.shape[:-1]
        yf = yt.reshape(-1, self.y_dim_)
        max_chunk = _chunk(max_chunk, self.device_)
        per_draw = max(1, min(n, max_chunk))  # samples per condition drawn at once
        rows = max(1, max_chunk // per_draw)  # conditions per chunk
        on_cpu = not isinstance(y, Tensor)
        chunks = []
        est, pipe = self.estimator_, self.preprocessing_
        est.eval()
        with torch.no_grad(), seeded(seed, self.device_):
            for start in range(0, yf.shape[0], rows):
                yc = yf[start : start + rows]
                ym = pipe.encode_y(yc).float()
                draws = []
                for done in range(0, n, per_draw):
                    xs = est.sample(min(per_draw, n - done), ym, temperature=temp)
                    xu = pipe.decode_x(xs.to(torch.float64), yc)
                    draws.append(xu.cpu() if on_cpu else xu)
                chunks.append(torch.cat(draws, 0))
        out = torch.cat(chunks, 1) if chunks else yf.new_zeros(n, 0, self.x_dim_)
        return _output(out.reshape(n, *batch_shape, self.x_dim_), y)

    def log_prob(
        self, x: Any, y: Any, *, max_chunk: int | None = None, temperature: float | None = None
    ) -> Any:
        """Natural-log density of x given y in the user's space, shape ``(...)``.

        x ``(..., Dx)`` and y ``(..., Dy)`` broadcast over their leading shapes (e.g.
        samples ``(n, B, Dx)`` against conditions ``(B, Dy)``). With whitening, this is the
        density on the subspace spanned by the training x (see `flowrecon.preprocessing`).
        Gradients flow when a torch input requires them. It is the density that `sample`
        draws from: at the model's calibrated ``temperature_`` unless ``temperature`` is
        given (1 gives the trained flow's own density).
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
                xm, ym = pipe.encode_x(xc, yc).float(), pipe.encode_y(yc).float()
                if temp == 1.0:
                    lp = est.log_prob(xm, ym)
                else:  # z = f(x) ~ N(0, T^2 I): the density the tempered samples follow
                    z, ladj = est.to_latent(xm, ym)
                    lp = standard_normal_log_prob(z / temp) - z.shape[-1] * math.log(temp) + ladj
                out.append(lp.to(torch.float64) + pipe.log_abs_det_x(xc, yc))
        lp = torch.cat(out) if out else xf.new_zeros(0)
        return _output(lp.reshape(shape), x)

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
    ) -> float:
        """Sets ``temperature_`` so that central ``level`` intervals cover held-out data.

        A flow trained by maximum likelihood for a limited time is usually too wide on
        data whose posterior is narrow (noise-free momenta) and a cVAE too narrow: one
        scale of the latent draw, z ~ N(0, T^2 I), fixes the calibration without touching
        the posterior mean. T is found on held-out rows (never the test set): the scale of
        the samples about their mean that would make the empirical coverage equal
        ``level`` is computed in closed form, T is multiplied by it, and this is repeated
        until the coverage is within 0.002 of ``level`` (at most eight rounds: flows need
        two or three, a cVAE's decoder responds less than linearly to T and needs more).
        The coverage of correlated coordinates of one event moves together, so its
        statistical error is about that of a binomial over the rows: +-0.005 for the
        default 4,000 rows.

        Args:
            x, y: Held-out targets and conditions (e.g. the validation split).
            level: Nominal level of the central intervals (per coordinate).
            n: Samples per row.
            max_rows: Rows used at most (the first ones).
            seed: Seed of the samples.

        Returns:
            The new temperature (also stored as ``temperature_``; `save` keeps it).
        """
        self._check_fitted("calibrate()")
        if not 0 < level < 1:
            raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
        xt = _as_tensor(x, "x", self.device_)[:max_rows]
        yt = self._condition(y)[:max_rows]
        _check_rows(xt, yt, "x", "y")
        truth = xt.reshape(-1, self.x_dim_).cpu().numpy()
        temp = 1.0
        for _ in range(_CALIBRATION_ROUNDS):
            draws = self.sample(yt, n, seed=seed, temperature=temp)
            coverage, scale = _coverage_and_scale(draws.cpu().numpy(), truth, level)
            if abs(coverage - level) <= _CALIBRATION_TOL or not math.isfinite(scale):
                break
            temp = float(min(max(temp * scale, 1e-3), 1e3))
        self.temperature_ = temp
        return temp

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
    registry.resolve(name, kwargs)  # raises on unknown names and hyper-parameters
    # Preprocessing choices fail here, not after loading the data in fit.
    Pipeline(
        options.get("x_scaler", "standard"),
        options.get("y_scaler", "standard"),
        options.get("whitening", True),
    )
    resolve_transform(options.get("transform", "none"))
    resolve_device(options.get("device", "auto"))
    return ConditionalGenerator(name, kwargs, **options)


def load(path: str | os.PathLike, *, device: str = "auto") -> ConditionalGenerator:
    """Reads a model written by `ConditionalGenerator.save`.

    Only tensors and plain values are read (``torch.load(weights_only=True)``): a model
    file cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a flowrecon model file ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a flowrecon model file")
    if state.get("format_version", math.inf) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer flowrecon "
            f"({state['versions'].get('flowrecon')}); upgrade flowrecon to read it"
        )
    gen = ConditionalGenerator(
        state["name"],
        state["hparams"],
        device=device,
        training=state["training"],
        **state["options"],
    )
    dev = resolve_device(device)
    pipeline = Pipeline.from_state(state["preprocessing"]).to(dev)
    with seeded(gen.seed, dev):
        estimator: Estimator = registry.build_estimator(
            state["model"], pipeline.model_x_dim, pipeline.model_y_dim, **state["hparams_resolved"]
        )
    estimator.load_state_dict(state["estimator"])
    estimator.to(dev).eval()
    gen.model_, gen.hparams_ = state["model"], state["hparams_resolved"]
    gen.x_dim_, gen.y_dim_ = state["x_dim"], state["y_dim"]
    gen.device_, gen.preprocessing_, gen.estimator_ = dev, pipeline, estimator
    gen.history_ = History.from_dict(state["history"])
    gen.temperature_ = float(state.get("temperature", 1.0))  # files from before calibration
    return gen
