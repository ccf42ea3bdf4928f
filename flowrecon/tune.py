"""Hyper-parameter search with Optuna: one SQLite file on a laptop, one database for many.

`tune` searches a model's hyper-parameters and training options (the model's search space
in `flowrecon.registry.SEARCH_SPACES`, optionally overridden by a TOML ``[search]``
table) by fitting a `flowrecon.ConditionalGenerator` per trial. It is a thin layer over
``fit``: each trial reports its validation loss every epoch through the training loop's
``on_epoch`` callback, and a pruned trial stops there and frees its worker.

The storage is the way to scale out. By default the study lives in ``OUT/study.db``
(SQLite); ``storage="postgresql://user@host/db"`` with a study name lets any number of
processes, on any number of machines, work on one study: each runs the same command.
``workers=N`` starts N local worker processes on the storage. Re-running the same call
resumes the study; ``trials`` is the study's total, shared by all its workers, and every
trial runs exactly once.

Faults: a trial that diverges (non-finite loss) or raises is recorded as failed, with its
reason in the user attribute ``fail_reason``, and the study goes on. Ctrl-C marks the
running trial failed and queues its parameters again, so re-running resumes where the
search stopped. Workers send heartbeats: the trial of a worker that was killed is marked
failed (and queued again) by the other workers, so it never blocks the study.

Results in ``out``: ``best.toml`` (``flowrecon fit --config best.toml`` refits the best
configuration), ``trials.csv``, figures of the optimisation history, the parameter
importances and the per-epoch validation losses, and ``summary.txt``.

Example (about ten seconds):
    >>> import tempfile, numpy as np
    >>> from flowrecon.tune import tune
    >>> rng = np.random.default_rng(0)
    >>> y = rng.normal(size=(300, 2)); x = y @ [[1.0, 0, 2], [0, 1, 1]] + rng.normal(size=(300, 3))
    >>> result = tune(
    ...     "zuko-maf", x[:200], y[:200], x[200:], y[200:], out=tempfile.mkdtemp(), trials=4,
    ...     training={"epochs": 2}, search={"transforms": [1, 2], "hidden": [8, 16]},
    ... )  # doctest: +SKIP
    >>> result.counts["complete"] + result.counts["pruned"]  # doctest: +SKIP
    4
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowrecon import registry
from flowrecon.registry import Choice, Range

if typing.TYPE_CHECKING:
    import optuna

__all__ = [
    "SearchSpace",
    "TuneResult",
    "best_config",
    "read_search_file",
    "storage_url",
    "tune",
    "write_results",
]

#: Samplers and pruners by name.
SAMPLERS: tuple[str, ...] = ("tpe", "random")
PRUNERS: tuple[str, ...] = ("median", "hyperband", "none")

#: Keyword options of `flowrecon.make` that `tune` passes to every trial's generator.
GENERATOR_KEYS: tuple[str, ...] = ("transform", "x_scaler", "y_scaler", "whitening", "device")

#: Training options that make no sense to search (they change what a trial is, not how
#: well it learns).
_NOT_SEARCHED = frozenset({"quiet", "checkpoint_path", "max_minutes"})

#: Seconds a worker waits for the others to start before it begins on its own.
_START_TIMEOUT = 300.0


# -- search spaces -----------------------------------------------------------------------


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _training_types() -> dict[str, Any]:
    """Training options that may be searched (scalars only) -> their annotation."""
    from flowrecon.training import train, training_options

    hints = typing.get_type_hints(train)
    out = {}
    for name in training_options():
        kind = _base_type(hints.get(name))
        if name not in _NOT_SEARCHED and kind in (int, float, str, bool):
            out[name] = hints[name]
    return out


def _fail(key: str, message: str) -> ValueError:
    return ValueError(f"search.{key}: {message}")


def _parse_range(key: str, spec: Mapping[str, Any] | Range, annotation: Any) -> Range:
    kind = _base_type(annotation)
    if kind not in (int, float):
        raise _fail(key, "a range needs a numeric parameter; give a list of choices instead")
    if isinstance(spec, Range):
        spec = {"low": spec.low, "high": spec.high, "log": spec.log, "step": spec.step}
    unknown = sorted(set(spec) - {"low", "high", "log", "step"})
    if unknown:
        raise _fail(key, f"unknown key {unknown[0]!r} (valid: low, high, log, step)")
    for bound in ("low", "high"):
        if bound not in spec:
            raise _fail(key, f"a range needs both low and high; {bound} is missing")
    values = {}
    for name in ("low", "high", "step"):
        if spec.get(name) is not None:
            try:
                values[name] = registry.coerce_value(spec[name], kind)
            except ValueError as err:
                raise _fail(key, f"{name}: {err}") from None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _fail(key, f"log must be true or false, got {log!r}")
    low, high, step = values["low"], values["high"], values.get("step")
    if not low < high:
        raise _fail(key, f"low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise _fail(key, f"a log scale needs low > 0, got {low}")
    if step is not None and step <= 0:
        raise _fail(key, f"step must be positive, got {step}")
    if log and step is not None and not (kind is int and step == 1):
        raise _fail(key, "a log scale cannot have a step")
    return Range(low, high, log, step)


def _parse_choice(key: str, values: Any, annotation: Any) -> Choice:
    values = list(values.values if isinstance(values, Choice) else values)
    if not values:
        raise _fail(key, "the list of choices is empty")
    out = []
    for value in values:
        try:
            value = registry.coerce_value(value, annotation)
        except ValueError as err:
            raise _fail(key, str(err)) from None
        if not (value is None or isinstance(value, bool | int | float | str)):
            raise _fail(key, f"choices must be numbers, text or booleans, got {value!r}")
        if value not in out:
            out.append(value)
    return Choice(tuple(out))


def _parse_entry(key: str, spec: Any, annotation: Any) -> tuple[str, Any]:
    """``("range"|"choice"|"fixed", parsed)`` for one entry of a search space."""
    if isinstance(spec, Range | Mapping):
        return "range", _parse_range(key, spec, annotation)
    if isinstance(spec, Choice | list | tuple):
        return "choice", _parse_choice(key, spec, annotation)
    try:
        return "fixed", registry.coerce_value(spec, annotation)
    except ValueError as err:
        raise _fail(key, str(err)) from None


@dataclass(frozen=True)
class SearchSpace:
    """What a search varies and what it keeps fixed, for one registered model.

    Build it with `SearchSpace.for_model`; ``suggest`` draws one configuration from an
    Optuna trial. It holds plain values only, so it travels to worker processes.

    Attributes:
        model: The registered model name.
        params: Searched parameter -> `Range` or `Choice`.
        hparams: Fixed hyper-parameters (a preset's values, ``hparams=``, fixed entries).
        training: Fixed training options.
        int_params: The searched ranges that take integers.
        training_keys: The searched parameters that are training options.
    """

    model: str
    params: dict[str, Range | Choice]
    hparams: dict[str, Any]
    training: dict[str, Any]
    int_params: frozenset[str] = frozenset()
    training_keys: frozenset[str] = frozenset()

    @classmethod
    def for_model(
        cls,
        name: str,
        search: Mapping[str, Any] | None = None,
        *,
        hparams: Mapping[str, Any] | None = None,
        training: Mapping[str, Any] | None = None,
        check: bool = True,
    ) -> SearchSpace:
        """The model's default space with ``search`` overrides and fixed values applied.

        Args:
            name: A registered model or preset name; a preset's values stay fixed unless
                ``search`` names them.
            search: Overrides, as in a TOML ``[search]`` table: ``{low, high, log, step}``
                for a range, a list for choices, a plain value to fix a parameter.
            hparams: Fixed hyper-parameters; they leave the default space.
            training: Fixed training options (epochs, max_minutes, patience, ...); they
                leave the default space.
            check: Build the model at every choice and range end (`check`).

        Raises:
            ValueError: One line naming the key: unknown parameter, low >= high, bad type,
                a value the model's builder refuses, a parameter both fixed and searched.

        Example:
            >>> space = SearchSpace.for_model("zuko-nsf", {"hidden": [64, 128], "bins": 8})
            >>> space.params["hidden"], space.hparams["bins"]
            (Choice(values=(64, 128)), 8)
        """
        model, preset_hparams, preset_training = registry.resolve(name)
        types_ = {**registry.hparam_types(model), **_training_types()}
        training_names = set(_training_types())
        hparams, training = dict(hparams or {}), dict(training or {})
        fixed_h = {**preset_hparams, **registry.coerce_hparams(model, hparams)}
        fixed_t = {**preset_training, **_coerce_training(training)}
        search = dict(search or {})
        for key in search:
            if key not in types_:
                hint = registry.did_you_mean(key, list(types_))
                raise _fail(
                    key, f"unknown parameter of model {model!r}.{hint} Valid: {', '.join(types_)}"
                )
            if key in hparams or key in training:
                raise _fail(key, "fixed by hparams/training and named in the search too")
        fixed = {**fixed_h, **fixed_t}  # a preset's values and the caller's fixed options
        space = {k: v for k, v in registry.search_space(model).items() if k not in fixed}
        space.update(search)
        params: dict[str, Range | Choice] = {}
        for key, spec in space.items():
            what, value = _parse_entry(key, spec, types_[key])
            fixed_h.pop(key, None)
            fixed_t.pop(key, None)
            if what != "fixed":
                params[key] = value
            else:
                (fixed_t if key in training_names else fixed_h)[key] = value
        made = cls(
            model=model,
            params=params,
            hparams=fixed_h,
            training=fixed_t,
            int_params=frozenset(
                k
                for k, v in params.items()
                if isinstance(v, Range) and _base_type(types_[k]) is int
            ),
            training_keys=frozenset(k for k in params if k in training_names),
        )
        if check:
            made.check()
        return made

    def suggest(self, trial: optuna.trial.Trial) -> tuple[dict[str, Any], dict[str, Any]]:
        """One configuration drawn by ``trial``: ``(hparams, training)``, fixed values too."""
        hparams, training = dict(self.hparams), dict(self.training)
        for key, spec in self.params.items():
            if isinstance(spec, Choice):
                value = trial.suggest_categorical(key, list(spec.values))
            elif key in self.int_params:
                low, high, step = int(spec.low), int(spec.high), int(spec.step or 1)
                value = trial.suggest_int(key, low, high, step=step, log=spec.log)
            else:
                value = trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)
            (training if key in self.training_keys else hparams)[key] = value
        return hparams, training

    def default_params(self) -> dict[str, Any]:
        """The base configuration's values of the searched parameters that lie in the space.

        `tune` queues them as the study's first trial, so that the search cannot end below
        the configuration a user would get without it.
        """
        from flowrecon.training import training_options

        base = {**training_options(), **registry.hparam_defaults(self.model)}
        out = {}
        for key, spec in self.params.items():
            value = base.get(key)
            if isinstance(spec, Choice):
                inside = value in spec.values
            else:
                inside = _is_real(value) and spec.low <= value <= spec.high
            if inside:
                out[key] = value
        return out

    def check(self) -> None:
        """Builds the model with every choice and range end (one parameter at a time, the
        others fixed) and runs the training loop's own checks on the training options, so
        that the space yields only values the builder and the loop accept."""
        self._check_fixed()
        # The loop's checks do not depend on the model: a tiny one keeps them instant.
        tiny = registry.build_estimator("cvae", 4, 3, hidden_dim=2, num_layers=1, latent_dim=1)
        self._train_check(tiny, None, None)
        for key, spec in self.params.items():
            values = spec.values if isinstance(spec, Choice) else (spec.low, spec.high)
            for value in values:
                if key in self.training_keys:
                    self._train_check(tiny, key, value)
                else:
                    self._build(key, {**self.hparams, key: value})

    def _check_fixed(self) -> None:
        try:
            self._build(None, self.hparams)
        except ValueError:
            for key, value in self.hparams.items():  # name the value the builder refuses
                self._build(key, {key: value})
            raise

    def _build(self, key: str | None, hparams: Mapping[str, Any]) -> Any:
        try:
            return registry.build_estimator(self.model, 4, 3, **hparams)
        except (ValueError, TypeError) as err:
            if key is None:
                raise ValueError(f"hparams of model {self.model!r}: {err}") from None
            value = hparams[key]
            raise _fail(key, f"{value!r} is not valid for model {self.model!r}: {err}") from None

    def _train_check(self, estimator: Any, key: str | None, value: Any) -> None:
        import torch

        from flowrecon.training import train

        options = {**self.training, **({key: value} if key else {})}
        if options.get("epochs", 0) < 0:
            raise _fail(key or "epochs", f"epochs must be at least 0, got {options['epochs']}")
        options["epochs"] = 0  # the checks run, no training
        try:
            train(estimator, torch.zeros(8, 4), torch.zeros(8, 3), quiet=True, **options)
        except (ValueError, TypeError) as err:
            if key is None:
                raise ValueError(f"training options: {err}") from None
            raise _fail(key, f"{value!r} is not a valid training option: {err}") from None

    def describe(self) -> list[str]:
        """One line a parameter: ``hidden: 64 .. 512 (log)``, ``activation: relu | elu``."""
        lines = []
        for key, spec in self.params.items():
            if isinstance(spec, Choice):
                lines.append(f"{key}: " + " | ".join(map(str, spec.values)))
            else:
                scale = " (log)" if spec.log else (f" (step {spec.step})" if spec.step else "")
                lines.append(f"{key}: {spec.low} .. {spec.high}{scale}")
        return lines


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _coerce_training(training: Mapping[str, Any]) -> dict[str, Any]:
    """Validates training option names and types strings (callables pass as they are)."""
    from flowrecon.training import train, training_options

    valid = training_options()
    hints = typing.get_type_hints(train)
    out = {}
    for key, value in training.items():
        if key not in valid:
            raise ValueError(
                f"unknown training option {key!r}.{registry.did_you_mean(key, list(valid))} "
                f"Valid: {', '.join(valid)}"
            )
        if key == "on_epoch":
            raise ValueError("training option 'on_epoch' is set by tune for pruning")
        scalar = _base_type(hints.get(key)) in (int, float, str, bool)
        try:
            out[key] = registry.coerce_value(value, hints[key]) if scalar else value
        except ValueError as err:
            raise ValueError(f"training option {key!r}: {err}") from None
    return out


def read_search_file(path: str | os.PathLike) -> dict[str, Any]:
    """The ``[search]`` table of a TOML file (a tuning configuration or a ``fit`` config).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "search.toml"
        >>> _ = p.write_text('[search]\\nhidden = {low = 64, high = 512, log = true}\\n')
        >>> read_search_file(p)
        {'hidden': {'low': 64, 'high': 512, 'log': True}}
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no search file at {path}")
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    search = config.get("search")
    if not isinstance(search, dict):
        raise ValueError(f"{path}: no [search] table")
    return search


# -- storage -----------------------------------------------------------------------------


def storage_url(storage: str | os.PathLike | None, out: str | os.PathLike) -> str:
    """The SQLAlchemy URL of a study's storage.

    None -> ``sqlite:///OUT/study.db``; a path without ``://`` -> a SQLite file there;
    ``postgresql://...`` gets the installed driver (psycopg 3 first, then psycopg2).

    Example:
        >>> storage_url(None, "/tmp/run")
        'sqlite:////tmp/run/study.db'
        >>> storage_url("postgresql://me@db.example/flowrecon", "x")  # doctest: +SKIP
        'postgresql+psycopg://me@db.example/flowrecon'
    """
    if storage is None:
        return f"sqlite:///{(Path(out) / 'study.db').resolve()}"
    text = str(storage)
    if "://" not in text:
        return f"sqlite:///{Path(text).resolve()}"
    scheme, rest = text.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        import importlib.util

        for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
            if importlib.util.find_spec(module) is not None:
                return f"postgresql+{driver}://{rest}"
        raise ValueError(
            f"storage {redact(text)} needs a PostgreSQL driver: pip install 'flowrecon[postgres]'"
        )
    return text


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and summaries."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: show no more than the scheme
        return url.split("://", 1)[0] + "://***" if "://" in url else url


def _open_storage(url: str, heartbeat_interval: int | None) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats: a killed worker's trial is failed and queued again.

    Processes that open a fresh database at the same moment may race to create its
    tables: the loser tries again.
    """
    import optuna
    import sqlalchemy.exc

    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several processes write to one file: wait for the lock instead of failing.
        engine["connect_args"] = {"timeout": 120}
    else:
        engine["pool_pre_ping"] = True
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=None if heartbeat_interval is None else 3 * heartbeat_interval,
                    heartbeat_stale_trial_callback=_requeue_stale if heartbeat_interval else None,
                )
            break
        except sqlalchemy.exc.SQLAlchemyError as err:
            if attempt == 4:
                first = str(err).strip().splitlines()[0]
                raise ValueError(f"cannot open storage {redact(url)}: {first}") from None
            time.sleep(0.2 + 0.8 * np.random.default_rng().random())
    if url.startswith("sqlite"):
        _serialise_sqlite(storage.engine)
    return storage


def _serialise_sqlite(engine: Any) -> None:
    """Every SQLite transaction takes the write lock when it begins (BEGIN IMMEDIATE).

    SQLite has no row locks (``SELECT ... FOR UPDATE``): without this, two processes can
    both read a queued trial as waiting and both run it. The Python driver's own
    transaction handling is turned off so that SQLAlchemy's ``begin`` decides (the
    recipe of SQLAlchemy's SQLite documentation).
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(connection: Any, record: Any) -> None:
        connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners existed


def _requeue_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queues the parameters of a trial whose worker stopped sending heartbeats."""
    _requeue(study, trial.number, trial.params, "its worker stopped sending heartbeats")


def _requeue(study: optuna.Study, number: int, params: Mapping[str, Any], reason: str) -> None:
    study.enqueue_trial(
        dict(params), user_attrs={"queued": "retry", "retry_of": number, "retry_reason": reason}
    )


# -- the global trials budget ------------------------------------------------------------


def _uncharged(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of trials the budget does not count: failed trials queued again (Ctrl-C, a
    killed worker) and trials created past the budget, which never ran."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in trials}
    return {
        t.number
        for t in trials
        if t.state == TrialState.FAIL and (t.number in retried or t.user_attrs.get("surplus"))
    }


def _work_left(study: optuna.Study, budget: int | None) -> bool:
    """Whether a worker may start another trial: one is queued or the budget has room."""
    from optuna.trial import TrialState

    if budget is None:
        return True
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    return len(trials) - len(_uncharged(trials)) < budget


def _is_surplus(study: optuna.Study, number: int, budget: int | None) -> bool:
    """Whether a freshly created trial lies past the budget.

    Only possible on a database `_budget_lock` cannot lock (neither SQLite nor
    PostgreSQL): trial numbers are handed out atomically by the storage, so when two
    workers take the last free slot at once the later number is the surplus one, closed
    unrun and not counted.
    """
    if budget is None:
        return False
    trials = study.get_trials(deepcopy=False)
    skip = _uncharged(trials)
    return sum(1 for t in trials if t.number < number and t.number not in skip) >= budget


@contextlib.contextmanager
def _budget_lock(storage: Any, url: str, study_name: str) -> Iterator[None]:
    """Holds a lock shared by every process on the study while a worker checks the budget
    and creates its next trial, so that no trial is ever created past the budget.

    SQLite: an exclusive lock on a file beside the database; PostgreSQL: an advisory
    lock keyed by the study name (released by the server if the process dies). Other
    databases run unlocked: a trial created past the budget is then closed unrun.
    """
    if url.startswith("sqlite:///") and sys.platform != "win32":
        import fcntl

        with open(url[len("sqlite:///") :] + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    elif url.startswith("postgresql"):
        from sqlalchemy import text

        digest = hashlib.sha256(f"flowrecon.tune:{study_name}".encode()).digest()
        key = int.from_bytes(digest[:8], "big", signed=True)
        with storage.engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
    else:
        yield


@contextlib.contextmanager
def _heartbeat(storage: Any, trial_id: int, interval: int | None) -> Iterator[None]:
    """Records the trial's heartbeat every ``interval`` seconds while the block runs."""
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried next time
                storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# -- one worker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs, in plain values (it travels to spawned processes)."""

    space: SearchSpace
    url: str
    study: str
    budget: int | None
    deadline: float | None
    max_minutes: float | None
    metric: str
    metric_fn: Callable[..., float] | None
    sampler: str
    pruner: str
    seed: int | None
    generator: dict[str, Any]
    heartbeat: int | None
    progress: bool
    mix_host: bool


class _Failed(Exception):
    """A trial that could not give a value; its message is the recorded reason."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text}" if not isinstance(err, _Failed) else text


def _worker_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Objective:
    """Fits one configuration per trial and returns the metric; records why trials end."""

    def __init__(self, job: _Job, data: Mapping[str, np.ndarray], device: str) -> None:
        self.job, self.data, self.device = job, data, device

    def __call__(self, trial: optuna.trial.Trial) -> float:
        import optuna

        trial.set_user_attr("worker", _worker_tag())
        if "queued" not in trial.user_attrs and _is_surplus(
            trial.study, trial.number, self.job.budget
        ):
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("fail_reason", "not run: the trials budget was used up")
            trial.study.stop()
            raise _Failed("not run: the trials budget was used up by other workers")
        try:
            hparams, training = self.job.space.suggest(trial)
            limits = [m for m in (self.job.max_minutes, training.get("max_minutes")) if m]
            if limits:
                training["max_minutes"] = min(limits)  # the per-trial budget, refits use it
            trial.set_user_attr("hparams", hparams)
            trial.set_user_attr("training", {k: v for k, v in training.items() if _plain(v)})
            return self._run(trial, hparams, training)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
            _requeue(trial.study, trial.number, trial.params, "interrupted (Ctrl-C)")
            raise
        except Exception as err:
            trial.set_user_attr("fail_reason", _one_line(err))
            raise
        finally:
            import torch

            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()  # the next trial may build a bigger model

    def _run(self, trial: optuna.trial.Trial, hparams: dict, training: dict) -> float:
        import optuna

        import flowrecon as fr
        from flowrecon.base import _MIN_CALIBRATION_ROWS

        minutes, cut = self._minutes(training)
        if minutes is not None:
            training["max_minutes"] = minutes
        options = {**self.job.generator, "device": self.device, "seed": self.job.seed or 0}
        model = fr.make(self.job.space.model, **hparams, **options)
        d = self.data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # non-finite: recorded below
            model.fit(
                d["x_train"],
                d["y_train"],
                d["x_val"],
                d["y_val"],
                calibrate=False,  # below, once training is known to have ended well
                quiet=True,
                on_epoch=_Reporter(trial),
                **training,
            )
        h = model.history_
        for key, value in (("epochs", h.epochs), ("best_epoch", h.best_epoch)):
            trial.set_user_attr(key, value)
        trial.set_user_attr("stopped", h.stopped)
        trial.set_user_attr("seconds", round(h.seconds, 3))
        if h.stopped == "interrupted":
            raise KeyboardInterrupt
        if h.stopped == "non_finite":
            raise _Failed(h.message)
        if cut and h.stopped == "max_minutes":
            trial.set_user_attr("pruned_reason", "cut short by the study's timeout")
            raise optuna.TrialPruned(f"cut short by the study's timeout after {h.epochs} epochs")
        if h.best_epoch == 0:
            raise _Failed("no epoch finished within the time budget")
        val_loss = (h.val or h.train)["loss"][h.best_epoch - 1]
        trial.set_user_attr("val_loss", val_loss)
        if self.job.metric_fn is None:
            return val_loss
        if len(d["x_val"]) >= _MIN_CALIBRATION_ROWS:  # as fit would: the metric sees it
            model.calibrate(d["x_val"], d["y_val"], seed=self.job.seed or 0)
        value = float(self.job.metric_fn(model, d["x_val"], d["y_val"]))
        if not math.isfinite(value):
            raise _Failed(f"the metric {self.job.metric} is not finite ({value})")
        return value

    def _minutes(self, training: Mapping[str, Any]) -> tuple[float | None, bool]:
        """The trial's training budget, and whether the study's deadline set it."""
        minutes = training.get("max_minutes")
        if self.job.deadline is None:
            return minutes, False
        left = max(self.job.deadline - time.time(), 1.0) / 60.0
        if minutes is None or left < minutes:
            return left, True
        return minutes, False


class _Reporter:
    """``on_epoch`` callback: reports the validation loss and prunes the trial at once."""

    def __init__(self, trial: optuna.trial.Trial) -> None:
        self.trial = trial

    def __call__(self, epoch: int, train: Mapping[str, float], val: Mapping[str, float]) -> None:
        import optuna

        value = (val or train)["loss"]
        if not math.isfinite(value):
            return  # the loop stops on it and the trial is recorded as failed
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_epoch", epoch)
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: validation loss {value:.4g}")


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return False


def _sampler(job: _Job, worker: int) -> optuna.samplers.BaseSampler:
    """The sampler of one worker: seeded from ``seed`` and the worker's index, so that
    workers explore different points; on a shared server the host and process id are
    mixed in too, since every machine runs the same command with the same seed."""
    import optuna

    seed = job.seed
    if seed is not None and (worker or job.mix_host):
        entropy = [seed, worker] + (
            [os.getpid(), *socket.gethostname().encode()] if job.mix_host else []
        )
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
    if job.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = 10 if job.budget is None else min(10, max(3, job.budget // 4))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def _pruner(job: _Job) -> optuna.pruners.BasePruner:
    import optuna

    if job.pruner == "median":
        # From epoch 2 on: a first epoch says little about a configuration.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if job.pruner == "hyperband":
        epochs = job.space.training.get("epochs")
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs or "auto")
    return optuna.pruners.NopPruner()


def _progress_line(trial: optuna.trial.Trial, state: str, value: float | None) -> None:
    shown = "" if value is None else f" {value:.5g}"
    reason = trial.user_attrs.get("fail_reason", "")
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    line = f"trial {trial.number} {state}{shown} ({params}) {reason}"
    print(line.rstrip(), file=sys.stderr, flush=True)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@contextlib.contextmanager
def _optuna_quiet(progress: bool) -> Iterator[None]:
    """Optuna logs each trial (and each failure's traceback); the summary says it all."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING if progress else optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Heartbeats with ask-and-tell are meant: `_heartbeat` sends them.
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
            yield
    finally:
        optuna.logging.set_verbosity(before)


def _work(
    job: _Job,
    data: Mapping[str, np.ndarray],
    worker: int = 0,
    device: str = "auto",
    ready: Any = None,
) -> None:
    """One worker: runs trials on the study until the budget or the deadline is reached.

    Optuna's ask-and-tell interface, so that the budget check and the creation of the
    next trial happen under one lock shared by every worker (`_budget_lock`).
    """
    import optuna

    storage = _open_storage(job.url, job.heartbeat)
    with _optuna_quiet(job.progress):
        sampler, pruner = _sampler(job, worker), _pruner(job)
        study = optuna.load_study(
            study_name=job.study, storage=storage, sampler=sampler, pruner=pruner
        )
        if ready is not None:  # start together, so that every worker takes a trial
            with contextlib.suppress(Exception):
                ready.wait(_START_TIMEOUT)
        objective = _Objective(job, data, device)
        while job.deadline is None or time.time() < job.deadline - 1.0:
            if job.heartbeat:
                optuna.storages.fail_stale_trials(study)
            with _budget_lock(storage, job.url, job.study):
                if not _work_left(study, job.budget):
                    return
                trial = study.ask()
            _run_trial(study, storage, trial, objective, job)
            gc.collect()


def _run_trial(
    study: optuna.Study, storage: Any, trial: optuna.trial.Trial, objective: _Objective, job: _Job
) -> None:
    """Runs one trial and tells the study how it ended (KeyboardInterrupt propagates)."""
    import optuna
    from optuna.trial import TrialState

    state, value = TrialState.FAIL, None
    try:
        with _heartbeat(storage, trial._trial_id, job.heartbeat):
            value = objective(trial)
        state = TrialState.COMPLETE
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except Exception:  # recorded by the objective as the trial's fail_reason
        pass
    finally:  # also on KeyboardInterrupt: the trial is never left running
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        if job.progress:
            _progress_line(trial, state.name.lower(), value)


# -- worker processes ----------------------------------------------------------------------


def _interrupt_once(signum: int, frame: Any) -> None:
    """First SIGINT/SIGTERM: KeyboardInterrupt (the trial is recorded); later ones ignored,
    so that a second signal cannot cut the recording short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _worker_main(
    job: _Job,
    data_path: str,
    worker: int,
    device: str,
    threads: int | None,
    ready: Any,
    errors: Any,
) -> None:
    """Entry point of a spawned worker process."""
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        with np.load(data_path) as f:
            data = {k: f[k] for k in f.files}
        _work(job, data, worker, device, ready)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as err:
        errors.put((worker, _one_line(err)))
        raise


def _devices(device: str, workers: int) -> list[str]:
    """One device a worker: with several GPUs and ``device="auto"``, one GPU each in turn."""
    import torch

    if device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [device] * workers


def _run_workers(job: _Job, data: Mapping[str, np.ndarray], workers: int, out: Path) -> None:
    """Starts ``workers`` processes on the study and waits for them; a Ctrl-C stops them
    cleanly, and the trials of a worker that died are failed and queued again."""
    try:
        pickle.dumps(job)
    except Exception as err:
        raise ValueError(
            f"workers > 1 needs options that pickle (metric_fn a module-level function): {err}"
        ) from None
    ctx = multiprocessing.get_context("spawn")
    data_path = out / f".tune-data-{os.getpid()}.npz"  # the workers read the data from here
    np.savez(data_path, **data)
    devices = _devices(job.generator.get("device", "auto"), workers)
    threads = None if devices[0].startswith("cuda") else max(1, (os.cpu_count() or 1) // workers)
    ready, errors = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(job, str(data_path), i, devices[i], threads, ready, errors),
            name=f"flowrecon-tune-{i}",
        )
        for i in range(workers)
    ]
    try:
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            _stop(procs)
            raise
        finally:
            _fail_orphans(job, [p for p in procs if p.pid is not None and p.exitcode != 0])
    finally:
        data_path.unlink(missing_ok=True)
    with contextlib.suppress(queue.Empty):
        worker, message = errors.get(timeout=0.5)
        raise RuntimeError(f"tune worker {worker} failed: {message}")


def _stop(procs: list[Any]) -> None:
    """Interrupts the workers still running and waits for them to record their trials."""
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGINT)
    deadline = time.monotonic() + 60.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _fail_orphans(job: _Job, dead: list[Any]) -> None:
    """Fails (and queues again) the running trials of local workers that died."""
    if not dead:
        return
    import optuna
    from optuna.trial import TrialState

    tags = {f"{socket.gethostname()}:{p.pid}": p.exitcode for p in dead}
    with _optuna_quiet(False):
        study = optuna.load_study(study_name=job.study, storage=_open_storage(job.url, None))
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            code = tags.get(trial.user_attrs.get("worker"))
            if code is None:
                continue
            reason = f"its worker process exited with code {code}"
            with contextlib.suppress(Exception):  # another process may have failed it first
                study.tell(trial.number, state=TrialState.FAIL)
                _requeue(study, trial.number, trial.params, reason)


# -- results -------------------------------------------------------------------------------


def best_config(
    trial: optuna.trial.FrozenTrial,
    model: str,
    *,
    generator: Mapping[str, Any] | None = None,
    seed: int = 0,
    sections: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration of ``trial`` in the format of ``flowrecon fit --config``.

    Top-level ``seed`` and ``device``; ``[model]``; ``[hparams]`` (every hyper-parameter,
    defaults included); ``[training]`` (fixed and tuned options, the per-trial budget as
    ``max_minutes``); ``[preprocessing]`` (the scalers and whitening). The pair
    transform belongs to the system (``fit`` takes it from there): ``sections`` adds what
    the caller knows about it, e.g. ``{"system": {"name": "cei", "frame": "lab"}}``, and
    overrides keys of the sections above.
    """
    generator = dict(generator or {})
    hparams = {**registry.hparam_defaults(model), **trial.user_attrs.get("hparams", {})}
    prep: dict[str, Any] = {
        "x_scaler": generator.get("x_scaler", "standard"),
        "y_scaler": generator.get("y_scaler", "standard"),
    }
    if "whitening" in generator:
        prep["whitening"] = generator["whitening"]
    config: dict[str, Any] = {
        "seed": int(seed),
        "device": str(generator.get("device", "auto")),
        "model": {"name": model},
        "hparams": {k: v for k, v in hparams.items() if v is not None},
        "training": _toml_training(trial.user_attrs.get("training", {})),
        "preprocessing": prep,
    }
    for key, value in (sections or {}).items():
        if isinstance(value, Mapping) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = dict(value) if isinstance(value, Mapping) else value
    return config


def _toml_training(training: Mapping[str, Any]) -> dict[str, Any]:
    """Training options TOML can hold: TOML has no None, and for patience and clip_grad
    None means off, which 0 says too; other None values are the defaults, left out."""
    out = {}
    for key, value in training.items():
        if value is None and key in ("patience", "clip_grad"):
            out[key] = 0
        elif value is not None:
            out[key] = value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table, e.g. [physics] weights
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {value!r} to TOML")


def _toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else json.dumps(key)


def to_toml(config: Mapping[str, Any], header: str = "") -> str:
    """A TOML document: top-level values first, then one table per mapping.

    Example:
        >>> print(to_toml({"seed": 0, "model": {"name": "nsf"}}, "refit me"), end="")
        # refit me
        seed = 0
        <BLANKLINE>
        [model]
        name = "nsf"
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    tables = {k: v for k, v in config.items() if isinstance(v, Mapping)}
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in config.items() if k not in tables]
    for name, table in tables.items():
        lines += ["", f"[{_toml_key(name)}]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def trials_frame(study: optuna.Study) -> Any:
    """One row a trial: number, state, value, seconds, parameters, epochs and reasons."""
    import pandas as pd

    trials = study.get_trials(deepcopy=False)
    retries = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    rows = []
    for t in trials:
        reason = t.user_attrs.get("fail_reason", "")
        if t.number in retries:
            retry = retries[t.number]
            reason = reason or retry.user_attrs.get("retry_reason", "")
            reason += f"; queued again as trial {retry.number}"
        seconds = None
        if t.datetime_start and t.datetime_complete:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "seconds": seconds,
                **{f"param_{k}": v for k, v in t.params.items()},
                **{k: t.user_attrs.get(k) for k in ("epochs", "best_epoch", "val_loss")},
                "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch"),
                "reason": reason or t.user_attrs.get("pruned_reason", ""),
                "queued": t.user_attrs.get("queued", ""),
                "worker": t.user_attrs.get("worker", ""),
            }
        )
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=_FRAME_COLUMNS)


#: Columns of `trials_frame` besides the parameters (``param_NAME``).
_FRAME_COLUMNS = (
    "number", "state", "value", "seconds", "epochs", "best_epoch", "val_loss",
    "pruned_at_epoch", "reason", "queued", "worker",
)  # fmt: skip


def _figures(study: optuna.Study, out: Path, metric: str) -> tuple[dict[str, Path], list[str]]:
    """Optimisation history, parameter importances and per-epoch losses, as PNG files.

    Drawn with Optuna's matplotlib visualisation on pyplot figures that are closed at
    once, with pyplot's style restored after (no state leaks into the caller's pyplot);
    a figure that cannot be drawn (too few finished trials) is skipped with a note.
    """
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    evaluator = _importance_evaluator()
    plots = {
        "history": (lambda: ovm.plot_optimization_history(study), 1, ("trial", metric)),
        "importances": (
            lambda: ovm.plot_param_importances(study, evaluator=evaluator),
            2,
            ("importance", None),
        ),
        "intermediate": (
            lambda: ovm.plot_intermediate_values(study),
            1,
            ("epoch", "validation loss"),
        ),
    }
    files, notes = {}, []
    for name, (draw, needed, (xlabel, ylabel)) in plots.items():
        if len(complete) < needed:
            notes.append(f"{name}.png: needs {needed} complete trials, has {len(complete)}")
            continue
        before = set(plt.get_fignums())
        try:
            # Optuna's plots switch pyplot's style: rc_context puts it back.
            with matplotlib.rc_context(), plt.ioff(), _optuna_quiet(False):
                ax = draw()
                ax.set_xlabel(xlabel)
                if ylabel:
                    ax.set_ylabel(ylabel)
                figure = ax.figure
                figure.set_size_inches(8, 5)
                figure.tight_layout()
                figure.savefig(out / f"{name}.png", dpi=110)
            files[name] = out / f"{name}.png"
        except Exception as err:  # e.g. importances of a space with one value a parameter
            notes.append(f"{name}.png: not drawn ({_one_line(err)})")
        finally:
            for number in set(plt.get_fignums()) - before:
                plt.close(number)
    return files, notes


def _importance_evaluator() -> Any:
    """fANOVA when scikit-learn is installed (Optuna's default), else PED-ANOVA."""
    import importlib.util

    import optuna

    if importlib.util.find_spec("sklearn") is not None:
        return optuna.importance.FanovaImportanceEvaluator(seed=0)
    return optuna.importance.PedAnovaImportanceEvaluator()


@dataclass
class TuneResult:
    """What a search left behind (also written into its output directory).

    Attributes:
        study: The study name.
        storage: The storage URL, password hidden.
        counts: Trials by state (``complete``, ``pruned``, ``fail``, ``running``,
            ``waiting``).
        best_value: The best metric value, or None when no trial completed.
        best_trial: Its number.
        best_params: Its searched parameters.
        config: The best configuration, as written to ``best.toml``.
        files: ``best``, ``trials``, ``summary`` and the figures, name -> path.
        summary: The printed summary.
    """

    study: str
    storage: str
    counts: dict[str, int]
    best_value: float | None
    best_trial: int | None
    best_params: dict[str, Any]
    config: dict[str, Any] | None
    files: dict[str, Path] = field(default_factory=dict)
    summary: str = ""


def write_results(
    study: optuna.Study,
    out: str | os.PathLike,
    *,
    model: str,
    metric: str = "val_loss",
    generator: Mapping[str, Any] | None = None,
    seed: int = 0,
    url: str = "",
    figures: bool = True,
    sections: Mapping[str, Any] | None = None,
) -> TuneResult:
    """Writes ``best.toml``, ``trials.csv``, the figures and ``summary.txt`` into ``out``.

    Any process can call it on a study at any time (a study run elsewhere, or one still
    running): it reads the storage only. ``figures=False`` skips the figures (and the
    seconds that importing their libraries takes); ``sections`` go into ``best.toml``
    (see `best_config`).
    """
    from optuna.trial import TrialState

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    frame = trials_frame(study)
    files = {"trials": out / "trials.csv"}
    _write_atomic(files["trials"], frame.to_csv(index=False))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        best = study.best_trial
    config = None
    if best is not None:
        config = best_config(best, model, generator=generator, seed=seed, sections=sections)
        header = (
            f"flowrecon fit --config {out / 'best.toml'}\n"
            f"Tuned by flowrecon tune: study {study.study_name!r}, trial {best.number} of "
            f"{len(trials)}, {metric} = {best.value:.6g} ({study.direction.name.lower()})"
        )
        files["best"] = out / "best.toml"
        _write_atomic(files["best"], to_toml(config, header))
    drawn, notes = _figures(study, out, metric) if figures else ({}, [])
    files.update(drawn)
    result = TuneResult(
        study=study.study_name,
        storage=redact(url),
        counts=counts,
        best_value=None if best is None else best.value,
        best_trial=None if best is None else best.number,
        best_params={} if best is None else dict(best.params),
        config=config,
        files=files,
    )
    result.summary = _summary(result, frame, metric, notes, out)
    files["summary"] = out / "summary.txt"
    _write_atomic(files["summary"], result.summary + "\n")
    return result


def _write_atomic(path: Path, text: str) -> None:
    """Other processes may read these files while this one rewrites them."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _summary(result: TuneResult, frame: Any, metric: str, notes: list[str], out: Path) -> str:
    c = result.counts
    where = f" in {result.storage}" if result.storage else ""
    lines = [
        f"study {result.study!r}{where}: {len(frame)} trials, {c['complete']} "
        f"complete, {c['pruned']} pruned, {c['fail']} failed"
        + (f", {c['running']} running" if c["running"] else "")
        + (f", {c['waiting']} queued" if c["waiting"] else ""),
    ]
    if result.best_trial is None:
        lines.append("no trial completed yet: no best configuration")
    else:
        lines.append(f"best: trial {result.best_trial}, {metric} = {result.best_value:.6g}")
        lines += [f"  {k} = {_fmt(v)}" for k, v in result.best_params.items()]
    default = frame[frame["queued"] == "default configuration"]
    for number, state, value in zip(default["number"], default["state"], default["value"]):
        shown = f"{metric} = {value:.6g}" if state == "COMPLETE" else state.lower()
        lines.append(f"the default configuration (trial {number}): {shown}")
    if c["fail"]:
        failed = frame[frame["state"] == "FAIL"]
        lines.append("failed:")
        lines += [f"  trial {n}: {r}" for n, r in zip(failed["number"][:10], failed["reason"])]
        if len(failed) > 10:
            lines.append(f"  ... and {len(failed) - 10} more (trials.csv)")
    lines += [f"note: {n}" for n in notes]
    names = ", ".join(p.name for k, p in result.files.items() if k != "summary")
    lines.append(f"wrote {names} and summary.txt in {out}")
    if "best" in result.files:
        lines.append(f"refit: flowrecon fit --config {result.files['best']}")
    lines.append("resume, or add workers on this or other machines: run the same command again")
    if result.storage:
        lines.append(f"watch it live: optuna-dashboard {result.storage}")
    return "\n".join(lines)


# -- the search ----------------------------------------------------------------------------


def _arrays(**arrays: Any) -> dict[str, np.ndarray]:
    """The four data arrays as float64, checked for shape (2-D, matching rows and widths)."""
    out = {}
    for name, a in arrays.items():
        a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64)
        if a.ndim != 2 or len(a) == 0:
            raise ValueError(f"{name} must be 2-D with at least one row, got shape {a.shape}")
        out[name] = a
    for split in ("train", "val"):
        if len(out[f"x_{split}"]) != len(out[f"y_{split}"]):
            raise ValueError(f"x_{split} and y_{split} must have the same number of rows")
    for v in ("x", "y"):
        if out[f"{v}_train"].shape[1] != out[f"{v}_val"].shape[1]:
            raise ValueError(f"{v}_train and {v}_val must have the same number of columns")
    return out


def _check_options(
    trials: int | None,
    timeout: float | None,
    workers: int,
    metric: str,
    metric_fn: Any,
    sampler: str,
    pruner: str,
    direction: str,
) -> None:
    if trials is None and timeout is None:
        raise ValueError("tune needs a budget: trials=N, timeout=SECONDS, or both")
    if trials is not None and (not isinstance(trials, int) or trials < 1):
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if metric != "val_loss" and metric_fn is None:
        raise ValueError(f"metric {metric!r} needs metric_fn(model, x_val, y_val) -> float")
    for name, value, valid in (
        ("sampler", sampler, SAMPLERS),
        ("pruner", pruner, PRUNERS),
        ("direction", direction, ("minimize", "maximize")),
    ):
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(valid)}")


def _create_study(job: _Job, direction: str, space: SearchSpace, include_default: bool) -> Any:
    """Creates the study, or loads it and checks it searches the same model and metric.

    Only the process that creates the study queues the default configuration, so that
    processes started at once on several machines queue it once.
    """
    import optuna

    storage = _open_storage(job.url, job.heartbeat)
    identity = {"model": space.model, "metric": job.metric, "direction": direction}
    try:
        study = optuna.create_study(
            storage=storage, study_name=job.study, direction=direction, load_if_exists=False
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=job.study, storage=storage)
        known = study.user_attrs.get("flowrecon")
        if known is None and study.direction.name.lower() == direction:
            return study  # created a moment ago by another process; it sets the identity
        for key, value in identity.items():
            mine = study.direction.name.lower() if key == "direction" else (known or {}).get(key)
            if mine != value:
                raise ValueError(
                    f"study {job.study!r} in {redact(job.url)} searches {key} {mine!r}, not "
                    f"{value!r}; choose another study name"
                ) from None
        return study
    study.set_user_attr("flowrecon", identity)
    defaults = space.default_params()
    if include_default and defaults:
        study.enqueue_trial(defaults, user_attrs={"queued": "default configuration"})
    return study


def tune(
    model: str,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    *,
    out: str | os.PathLike,
    storage: str | os.PathLike | None = None,
    study: str | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    max_minutes_per_trial: float | None = None,
    metric: str = "val_loss",
    metric_fn: Callable[[Any, np.ndarray, np.ndarray], float] | None = None,
    direction: str = "minimize",
    sampler: str = "tpe",
    pruner: str = "median",
    workers: int = 1,
    seed: int | None = 0,
    search: Mapping[str, Any] | str | os.PathLike | None = None,
    hparams: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    generator_options: Mapping[str, Any] | None = None,
    include_default: bool = True,
    heartbeat_interval: int | None = 30,
    figures: bool = True,
    best_sections: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> TuneResult:
    """Searches the hyper-parameters of ``model`` with Optuna; returns the `TuneResult`.

    Every trial fits ``flowrecon.make(model, **hparams)`` on the training split with the
    trial's training options and is scored on the validation split. Re-running the same
    call resumes the study; other processes (other machines, on a server storage) may
    run it at the same time.

    Args:
        model: A registered model or preset name.
        x_train, y_train, x_val, y_val: Targets and conditions of the two splits.
        out: Output directory (created): ``study.db`` by default, ``best.toml``,
            ``trials.csv``, figures, ``summary.txt``.
        storage: SQLAlchemy URL of the study's database (``postgresql://user@host/db``),
            or a SQLite file path; default ``OUT/study.db``.
        study: Study name; default the model name.
        trials: Total trials of the study, over all its workers and runs (failed and
            pruned ones count; trials cut by Ctrl-C or a killed worker are run again).
        timeout: Wall-clock seconds of this call: no trial starts after it, and the last
            one is cut at it (and recorded as pruned).
        max_minutes_per_trial: Training budget of one trial, written to ``best.toml``.
        metric: Name of the score: ``val_loss`` (the estimator's own validation loss at
            its best epoch) or the name of what ``metric_fn`` returns.
        metric_fn: ``metric_fn(model, x_val, y_val) -> float`` on the fitted (and
            calibrated) generator, e.g. a physics metric; must pickle for ``workers > 1``.
        direction: ``minimize`` or ``maximize`` the metric.
        sampler: ``tpe`` or ``random``.
        pruner: ``median``, ``hyperband`` or ``none``; they compare validation losses
            epoch by epoch.
        workers: Local worker processes on the storage (spawned; ``1`` runs in this
            process).
        seed: Seed of the sampler and of every trial's initialisation and batch order.
        search: Overrides of the model's search space (a ``[search]`` table, or a TOML
            file holding one); see `SearchSpace.for_model`.
        hparams: Fixed hyper-parameters.
        training: Fixed training options (epochs, patience, max_minutes, ...).
        generator_options: ``transform``, ``x_scaler``, ``y_scaler``, ``whitening``,
            ``device`` of every trial's generator.
        include_default: Queue the default configuration as the study's first trial.
        heartbeat_interval: Seconds between a running trial's heartbeats; a trial silent
            for three intervals is failed and queued again. None turns heartbeats off.
        figures: Draw the optimisation history, importances and per-epoch losses.
        best_sections: Sections added to ``best.toml`` (see `best_config`); the command
            line passes ``[system]`` (name and options) and ``[data]`` here.
        progress: Print a line per finished trial.

    Raises:
        ValueError: Bad options, search space or data (one line naming the argument).
        KeyboardInterrupt: After Ctrl-C, once the study is consistent and the results so
            far are written.
    """
    _check_options(trials, timeout, workers, metric, metric_fn, sampler, pruner, direction)
    if isinstance(search, str | os.PathLike):
        search = read_search_file(search)
    generator = dict(generator_options or {})
    unknown = sorted(set(generator) - set(GENERATOR_KEYS))
    if unknown:
        raise ValueError(
            f"unknown generator option {unknown[0]!r}; valid: {', '.join(GENERATOR_KEYS)}"
        )
    space = SearchSpace.for_model(model, search, hparams=hparams, training=training)
    registry_model = space.model
    import flowrecon as fr

    fr.make(registry_model, **space.hparams, **generator)  # bad options fail before any trial
    data = _arrays(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    url = storage_url(storage, out)
    job = _Job(
        space=space,
        url=url,
        study=study or registry_model,
        budget=trials,
        deadline=None if timeout is None else time.time() + float(timeout),
        max_minutes=max_minutes_per_trial,
        metric=metric,
        metric_fn=metric_fn,
        sampler=sampler,
        pruner=pruner,
        seed=seed,
        generator=generator,
        heartbeat=heartbeat_interval,
        progress=progress,
        mix_host=not url.startswith("sqlite"),
    )
    with _optuna_quiet(progress):
        the_study = _create_study(job, direction, space, include_default)
    interrupted = False
    try:
        if workers > 1:
            _run_workers(job, data, workers, out)
        # Alone, or to finish what workers that died left queued.
        _work(job, data, 0, generator.get("device", "auto"))
    except KeyboardInterrupt:
        interrupted = True
    result = _finish(the_study, job, out, seed, figures, best_sections)
    if interrupted:
        raise KeyboardInterrupt(f"tuning interrupted; {out / 'summary.txt'} says how far it got")
    return result


def _finish(
    study: optuna.Study,
    job: _Job,
    out: Path,
    seed: int | None,
    figures: bool,
    sections: Mapping[str, Any] | None,
) -> TuneResult:
    """Fails trials whose heartbeat went stale, then writes the results."""
    import optuna

    with _optuna_quiet(False):
        study = optuna.load_study(
            study_name=job.study, storage=_open_storage(job.url, job.heartbeat)
        )
        optuna.storages.fail_stale_trials(study)
        return write_results(
            study,
            out,
            model=job.space.model,
            metric=job.metric,
            generator=job.generator,
            seed=seed or 0,
            url=job.url,
            figures=figures,
            sections=sections,
        )
