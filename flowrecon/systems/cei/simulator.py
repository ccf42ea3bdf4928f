"""Classical Coulomb explosion of three point charges, batched and differentiable in torch.

The ions start at rest (or with given momenta) and repel; we want their momenta at
t -> infinity. Three choices make this fast and accurate:

1. **Relative coordinates.** Only r1 = x_O - x_C and r2 = x_S - x_C are integrated; the
   centre of mass moves uniformly. Starting from rest the motion stays in the plane of
   the atoms, so that plane is integrated in 2-D (8 numbers an event instead of 18).
2. **Logarithmic time and drift-free variables.** The independent variable is
   sigma = log(1 + t / t_s), with t_s the event's own explosion time scale, and the
   state is (b, u) with u the relative velocities and b = r - u t. Late in the
   explosion u -> u_inf - C / t and b grows like log t, so in sigma both are smooth
   (exponentially decaying and linear): a fixed 56-step Dormand-Prince 5th-order grid,
   denser early, integrates every event in lockstep, with no per-event step control and
   no masks, to ~1e-8 relative accuracy for OCS and below 3e-7 for every charge channel
   and geometry tried (a pair that closes in, as with charges (3,2,1), needs the extra
   steps: 40 steps suffice for (2,2,2) but leave 4e-6 there).
3. **Analytic tail.** At the stopping time (residual potential energy ~1e-4 of the
   total) each pair is continued on a straight line and the remaining Coulomb impulse
   is integrated in closed form. The neglected part is second order in the residual
   energy fraction (~1e-8), so no integration to t = 1e10 is needed.

On CPU, large batches run through a ``torch.compile``-fused step (the eager step is
memory-bound: about a hundred tiny element-wise kernels an evaluation); small batches,
batches that need gradients, and CUDA run eagerly. Float32 batches from rest (the
``fast`` accuracy level) compile the set-up and the tail as well, which would otherwise
cost as much as the dozen steps of that grid; float64 keeps its eager set-up, so that
OCS at high accuracy stays bit for bit what it always was.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flowrecon.systems.cei.constants import DEFAULT_CHARGES, MASSES

__all__ = [
    "IntegratorSettings",
    "asymptotic_momenta",
]

log = logging.getLogger(__name__)

# Dormand-Prince 5(4) weights: the 5th-order solution of its first six stages.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)

# Pair order used throughout: (C,O), (C,S), (O,S); pair vectors from the relative
# coordinates are d_CO = r1, d_CS = r2, d_OS = r2 - r1.
_PAIRS = ((0, 1), (0, 2), (1, 2))


@dataclass(frozen=True)
class IntegratorSettings:
    """Step grid of the explosion integrator.

    Attributes:
        steps: Dormand-Prince steps per event (6 force evaluations each).
        sigma_end: end of the log-time grid; t_end = t_s * (exp(sigma_end) - 1), about
            1e6 a.u. for OCS, where ~1e-4 of the energy is still potential.
        grid_power: the grid is sigma_end * (i / steps) ** grid_power; above 1 it is
            denser early, where the ions accelerate.
    """

    steps: int = 56
    sigma_end: float = 9.5
    grid_power: float = 1.5

    def grid(self) -> list[float]:
        """Return the sigma grid points, from 0 to ``sigma_end``."""
        return [self.sigma_end * (i / self.steps) ** self.grid_power for i in range(self.steps + 1)]


def _coefficients(
    charges: Sequence[float], masses: Sequence[float]
) -> tuple[list[float], list[list[float]]]:
    """Pair couplings k_ij = q_i q_j and the map from pair forces to relative accelerations."""
    q, m = [float(c) for c in charges], [float(v) for v in masses]
    k = [q[i] * q[j] for i, j in _PAIRS]
    m_c, m_o, m_s = m
    # a_O - a_C and a_S - a_C as combinations of k * d / |d|^3 for the pairs CO, CS, OS.
    w = [
        [1 / m_o + 1 / m_c, 1 / m_c, -1 / m_o],
        [1 / m_c, 1 / m_s + 1 / m_c, 1 / m_s],
    ]
    return k, w


def _pair_vectors(r1: list[torch.Tensor], r2: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    return [r1, r2, [b - a for a, b in zip(r1, r2)]]


def _derivative(
    b: list[torch.Tensor],
    u: list[torch.Tensor],
    sigma: torch.Tensor,
    t_s: torch.Tensor,
    k: list[float],
    w: list[list[float]],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """d(b, u)/d sigma; b and u hold the components of r1 then r2 (2*dim tensors each)."""
    dim = len(b) // 2
    t = t_s * torch.expm1(sigma)
    dt_dsigma = t + t_s
    r = [bi + ui * t for bi, ui in zip(b, u)]
    pairs = _pair_vectors(r[:dim], r[dim:])
    coef = []
    for kij, d in zip(k, pairs):
        inv = torch.rsqrt(sum(c * c for c in d))
        coef.append((kij * dt_dsigma) * inv * inv * inv)
    du = []
    for row in w:
        for axis in range(dim):
            du.append(sum(wij * cij * d[axis] for wij, cij, d in zip(row, coef, pairs)))
    db = [-a * t for a in du]
    return db, du


def _rk_step(
    b: list[torch.Tensor],
    u: list[torch.Tensor],
    sigma: torch.Tensor,
    h: torch.Tensor,
    t_s: torch.Tensor,
    k: list[float],
    w: list[list[float]],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One Dormand-Prince 5th-order step in sigma of size h."""
    stages: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    for c, row in zip(_DP_C, _DP_A):
        bs, us = list(b), list(u)
        for a, (kb, ku) in zip(row, stages):
            bs = [x + (h * a) * y for x, y in zip(bs, kb)]
            us = [x + (h * a) * y for x, y in zip(us, ku)]
        stages.append(_derivative(bs, us, sigma + c * h, t_s, k, w))
    for weight, (kb, ku) in zip(_DP_B, stages):
        if weight:
            b = [x + (h * weight) * y for x, y in zip(b, kb)]
            u = [x + (h * weight) * y for x, y in zip(u, ku)]
    return b, u


