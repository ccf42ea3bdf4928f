"""The ``flowrecon`` command line: a thin layer over `flowrecon.runs`, for any System.

Every command exits non-zero with a one-line reason on bad input (2 for a usage error, 1
otherwise, 130 when interrupted by Ctrl-C or SIGTERM); long work shows a progress bar
unless ``--quiet`` is given or stderr is not a terminal. Nothing here knows a physical
system: ``--system`` names one (default `flowrecon.system.DEFAULT_SYSTEM`), ``--set
key=value`` sets its options,
typed from its factory, and a system may declare flags of its own (``flowrecon systems``
lists them), which work like ``--set``.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

#: Largest seed accepted (numpy and torch both take it).
MAX_SEED = 2**63 - 1
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FLEXIBLE = {"ignore_unknown_options": True, "allow_extra_args": True}


class _SystemCommand(click.Command):
    """A command whose help ends with the default system's options for it."""

    def __init__(self, *args: Any, hooks: Sequence[str] = ("system",), **kwargs: Any) -> None:
        kwargs.setdefault("context_settings", _FLEXIBLE)
        super().__init__(*args, **kwargs)
        self.hooks = tuple(hooks)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        try:
            intro, rows = _system_help(self.hooks)
        except Exception as err:  # help must show even if a system cannot load
            intro, rows = f"(system options unavailable: {_one_line(err)})", []
        with formatter.section("System options"):
            formatter.write_text(intro)
            formatter.write_dl(rows)


def _system_help(hooks: Sequence[str]) -> tuple[str, list[tuple[str, str]]]:
    import inspect

    from flowrecon.registry import type_name
    from flowrecon.system import DEFAULT_SYSTEM, get_factory, make_system, option_types

    system = make_system(DEFAULT_SYSTEM)
    funcs = {"system": get_factory(DEFAULT_SYSTEM), **_hooks(system)}
    intro = (
        f"Of the default system {DEFAULT_SYSTEM!r} ({system.description}), as --set KEY=VALUE "
        "or their own flag; `flowrecon systems --details NAME` lists another system's."
    )
    by_option = {name: flag for flag, name in system.cli_flags.items()}
    rows = []
    for hook in hooks:
        func = funcs[hook]
        if func is None:
            continue
        params = inspect.signature(func).parameters
        for key, kind in option_types(func).items():
            term = f"{by_option[key]}, " if key in by_option else ""
            rows.append(
                (f"{term}--set {key}=", f"{type_name(kind)} [default: {params[key].default!r}]")
            )
    return intro, rows


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _one_line(err: BaseException) -> str:
    text = _ANSI.sub("", str(err)).strip()
    first = text.splitlines()[0] if text else repr(err)
    return first if len(first) <= 400 else first[:397] + "..."


class Interrupted(Exception):
    """A command stopped by Ctrl-C or SIGTERM; the message says what was kept."""


