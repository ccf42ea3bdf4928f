"""The sane region of model space, and the guard that keeps samples inside it.

A model's samples are drawn in model space, where the training targets are centred,
whitened and scaled (`flowrecon.preprocessing.Pipeline`). `Support` is a region learned
from those training rows: per coordinate, the training range widened on each side by
``margin`` times its width, and a ball whose radius is ``1 + margin`` times the largest
training norm. Every posterior of an event like the training events lies inside the
training support, so a sample outside this region is not posterior mass but a numerical
runaway (an affine flow amplifying a rare condition into 1e18 bohr, a NaN).

`redraw` replaces such samples: it draws again, for the affected events only, up to
``rounds`` times, and counts per event how many draws were outside (``redrawn``) and how
many were still outside after the last round (``unresolved``). An unresolved draw is
replaced by one of the same event's accepted draws, picked at random, so the event's
samples stay draws of its posterior truncated to the region; an event none of whose draws
landed inside gets its draws projected onto the region (coordinates that are not numbers
are set to the training mean). Nothing is clipped silently: ``unresolved`` counts it.

Why a box and a ball: whitened coordinates are uncorrelated but not Gaussian (a rare bend
puts training rows many standard deviations out along one axis), so a per-coordinate range
follows the data where a single Mahalanobis radius would be too tight along one axis and
too loose along the others; the ball removes the box's corners, which in D dimensions lie
sqrt(D) times further out than any training row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

#: Widening of the training range on each side, as a fraction of its width (and of the
#: largest training norm for the ball). A quarter of the range beyond the most extreme of
#: many thousand training rows is far past the posterior of any event like them, yet
#: runaways land orders of magnitude further out.
MARGIN = 0.25

#: Redraw rounds before the remaining draws outside count as unresolved.
ROUNDS = 10


class Support:
    """Box and ball in model space that hold the training rows with a margin.

    Example:
        >>> s = Support.fit(torch.tensor([[-1.0, 0.0], [1.0, 2.0]]))
        >>> s.inside(torch.tensor([[0.0, 1.0], [9.0, 1.0], [float("nan"), 0.0]])).tolist()
        [True, False, False]
    """

    def __init__(self, lo: Tensor, hi: Tensor, radius: float, margin: float = MARGIN) -> None:
        self.lo, self.hi, self.radius, self.margin = lo, hi, float(radius), float(margin)

    @classmethod
    def fit(cls, x: Tensor, margin: float = MARGIN) -> Support:
        """The region of the rows of x ``(N, D)`` (model space) widened by ``margin``."""
        x = x.detach().to(torch.float64)
        lo, hi = x.min(0).values, x.max(0).values
        width = hi - lo
        radius = (1 + margin) * float(x.norm(dim=-1).max())
        return cls(lo - margin * width, hi + margin * width, radius, margin)

    @classmethod
    def unbounded(cls, dim: int) -> Support:
        """The whole space: only draws that are not finite are outside."""
        inf = torch.full((dim,), torch.inf, dtype=torch.float64)
        return cls(-inf, inf, torch.inf, 0.0)

    def inside(self, x: Tensor) -> Tensor:
        """Whether each row of x ``(..., D)`` is finite and in the box and the ball."""
        lo, hi = self.lo.to(x), self.hi.to(x)
        in_box = (torch.isfinite(x) & (x >= lo) & (x <= hi)).all(-1)
        return in_box & (x.norm(dim=-1) <= self.radius)

    def project(self, x: Tensor) -> Tensor:
        """x moved into the region: NaN to 0 (the training mean), clipped, pulled into the ball."""
        lo, hi = self.lo.to(x), self.hi.to(x)
        x = torch.nan_to_num(x, nan=0.0).clamp(min=lo, max=hi)
        norm = x.norm(dim=-1, keepdim=True)
        return torch.where(norm > self.radius, x * (self.radius / norm), x)

    def limit(self) -> Tensor:
        """Per-coordinate magnitude of the region's far edge (at least 1)."""
        return torch.maximum(self.lo.abs(), self.hi.abs()).clamp_min(1.0)

    def to(self, device: torch.device | str) -> Support:
        self.lo, self.hi = self.lo.to(device), self.hi.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "lo": self.lo.detach().cpu(),
            "hi": self.hi.detach().cpu(),
            "radius": self.radius,
            "margin": self.margin,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Support:
        lo, hi, radius = state["lo"], state["hi"], float(state["radius"])
        if not (isinstance(lo, Tensor) and isinstance(hi, Tensor) and lo.shape == hi.shape):
            raise ValueError("the support bounds are not two tensors of one shape")
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all() and (lo <= hi).all()):
            raise ValueError("the support bounds are not finite, ordered numbers")
        if not 0 < radius < torch.inf:
            raise ValueError(f"the support radius {radius} is not a positive number")
        return cls(lo.to(torch.float64), hi.to(torch.float64), radius, float(state["margin"]))