def _coulomb_tail(
    r: list[torch.Tensor], u: list[torch.Tensor], k: list[float], w: list[list[float]]
) -> list[torch.Tensor]:
    """Add the impulse each pair still receives when continued on a straight line.

    For d(tau) = d0 + v tau, int_0^inf d / |d|^3 dtau = d0 * I0 + v * I1 with
    I0 = 1 / (|d0| (|d0||v| + d0.v)) and I1 = 1 / (|v| (|d0||v| + d0.v)): the usual
    closed forms rewritten so that they stay finite for radial (collinear) motion.
    """
    dim = len(r) // 2
    pairs_r = _pair_vectors(r[:dim], r[dim:])
    pairs_v = _pair_vectors(u[:dim], u[dim:])
    kicks = []
    for kij, d, v in zip(k, pairs_r, pairs_v):
        dd = torch.sqrt(sum(c * c for c in d))
        vv = torch.sqrt(sum(c * c for c in v))
        s = dd * vv + sum(a * b for a, b in zip(d, v))
        i0, i1 = kij / (dd * s), kij / (vv * s)
        kicks.append([i0 * dc + i1 * vc for dc, vc in zip(d, v)])
    out = list(u)
    for row_index, row in enumerate(w):
        for axis in range(dim):
            out[row_index * dim + axis] = out[row_index * dim + axis] + sum(
                wij * kick[axis] for wij, kick in zip(row, kicks)
            )
    return out


_COMPILED: dict[tuple, Callable] = {}
_MIN_COMPILED_CHUNK = 1 << 14


def _stepper(compiled: bool) -> Callable:
    if not compiled:
        return _rk_step
    key = ("rk",)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_rk_step, dynamic=False)
    return _COMPILED[key]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _planar_start(x: torch.Tensor, k: Sequence[float], mu_min: float):
    """Plane axes, in-plane relative coordinates and t_s of positions (B, 3, 3), by component.

    The same quantities as the eager path (:func:`_plane_basis`, :func:`_time_scale`)
    written over ``(B,)`` components, so that ``torch.compile`` fuses them into one loop.
    """
    r1 = [x[:, 1, i] - x[:, 0, i] for i in range(3)]
    r2 = [x[:, 2, i] - x[:, 0, i] for i in range(3)]
    n1, n2 = torch.sqrt(_dot(r1, r1)), torch.sqrt(_dot(r2, r2))
    e_a = [c / n1 for c in r1]
    along = _dot(r2, e_a)
    perp = [c - along * e for c, e in zip(r2, e_a)]
    norm = torch.sqrt(_dot(perp, perp))
    # Fallback axis for collinear atoms: the lab axis least aligned with e_a (the first
    # of equals, as argmin picks), made perpendicular.
    ax = [e.abs() for e in e_a]
    first = (ax[0] <= ax[1]) & (ax[0] <= ax[2])
    second = ~first & (ax[1] <= ax[2])
    axis = [first.to(x.dtype), second.to(x.dtype), (~first & ~second).to(x.dtype)]
    proj = _dot(axis, e_a)
    fallback = [a - proj * e for a, e in zip(axis, e_a)]
    fallback_norm = torch.sqrt(_dot(fallback, fallback))
    collinear = norm <= 1e-12 * n2
    divisor = torch.where(collinear, 1.0, norm)
    e_b = [torch.where(collinear, f / fallback_norm, c / divisor) for f, c in zip(fallback, perp)]
    b = [n1, _dot(r1, e_b), along, _dot(r2, e_b)]
    d = [n1, n2, torch.sqrt(sum((c2 - c1) ** 2 for c1, c2 in zip(r1, r2)))]
    potential = k[0] / d[0] + k[1] / d[1] + k[2] / d[2]
    t_s = torch.minimum(torch.minimum(d[0], d[1]), d[2]) / torch.sqrt(2 * potential / mu_min)
    return b, t_s, e_a, e_b


