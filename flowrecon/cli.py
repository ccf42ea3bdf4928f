"""The ``flowrecon`` command line: a thin layer over the library.

Every command exits non-zero with a one-line reason on bad input; long work shows a
progress bar unless ``--quiet`` is given or stderr is not a terminal.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from flowrecon.data import SUPPORTED_SUFFIXES, DataError


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _friendly_errors(func: Callable) -> Callable:
    """Turn the library's input errors into one-line click errors (exit code 2 or 1)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (DataError, ValueError, FileNotFoundError) as err:
            raise click.ClickException(str(err).splitlines()[0] if str(err) else repr(err)) from err
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None

    return wrapper


def _check_output_suffix(path: Path) -> None:
    name = path.name.lower()
    if not any(name.endswith(s) for s in SUPPORTED_SUFFIXES):
        raise click.BadParameter(
            f"{path}: unsupported output format; use one of {', '.join(SUPPORTED_SUFFIXES)}",
            param_hint="--out",
        )


# Path types and options shared by several commands, each declared once.
_FILE = click.Path(dir_okay=False, path_type=Path)
_DIRECTORY = click.Path(file_okay=False, path_type=Path)
_RUN_OPTION = click.option(
    "--run",
    "run_dir",
    type=_DIRECTORY,
    required=True,
    help="Run directory written by `flowrecon fit`.",
)
_SEED_OPTION = click.option("--seed", type=int, default=0, show_default=True)
_DEVICE_OPTION = click.option("--device", default="auto", show_default=True)
_SAMPLES_OPTION = click.option(
    "--samples", type=click.IntRange(min=2), default=100, show_default=True
)
_DROP_INVALID_OPTION = click.option(
    "--drop-invalid", is_flag=True, help="Drop rows with invalid values, reporting how many."
)


