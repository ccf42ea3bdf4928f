"""The System interface: one physical system, described by values and callables.

flowrecon's runs (`flowrecon.runs`), command line and plots are generic; everything they
know about a physical system comes from a `System`. A System is a frozen description, not
a base class (the way simulation-based-inference libraries treat a simulator as a plain
callable): its name, the columns and units of the target x and the condition y, a
simulator, the built-in data set, the default pair transform, how rows are split, the
per-event error that robust summaries use, the metrics, figures and physics loss terms,
and the system's own options.

Systems are made by a *factory*, ``make_system(**options) -> System``, whose keyword-only
parameters are the system's options: ``flowrecon fit --system NAME --set key=value``
types each value from the factory's signature, the way ``--hparam`` is typed from a model
builder's. Factories are found by name through the ``flowrecon.systems`` entry-point
group (flowrecon's own systems register there in ``pyproject.toml``; another package can
register its own the same way), or given as ``path/to/file.py:factory`` or
``module:factory``, so a physicist's own script defines a System and gets ``fit``,
``evaluate``, ``sample`` and ``compare`` with it.

Example:
    >>> import numpy as np, pandas as pd
    >>> def simulate(n, *, seed=0, progress=False, device="auto"):
    ...     rng = np.random.default_rng(seed)
    ...     theta = rng.normal(size=n)
    ...     return pd.DataFrame({"theta": theta, "obs": theta + 0.1 * rng.normal(size=n)})
    >>> def make_system(*, noise: float = 0.1) -> System:
    ...     return System("toy", "a noisy measurement", ("theta",), ("obs",),
    ...                   simulate=simulate, builtin={"n": 1000, "seed": 1})
    >>> make_system().x_columns
    ('theta',)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

if typing.TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "EvaluationContext",
    "Evaluator",
    "MetricInfo",
    "System",
    "SystemFactory",
    "available_catalogues",
    "available_systems",
    "coerce_options",
    "get_factory",
    "make_system",
    "option_types",
    "row_split",
]

#: Entry-point group in which packages register system factories by name.
ENTRY_POINT_GROUP = "flowrecon.systems"

#: Options of `flowrecon.ConditionalGenerator.fit` a System may set (``System.fit_options``).
FIT_OPTIONS: tuple[str, ...] = ("calibrate", "condition_density", "support")

#: The system used when none is named: Coulomb explosion imaging.
DEFAULT_SYSTEM = "cei"


@dataclass(frozen=True)
class MetricInfo:
    """Unit and one-line meaning of a metric, for tables, reports and figure labels."""

    unit: str
    description: str


class Evaluator(Protocol):
    """A system's part of ``flowrecon evaluate``, fed the posterior draws chunk by chunk.

    The generic evaluation draws the samples, computes what every system shares (coverage,
    calibration curve, the per-event error and its robust summaries, out-of-distribution
    flags, NLL) and hands each chunk to the evaluator once, in order, so that a million
    events never sit in memory at once.
    """

    def update(self, start: int, stop: int, samples: np.ndarray) -> None:
        """Takes the draws ``(n, stop - start, Dx)`` of events ``start:stop``."""

    def finish(self, posterior_mean: np.ndarray) -> dict[str, Any]:
        """The system's metrics (plain JSON values), given every event's posterior mean."""

    def figures(self, out: Path, shown: Sequence[int], examples: np.ndarray | None) -> dict:
        """Writes the system's figures into ``out``; returns ``{name: (path, caption)}``.

        ``shown`` are the indices of the example events, ``examples`` their draws
        ``(n, len(shown), Dx)``.
        """

    def table(self, metrics: Mapping[str, Any]) -> str:
        """The metrics as text for the terminal and the report."""

    # Optional: ``examples_text(examples, shown) -> str`` describes the example events
    # (their draws ``(n, len(shown), Dx)``); without it a generic table is printed.
    # Optional: ``event_columns() -> {name: (B,) array}`` adds per-event columns to
    # events.csv (after ``finish``).


@dataclass(frozen=True)
class EvaluationContext:
    """What a system's evaluator may use: the model, the events, the run and its options.

    Attributes:
        model: The fitted `flowrecon.ConditionalGenerator`.
        x: True targets ``(B, Dx)`` of the evaluated events, in the user's frame.
        y: Their observed conditions ``(B, Dy)``.
        samples: Posterior draws per event.
        seed: Seed of the evaluation.
        config: The run's ``config.json`` (a dict).
        rows: Row number in the data file of each event (0-based data rows), or None.
        frame: The evaluated rows as read (extra columns included), or None.
        progress: Whether progress bars may be shown.
        training_rows: ``training_rows() -> (x, y)`` of the run's training split, read
            when called; None when the run's data file is not available.
        log_prior: The run's learned log-prior over x (`flowrecon.learned_prior`), or None
            for a run without one.
    """

    model: Any
    x: np.ndarray
    y: np.ndarray
    samples: int
    seed: int
    config: Mapping[str, Any]
    rows: np.ndarray | None = None
    frame: Any = None
    progress: bool = False
    training_rows: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
    log_prior: Callable[[Any], np.ndarray] | None = None


def row_split(
    table: pd.DataFrame, seed: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The default split: a seeded random 70/15/15 partition of the rows.

    Example:
        >>> import pandas as pd
        >>> [len(i) for i in row_split(pd.DataFrame({"a": range(20)}), seed=0)]
        [14, 3, 3]
    """
    from flowrecon.training import split_indices

    train, val, test = split_indices(len(table), seed=seed, fractions=fractions)
    return train, val, test


