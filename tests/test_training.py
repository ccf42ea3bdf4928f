"""The training loop: early stopping, guards, budget, clipping, penalties, checkpoints, split."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import flowrecon as fr
from flowrecon.models._estimator import Estimator
from flowrecon.training import History, split_indices, train


class Mean(Estimator):
    """A one-parameter estimator: loss (theta - x)^2, samples at theta (differentiably)."""

    def __init__(self, width: int = 1, start: float = -1.0) -> None:
        super().__init__(width, 1)
        self.theta = nn.Parameter(torch.full((width,), start))
        self.calls = 0

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        nll = (self.theta - x).square().sum(-1).mean()
        return {"loss": nll, "nll": nll}

    def sample(self, n: int, y: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(n, y.shape[0], self.x_dim)


def constant(value: float, n: int = 32, width: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n, width), value), torch.zeros(n, 1)


def test_early_stopping_restores_the_best_state() -> None:
    # Training pulls theta towards +1, validation data sit at -1 where theta starts:
    # the validation loss only grows, so epoch 1 stays the best.
    est = Mean()
    thetas = {}
    history = train(
        est,
        *constant(1.0),
        *constant(-1.0),
        epochs=50,
        batch_size=8,
        lr=0.05,
        patience=3,
        quiet=True,
        on_checkpoint=lambda epoch: thetas.setdefault(epoch, est.theta.item()),
    )
    assert history.stopped == "early_stopping"
    assert history.epochs == 4 and history.best_epoch == 1 and list(thetas) == [1]
    assert est.theta.item() == thetas[1]
    assert history.val["total"] == sorted(history.val["total"])
    assert history.best == history.val["total"][0]


def test_min_delta_counts_small_improvements_as_none() -> None:
    est = Mean(start=0.0)
    history = train(
        est,
        *constant(1.0),
        *constant(1.0),
        epochs=30,
        lr=1e-4,
        min_delta=10.0,
        patience=2,
        quiet=True,
    )
    assert history.stopped == "early_stopping" and history.epochs == 3 and history.best_epoch == 1


class Exploding(Mean):
    """The loss turns NaN from the given call on."""

    def __init__(self, nan_from: int) -> None:
        super().__init__()
        self.nan_from = nan_from

    def loss(self, x, y):
        out = super().loss(x, y)
        if self.calls >= self.nan_from:
            out = {k: v * float("nan") for k, v in out.items()}
        return out


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_state() -> None:
    est = Exploding(nan_from=7)  # epochs of 2 train + 1 validation calls: NaN in epoch 3
    with pytest.warns(
        RuntimeWarning, match=r"epoch 3, batch 1: the loss is not finite .*best state, from epoch 2"
    ):
        history = train(
            est,
            *constant(1.0, n=16),
            *constant(1.0, n=8),
            epochs=10,
            batch_size=8,
            lr=0.1,
            quiet=True,
        )
    assert history.stopped == "non_finite" and "lower learning rate" in history.message
    assert history.best_epoch == 2 and torch.isfinite(est.theta).all()
    assert len(history.train["total"]) == 2


def test_max_minutes_budget_stops_after_the_current_batch() -> None:
    est = Mean()
    history = train(
        est,
        *constant(1.0, n=64),
        *constant(1.0),
        epochs=100,
        batch_size=8,
        max_minutes=1e-9,
        quiet=True,
    )
    assert history.stopped == "max_minutes"
    assert history.epochs == 1 and history.best_epoch == 1 and len(history.val["total"]) == 1


def test_keyboard_interrupt_stops_cleanly_with_the_best_state() -> None:
    class Interrupted(Mean):
        def loss(self, x, y):
            if self.calls == 4:
                raise KeyboardInterrupt
            return super().loss(x, y)

    est = Interrupted()
    thetas = {}
    history = train(
        est,
        *constant(1.0, n=16),
        *constant(1.0, n=8),
        epochs=10,
        batch_size=8,
        lr=0.1,
        quiet=True,
        on_checkpoint=lambda epoch: thetas.setdefault(epoch, est.theta.item()),
    )
    assert history.stopped == "interrupted" and "interrupted" in history.message
    assert history.best_epoch == 1 and est.theta.item() == thetas[1]


@pytest.fixture
def grad_norms():
    """Records the gradient norm seen by every optimiser step (after clipping)."""
    norms: list[float] = []

    def hook(optimizer, args, kwargs):
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    handle = register_optimizer_step_pre_hook(hook)
    yield norms
    handle.remove()


def test_gradient_clipping(grad_norms) -> None:
    x, y = constant(100.0, width=4)
    train(Mean(width=4), x, y, epochs=2, clip_grad=5.0, quiet=True)
    assert max(grad_norms) == pytest.approx(5.0, rel=1e-5)
    grad_norms.clear()
    train(Mean(width=4), x, y, epochs=1, clip_grad=None, quiet=True)
    assert min(grad_norms) > 100.0


def test_l1_l2_penalties_are_logged_as_components() -> None:
    est = Mean(width=3, start=2.0)
    history = train(
        est, *constant(0.0, width=3), *constant(0.0, width=3), epochs=2, l1=0.1, l2=0.01, quiet=True
    )
    for log in (history.train, history.val):
        assert {"total", "loss", "nll", "l1", "l2"} <= set(log)
        np.testing.assert_allclose(
            log["total"], np.add(log["loss"], log["l1"]) + np.asarray(log["l2"]), rtol=1e-6
        )
    # Validation penalties are those of the epoch's final parameters.
    theta = est.theta.detach()
    assert history.val["l1"][-1] == pytest.approx(0.1 * theta.abs().sum().item(), rel=1e-6)
    assert history.val["l2"][-1] == pytest.approx(0.01 * theta.square().sum().item(), rel=1e-6)
    plain = train(Mean(), *constant(0.0), epochs=1, quiet=True)
    assert "l1" not in plain.train and not plain.val  # no penalties, no validation data


def test_physics_terms_are_weighted_and_logged() -> None:
    def physics(x_sample, x_true, y):
        return {"a": x_sample.square().mean(), "b": (x_sample - x_true).abs().mean()}

    history = train(
        Mean(start=2.0), *constant(1.0), *constant(1.0), epochs=2, physics_loss=physics,
        physics_weights={"a": 0.5}, quiet=True,
    )  # fmt: skip
    log = history.train
    assert {"a", "b", "physics"} <= set(log) and {"a", "b", "physics"} <= set(history.val)
    np.testing.assert_allclose(log["physics"], 0.5 * np.asarray(log["a"]), rtol=1e-6)
    np.testing.assert_allclose(log["total"], np.add(log["loss"], log["physics"]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"physics_weights name unknown terms \['c'\]"):
        train(
            Mean(),
            *constant(1.0),
            epochs=1,
            physics_loss=physics,
            physics_weights={"c": 1.0},
            quiet=True,
        )

    class Detached(Mean):
        def sample(self, n, y):
            return super().sample(n, y).detach()

    with pytest.raises(ValueError, match="physics terms need differentiable samples"):
        train(Detached(), *constant(1.0), epochs=1, physics_loss=physics, quiet=True)


def test_best_checkpoint_on_disk(tmp_path) -> None:
    est = Mean()
    path = tmp_path / "best.pt"
    history = train(
        est,
        *constant(1.0),
        *constant(-1.0),
        epochs=5,
        patience=2,
        lr=0.05,
        checkpoint_path=path,
        quiet=True,
    )
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == history.best_epoch
    torch.testing.assert_close(saved["state_dict"]["theta"], est.theta.detach())


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("epochs", 0, "epochs must be an integer >= 1, got 0"),
        ("epochs", 2.5, "epochs must be an integer >= 1, got 2.5"),
        ("epochs", True, "epochs must be an integer >= 1, got True"),
        ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
        ("lr", 0.0, "lr must be a finite number > 0, got 0.0"),
        ("lr", float("nan"), "lr must be a finite number > 0, got nan"),
        ("max_minutes", 0, "max_minutes must be None or a finite number > 0, got 0"),
        ("max_minutes", -1, "max_minutes must be None or a finite number > 0, got -1"),
        ("max_minutes", float("inf"), "max_minutes must be None or a finite number > 0"),
        ("patience", -1, "patience must be None or an integer >= 0, got -1"),
        ("min_delta", -0.1, "min_delta must be a finite number >= 0, got -0.1"),
        ("clip_grad", -1.0, "clip_grad must be None or a finite number >= 0, got -1.0"),
        ("l1", float("nan"), "l1 must be a finite number >= 0, got nan"),
        ("l2", -1e-3, "l2 must be a finite number >= 0"),
        ("weight_decay", -1, "weight_decay must be a finite number >= 0"),
        ("physics_samples", 0, "physics_samples must be an integer >= 1, got 0"),
        ("physics_weights", {"energy_diff2": -1}, "physics weight 'energy_diff2' must be a"),
        ("physics_weights", {"energy_diff": float("nan")}, "physics weight 'energy_diff' must"),
        ("physics_weights", [1.0], "physics_weights must be a mapping"),
        ("lr_schedule", "step", "lr_schedule must be one of constant, cosine, plateau"),
    ],
)
def test_options_outside_their_range_are_rejected(option, value, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        train(Mean(), *constant(1.0), **{"epochs": 1, option: value, "quiet": True})
    x, y = data(40)
    model = fr.make("cvae", hidden_dim=4, latent_dim=2, device="cpu")
    with pytest.raises(ValueError, match=re.escape(message)):  # fit checks before any work
        model.fit(x, y, **{"epochs": 1, option: value, "quiet": True})
    assert not model.is_fitted


def test_empty_data_are_rejected_by_the_loop() -> None:
    with pytest.raises(ValueError, match="the training data have no rows"):
        train(Mean(), torch.zeros(0, 1), torch.zeros(0, 1), epochs=1, quiet=True)
    with pytest.raises(ValueError, match="the validation data have no rows"):
        train(Mean(), *constant(1.0), torch.zeros(0, 1), torch.zeros(0, 1), epochs=1, quiet=True)


@pytest.mark.parametrize("rows", [2, 3, 5, 9])
def test_fit_on_a_handful_of_rows_says_how_many_it_needs(rows) -> None:
    x, y = data(rows)
    with pytest.raises(ValueError, match=f"fit needs at least 10 rows of x and y, got {rows}"):
        fr.make("zuko-nsf", device="cpu").fit(x, y, epochs=1, quiet=True)
    with pytest.raises(ValueError, match="fit needs at least 10 rows"):
        fr.make("zuko-nsf", device="cpu").fit(x[:5], y[:5], x[:1], y[:1], epochs=1, quiet=True)
    x, y = data(10)  # the smallest set fits: 8 training and 2 validation rows
    assert fr.make("zuko-nsf", hidden=4, device="cpu").fit(x, y, epochs=1, quiet=True).is_fitted


def test_history_round_trip() -> None:
    h = History(train={"total": [1.0, 0.5]}, val={"total": [1.2]}, best_epoch=1, best=1.2)
    assert History.from_dict(h.to_dict()) == h and h.epochs == 2


def test_split_is_seeded_and_70_15_15() -> None:
    parts = split_indices(1000, seed=0)
    assert [len(p) for p in parts] == [700, 150, 150]
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    again = split_indices(1000, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(parts[0], split_indices(1000, seed=1)[0])
    assert [len(p) for p in split_indices(101, seed=0)] == [71, 15, 15]
    assert [len(p) for p in split_indices(10, seed=0, fractions=(0.8, 0.2))] == [8, 2]
    with pytest.raises(ValueError, match="sum to 1"):
        split_indices(10, fractions=(0.5, 0.2))


# -- through ConditionalGenerator.fit ----------------------------------------------------


def data(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.normal(size=(n, 2))
    return y @ np.ones((2, 3)) + rng.normal(size=(n, 3)), y


def test_fit_splits_internally_and_checks_options(tmp_path) -> None:
    x, y = data()
    model = fr.make("cvae", hidden_dim=8, latent_dim=2, device="cpu")
    model.fit(x, y, epochs=2, quiet=True, checkpoint_path=tmp_path / "ckpt.pt")
    assert model.history_.epochs == 2 and len(model.history_.val["total"]) == 2
    assert fr.load(tmp_path / "ckpt.pt").history_.to_dict() == model.history_.to_dict()
    no_val = fr.make("cvae", hidden_dim=8, latent_dim=2).fit(
        x, y, epochs=1, val_fraction=0, quiet=True
    )
    assert not no_val.history_.val
    with pytest.raises(ValueError, match="unknown training option 'epoch'. Did you mean 'epochs'"):
        fr.make("cvae").fit(x, y, epoch=3)
    with pytest.raises(
        ValueError, match="x_val must have 3 columns like the training target, got 2"
    ):
        fr.make("cvae").fit(x, y, x[:, :2], y)


def test_preset_training_settings_are_used_and_overridable() -> None:
    x, y = data()
    model = fr.make("cvae-seed", hidden_dim=4, num_layers=1, latent_dim=2, device="cpu")
    model.fit(x, y, epochs=1, quiet=True)  # the preset's 200 epochs overridden
    assert model.model_ == "cvae" and model.hparams_["latent_sampling"] == "train_stats"
    assert model.history_.epochs == 1 and "l1" in model.history_.train


def test_cei_physics_loss_through_fit() -> None:
    from flowrecon.systems.cei.losses import physics_loss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 9)) + np.tile([0.0, 0, 0, -2.2, 0, 0, 2.9, 0, 0], (80, 1))
    p = rng.normal(size=(80, 9)) * 10
    model = fr.make("zuko-maf", transforms=1, hidden=8, device="cpu")
    model.fit(
        x,
        p,
        epochs=1,
        quiet=True,
        physics_loss=physics_loss(),
        physics_weights={"energy_diff2": 0.1},
    )
    assert {"energy_diff2", "rel_err2", "physics"} <= set(model.history_.train)
    assert np.isfinite(model.history_.train["energy_diff2"]).all()


@pytest.mark.parametrize("schedule", ["constant", "cosine", "plateau"])
def test_lr_schedules(schedule):
    from flowrecon.models.cvae import build_cvae

    torch.manual_seed(0)
    est = build_cvae(2, 1, hidden_dim=8, num_layers=1, latent_dim=2)
    x, y = torch.randn(256, 2), torch.randn(256, 1)
    h = train(
        est,
        x,
        y,
        x[:64],
        y[:64],
        epochs=12,
        batch_size=32,
        lr=1e-2,
        patience=0,
        lr_schedule=schedule,
        quiet=True,
    )
    assert len(h.lr) == 12
    if schedule == "constant":
        assert h.lr == [1e-2] * 12
    elif schedule == "cosine":
        assert h.lr[0] < 1e-2 and h.lr[-1] < 1.2e-4  # annealed to ~1 % at the end
        assert all(a >= b for a, b in zip(h.lr, h.lr[1:]))
    else:
        assert all(a >= b for a, b in zip(h.lr, h.lr[1:])) and h.lr[0] == 1e-2


def test_unknown_lr_schedule_message():
    from flowrecon.models.cvae import build_cvae

    est = build_cvae(2, 1, hidden_dim=8, num_layers=1, latent_dim=2)
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine, plateau"):
        train(est, torch.randn(8, 2), torch.randn(8, 1), epochs=1, lr_schedule="step")


def test_fit_says_when_the_model_overfits_and_stays_quiet_when_it_does_not():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1400, 2)), rng.normal(size=(1400, 1))
    val = (x[1000:], y[1000:])
    small = fr.make("zuko-maf", hidden=32, device="cpu", seed=0)
    small.fit(x[:16], y[:16], *val, epochs=60, batch_size=16, lr=1e-2, quiet=True, calibrate=False)
    note = small.history_.message
    assert "overfits its 16 training rows" in note
    assert f"state of epoch {small.history_.best_epoch} was kept" in note
    enough = fr.make("zuko-maf", hidden=16, device="cpu", seed=0)
    enough.fit(x[:1000], y[:1000], *val, epochs=12, lr=3e-3, quiet=True, calibrate=False)
    assert enough.history_.message == ""