def _take(pool: Tensor, usable: Tensor, rank: Tensor) -> Tensor:
    """For each slot, the usable pool draw of the slot's rank, per event.

    ``pool`` ``(m, e, D)``; ``usable`` ``(m, e)``: which pool draws may be used;
    ``rank`` ``(k, e)``: which of an event's usable draws (0: the first) each slot takes.
    Returns ``(k, e, D)``, meaningful where the rank is below the event's usable count.
    """
    order = torch.sort((~usable).to(torch.int8), dim=0, stable=True).indices  # usable first
    src = order.gather(0, rank.clamp(0, pool.shape[0] - 1))
    return pool.gather(0, src[..., None].expand(-1, -1, pool.shape[-1]))


def redraw(
    xs: Tensor,
    draw: Callable[[int, Tensor], Tensor],
    support: Support,
    *,
    rounds: int = ROUNDS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Replaces draws outside ``support`` (see the module docstring).

    Args:
        xs: Draws ``(k, B, D)`` in model space.
        draw: ``draw(m, events)`` returns m new draws ``(m, len(events), D)`` for the
            events (indices into B) it is given.
        support: The region.
        rounds: Redraw rounds.

    Returns:
        The draws, every one inside the region; per event the number of draws first
        outside (``redrawn``, ``(B,)``) and the number still outside after ``rounds``
        rounds and replaced (``unresolved``, ``(B,)``).

    Example:
        >>> s = Support.fit(torch.tensor([[-1.0], [1.0]]))
        >>> xs = torch.tensor([[[0.5], [1e18]], [[0.25], [0.75]]])
        >>> out, redrawn, unresolved = redraw(xs, lambda m, ev: torch.zeros(m, len(ev), 1), s)
        >>> out[:, :, 0].tolist(), redrawn.tolist(), unresolved.tolist()
        ([[0.5, 0.0], [0.25, 0.75]], [0, 1], [0, 0])
    """
    bad = ~support.inside(xs)
    redrawn = bad.sum(0)
    if not bad.any():
        return xs, redrawn, torch.zeros_like(redrawn)
    xs = xs.clone()
    for _ in range(rounds):
        events = bad.any(0).nonzero().flatten()
        if len(events) == 0:
            break
        bad_e = bad[:, events]
        m = int(bad_e.sum(0).max())
        new = draw(m, events).to(xs.dtype)
        good = support.inside(new)
        rank = bad_e.long().cumsum(0) - 1  # rank of each bad slot among its event's
        fill = bad_e & (rank < good.sum(0))
        taken = _take(new, good, rank)
        xs[:, events] = torch.where(fill[..., None], taken, xs[:, events])
        bad[:, events] = bad_e & ~fill
    unresolved = bad.sum(0)
    events = bad.any(0).nonzero().flatten()
    if len(events):
        bad_e = bad[:, events]
        sub = xs[:, events]
        good = ~bad_e
        n_good = good.sum(0)
        pick = (torch.rand(bad_e.shape, device=xs.device) * n_good.clamp_min(1)).long()
        taken = _take(sub, good, pick)
        fixed = torch.where((n_good > 0)[None, :, None], taken, support.project(sub))
        xs[:, events] = torch.where(bad_e[..., None], fixed, sub)
    return xs, redrawn, unresolved
