"""Exchangeable-particle spline flow: a density over N identical particles in a box.

A generic flow on R^(N D) learns the N-body configuration as one long vector and has no
notion of two particles being close. This one works particle by particle:

- model space holds each coordinate as ``u = logit(c / L)`` (the LJ box transform); the
  flow's first step is ``t = tanh(u / 2) = 2 c / L - 1``, the position in [-1, 1]^D;
- each coupling layer moves one axis ``a`` of half of the particles with a monotone
  rational-quadratic spline on [-1, 1] (a draw never leaves the box); which half moves
  is the parity of each particle's rank along another axis ``b``, which the layer leaves
  unchanged, so the split is a function of the fixed coordinates and the layer is
  exactly invertible;
- the spline of a moving particle i depends on its own fixed coordinates, the condition
  y and a neighbour map: ``m_i[k, c] = sum_j R_k(d_ij) E_c(t_ja)``, radial functions of
  the distance d_ij across the fixed axes times bumps of each fixed neighbour's
  coordinate along ``a`` (plus a channel counting moving neighbours). That is a
  histogram of where the neighbours sit along the moving axis, weighted by how close
  they are across it: what the spline needs to leave a hole where a neighbour sits;
- with a hard core (``core > 0``) the data side starts with a sweep of N layers that
  each move one particle along the last axis, and carve out of its range the intervals
  where it would sit closer than ``core`` to a particle ranked after it
  (`_Carving`). Sampling runs the sweep from the last particle to the first, so each
  particle is placed clear of every particle already in place: a draw has a pair
  closer than ``core`` only where a particle's whole column is blocked (it then stays
  where it was) or, with a probability of about 1e-6, inside a squeezed interval;
- the last step ``z = sqrt(2) erfinv(t)`` gives a standard normal base.

Nothing depends on a particle's label, so the density is symmetric under permutations
of the particles. With ``ordered=True`` (inputs sorted along the last axis, the LJ
canonical order) the N! labellings of a configuration fold onto the ordered one:
``log_prob`` adds log N! and ``sample`` returns particles sorted along the last axis.

Example:
    >>> flow = build_particle_flow(12, 2, particle_dim=3, rounds=1, hidden=8)
    >>> flow.sample(5, torch.zeros(4, 2)).shape
    torch.Size([5, 4, 12])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from zuko.transforms import MonotonicRQSTransform

from flowrecon.models._estimator import Estimator, standard_normal_log_prob
from flowrecon.nn import activation_class, check_at_least, check_conditional_dims

#: Largest |t| kept in float arithmetic: erfinv and atanh stay finite.
_T_MAX = 1.0 - 1e-6


def _bumps(v: Tensor, low: float, high: float, count: int) -> Tensor:
    """Hat functions ``(..., count)`` of v, peaks evenly spaced on [low, high].

    Neighbouring hats sum to one inside the range (linear interpolation onto the grid),
    and they cost a few cheap element-wise passes, where Gaussians cost an exp: the pair
    tensors are the bulk of a coupling layer's work.
    """
    grid = torch.arange(count, device=v.device, dtype=v.dtype)
    scaled = (v[..., None] - low) * ((count - 1) / (high - low))
    return (1.0 - (scaled - grid).abs()).clamp(min=0.0)


#: Weight of the carved intervals relative to the free ones: a draw lands in one with a
#: probability of about this times the interval's share; data there cost log(1e-6).
_HOLE_WEIGHT = 1e-6


class _Carving:
    """A piecewise-linear map of [-1, 1] onto itself that squeezes excluded intervals.

    For each moving particle, every fixed particle j closer across the moving axis than
    ``core`` excludes the interval ``t_ja +- sqrt(core^2 - d^2)``, where the pair would
    be closer than ``core``. ``forward`` maps the data coordinate x to
    ``F(x) = -1 + 2 g(x) / g(1)`` with ``g' = _HOLE_WEIGHT`` inside the union of the
    excluded intervals and 1 outside, so a uniform density in F's range lands outside the
    intervals but for a share of about 1e-6. The map depends on fixed coordinates only,
    so it is a coupling step; it is exact and cheap (sorting the intervals, a cumulative
    maximum, a search).

    Args:
        column: Every particle's coordinate along the moving axis ``(B, N)``.
        dist: Distances across the moving axis, moving to all ``(B, M, N)``.
        around: 1 for the fixed particles to carve around, 0 for the others ``(B, N)``.
        core: Exclusion distance, in the units of t.
    """

    def __init__(self, column: Tensor, dist: Tensor, around: Tensor, core: float) -> None:
        centre = column[:, None, :].expand_as(dist)
        half = (core**2 - dist.pow(2)).clamp(min=0.0).sqrt() * around[:, None, :]
        start = (centre - half).clamp(-1.0, 1.0)
        end = (centre + half).clamp(-1.0, 1.0)
        start, order = start.sort(dim=-1)
        end = end.gather(-1, order)
        # The part of interval i not covered by intervals 1..i-1 (sorted by start):
        # from max(start_i, max end before i) to end_i; these parts are disjoint and
        # in increasing order, so they are the union's pieces.
        reach = torch.cat([torch.full_like(end[..., :1], -1.0), end[..., :-1]], dim=-1)
        lo = torch.maximum(start, reach.cummax(dim=-1).values)
        hi = torch.maximum(end, lo)
        edge = torch.full_like(lo[..., :1], 1.0)
        self.knots = torch.cat([-edge, torch.stack([lo, hi], dim=-1).flatten(-2), edge], -1)
        slope = torch.ones_like(self.knots[..., 1:])
        slope[..., 1::2] = _HOLE_WEIGHT
        self.slope = slope
        steps = (self.knots.diff(dim=-1) * slope).cumsum(dim=-1)
        self.g = torch.cat([torch.zeros_like(edge), steps], dim=-1)
        self.total = self.g[..., -1:]

    def _segment(self, knots: Tensor, v: Tensor) -> Tensor:
        index = torch.searchsorted(knots.contiguous(), v[..., None].contiguous(), right=True)
        return (index - 1).clamp(0, knots.shape[-1] - 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``F(x)`` and ``log F'(x)`` for the moving coordinates ``(B, M)``."""
        seg = self._segment(self.knots, x)
        x0, g0 = self.knots.gather(-1, seg)[..., 0], self.g.gather(-1, seg)[..., 0]
        slope = self.slope.gather(-1, seg)[..., 0]
        total = self.total[..., 0]
        value = -1.0 + 2.0 * (g0 + slope * (x - x0)) / total
        return value, (2.0 * slope / total).log()

    def inverse(self, value: Tensor) -> Tensor:
        target = (value + 1.0) * 0.5 * self.total[..., 0]
        seg = self._segment(self.g, target)
        x0, g0 = self.knots.gather(-1, seg)[..., 0], self.g.gather(-1, seg)[..., 0]
        return x0 + (target - g0) / self.slope.gather(-1, seg)[..., 0]