def _planar_finish(
    b: list[torch.Tensor],
    u: list[torch.Tensor],
    t_end: torch.Tensor,
    e_a: list[torch.Tensor],
    e_b: list[torch.Tensor],
    k: list[float],
    w: list[list[float]],
    masses: Sequence[float],
) -> torch.Tensor:
    """Analytic tail and lab-frame momenta (B, 3, 3) from the in-plane state at t_end."""
    u = _coulomb_tail([bi + ui * t_end for bi, ui in zip(b, u)], u, k, w)
    rel1 = [u[0] * a + u[1] * c for a, c in zip(e_a, e_b)]
    rel2 = [u[2] * a + u[3] * c for a, c in zip(e_a, e_b)]
    m_c, m_o, m_s = masses
    total = m_c + m_o + m_s
    v_c = [-(m_o * a + m_s * c) / total for a, c in zip(rel1, rel2)]
    atoms = [
        torch.stack([m_c * v for v in v_c], -1),
        torch.stack([m_o * (v + a) for v, a in zip(v_c, rel1)], -1),
        torch.stack([m_s * (v + c) for v, c in zip(v_c, rel2)], -1),
    ]
    return torch.stack(atoms, 1)


def _explode_planar_fused(
    x: torch.Tensor,
    masses: Sequence[float],
    k: list[float],
    w: list[list[float]],
    settings: IntegratorSettings,
) -> torch.Tensor:
    """:func:`_explode_chunk` from rest with every stage compiled, for float32 batches.

    The eager set-up and tail around the fused steps cost as much as 16 steps of the
    float32 step; compiled as well, they cost a few percent. Float64 keeps the eager
    set-up, so that OCS at high accuracy stays bit for bit what it always was.
    """
    m = [float(v) for v in masses]
    mu_min = min(m[i] * m[j] / (m[i] + m[j]) for i, j in _PAIRS)
    start = _compiled("planar_start", _planar_start)
    finish = _compiled("planar_finish", _planar_finish)
    b, t_s, e_a, e_b = start(x, tuple(k), mu_min)
    u = [torch.zeros_like(b[0]) for _ in range(4)]
    b, u = _run_grid(_stepper(True), b, u, t_s, k, w, settings, x)
    return finish(b, u, t_s * math.expm1(settings.grid()[-1]), e_a, e_b, k, w, m)


