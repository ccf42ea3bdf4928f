"""The learned prior of a run: what its training targets say about x, before any data.

`fit_run` fits a small unconditional `flowrecon.density.Density` to the system's prior
features of the training targets (``System.prior_features``; for CEI the internal
coordinates of the geometry) and saves it as ``prior.pt`` beside the model. A system's
evaluator then uses it wherever a prior over x is needed (CEI: the choice among several
exact solutions of refinement, and importance weights), which matters for user data,
where no analytic prior is known.

Example:
    >>> import numpy as np
    >>> from flowrecon.system import System
    >>> def features(x):  # a prior over the radius of 2-D points
    ...     r = np.linalg.norm(x, axis=-1, keepdims=True)
    ...     return r, -np.log(2 * np.pi * r[..., 0])
    >>> s = System("ring", "points on a ring", ("a", "b"), ("c",), prior_features=features)
    >>> x = np.random.default_rng(0).normal(size=(2000, 2))
    >>> density = fit_prior(s, x[:1500], x[1500:], device="cpu", epochs=2)
    >>> log_prior(s, density)(x[:3]).shape
    (3,)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flowrecon.density import Density
from flowrecon.system import System

__all__ = ["PRIOR_FILE", "PRIOR_OPTIONS", "fit_prior", "load_prior", "log_prior"]

#: File of the learned prior in a run directory.
PRIOR_FILE = "prior.pt"

#: Size and budget of the learned prior: a few features need a small flow, and it must
#: not cost much beside the model's own training.
PRIOR_OPTIONS: dict[str, Any] = {
    "transforms": 3,
    "hidden": 64,
    "epochs": 30,
    "batch_size": 2048,
    "lr": 3e-3,
    "patience": 3,
    "max_rows": 200_000,
    "max_minutes": 1.0,
}

_MADE = ("transforms", "hidden", "hidden_layers", "bins", "quantile")


def fit_prior(
    system: System,
    x_train: np.ndarray,
    x_val: np.ndarray | None = None,
    *,
    device: str = "auto",
    seed: int = 0,
    **options: Any,
) -> Density:
    """Fits the density of the system's prior features of ``x_train``.

    Args:
        system: A System with ``prior_features``.
        x_train: Training targets ``(N, Dx)``.
        x_val: Validation targets for early stopping (else 15 % of ``x_train``).
        device: Where to fit.
        seed: Seed of the initialisation and batches.
        **options: `PRIOR_OPTIONS` to override (Density's own and its ``fit``'s).
    """
    if system.prior_features is None:
        raise ValueError(f"system {system.name!r} declares no prior features to learn a prior in")
    options = {**PRIOR_OPTIONS, **options}
    made = {k: v for k, v in options.items() if k in _MADE}
    density = Density(**made, seed=seed, device=device)
    features = np.asarray(system.prior_features(x_train)[0])
    features_val = None if x_val is None else np.asarray(system.prior_features(x_val)[0])
    fit_options = {k: v for k, v in options.items() if k not in _MADE}
    return density.fit(features, features_val, **fit_options)


def log_prior(system: System, density: Density) -> Callable[[Any], np.ndarray]:
    """``log_prior(x)``: the learned log-density of targets ``(..., Dx)``, shape ``(...)``.

    It is the density of the prior features times the Jacobian the system declares, so it
    is a density over x (on the manifold the system's features describe).
    """
    features_of = system.prior_features
    if features_of is None:
        raise ValueError(f"system {system.name!r} declares no prior features")

    def log_p(x: Any) -> np.ndarray:
        features, log_jacobian = features_of(np.asarray(x, dtype=np.float64))
        features = np.asarray(features)
        flat = np.asarray(density.log_prob(features.reshape(-1, features.shape[-1])))
        return flat.reshape(features.shape[:-1]) + np.asarray(log_jacobian)

    return log_p


def load_prior(run_dir: Path, system: System, device: str = "auto") -> Density | None:
    """The run's learned prior, or None when it has none; a damaged file is a one-line error."""
    path = Path(run_dir) / PRIOR_FILE
    if not path.is_file() or system.prior_features is None:
        return None
    try:
        return Density.load(path, device=device)
    except Exception as err:  # any damage: name the file, keep it to one line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{path}: not a readable learned prior ({first}); fit the run again"
        ) from None


def record(density: Density, options: Mapping[str, Any]) -> dict[str, Any]:
    """What config.json records of the learned prior."""
    return {"file": PRIOR_FILE, "features": density.dim, **dict(options)}
