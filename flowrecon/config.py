"""Run configuration files (TOML) and run records (``config.json``), read with clear errors.

A ``flowrecon fit --config FILE.toml`` file has these parts; every key is checked, and an
unknown one is an error that names the file, the section and the key::

    seed = 0                    # top level: seed and device
    device = "auto"

    [model]                     # or, shorter, model = "zuko-nsf" at the top
    name = "zuko-nsf"

    [system]                    # or system = "cei"; the other keys are system options
    name = "cei"
    charges = [2, 2, 2]

    [hparams]                   # the model's hyper-parameters (flowrecon models --details)
    [training]                  # options of the training loop (epochs, lr, max_minutes...)
    [preprocessing]             # x_scaler, y_scaler, whitening; system options may go here
    [physics]                   # weights = {energy_diff2 = 0.1}; system options may go here
    [data]                      # path = "data.parquet" (relative to the working directory)
    [search]                    # the search space of ``flowrecon tune``

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "fit.toml"
    >>> _ = path.write_text('model = "nsf"\\n[training]\\nepochs = 5\\n')
    >>> cfg = read_config_file(path)
    >>> cfg.model, cfg.training
    ('nsf', {'epochs': 5})
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FitConfig", "read_config_file", "read_run_config"]

_SECTIONS = ("model", "system", "hparams", "training", "preprocessing", "physics", "data", "search")
_TOP_LEVEL = ("seed", "device")
#: Keys of sections with a fixed set; the others take any key (checked later).
_PREPROCESSING = ("x_scaler", "y_scaler", "whitening")
_PHYSICS = ("weights",)


@dataclass
class FitConfig:
    """The contents of a configuration file; empty when there is none.

    ``system_options`` are checked against the system's options once it is known
    (`check_system_options`), since sections may carry them.
    """

    source: Path | None = None
    model: str | None = None
    system: str | None = None
    system_options: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    physics_weights: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    seed: int | None = None
    device: str | None = None
    search: dict[str, Any] = field(default_factory=dict)
    #: Where each system option came from (``[physics] charges``), for messages.
    option_origin: dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> str:
        """``FILE: [section] key`` for messages about a value from this file."""
        origin = self.option_origin.get(key, key)
        return f"{self.source}: {origin}" if self.source else origin


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    if not path.is_file():
        raise FileNotFoundError(f"no configuration file at {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file") from None


def _table(raw: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"{path}: [{name}] must be a table of keys, got {value!r}")
    return dict(value)


def _name_or_table(raw: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """``model = "x"`` is short for ``[model] name = "x"`` (the same for ``system``)."""
    value = raw.get(name, {})
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, dict):
        raise ValueError(f'{path}: {name} must be a name ({name} = "...") or a [{name}] table')
    return dict(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a non-empty string, got {value!r}")
    return value


def read_config_file(path: str | Path) -> FitConfig:
    """Reads and checks a TOML run configuration (see the module docstring)."""
    path = Path(path)
    raw = _load_toml(path)
    unknown = sorted(set(raw) - set(_SECTIONS) - set(_TOP_LEVEL))
    if unknown:
        valid = ", ".join((*_TOP_LEVEL, *(f"[{s}]" for s in _SECTIONS)))
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {valid}")
    cfg = FitConfig(source=path)

    model = _name_or_table(raw, "model", path)
    if set(model) - {"name"}:
        raise ValueError(f"{path}: [model] takes only 'name'; got {', '.join(sorted(model))}")
    if "name" in model:
        cfg.model = _text(model["name"], f"{path}: [model] name")

    system = _name_or_table(raw, "system", path)
    if "name" in system:
        cfg.system = _text(system.pop("name"), f"{path}: [system] name")
    for key, value in system.items():
        cfg.system_options[key] = value
        cfg.option_origin[key] = f"[system] {key}"

    cfg.hparams = _table(raw, "hparams", path)
    cfg.training = _table(raw, "training", path)
    cfg.search = _table(raw, "search", path)
    for section, fixed in (("preprocessing", _PREPROCESSING), ("physics", _PHYSICS)):
        for key, value in _table(raw, section, path).items():
            if key in fixed:
                if section == "preprocessing":
                    cfg.preprocessing[key] = value
                elif not isinstance(value, dict):
                    raise ValueError(f"{path}: [physics] weights must be a table term = weight")
                else:
                    cfg.physics_weights = dict(value)
            else:  # a system option given where users look for it (e.g. frame, charges)
                cfg.system_options[key] = value
                cfg.option_origin[key] = f"[{section}] {key}"

    data = _table(raw, "data", path)
    if set(data) - {"path"}:
        raise ValueError(f"{path}: [data] takes only 'path'; got {', '.join(sorted(data))}")
    if "path" in data:
        cfg.data = _text(data["path"], f"{path}: [data] path")
    if "seed" in raw:
        seed = raw["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{path}: seed must be a non-negative integer, got {seed!r}")
        cfg.seed = seed
    if "device" in raw:
        cfg.device = _text(raw["device"], f"{path}: device")
    return cfg


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}")


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of a run directory, checked to be a complete run record.

    Raises:
        ValueError: Missing, unreadable or malformed file, or a run whose fit did not
            finish; the message names the file.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir}: not a complete run (no config.json): fit it again")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable run record ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a run record (expected a JSON object)")
    for key, kind in (("model", str), ("data", dict), ("result", dict)):
        if not isinstance(config.get(key), kind):
            raise ValueError(f"{path}: '{key}' is missing or not a {kind.__name__}")
    if config.get("system") is not None and not isinstance(config.get("system"), Mapping):
        raise ValueError(f"{path}: 'system' must be an object")
    return config