def _friendly_errors(func: Callable) -> Callable:
    """Library errors as one-line messages; Ctrl-C and SIGTERM as exit code 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Interrupted as err:
            click.echo(f"interrupted: {err}", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo(
                "interrupted: nothing new was written; earlier outputs are unchanged", err=True
            )
            sys.exit(130)
        except (ValueError, OSError, ImportError) as err:
            raise click.ClickException(_one_line(err)) from err
        except Exception as err:  # a bug: still one line, with the way to the traceback
            if os.environ.get("FLOWRECON_DEBUG"):
                raise
            raise click.ClickException(
                f"internal error ({type(err).__name__}: {_one_line(err)}); set "
                "FLOWRECON_DEBUG=1 to see the traceback"
            ) from err

    return wrapper


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    # SIGTERM (a scheduler's kill, `timeout`) stops work the way Ctrl-C does: the best
    # model is kept and nothing half-written is left behind.
    raise KeyboardInterrupt


def _check_output_suffix(path: Path) -> None:
    from flowrecon.data import SUPPORTED_SUFFIXES

    if not path.name.lower().endswith(SUPPORTED_SUFFIXES):
        raise click.BadParameter(
            f"{path}: unsupported output format; use one of {', '.join(SUPPORTED_SUFFIXES)}",
            param_hint="--out",
        )


# -- options shared by several commands, each declared once ----------------------------------

_FILE = click.Path(dir_okay=False, path_type=Path)
_DIRECTORY = click.Path(file_okay=False, path_type=Path)
_SEED = click.IntRange(0, MAX_SEED)
_RUN_OPTION = click.option(
    "--run",
    "run_dir",
    type=_DIRECTORY,
    required=True,
    help="Run directory written by `flowrecon fit`.",
)
_SEED_OPTION = click.option("--seed", type=_SEED, default=0, show_default=True)
_DEVICE_OPTION = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu or cuda (auto: CUDA if present)."
)
_SAMPLES_OPTION = click.option(
    "--samples",
    type=click.IntRange(min=2),
    default=100,
    show_default=True,
    help="Posterior draws per event.",
)
_DROP_INVALID_OPTION = click.option(
    "--drop-invalid", is_flag=True, help="Drop rows with invalid values, reporting how many."
)
_OVERWRITE_OPTION = click.option(
    "--overwrite", is_flag=True, help="Replace an earlier output of the same kind at --out."
)
_QUIET_OPTION = click.option("--quiet", is_flag=True, help="No progress bar or summary.")
_SYSTEM_OPTION = click.option(
    "--system",
    "system_spec",
    default=None,
    metavar="NAME|FILE.py[:factory]",
    help="Physical system (`flowrecon systems`) or your own factory.",
)
_SET_OPTION = click.option(
    "--set",
    "set_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="A system option, repeatable (`flowrecon systems --details NAME`).",
)


def _data_option(help_text: str) -> Callable:
    """An optional ``--data`` file; only its help text differs between commands."""
    return click.option("--data", type=_FILE, default=None, help=help_text)


def _key_values(pairs: Sequence[str], option: str) -> dict[str, str]:
    """Parse repeated ``KEY=VALUE`` options."""
    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        out[key.strip()] = value.strip()
    return out


# -- system options and the system's own flags ----------------------------------------------


def _hooks(system: Any) -> dict[str, Callable | None]:
    return {"evaluate": system.evaluator, "sample": system.sampler}


def _flag_values(args: Sequence[str], flags: Mapping[str, str], is_bool: Callable) -> dict:
    """``--flag value``, ``--flag=value`` and boolean ``--flag`` -> option name -> text."""
    values: dict[str, str] = {}
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, sep, inline = arg.partition("=")
        if not flag.startswith("--"):
            raise click.UsageError(f"unexpected argument {arg!r}")
        if flag not in flags:
            from flowrecon.registry import did_you_mean

            hint = did_you_mean(flag, list(flags))
            raise click.UsageError(f"no such option: {flag}.{hint}")
        name = flags[flag]
        if sep:
            values[name] = inline
        elif is_bool(name):
            values[name] = "true"
        elif i + 1 < len(args):
            i += 1
            values[name] = args[i]
        else:
            raise click.UsageError(f"option {flag} requires a value")
        i += 1
    return values


def _is_bool(func: Callable | None, name: str) -> bool:
    from flowrecon.system import option_types

    return func is not None and option_types(func).get(name) is bool


def _route(
    system: Any,
    factory: Callable,
    values: Mapping[str, str],
    allowed: Sequence[str],
) -> dict[str, dict[str, str]]:
    """Sorts option values into the system's factory and its command hooks by name."""
    from flowrecon.system import option_types

    targets: dict[str, Callable | None] = {"system": factory, **_hooks(system)}
    routed: dict[str, dict[str, str]] = {k: {} for k in targets}
    for key, value in values.items():
        owners = [t for t, f in targets.items() if f is not None and key in option_types(f)]
        usable = [t for t in owners if t in allowed]
        if not usable:
            if owners:
                where = {"system": "fit, simulate and compare"}.get(owners[0], owners[0])
                raise click.UsageError(f"option {key!r} belongs to {where}, not to this command")
            valid = sorted({k for t in allowed if targets.get(t) for k in option_types(targets[t])})
            from flowrecon.registry import did_you_mean

            raise click.UsageError(
                f"unknown option {key!r} of system {system.name!r}.{did_you_mean(key, valid)} "
                f"Valid here: {', '.join(valid) or '(none)'}"
            )
        routed[usable[0]][key] = value
    return routed