def _run_grid(step: Callable, b, u, t_s, k, w, settings: IntegratorSettings, like: torch.Tensor):
    """Steps the state ``(b, u)`` over the settings' sigma grid."""
    grid = settings.grid()
    for s0, s1 in zip(grid[:-1], grid[1:]):
        sigma = torch.tensor(s0, dtype=like.dtype, device=like.device)
        h = torch.tensor(s1 - s0, dtype=like.dtype, device=like.device)
        b, u = step(b, u, sigma, h, t_s, k, w)
    return b, u


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _plane_basis(r1: torch.Tensor, r2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal in-plane axes (e_a along r1, e_b in the plane of r1 and r2).

    For collinear atoms any axis perpendicular to r1 serves, since the motion stays on
    the line.
    """
    e_a = r1 / torch.linalg.vector_norm(r1, dim=-1, keepdim=True)
    perp = r2 - (r2 * e_a).sum(-1, keepdim=True) * e_a
    norm = torch.linalg.vector_norm(perp, dim=-1, keepdim=True)
    # Fallback axis: the lab axis least aligned with e_a, made perpendicular.
    eye = torch.eye(3, dtype=r1.dtype, device=r1.device)
    axis = eye[torch.argmin(e_a.abs(), dim=-1)]
    fallback = axis - (axis * e_a).sum(-1, keepdim=True) * e_a
    fallback = fallback / torch.linalg.vector_norm(fallback, dim=-1, keepdim=True)
    scale = torch.linalg.vector_norm(r2, dim=-1, keepdim=True)
    collinear = norm <= 1e-12 * scale
    e_b = torch.where(collinear, fallback, perp / torch.where(collinear, 1.0, norm))
    return e_a, e_b


def _time_scale(
    pair_d: torch.Tensor,
    k: torch.Tensor,
    potential: torch.Tensor,
    kinetic_rel: torch.Tensor,
    m: torch.Tensor,
) -> torch.Tensor:
    """The event's explosion time scale t_s (a.u.), which sets the log-time grid."""
    mu_min = torch.min(torch.stack([m[0] * m[1] / (m[0] + m[1]), m[0] * m[2] / (m[0] + m[2]),
                                    m[1] * m[2] / (m[1] + m[2])]))  # fmt: skip
    return pair_d.min(-1).values / torch.sqrt(2 * (potential + kinetic_rel) / mu_min)


def _explode_chunk(
    x: torch.Tensor,
    v0: torch.Tensor | None,
    masses: torch.Tensor,
    k: list[float],
    w: list[list[float]],
    settings: IntegratorSettings,
    compiled: bool,
    general: bool = False,
) -> torch.Tensor:
    """Asymptotic momenta (B, 3, 3) for positions (B, 3, 3) and initial velocities."""
    # Planar reduction: from rest without gradients (its basis is singular for exactly
    # collinear atoms, harmless for values but not for derivatives, which forward-mode
    # differentiation needs too: it sets general=True).
    planar = v0 is None and not x.requires_grad and not general
    if compiled and planar and x.dtype == torch.float32:
        return _explode_planar_fused(x, masses.tolist(), k, w, settings)
    r1, r2 = x[:, 1] - x[:, 0], x[:, 2] - x[:, 0]
    if v0 is None:
        u1 = u2 = torch.zeros_like(r1)
        centre_velocity = torch.zeros_like(r1)
    else:
        u1, u2 = v0[:, 1] - v0[:, 0], v0[:, 2] - v0[:, 0]
        centre_velocity = (masses[:, None] * v0).sum(1) / masses.sum()

    if planar:
        e_a, e_b = _plane_basis(r1, r2)
        b = [(r1 * e_a).sum(-1), (r1 * e_b).sum(-1), (r2 * e_a).sum(-1), (r2 * e_b).sum(-1)]
        u = [torch.zeros_like(b[0]) for _ in range(4)]
    else:
        b = [r1[:, i] for i in range(3)] + [r2[:, i] for i in range(3)]
        u = [u1[:, i] for i in range(3)] + [u2[:, i] for i in range(3)]

    # The event's time scale: time to cross its shortest pair distance at the speed
    # the lightest reduced mass would reach with all the energy.
    pair_d = torch.stack([r1, r2, r2 - r1], 1).norm(dim=-1)
    kk = torch.tensor(k, dtype=x.dtype, device=x.device)
    potential = (kk / pair_d).sum(-1)
    kinetic_rel = torch.zeros_like(potential)
    if v0 is not None:
        kinetic_rel = 0.5 * (masses * (v0 - centre_velocity[:, None]).pow(2).sum(-1)).sum(-1)
    m = masses
    t_s = _time_scale(pair_d, kk, potential, kinetic_rel, m)

    b, u = _run_grid(_stepper(compiled), b, u, t_s, k, w, settings, x)

    t_end = t_s * math.expm1(settings.grid()[-1])
    r = [bi + ui * t_end for bi, ui in zip(b, u)]
    u = _coulomb_tail(r, u, k, w)

    if planar:
        rel1 = u[0][:, None] * e_a + u[1][:, None] * e_b
        rel2 = u[2][:, None] * e_a + u[3][:, None] * e_b
    else:
        rel1 = torch.stack(u[:3], -1)
        rel2 = torch.stack(u[3:], -1)
    v_c = centre_velocity - (m[1] * rel1 + m[2] * rel2) / m.sum()
    velocities = torch.stack([v_c, v_c + rel1, v_c + rel2], 1)
    return velocities * m[:, None]


def _as_tensor(value, name: str, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.shape[-1:] != (9,) and t.shape[-2:] != (3, 3):
        raise ValueError(
            f"{name} must have shape (..., 9) ordered C, O, S times x, y, z, "
            f"or (..., 3, 3); got {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def asymptotic_momenta(
    positions: torch.Tensor | np.ndarray,
    initial_momenta: torch.Tensor | np.ndarray | None = None,
    *,
    charges: Sequence[float] = DEFAULT_CHARGES,
    masses: Sequence[float] = MASSES,
    settings: IntegratorSettings | None = None,
    chunk_size: int = 1 << 20,
    compile: bool | None = None,
    progress: bool = False,
    general: bool = False,
) -> torch.Tensor | np.ndarray:
    """Final (t -> infinity) momenta of a Coulomb explosion of C, O and S ions.

    Args:
        positions: initial positions in bohr, shape (..., 9) or (..., 3, 3), atoms C, O, S.
        initial_momenta: optional initial momenta in a.u., same shape; default at rest.
        charges: ion charges (C, O, S) in units of e.
        masses: ion masses in electron masses.
        settings: integrator grid; the default reaches ~1e-8 relative accuracy.
        chunk_size: events integrated together (bounds memory).
        compile: fuse the integrator step with ``torch.compile``; ``None`` does so for
            CPU batches of 300,000 events or more that need no gradient (the first
            compilation of a batch shape takes ~30 s; eager runs ~10,000 events/s).
        progress: show a progress bar over chunks.
        general: integrate in 3-D even from rest (the planar shortcut is not
            differentiable at exactly collinear geometries); set for forward-mode
            derivatives, which ``requires_grad`` does not reveal.

    Returns:
        Momenta in a.u. with the shape of ``positions``: a numpy array for numpy input,
        else a tensor on the input's device and dtype (float64 unless given otherwise).
        Differentiable with respect to tensor positions (and initial momenta).

    Example:
        >>> import numpy as np
        >>> x = np.array([0, 0, 0, -2.19, 0, 0, 2.95, 0, 0], dtype=float)
        >>> p = asymptotic_momenta(x)
        >>> bool(abs(p.reshape(3, 3).sum(0)).max() < 1e-9)   # total momentum stays zero
        True
    """
    is_numpy = not isinstance(positions, torch.Tensor)
    if is_numpy:
        dtype, device = torch.float64, torch.device("cpu")
    else:
        dtype = positions.dtype if positions.is_floating_point() else torch.float64
        device = positions.device
    x = _as_tensor(positions, "positions", dtype, device)
    out_shape = x.shape
    x = x.reshape(-1, 3, 3)
    v0 = None
    m = torch.as_tensor(masses, dtype=dtype, device=device)
    if initial_momenta is not None:
        p0 = _as_tensor(initial_momenta, "initial_momenta", dtype, device)
        if p0.numel() != x.numel():
            raise ValueError(
                f"initial_momenta has shape {tuple(p0.shape)} but positions has "
                f"{tuple(out_shape)}; they must describe the same events"
            )
        v0 = p0.reshape(-1, 3, 3) / m[:, None]
    if len(charges) != 3 or min(charges) <= 0:
        raise ValueError(f"charges must be three positive numbers (C, O, S), got {charges}")
    settings = settings or IntegratorSettings()
    k, w = _coefficients(charges, masses)

    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (v0 is not None and v0.requires_grad)
    )
    if compile is None:
        compile = x.device.type == "cpu" and x.shape[0] >= 300_000 and not needs_grad
    n = x.shape[0]
    if compile:
        # Static shapes fuse best; pad to a power-of-two bucket so that few shapes are
        # ever compiled (torch.compile recompiles for every new size).
        chunk_size = min(chunk_size, max(_MIN_COMPILED_CHUNK, 1 << max(n - 1, 1).bit_length()))
    chunks = range(0, n, chunk_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, total=math.ceil(n / chunk_size), unit="chunk", desc="explode")
    parts = []
    for start in chunks:
        stop = min(start + chunk_size, n)
        xc, vc = x[start:stop], None if v0 is None else v0[start:stop]
        pad = chunk_size - (stop - start) if compile else 0
        if pad:
            # Repeat the last event: a valid geometry, so the padding stays finite.
            xc = torch.cat([xc, xc[-1:].expand(pad, 3, 3)])
            vc = None if vc is None else torch.cat([vc, vc[-1:].expand(pad, 3, 3)])
        parts.append(_explode_chunk(xc, vc, m, k, w, settings, compile, general)[: stop - start])
    p = torch.cat(parts) if parts else x.new_zeros((0, 3, 3))
    p = p.reshape(out_shape)
    return p.detach().cpu().numpy() if is_numpy else p
