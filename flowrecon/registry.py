"""The model registry: one dict from model name to builder, plus presets.

Hyper-parameters and their defaults live in one place only: the keyword-only arguments
of each builder ``build_xxx(x_dim, y_dim, *, ...) -> Estimator``; this module reads them
with `inspect.signature`. Importing it is cheap (no torch, no backend is imported until a
model is described or built).

Example:
    >>> from flowrecon.registry import MODELS, hparam_defaults
    >>> "zuko-nsf" in MODELS
    True
    >>> hparam_defaults("cvae")["activation"]
    'relu'
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model.

    Attributes:
        builder: Dotted path ``"module:function"`` of the builder.
        backend: Import name of the package the model needs.
        description: One line for ``flowrecon models``.
        has_density: Whether the model has a tractable ``log_prob``.
        preprocessing: Generator options the model needs unless the user sets them
            (the particle flow reads coordinates particle by particle, so it gets
            neither whitening nor scaling).
    """

    builder: str
    backend: str
    description: str
    has_density: bool = True
    preprocessing: Mapping[str, Any] = field(default_factory=dict)


#: Model name -> spec. Names are what users type: ``flowrecon fit --model NAME``.
MODELS: dict[str, ModelSpec] = {
    "cvae": ModelSpec(
        "flowrecon.models.cvae:build_cvae",
        "torch",
        "conditional VAE (seed decks): MLP encoder/decoder, beta-KL; samples only, no density",
        has_density=False,
    ),
    "freia-cinn": ModelSpec(
        "flowrecon.models.freia:build_cinn",
        "FrEIA",
        "FrEIA conditional INN: coupling blocks and permutations, condition on every block",
    ),
    "freia-allinone": ModelSpec(
        "flowrecon.models.freia:build_allinone",
        "FrEIA",
        "FrEIA AllInOneBlock stack with condition",
    ),
    "nflows-maf": ModelSpec(
        "flowrecon.models.nflows:build_maf",
        "nflows",
        "nflows masked autoregressive flow (affine) with context",
    ),
    "nflows-nsf": ModelSpec(
        "flowrecon.models.nflows:build_nsf",
        "nflows",
        "nflows neural spline flow (rational-quadratic) with context",
    ),
    "zuko-nsf": ModelSpec(
        "flowrecon.models.zuko:build_nsf",
        "zuko",
        "zuko neural spline flow with context",
    ),
    "zuko-maf": ModelSpec(
        "flowrecon.models.zuko:build_maf",
        "zuko",
        "zuko masked autoregressive flow with context",
    ),
    "zuko-realnvp": ModelSpec(
        "flowrecon.models.zuko:build_realnvp",
        "zuko",
        "zuko RealNVP (affine coupling) with context",
    ),
    "particle-flow": ModelSpec(
        "flowrecon.models.particles:build_particle_flow",
        "zuko",
        "exchangeable-particle spline flow for particles in a box (LJ): neighbour-aware",
        preprocessing={"whitening": False, "x_scaler": "none"},
    ),
}


@dataclass(frozen=True)
class Range:
    """A numeric interval of a hyper-parameter search (`flowrecon.tune`).

    Integers for parameters annotated ``int``, floats otherwise; ``log`` samples evenly in
    log scale (needs ``low > 0``); ``step`` discretises a linear scale.
    """

    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class Choice:
    """Categorical values of a hyper-parameter search: one of ``values``."""

    values: tuple[Any, ...]


#: Options of the training loop searched for every model (a model's own space may
#: override them): the learning rate, the batch size and the schedule.
TRAINING_SEARCH_SPACE: dict[str, Range | Choice] = {
    "lr": Range(1e-4, 3e-3, log=True),
    "batch_size": Choice((128, 256, 512, 1024)),
    "lr_schedule": Choice(("constant", "cosine")),
}

_ACTIVATIONS = Choice(("relu", "elu", "gelu", "silu"))

