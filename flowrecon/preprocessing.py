"""Invertible preprocessing between the user's space and the model space.

The pipeline applied by `ConditionalGenerator` is, for the target x and the condition y::

    x_user --pair.forward_x(x, y)--> --Whitening--> --x_scaler--> x_model
    y_user --pair.forward_y(y)-----> --y_scaler--------------------> y_model

Everything is plain torch (differentiable, device-aware). State is saved as tensors and
plain values through ``state_dict()``, never as pickled objects, and rebuilt by name.

Densities. Each step reports ``log|det|`` of its forward map, so a density in model space
is reported in the user's space as ``log p_user(x|y) = log p_model(x_model|y_model) +
log|det d x_model / d x_user|``. `Whitening` drops null directions (linear constraints of
the training data such as a fixed centre of mass, or out-of-plane coordinates); the density
is then one on the affine subspace the training data span, with respect to the Lebesgue
measure of that subspace (a delta in the dropped directions, which is left out).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

#: Relative size below which a scale (std, range, IQR) counts as zero; such columns are
#: constant for all practical purposes and are shifted but not divided by ~0.
ZERO_SCALE_RTOL = 1e-9

SCALERS: tuple[str, ...] = ("standard", "minmax", "robust", "none")


def _like(t: Tensor, x: Tensor) -> Tensor:
    """The state tensor t on x's device and in x's dtype."""
    return t.to(device=x.device, dtype=x.dtype)


def _check_2d(x: Tensor, what: str) -> None:
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(
            f"{what} must be a non-empty 2-D (rows, columns) array, got {tuple(x.shape)}"
        )


def _safe_scale(scale: Tensor) -> Tensor:
    """Replaces zero (or negligible, or non-finite) column scales by 1."""
    finite = torch.isfinite(scale)
    ref = scale[finite].abs().max() if finite.any() else scale.new_tensor(0.0)
    ok = finite & (scale > ZERO_SCALE_RTOL * ref) & (scale > 0)
    return torch.where(ok, scale, torch.ones_like(scale))


def _quantile(x: Tensor, q: float) -> Tensor:
    """Column quantiles with linear interpolation (no size limit, unlike torch.quantile)."""
    s = x.sort(dim=0).values
    pos = q * (x.shape[0] - 1)
    lo = int(pos)
    hi = min(lo + 1, x.shape[0] - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


class Scaler:
    """Per-column affine scaler ``(x - shift) / scale``.

    Kinds: ``"standard"`` (mean, std), ``"minmax"`` (to [0, 1]), ``"robust"`` (median,
    interquartile range) and ``"none"``. Constant columns get scale 1, never inf or NaN.

    Example:
        >>> s = Scaler("standard").fit(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
        >>> s.forward(torch.tensor([[3.0, 5.0]]))
        tensor([[1., 0.]])
    """

    def __init__(self, kind: str = "standard") -> None:
        if kind not in SCALERS:
            raise ValueError(f"unknown scaler {kind!r}; choose one of: {', '.join(SCALERS)}")
        self.kind = kind
        self.shift: Tensor | None = None
        self.scale: Tensor | None = None

    def fit(self, x: Tensor) -> Scaler:
        """Learns shift and scale from the rows of x (computed in float64)."""
        _check_2d(x, "data to scale")
        x64 = x.detach().to(torch.float64)
        if self.kind == "standard":
            shift = x64.mean(0)
            scale = x64.std(0, correction=0)
        elif self.kind == "minmax":
            lo, hi = x64.min(0).values, x64.max(0).values
            shift, scale = lo, hi - lo
        elif self.kind == "robust":
            shift = _quantile(x64, 0.5)
            scale = _quantile(x64, 0.75) - _quantile(x64, 0.25)
            # Discrete columns can have a zero IQR yet vary: fall back to their std.
            scale = torch.where(scale > 0, scale, x64.std(0, correction=0))
        else:
            shift, scale = torch.zeros_like(x64[0]), torch.ones_like(x64[0])
        self.shift, self.scale = shift, _safe_scale(scale)
        return self

    def _state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.shift is None or self.scale is None:
            raise RuntimeError("Scaler is not fitted")
        if x.shape[-1] != self.shift.shape[0]:
            raise ValueError(f"expected {self.shift.shape[0]} columns, got {x.shape[-1]}")
        return _like(self.shift, x), _like(self.scale, x)

    def forward(self, x: Tensor) -> Tensor:
        shift, scale = self._state(x)
        return (x - shift) / scale

    def inverse(self, x: Tensor) -> Tensor:
        shift, scale = self._state(x)
        return x * scale + shift

    def log_abs_det(self) -> Tensor:
        """log|det| of the forward map (a constant), float64."""
        assert self.scale is not None, "Scaler is not fitted"
        return -self.scale.log().sum()

    def to(self, device: torch.device | str) -> Scaler:
        if self.shift is not None and self.scale is not None:
            self.shift, self.scale = self.shift.to(device), self.scale.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shift": self.shift, "scale": self.scale}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Scaler:
        s = cls(state["kind"])
        s.shift, s.scale = state["shift"], state["scale"]
        return s


class Whitening:
    """PCA whitening of x that drops null directions.

    Fit computes the covariance of the training x (float64) and keeps the eigen-directions
    whose variance exceeds ``rel_tol`` times the largest one. ``forward`` maps to the
    reduced whitened space ``(..., n_kept)``; ``inverse`` maps back and puts the dropped
    directions at their training mean, so results land on the training subspace in the
    user's own frame and units. ``log_abs_det()`` is ``log|det|`` of the forward map
    restricted to the kept subspace: densities reported through it are densities on that
    subspace (the dropped directions are deltas and contribute nothing).

    Variances are compared in the units of x (after the pair transform), which suits
    physical coordinates; for columns in very different units lower ``rel_tol`` or turn
    whitening off.

    Example:
        >>> x = torch.randn(100, 2) @ torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
        >>> w = Whitening().fit(x)
        >>> w.n_kept, torch.allclose(w.inverse(w.forward(x)), x, atol=1e-5)
        (2, True)
    """

    # The default keeps any direction whose std is above ~3e-5 of the largest: real
    # spreads (detector noise, zero-point motion) stay, while constraints that hold up to
    # rounding (float32 storage, CSV decimals, integration error) are dropped.
    def __init__(self, rel_tol: float = 1e-9) -> None:
        if not 0 <= rel_tol < 1:
            raise ValueError(f"rel_tol must be in [0, 1), got {rel_tol}")
        self.rel_tol = float(rel_tol)
        self.mean: Tensor | None = None
        self.basis: Tensor | None = None  # (D, k), orthonormal columns
        self.std: Tensor | None = None  # (k,), sqrt of the kept variances

    def fit(self, x: Tensor) -> Whitening:
        _check_2d(x, "x")
        x64 = x.detach().to(torch.float64)
        mean = x64.mean(0)
        xc = x64 - mean
        cov = xc.T @ xc / max(x64.shape[0] - 1, 1)
        if not torch.isfinite(cov).all():  # eigh would fail to converge, with no hint why
            raise ValueError(
                "x has values too large (or not finite) to whiten: its covariance overflows"
            )
        var, vec = torch.linalg.eigh(cov)  # ascending
        var, vec = var.flip(0), vec.flip(1)
        top = var[0].item()
        if not top > 0:
            raise ValueError("x is constant over the training set: there is nothing to model")
        keep = var > self.rel_tol * top
        vec = vec[:, keep]
        # Deterministic signs (largest component positive) so that refits agree.
        idx = vec.abs().argmax(0)
        vec = vec * torch.sign(vec[idx, torch.arange(vec.shape[1])])
        self.mean, self.basis, self.std = mean, vec, var[keep].sqrt()
        return self

    @property
    def dim(self) -> int:
        assert self.mean is not None, "Whitening is not fitted"
        return self.mean.shape[0]

    @property
    def n_kept(self) -> int:
        assert self.std is not None, "Whitening is not fitted"
        return self.std.shape[0]

    @property
    def n_dropped(self) -> int:
        return self.dim - self.n_kept

    def _state(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.mean is None or self.basis is None or self.std is None:
            raise RuntimeError("Whitening is not fitted")
        return _like(self.mean, x), _like(self.basis, x), _like(self.std, x)

    def forward(self, x: Tensor) -> Tensor:
        mean, basis, std = self._state(x)
        return ((x - mean) @ basis) / std

    def inverse(self, z: Tensor) -> Tensor:
        mean, basis, std = self._state(z)
        return (z * std) @ basis.T + mean

    def log_abs_det(self) -> Tensor:
        """log|det| of the forward map on the kept subspace (a constant), float64."""
        assert self.std is not None, "Whitening is not fitted"
        return -self.std.log().sum()

    def to(self, device: torch.device | str) -> Whitening:
        if self.mean is not None and self.basis is not None and self.std is not None:
            self.mean, self.basis, self.std = (
                t.to(device) for t in (self.mean, self.basis, self.std)
            )
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"rel_tol": self.rel_tol, "mean": self.mean, "basis": self.basis, "std": self.std}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Whitening:
        w = cls(state["rel_tol"])
        w.mean, w.basis, w.std = state["mean"], state["basis"], state["std"]
        return w


class PairTransform:
    """Protocol of condition-aware target transforms, applied before the scalers.

    A pair transform may look at y to transform x (e.g. rotate x into a frame built from
    y) but must never look at x to transform y: at inference time only y is known.

    Subclasses set ``name`` (the key in `PAIR_TRANSFORMS`) and override what they need.
    ``inverse_x`` must accept sample-first ``(n, B, Dx)`` with ``y`` of shape ``(B, Dy)``.
    ``log_abs_det_x`` is the forward map's log|det| per row (zero for rotations).
    A transform that takes options is named ``"NAME:OPTIONS"`` and built by
    ``from_options(OPTIONS)``; the whole spec is saved, so a loaded model rebuilds it.
    """

    name: ClassVar[str] = ""

    @classmethod
    def from_options(cls, text: str) -> PairTransform:
        """The transform made from the text after ``NAME:`` in its spec."""
        raise ValueError(f"transform {cls.name!r} takes no options, got {text!r}")

    def fit(self, x: Tensor, y: Tensor) -> PairTransform:
        return self

    def forward_y(self, y: Tensor) -> Tensor:
        return y

    def forward_x(self, x: Tensor, y: Tensor) -> Tensor:
        return x

    def inverse_x(self, x_model: Tensor, y: Tensor) -> Tensor:
        return x_model

    def log_abs_det_x(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-1])

    def to(self, device: torch.device | str) -> PairTransform:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


#: Pair transforms registered at run time, name -> ``"module:Class"``; packages register
#: theirs in the ``flowrecon.transforms`` entry-point group (flowrecon's own systems do, in
#: pyproject.toml). Save/load rebuilds transforms by name.
PAIR_TRANSFORMS: dict[str, str] = {}

#: Entry-point group of pair transforms.
TRANSFORM_ENTRY_POINTS = "flowrecon.transforms"

#: Names that mean "no pair transform": the user's own frame.
NO_TRANSFORM: tuple[str, ...] = ("none", "lab")


def register_pair_transform(name: str, path: str) -> None:
    """Registers a pair transform class under ``name`` (``path`` is ``"module:Class"``)."""
    if ":" not in path:
        raise ValueError(f"expected a 'module:Class' path, got {path!r}")
    PAIR_TRANSFORMS[name] = path


def available_transforms() -> dict[str, str]:
    """Every pair transform: name -> ``"module:Class"`` (entry points, then run time)."""
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group=TRANSFORM_ENTRY_POINTS)}
    return {**found, **PAIR_TRANSFORMS}


def make_pair_transform(name: str) -> PairTransform:
    """A fresh pair transform from its registered name, ``"NAME:OPTIONS"``, or a family's
    ``"FAMILY-OPTIONS"``.

    A family is a registered name whose transforms carry their options in the name itself
    (the LJ system's ``lj-box-d3-L5`` is the family ``lj-box`` with options ``d3-L5``), so
    that a saved model rebuilds its transform in a fresh process, before any system has
    registered that exact name.
    """
    known = available_transforms()
    base, sep, text = name.partition(":")
    if base not in known:
        family = _family(base, known)
        if family is None or sep:
            valid = ", ".join([*NO_TRANSFORM, *known])
            raise ValueError(f"unknown transform {base!r}; choose one of: {valid}")
        base, sep, text = family, "-", base[len(family) + 1 :]
    module, cls = known[base].split(":")
    made = getattr(importlib.import_module(module), cls)
    return made.from_options(text) if sep else made()


def _family(name: str, known: Mapping[str, str]) -> str | None:
    """The longest registered name that ``name`` extends by ``-OPTIONS``, if any."""
    families = [k for k in known if name.startswith(k + "-")]
    return max(families, key=len) if families else None


def resolve_transform(name: str | None) -> str | None:
    """The registered pair transform a name stands for; None for the user's own frame.

    Example:
        >>> resolve_transform("lab") is None, resolve_transform("cei-momentum-frame")
        (True, 'cei-momentum-frame')
    """
    if name is None or name in NO_TRANSFORM:
        return None
    if name == "auto":
        # The generic core knows no system: a frame is chosen by name (a System names
        # its own), never guessed from the widths of the data.
        raise ValueError(
            "transform='auto' is gone: name the transform, e.g. 'cei-momentum-frame' for CEI "
            "(flowrecon.system.make_system('cei').transform), or 'none' for your own frame"
        )
    if name.partition(":")[0] not in available_transforms() or ":" in name:
        make_pair_transform(name)  # raises with the valid names or bad options
    return name


class Pipeline:
    """The full preprocessing of (x, y): pair transform, whitening, scalers.

    Args:
        x_scaler: Scaler kind for x (applied after whitening).
        y_scaler: Scaler kind for y.
        whitening: ``True`` for `Whitening` with its default tolerance, a float for a
            custom ``rel_tol``, ``False`` for none.
        transform: A registered pair transform name, or ``"none"``/``"lab"`` (none).

    Example:
        >>> x, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 2, dtype=torch.float64)
        >>> p = Pipeline().fit(x, y)
        >>> xm = p.encode_x(x, y)
        >>> torch.allclose(p.decode_x(xm, y), x)
        True
    """

    def __init__(
        self,
        x_scaler: str = "standard",
        y_scaler: str = "standard",
        whitening: bool | float = True,
        transform: str | None = None,
    ) -> None:
        self.x_scaler = Scaler(x_scaler)
        self.y_scaler = Scaler(y_scaler)
        if isinstance(whitening, bool) or whitening is None:
            self.whitening: Whitening | None = Whitening() if whitening else None
        else:
            self.whitening = Whitening(float(whitening))
        self.transform = transform  # as given; fit resolves it into transform_name
        self.transform_name: str | None = None
        self.pair: PairTransform = PairTransform()
        self.x_dim = self.y_dim = self.model_x_dim = self.model_y_dim = 0

    def fit(self, x: Tensor, y: Tensor) -> Pipeline:
        """Fits every step on training data (rows of x and y aligned)."""
        _check_2d(x, "x")
        _check_2d(y, "y")
        self.x_dim, self.y_dim = x.shape[1], y.shape[1]
        name = resolve_transform(self.transform)
        self.transform_name = name
        self.pair = PairTransform() if name is None else make_pair_transform(name)
        self.pair.fit(x, y)
        xt, yt = self.pair.forward_x(x, y), self.pair.forward_y(y)
        if self.whitening is not None:
            xt = self.whitening.fit(xt).forward(xt)
        self.x_scaler.fit(xt)
        self.y_scaler.fit(yt)
        self.model_x_dim, self.model_y_dim = xt.shape[1], yt.shape[1]
        return self

    def encode_y(self, y: Tensor) -> Tensor:
        return self.y_scaler.forward(self.pair.forward_y(y))

    def encode_x(self, x: Tensor, y: Tensor) -> Tensor:
        """x in the user's space -> model space; y is the user's condition."""
        xt = self.pair.forward_x(x, y)
        if self.whitening is not None:
            xt = self.whitening.forward(xt)
        return self.x_scaler.forward(xt)

    def decode_x(self, x_model: Tensor, y: Tensor) -> Tensor:
        """Model space -> the user's space; x_model may be sample-first ``(n, B, D)``."""
        xt = self.x_scaler.inverse(x_model)
        if self.whitening is not None:
            xt = self.whitening.inverse(xt)
        return self.pair.inverse_x(xt, y)

    def log_abs_det_x(self, x: Tensor, y: Tensor) -> Tensor:
        """log|det d x_model / d x_user| per row (on the kept subspace), in x's dtype."""
        ladj = self.pair.log_abs_det_x(x, y) + _like(self.x_scaler.log_abs_det(), x)
        if self.whitening is not None:
            ladj = ladj + _like(self.whitening.log_abs_det(), x)
        return ladj

    def to(self, device: torch.device | str) -> Pipeline:
        self.x_scaler.to(device)
        self.y_scaler.to(device)
        self.pair.to(device)
        if self.whitening is not None:
            self.whitening.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "x_dim": self.x_dim,
            "y_dim": self.y_dim,
            "model_x_dim": self.model_x_dim,
            "model_y_dim": self.model_y_dim,
            "transform": {"name": self.transform_name, "state": self.pair.state_dict()},
            "whitening": None if self.whitening is None else self.whitening.state_dict(),
            "x_scaler": self.x_scaler.state_dict(),
            "y_scaler": self.y_scaler.state_dict(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Pipeline:
        p = cls(state["x_scaler"]["kind"], state["y_scaler"]["kind"], whitening=False)
        p.x_scaler = Scaler.from_state(state["x_scaler"])
        p.y_scaler = Scaler.from_state(state["y_scaler"])
        if state["whitening"] is not None:
            p.whitening = Whitening.from_state(state["whitening"])
        name = state["transform"]["name"]
        p.transform = p.transform_name = name
        p.pair = PairTransform() if name is None else make_pair_transform(name)
        p.pair.load_state_dict(state["transform"]["state"])
        p.x_dim, p.y_dim = state["x_dim"], state["y_dim"]
        p.model_x_dim, p.model_y_dim = state["model_x_dim"], state["model_y_dim"]
        return p
