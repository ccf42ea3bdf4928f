"""Batched Metropolis Monte Carlo of Lennard-Jones particles under gravity in a closed box.

Thousands of independent boxes (chains) advance together in one tensor. The state is
stored particle-major with the chains innermost, ``(N, D, B)``: a move of particle k in
every box reads and writes contiguous rows, and the energy change of the move, an O(N)
sum over the other particles, vectorises over the boxes. Each chain has its own gravity
gamma, temperature T and step size, so several conditions run in one tensor.

The move. Particle k is displaced uniformly in the cube [-delta, delta]^D; a coordinate
that leaves [0, L] is reflected back inside (x -> -x below 0, x -> 2L - x above L). The
move is accepted with probability min(1, exp(-dU / T)), the Metropolis rule. (The source
study wrote the rule inverted, accepting every uphill move; that samples no Boltzmann
distribution.) The reflected proposal is symmetric: for a symmetric kernel K the density
of proposing x' from x is the sum of K over the images of x' (x', -x', 2L - x'), and
K(-x' - x) and K(2L - x' - x) are symmetric in x and x', so q(x'|x) = q(x|x') and the
plain Metropolis ratio gives detailed balance for every single-particle move. A sweep
moves every particle once in a random order (shared by all boxes); each move keeps the
Boltzmann distribution invariant, so the sweep does too (`tests/test_lj_sampler.py`
checks detailed balance of single moves and the stationary distribution against exact
quadrature).

The protocol (`run_metropolis`): the step size of each condition is tuned to a target
acceptance during a first burn-in; equilibration is detected on the energy trace
(`flowrecon.systems.lj.stats.detect_equilibration`); the integrated autocorrelation time
tau of the energy is measured on the equilibrated part of that trace (the preliminary
run, extended until it is at least 20 tau long); configurations are then saved every
``ceil(thin * tau)`` sweeps. Times are in sweeps (N attempted moves per chain).

On the CPU the move is fused into one loop by ``torch.compile`` when the run is large
(an eager move is about twenty element-wise kernels, memory-bound); compilation takes
10-20 s the first time a shape is seen and falls back to the eager move if it fails.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowrecon.systems.lj import stats
from flowrecon.systems.lj.physics import potential_energy

__all__ = [
    "ConditionReport",
    "LJChains",
    "MonteCarloRun",
    "lattice_start",
    "relax",
    "run_metropolis",
]

log = logging.getLogger(__name__)

#: Closest approach of the particles in a starting lattice (sigma): well outside the core.
LATTICE_MIN_SPACING = 1.1

#: Compiled move functions by ``interaction``; torch.compile specialises on shapes itself.
_COMPILED: dict[bool, Callable[..., Any]] = {}


def _move(
    pos: Tensor,
    k: Tensor,
    pad: Tensor,
    noise: Tensor,
    log_u: Tensor,
    step: Tensor,
    beta: Tensor,
    weight: Tensor,
    box: float,
    interaction: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Metropolis move of particle k in every box.

    Args:
        pos: Positions ``(N, D, B)``.
        k: Index of the moved particle, a 1-element long tensor.
        pad: ``(N, N, 1)``, +inf where the row and column index agree: added to the
            squared distances it removes the particle's interaction with itself.
        noise: Uniform numbers in [-1, 1], ``(D, B)``.
        log_u: log of uniform numbers in [0, 1), ``(B,)``.
        step, beta, weight: Per box: the step size delta, 1 / T and 4 * gamma.

    Returns:
        The particle's new position ``(D, B)`` (the old one where rejected), the energy
        change (0 where rejected) and the acceptance mask.
    """
    old = pos.index_select(0, k).squeeze(0)
    # Reflection at both walls: valid while the step is below the box size.
    prop = box - (box - (old + noise * step).abs()).abs()
    du = weight * (prop[-1] - old[-1])
    if interaction:
        pad_k = pad.index_select(0, k).squeeze(0)
        d_new = pos - prop.unsqueeze(0)
        d_old = pos - old.unsqueeze(0)
        i2n = 1.0 / ((d_new * d_new).sum(1) + pad_k)
        i2o = 1.0 / ((d_old * d_old).sum(1) + pad_k)
        i6n = i2n * i2n * i2n
        i6o = i2o * i2o * i2o
        du = du + 4.0 * (i6n * (i6n - 1.0) - i6o * (i6o - 1.0)).sum(0)
    acc = log_u < -beta * du
    return torch.where(acc, prop, old), torch.where(acc, du, torch.zeros_like(du)), acc