#: Model name -> search space: hyper-parameter (or training option) -> `Range`, `Choice`
#: or a fixed value. Bounds keep one trial affordable on a CPU; a TOML ``[search]`` table
#: overrides them (`flowrecon.tune.SearchSpace`). Parameters not named keep their defaults.
SEARCH_SPACES: dict[str, dict[str, Range | Choice | Any]] = {
    "cvae": {
        "hidden_dim": Range(32, 512, log=True),
        "num_layers": Range(1, 4),
        "latent_dim": Range(2, 64, log=True),
        "activation": _ACTIVATIONS,
        "beta": Range(0.1, 2.0, log=True),
    },
    "freia-cinn": {
        "blocks": Range(4, 20),
        "hidden": Range(64, 512, log=True),
        "subnet_layers": Range(1, 3),
        "coupling": Choice(("glow", "affine", "rnvp")),
        "clamp": Range(1.0, 3.0),
        "activation": _ACTIVATIONS,
    },
    "freia-allinone": {
        "blocks": Range(4, 20),
        "hidden": Range(64, 512, log=True),
        "subnet_layers": Range(1, 3),
        "clamp": Range(1.0, 3.0),
        "activation": _ACTIVATIONS,
    },
    "nflows-maf": {
        "transforms": Range(2, 10),
        "hidden": Range(32, 512, log=True),
        "residual_blocks": Range(1, 3),
        "activation": _ACTIVATIONS,
        "dropout": Range(0.0, 0.2),
    },
    "nflows-nsf": {
        "transforms": Range(2, 8),
        "hidden": Range(32, 512, log=True),
        "residual_blocks": Range(1, 3),
        "bins": Range(4, 16),
        "tail_bound": Range(3.0, 8.0),
        "activation": _ACTIVATIONS,
        "dropout": Range(0.0, 0.2),
    },
    "zuko-nsf": {
        "transforms": Range(2, 8),
        "hidden": Range(64, 512, log=True),
        "hidden_layers": Range(1, 3),
        "bins": Range(4, 16),
        "activation": _ACTIVATIONS,
    },
    "zuko-maf": {
        "transforms": Range(2, 10),
        "hidden": Range(64, 512, log=True),
        "hidden_layers": Range(1, 3),
        "activation": _ACTIVATIONS,
    },
    "zuko-realnvp": {
        "transforms": Range(2, 12),
        "hidden": Range(64, 512, log=True),
        "hidden_layers": Range(1, 3),
        "activation": _ACTIVATIONS,
    },
}


def search_space(name: str) -> dict[str, Range | Choice | Any]:
    """The default search space of a model: its hyper-parameters and the training options.

    Example:
        >>> space = search_space("zuko-nsf")
        >>> space["hidden"], space["lr_schedule"]
        (Range(low=64, high=512, log=True, step=None), Choice(values=('constant', 'cosine')))
    """
    key = canonical_name(name)
    if key not in MODELS:
        raise _unknown_model(name)
    space = dict(SEARCH_SPACES.get(key, {}))
    for option, values in TRAINING_SEARCH_SPACE.items():
        space.setdefault(option, values)
    return space


@dataclass(frozen=True)
class Preset:
    """A named configuration: a model, its hyper-parameters and training settings.

    ``training`` holds keyword arguments of `flowrecon.training.train` that
    ``ConditionalGenerator.fit`` uses unless the call overrides them.
    """

    model: str
    description: str
    hparams: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


#: The seed documents' own configurations, so that they can be reproduced and compared.
PRESETS: dict[str, Preset] = {
    "cvae-seed": Preset(
        model="cvae",
        description=(
            "cVAE of the seed decks: latent 1024, encoder widths [256, 512, 1024] (decoder "
            "mirrored), ReLU, beta 1, latent drawn from the training-set latent statistics, "
            "deterministic decoder trained on the squared error"
        ),
        hparams={
            "hidden_dim": 256,
            "num_layers": 3,
            "latent_dim": 1024,
            "activation": "relu",
            "beta": 1.0,
            "latent_sampling": "train_stats",
            "decoder": "deterministic",
        },
        # Typical seed-deck settings. The L1/L2 weights multiply sums over *all* parameters
        # (about 4.5 M here): with PyTorch's default initialisation they start near 0.08
        # (L1) and 0.02 (L2), small next to the reconstruction term.
        training={
            "epochs": 200,
            "batch_size": 256,
            "lr": 1e-3,
            "clip_grad": 5.0,
            "patience": 20,
            "min_delta": 1e-4,
            "l1": 1e-6,
            "l2": 1e-5,
        },
    ),
    "freia-cinn-proposal": Preset(
        model="freia-cinn",
        description="cINN of the proposal: 20 affine coupling blocks, each followed by a flip",
        hparams={"blocks": 20, "coupling": "affine", "permute": "flip"},
        training={"lr": 1e-3, "batch_size": 256, "clip_grad": 5.0, "patience": 20},
    ),
}