def _data_option(help_text: str) -> Callable:
    """An optional ``--data`` file of events; only its help text differs between commands."""
    return click.option("--data", type=_FILE, default=None, help=help_text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flowrecon")
def main() -> None:
    """Conditional generative models for Coulomb explosion imaging (CEI) of OCS."""


@main.command()
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Number of events.")
@click.option("--out", type=_FILE, required=True, help="Output file, .parquet or .csv.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--geometry",
    type=click.Choice(["ocs", "ball"]),
    default="ocs",
    show_default=True,
    help="ocs: near-linear OCS with vibrational spread; ball: atoms anywhere in a 4 bohr ball.",
)
@click.option(
    "--charges", default="2,2,2", show_default=True, help="Ion charges of C,O,S (channel)."
)
@click.option(
    "--momentum-noise",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Relative detector momentum resolution (0.01 = 1 %).",
)
@click.option(
    "--device", default="auto", show_default=True, help="auto, cpu or cuda (auto: CUDA if present)."
)
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@_friendly_errors
def simulate(
    n: int,
    out: Path,
    seed: int,
    geometry: str,
    charges: str,
    momentum_noise: float,
    device: str,
    quiet: bool,
) -> None:
    """Simulate Coulomb explosions and write positions and momenta to a data file."""
    from flowrecon.systems.cei.data import save_events
    from flowrecon.systems.cei.geometry import simulate_events
    from flowrecon.systems.cei.physics import parse_charges

    _check_output_suffix(out)
    charge_values = parse_charges(charges)
    start = time.perf_counter()
    events = simulate_events(
        n,
        seed=seed,
        geometry=geometry,
        charges=charge_values,
        momentum_noise=momentum_noise,
        device=device,
        progress=_show_progress(quiet),
    )
    save_events(out, events.positions, events.momenta)
    if not quiet:
        elapsed = time.perf_counter() - start
        click.echo(
            f"wrote {len(events)} {geometry} events (charges {charges}, noise {momentum_noise}) "
            f"to {out} in {elapsed:.1f} s"
        )


def _key_values(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    """Parse repeated ``KEY=VALUE`` options."""
    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        out[key.strip()] = value.strip()
    return out


# Training options with their CLI names; None means "not given: use config or default".
_TRAINING_FLAGS = {
    "epochs": ("--epochs", click.IntRange(min=0), "Maximum number of epochs [default: 100]."),
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


@main.command()
@click.option(
    "--model", "model", default=None, help="Model or preset name (see `flowrecon models`)."
)
@_data_option("CSV or Parquet with positions and momenta; default: the built-in simulated OCS set.")
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
    help="Model hyper-parameter, repeatable (see `flowrecon models --details NAME`).",
)
@click.option(
    "--frame",
    type=click.Choice(["momentum", "lab"]),
    default=None,
    help="Model in the frame built from the momenta (default) or in the lab frame.",
)
@click.option(
    "--x-scaler", type=click.Choice(["standard", "minmax", "robust", "none"]), default=None
)
@click.option(
    "--y-scaler", type=click.Choice(["standard", "minmax", "robust", "none"]), default=None
)
@click.option(
    "--charges", default=None, help="Ion charges C,O,S for physics terms [default: 2,2,2]."
)
@click.option(
    "--physics-weight",
    "physics_pairs",
    multiple=True,
    metavar="TERM=W",
    help="Physics loss term weight: energy_diff2=W or rel_err2=W (repeatable).",
)
@click.option("--seed", type=int, default=None, help="Seed of split, initialisation, batches.")
@click.option("--device", default=None, help="auto, cpu or cuda [default: auto].")
@_DROP_INVALID_OPTION
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@_friendly_errors
def fit(
    model: str | None,
    data: Path | None,
    out: Path | None,
    config_path: Path | None,
    hparam_pairs: tuple[str, ...],
    frame: str | None,
    x_scaler: str | None,
    y_scaler: str | None,
    charges: str | None,
    physics_pairs: tuple[str, ...],
    seed: int | None,
    device: str | None,
    drop_invalid: bool,
    quiet: bool,
    **training_flags,
) -> None:
    """Fit a model on CEI data (positions from momenta) and write a run directory."""
    from flowrecon.registry import coerce_hparams, resolve
    from flowrecon.systems.cei.physics import parse_charges
    from flowrecon.systems.cei.workflow import fit_run, read_config_file

    config = read_config_file(config_path) if config_path else {}
    model = model or config.get("model", {}).get("name")
    if not model:
        raise click.UsageError("give --model NAME (or [model] name in --config)")
    resolve(model)  # unknown model names fail before anything else
    prep = config.get("preprocessing", {})
    physics = config.get("physics", {})
    hparams = dict(config.get("hparams", {}))
    hparams.update(coerce_hparams(resolve(model)[0], _key_values(hparam_pairs, "--hparam")))
    training = dict(config.get("training", {}))
    training.update({k: v for k, v in training_flags.items() if v is not None})
    weights = dict(physics.get("weights", {}))
    for term, value in _key_values(physics_pairs, "--physics-weight").items():
        try:
            weights[term] = float(value)
        except ValueError:
            raise click.BadParameter(
                f"weight of {term} must be a number, got {value!r}", param_hint="--physics-weight"
            ) from None
    charge_text = charges or physics.get("charges") or "2,2,2"
    if not isinstance(charge_text, str):
        charge_text = ",".join(str(c) for c in charge_text)
    data = data or (Path(config["data"]["path"]) if config.get("data", {}).get("path") else None)
    if data is not None and not Path(data).is_file():
        raise click.ClickException(f"{data}: no such data file")
    out = out or Path("runs") / model
    show = _show_progress(quiet)
    start = time.perf_counter()
    run = fit_run(
        model,
        out,
        data=data,
        hparams=hparams,
        training=training,
        frame=frame or prep.get("frame", "momentum"),
        x_scaler=x_scaler or prep.get("x_scaler", "standard"),
        y_scaler=y_scaler or prep.get("y_scaler", "standard"),
        charges=parse_charges(charge_text),
        physics_weights=weights,
        seed=seed if seed is not None else int(config.get("seed", 0)),
        device=device or config.get("device", "auto"),
        drop_invalid=drop_invalid,
        quiet=quiet,
        progress=show,
    )
    if not quiet:
        result = run.config["result"]
        click.echo(
            f"{model}: {result['epochs']} epochs in {time.perf_counter() - start:.0f} s "
            f"({result['stopped']}), best validation loss {result['best_val_loss']:.4g} "
            f"at epoch {result['best_epoch']}; sampling temperature "
            f"{result['temperature']:.3g} (calibrated on the validation split)"
        )
        click.echo(f"wrote {out}/model.pt, config.json, history.csv and learning curves")
        if result.get("message"):
            click.echo(result["message"])


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
        click.echo(f"{details}: {info.get('description', '')}")
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


@main.command()
@_RUN_OPTION
@_data_option("Test data with positions and momenta [default: the run's own held-out test split].")
@_SAMPLES_OPTION
@click.option(
    "--out", type=_DIRECTORY, default=None, help="Output directory [default: the run directory]."
)
@click.option(
    "--max-events", type=click.IntRange(min=1), default=None, help="Evaluate at most N events."
)
@_SEED_OPTION
@_DEVICE_OPTION
@_DROP_INVALID_OPTION
@click.option(
    "--refine",
    is_flag=True,
    help="Also refine posterior samples through the simulator; report refined metrics too.",
)
@click.option(
    "--refine-samples",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Samples per event that --refine refines.",
)
@click.option(
    "--weights",
    is_flag=True,
    help="Also importance-weight the samples by the noise model and prior; weighted coverage.",
)
@click.option(
    "--noise",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Relative momentum resolution for --weights [default: the built-in data set's].",
)
@click.option(
    "--prior",
    type=click.Choice(["ocs", "flat"]),
    default=None,
    help="Geometry prior for --weights, and for --refine to choose among several exact "
    "solutions (ocs) [default: ocs for the built-in data, else flat].",
)
@click.option("--quiet", is_flag=True, help="No progress bar or printed tables.")
@_friendly_errors
def evaluate(
    run_dir: Path,
    data: Path | None,
    samples: int,
    out: Path | None,
    max_events: int | None,
    seed: int,
    device: str,
    drop_invalid: bool,
    refine: bool,
    refine_samples: int,
    weights: bool,
    noise: float | None,
    prior: str | None,
    quiet: bool,
) -> None:
    """Evaluate a fitted run: metrics.json, figures and report.md (momenta in, positions out)."""
    from flowrecon.systems.cei.workflow import evaluate_run

    result = evaluate_run(
        run_dir,
        data,
        samples=samples,
        out=out,
        max_events=max_events,
        seed=seed,
        device=device,
        drop_invalid=drop_invalid,
        progress=_show_progress(quiet),
        refine=refine,
        refine_samples=refine_samples,
        weights=weights,
        noise=noise,
        prior=prior,
    )
    if not quiet:
        click.echo(f"evaluated {result.events}")
        click.echo(result.table)
        if result.examples:
            click.echo("\nRandom test events:\n" + result.examples)
        click.echo(f"\nwrote {result.out / 'metrics.json'}, report.md and figures")


@main.command()
@_RUN_OPTION
@click.option(
    "--data",
    type=_FILE,
    required=True,
    help="CSV or Parquet with the momentum columns (positions not needed).",
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
    help="Output .parquet or .csv: columns event, sample, cx ... sz.",
)
@_SEED_OPTION
@_DEVICE_OPTION
@_DROP_INVALID_OPTION
@click.option(
    "--refine",
    is_flag=True,
    help="Refine every sample through the simulator; adds residual, converged, solution.",
)
@click.option("--quiet", is_flag=True)
@_friendly_errors
def sample(
    run_dir: Path,
    data: Path,
    n: int,
    out: Path,
    seed: int,
    device: str,
    drop_invalid: bool,
    refine: bool,
    quiet: bool,
) -> None:
    """Draw posterior samples of the positions for every event of a momenta file."""
    from flowrecon.systems.cei.workflow import sample_run

    _check_output_suffix(out)
    rows = sample_run(
        run_dir, data, out, n=n, seed=seed, device=device, drop_invalid=drop_invalid, refine=refine
    )
    if not quiet:
        click.echo(f"wrote {rows} rows ({n} samples an event) to {out}")


@main.command()
@click.argument("names", nargs=-1, required=True)
@_data_option("CSV or Parquet; default: the built-in simulated OCS set.")
@click.option("--out", type=_DIRECTORY, default=Path("runs/compare"), show_default=True)
@_training_options
@_SAMPLES_OPTION
@click.option(
    "--frame", type=click.Choice(["momentum", "lab"]), default="momentum", show_default=True
)
@_SEED_OPTION
@_DEVICE_OPTION
@click.option("--quiet", is_flag=True)
@_friendly_errors
def compare(
    names: tuple[str, ...],
    data: Path | None,
    out: Path,
    samples: int,
    frame: str,
    seed: int,
    device: str,
    quiet: bool,
    **training_flags,
) -> None:
    """Train every named model on the same split and budget, evaluate all alike, tabulate."""
    from flowrecon.systems.cei.workflow import compare_runs

    if data is not None and not data.is_file():
        raise click.ClickException(f"{data}: no such data file")
    training = {k: v for k, v in training_flags.items() if v is not None}
    table = compare_runs(
        list(names),
        out,
        data=data,
        training=training,
        samples=samples,
        seed=seed,
        device=device,
        frame=frame,
        quiet=quiet,
        progress=_show_progress(quiet),
    )
    if not quiet:
        click.echo((out / "comparison.md").read_text())
        click.echo(f"wrote {out}/comparison.csv, comparison.md, calibration.png, comparison.png")
    del table