def _move_in_place(
    pos: Tensor,
    k: Tensor,
    pad: Tensor,
    noise: Tensor,
    log_u: Tensor,
    step: Tensor,
    beta: Tensor,
    weight: Tensor,
    energy: Tensor,
    accepted: Tensor,
    box: float,
    interaction: bool,
) -> Tensor:
    """`_move`, then the state updated in place: row k of ``pos``, ``energy``, ``accepted``.

    Compiled as one graph, the updates are written by the fused kernel itself (about a
    quarter faster than three separate updates after it). Returns the acceptance mask.
    """
    new, du, acc = _move(pos, k, pad, noise, log_u, step, beta, weight, box, interaction)
    pos.index_copy_(0, k, new.unsqueeze(0))
    energy.add_(du)
    accepted.add_(acc)
    return acc


def _compiled_move(interaction: bool) -> Callable[..., Any]:
    if interaction not in _COMPILED:
        _COMPILED[interaction] = torch.compile(_move_in_place, dynamic=False)
    return _COMPILED[interaction]


def lattice_start(
    n_chains: int,
    n_particles: int,
    box: float,
    dim: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Starting positions ``(N, D, B)``: a random subset of a cubic lattice per box.

    The lattice has the most sites per side whose spacing is at least 1.1 sigma, so that
    no pair starts in the repulsive core (an overlap costs ~r^-12 and would stall the
    chain); sites sit half a spacing from the walls.
    """
    per_side = int(box / LATTICE_MIN_SPACING)
    if per_side**dim < n_particles:
        raise ValueError(
            f"n_particles={n_particles} do not fit in a {dim}-D box of side {box} at "
            f"spacing >= {LATTICE_MIN_SPACING} sigma (at most {per_side**dim}); "
            "use a larger box or fewer particles"
        )
    spacing = box / per_side
    axis = (torch.arange(per_side, dtype=dtype) + 0.5) * spacing
    sites = torch.stack(torch.meshgrid(*[axis] * dim, indexing="ij"), -1).reshape(-1, dim)
    keys = torch.rand(n_chains, sites.shape[0], generator=generator)
    chosen = keys.argsort(dim=1)[:, :n_particles]  # (B, N): a random subset per box
    return sites[chosen].permute(1, 2, 0).contiguous()


class LJChains:
    """B independent boxes of N Lennard-Jones particles under gravity, advanced together.

    Args:
        gamma, temperature: Per box, ``(B,)`` (or scalars broadcast to ``n_chains``).
        n_particles, box, dim: N, the side L and the dimension D (1, 2 or 3).
        n_chains: Number of boxes when gamma and temperature are scalars.
        interaction: False switches the pair interaction off (an ideal gas under gravity).
        step: Initial step size delta (scalar or per box), at most box / 2.
        seed: Seed of the starting lattice and of every move.
        device: ``"cpu"``, ``"cuda"``, ...
        dtype: ``torch.float64`` (default) or ``torch.float32``.
        compile: Fuse the move with ``torch.compile``.

    Example:
        >>> chains = LJChains(0.25, 1.5, n_particles=8, box=4.0, n_chains=16, seed=1)
        >>> rate = chains.sweeps(20)
        >>> chains.positions.shape, bool(((rate > 0) & (rate < 1)).all())
        (torch.Size([16, 8, 3]), True)
    """

    def __init__(
        self,
        gamma: float | Sequence[float] | Tensor,
        temperature: float | Sequence[float] | Tensor,
        *,
        n_particles: int = 30,
        box: float = 5.0,
        dim: int = 3,
        n_chains: int | None = None,
        interaction: bool = True,
        step: float | Sequence[float] | Tensor = 0.3,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        compile: bool = False,
    ) -> None:
        if dim not in (1, 2, 3):
            raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
        if not (math.isfinite(box) and box > 0):
            raise ValueError(f"box must be a positive length, got {box}")
        if int(n_particles) < 1:
            raise ValueError(f"n_particles must be a positive integer, got {n_particles}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.n_particles, self.box, self.dim = int(n_particles), float(box), int(dim)
        self.interaction = bool(interaction)
        g = torch.as_tensor(gamma, dtype=torch.float64).reshape(-1)
        t = torch.as_tensor(temperature, dtype=torch.float64).reshape(-1)
        size = max(g.numel(), t.numel(), int(n_chains or 1))
        if (g.numel() not in (1, size)) or (t.numel() not in (1, size)):
            raise ValueError(
                f"gamma ({g.numel()}) and temperature ({t.numel()}) must be scalars or have "
                f"one value per chain ({size})"
            )
        if not torch.isfinite(g).all() or not ((t > 0) & torch.isfinite(t)).all():
            raise ValueError("gamma must be finite and temperature positive and finite")
        self.n_chains = size
        self.gamma = g.expand(size).to(self.device, dtype)
        self.temperature = t.expand(size).to(self.device, dtype)
        self.beta = 1.0 / self.temperature
        self.weight = 4.0 * self.gamma
        self.step = torch.empty(size, device=self.device, dtype=dtype)
        self.set_step(step)
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        cpu_gen = torch.Generator().manual_seed(int(seed))
        self._cpu_generator = cpu_gen
        self._pos = lattice_start(size, self.n_particles, self.box, self.dim, cpu_gen, dtype).to(
            self.device
        )
        n = self.n_particles
        pad = torch.zeros(n, n, 1, dtype=dtype)
        pad[torch.arange(n), torch.arange(n)] = math.inf
        self._pad = pad.to(self.device)
        self._index = [torch.tensor([i], device=self.device) for i in range(n)]
        self._move = _move_in_place
        if compile:
            self._move = _compiled_move(self.interaction)
        self.energy_ = self.energy()
        self.accepted = torch.zeros(size, device=self.device, dtype=torch.float64)
        self.attempted = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def positions(self) -> Tensor:
        """Positions ``(B, N, D)`` (a view of the internal ``(N, D, B)`` state)."""
        return self._pos.permute(2, 0, 1)

    def set_positions(self, positions: Tensor | np.ndarray) -> None:
        """Replaces the positions ``(B, N, D)`` (must lie inside the box)."""
        p = torch.as_tensor(positions, dtype=self.dtype, device=self.device)
        want = (self.n_chains, self.n_particles, self.dim)
        if tuple(p.shape) != want:
            raise ValueError(f"positions must have shape {want}, got {tuple(p.shape)}")
        if ((p < 0) | (p > self.box)).any():
            raise ValueError(f"positions must lie inside the box [0, {self.box}]^{self.dim}")
        self._pos = p.permute(1, 2, 0).contiguous()
        self.energy_ = self.energy()

    def set_step(self, step: float | Sequence[float] | Tensor) -> None:
        """Sets the step size delta (scalar or per box); it must lie in (0, box / 2]."""
        s = torch.as_tensor(step, dtype=torch.float64).reshape(-1)
        if not ((s > 0) & (s <= self.box / 2)).all():
            raise ValueError(f"step must lie in (0, box / 2] = (0, {self.box / 2}], got {step}")
        self.step.copy_(s.expand(self.n_chains).to(self.device, self.dtype))

    def energy(self) -> Tensor:
        """Total potential energy U of every box, recomputed from scratch, ``(B,)``."""
        pos = self._pos
        out = self.weight * pos[:, -1].sum(0)
        if self.interaction:
            # Pairs (i, j > i) one particle at a time: contiguous slices, no gather.
            for i in range(self.n_particles - 1):
                d = pos[i + 1 :] - pos[i]
                inv6 = (d * d).sum(1).reciprocal_().pow_(3)
                out = out + 4.0 * (inv6 * (inv6 - 1.0)).sum(0)
        return out

    # -- moves ---------------------------------------------------------------------------

    def _call_move(self, k: int, noise: Tensor, log_u: Tensor, accepted: Tensor) -> Tensor:
        args = (self._pos, self._index[k], self._pad, noise, log_u, self.step, self.beta)
        rest = (self.weight, self.energy_, accepted, self.box, self.interaction)
        try:
            return self._move(*args, *rest)
        except Exception as err:  # a compiler problem must not stop the simulation
            if self._move is _move_in_place:
                raise
            log.warning("torch.compile of the Metropolis move failed (%s); running eagerly", err)
            self._move = _move_in_place
            return _move_in_place(*args, *rest)

    def move(self, k: int) -> Tensor:
        """Attempts one move of particle ``k`` in every box; returns the acceptance mask."""
        noise = torch.rand(
            self.dim, self.n_chains, generator=self.generator, device=self.device, dtype=self.dtype
        )
        log_u = torch.rand(
            self.n_chains, generator=self.generator, device=self.device, dtype=self.dtype
        ).log_()
        acc = self._call_move(int(k), noise.mul_(2).sub_(1), log_u, self.accepted)
        self.attempted += 1
        return acc

    def sweeps(self, n: int, *, order: str = "random", trace: list[Tensor] | None = None) -> Tensor:
        """Runs n sweeps (N attempted moves per box each); returns each box's acceptance.

        Args:
            n: Number of sweeps.
            order: ``"random"`` (a fresh permutation of the particles every sweep, shared
                by all boxes) or ``"fixed"`` (0, 1, ..., N - 1).
            trace: If given, the energy of every box after each sweep is appended to it.
        """
        if order not in ("random", "fixed"):
            raise ValueError(f"order must be 'random' or 'fixed', got {order!r}")
        n_p, dev, dt = self.n_particles, self.device, self.dtype
        accepted = torch.zeros(self.n_chains, device=dev, dtype=torch.float64)
        for _ in range(int(n)):
            noise = torch.rand(
                n_p, self.dim, self.n_chains, generator=self.generator, device=dev, dtype=dt
            )
            noise.mul_(2).sub_(1)
            log_u = torch.rand(n_p, self.n_chains, generator=self.generator, device=dev, dtype=dt)
            log_u.log_()
            if order == "random":
                ks = torch.randperm(n_p, generator=self._cpu_generator).tolist()
            else:
                ks = range(n_p)
            for k in ks:
                self._call_move(k, noise[k], log_u[k], accepted)
            if trace is not None:
                trace.append(self.energy_.clone())
        self.attempted += int(n) * n_p
        self.accepted += accepted
        # Re-synchronise the running energy with a full recomputation (float rounding).
        self.energy_ = self.energy()
        return accepted / max(int(n) * n_p, 1)


@dataclass
class ConditionReport:
    """Diagnostics of one condition (gamma, T) of a Monte Carlo run.

    Attributes:
        gamma, temperature: The condition.
        chains: Independent boxes.
        step: Tuned step size delta (sigma).
        acceptance: Fraction of accepted moves in production.
        burn_in_sweeps: Sweeps before production (tuning, equilibration, preliminary run).
        equilibrated_at: Sweep after tuning from which the energy trace was equilibrated.
        tau: Integrated autocorrelation time of the energy (sweeps), and ``tau_error``.
        preliminary_sweeps: Length of the equilibrated trace tau was measured on.
        thin: Sweeps between saved configurations.
        saved_per_chain: Configurations saved per chain.
        tau_saved: tau of the saved series (in saved samples; 1 = uncorrelated).
        ess: Effective sample size of the saved energies, chains * saved / tau_saved.
        converged: Whether equilibration and the tau measurement met their criteria
            within the allowed sweeps.
    """

    gamma: float
    temperature: float
    chains: int
    step: float = math.nan
    acceptance: float = math.nan
    burn_in_sweeps: int = 0
    equilibrated_at: int = 0
    tau: float = math.nan
    tau_error: float = math.nan
    preliminary_sweeps: int = 0
    thin: int = 1
    saved_per_chain: int = 0
    tau_saved: float = math.nan
    ess: float = math.nan
    converged: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MonteCarloRun:
    """Saved configurations of `run_metropolis`, condition by condition.

    Attributes:
        positions: Per condition, ``(saved, chains, N, D)`` float64.
        energy: Per condition, ``(saved, chains)`` total potential energy U.
        sweeps: Per condition, ``(saved,)`` sweep numbers at which they were saved.
        reports: Per condition, a `ConditionReport`.
        settings: The run's arguments (plain values).
        moves: Attempted single-particle moves in all boxes.
        seconds: Wall-clock time of the run, and ``moves_per_second``.
    """

    positions: list[np.ndarray]
    energy: list[np.ndarray]
    sweeps: list[np.ndarray]
    reports: list[ConditionReport]
    settings: dict[str, Any] = field(default_factory=dict)
    moves: int = 0
    seconds: float = 0.0

    @property
    def moves_per_second(self) -> float:
        return self.moves / self.seconds if self.seconds > 0 else math.nan


def _as_conditions(conditions: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for c in conditions:
        try:
            g, t = (float(v) for v in c)
        except (TypeError, ValueError):
            raise ValueError(f"a condition is a pair (gamma, temperature), got {c!r}") from None
        if not math.isfinite(g) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"condition {c!r}: gamma must be finite, temperature positive")
        out.append((g, t))
    if not out:
        raise ValueError("give at least one condition (gamma, temperature)")
    return out


def _per_condition(values: Tensor, n_cond: int) -> np.ndarray:
    return values.reshape(n_cond, -1).double().mean(1).cpu().numpy()


def run_metropolis(
    conditions: Sequence[tuple[float, float]],
    *,
    chains: int,
    samples: int,
    n_particles: int = 30,
    box: float = 5.0,
    dim: int = 3,
    interaction: bool = True,
    target_acceptance: float = 0.4,
    thin: float = 2.0,
    tune_sweeps: int = 200,
    tune_interval: int = 10,
    min_equilibration: int = 100,
    max_sweeps: int = 20_000,
    tau_multiple: float = 20.0,
    trace_chains: int = 128,
    order: str = "random",
    seed: int = 0,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float64",
    compile: bool | None = None,
    progress: bool = False,
) -> MonteCarloRun:
    """Equilibrated, decorrelated configurations for several conditions (gamma, T) at once.

    Args:
        conditions: Pairs (gamma, temperature).
        chains: Independent boxes per condition.
        samples: Configurations saved per chain.
        n_particles, box, dim: N, L, D.
        interaction: False switches the pair interaction off (ideal gas).
        target_acceptance: Acceptance the step size of each condition is tuned to.
        thin: Configurations are saved every ``ceil(thin * tau)`` sweeps.
        tune_sweeps: Sweeps of the tuning phase (the step is adjusted every
            ``tune_interval`` sweeps, then frozen).
        min_equilibration: Shortest equilibration trace (sweeps).
        max_sweeps: Longest equilibration plus preliminary run (sweeps); a condition
            that has not equilibrated by then is reported with ``converged=False``.
        tau_multiple: The equilibrated trace must be this many tau long.
        trace_chains: Chains per condition whose energy traces measure tau.
        order: Particle order within a sweep, ``"random"`` or ``"fixed"``.
        seed: Seed of everything random.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        dtype: ``"float64"`` (default) or ``"float32"`` (faster; energies of saved
            configurations are recomputed in float64 either way).
        compile: Fuse the move with ``torch.compile``; None does so for runs of more than
            3e7 moves.
        progress: Show a progress bar.

    Returns:
        A `MonteCarloRun`.

    Example:
        >>> run = run_metropolis([(0.25, 1.5)], chains=32, samples=2, n_particles=6,
        ...                      box=4.0, device="cpu", tune_sweeps=40, max_sweeps=2000)
        >>> run.positions[0].shape, run.reports[0].thin >= 1
        ((2, 32, 6, 3), True)
    """
    from flowrecon.base import resolve_device

    conds = _as_conditions(conditions)
    if int(chains) < 1 or int(samples) < 1:
        raise ValueError(f"chains and samples must be positive, got {chains} and {samples}")
    if not 0 < target_acceptance < 1:
        raise ValueError(f"target_acceptance must lie in (0, 1), got {target_acceptance}")
    if not (thin > 0 and math.isfinite(thin)):
        raise ValueError(f"thin must be a positive number of autocorrelation times, got {thin}")
    dev = resolve_device(device)
    dt = _dtype(dtype)
    n_cond, chains, samples = len(conds), int(chains), int(samples)
    settings = {
        "conditions": [list(c) for c in conds],
        "chains": chains,
        "samples": samples,
        "n_particles": n_particles,
        "box": box,
        "dim": dim,
        "interaction": interaction,
        "target_acceptance": target_acceptance,
        "thin": thin,
        "tune_sweeps": tune_sweeps,
        "order": order,
        "seed": seed,
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
    }
    if compile is None:
        guess = n_cond * chains * n_particles * (tune_sweeps + 600 + 40 * samples)
        compile = guess > 3e7
    settings["compile"] = bool(compile)

    gamma = torch.tensor([c[0] for c in conds], dtype=torch.float64).repeat_interleave(chains)
    temp = torch.tensor([c[1] for c in conds], dtype=torch.float64).repeat_interleave(chains)
    mc = LJChains(
        gamma,
        temp,
        n_particles=n_particles,
        box=box,
        dim=dim,
        interaction=interaction,
        step=min(0.3, box / 2),
        seed=seed,
        device=dev,
        dtype=dt,
        compile=bool(compile),
    )
    reports = [ConditionReport(g, t, chains) for g, t in conds]
    bar = _progress(progress)
    start = time.perf_counter()

    _tune(mc, n_cond, reports, target_acceptance, tune_sweeps, tune_interval, order, bar)
    rho = _equilibrate(
        mc, n_cond, reports, min_equilibration, max_sweeps, tau_multiple, trace_chains, order, bar
    )
    positions, energy, sweeps = _produce(mc, n_cond, reports, rho, samples, thin, order, bar)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    return MonteCarloRun(
        positions, energy, sweeps, reports, settings, mc.attempted * mc.n_chains, seconds
    )


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32}
    if dtype not in table:
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    return table[dtype]


class _Bar:
    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(unit="sweep", desc="Metropolis")

    def update(self, n: int, phase: str) -> None:
        self.bar.set_postfix_str(phase, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _progress(progress: bool) -> _Bar | None:
    return _Bar() if progress else None


def _adapt(log_step: Tensor, acceptance: Tensor, target: float, box: float) -> None:
    """One step-size update in place: log step += 2 (acceptance - target), kept in
    [1e-3, box / 2] (the tuning of `run_metropolis` and of `relax`)."""
    log_step += 2.0 * (acceptance - target)
    log_step.clamp_(math.log(1e-3), math.log(box / 2))


def _tune(
    mc: LJChains,
    n_cond: int,
    reports: list[ConditionReport],
    target: float,
    sweeps: int,
    interval: int,
    order: str,
    bar: _Bar | None,
) -> None:
    """Adjusts each condition's step by exp(2 (acceptance - target)) every interval."""
    done = 0
    log_step = torch.log(mc.step.reshape(n_cond, -1)[:, 0].double().cpu())
    while done < sweeps:
        n = min(interval, sweeps - done)
        acc = torch.as_tensor(_per_condition(mc.sweeps(n, order=order), n_cond))
        _adapt(log_step, acc, target, mc.box)
        mc.set_step(torch.exp(log_step).repeat_interleave(mc.n_chains // n_cond))
        done += n
        if bar is not None:
            bar.update(n, "tuning")
    for r, s in zip(reports, torch.exp(log_step).tolist()):
        r.step = float(s)
        r.burn_in_sweeps = sweeps


def _equilibrate(
    mc: LJChains,
    n_cond: int,
    reports: list[ConditionReport],
    min_sweeps: int,
    max_sweeps: int,
    tau_multiple: float,
    trace_chains: int,
    order: str,
    bar: _Bar | None,
) -> list[tuple[np.ndarray, int]]:
    """Runs until each condition's energy trace is equilibrated and >= tau_multiple tau.

    The trace of the energy averaged over a condition's chains locates equilibration
    (it is smooth: its noise is that of one chain over sqrt(chains)); tau comes from up
    to ``trace_chains`` single-chain traces after that point.
    """
    per = mc.n_chains // n_cond
    m = min(per, trace_chains)
    pick = (torch.arange(n_cond)[:, None] * per + torch.arange(m)[None]).reshape(-1)
    pick = pick.to(mc.device)
    means: list[np.ndarray] = []
    singles: list[np.ndarray] = []
    length = max(int(min_sweeps), 20)
    done = [False] * n_cond
    rho: list[tuple[np.ndarray, int]] = [(np.ones(1), 1)] * n_cond
    while True:
        trace: list[Tensor] = []
        mc.sweeps(length - len(means), order=order, trace=trace)
        if bar is not None:
            bar.update(len(trace), "equilibration")
        block = torch.stack(trace)  # (sweeps, B)
        means.extend(block.reshape(len(trace), n_cond, per).double().mean(2).cpu().numpy())
        singles.extend(block[:, pick].reshape(len(trace), n_cond, m).double().cpu().numpy())
        mean_trace, single = np.asarray(means), np.asarray(singles)
        for c, r in enumerate(reports):
            if done[c]:
                continue
            stride = max(1, len(mean_trace) // 200)
            t0, _, _ = stats.detect_equilibration(mean_trace[:, c], stride=stride)
            tau, window, err = stats.integrated_time(single[t0:, c])
            r.equilibrated_at, r.tau, r.tau_error = int(t0), tau, err
            r.preliminary_sweeps = len(mean_trace) - t0
            rho[c] = (stats.autocorrelation(single[t0:, c]), window)
            # Equilibrated in the first half, and the rest long enough to trust tau.
            done[c] = t0 <= len(mean_trace) // 2 and r.preliminary_sweeps >= tau_multiple * tau
        if all(done) or len(means) >= max_sweeps:
            break
        length = min(int(1.5 * length) + 1, int(max_sweeps))
    for c, r in enumerate(reports):
        r.converged = done[c]
        r.burn_in_sweeps += len(means)
        if not done[c]:
            log.warning(
                "condition gamma=%g, T=%g: not equilibrated with a %g-tau preliminary run "
                "within %d sweeps (t0=%d, tau=%.1f)",
                r.gamma,
                r.temperature,
                tau_multiple,
                max_sweeps,
                r.equilibrated_at,
                r.tau,
            )
    return rho


def _produce(
    mc: LJChains,
    n_cond: int,
    reports: list[ConditionReport],
    rho: list[tuple[np.ndarray, int]],
    samples: int,
    thin_factor: float,
    order: str,
    bar: _Bar | None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Saves ``samples`` configurations per chain, each condition at its own interval."""
    per = mc.n_chains // n_cond
    thins = [max(1, math.ceil(thin_factor * r.tau)) for r in reports]
    positions: list[list[np.ndarray]] = [[] for _ in reports]
    saved_at: list[list[int]] = [[] for _ in reports]
    accepted = torch.zeros(mc.n_chains, dtype=torch.float64, device=mc.device)
    ran = 0
    gamma = mc.gamma.reshape(n_cond, per)[:, 0].double().cpu().numpy()
    while any(len(p) < samples for p in positions):
        due = [(len(p) + 1) * t for p, t in zip(positions, thins) if len(p) < samples]
        n = min(due) - ran
        accepted += mc.sweeps(n, order=order) * n
        ran += n
        if bar is not None:
            bar.update(n, "production")
        # A copy: on the CPU .numpy() shares memory with the state the next moves change.
        conf = mc.positions.to("cpu", torch.float64, copy=True).numpy()
        for c, (p, t) in enumerate(zip(positions, thins)):
            if len(p) < samples and ran == (len(p) + 1) * t:
                p.append(conf[c * per : (c + 1) * per])
                saved_at[c].append(ran)
    acc = _per_condition(accepted / max(ran, 1), n_cond)
    energies, stacked, sweeps = [], [], []
    for c, r in enumerate(reports):
        pos = np.stack(positions[c])
        energies.append(potential_energy(pos, gamma[c]))
        r.thin, r.saved_per_chain, r.acceptance = thins[c], samples, float(acc[c])
        r.tau_saved = stats.thinned_time(rho[c][0], thins[c], rho[c][1])
        r.ess = per * samples / r.tau_saved
        stacked.append(pos)
        sweeps.append(np.asarray(saved_at[c]) + r.burn_in_sweeps)
    return stacked, energies, sweeps


def relax(
    conf: np.ndarray,
    gamma: float | np.ndarray,
    temperature: float | np.ndarray,
    *,
    sweeps: int,
    box: float,
    step: float | None = None,
    target_acceptance: float = 0.4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float64",
    compile: bool = False,
) -> tuple[np.ndarray, float]:
    """Configurations after ``sweeps`` Metropolis sweeps at their own (gamma, T).

    A short relaxation of generated configurations: overlapping pairs (an energy of tens
    of epsilon) separate within a sweep or two, while structure on the scale of the box
    (the density profile) relaxes only over about tau sweeps, so for sweeps << tau the
    result still shows the generator's large-scale errors. The chains start from
    ``conf`` ``(n, N, D)``, clipped into the box. Returns the configurations (particles
    in their input order) and the acceptance of the last half of the sweeps.

    With ``step=None`` each chain tunes its own step during the first half of the sweeps
    (log step += 2 (acceptance - target) after each sweep, from 0.3), because the right
    step differs threefold between a dilute gas at low gravity and the packed floor at
    high gravity, and conditions may differ from row to row; the second half runs at the
    tuned steps, unchanged, so it is a plain Metropolis kernel of each row's Boltzmann
    distribution. A number fixes the step for all sweeps.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> start = rng.uniform(0, 4, (8, 10, 3))
        >>> out, acc = relax(start, 0.25, 1.5, sweeps=2, box=4.0)
        >>> out.shape, 0 < acc < 1
        ((8, 10, 3), True)
    """
    c = np.clip(np.asarray(conf, dtype=np.float64), 0.0, box)
    n, n_particles, dim = c.shape
    g = np.broadcast_to(np.asarray(gamma, dtype=np.float64), (n,))
    t = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (n,))
    mc = LJChains(
        torch.as_tensor(g.copy()),
        torch.as_tensor(t.copy()),
        n_particles=n_particles,
        box=box,
        dim=dim,
        step=min(0.3 if step is None else step, box / 2),
        seed=seed,
        device=device,
        dtype=_dtype(dtype),
        compile=compile,
    )
    mc.set_positions(c)
    tuning = 0
    if step is None:
        tuning = int(sweeps) // 2
        log_step = torch.log(mc.step.double())
        for _ in range(tuning):
            _adapt(log_step, mc.sweeps(1).to(log_step), target_acceptance, box)
            mc.set_step(torch.exp(log_step))
    rest = int(sweeps) - tuning
    acc = mc.sweeps(rest) if rest > 0 else torch.zeros(1)
    out = mc.positions.to("cpu", torch.float64, copy=True).numpy()
    return out, float(acc.mean())