class ParticleCoupling(nn.Module):
    """Moves axis ``axis`` of some particles, chosen by their ranks along ``rank_axis``.

    ``ranks = slice(p, None, 2)`` moves every other particle (half of them); ``slice(k,
    k + 1)`` moves the k-th one alone. With ``core > 0`` the moving particle's coordinate
    is first carved (`_Carving`): the intervals where it would sit closer than ``core``
    to a fixed particle are squeezed to a weight of ``_HOLE_WEIGHT``.
    """

    def __init__(
        self,
        n: int,
        dim: int,
        y_dim: int,
        axis: int,
        rank_axis: int,
        ranks: slice,
        *,
        bins: int,
        hidden: int,
        hidden_layers: int,
        radial: int,
        profile: int,
        cutoff: float,
        activation: str,
        core: float = 0.0,
    ) -> None:
        super().__init__()
        self.n, self.dim, self.axis, self.rank_axis, self.ranks = n, dim, axis, rank_axis, ranks
        self.bins, self.radial, self.profile, self.cutoff = bins, radial, profile, cutoff
        self.core = float(core)
        if self.core > 0 and (ranks.stop is None or ranks.stop - ranks.start != 1):
            raise ValueError("a carving layer moves one particle: ranks must be slice(k, k + 1)")
        self.across = [k for k in range(dim) if k != axis]
        width = radial * (profile + 1) + len(self.across) + y_dim
        act = activation_class(activation)
        layers: list[nn.Module] = []
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden), act()]
            width = hidden
        last = nn.Linear(width, 3 * bins - 1)
        nn.init.zeros_(last.weight)  # starts as the identity (uniform bins, unit slopes)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def _order(self, t: Tensor) -> Tensor:
        """Particle indices ``(B, N)`` by rank along rank_axis."""
        return t[..., self.rank_axis].argsort(dim=1)

    def _moving(self, t: Tensor) -> Tensor:
        """Indices ``(B, M)`` of the moving particles, by their ranks along rank_axis."""
        return self._order(t)[:, self.ranks]

    def _spline(
        self, t: Tensor, y: Tensor, moving: Tensor
    ) -> tuple[MonotonicRQSTransform, Tensor, Tensor]:
        """The moving particles' splines, distances across ``(B, M, N)``, fixed mask."""
        b, n, _ = t.shape
        fixed = torch.ones(b, n, device=t.device, dtype=t.dtype).scatter(1, moving, 0.0)
        # What each particle tells the others: where it sits along the moving axis (if
        # fixed), or only that it is there (if moving).
        told = torch.cat(
            [
                _bumps(t[..., self.axis], -1.0, 1.0, self.profile) * fixed[..., None],
                (1.0 - fixed)[..., None],
            ],
            dim=-1,
        )  # (B, N, P + 1)
        across = t[..., self.across]  # (B, N, D - 1)
        mine = across.gather(1, moving[..., None].expand(-1, -1, len(self.across)))
        dist = (mine[:, :, None, :] - across[:, None, :, :]).pow(2).sum(-1).add(1e-12).sqrt()
        # Smoothly to zero at the cutoff, so that the spline does not jump as a
        # neighbour crosses it.
        taper = (1.0 - (dist / self.cutoff).pow(2)).clamp(min=0.0).pow(2)
        self_pair = moving[..., None] == torch.arange(n, device=t.device)
        taper = taper.masked_fill(self_pair, 0.0)
        radial = _bumps(dist, 0.0, self.cutoff, self.radial) * taper[..., None]
        heard = torch.einsum("bmjk,bjc->bmkc", radial, told).flatten(2)
        cond = y[:, None, :].expand(-1, mine.shape[1], -1)
        params = self.net(torch.cat([heard, mine, cond], dim=-1))
        w, h, d = params.split([self.bins, self.bins, self.bins - 1], dim=-1)
        return MonotonicRQSTransform(w, h, d, bound=1.0), dist, fixed

    def _couple(self, t: Tensor, y: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        order = self._order(t)
        moving = order[:, self.ranks]
        spline, dist, _ = self._spline(t, y, moving)
        carving = None
        if self.core > 0:
            # Carve around the particles ranked after the moving ones only: in the
            # sampling direction those are already in place (this sweep runs from the
            # last rank to the first), while the earlier ones have yet to move.
            later = torch.zeros_like(t[..., 0]).scatter(1, order[:, self.ranks.stop :], 1.0)
            carving = _Carving(t[..., self.axis], dist, later, self.core)
        column = t[..., self.axis]
        old = column.gather(1, moving)
        if inverse:
            new, ladj = spline.inv(old), old.new_zeros(old.shape[0])
            if carving is not None:
                new = carving.inverse(new)
        else:
            ladj = old.new_zeros(old.shape)
            if carving is not None:
                old, ladj = carving.forward(old)
            new, step = spline.call_and_ladj(old)
            ladj = (ladj + step).sum(-1)
        new = new.clamp(-_T_MAX, _T_MAX)
        out = t.clone()
        out[..., self.axis] = column.scatter(1, moving, new)
        return out, ladj

    def forward(self, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Data direction to latent direction, with log|det|."""
        return self._couple(t, y, inverse=False)

    def inverse(self, t: Tensor, y: Tensor) -> Tensor:
        return self._couple(t, y, inverse=True)[0]


class ParticleFlow(Estimator):
    """Stack of `ParticleCoupling` layers between box coordinates and a normal base.

    Args:
        x_dim: N * particle_dim.
        y_dim: Width of the condition.
        particle_dim: Coordinates per particle (D).
        layers: The coupling layers, applied in order from data to latent.
        ordered: Inputs sorted along the last axis (see the module docstring).
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        particle_dim: int,
        layers: list[ParticleCoupling],
        ordered: bool,
    ) -> None:
        super().__init__(x_dim, y_dim)
        self.dim = int(particle_dim)
        self.n = x_dim // self.dim
        self.layers = nn.ModuleList(layers)
        self.ordered = bool(ordered)
        self.log_labellings = math.lgamma(self.n + 1) if ordered else 0.0

    def to_latent(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        u = x.reshape(x.shape[0], self.n, self.dim)
        t = torch.tanh(0.5 * u).clamp(-_T_MAX, _T_MAX)
        # dt/du = 2 s (1 - s) with s = sigmoid(u), in a form that never underflows.
        ladj = (math.log(2.0) + nn.functional.logsigmoid(u) + nn.functional.logsigmoid(-u)).sum(
            (1, 2)
        )
        for layer in self.layers:
            t, step = layer(t, y)
            ladj = ladj + step
        z = math.sqrt(2.0) * torch.erfinv(t)
        # dz/dt = sqrt(pi / 2) exp(z^2 / 2)
        ladj = ladj + (0.5 * math.log(math.pi / 2.0) + 0.5 * z.pow(2)).sum((1, 2))
        return z.reshape(x.shape[0], -1), ladj

    def from_latent(self, z: Tensor, y: Tensor) -> Tensor:
        t = torch.erf(z.reshape(z.shape[0], self.n, self.dim) / math.sqrt(2.0))
        t = t.clamp(-_T_MAX, _T_MAX)
        for layer in reversed(self.layers):
            t = layer.inverse(t, y)
        if self.ordered:  # the canonical order: ascending along the last axis
            order = t[..., -1].argsort(dim=1)
            t = t.gather(1, order[..., None].expand(-1, -1, self.dim))
        return (2.0 * torch.atanh(t)).reshape(z.shape[0], -1)

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        z, ladj = self.to_latent(x, y)
        return standard_normal_log_prob(z) + ladj + self.log_labellings

    def sample(self, n: int, y: Tensor, temperature: float = 1.0) -> Tensor:
        n, b = int(n), y.shape[0]
        z = temperature * torch.randn(n * b, self.x_dim, device=y.device, dtype=y.dtype)
        x = self.from_latent(z, y.repeat(n, 1))
        return x.reshape(n, b, self.x_dim)


def build_particle_flow(
    x_dim: int,
    y_dim: int,
    *,
    particle_dim: int = 3,
    box: float = 5.0,
    rounds: int = 2,
    bins: int = 16,
    hidden: int = 64,
    hidden_layers: int = 2,
    radial: int = 8,
    profile: int = 16,
    cutoff: float = 1.5,
    core: float = 0.0,
    ordered: bool = True,
    activation: str = "silu",
) -> Estimator:
    """Builds an exchangeable-particle spline flow (`ParticleFlow`).

    Model space must be ``logit(c / box)`` per coordinate, particle after particle (the
    LJ box transform, no whitening, no scaling).

    Args:
        x_dim: N * particle_dim.
        y_dim: Width of the condition.
        particle_dim: Coordinates per particle (2 or 3).
        box: Side of the box the coordinates live in (their logit is of c / box).
        rounds: Each round moves every axis of both halves once (2 D coupling layers).
        bins: Spline bins across the box.
        hidden: Width of each coupling network's hidden layers.
        hidden_layers: Hidden layers of each coupling network.
        radial: Radial functions of the neighbour map.
        profile: Bumps along the moving axis in the neighbour map.
        cutoff: Range of the neighbour map, in the units of box.
        core: With core > 0, the data side starts with one sweep of N single-particle
            layers along the last axis, each carving out the places closer than core to
            another particle (the module docstring says when a draw can still have
            such a pair). Training data with such a pair cost log(1e-6) each: keep core
            below the closest pair of the data (0.85 sigma in the built-in LJ set).
        ordered: Inputs in canonical order along the last axis.
        activation: Activation of the coupling networks.

    Example:
        >>> flow = build_particle_flow(8, 1, particle_dim=2, rounds=1, hidden=8)
        >>> flow.log_prob(torch.zeros(3, 8), torch.zeros(3, 1)).shape
        torch.Size([3])
    """
    check_conditional_dims("particle-flow", x_dim, y_dim)
    check_at_least(
        particle_dim=(particle_dim, 2),
        rounds=rounds,
        bins=(bins, 2),
        hidden=hidden,
        hidden_layers=(hidden_layers, 0),
        radial=(radial, 2),
        profile=(profile, 2),
    )
    if x_dim % particle_dim:
        raise ValueError(f"x_dim={x_dim} is not a multiple of particle_dim={particle_dim}")
    if not (box > 0 and cutoff > 0 and core >= 0):
        raise ValueError(
            f"need box > 0, cutoff > 0 and core >= 0, got box={box}, cutoff={cutoff}, core={core}"
        )
    n, unit = x_dim // particle_dim, 2.0 / box  # t = 2 c / box - 1
    shared = dict(
        bins=bins,
        hidden=hidden,
        hidden_layers=hidden_layers,
        radial=radial,
        profile=profile,
        cutoff=cutoff * unit,
        activation=activation,
    )
    layers = []
    if core > 0:  # one particle at a time along the last axis, split along the first
        for k in range(n):
            layers.append(
                ParticleCoupling(
                    n,
                    particle_dim,
                    y_dim,
                    particle_dim - 1,
                    0,
                    slice(k, k + 1),
                    core=core * unit,
                    **shared,
                )
            )
    for r in range(rounds):
        for axis in range(particle_dim):
            # Both halves are split along the same axis, so each particle moves once
            # per axis per round; the splitting axis changes from round to round.
            rank_axis = (axis + 1 + r % (particle_dim - 1)) % particle_dim
            for parity in (0, 1):
                layers.append(
                    ParticleCoupling(
                        n,
                        particle_dim,
                        y_dim,
                        axis,
                        rank_axis,
                        slice(parity, None, 2),
                        **shared,
                    )
                )
    return ParticleFlow(x_dim, y_dim, particle_dim, layers, ordered)
