"""The per-epoch callback of the training loop, which the hyper-parameter search prunes with."""

from __future__ import annotations

import numpy as np
import pytest

import flowrecon as fr


class _Stop(Exception):
    pass


def _data(n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.normal(size=(n, 2))
    return y @ np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]) + rng.normal(size=(n, 3)), y


def test_on_epoch_sees_every_epoch_through_fit() -> None:
    x, y = _data()
    seen: list[tuple[int, float, float]] = []
    model = fr.make("zuko-maf", transforms=1, hidden=8)

    def record(epoch: int, train: dict, val: dict) -> None:
        seen.append((epoch, train["loss"], val["loss"]))

    model.fit(x, y, epochs=3, patience=0, quiet=True, on_epoch=record)
    assert [e for e, _, _ in seen] == [1, 2, 3]
    assert [v for _, _, v in seen] == pytest.approx(model.history_.val["loss"])
    assert [t for _, t, _ in seen] == pytest.approx(model.history_.train["loss"])


def test_exception_from_on_epoch_stops_training_at_once() -> None:
    x, y = _data()
    epochs: list[int] = []

    def stop_at_two(epoch: int, train: dict, val: dict) -> None:
        epochs.append(epoch)
        if epoch == 2:
            raise _Stop

    model = fr.make("zuko-maf", transforms=1, hidden=8)
    with pytest.raises(_Stop):
        model.fit(x, y, epochs=50, patience=0, quiet=True, on_epoch=stop_at_two)
    assert epochs == [1, 2]
    assert not model.is_fitted  # a fit cut by an exception leaves the model unfitted
