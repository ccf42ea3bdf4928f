"""Coulomb explosion of N point charges in 3-D, batched and differentiable in torch.

The same method as the three-atom simulator (`flowrecon.systems.cei.simulator`), written
in tensor form over atom pairs so that any molecule runs through it:

1. **State.** Every atom's velocity ``u`` and drift-free position ``b = x - u t`` in the
   centre-of-mass frame, as tensors ``(N, 3, B)`` with the batch innermost (contiguous
   for vectorised and fused kernels). Pair vectors come from two index lists (``i < j``),
   the pair forces ``k_ij d / |d|^3`` are one ``(P, 3, B)`` tensor, and one ``(N, P)``
   matrix of signed inverse masses turns them into accelerations, so that total momentum
   is conserved to rounding.
2. **Logarithmic time.** sigma = log(1 + t / t_s), with t_s the event's own time scale
   (shortest pair distance over the speed of the lightest reduced mass), and a fixed
   Dormand-Prince 5th-order grid, denser early, in lockstep for every event.
3. **Analytic tail.** At the end of the grid each pair is continued on a straight line
   and its remaining Coulomb impulse is added in closed form (second-order error in the
   residual potential energy).

On CPU, batches of 1,000,000 events or more that need no gradient run the same step
unrolled over pairs and components (lists of ``(B,)`` tensors) through ``torch.compile``,
which fuses it into one vectorised loop over the batch; eager runs, CUDA and gradients use
the tensor form. One compilation serves every molecule with the same number of atoms
(and dtype); the first takes minutes for five atoms, and inductor caches it on disk for
later processes.

Molecules with light and heavy fragments (H and I) have time scales far apart: the grid
must reach further in sigma for the heavy pairs to finish, which :func:`default_settings`
derives from the masses and charges. Three-atom molecules from rest use the planar
three-atom integrator instead (:func:`molecule_momenta` dispatches), which is faster and
reproduces OCS bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from flowrecon.systems.cei.physics import atom_pairs
from flowrecon.systems.cei.simulator import (
    _DP_A,
    _DP_B,
    _DP_C,
    IntegratorSettings,
    asymptotic_momenta,
)

if TYPE_CHECKING:
    from flowrecon.systems.cei.molecule import Molecule

__all__ = ["default_settings", "explode", "molecule_momenta"]

Array = torch.Tensor | np.ndarray


class _Plan:
    """Pair lists, couplings and the force-to-acceleration matrix of one molecule."""

    def __init__(self, masses: Sequence[float], charges: Sequence[float], like: torch.Tensor):
        n = len(masses)
        pairs = atom_pairs(n)
        self.pairs, self.masses, self.charges = pairs, tuple(masses), tuple(charges)
        self.n_atoms, self.n_pairs = n, len(pairs)
        opts = {"dtype": like.dtype, "device": like.device}
        self.i = torch.tensor([p[0] for p in pairs], device=like.device)
        self.j = torch.tensor([p[1] for p in pairs], device=like.device)
        q = torch.as_tensor(charges, **opts)
        self.k = (q[self.i] * q[self.j])[:, None]  # (P, 1)
        self.m = torch.as_tensor(masses, **opts)
        w = torch.zeros(n, len(pairs), **opts)
        cols = torch.arange(len(pairs), device=like.device)
        # The force k d / |d|^3 with d = x_j - x_i pushes j along +d and i along -d.
        w[self.j, cols] = 1 / self.m[self.j]
        w[self.i, cols] = -1 / self.m[self.i]
        self.w = w
        mu = torch.stack([self.m[a] * self.m[b] / (self.m[a] + self.m[b]) for a, b in pairs])
        self.mu_min = mu.min()

    def pair_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """``x_j - x_i`` for every pair: ``(N, 3, B) -> (P, 3, B)``."""
        return x[self.j] - x[self.i]

    def accelerations(self, f: torch.Tensor) -> torch.Tensor:
        """Pair forces ``(P, 3, B)`` to accelerations ``(N, 3, B)``."""
        return (self.w @ f.reshape(self.n_pairs, -1)).reshape(self.n_atoms, *f.shape[1:])


def _dot3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products over the component axis of ``(P, 3, B)`` tensors: ``(P, B)``.

    Written out: a reduction over the strided middle axis (``sum(1)``, ``vector_norm``)
    is many times slower on the CPU than three element-wise products.
    """
    return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def _derivative(
    b: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor, t_s: torch.Tensor, plan: _Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """d(b, u)/d sigma for states ``(N, 3, B)``."""
    t = t_s * torch.expm1(sigma)
    d = plan.pair_vectors(b + u * t)
    inv = torch.rsqrt(_dot3(d, d))  # (P, B)
    f = (plan.k * (t + t_s) * inv * inv * inv)[:, None] * d
    du = plan.accelerations(f)
    return -du * t, du


def _rk_step(
    b: torch.Tensor,
    u: torch.Tensor,
    sigma: torch.Tensor,
    h: torch.Tensor,
    t_s: torch.Tensor,
    plan: _Plan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Dormand-Prince 5th-order step in sigma of size h."""
    stages: list[tuple[torch.Tensor, torch.Tensor]] = []
    for c, row in zip(_DP_C, _DP_A):
        bs, us = b, u
        for a, (kb, ku) in zip(row, stages):
            bs = bs + (h * a) * kb
            us = us + (h * a) * ku
        stages.append(_derivative(bs, us, sigma + c * h, t_s, plan))
    for weight, (kb, ku) in zip(_DP_B, stages):
        if weight:
            b = b + (h * weight) * kb
            u = u + (h * weight) * ku
    return b, u


def _coulomb_tail(r: torch.Tensor, u: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Adds the impulse each pair still receives on straight lines from ``r`` with ``u``.

    For d(tau) = d0 + v tau, int_0^inf d / |d|^3 dtau = d0 I0 + v I1 with
    I0 = 1 / (|d0| (|d0||v| + d0.v)) and I1 = 1 / (|v| (|d0||v| + d0.v)), finite for
    radial motion (the three-atom simulator's closed form).
    """
    d, v = plan.pair_vectors(r), plan.pair_vectors(u)
    dd = torch.sqrt(_dot3(d, d))
    vv = torch.sqrt(_dot3(v, v))
    s = dd * vv + _dot3(d, v)
    kick = (plan.k / (dd * s))[:, None] * d + (plan.k / (vv * s))[:, None] * v
    return u + plan.accelerations(kick)


def _time_scale(x: torch.Tensor, v: torch.Tensor | None, plan: _Plan) -> torch.Tensor:
    """t_s (B,): shortest pair distance over the lightest reduced mass's final speed."""
    d = plan.pair_vectors(x)
    dist = torch.sqrt(_dot3(d, d))  # (P, B)
    energy = (plan.k / dist).sum(0)
    if v is not None:
        energy = energy + 0.5 * (plan.m[:, None] * _dot3(v, v)).sum(0)
    return dist.min(0).values / torch.sqrt(2 * energy / plan.mu_min)


def _rsqrt(x: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(x)``; in float64 from a float32 estimate and one Newton step.

    A float64 square root and division cost about five times their float32 versions on
    the vector units, and the fused N-body step does little else. The float32 estimate
    is correctly rounded (relative error e < 6e-8); one step r <- r (3 - x r^2) / 2
    leaves 1.5 e^2 < 1e-14, a million times below the integrator's own error, so a
    second step would only cost time.
    """
    if x.dtype != torch.float64:
        return torch.rsqrt(x)
    r = torch.rsqrt(x.to(torch.float32)).to(torch.float64)
    return r * (1.5 - 0.5 * x * r * r)


def _component_step(n_atoms: int) -> Callable:
    """The RK step over per-component lists of ``(B,)`` tensors, for ``torch.compile``.

    The same method as :func:`_rk_step`, unrolled over pairs and components: every
    operation is element-wise on ``(B,)`` tensors, so that the whole step fuses into one
    vectorised loop over the batch, with the state in registers instead of a pass through
    memory per operation. Couplings ``k`` (P,) and inverse masses ``inv_m`` (N,) are
    inputs, not constants, so that one compilation serves every molecule of ``n_atoms``.
    """
    pairs = atom_pairs(n_atoms)
    # Per atom: the pairs that push it along +d (it is their j) and along -d (their i).
    plus = [[p for p, (_, j) in enumerate(pairs) if j == a] for a in range(n_atoms)]
    minus = [[p for p, (i, _) in enumerate(pairs) if i == a] for a in range(n_atoms)]

    def accelerations(b, u, t, dt_dsigma, k, inv_m):
        """du/dsigma; db/dsigma is -t times it."""
        x = [bi + ui * t for bi, ui in zip(b, u)]
        forces = []  # per pair: k d / |d|^3 * dt/dsigma, three components
        for p, (i, j) in enumerate(pairs):
            d = [x[3 * j + c] - x[3 * i + c] for c in range(3)]
            inv = _rsqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
            coef = (k[p] * dt_dsigma) * inv * inv * inv
            forces.append([coef * dc for dc in d])
        du = []
        for a in range(n_atoms):
            for c in range(3):
                total = sum(forces[p][c] for p in plus[a]) - sum(forces[p][c] for p in minus[a])
                du.append(inv_m[a] * total)
        return du

    def step(b, u, sigma, h, t_s, k, inv_m):
        # Each stage keeps du/dsigma and its time t only: b moves by -(h a t) du, one
        # per-event factor for all components, instead of a stored -t du per component
        # (fewer multiplications and fewer values live across the stages).
        kus, times = [], []
        for c, row in zip(_DP_C, _DP_A):
            bs, us = list(b), list(u)
            for a, ku, t in zip(row, kus, times):
                f = (h * a) * t
                bs = [x - f * y for x, y in zip(bs, ku)]
                us = [x + (h * a) * y for x, y in zip(us, ku)]
            t = t_s * torch.expm1(sigma + c * h)
            kus.append(accelerations(bs, us, t, t + t_s, k, inv_m))
            times.append(t)
        for weight, ku, t in zip(_DP_B, kus, times):
            if weight:
                f = (h * weight) * t
                b = [x - f * y for x, y in zip(b, ku)]
                u = [x + (h * weight) * y for x, y in zip(u, ku)]
        return b, u

    return step


def _component_start(n_atoms: int) -> Callable:
    """Centre-of-mass state and t_s of a chunk, by component, for ``torch.compile``.

    The same quantities as the eager set-up of :func:`_explode_chunk` (and
    :func:`_time_scale`): positions ``(B, N, 3)`` and optional initial velocities to
    per-component lists of ``(B,)`` tensors ``b`` and ``u``, the event time scales and
    the centre-of-mass velocity (None from rest).
    """
    pairs = atom_pairs(n_atoms)

    def start(x, v0, k, m, mu_min):
        total = sum(m[a] for a in range(n_atoms))
        com = [sum(m[a] * x[:, a, c] for a in range(n_atoms)) / total for c in range(3)]
        b = [x[:, a, c] - com[c] for a in range(n_atoms) for c in range(3)]
        if v0 is None:
            v_com = None
            u = [torch.zeros_like(b[0]) for _ in b]
        else:
            v_com = [sum(m[a] * v0[:, a, c] for a in range(n_atoms)) / total for c in range(3)]
            u = [v0[:, a, c] - v_com[c] for a in range(n_atoms) for c in range(3)]
        energy, shortest = 0.0, None
        for p, (i, j) in enumerate(pairs):
            dist = torch.sqrt(sum((b[3 * j + c] - b[3 * i + c]) ** 2 for c in range(3)))
            energy = energy + k[p] / dist
            shortest = dist if shortest is None else torch.minimum(shortest, dist)
        if v0 is not None:
            kinetic = [m[a] * u[3 * a + c] ** 2 for a in range(n_atoms) for c in range(3)]
            energy = energy + 0.5 * sum(kinetic)
        return b, u, shortest / torch.sqrt(2 * energy / mu_min), v_com

    return start


def _component_finish(n_atoms: int) -> Callable:
    """Analytic tail and momenta ``(B, N, 3)`` from per-component state, for ``torch.compile``.

    The same arithmetic as :func:`_coulomb_tail` and the end of :func:`_explode_chunk`.
    """
    pairs = atom_pairs(n_atoms)

    def finish(b, u, t_end, k, m, v_com):
        r = [bi + ui * t_end for bi, ui in zip(b, u)]
        kick = [0.0] * len(u)
        for p, (i, j) in enumerate(pairs):
            d = [r[3 * j + c] - r[3 * i + c] for c in range(3)]
            v = [u[3 * j + c] - u[3 * i + c] for c in range(3)]
            dd = torch.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
            vv = torch.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
            s = dd * vv + (d[0] * v[0] + d[1] * v[1] + d[2] * v[2])
            i0, i1 = k[p] / (dd * s), k[p] / (vv * s)
            for c in range(3):
                impulse = i0 * d[c] + i1 * v[c]
                kick[3 * j + c] = kick[3 * j + c] + impulse
                kick[3 * i + c] = kick[3 * i + c] - impulse
        atoms = []
        for a in range(n_atoms):
            vel = [u[3 * a + c] + kick[3 * a + c] / m[a] for c in range(3)]
            if v_com is not None:
                vel = [vc + w for vc, w in zip(vel, v_com)]
            atoms.append(torch.stack([m[a] * vc for vc in vel], -1))
        return torch.stack(atoms, 1)

    return finish


_COMPILED: dict[tuple[str, int], Callable] = {}

#: Inductor fuses at most this many nodes into one kernel by default (64); the unrolled
#: step of a five-atom molecule has thousands, and split into many kernels it streams its
#: intermediates through memory, about four times slower than fused.
_FUSION_LIMIT = 1 << 16


def _compiled(kind: str, n_atoms: int) -> Callable:
    """The compiled step, start or finish for ``n_atoms`` atoms (one compilation each).

    Compilation happens lazily, at a call: call it inside :func:`_fusion_setting`.
    """
    key = (kind, n_atoms)
    if key not in _COMPILED:
        make = {"step": _component_step, "start": _component_start, "finish": _component_finish}
        _COMPILED[key] = torch.compile(make[kind](n_atoms), dynamic=False)
    return _COMPILED[key]


def _fusion_setting():
    """Inductor's fusion limit raised, around a chunk's calls (once, not at every step)."""
    return torch._inductor.config.patch(max_fusion_size=_FUSION_LIMIT)


def _grid_steps(settings: IntegratorSettings, like: torch.Tensor) -> list:
    """``(sigma, h)`` of every step as 0-d tensors (inputs, not constants, when compiled)."""
    grid = settings.grid()
    opts = {"dtype": like.dtype, "device": like.device}
    return [
        (torch.tensor(s0, **opts), torch.tensor(s1 - s0, **opts))
        for s0, s1 in zip(grid[:-1], grid[1:])
    ]


def _explode_chunk_fused(
    x: torch.Tensor, v0: torch.Tensor | None, plan: _Plan, settings: IntegratorSettings
) -> torch.Tensor:
    """:func:`_explode_chunk` through the compiled start, steps and finish.

    Every stage works on per-component ``(B,)`` tensors and fuses into one loop over the
    batch; the set-up and tail in eager mode would cost as much as ten fused steps.
    """
    k, m, inv_m = plan.k[:, 0].contiguous(), plan.m.contiguous(), (1 / plan.m).contiguous()
    with _fusion_setting():
        b, u, t_s, v_com = _compiled("start", plan.n_atoms)(x, v0, k, m, plan.mu_min)
        step = _compiled("step", plan.n_atoms)
        for sigma, h in _grid_steps(settings, x):
            b, u = step(b, u, sigma, h, t_s, k, inv_m)
        t_end = t_s * math.expm1(settings.grid()[-1])
        return _compiled("finish", plan.n_atoms)(b, u, t_end, k, m, v_com)


def _explode_chunk(
    x: torch.Tensor,
    v0: torch.Tensor | None,
    plan: _Plan,
    settings: IntegratorSettings,
    compiled: bool,
) -> torch.Tensor:
    """Asymptotic momenta (B, N, 3) of positions (B, N, 3) and initial velocities."""
    if compiled:
        return _explode_chunk_fused(x, v0, plan, settings)
    m = plan.m
    com = (m[:, None] * x).sum(1, keepdim=True) / m.sum()
    # (B, N, 3) -> (N, 3, B): the batch innermost, for vectorised element-wise kernels.
    b = (x - com).permute(1, 2, 0).contiguous()
    if v0 is None:
        u = torch.zeros_like(b)
        v_com = None
    else:
        v_com = (m[:, None] * v0).sum(1, keepdim=True) / m.sum()
        u = (v0 - v_com).permute(1, 2, 0).contiguous()
    t_s = _time_scale(b, None if v0 is None else u, plan)
    for sigma, h in _grid_steps(settings, x):
        b, u = _rk_step(b, u, sigma, h, t_s, plan)
    t_end = t_s * math.expm1(settings.grid()[-1])
    u = _coulomb_tail(b + u * t_end, u, plan)
    velocity = u.permute(2, 0, 1)
    if v_com is not None:
        velocity = velocity + v_com
    return velocity * m[:, None]


#: Operating points: ``high`` (float64, ~1e-8 relative momentum error for three atoms,
#: ~5e-8 for more) and ``fast`` (float32 and a coarse grid, ~1e-5, several times faster).
ACCURACIES: tuple[str, ...] = ("high", "fast")


def _time_scale_spread(masses: Sequence[float], charges: Sequence[float]) -> float:
    """How much later the slowest pair finishes than the fastest, as a ratio of times."""
    ratios = [
        masses[a] * masses[b] / (masses[a] + masses[b]) / (charges[a] * charges[b])
        for a, b in atom_pairs(len(masses))
    ]
    return math.sqrt(max(ratios) / min(ratios))


def default_settings(
    masses: Sequence[float], charges: Sequence[float], accuracy: str = "high"
) -> IntegratorSettings:
    """The integrator grid for a molecule: longer in log time when fragments are slow.

    The time scale t_s follows the fastest pair; a pair of heavy, weakly charged ions
    finishes later by about the square root of the ratio of their reduced-mass-to-
    coupling ratios, so the grid end grows with the logarithm of that ratio (nothing for
    OCS-like molecules, where the ratio is below 2). The step counts are the fewest that
    keep each operating point's error level on the presets (against DOP853, 100 events
    on each of two seeds; ``benchmarks/simulate_molecules.py``):

    - ``high``, three atoms: 56 steps to sigma = 9.5 (grid power 1.5), the planar
      simulator's own grid (OCS bit for bit), ~5e-9. More atoms: 44 steps to
      sigma = 9.5 + 1.1 log(ratio) (power 1.2), 4e-8..6e-8 median and below 1.5e-7 for
      CH2I2 and CHBrClF (the analytic tail's error sets the grid end: further out,
      the steps get coarser; nearer, the tail misses more).
    - ``fast`` (float32), three atoms: 12 uniform steps to sigma = 6, ~1e-5 median for
      OCS and 1e-6..3e-6 for CO2, N2O, SO2 and D2O. More atoms: 20 uniform steps to
      sigma = 7 + 1.1 log(ratio), 1e-6..5e-6.

    Args:
        masses, charges: The molecule's, one per atom.
        accuracy: ``"high"`` (for float64) or ``"fast"`` (for float32).

    Example:
        >>> from flowrecon.systems.cei.molecule import load_molecule
        >>> m = load_molecule("ch2i2")
        >>> s = default_settings(m.masses, m.charges)
        >>> s.steps, round(s.sigma_end, 2)
        (44, 12.16)
    """
    if accuracy not in ACCURACIES:
        raise ValueError(f"accuracy must be one of {', '.join(ACCURACIES)}, got {accuracy!r}")
    spread = _time_scale_spread(masses, charges)
    longer = math.log(spread) if spread > 2.0 else 0.0
    if accuracy == "fast":
        if len(masses) == 3:
            return IntegratorSettings(steps=12, sigma_end=6.0 + 1.1 * longer, grid_power=1.0)
        return IntegratorSettings(steps=20, sigma_end=7.0 + 1.1 * longer, grid_power=1.0)
    if len(masses) == 3:
        base = IntegratorSettings()
        return IntegratorSettings(base.steps, base.sigma_end + 1.4 * longer, base.grid_power)
    return IntegratorSettings(steps=44, sigma_end=9.5 + 1.1 * longer, grid_power=1.2)


def _as_atoms(value: Array, name: str, n_atoms: int, dtype, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    width = 3 * n_atoms
    if t.shape[-1:] != (width,) and t.shape[-2:] != (n_atoms, 3):
        raise ValueError(
            f"{name} must have shape (..., {width}) or (..., {n_atoms}, 3) for {n_atoms} atoms; "
            f"got {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def explode(
    positions: Array,
    initial_momenta: Array | None = None,
    *,
    masses: Sequence[float],
    charges: Sequence[float],
    settings: IntegratorSettings | None = None,
    chunk_size: int = 1 << 16,
    compile: bool | None = None,
    progress: bool = False,
) -> Array:
    """Final (t -> infinity) momenta of a Coulomb explosion of N ions, in 3-D.

    Args:
        positions: Initial positions, bohr, ``(..., 3N)`` or ``(..., N, 3)``.
        initial_momenta: Optional initial momenta (a.u.), same shape; default at rest.
        masses: N masses in electron masses.
        charges: N positive charges (units of e).
        settings: Integrator grid; default :func:`default_settings`.
        chunk_size: Events integrated together (bounds memory).
        compile: Fuse the step with ``torch.compile``; ``None`` does so for CPU batches of
            1,000,000 events or more that need no gradient (the first compilation for an
            atom count and dtype takes minutes; inductor caches it on disk).
        progress: Show a progress bar over chunks.

    Returns:
        Momenta with the shape of ``positions``: numpy for numpy input, else a tensor on
        the input's device and dtype, differentiable in positions and initial momenta.

    Example:
        >>> from flowrecon.systems.cei.molecule import load_molecule
        >>> m = load_molecule("chbrclf")
        >>> p = explode(np.array(m.geometry), masses=m.masses, charges=m.charges)
        >>> bool(abs(p.sum(0)).max() < 1e-9)   # total momentum stays zero
        True
    """
    n_atoms = len(masses)
    if len(charges) != n_atoms or n_atoms < 2:
        raise ValueError(
            f"need one charge per atom and at least 2 atoms; got {len(charges)} charges "
            f"and {n_atoms} masses"
        )
    if not all(math.isfinite(q) and q > 0 for q in charges):
        raise ValueError(f"charges must be positive and finite, got {tuple(charges)}")
    is_numpy = not isinstance(positions, torch.Tensor)
    if is_numpy:
        dtype, device = torch.float64, torch.device("cpu")
    else:
        dtype = positions.dtype if positions.is_floating_point() else torch.float64
        device = positions.device
    x = _as_atoms(positions, "positions", n_atoms, dtype, device)
    out_shape = x.shape
    x = x.reshape(-1, n_atoms, 3)
    v0 = None
    if initial_momenta is not None:
        p0 = _as_atoms(initial_momenta, "initial_momenta", n_atoms, dtype, device)
        if p0.numel() != x.numel():
            raise ValueError(
                f"initial_momenta has shape {tuple(p0.shape)} but positions has "
                f"{tuple(out_shape)}; they must describe the same events"
            )
        v0 = (
            p0.reshape(-1, n_atoms, 3)
            / torch.as_tensor(masses, dtype=dtype, device=device)[:, None]
        )
    settings = settings or default_settings(masses, charges)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (v0 is not None and v0.requires_grad)
    )
    n = x.shape[0]
    if compile is None:
        compile = x.device.type == "cpu" and n >= 1_000_000 and not needs_grad
    plan = _Plan(masses, charges, x)
    if compile:
        # One static shape per bucket: torch.compile recompiles for every new size.
        chunk_size = min(chunk_size, max(1 << 12, 1 << max(n - 1, 1).bit_length()))
    chunks = range(0, n, chunk_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, total=math.ceil(n / chunk_size), unit="chunk", desc="explode")
    parts = []
    for start in chunks:
        stop = min(start + chunk_size, n)
        xc, vc = x[start:stop], None if v0 is None else v0[start:stop]
        pad = chunk_size - (stop - start) if compile else 0
        if pad:  # repeat the last event: a valid geometry keeps the padding finite
            xc = torch.cat([xc, xc[-1:].expand(pad, n_atoms, 3)])
            vc = None if vc is None else torch.cat([vc, vc[-1:].expand(pad, n_atoms, 3)])
        parts.append(_explode_chunk(xc, vc, plan, settings, compile)[: stop - start])
    p = torch.cat(parts) if parts else x.new_zeros((0, n_atoms, 3))
    p = p.reshape(out_shape)
    return p.detach().cpu().numpy() if is_numpy else p


def molecule_momenta(
    positions: Array,
    molecule: Molecule | str,
    initial_momenta: Array | None = None,
    *,
    charges: Sequence[float] | None = None,
    accuracy: str = "high",
    settings: IntegratorSettings | None = None,
    compile: bool | None = None,
    progress: bool = False,
    general: bool = False,
) -> Array:
    """Final momenta of a molecule's Coulomb explosion: the right integrator for its size.

    Three atoms go through `flowrecon.systems.cei.simulator.asymptotic_momenta` (planar
    from rest, the reference path for OCS), more atoms through :func:`explode`.

    Args:
        positions: ``(..., 3N)`` or ``(..., N, 3)`` positions, bohr, atoms in the
            molecule's order.
        molecule: A Molecule or a preset name / TOML file.
        initial_momenta: Optional initial momenta, e.g. zero-point motion.
        charges: The explosion channel; default the molecule's.
        accuracy: ``"high"`` (float64; median relative momentum error ~5e-9 for three
            atoms, ~5e-8 for five) or ``"fast"`` (integrates in float32 on a coarse grid,
            ~1e-5, five to eight times faster; the result keeps the input's dtype). See
            :func:`default_settings` for the grids and the errors measured on the presets.
        settings: Integrator grid; default :func:`default_settings` for ``accuracy``.
        compile: See :func:`explode` and ``asymptotic_momenta``.
        progress: Show a progress bar.
        general: Three atoms only: integrate in 3-D even from rest (for forward-mode
            derivatives; see ``asymptotic_momenta``).

    Example:
        >>> from flowrecon.systems.cei.molecule import load_molecule
        >>> m = load_molecule("d2o")
        >>> molecule_momenta(np.array(m.geometry), m).shape
        (3, 3)
    """
    from flowrecon.systems.cei.molecule import load_molecule

    molecule = load_molecule(molecule).with_charges(charges)
    if settings is None:
        settings = default_settings(molecule.masses, molecule.charges, accuracy)
    x, p0, restore = positions, initial_momenta, None
    if accuracy == "fast":
        x, p0, restore = _single(positions), _single(initial_momenta), positions
    kwargs = {"settings": settings, "compile": compile, "progress": progress}
    if molecule.n_atoms == 3:
        p = asymptotic_momenta(
            x, p0, charges=molecule.charges, masses=molecule.masses, general=general, **kwargs
        )
    else:
        p = explode(x, p0, masses=molecule.masses, charges=molecule.charges, **kwargs)
    return p if restore is None else _like(p, restore)


def _single(value: Array | None) -> torch.Tensor | None:
    """A float32 tensor of ``value`` (None stays None)."""
    return None if value is None else torch.as_tensor(value).to(torch.float32)


def _like(p: torch.Tensor, like: Array) -> Array:
    """``p`` in the kind and dtype of ``like`` (numpy float64 for numpy input)."""
    if not isinstance(like, torch.Tensor):
        return p.detach().cpu().numpy().astype(np.float64)
    dtype = like.dtype if like.is_floating_point() else torch.float64
    return p.to(dtype)
