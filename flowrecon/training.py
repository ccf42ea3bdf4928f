"""The one training loop, shared by every backend.

`train` minimises ``estimator.loss(x, y)["loss"]`` in model space with Adam, plus optional
L1/L2 penalties and weighted physics terms, early-stops on the validation total, clips
gradients, keeps the best state (in memory, optionally on disk) and restores it at the end.
It stops cleanly, keeping the best state, on a non-finite loss, on the ``max_minutes``
budget and on Ctrl-C.

Logged components, per epoch, train and validation (`History`):

- ``total``: what is minimised, ``loss + physics + l1 + l2``;
- ``loss``: the estimator's own unregularised loss (for learning curves), and its parts
  (``nll``, or ``recon`` and ``kl``);
- ``l1``, ``l2``: the weighted penalties (``l1 * sum|w|``, ``l2 * sum w^2`` over all
  trainable parameters), present when their weight is non-zero;
- ``physics`` (weighted sum) and each physics term unweighted, when a physics loss is used.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowrecon.models._estimator import Estimator

#: ``physics_loss(x_sample, x_true, y) -> {term: 0-d tensor}``; x_sample is ``(n, B, Dx)``,
#: x_true ``(B, Dx)`` and y ``(B, Dy)``, all in the user's space when called from
#: ``ConditionalGenerator.fit``.
PhysicsLoss = Callable[[Tensor, Tensor, Tensor], Mapping[str, Tensor]]

#: ``user_view(x_sample_model, batch_indices, split) -> (x_sample, x_true, y)`` maps model
#: space samples of a batch to the space the physics loss works in; ``split`` is
#: ``"train"`` or ``"val"``. Without it the physics loss sees model space.
UserView = Callable[[Tensor, Tensor, str], tuple[Tensor, Tensor, Tensor]]


#: ``on_epoch(epoch, train, val)``: called after every epoch with the epoch (1-based) and
#: that epoch's train and validation components (name -> value; val is empty without
#: validation data). An exception it raises stops training at once and propagates, after
#: the best state is restored: a hyper-parameter search prunes a trial this way.
EpochCallback = Callable[[int, Mapping[str, float], Mapping[str, float]], None]


#: Learning-rate schedules of `train`.
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "plateau")


def split_indices(
    n: int, seed: int = 0, fractions: Sequence[float] = (0.7, 0.15, 0.15)
) -> tuple[np.ndarray, ...]:
    """Seeded random split of ``range(n)`` into parts of the given fractions.

    Part sizes are the rounded cumulative fractions, so they always add up to n.

    Example:
        >>> train, val, test = split_indices(100, seed=0)
        >>> len(train), len(val), len(test)
        (70, 15, 15)
    """
    f = np.asarray(fractions, dtype=float)
    if f.ndim != 1 or len(f) < 1 or (f <= 0).any() or abs(f.sum() - 1) > 1e-9:
        raise ValueError(f"fractions must be positive and sum to 1, got {tuple(fractions)}")
    if n < len(f):
        raise ValueError(f"cannot split {n} rows into {len(f)} parts")
    bounds = np.rint(np.cumsum(f) * n).astype(int)
    bounds[-1] = n
    perm = np.random.default_rng(seed).permutation(n)
    return tuple(np.split(perm, bounds[:-1]))


@dataclass
class History:
    """Per-epoch loss components and how training ended.

    Attributes:
        train: Component name -> one value per epoch (averaged over the epoch's batches).
        val: The same on the validation set (empty without validation data).
        best_epoch: 1-based epoch whose state was restored (0: the initial state).
        best: Monitored value (validation total, else train total) at ``best_epoch``.
        stopped: ``"completed"``, ``"early_stopping"``, ``"max_minutes"``, ``"non_finite"``
            or ``"interrupted"``.
        message: Human-readable reason when training stopped early for a problem, or a
            note on how it went (`overfitting_note`).
        seconds: Wall time of the loop.
        lr: Learning rate at the end of each epoch.
    """

    train: dict[str, list[float]] = field(default_factory=dict)
    val: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int = 0
    best: float = math.inf
    stopped: str = "completed"
    message: str = ""
    seconds: float = 0.0
    lr: list[float] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        """Number of epochs run (a partial epoch cut by ``max_minutes`` counts)."""
        return len(self.train.get("total", []))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists of floats), safe to save with ``torch.save`` or as JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> History:
        return cls(**d)


def _append(log: dict[str, list[float]], sums: Mapping[str, Tensor], count: int) -> None:
    for key, value in sums.items():
        log.setdefault(key, []).append(float(value) / max(count, 1))


def _snapshot(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with 0o666 lets the umask decide the mode, like every other output file
    # (tempfile.mkstemp would make the model readable by its owner only).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


#: Option -> (allowed range in words, check). The library and the command line accept the
#: same ranges: both call `check_training_options`.
_OPTION_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "epochs": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "batch_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "lr": ("a finite number > 0", lambda v: _is_real(v) and math.isfinite(v) and v > 0),
    "weight_decay": ("a finite number >= 0", lambda v: _is_real(v) and 0 <= v < math.inf),
    "patience": ("None or an integer >= 0", lambda v: v is None or (_is_int(v) and v >= 0)),
    "min_delta": ("a finite number >= 0", lambda v: _is_real(v) and 0 <= v < math.inf),
    "clip_grad": (
        "None or a finite number >= 0",
        lambda v: v is None or (_is_real(v) and 0 <= v < math.inf),
    ),
    "l1": ("a finite number >= 0", lambda v: _is_real(v) and 0 <= v < math.inf),
    "l2": ("a finite number >= 0", lambda v: _is_real(v) and 0 <= v < math.inf),
    "physics_samples": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "max_minutes": (
        "None or a finite number > 0",
        lambda v: v is None or (_is_real(v) and 0 < v < math.inf),
    ),
    "lr_schedule": (f"one of {', '.join(LR_SCHEDULES)}", lambda v: v in LR_SCHEDULES),
    "quiet": ("true or false", lambda v: isinstance(v, bool | np.bool_)),
    "physics_loss": ("None or a callable", lambda v: v is None or callable(v)),
}


def check_training_options(options: Mapping[str, Any]) -> None:
    """Raises a one-line ValueError for the first option of `train` outside its range.

    Unknown names are left to the caller (``ConditionalGenerator.fit`` names them with a
    suggestion). Physics weights must be finite and >= 0.

    Example:
        >>> check_training_options({"epochs": 0})
        Traceback (most recent call last):
        ...
        ValueError: epochs must be an integer >= 1, got 0
        >>> check_training_options({"physics_weights": {"energy_diff2": -1}})
        Traceback (most recent call last):
        ...
        ValueError: physics weight 'energy_diff2' must be a finite number >= 0, got -1
    """
    for key, value in options.items():
        if key in _OPTION_RANGES:
            allowed, ok = _OPTION_RANGES[key]
            if not ok(value):
                raise ValueError(f"{key} must be {allowed}, got {value!r}")
    weights = options.get("physics_weights")
    if weights is None:
        return
    if not isinstance(weights, Mapping):
        raise ValueError(f"physics_weights must be a mapping of term -> weight, got {weights!r}")
    for term, w in weights.items():
        if not (_is_real(w) and 0 <= w < math.inf):
            raise ValueError(f"physics weight {term!r} must be a finite number >= 0, got {w!r}")


def training_options() -> dict[str, Any]:
    """Keyword options of `train` a user sets (name -> default), e.g. for a CLI or TOML."""
    internal = {"seed", "user_view", "on_checkpoint"}
    return {
        k: p.default
        for k, p in inspect.signature(train).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in internal
    }


def overfitting_note(history: History, rows: int) -> str:
    """A note when the validation loss ran away from the training loss, else "".

    Training kept the best validation state, but the time after it went into the
    training rows' particulars: said when the best epoch lies in the first quarter of at
    least 10 epochs and the last validation total exceeds the best by more than 5 % (or
    1 nat).

    Example:
        >>> h = History(train={"total": [9.0 - e for e in range(12)]},
        ...             val={"total": [5.0, 4.0, 4.5] + [9.0] * 9}, best_epoch=2, best=4.0)
        >>> overfitting_note(h, 1000)[:52]
        'validation loss rose from 4 at epoch 2 to 9 at epoch'
    """
    val = history.val.get("total", [])
    train_loss = history.train.get("total", [])
    epochs, best = len(val), history.best
    if epochs < 10 or not (0 < history.best_epoch <= epochs // 4) or not math.isfinite(best):
        return ""
    last = val[-1]
    if not last > best + max(1.0, 0.05 * abs(best)):
        return ""
    return (
        f"validation loss rose from {best:.4g} at epoch {history.best_epoch} to {last:.4g} at "
        f"epoch {epochs} while the training loss fell to {train_loss[-1]:.4g}: the model "
        f"overfits its {rows} training rows, and the state of epoch {history.best_epoch} was "
        "kept. More data, a smaller model or early stopping (patience) would use the time "
        "better."
    )


def train(
    estimator: Estimator,
    x: Tensor,
    y: Tensor,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    patience: int | None = 20,
    min_delta: float = 0.0,
    clip_grad: float | None = 5.0,
    l1: float = 0.0,
    l2: float = 0.0,
    physics_loss: PhysicsLoss | None = None,
    physics_weights: Mapping[str, float] | None = None,
    physics_samples: int = 1,
    max_minutes: float | None = None,
    lr_schedule: str = "constant",
    checkpoint_path: str | os.PathLike | None = None,
    quiet: bool = False,
    seed: int = 0,
    user_view: UserView | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    on_epoch: EpochCallback | None = None,
) -> History:
    """Trains ``estimator`` in place on model-space tensors; returns the `History`.

    Data stay on their device; each epoch draws one index permutation there, so batches
    are gathered without host copies. The best state (lowest validation total, or train
    total without validation data, improved by more than ``min_delta``) is restored; then
    ``estimator.on_fit_end(x, y)`` runs if the estimator defines it (the cVAE stores its
    training-set latent statistics there).

    Args:
        estimator: The estimator, already on the device of x and y.
        x, y: Training data ``(N, Dx)``, ``(N, Dy)``.
        x_val, y_val: Validation data, or None to monitor the training total.
        epochs: Maximum number of epochs (at least 1).
        batch_size: Rows per optimiser step.
        lr: Adam learning rate.
        weight_decay: Adam's own (L2-style) weight decay, separate from ``l2``.
        patience: Epochs without improvement before stopping; None or 0 disables it.
        min_delta: Smallest decrease of the monitored value that counts as improvement.
        clip_grad: Maximum gradient norm; None or 0 disables clipping.
        l1: Weight of the L1 penalty ``sum |w|`` over all trainable parameters.
        l2: Weight of the L2 penalty ``sum w^2`` over all trainable parameters.
        physics_loss: Optional callable returning physics terms (see `PhysicsLoss`);
            it needs an estimator whose samples carry gradients.
        physics_weights: Term name -> weight; None weighs every term 1. Terms without a
            weight are logged but not minimised.
        physics_samples: Samples per condition drawn for the physics terms.
        max_minutes: Wall-clock budget (> 0); the epoch in progress is cut short and
            validated.
        lr_schedule: ``"constant"``; ``"cosine"``, which anneals the learning rate to 1 %
            of ``lr`` over the run (over ``max_minutes`` of wall-clock time when a budget
            is set and it ends before ``epochs``, so a fixed-time run still finishes
            annealed); or ``"plateau"``, which halves it when the monitored loss has not
            improved for ``max(2, patience // 4)`` epochs.
        checkpoint_path: Where to write the best estimator state (atomically) whenever it
            improves.
        quiet: No progress bar (it is also off when stderr is not a terminal).
        seed: Seed of the batch order.
        user_view: Maps model-space samples to the physics loss's space (see `UserView`).
        on_checkpoint: Called with the epoch whenever the best state improves.
        on_epoch: Called after every epoch (see `EpochCallback`); what it raises ends
            training and propagates.

    Example:
        >>> from flowrecon.models.cvae import build_cvae
        >>> est = build_cvae(2, 1, hidden_dim=8, num_layers=1, latent_dim=2)
        >>> h = train(est, torch.randn(64, 2), torch.randn(64, 1), epochs=2, quiet=True)
        >>> h.epochs, sorted(h.train)
        (2, ['kl', 'loss', 'recon', 'total'])
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}"
        )
    if (x_val is None) != (y_val is None):
        raise ValueError("give both x_val and y_val, or neither")
    if x.shape[0] < 1:
        raise ValueError("the training data have no rows")
    if x_val is not None and x_val.shape[0] < 1:
        raise ValueError("the validation data have no rows; pass None to monitor the training loss")
    check_training_options(
        {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "patience": patience,
            "min_delta": min_delta,
            "clip_grad": clip_grad,
            "l1": l1,
            "l2": l2,
            "physics_samples": physics_samples,
            "physics_weights": physics_weights,
            "max_minutes": max_minutes,
            "lr_schedule": lr_schedule,
        }
    )
    loop = _Loop(
        estimator, x, y, x_val, y_val,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, patience=patience,
        clip_grad=clip_grad, l1=l1, l2=l2, physics_loss=physics_loss,
        physics_weights=physics_weights, physics_samples=physics_samples,
        lr_schedule=lr_schedule, seed=seed, user_view=user_view,
    )  # fmt: skip
    history = loop.run(
        epochs, max_minutes, min_delta, quiet, checkpoint_path, on_checkpoint, on_epoch
    )
    if history.stopped == "non_finite":
        warnings.warn(history.message, RuntimeWarning, stacklevel=2)
    elif not history.message:
        history.message = overfitting_note(history, len(x))
    hook = getattr(estimator, "on_fit_end", None)
    if callable(hook):
        hook(x, y)
    return history


