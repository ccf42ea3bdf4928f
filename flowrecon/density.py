"""Unconditional densities of feature vectors: out-of-distribution scores and learned priors.

`Density` fits a small normalising flow (zuko's neural spline flow) to rows of features,
after a `flowrecon.preprocessing.Whitening` that centres them, drops null directions
(linear constraints of the training rows) and scales the rest to unit variance. It is
trained by the one training loop, `flowrecon.training.train`, and saved as tensors and
plain values (``torch.load(weights_only=True)`` reads it back).

Two uses in flowrecon:

- ``ConditionalGenerator.fit`` fits one to the model's conditions (after the pair
  transform) and flags events whose condition is unlike any it was trained on
  (`Density.in_domain`): a log-density below the ``quantile`` of the validation rows' log
  densities, or a component along a direction the training rows never varied in.
- A learned prior over features of the targets (for CEI, `flowrecon.systems.cei.prior`).

Densities are on the subspace the training rows span (see `Whitening`), in the units of
the features.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> f = rng.normal(size=(2000, 2)) @ [[1.0, 0.5], [0.0, 2.0]]
    >>> d = Density(hidden=16, transforms=1, device="cpu").fit(f, epochs=3)
    >>> d.log_prob(f[:3]).shape, bool(d.in_domain(np.array([[40.0, 0.0]]))[0])
    ((3,), False)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import zuko
from torch import Tensor

from flowrecon._io import read_state
from flowrecon.models._estimator import Estimator
from flowrecon.nn import activation_class, check_at_least
from flowrecon.preprocessing import Whitening
from flowrecon.training import History, _save_atomic, split_indices, train

FORMAT = "flowrecon.Density"
FORMAT_VERSION = 1

#: Fewest rows a density is fitted on.
MIN_ROWS = 2

#: Whitened coordinates beyond this many training standard deviations are not evaluated
#: by the network (float32) but get log-density -inf: far outside by any measure.
MAX_WHITENED = 1e4


class UnconditionalFlow(Estimator):
    """A zuko flow without context in the `Estimator` contract; y has width 0 and is ignored.

    Args:
        dim: Width of x.
        flow: ``zuko.flows`` flow built with ``context=0``.
    """

    def __init__(self, dim: int, flow: zuko.lazy.Flow) -> None:
        super().__init__(dim, 0)
        self.flow = flow

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.flow().log_prob(x)

    def sample(self, n: int, y: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        dist = self.flow()
        z = temperature * dist.base.rsample((int(n),))
        return dist.transform.inv(z)


def build_density_flow(
    dim: int, *, transforms: int = 3, hidden: int = 64, hidden_layers: int = 2, bins: int = 8
) -> UnconditionalFlow:
    """A small unconditional neural spline flow over ``dim`` features (zuko NSF).

    Example:
        >>> build_density_flow(3, hidden=8).log_prob(torch.zeros(4, 3)).shape
        torch.Size([4])
    """
    check_at_least(dim=dim, transforms=transforms, hidden=hidden, bins=(bins, 2))
    check_at_least(hidden_layers=(hidden_layers, 0))
    flow = zuko.flows.NSF(
        features=dim,
        context=0,
        transforms=transforms,
        bins=bins,
        hidden_features=[hidden] * hidden_layers,
        activation=activation_class("relu"),
    )
    return UnconditionalFlow(dim, flow)


def _as_features(a: Any, what: str, device: torch.device, *, finite: bool = True) -> Tensor:
    """Array-like or tensor -> 2-D float64 tensor; rejects non-finite rows when ``finite``."""
    t = a.detach() if isinstance(a, Tensor) else torch.as_tensor(np.array(a, dtype=np.float64))
    t = t.to(device=device, dtype=torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D (rows, features), got shape {tuple(t.shape)}")
    if finite and t.numel():
        bad = ~torch.isfinite(t).all(-1)
        if bad.any():
            rows = bad.nonzero().flatten()
            first = ", ".join(str(int(r)) for r in rows[:5])
            raise ValueError(f"{what} contains NaN or Inf in {len(rows)} rows (first: {first})")
    return t


def _output(t: Tensor, like: Any) -> Any:
    if isinstance(like, Tensor):
        return t.to(like.device)
    return t.detach().cpu().numpy()


class Density:
    """An unconditional density over rows of features, with an in-domain threshold.

    ``__init__`` stores options; ``fit`` learns. Attributes learned in ``fit`` end with
    ``_``: ``whitening_``, ``estimator_``, ``threshold_`` (the ``quantile`` of the
    validation rows' log densities), ``residual_tol_`` (largest distance from the training
    subspace still in the domain) and ``history_``.

    Args:
        transforms: Spline transforms of the flow.
        hidden: Width of the hidden layers of its networks.
        hidden_layers: Hidden layers per network.
        bins: Spline bins.
        quantile: Fraction of validation rows that `in_domain` calls outside: the
            threshold is this quantile of their log densities.
        whitening_tol: Relative variance below which a direction counts as null.
        seed: Seed of the initialisation, the validation split and the batch order.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    """

    def __init__(
        self,
        *,
        transforms: int = 3,
        hidden: int = 64,
        hidden_layers: int = 2,
        bins: int = 8,
        quantile: float = 1e-3,
        whitening_tol: float = 1e-9,
        seed: int = 0,
        device: str = "auto",
    ) -> None:
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must lie strictly between 0 and 1, got {quantile}")
        check_at_least(transforms=transforms, hidden=hidden, bins=(bins, 2))
        check_at_least(hidden_layers=(hidden_layers, 0))
        self.hparams = {
            "transforms": int(transforms),
            "hidden": int(hidden),
            "hidden_layers": int(hidden_layers),
            "bins": int(bins),
        }
        self.quantile = float(quantile)
        self.whitening_tol = float(whitening_tol)
        self.seed = int(seed)
        self.device = device

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "estimator_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError("this Density is not fitted yet: call fit(features) first")

    @property
    def dim(self) -> int:
        """Width of the feature rows."""
        self._check_fitted()
        return self.whitening_.dim

    # -- fit ---------------------------------------------------------------------------

    def fit(
        self,
        features: Any,
        features_val: Any = None,
        *,
        val_fraction: float = 0.15,
        max_rows: int | None = None,
        epochs: int = 50,
        batch_size: int = 512,
        lr: float = 2e-3,
        patience: int | None = 5,
        max_minutes: float | None = None,
        quiet: bool = True,
    ) -> Density:
        """Fits the density to rows of ``features`` ``(N, D)``; returns self.

        Args:
            features: Training rows, numpy or torch; NaN or Inf rows are an error.
            features_val: Validation rows; when absent a seeded ``val_fraction`` of the
                rows is held out. They stop training early and set ``threshold_``
                (without any, the training rows set it).
            val_fraction: Fraction held out when ``features_val`` is absent (0: none).
            max_rows: Train on at most this many rows (a seeded subset); None: all.
            epochs, batch_size, lr, patience, max_minutes, quiet: Options of
                `flowrecon.training.train` (cosine learning-rate schedule).
        """
        from flowrecon.base import resolve_device, seeded

        device = resolve_device(self.device)
        f = _as_features(features, "features", device)
        f_val = None if features_val is None else _as_features(features_val, "features_val", device)
        if f_val is not None and f_val.shape[1] != f.shape[1]:
            raise ValueError(
                f"features_val must have {f.shape[1]} columns like features, got {f_val.shape[1]}"
            )
        if f_val is None and val_fraction > 0:
            if not 0 < val_fraction < 1:
                raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
            parts = split_indices(f.shape[0], self.seed, (1 - val_fraction, val_fraction))
            f, f_val = (f[torch.as_tensor(i, device=device)] for i in parts)
        if f.shape[0] < MIN_ROWS:
            raise ValueError(f"a density needs at least {MIN_ROWS} training rows, got {f.shape[0]}")
        if max_rows is not None and f.shape[0] > max_rows:
            keep = np.random.default_rng(self.seed).choice(f.shape[0], int(max_rows), replace=False)
            f = f[torch.as_tensor(np.sort(keep), device=device)]

        whitening = Whitening(self.whitening_tol).fit(f)
        w = whitening.forward(f).float()
        w_val = None if f_val is None or f_val.shape[0] == 0 else whitening.forward(f_val).float()
        with seeded(self.seed, device):
            estimator = build_density_flow(whitening.n_kept, **self.hparams).to(device)
            history = train(
                estimator,
                w,
                w.new_zeros(w.shape[0], 0),
                w_val,
                None if w_val is None else w_val.new_zeros(w_val.shape[0], 0),
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                patience=patience,
                max_minutes=max_minutes,
                lr_schedule="cosine",
                quiet=quiet,
                seed=self.seed,
            )
        self.device_, self.whitening_, self.estimator_, self.history_ = (
            device,
            whitening,
            estimator.eval(),
            history,
        )
        reference = f if f_val is None or f_val.shape[0] == 0 else f_val
        lp = self._log_prob(reference)
        finite = lp[torch.isfinite(lp)]
        if finite.numel() == 0:
            raise ValueError("the fitted density is not finite on any reference row")
        self.threshold_ = float(np.quantile(finite.cpu().numpy(), self.quantile))
        # Rounding puts rows a hair off the training subspace; ten times the largest
        # training offset (or 1e-9 of the features' scale) is still inside.
        scale = float(whitening.std.square().sum().sqrt())  # type: ignore[union-attr]
        self.residual_tol_ = max(10 * float(self._residual(f).max()), 1e-9 * scale)
        return self

    # -- evaluation --------------------------------------------------------------------

    def _residual(self, f: Tensor) -> Tensor:
        """Distance of each row from the affine subspace of the training rows."""
        w = self.whitening_
        mean, basis = w.mean.to(f), w.basis.to(f)  # type: ignore[union-attr]
        centred = f - mean
        return (centred - (centred @ basis) @ basis.T).norm(dim=-1)

    @torch.no_grad()
    def _log_prob(self, f: Tensor, max_chunk: int = 2**16) -> Tensor:
        """log p of float64 rows ``(B, D)`` on the device; -inf for rows it cannot evaluate."""
        w = self.whitening_.forward(f)
        ok = torch.isfinite(w).all(-1) & (w.abs() <= MAX_WHITENED).all(-1)
        out = torch.full((f.shape[0],), -math.inf, dtype=torch.float64, device=f.device)
        idx = ok.nonzero().flatten()
        ladj = float(self.whitening_.log_abs_det())
        for start in range(0, len(idx), max_chunk):
            rows = idx[start : start + max_chunk]
            lp = self.estimator_.log_prob(w[rows].float()).double() + ladj
            out[rows] = torch.nan_to_num(lp, nan=-math.inf)
        return out

    def log_prob(self, features: Any) -> Any:
        """Natural-log density of each row, ``(B,)``; numpy in, numpy out (torch: torch).

        Rows with NaN or Inf, or too far out to evaluate in float32, get -inf. Rows off the
        training subspace are evaluated at their projection onto it (`in_domain` flags
        them).
        """
        self._check_fitted()
        f = _as_features(features, "features", self.device_, finite=False)
        if f.shape[1] != self.dim:
            raise ValueError(f"features must have {self.dim} columns, got {f.shape[1]}")
        return _output(self._log_prob(f), features)

    def in_domain(self, features: Any) -> Any:
        """Whether each row lies where the training rows were: ``(B,)`` booleans.

        True when the row's log density is at least ``threshold_`` and its distance from
        the training subspace at most ``residual_tol_``.
        """
        self._check_fitted()
        f = _as_features(features, "features", self.device_, finite=False)
        if f.shape[1] != self.dim:
            raise ValueError(f"features must have {self.dim} columns, got {f.shape[1]}")
        res = torch.nan_to_num(self._residual(f), nan=math.inf)
        inside = (self._log_prob(f) >= self.threshold_) & (res <= self.residual_tol_)
        return _output(inside, features)

    def sample(self, n: int, *, seed: int | None = None) -> np.ndarray:
        """``n`` rows drawn from the density, ``(n, D)`` float64 numpy."""
        from flowrecon.base import seeded

        self._check_fitted()
        with torch.no_grad(), seeded(seed, self.device_):
            w = self.estimator_.sample(int(n)).double()
        return self.whitening_.inverse(w).cpu().numpy()

    # -- persistence -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything `save` writes: tensors and plain values only."""
        self._check_fitted()
        from flowrecon import __version__

        whitening = {
            k: v.detach().cpu() if isinstance(v, Tensor) else v
            for k, v in self.whitening_.state_dict().items()
        }
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "versions": {"flowrecon": __version__, "torch": str(torch.__version__)},
            "hparams": dict(self.hparams),
            "quantile": self.quantile,
            "whitening_tol": self.whitening_tol,
            "seed": self.seed,
            "whitening": whitening,
            "estimator": {k: v.detach().cpu() for k, v in self.estimator_.state_dict().items()},
            "threshold": self.threshold_,
            "residual_tol": self.residual_tol_,
            "history": self.history_.to_dict(),
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], *, device: str = "auto", source: str = "density state"
    ) -> Density:
        """Rebuilds a fitted density from `state_dict` output (``source`` names it in errors)."""
        from flowrecon.base import resolve_device

        try:
            if state.get("format") != FORMAT:
                raise ValueError("not a flowrecon density")
            if state.get("format_version", math.inf) > FORMAT_VERSION:
                raise ValueError("written by a newer flowrecon; upgrade flowrecon to read it")
            d = cls(
                **state["hparams"],
                quantile=float(state["quantile"]),
                whitening_tol=float(state["whitening_tol"]),
                seed=int(state["seed"]),
                device=device,
            )
            dev = resolve_device(device)
            whitening = Whitening.from_state(state["whitening"]).to(dev)
            estimator = build_density_flow(whitening.n_kept, **d.hparams)
            estimator.load_state_dict(state["estimator"])
            d.device_, d.whitening_, d.estimator_ = dev, whitening, estimator.to(dev).eval()
            d.threshold_ = float(state["threshold"])
            d.residual_tol_ = float(state["residual_tol"])
            d.history_ = History.from_dict(state["history"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{source} is not a valid flowrecon density ({reason})") from None
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Writes the fitted density to ``path`` atomically (read it with `Density.load`)."""
        _save_atomic(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "auto") -> Density:
        """Reads a density written by `save` (tensors and plain values only)."""
        state = read_state(path, FORMAT, "flowrecon density file")
        return cls.from_state(state, device=device, source=str(path))
