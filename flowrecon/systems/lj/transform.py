"""The chamber transform: ordered configurations in the box <-> unconstrained coordinates.

Canonical-order configurations live in a bounded, constrained set: every coordinate in
(0, L) and the heights sorted, h_0 <= h_1 <= ... <= h_(N-1). A density model asked to
put its mass there spills some outside (particles through the walls, heights out of
order: draws with zero Boltzmann weight). This pair transform maps the set one-to-one
onto R^(N D), so that every draw is a valid ordered configuration in the box and the
model's density is normalised on it:

- horizontal coordinates c: u = logit(c / L);
- heights, by stick-breaking: s_0 = h_0 / L, s_k = (h_k - h_(k-1)) / (L - h_(k-1)), each
  in (0, 1), then v_k = logit(s_k). Inverse: L - h_k = L prod_(j <= k) (1 - s_j).

Its log|det| (the forward map's, per row) is
sum_c log(L / (c (L - c))) + sum_k [-log(L - h_(k-1)) - log s_k - log(1 - s_k)]
with h_(-1) = 0, so `flowrecon.ConditionalGenerator.log_prob` reports the density of
ordered configurations in the user's coordinates (`tests/test_lj_transform.py` checks
it against autograd).

The transform has no fitted state, but it needs N, D and L, which a width alone does not
give: one class is made per (D, L) on demand, named ``Chamber_d{D}_L{L}``, and
registered as the pair transform ``lj-chamber-d{D}-L{L}`` (`chamber_transform_name`)
when the system is made.

The box transform (``lj-box-d{D}-L{L}``, `box_transform_name`, the system's default since
it fits better) maps every coordinate alone, u = logit(c / L), heights included. Why not
the chamber: in stick-breaking, L - h_k is a product of k + 1 factors, so the model's
small errors in the fractions compound along the column of particles, and since
log(1 - s) is concave in logit(s) they compound with one sign: a fitted model puts every
particle too high. Measured (5 min of zuko-nsf on the built-in set, `benchmarks/README`):
mean height 8-15 % high through the chamber, 0.7-4.5 % through the box; density profile
26-59 % off against 15-19 %. The price: a draw is always inside the box but not always in
canonical order (the model learns the order; the evaluator reports the unordered
fraction, and reweighting gives such draws zero weight, since the ordered target
vanishes there). Densities stay exact: the box map is one-to-one on R^(N D).
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

import torch
from torch import Tensor

from flowrecon.preprocessing import PAIR_TRANSFORMS, PairTransform, register_pair_transform

__all__ = ["BoxTransform", "ChamberTransform", "box_transform_name", "chamber_transform_name"]

#: Fractions are kept this far from 0 and 1 so that logits stay finite.
EPS = 1e-12


class ChamberTransform(PairTransform):
    """Ordered configurations ``(..., N * D)`` in [0, L]^(N D) <-> R^(N D).

    Subclasses fix ``dim`` and ``box`` (see the module docstring); ``N`` is the width
    over ``dim``.

    Example:
        >>> t = _chamber_class(2, 3.0)()
        >>> x = torch.tensor([[1.0, 0.5, 2.0, 1.5, 0.2, 2.9]], dtype=torch.float64)
        >>> torch.allclose(t.inverse_x(t.forward_x(x, None), None), x)
        True
    """

    name: ClassVar[str] = ""
    dim: ClassVar[int] = 3
    box: ClassVar[float] = 5.0

    def __init__(self) -> None:
        if not self.name:  # the bare family, "lj-box" without its dimension and box
            raise ValueError(
                "an LJ transform needs its dimension and box in its name, e.g. lj-box-d3-L5 "
                "(box_transform_name(dim, box) makes it)"
            )

    def fit(self, x: Tensor, y: Tensor) -> ChamberTransform:
        if x.shape[-1] % self.dim:
            raise ValueError(
                f"{self.name}: x has {x.shape[-1]} columns, not a multiple of dim={self.dim}"
            )
        h = x.reshape(*x.shape[:-1], -1, self.dim)[..., -1]
        if (x <= 0).any() or (x >= self.box).any() or (h.diff(dim=-1) < 0).any():
            raise ValueError(
                f"{self.name}: x must be configurations in canonical (height) order strictly "
                f"inside the box (0, {self.box}); prepare the table with the system first"
            )
        return self

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = x.reshape(*x.shape[:-1], -1, self.dim)
        return c[..., :-1], c[..., -1]

    def _fractions(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Stick-breaking fractions s and the remaining heights L - h_(k-1)."""
        below = torch.cat([torch.zeros_like(h[..., :1]), h[..., :-1]], -1)
        room = self.box - below
        s = ((h - below) / room).clamp(EPS, 1 - EPS)
        return s, room

    def forward_x(self, x: Tensor, y: Tensor) -> Tensor:
        flat, h = self._split(x)
        u = torch.logit((flat / self.box).clamp(EPS, 1 - EPS))
        s, _ = self._fractions(h)
        v = torch.logit(s)
        return torch.cat([u, v.unsqueeze(-1)], -1).reshape(x.shape)

    def inverse_x(self, x_model: Tensor, y: Tensor) -> Tensor:
        flat, v = self._split(x_model)
        c = self.box * torch.sigmoid(flat)
        # L - h_k = L prod_(j <= k) (1 - s_j), with log(1 - s) = logsigmoid(-v) (stable).
        h = self.box * -torch.expm1(torch.cumsum(torch.nn.functional.logsigmoid(-v), -1))
        return torch.cat([c, h.unsqueeze(-1)], -1).reshape(x_model.shape)

    def log_abs_det_x(self, x: Tensor, y: Tensor) -> Tensor:
        flat, h = self._split(x)
        c = flat.clamp(EPS * self.box, self.box * (1 - EPS))
        horizontal = (math.log(self.box) - torch.log(c) - torch.log(self.box - c)).sum((-1, -2))
        s, room = self._fractions(h)
        vertical = (-torch.log(room) - torch.log(s) - torch.log1p(-s)).sum(-1)
        return horizontal + vertical

    def state_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "box": self.box}

    @classmethod
    def from_options(cls, text: str) -> ChamberTransform:
        """The transform for ``"d{D}-L{L}"``: how ``lj-chamber-d3-L5`` is rebuilt by name.

        Example:
            >>> BoxTransform.from_options("d3-L5").name
            'lj-box-d3-L5'
        """
        match = re.fullmatch(r"d([123])-L([0-9.eE+-]+)", text)
        box = float(match.group(2)) if match else math.nan
        if match is None or not (math.isfinite(box) and box > 0):
            raise ValueError(
                f"LJ transform options must read d{{D}}-L{{L}} (e.g. d3-L5), got {text!r}"
            )
        kind = "Box" if issubclass(cls, BoxTransform) else "Chamber"
        return _transform_class(kind, int(match.group(1)), box)()