class _Loop:
    """The state of one `train` call: optimiser, schedule, batches, best state, history."""

    def __init__(
        self,
        estimator: Estimator,
        x: Tensor,
        y: Tensor,
        x_val: Tensor | None,
        y_val: Tensor | None,
        *,
        batch_size: int,
        lr: float,
        weight_decay: float,
        patience: int | None,
        clip_grad: float | None,
        l1: float,
        l2: float,
        physics_loss: PhysicsLoss | None,
        physics_weights: Mapping[str, float] | None,
        physics_samples: int,
        lr_schedule: str,
        seed: int,
        user_view: UserView | None,
    ) -> None:
        self.estimator, self.x, self.y, self.x_val, self.y_val = estimator, x, y, x_val, y_val
        self.batch_size, self.lr, self.patience, self.clip_grad = (
            batch_size,
            lr,
            patience,
            clip_grad,
        )
        self.l1, self.l2, self.lr_schedule, self.user_view = l1, l2, lr_schedule, user_view
        self.physics_loss, self.physics_samples = physics_loss, physics_samples
        self.weights = (
            None if physics_weights is None else {k: float(v) for k, v in physics_weights.items()}
        )
        self.params = [p for p in estimator.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=lr, weight_decay=weight_decay)
        self.plateau = None
        if lr_schedule == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, factor=0.5, patience=max(2, (patience or 8) // 4)
            )
        self.generator = torch.Generator(device=x.device)
        self.generator.manual_seed(int(seed))
        self.n = x.shape[0]
        self.n_batches = math.ceil(self.n / batch_size)
        self.history = History()
        self.best_state = _snapshot(estimator)  # the initial state is the fallback "good" state
        self.wait = 0
        self.epochs = 1
        self.t0 = time.monotonic()
        self.deadline: float | None = None

    # -- the loss ---------------------------------------------------------------------

    def view(self, xs: Tensor, idx: Tensor, split: str) -> tuple[Tensor, Tensor, Tensor]:
        if self.user_view is not None:
            return self.user_view(xs, idx, split)
        xx, yy = (self.x, self.y) if split == "train" else (self.x_val, self.y_val)
        assert xx is not None and yy is not None
        return xs, xx[idx], yy[idx]

    def objective(self, xb: Tensor, yb: Tensor, idx: Tensor, split: str) -> dict[str, Tensor]:
        parts = dict(self.estimator.loss(xb, yb))
        total = parts["loss"]
        if self.physics_loss is not None:
            physics = self._physics(parts, yb, idx, split, total)
            parts["physics"] = physics
            total = total + physics
        if self.l1:
            parts["l1"] = self.l1 * sum(p.abs().sum() for p in self.params)
            total = total + parts["l1"]
        if self.l2:
            parts["l2"] = self.l2 * sum(p.square().sum() for p in self.params)
            total = total + parts["l2"]
        parts["total"] = total
        return parts

    def _physics(
        self, parts: dict[str, Tensor], yb: Tensor, idx: Tensor, split: str, total: Tensor
    ) -> Tensor:
        """The weighted physics terms of samples drawn for ``yb``; logs each term."""
        assert self.physics_loss is not None
        xs = self.estimator.sample(self.physics_samples, yb)
        if split == "train" and not xs.requires_grad:
            raise ValueError(
                f"physics terms need differentiable samples, but {type(self.estimator).__name__}"
                ".sample returns tensors without gradient"
            )
        terms = dict(self.physics_loss(*self.view(xs, idx, split)))
        weights = self.weights
        if weights is not None and (unknown := set(weights) - set(terms)):
            raise ValueError(
                f"physics_weights name unknown terms {sorted(unknown)}; the physics loss "
                f"returns {sorted(terms)}"
            )
        physics = sum(
            (
                terms[k].to(total.dtype) * (1.0 if weights is None else weights.get(k, 0.0))
                for k in terms
            ),
            start=total.new_zeros(()),
        )
        parts.update({k: v.detach() for k, v in terms.items()})
        return physics

    @staticmethod
    def accumulate(sums: dict[str, Tensor], parts: Mapping[str, Tensor], rows: int) -> None:
        for key, value in parts.items():
            v = value.detach() * rows
            sums[key] = sums[key] + v if key in sums else v

    def non_finite(self, where: str, parts: Mapping[str, Tensor]) -> str:
        shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items())
        return (
            f"training stopped at {where}: the loss is not finite ({shown}). Kept the best "
            f"state, from epoch {self.history.best_epoch}. Try a lower learning rate "
            f"(lr={self.lr:g}), a smaller clip_grad, or check the data for outliers."
        )

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, Tensor], int]:
        x_val, y_val = self.x_val, self.y_val
        assert x_val is not None and y_val is not None
        self.estimator.eval()
        sums: dict[str, Tensor] = {}
        for start in range(0, x_val.shape[0], self.batch_size):
            stop = min(start + self.batch_size, x_val.shape[0])
            idx = torch.arange(start, stop, device=x_val.device)
            parts = self.objective(x_val[idx], y_val[idx], idx, "val")
            self.accumulate(sums, parts, len(idx))
        return sums, x_val.shape[0]

    def cosine_lr(self, epoch: int, batch: int) -> float:
        done = (epoch - 1 + batch / self.n_batches) / max(self.epochs, 1)
        if self.deadline is not None:
            done = max(done, (time.monotonic() - self.t0) / (self.deadline - self.t0))
        return self.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0))))

    # -- the loop ---------------------------------------------------------------------

    def run(
        self,
        epochs: int,
        max_minutes: float | None,
        min_delta: float,
        quiet: bool,
        checkpoint_path: str | os.PathLike | None,
        on_checkpoint: Callable[[int], None] | None,
        on_epoch: EpochCallback | None,
    ) -> History:
        """Epochs until done, early stopping, the deadline, a non-finite loss or Ctrl-C;
        restores the best state."""
        history = self.history
        self.epochs, self.t0 = epochs, time.monotonic()
        self.deadline = None if max_minutes is None else self.t0 + 60.0 * max_minutes
        bar = tqdm(
            range(1, epochs + 1),
            desc="fit",
            unit="epoch",
            disable=quiet or not sys.stderr.isatty(),
            leave=False,
        )
        try:
            for epoch in bar:
                sums, rows = self.train_epoch(epoch)
                if history.stopped == "non_finite" or not self.end_epoch(
                    epoch, sums, rows, min_delta, checkpoint_path, on_checkpoint
                ):
                    break
                bar.set_postfix(
                    train=f"{history.train['total'][-1]:.4g}",
                    val=f"{history.val['total'][-1]:.4g}" if history.val else "-",
                )
                if on_epoch is not None:
                    on_epoch(
                        epoch,
                        {k: v[-1] for k, v in history.train.items()},
                        {k: v[-1] for k, v in history.val.items()},
                    )
                if history.stopped == "max_minutes":
                    break
                if self.patience and self.wait >= self.patience:
                    history.stopped = "early_stopping"
                    break
        except KeyboardInterrupt:
            history.stopped = "interrupted"
            history.message = (
                f"training interrupted; kept the best state, from epoch {history.best_epoch}"
            )
        finally:
            bar.close()
            self.estimator.load_state_dict(self.best_state)
            self.estimator.eval()
            history.seconds = time.monotonic() - self.t0
        return history

    def train_epoch(self, epoch: int) -> tuple[dict[str, Tensor], int]:
        """One pass over a fresh permutation; sets ``history.stopped`` on a non-finite
        loss or gradient, or past the deadline."""
        history, x, y = self.history, self.x, self.y
        self.estimator.train()
        perm = torch.randperm(self.n, generator=self.generator, device=x.device)
        sums: dict[str, Tensor] = {}
        rows = 0
        for b, start in enumerate(range(0, self.n, self.batch_size), 1):
            idx = perm[start : start + self.batch_size]
            if self.lr_schedule == "cosine":
                for group in self.optimizer.param_groups:
                    group["lr"] = self.cosine_lr(epoch, b - 1)
            parts = self.objective(x[idx], y[idx], idx, "train")
            total = parts["total"]
            if not torch.isfinite(total):
                history.stopped = "non_finite"
                history.message = self.non_finite(f"epoch {epoch}, batch {b}", parts)
                break
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            clip = self.clip_grad if self.clip_grad else math.inf
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            if not torch.isfinite(norm):
                history.stopped = "non_finite"
                history.message = self.non_finite(
                    f"epoch {epoch}, batch {b} (gradient norm {float(norm)})", parts
                )
                break
            self.optimizer.step()
            self.accumulate(sums, parts, len(idx))
            rows += len(idx)
            if self.deadline is not None and time.monotonic() > self.deadline:
                history.stopped = "max_minutes"
                break
        return sums, rows

    def end_epoch(
        self,
        epoch: int,
        sums: dict[str, Tensor],
        rows: int,
        min_delta: float,
        checkpoint_path: str | os.PathLike | None,
        on_checkpoint: Callable[[int], None] | None,
    ) -> bool:
        """Logs the epoch, validates, keeps the best state; False stops (non-finite)."""
        history = self.history
        _append(history.train, sums, rows)
        history.lr.append(self.optimizer.param_groups[0]["lr"])
        monitored = history.train["total"][-1]
        if self.x_val is not None:
            vsums, vrows = self.validate()
            _append(history.val, vsums, vrows)
            monitored = history.val["total"][-1]
            if not math.isfinite(monitored):
                history.stopped = "non_finite"
                history.message = self.non_finite(
                    f"epoch {epoch} (validation)", {k: v / vrows for k, v in vsums.items()}
                )
                return False
        if self.plateau is not None:
            self.plateau.step(monitored)
        if monitored < history.best - min_delta:
            history.best, history.best_epoch, self.wait = monitored, epoch, 0
            self.best_state = _snapshot(self.estimator)
            if checkpoint_path is not None:
                _save_atomic({"epoch": epoch, "state_dict": self.best_state}, checkpoint_path)
            if on_checkpoint is not None:
                on_checkpoint(epoch)
        else:
            self.wait += 1
        return True