def rms_error(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Root-mean-square coordinate error per event, ``(B,)``: the default event error."""
    return np.sqrt(np.mean((np.asarray(pred) - np.asarray(truth)) ** 2, axis=-1))


@dataclass(frozen=True)
class System:
    """A physical system as flowrecon's runs, command line and plots see it.

    Attributes:
        name: Short name (``--system NAME``).
        description: One line for ``flowrecon systems``.
        x_columns: Columns of the target x (what the model generates).
        y_columns: Columns of the condition y (what is measured).
        x_unit, y_unit: Units of x and y, for labels and tables.
        simulate: ``simulate(n, *, seed, progress=False, device="auto") -> DataFrame``
            with the x and y columns and any extra columns; None when the system has no
            simulator (then ``fit`` needs ``--data``).
        builtin: Keyword arguments of ``simulate`` (``n``, ``seed``, ...) that make the
            built-in data set ``fit`` uses without ``--data``.
        transform: Name of the default pair transform (`flowrecon.preprocessing`), e.g.
            a frame built from the condition; None models the user's own frame.
        split: ``split(table, seed) -> (train, val, test)`` row indices; default
            `row_split`. Systems with correlated rows (Markov chains) split by group.
        prepare: ``prepare(table) -> table`` applied to every table read or simulated
            before it is used (e.g. a canonical order of identical particles).
        error_name: Name of the per-event error (``ade`` for CEI, default ``rmse``).
        error_unit: Unit of the per-event error; default ``x_unit``.
        event_error: ``event_error(pred, truth) -> (B,)`` error of a point prediction per
            event, in ``x_unit``; default the RMS coordinate error.
        failure_threshold: An event fails when its error exceeds this (or is not finite);
            None counts non-finite errors only.
        metric_info: Units and meanings of the system's metrics (and the generic ones it
            wants to describe differently), in the order ``metrics.json`` lists them.
        summary_metrics: The system's metrics that comparison tables show beside the
            generic ones (error, its median and 95th percentile, failure rate, coverage,
            NLL, training time).
        evaluator: ``evaluator(context, **options) -> Evaluator``; its keyword-only
            parameters are the system's evaluation options (``evaluate --set k=v``).
        sampler: ``sampler(context, samples, **options) -> (samples, extra columns)``,
            post-processing of ``flowrecon sample`` (e.g. refinement); its keyword-only
            parameters are the sample command's options.
        augment: ``augment(x, y) -> (x, y)``: the training rows with copies under the
            system's exact symmetries (the LJ box's horizontal reflections and axis
            swap), so that the model cannot overfit the rows in directions the physics
            says are equivalent; ``fit`` and ``tune`` apply it to training rows only,
            never to validation or test rows. None: no symmetry to use.
        physics_terms: Names of the physics loss terms.
        physics_loss: ``physics_loss() -> callable`` for `flowrecon.training.train`.
        prior_features: ``prior_features(x) -> (features, log_jacobian)``: coordinates
            in which ``fit`` learns an unconditional prior of x, and log|d features / d x|
            on the manifold of x the prior is a density on (`flowrecon.learned_prior`);
            None: runs of this system have no learned prior.
        options: The options this System was made with (plain values), kept in
            ``config.json`` so that ``evaluate`` and ``sample`` remake the same System.
        cli_flags: Command-line flags kept as spellings of system options, flag ->
            option name (e.g. ``{"--charges": "charges"}``); ``--set`` reaches them all.
        model_hparams: Hyper-parameters the system gives a model unless the user sets
            them, model name -> {name: value} (LJ: the particle flow's particle_dim, box
            and hard core).
        fit_options: Keyword arguments of `flowrecon.ConditionalGenerator.fit` beyond the
            training loop's (`FIT_OPTIONS`) that ``fit`` uses for this system, e.g.
            ``{"calibrate": False}`` where a sampling temperature would change the physics
            the model must reproduce; recorded in ``config.json``.
        units: Unit of the system's own options, for help texts.
        column_hint: ``column_hint(found_columns) -> text`` appended to the one-line
            error about a data file that lacks the system's columns (CEI names the
            molecule whose columns the file has); "" when it has nothing to add.
        catalogues: Listings the system offers, name -> ``rows() -> list of dicts``
            (CEI: ``molecules``); ``flowrecon NAME`` prints one as a table, its title the
            first line of the callable's docstring.
    """

    name: str
    description: str
    x_columns: tuple[str, ...]
    y_columns: tuple[str, ...]
    x_unit: str = ""
    y_unit: str = ""
    simulate: Callable[..., pd.DataFrame] | None = None
    builtin: Mapping[str, Any] = field(default_factory=dict)
    transform: str | None = None
    split: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] = row_split
    prepare: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    error_name: str = "rmse"
    error_unit: str | None = None
    event_error: Callable[[np.ndarray, np.ndarray], np.ndarray] = rms_error
    failure_threshold: float | None = None
    metric_info: Mapping[str, MetricInfo] = field(default_factory=dict)
    summary_metrics: tuple[str, ...] = ()
    evaluator: Callable[..., Evaluator] | None = None
    sampler: Callable[..., tuple[np.ndarray, dict[str, np.ndarray]]] | None = None
    augment: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    physics_terms: tuple[str, ...] = ()
    physics_loss: Callable[[], Callable] | None = None
    prior_features: Callable[[Any], tuple[Any, Any]] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    cli_flags: Mapping[str, str] = field(default_factory=dict)
    model_hparams: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    fit_options: Mapping[str, Any] = field(default_factory=dict)
    column_hint: Callable[[list[str]], str] | None = None
    catalogues: Mapping[str, Callable[[], list[dict[str, Any]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.x_columns or not self.y_columns:
            raise ValueError(f"system {self.name!r}: x_columns and y_columns must not be empty")
        both = set(self.x_columns) & set(self.y_columns)
        if both:
            raise ValueError(f"system {self.name!r}: columns {sorted(both)} are both x and y")
        for what, cols in (("x_columns", self.x_columns), ("y_columns", self.y_columns)):
            if len(set(cols)) != len(cols):
                raise ValueError(f"system {self.name!r}: {what} repeats a column")
        unknown = set(self.fit_options) - set(FIT_OPTIONS)
        if unknown:
            raise ValueError(
                f"system {self.name!r}: unknown fit option(s) {sorted(unknown)}; valid: "
                f"{', '.join(FIT_OPTIONS)}"
            )
        object.__setattr__(self, "x_columns", tuple(self.x_columns))
        object.__setattr__(self, "y_columns", tuple(self.y_columns))

    @property
    def x_dim(self) -> int:
        return len(self.x_columns)

    @property
    def y_dim(self) -> int:
        return len(self.y_columns)


#: ``make_system(**options) -> System``: keyword-only options with defaults.
SystemFactory = Callable[..., System]


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_systems() -> list[dict[str, Any]]:
    """Registered systems: name, description and options (name -> default).

    Example:
        >>> "cei" in [s["name"] for s in available_systems()]
        True
    """
    rows = []
    for name in sorted(_entry_points()):
        factory = get_factory(name)
        doc = (inspect.getdoc(factory) or "").splitlines()
        rows.append(
            {
                "name": name,
                "description": doc[0] if doc else "",
                "options": {k: p.default for k, p in _parameters(factory).items()},
            }
        )
    return rows


def available_catalogues() -> dict[str, tuple[str, Callable[[], list[dict[str, Any]]]]]:
    """The listings the registered systems offer: name -> (system name, ``rows()``).

    A system that cannot be made with its defaults offers none; the first system (by
    name) to offer a listing keeps its name.

    Example:
        >>> available_catalogues()["molecules"][0]
        'cei'
    """
    out: dict[str, tuple[str, Callable[[], list[dict[str, Any]]]]] = {}
    for name in sorted(_entry_points()):
        try:
            system = make_system(name)
        except (ValueError, ImportError):
            continue
        for key, rows in system.catalogues.items():
            out.setdefault(key, (name, rows))
    return out


def _load_file(path: Path, attr: str) -> SystemFactory:
    if not path.is_file():
        raise ValueError(f"system file {path} not found")
    # One module per file, registered under a stable name so that pickling-free reloads
    # of the same file in one process reuse it.
    name = f"flowrecon_user_system_{abs(hash(str(path.resolve())))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import system file {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise ValueError(f"system file {path} failed to import: {err}") from None
    factory = getattr(sys.modules[name], attr, None)
    if not callable(factory):
        raise ValueError(f"system file {path} has no callable {attr!r}")
    return factory


def get_factory(system: str | SystemFactory) -> SystemFactory:
    """The factory of a system: a registered name, ``file.py[:attr]`` or ``module:attr``.

    A callable is returned as it is. ``attr`` defaults to ``make_system``.
    """
    if callable(system):
        return system
    if not isinstance(system, str) or not system.strip():
        raise ValueError(f"a system is a name, FILE.py[:factory] or module:factory; got {system!r}")
    spec = system.strip()
    eps = _entry_points()
    if spec in eps:
        return eps[spec].load()
    head, sep, attr = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not sep:
        head, attr = spec, "make_system"
    if head.endswith(".py"):
        return _load_file(Path(head), attr or "make_system")
    if sep:
        try:
            module = importlib.import_module(head)
        except ImportError as err:
            raise ValueError(f"cannot import system module {head!r}: {err}") from None
        factory = getattr(module, attr, None)
        if callable(factory):
            return factory
        raise ValueError(f"module {head!r} has no callable {attr!r}")
    from flowrecon.registry import did_you_mean

    raise ValueError(
        f"unknown system {spec!r}.{did_you_mean(spec, sorted(eps))} Registered: "
        f"{', '.join(sorted(eps)) or '(none)'}; or give FILE.py[:factory] or module:factory"
    )


def _parameters(factory: SystemFactory) -> dict[str, inspect.Parameter]:
    params = inspect.signature(factory).parameters
    return {k: p for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def option_types(func: Callable[..., Any]) -> dict[str, Any]:
    """Keyword-only option name -> type annotation of a factory or hook."""
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable annotations: fall back to the raw ones
        hints = {}
    return {k: hints.get(k, p.annotation) for k, p in _parameters(func).items()}


def coerce_options(
    func: Callable[..., Any], options: Mapping[str, Any], what: str
) -> dict[str, Any]:
    """Checks option names against ``func``'s keyword-only parameters and types strings.

    Strings (from ``--set key=value`` or a flag) are converted by the annotation, the way
    ``--hparam`` values are; other values must already have a fitting type.

    Example:
        >>> def make(*, charges: tuple[float, ...] = (2.0,), noise: float = 0.0): ...
        >>> coerce_options(make, {"charges": "2,1,1", "noise": "0.01"}, "system 'x'")
        {'charges': (2.0, 1.0, 1.0), 'noise': 0.01}
    """
    from flowrecon.registry import coerce_value, did_you_mean

    types_ = option_types(func)
    out = {}
    for key, value in options.items():
        if key not in types_:
            raise ValueError(
                f"unknown option {key!r} of {what}.{did_you_mean(key, list(types_))} "
                f"Valid: {', '.join(types_) or '(none)'}"
            )
        try:
            out[key] = coerce_value(value, types_[key])
        except (TypeError, ValueError) as err:
            raise ValueError(f"option {key!r} of {what}: {err}") from None
    return out


def make_system(system: str | SystemFactory = DEFAULT_SYSTEM, **options: Any) -> System:
    """A `System` from a registered name, a file or module path, or a factory.

    Option values may be strings (as typed on the command line); they are converted by
    the factory's annotations, and unknown names raise with a suggestion.

    Example:
        >>> make_system("cei").x_columns[:3]
        ('cx', 'cy', 'cz')
    """
    factory = get_factory(system)
    label = system if isinstance(system, str) else getattr(factory, "__name__", "system")
    values = coerce_options(factory, options, f"system {label!r}")
    try:
        made = factory(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"system {label!r}: {err}") from None
    if not isinstance(made, System):
        raise ValueError(f"system factory {label!r} returned {type(made).__name__}, not a System")
    return made