class BoxTransform(ChamberTransform):
    """Configurations ``(..., N * D)`` in (0, L)^(N D) <-> R^(N D), coordinate by coordinate.

    u = logit(c / L) for every coordinate (see the module docstring for why heights are
    not stick-broken here). Draws are inside the box; canonical order is learned, not
    enforced.

    Example:
        >>> t = _transform_class("Box", 2, 3.0)()
        >>> x = torch.tensor([[1.0, 0.5, 2.0, 1.5, 0.2, 2.9]], dtype=torch.float64)
        >>> torch.allclose(t.inverse_x(t.forward_x(x, None), None), x)
        True
    """

    def forward_x(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.logit((x / self.box).clamp(EPS, 1 - EPS))

    def inverse_x(self, x_model: Tensor, y: Tensor) -> Tensor:
        return self.box * torch.sigmoid(x_model)

    def log_abs_det_x(self, x: Tensor, y: Tensor) -> Tensor:
        c = x.clamp(EPS * self.box, self.box * (1 - EPS))
        return (math.log(self.box) - torch.log(c) - torch.log(self.box - c)).sum(-1)


#: Transform kinds: class-name prefix -> (base class, pair transform name prefix).
_KINDS: dict[str, tuple[type[ChamberTransform], str]] = {
    "Chamber": (ChamberTransform, "lj-chamber"),
    "Box": (BoxTransform, "lj-box"),
}
_CLASSES: dict[tuple[str, int, float], type[ChamberTransform]] = {}


def _transform_class(kind: str, dim: int, box: float) -> type[ChamberTransform]:
    key = (kind, int(dim), float(box))
    if key not in _CLASSES:
        base, prefix = _KINDS[kind]
        name = _transform_name(prefix, key[1], key[2])
        _CLASSES[key] = type(
            _class_name(*key), (base,), {"name": name, "dim": key[1], "box": key[2]}
        )
    return _CLASSES[key]


def _chamber_class(dim: int, box: float) -> type[ChamberTransform]:
    return _transform_class("Chamber", dim, box)


def _class_name(kind: str, dim: int, box: float) -> str:
    return f"{kind}_d{dim}_L{float(box)!r}".replace(".", "p").replace("-", "m")


def _transform_name(prefix: str, dim: int, box: float) -> str:
    return f"{prefix}-d{int(dim)}-L{float(box):g}"


def __getattr__(attr: str) -> Any:
    """``Chamber_d3_L5p0`` / ``Box_d3_L5p0`` -> the class for D = 3, L = 5.0 (for `load`)."""
    match = re.fullmatch(r"(Chamber|Box)_d(\d)_L([0-9p]+(?:e[pm]?\d+)?)", attr)
    if match is None:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    box = float(match.group(3).replace("p", ".").replace("m", "-"))
    return _transform_class(match.group(1), int(match.group(2)), box)


def _registered(kind: str, dim: int, box: float, register: bool) -> str:
    name = _transform_name(_KINDS[kind][1], dim, box)
    if register and name not in PAIR_TRANSFORMS:
        path = f"{__name__}:{_class_name(kind, int(dim), float(box))}"
        register_pair_transform(name, path)
    return name


def chamber_transform_name(dim: int, box: float, *, register: bool = True) -> str:
    """The chamber transform's name for (D, L), registered with `flowrecon.preprocessing`.

    Example:
        >>> chamber_transform_name(3, 5.0)
        'lj-chamber-d3-L5'
    """
    return _registered("Chamber", dim, box, register)


def box_transform_name(dim: int, box: float, *, register: bool = True) -> str:
    """The box transform's name for (D, L), registered with `flowrecon.preprocessing`.

    Example:
        >>> box_transform_name(3, 5.0)
        'lj-box-d3-L5'
    """
    return _registered("Box", dim, box, register)