def _system_values(
    spec: str | None,
    set_pairs: Sequence[str],
    extra: Sequence[str],
    allowed: Sequence[str],
    base: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, dict[str, Any]]]:
    """The system spec and its options (``--set``, its flags, a config's) by destination."""
    from flowrecon.system import DEFAULT_SYSTEM, get_factory, make_system

    spec = spec or DEFAULT_SYSTEM
    factory = get_factory(spec)
    system = make_system(spec)  # defaults: only to learn the flags and hooks
    flags = dict(system.cli_flags)

    def is_bool(name: str) -> bool:
        return any(_is_bool(f, name) for f in (factory, *_hooks(system).values()))

    values = {**_flag_values(extra, flags, is_bool), **_key_values(set_pairs, "--set")}
    routed = _route(system, factory, values, allowed)
    routed["system"] = {**dict(base or {}), **routed["system"]}
    return spec, routed


def _run_system_values(run_dir: Path, set_pairs, extra, command: str) -> dict[str, Any]:
    """A command's options for the system of an existing run."""
    from flowrecon.config import read_run_config
    from flowrecon.system import DEFAULT_SYSTEM

    config = read_run_config(run_dir)
    info = config.get("system") or {}
    spec = info.get("spec") or DEFAULT_SYSTEM
    _, routed = _system_values(spec, set_pairs, extra, [command])
    return routed[command]


# -- the commands ------------------------------------------------------------------------------


class _Group(click.Group):
    """The command group; a system's listings (`flowrecon.system.System.catalogues`, such
    as CEI's ``molecules``) are commands of their own, found when a name is not a command."""

    def invoke(self, ctx: click.Context) -> Any:
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate_as_interrupt)
        return super().invoke(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        catalogue = _catalogues().get(cmd_name)
        return None if catalogue is None else _catalogue_command(cmd_name, *catalogue)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_catalogues()})


def _catalogues() -> dict[str, tuple[str, Callable[[], list[dict[str, Any]]]]]:
    from flowrecon.system import available_catalogues

    try:
        return available_catalogues()
    except Exception:  # help and the other commands must work even if a system is broken
        return {}


