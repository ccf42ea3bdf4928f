"""Lennard-Jones fluid under gravity: Metropolis data, canonical order, physics evaluation.

N identical particles (default 30) in the closed box [0, L]^D (default L = 5, D = 3),
reduced units sigma = epsilon = m = 1, potential energy
U = 4 sum_{i<j} (r^-12 - r^-6) + 4 gamma sum_i h_i with the height h the last
coordinate (z in 3-D, y in 2-D) and gamma = m g sigma / (4 epsilon); no cutoff. The
models learn p(configuration | gamma, T):

- x: the coordinates ``x0 y0 z0 x1 ...`` with the particles in canonical order (sorted by
  height, `flowrecon.systems.lj.geometry` explains the N! factor in densities);
- y: ``gamma`` and ``temperature``.

Data come from the batched Metropolis sampler (`flowrecon.systems.lj.sampler`: the
correct acceptance min(1, exp(-dU / T)), where the source study had it inverted;
reflecting walls; tuned steps; equilibration and autocorrelation measured), splits keep
Markov chains whole, and the evaluation compares generated configurations with held-out
Monte Carlo condition by condition (`flowrecon.systems.lj.evaluation`).

Example:
    >>> system = make_system(n_particles=4, box=3.0, gamma=(0.5,))
    >>> system.x_columns[:4], system.y_columns
    (('x0', 'y0', 'z0', 'x1'), ('gamma', 'temperature'))
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from flowrecon.system import EvaluationContext, System
from flowrecon.systems.lj import data, losses
from flowrecon.systems.lj.evaluation import METRIC_INFO, LJEvaluator, height_rmse
from flowrecon.systems.lj.geometry import canonical_order, in_canonical_order
from flowrecon.systems.lj.latent import ANOMALY_NOISE
from flowrecon.systems.lj.physics import min_pair_distance
from flowrecon.systems.lj.sampler import LATTICE_MIN_SPACING, relax
from flowrecon.systems.lj.transform import box_transform_name, chamber_transform_name

__all__ = ["FIT_OPTIONS", "make_system"]

#: What ``fit`` leaves out for this system, and why. A sampling temperature calibrated to
#: per-coordinate coverage would rescale the model's Boltzmann distribution (at T' != 1 a
#: flow's draws are no longer configurations at the simulated temperature); the
#: conditions are a design grid, not measurements: a density over three gamma values is
#: three spikes that would flag every gamma between them, the interpolation asked for;
#: and the system's transform already keeps every draw inside the box, so a draw far out
#: in model space (a particle pressed to a wall) is a configuration to judge, not a
#: runaway to redraw (a model trained with the overlap term drew 97 % of its
#: configurations outside the training region, and the guard would have hidden them).
FIT_OPTIONS: dict[str, Any] = {"calibrate": False, "condition_density": False, "support": False}

#: Orders of the particles in x: sorted by height, or as simulated (labelled).
ORDERS = ("height", "none")

#: Maps of ordered configurations onto R^(N D) (`flowrecon.systems.lj.transform`).
REPRESENTATIONS = {"box": box_transform_name, "chamber": chamber_transform_name}


def make_system(
    *,
    n_particles: int = 30,
    box: float = 5.0,
    dim: int = 3,
    gamma: tuple[float, ...] = (0.05, 0.25, 1.0),
    temperature: tuple[float, ...] = (1.5,),
    order: str = "height",
    representation: str = "box",
    augment: bool = True,
    chains: int = 0,
    thin: float = 2.0,
    target_acceptance: float = 0.4,
    dtype: str = "float64",
) -> System:
    """Lennard-Jones fluid under gravity in a closed box: configurations given (gamma, T).

    Args:
        n_particles: N.
        box: Side L of the box (sigma).
        dim: 2 or 3 (gravity along the last axis: y in 2-D, z in 3-D). The 2-D variant
            needs a larger box than the default: 30 discs in a 5 x 5 square would be
            denser than close packing (e.g. ``box=8``, area density 0.47).
        gamma: Gravity values of the simulated grid.
        temperature: Temperatures of the simulated grid (epsilon / k_B).
        order: ``"height"`` (canonical order, default) or ``"none"`` (the simulated,
            labelled order: the source study's raw coordinates).
        representation: How the models see ordered configurations: ``"box"`` (each
            coordinate through logit(c / L), default) or ``"chamber"`` (heights by
            stick-breaking, so draws are always in order, but a fitted model puts the
            particles too high: `flowrecon.systems.lj.transform`).
        augment: Train on every configuration and its images under the box's
            horizontal symmetries (8 in 3-D, 2 in 2-D; `data.symmetric_copies`): without
            them a coupling flow overfits 21,000 training configurations within tens of
            epochs (held-out NLL rising while the training NLL falls).
        chains: Markov chains per condition in simulations (0: automatic).
        thin: Saved configurations are ``thin`` autocorrelation times apart.
        target_acceptance: Acceptance the Metropolis step is tuned to.
        dtype: ``"float64"`` or ``"float32"`` in the sampler.
    """
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if int(n_particles) < 2 or not (math.isfinite(box) and box > 0):
        raise ValueError(f"need n_particles >= 2 and box > 0, got {n_particles} and {box}")
    if representation not in REPRESENTATIONS:
        raise ValueError(
            f"representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}"
        )
    gamma, temperature = tuple(float(g) for g in gamma), tuple(float(t) for t in temperature)
    data.condition_grid(gamma, temperature)  # raises on an empty grid
    if any(t <= 0 for t in temperature):
        raise ValueError(f"temperatures must be positive, got {temperature}")
    count, ordered = int(n_particles), order == "height"
    per_side = int(box / LATTICE_MIN_SPACING)
    if per_side**dim < count:  # the sampler's starting lattice: fail now, not in simulate
        raise ValueError(
            f"{count} particles do not fit in a {dim}-D box of side {box:g} (at most "
            f"{per_side**dim} at spacing {LATTICE_MIN_SPACING}); in 2-D try box="
            f"{math.ceil(LATTICE_MIN_SPACING * math.ceil(math.sqrt(count)) + 1)} or more"
        )

    def simulate(
        n: int, *, seed: int = 0, progress: bool = False, device: str = "auto"
    ) -> pd.DataFrame:
        return data.simulate(
            n,
            seed=seed,
            progress=progress,
            device=device,
            n_particles=count,
            box=box,
            dim=dim,
            gamma=gamma,
            temperature=temperature,
            chains=chains,
            thin=thin,
            target_acceptance=target_acceptance,
            dtype=dtype,
        )

    def prepare(table: pd.DataFrame) -> pd.DataFrame:
        return data.prepare(table, count, dim) if ordered else table

    def event_error(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
        return height_rmse(pred, truth, dim)

    def evaluator(
        context: EvaluationContext,
        *,
        max_per_condition: int = 20_000,
        reweight_samples: int = 5_000,
        bins: int = 20,
        overlap: float = 0.8,
        relax_sweeps: int = 0,
        latent_rows: int = 3000,
        anomaly_rows: int = 2000,
        anomaly_noise: float = ANOMALY_NOISE,
    ) -> LJEvaluator:
        return LJEvaluator(
            context,
            n_particles=count,
            box=box,
            dim=dim,
            ordered=ordered,
            max_per_condition=max_per_condition,
            reweight_samples=reweight_samples,
            bins=bins,
            overlap=overlap,
            relax_sweeps=relax_sweeps,
            latent_rows=latent_rows,
            anomaly_rows=anomaly_rows,
            anomaly_noise=anomaly_noise,
        )

    def symmetric(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return data.symmetric_copies(x, y, count, dim, box)

    def sampler(
        context: EvaluationContext, samples: np.ndarray, *, relax_sweeps: int = 0
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return _sampled(context, samples, relax_sweeps, count, dim, box, ordered)

    options: dict[str, Any] = {
        "n_particles": count,
        "box": float(box),
        "dim": int(dim),
        "gamma": list(gamma),
        "temperature": list(temperature),
        "order": order,
        "representation": representation,
        "augment": bool(augment),
        "chains": int(chains),
        "thin": float(thin),
        "target_acceptance": float(target_acceptance),
        "dtype": dtype,
    }
    return System(
        name="lj",
        description="Lennard-Jones fluid under gravity in a closed box: configurations given "
        "(gamma, T)",
        x_columns=data.coordinate_columns(count, dim),
        y_columns=data.CONDITION_COLUMNS,
        x_unit="sigma",
        y_unit="reduced units",
        simulate=simulate,
        builtin={"n": 30_000, "seed": 1},
        # Ordered configurations: the transform maps the box one-to-one onto R^(N D), so
        # every draw is inside the box and densities stay exact.
        transform=REPRESENTATIONS[representation](dim, box) if ordered else None,
        split=data.split,
        prepare=prepare,
        error_name="height_rmse",
        event_error=event_error,
        failure_threshold=None,
        metric_info=METRIC_INFO,
        evaluator=evaluator,
        sampler=sampler,
        augment=symmetric if augment else None,
        physics_terms=losses.TERMS,
        physics_loss=lambda: losses.physics_loss(count, dim, box),
        model_hparams=_model_hparams(dim, box) if ordered and representation == "box" else {},
        options=options,
        fit_options=FIT_OPTIONS,
    )


#: The hard core of the particle flow (sigma): no pair of a Boltzmann configuration at
#: the simulated temperatures comes this close (the built-in set's closest is 0.85),
#: and a closer pair is what the evaluation counts as an overlap.
PARTICLE_CORE = 0.8


def _model_hparams(dim: int, box: float) -> dict[str, dict[str, Any]]:
    """What the particle flow must know of the box: its axes, its side, the hard core."""
    return {"particle-flow": {"particle_dim": dim, "box": float(box), "core": PARTICLE_CORE}}


def _sampled(
    context: EvaluationContext,
    samples: np.ndarray,
    relax_sweeps: int,
    count: int,
    dim: int,
    box: float,
    ordered: bool,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``flowrecon sample``'s draws ``(n, B, N * D)``: relaxed if asked, then in order.

    ``relax_sweeps`` Metropolis sweeps at each row's own (gamma, T) separate overlapping
    pairs (a sweep or two) but leave the model's large-scale errors (the density profile
    relaxes over tau, tens of sweeps). Extra columns: ``drawn_in_order`` (whether the
    model's own draw was in canonical order; with the box transform the model learns the
    order) and ``min_distance`` (smallest pair distance after relaxation, sigma: below
    0.8 is an overlap the Boltzmann distribution never shows).
    """
    if relax_sweeps < 0:
        raise ValueError(f"relax_sweeps must be >= 0, got {relax_sweeps}")
    n, b = samples.shape[:2]
    conf = np.asarray(samples, dtype=np.float64).reshape(n, b, count, dim)
    extra = {"drawn_in_order": in_canonical_order(conf)} if ordered else {}
    if relax_sweeps:
        y = np.broadcast_to(np.asarray(context.y, dtype=np.float64)[None], (n, b, 2))
        flat, _ = relax(
            conf.reshape(n * b, count, dim),
            y[..., 0].reshape(-1),
            y[..., 1].reshape(-1),
            sweeps=relax_sweeps,
            box=box,
            seed=context.seed,
        )
        conf = flat.reshape(conf.shape)
    if ordered:
        conf = canonical_order(conf)
    extra["min_distance"] = min_pair_distance(conf)
    return conf.reshape(n, b, count * dim), extra