#: Short names users type, and what they stand for (``flowrecon models`` lists them).
ALIASES: dict[str, str] = {
    "cinn": "freia-cinn",
    "inn": "freia-cinn",
    "allinone": "freia-allinone",
    "nsf": "zuko-nsf",
    "maf": "zuko-maf",
    "realnvp": "zuko-realnvp",
    "vae": "cvae",
}


def canonical_name(name: str) -> str:
    """The registered model or preset a name stands for: aliases and any letter case.

    Names that match nothing are returned unchanged, so that the caller's error names them.

    Example:
        >>> canonical_name("cinn"), canonical_name("ZUKO-NSF"), canonical_name("zuko-nfs")
        ('freia-cinn', 'zuko-nsf', 'zuko-nfs')
    """
    if not isinstance(name, str):
        return name
    key = name.strip().lower()
    if key in MODELS or key in PRESETS:
        return key
    return ALIASES.get(key, name)


def did_you_mean(name: str, valid: list[str]) -> str:
    """' Did you mean X?' for the closest valid name, or '' when none is close."""
    close = difflib.get_close_matches(name, valid, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _unknown_model(name: str) -> ValueError:
    valid = sorted(MODELS)
    known = valid + sorted(PRESETS) + sorted(ALIASES)
    hint = did_you_mean(str(name).lower(), known)
    return ValueError(
        f"unknown model {name!r}.{hint} Valid models: {', '.join(valid)}; presets: "
        f"{', '.join(sorted(PRESETS))}; short names: "
        + ", ".join(f"{a} ({m})" for a, m in ALIASES.items())
    )


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model (or its short name); unknown names raise with a hint."""
    key = canonical_name(name)
    if key not in MODELS:
        raise _unknown_model(name)
    return MODELS[key]


def is_installed(name: str) -> bool:
    """Whether the backend package of model ``name`` can be imported."""
    return importlib.util.find_spec(get_spec(name).backend) is not None


def get_builder(name: str) -> Callable[..., Any]:
    """Imports and returns the builder of model ``name``."""
    spec = get_spec(name)
    if not is_installed(name):
        raise ImportError(
            f"model {name!r} needs the {spec.backend!r} package, which is not installed "
            f"(pip install {spec.backend})"
        )
    module, function = spec.builder.split(":")
    return getattr(importlib.import_module(module), function)


def _hparam_parameters(name: str) -> dict[str, inspect.Parameter]:
    params = inspect.signature(get_builder(name)).parameters
    return {k: p for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def hparam_defaults(name: str) -> dict[str, Any]:
    """Hyper-parameter name -> default, read from the builder's signature."""
    return {k: p.default for k, p in _hparam_parameters(name).items()}


def hparam_types(name: str) -> dict[str, Any]:
    """Hyper-parameter name -> type annotation (resolved where possible)."""
    builder = get_builder(name)
    try:
        hints = typing.get_type_hints(builder)
    except Exception:  # unresolvable annotations: fall back to the raw strings
        hints = {}
    return {k: hints.get(k, p.annotation) for k, p in _hparam_parameters(name).items()}


def check_hparams(name: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Validates hyper-parameter names for model ``name``; returns them as a dict."""
    valid = list(hparam_defaults(name))
    for key in hparams:
        if key not in valid:
            raise ValueError(
                f"unknown hyper-parameter {key!r} for model {name!r}.{did_you_mean(key, valid)} "
                f"Valid: {', '.join(valid) or '(none)'}"
            )
    return dict(hparams)


def resolve(
    name: str, hparams: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A model or preset name plus overrides -> (model name, hparams, training settings).

    Example:
        >>> resolve("freia-cinn-proposal", {"blocks": 4})[:2]
        ('freia-cinn', {'blocks': 4, 'coupling': 'affine', 'permute': 'flip'})
    """
    hparams = dict(hparams or {})
    name = canonical_name(name)
    if name in PRESETS:
        preset = PRESETS[name]
        model, merged, training = preset.model, {**preset.hparams, **hparams}, dict(preset.training)
    elif name in MODELS:
        model, merged, training = name, hparams, {}
    else:
        raise _unknown_model(name)
    return model, coerce_hparams(model, merged), training


def build_estimator(name: str, x_dim: int, y_dim: int, **hparams: Any) -> Any:
    """Builds the estimator of model ``name`` for the given (model-space) widths."""
    check_hparams(name, hparams)
    return get_builder(name)(x_dim, y_dim, **hparams)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def coerce_value(value: Any, annotation: Any) -> Any:
    """A value for a parameter annotated ``annotation``: strings parsed, others checked.

    Strings come from the command line (``--hparam k=v``, ``--set k=v``) or TOML; other
    values (from the library or TOML) must already fit: ``hidden=1.5``, ``hidden=True``
    and ``hidden="abc"`` for an ``int`` are errors, not a silent ``1``.

    Example:
        >>> coerce_value("2,1,1", tuple[float, ...]), coerce_value(3, float)
        ((2.0, 1.0, 1.0), 3.0)
        >>> coerce_value(1.5, int)
        Traceback (most recent call last):
        ...
        ValueError: expected an integer, got 1.5
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is inspect.Parameter.empty or annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError("; ".join(dict.fromkeys(errors)) or f"cannot read {value!r}")
    if origin is typing.Literal:
        for arg in args:
            if arg == value or str(arg) == str(value):
                return arg
        raise ValueError(f"{value!r} is not one of {', '.join(map(repr, args))}")
    if annotation is bool:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        low = str(value).lower() if isinstance(value, str) else None
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        if _is_number(value) and float(value).is_integer():
            return int(value)
        raise ValueError(f"expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        elif _is_number(value):
            number = float(value)
        else:
            raise ValueError(f"expected a number, got {value!r}")
        if math.isnan(number):
            raise ValueError("expected a number, got NaN")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected text, got {value!r}")
    if origin in (list, tuple) or annotation in (list, tuple):
        item = args[0] if args else Any
        if isinstance(value, str):
            parts = [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
        elif isinstance(value, list | tuple):
            parts = list(value)
        else:
            raise ValueError(f"expected a comma-separated list, got {value!r}")
        items = [coerce_value(v, item) for v in parts]
        return tuple(items) if origin is tuple or annotation is tuple else items
    return value


# The old private name, kept for callers inside the package.
_coerce = coerce_value


def coerce_hparams(name: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Validates names, converts strings (e.g. from ``--hparam k=v``) and checks types.

    Example:
        >>> coerce_hparams("cvae", {"hidden_dim": "64", "beta": "0.5"})
        {'hidden_dim': 64, 'beta': 0.5}
    """
    check_hparams(name, hparams)
    types_ = hparam_types(name)
    out = {}
    for key, value in hparams.items():
        try:
            out[key] = _coerce(value, types_[key])
        except (TypeError, ValueError) as err:
            raise ValueError(f"hyper-parameter {key!r} of model {name!r}: {err}") from None
    return out


def type_name(annotation: Any) -> str:
    """``int``, ``'relu' | 'elu'`` (for Literal), ``int | None``: short and readable.

    Example:
        >>> type_name(typing.Optional[typing.Literal["ocs", "flat"]])
        "'ocs' | 'flat' | None"
    """
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


_type_name = type_name


def describe_model(name: str) -> dict[str, Any]:
    """Name, backend, description and hyper-parameters (default and type) of a model."""
    spec = get_spec(name)
    name = canonical_name(name)
    info: dict[str, Any] = {
        "name": name,
        "backend": spec.backend,
        "installed": is_installed(name),
        "has_density": spec.has_density,
        "description": spec.description,
    }
    if info["installed"]:
        types_ = hparam_types(name)
        info["hparams"] = {
            k: {"default": v, "type": _type_name(types_[k])}
            for k, v in hparam_defaults(name).items()
        }
    return info


def available_models() -> list[dict[str, Any]]:
    """Every registered model: name, backend, installed, has_density and description.

    Example:
        >>> [m["name"] for m in available_models()][:2]
        ['cvae', 'freia-cinn']
    """
    return [
        {
            "name": name,
            "backend": spec.backend,
            "installed": is_installed(name),
            "has_density": spec.has_density,
            "description": spec.description,
            "aliases": [a for a, m in ALIASES.items() if m == name],
        }
        for name, spec in MODELS.items()
    ]


def available_presets() -> list[dict[str, Any]]:
    """Every preset: name, model, description, hparams and training settings."""
    return [
        {
            "name": name,
            "model": p.model,
            "description": p.description,
            "hparams": dict(p.hparams),
            "training": dict(p.training),
        }
        for name, p in PRESETS.items()
    ]