def _catalogue_command(name: str, system: str, rows: Callable) -> click.Command:
    """A command that prints a system's listing as an aligned table."""
    import inspect

    title = (inspect.getdoc(rows) or f"{name} of system {system}").splitlines()[0]

    @_friendly_errors
    def callback() -> None:
        table = rows()
        if not table:
            click.echo(f"no {name}")
            return
        keys = list(table[0])
        cells = [[str(r.get(k, "")) for k in keys] for r in table]
        widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
        # The last column (usually a description) is not padded.
        click.echo("  ".join(k.ljust(w) for k, w in zip(keys, widths)).rstrip())
        for c in cells:
            click.echo("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())

    return click.Command(name, callback=callback, help=f"{title} (system {system}).")


def run() -> None:
    """The console entry point: SIGTERM acts as Ctrl-C, and an interrupt exits 130."""
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        main()
    except KeyboardInterrupt:
        click.echo("interrupted: nothing new was written", err=True)
        sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flowrecon")
def main() -> None:
    """Conditional generative models for inverse problems in physics.

    `flowrecon systems` lists the physical systems and their options; `--system NAME`
    chooses one (each command's help lists the default system's options).
    """


@main.command(cls=_SystemCommand)
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Number of rows.")
@click.option("--out", type=_FILE, required=True, help="Output file, .parquet or .csv.")
@click.option("--seed", type=_SEED, default=0, show_default=True, help="Random seed.")
@_SYSTEM_OPTION
@_SET_OPTION
@_DEVICE_OPTION
@_OVERWRITE_OPTION
@_QUIET_OPTION
@click.pass_context
@_friendly_errors
def simulate(
    ctx: click.Context,
    n: int,
    out: Path,
    seed: int,
    system_spec: str | None,
    set_pairs: tuple[str, ...],
    device: str,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Simulate a system and write targets and conditions to a data file."""
    from flowrecon.data import write_table
    from flowrecon.rundir import check_output_file
    from flowrecon.runs import resolve_system, simulate_data

    _check_output_suffix(out)
    spec, routed = _system_values(system_spec, set_pairs, ctx.args, ["system"])
    system, _ = resolve_system(spec, routed["system"])
    check_output_file(out, overwrite=overwrite)
    start = time.perf_counter()
    frame = simulate_data(system, n, seed=seed, progress=_show_progress(quiet), device=device)
    write_table(frame, out)
    if not quiet:
        click.echo(
            f"wrote {n} rows of {system.description} ({_describe(system.options)}) to {out} "
            f"in {time.perf_counter() - start:.1f} s"
        )
        if isinstance(frame.attrs.get("report"), str):  # the simulator's own diagnostics
            click.echo(frame.attrs["report"])


def _column_list(columns: Sequence[str], most: int = 12) -> str:
    """Column names, the middle of a long list elided (90 coordinates fill a screen)."""
    if len(columns) <= most:
        return ", ".join(columns)
    return f"{', '.join(columns[:6])}, ..., {', '.join(columns[-3:])} ({len(columns)} columns)"


def _describe(options: Mapping[str, Any]) -> str:
    """``name 2,2,2, other x``: options as a user would type them."""

    def text(v: Any) -> str:
        if isinstance(v, Mapping):  # e.g. a description kept whole: show its name
            return str(v.get("name", "{...}"))
        if isinstance(v, list | tuple):
            return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        return f"{v:g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k} {text(v)}" for k, v in options.items() if v is not None)


# Training options with their CLI names; None means "not given: use config or default".
_TRAINING_FLAGS = {
    "epochs": ("--epochs", click.IntRange(min=1), "Maximum number of epochs [default: 100]."),
    "batch_size": ("--batch-size", click.IntRange(min=1), "Rows per step [default: 256]."),
    "lr": ("--lr", click.FloatRange(min=0, min_open=True), "Adam learning rate [default: 1e-3]."),
    "patience": ("--patience", click.IntRange(min=0), "Early-stopping patience [default: 20]."),
    "min_delta": ("--min-delta", click.FloatRange(min=0), "Early-stopping min_delta [default: 0]."),
    "clip_grad": ("--clip-grad", click.FloatRange(min=0), "Gradient-norm clip [default: 5]."),
    "l1": ("--l1", click.FloatRange(min=0), "L1 penalty weight [default: 0]."),
    "l2": ("--l2", click.FloatRange(min=0), "L2 penalty weight [default: 0]."),
    "max_minutes": (
        "--max-minutes",
        click.FloatRange(min=0, min_open=True),
        "Wall-clock training budget in minutes.",
    ),
    "lr_schedule": (
        "--lr-schedule",
        click.Choice(["constant", "cosine", "plateau"]),
        "Learning-rate schedule; cosine anneals over the epochs or --max-minutes "
        "[default: constant].",
    ),
}


def _training_options(func: Callable) -> Callable:
    for name, (flag, kind, text) in reversed(list(_TRAINING_FLAGS.items())):
        func = click.option(flag, name, type=kind, default=None, help=text)(func)
    return func


def _physics_weights(pairs: Sequence[str], base: Mapping[str, Any]) -> dict[str, float]:
    weights = dict(base)
    for term, value in _key_values(pairs, "--physics-weight").items():
        try:
            weights[term] = float(value)
        except ValueError:
            raise click.BadParameter(
                f"weight of {term} must be a number, got {value!r}", param_hint="--physics-weight"
            ) from None
    return weights


def _config_checked(cfg: Any, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A config file's hparams and training options, checked with the file in messages."""
    from flowrecon.registry import coerce_hparams, resolve
    from flowrecon.runs import _training_options as check_training

    try:
        hparams = coerce_hparams(resolve(model)[0], cfg.hparams)
        training = check_training(cfg.training)
    except ValueError as err:
        raise click.ClickException(f"{cfg.source}: {_one_line(err)}") from None
    return hparams, training


@main.command(cls=_SystemCommand)
@click.option(
    "--model", "model", default=None, help="Model, preset or short name (`flowrecon models`)."
)
@_data_option("CSV or Parquet with the system's columns; default: its built-in simulated set.")
@click.option("--out", type=_DIRECTORY, default=None, help="Run directory [default: runs/MODEL].")
@click.option(
    "--config",
    "config_path",
    type=_FILE,
    default=None,
    help="TOML configuration; options given on the command line override it.",
)
@_training_options
@click.option(
    "--hparam",
    "hparam_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Model hyper-parameter, repeatable (`flowrecon models --details NAME`).",
)
@click.option(
    "--x-scaler", type=click.Choice(["standard", "minmax", "robust", "none"]), default=None
)
@click.option(
    "--y-scaler", type=click.Choice(["standard", "minmax", "robust", "none"]), default=None
)
@click.option(
    "--physics-weight",
    "physics_pairs",
    multiple=True,
    metavar="TERM=W",
    help="Weight of a physics loss term of the system, repeatable.",
)
@click.option(
    "--learned-prior/--no-learned-prior",
    default=True,
    show_default=True,
    help="Also learn the prior over targets from the training split (prior.pt).",
)
@_SYSTEM_OPTION
@_SET_OPTION
@click.option("--seed", type=_SEED, default=None, help="Seed of split, initialisation, batches.")
@click.option("--device", default=None, help="auto, cpu or cuda [default: auto].")
@_DROP_INVALID_OPTION
@_OVERWRITE_OPTION
@_QUIET_OPTION
@click.pass_context
@_friendly_errors
def fit(
    ctx: click.Context,
    model: str | None,
    data: Path | None,
    out: Path | None,
    config_path: Path | None,
    hparam_pairs: tuple[str, ...],
    x_scaler: str | None,
    y_scaler: str | None,
    physics_pairs: tuple[str, ...],
    learned_prior: bool,
    system_spec: str | None,
    set_pairs: tuple[str, ...],
    seed: int | None,
    device: str | None,
    drop_invalid: bool,
    overwrite: bool,
    quiet: bool,
    **training_flags: Any,
) -> None:
    """Fit a model (targets from conditions) and write a run directory."""
    from flowrecon.config import FitConfig, read_config_file
    from flowrecon.registry import coerce_hparams, resolve
    from flowrecon.runs import fit_run

    cfg = read_config_file(config_path) if config_path else FitConfig()
    model = model or cfg.model
    if not model:
        raise click.UsageError("give --model NAME (or [model] name in --config)")
    resolve(model)  # unknown model names fail before anything else
    spec, routed = _system_values(
        system_spec or cfg.system, set_pairs, ctx.args, ["system"], base=cfg.system_options
    )
    hparams, training = _config_checked(cfg, model)
    hparams.update(coerce_hparams(resolve(model)[0], _key_values(hparam_pairs, "--hparam")))
    training.update({k: v for k, v in training_flags.items() if v is not None})
    preprocessing = dict(cfg.preprocessing)
    preprocessing.update({k: v for k, v in (("x_scaler", x_scaler), ("y_scaler", y_scaler)) if v})
    out = out or Path("runs") / model
    start = time.perf_counter()
    run = fit_run(
        model,
        out,
        system=spec,
        system_options=routed["system"],
        data=data or cfg.data,
        hparams=hparams,
        training=training,
        preprocessing=preprocessing,
        physics_weights=_physics_weights(physics_pairs, cfg.physics_weights),
        seed=seed if seed is not None else (cfg.seed or 0),
        device=device or cfg.device or "auto",
        drop_invalid=drop_invalid,
        overwrite=overwrite,
        quiet=quiet,
        progress=_show_progress(quiet),
        learned_prior=learned_prior,
    )
    result = run.config["result"]
    if not quiet:
        how = "calibrated on the validation split"
        if not run.config.get("fit_options", {}).get("calibrate", True):
            how = f"not calibrated: system {run.config['system']['name']} fits without it"
        click.echo(
            # Training time apart from the whole: the condition density, the learned prior
            # and calibration follow the training budget (--max-minutes) and add to it.
            f"{model}: {result['epochs']} epochs in {result['seconds']:.0f} s of training "
            f"({result['stopped']}; {time.perf_counter() - start:.0f} s in all), best "
            f"validation loss {result['best_val_loss']:.4g} "
            f"at epoch {result['best_epoch']}; sampling temperature "
            f"{result['temperature']:.3g} ({how})"
        )
        prior = ", prior.pt (the learned prior)" if run.prior is not None else ""
        click.echo(f"wrote {out}/model.pt{prior}, config.json, history.csv and learning curves")
        if result.get("message"):
            click.echo(result["message"])
    if run.interrupted:
        raise Interrupted(
            f"kept the best model (epoch {result['best_epoch']}) as a complete run in {out}, "
            "marked stopped: interrupted in config.json"
        )


@main.command()
@click.option(
    "--details", "details", default=None, metavar="NAME", help="Hyper-parameters of one model."
)
def models(details: str | None) -> None:
    """List the models and presets, their backends and whether each is installed."""
    from flowrecon.registry import available_models, available_presets, describe_model

    if details:
        try:
            info = describe_model(details)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        click.echo(f"{info['name']}: {info.get('description', '')}")
        for key, value in info.items():
            if key not in {"description", "name", "hparams"}:
                click.echo(f"  {key}: {value}")
        click.echo("  hyper-parameters (--hparam KEY=VALUE):")
        for key, spec in info.get("hparams", {}).items():
            click.echo(f"    {key} ({spec['type']}, default {spec['default']!r})")
        return
    rows = available_models()
    presets = available_presets()
    width = max(len(r["name"]) for r in [*rows, *presets]) + 2
    aliases = [", ".join(r["aliases"]) for r in rows]
    short = max(len("short names"), *(len(a) for a in aliases)) + 2
    click.echo(
        f"{'model':<{width}}{'short names':<{short}}{'backend':<10}{'installed':<11}"
        f"{'density':<9}description"
    )
    for r, alias in zip(rows, aliases):
        click.echo(
            f"{r['name']:<{width}}{alias:<{short}}{r['backend']:<10}"
            f"{'yes' if r['installed'] else 'no':<11}"
            f"{'yes' if r.get('has_density', True) else 'no':<9}{r['description']}"
        )
    if presets:
        click.echo("\npresets (use like a model name):")
        for p in presets:
            click.echo(f"  {p['name']:<{width}}{p['description']}")


def _describe_options(title: str, func: Callable | None, flags: Mapping[str, str]) -> list[str]:
    import inspect

    from flowrecon.registry import type_name
    from flowrecon.system import option_types

    if func is None:
        return []
    types_ = option_types(func)
    if not types_:
        return []
    params = inspect.signature(func).parameters
    by_option = {name: flag for flag, name in flags.items()}
    lines = [f"  {title}:"]
    for key, kind in types_.items():
        flag = f", {by_option[key]}" if key in by_option else ""
        lines.append(
            f"    --set {key}=...{flag}  ({type_name(kind)}, default {params[key].default!r})"
        )
    return lines


@main.command()
@click.option(
    "--details", "details", default=None, metavar="NAME|FILE.py", help="Options of one system."
)
@_friendly_errors
def systems(details: str | None) -> None:
    """List the physical systems and their options."""
    from flowrecon.system import available_systems, get_factory, make_system

    if not details:
        rows = available_systems()
        width = max((len(r["name"]) for r in rows), default=4) + 2
        for r in rows:
            click.echo(f"{r['name']:<{width}}{r['description']}")
        click.echo("\n`flowrecon systems --details NAME` lists a system's options.")
        return
    system = make_system(details)
    factory = get_factory(details)
    click.echo(f"{system.name}: {system.description}")
    click.echo(f"  targets x ({system.x_unit}): {_column_list(system.x_columns)}")
    click.echo(f"  conditions y ({system.y_unit}): {_column_list(system.y_columns)}")
    if system.fit_options:
        click.echo(f"  fit uses: {_describe(system.fit_options)}")
    flags = system.cli_flags
    for title, func in (
        ("system options (simulate, fit, compare)", factory),
        ("evaluate options", system.evaluator),
        ("sample options", system.sampler),
    ):
        for line in _describe_options(title, func, flags):
            click.echo(line)


@main.command(cls=_SystemCommand, hooks=("evaluate",))
@_RUN_OPTION
@_data_option("Test data with the system's columns [default: the run's held-out test split].")
@_SAMPLES_OPTION
@click.option(
    "--out", type=_DIRECTORY, default=None, help="Output directory [default: RUN/evaluation]."
)
@click.option(
    "--max-events", type=click.IntRange(min=1), default=None, help="Evaluate at most N events."
)
@_SET_OPTION
@_SEED_OPTION
@_DEVICE_OPTION
@_DROP_INVALID_OPTION
@_OVERWRITE_OPTION
@click.option("--quiet", is_flag=True, help="No progress bar or printed tables.")
@click.pass_context
@_friendly_errors
def evaluate(
    ctx: click.Context,
    run_dir: Path,
    data: Path | None,
    samples: int,
    out: Path | None,
    max_events: int | None,
    set_pairs: tuple[str, ...],
    seed: int,
    device: str,
    drop_invalid: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Evaluate a fitted run: metrics.json, figures and report.md (conditions in)."""
    from flowrecon.runs import evaluate_run

    options = _run_system_values(run_dir, set_pairs, ctx.args, "evaluate")
    result = evaluate_run(
        run_dir,
        data,
        samples=samples,
        out=out,
        max_events=max_events,
        seed=seed,
        device=device,
        drop_invalid=drop_invalid,
        overwrite=overwrite,
        progress=_show_progress(quiet),
        options=options,
    )
    if not quiet:
        click.echo(f"evaluated {result.events}")
        click.echo(result.table)
        if result.examples:
            click.echo("\nRandom test events:\n" + result.examples)
        click.echo(f"\nwrote {result.out / 'metrics.json'}, report.md and figures")


@main.command(cls=_SystemCommand, hooks=("sample",))
@_RUN_OPTION
@click.option(
    "--data",
    type=_FILE,
    required=True,
    help="CSV or Parquet with the condition columns (targets not needed).",
)
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Samples per event.",
)
@click.option(
    "--out",
    type=_FILE,
    required=True,
    help="Output .parquet or .csv: columns event, sample and the targets.",
)
@_SET_OPTION
@_SEED_OPTION
@_DEVICE_OPTION
@_DROP_INVALID_OPTION
@_OVERWRITE_OPTION
@click.option("--quiet", is_flag=True)
@click.pass_context
@_friendly_errors
def sample(
    ctx: click.Context,
    run_dir: Path,
    data: Path,
    n: int,
    out: Path,
    set_pairs: tuple[str, ...],
    seed: int,
    device: str,
    drop_invalid: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Draw posterior samples of the targets for every row of a file of conditions.

    The `event` column is the row's number in --data (0-based data rows).
    """
    from flowrecon.runs import sample_run

    _check_output_suffix(out)
    options = _run_system_values(run_dir, set_pairs, ctx.args, "sample")
    rows = sample_run(
        run_dir,
        data,
        out,
        n=n,
        seed=seed,
        device=device,
        drop_invalid=drop_invalid,
        overwrite=overwrite,
        options=options,
    )
    if not quiet:
        click.echo(f"wrote {rows} rows ({n} samples an event) to {out}")


@main.command(cls=_SystemCommand, hooks=("system", "evaluate"))
@click.argument("names", nargs=-1, required=True)
@_data_option("CSV or Parquet; default: the system's built-in simulated set.")
@click.option("--out", type=_DIRECTORY, default=Path("runs/compare"), show_default=True)
@_training_options
@_SAMPLES_OPTION
@_SYSTEM_OPTION
@_SET_OPTION
@_SEED_OPTION
@_DEVICE_OPTION
@_OVERWRITE_OPTION
@click.option("--quiet", is_flag=True)
@click.pass_context
@_friendly_errors
def compare(
    ctx: click.Context,
    names: tuple[str, ...],
    data: Path | None,
    out: Path,
    samples: int,
    system_spec: str | None,
    set_pairs: tuple[str, ...],
    seed: int,
    device: str,
    overwrite: bool,
    quiet: bool,
    **training_flags: Any,
) -> None:
    """Train every named model on the same split and budget, evaluate all alike, tabulate."""
    from flowrecon.runs import compare_runs

    # A system's own flags after the names (`compare nsf maf --molecule so2`) reach the
    # names argument, which takes unknown options as values: they go to the system.
    cut = next((i for i, name in enumerate(names) if name.startswith("-")), len(names))
    names, extra = names[:cut], [*names[cut:], *ctx.args]
    if not names:
        raise click.UsageError("give the models to compare before the options")
    spec, routed = _system_values(system_spec, set_pairs, extra, ["system", "evaluate"])
    training = {k: v for k, v in training_flags.items() if v is not None}
    compare_runs(
        list(names),
        out,
        system=spec,
        system_options=routed["system"],
        data=data,
        training=training,
        samples=samples,
        seed=seed,
        device=device,
        overwrite=overwrite,
        quiet=quiet,
        progress=_show_progress(quiet),
        options=routed["evaluate"],
    )
    if not quiet:
        click.echo((out / "comparison.md").read_text())
        click.echo(f"wrote {out}/comparison.csv, comparison.md, calibration.png, comparison.png")


@main.command(cls=_SystemCommand)
@click.option("--model", "model", default=None, help="Model to tune (`flowrecon models`).")
@_data_option("CSV or Parquet with the system's columns; default: its built-in simulated set.")
@click.option(
    "--out",
    type=_DIRECTORY,
    required=True,
    help="Study directory: study.db, best.toml, trials.csv, figures, summary.txt.",
)
@click.option(
    "--config",
    "config_path",
    type=_FILE,
    default=None,
    help="TOML: [search] overrides of the search space; fixed [hparams], [training].",
)
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=None,
    help="Total trials of the study, over all its workers and runs.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds this command searches (no trial starts after it).",
)
@click.option(
    "--max-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Training budget of each trial, in minutes.",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=None, help="Maximum epochs of each trial."
)
@click.option(
    "--metric",
    default="val_loss",
    show_default=True,
    help="val_loss, or the system's error name (e.g. ade) on the validation rows.",
)
@click.option("--sampler", type=click.Choice(["tpe", "random"]), default="tpe", show_default=True)
@click.option(
    "--pruner",
    type=click.Choice(["median", "hyperband", "none"]),
    default="median",
    show_default=True,
)
@click.option(
    "--storage",
    default=None,
    metavar="URL|FILE",
    help="postgresql://user@host/db shared by many machines [default: OUT/study.db].",
)
@click.option("--study", default=None, help="Study name on the storage [default: the model].")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Local worker processes sharing the storage.",
)
@_SYSTEM_OPTION
@_SET_OPTION
@_SEED_OPTION
@click.option("--device", default="auto", show_default=True)
@_DROP_INVALID_OPTION
@_QUIET_OPTION
@click.pass_context
@_friendly_errors
def tune(
    ctx: click.Context,
    model: str | None,
    data: Path | None,
    out: Path,
    config_path: Path | None,
    trials: int | None,
    timeout: float | None,
    max_minutes: float | None,
    epochs: int | None,
    metric: str,
    sampler: str,
    pruner: str,
    storage: str | None,
    study: str | None,
    workers: int,
    system_spec: str | None,
    set_pairs: tuple[str, ...],
    seed: int,
    device: str,
    drop_invalid: bool,
    quiet: bool,
) -> None:
    """Search a model's hyper-parameters with Optuna; write best.toml for `fit --config`.

    Every worker, on any machine, runs the same command with the same --storage and
    --study; re-running it resumes the study. The test rows of the split stay untouched.
    """
    from flowrecon.config import FitConfig, read_config_file
    from flowrecon.runs import tune_run

    cfg = read_config_file(config_path) if config_path else FitConfig()
    model = model or cfg.model
    if not model:
        raise click.UsageError("give --model NAME (or [model] name in --config)")
    spec, routed = _system_values(
        system_spec or cfg.system, set_pairs, ctx.args, ["system"], base=cfg.system_options
    )
    hparams, training = _config_checked(cfg, model)
    if epochs is not None:
        training["epochs"] = epochs
    generator = {**cfg.preprocessing, "device": device}
    try:
        result = tune_run(
            model,
            out,
            system=spec,
            system_options=routed["system"],
            data=data or cfg.data,
            metric=metric,
            seed=seed,
            drop_invalid=drop_invalid,
            progress=not quiet,
            trials=trials,
            timeout=timeout,
            max_minutes_per_trial=max_minutes,
            sampler=sampler,
            pruner=pruner,
            storage=storage,
            study=study,
            workers=workers,
            search=cfg.search or None,
            hparams=hparams,
            training=training,
            generator_options=generator,
        )
    except KeyboardInterrupt:
        summary = out / "summary.txt"
        if summary.is_file() and not quiet:
            click.echo(summary.read_text())
        raise Interrupted(
            f"the study in {out} is consistent; run the same command to resume"
        ) from None
    if not quiet:
        click.echo(result.summary)
