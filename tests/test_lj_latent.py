"""Latent maps and anomaly scores of LJ models (`flowrecon.systems.lj.latent`)."""

from __future__ import annotations

import numpy as np
import pytest

import flowrecon as fr
from flowrecon.systems.lj.latent import (
    anomaly_metrics,
    latent_metrics,
    perturb,
    reflect_into_box,
)
from flowrecon.systems.lj.physics import potential_energy


class _Stub:
    """A model whose latent is a given function of (x, y) and whose score is given too."""

    has_density, has_latent = True, True

    def __init__(self, latent, score) -> None:
        self._latent, self._score = latent, score

    def latent(self, x, y):
        return self._latent(x, y)

    def anomaly_score(self, x, y):
        return self._score(x, y)


def test_reflection_and_perturbation_stay_in_the_box():
    np.testing.assert_allclose(reflect_into_box(np.array([-1.0, 6.0, 13.0]), 5.0), [1, 4, 3])
    rng = np.random.default_rng(1)
    conf = rng.uniform(0, 5, size=(50, 6, 3))
    moved = perturb(conf, 2.0, 5.0, rng)
    assert ((moved >= 0) & (moved <= 5)).all()
    assert (np.diff(moved[..., -1], axis=1) >= 0).all()  # re-sorted by height
    with pytest.raises(ValueError, match="anomaly_noise must be a positive"):
        perturb(conf, 0.0, 5.0, rng)


def test_latent_silhouette_of_separated_and_mixed_gammas():
    rng = np.random.default_rng(0)
    y = np.column_stack([np.repeat([0.05, 1.0], 100), np.full(200, 1.5)])
    x = rng.normal(size=(200, 6))
    # Two tight clusters 10 apart, one per gamma: silhouette close to 1.
    apart = _Stub(lambda x, y: np.column_stack([10 * y[:, 0], rng.normal(0, 0.1, len(y))]), None)
    metrics, latent = latent_metrics(apart, x, y, rows=200, seed=0)
    assert metrics["latent_silhouette"] > 0.9 and metrics["latent_silhouette_2pc"] > 0.9
    assert latent["pcs"].shape == (200, 2) and set(np.round(latent["gamma"], 2)) == {0.05, 1.0}
    # A latent that ignores gamma: silhouette near 0.
    mixed = _Stub(lambda x, y: rng.normal(size=(len(y), 4)), None)
    metrics, _ = latent_metrics(mixed, x, y, rows=200, seed=0)
    assert abs(metrics["latent_silhouette"]) < 0.05 and metrics["latent_dim"] == 4


def test_anomaly_auc_of_the_exact_boltzmann_score():
    # Scored by U/T itself, displaced configurations of a dilute gas in a big box are
    # told apart from the originals only by chance; packed ones get clear overlaps.
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(*[np.arange(3) * 1.12 + 0.6] * 3, indexing="ij"), -1)
    conf = np.broadcast_to(grid.reshape(-1, 3), (300, 27, 3)) + rng.normal(0, 0.03, (300, 27, 3))
    y = np.column_stack([np.full(300, 0.25), np.full(300, 1.5)])

    def boltzmann(x, y):
        return potential_energy(x.reshape(len(x), 27, 3), y[:, 0]) / y[:, 1]

    out = anomaly_metrics(
        _Stub(None, boltzmann), conf, y, noise=0.15, box=5.0, rows=300, seed=0, ordered=False
    )
    assert out["anomaly_auc"] == pytest.approx(out["anomaly_auc_energy"])
    assert out["anomaly_auc"] > 0.95 and out["anomaly_energy_shift"] > 0
    # A score that ignores x cannot separate: AUC 0.5 exactly.
    flat = anomaly_metrics(
        _Stub(None, lambda x, y: np.zeros(len(x))), conf, y, noise=0.15, box=5.0, rows=300, seed=0
    )
    assert flat["anomaly_auc"] == 0.5


@pytest.mark.parametrize("name", ["cvae", "zuko-maf"])
def test_generator_latent_and_anomaly_score(name):
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 1, size=(400, 1))
    x = np.column_stack([y[:, 0], -y[:, 0]]) + 0.05 * rng.normal(size=(400, 2))
    model = fr.make(name, seed=0, device="cpu").fit(x, y, epochs=30, quiet=True, calibrate=False)
    near, far = x[:50], x[:50] + 2.0
    scores = model.anomaly_score(np.r_[near, far], np.r_[y[:50], y[:50]])
    assert scores.shape == (100,) and scores[:50].mean() < scores[50:].mean()
    if name == "cvae":
        assert model.has_latent and model.latent(near, y[:50]).shape == (
            50,
            model.hparams_full_["latent_dim"],
        )
    else:
        assert not model.has_latent
        np.testing.assert_allclose(scores[:50], -model.log_prob(near, y[:50]), rtol=1e-6)
        with pytest.raises(ValueError, match="has no encoder"):
            model.latent(near, y[:50])
    with pytest.raises(ValueError, match="same number of rows"):
        model.anomaly_score(near, y[:10])
