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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flowrecon")
def main() -> None:
    """Conditional generative models for Coulomb explosion imaging (CEI) of OCS."""


@main.command()
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Number of events.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Output file, .parquet or .csv.",
)
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
