"""What a model's latent space and likelihood say about configurations: maps and anomalies.

Two checks the source study made of its variational autoencoders, run on held-out Monte
Carlo configurations:

- **Latent map**: the encoder means of q(z | x, y) (models with an encoder: the cVAE)
  projected on their first two principal components, coloured by gamma, with the
  silhouette score of the gamma labels (scikit-learn). For a *conditional* VAE a score
  near 0 is expected and healthy: gamma reaches the decoder through y, so the latent need
  not encode it; a plain VAE must carry gamma in z and then separates the conditions.
- **Anomaly score**: each configuration's ``model.anomaly_score`` (-log p(x | y), or the
  negative ELBO for the cVAE), for held-out configurations and for copies of them with
  every particle displaced by Gaussian noise (reflected into the box, re-sorted); the
  ROC AUC says how well the model's score tells them apart (1: perfectly, 0.5: not at
  all). The potential energy U of the same configurations gives the physics reference:
  what the exact Boltzmann density exp(-U/T) achieves.

Example:
    >>> rng = np.random.default_rng(0)
    >>> conf = rng.uniform(0.5, 4.5, size=(3, 4, 3))
    >>> moved = perturb(conf, 0.1, 5.0, rng)
    >>> moved.shape, bool(((moved >= 0) & (moved <= 5)).all())
    ((3, 4, 3), True)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flowrecon.systems.lj.geometry import canonical_order
from flowrecon.systems.lj.physics import potential_energy

__all__ = ["anomaly_metrics", "latent_metrics", "perturb", "reflect_into_box"]

#: Default displacement (sigma, per coordinate) of the perturbed configurations: about the
#: thermal rattle of a particle in its neighbours' cage at T = 1.5, large enough to create
#: the close contacts Monte Carlo rejects.
ANOMALY_NOISE = 0.15


def reflect_into_box(conf: np.ndarray, box: float) -> np.ndarray:
    """Coordinates folded back into [0, L] by reflection at the walls (as the sampler does).

    Example:
        >>> reflect_into_box(np.array([-0.5, 5.25, 2.0, 11.0]), 5.0).tolist()
        [0.5, 4.75, 2.0, 1.0]
    """
    period = np.mod(np.asarray(conf, dtype=np.float64), 2 * box)
    return np.where(period > box, 2 * box - period, period)


def perturb(
    conf: np.ndarray, noise: float, box: float, rng: np.random.Generator, ordered: bool = True
) -> np.ndarray:
    """Copies of configurations ``(B, N, D)`` with every coordinate displaced by N(0, noise^2)."""
    if not (math.isfinite(noise) and noise > 0):
        raise ValueError(f"anomaly_noise must be a positive number of sigma, got {noise}")
    moved = reflect_into_box(conf + noise * rng.standard_normal(conf.shape), box)
    return canonical_order(moved) if ordered else moved


def _silhouette(z: np.ndarray, labels: np.ndarray) -> float | None:
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2 or len(labels) <= len(np.unique(labels)):
        return None
    return float(silhouette_score(z, labels))


def latent_metrics(
    model: Any, x: np.ndarray, y: np.ndarray, rows: int, seed: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Silhouette of the gamma labels in the latent means and in their first two PCs.

    ``x`` ``(B, Dx)`` held-out configurations (the model's columns), ``y`` ``(B, 2)``; at
    most ``rows`` of them, picked with ``seed``. Returns the metrics and the map (the two
    components, gamma) for the figure.
    """
    from sklearn.decomposition import PCA

    pick = np.random.default_rng(seed).permutation(len(x))[:rows]
    z = np.asarray(model.latent(x[pick], y[pick]), dtype=np.float64)
    gamma = y[pick, 0]
    labels = np.unique(np.round(gamma, 9), return_inverse=True)[1]
    pca = PCA(n_components=min(2, z.shape[1]), random_state=seed).fit(z)
    pcs = pca.transform(z)
    metrics = {
        "latent_rows": len(pick),
        "latent_dim": int(z.shape[1]),
        "latent_explained_variance_2pc": float(pca.explained_variance_ratio_.sum()),
        "latent_silhouette": _silhouette(z, labels),
        "latent_silhouette_2pc": _silhouette(pcs, labels),
    }
    return metrics, {"pcs": pcs, "gamma": gamma}


def _auc(normal: np.ndarray, anomalous: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([normal, anomalous])
    if not np.isfinite(scores).all():  # a +inf score (outside the support) is very anomalous
        scores = np.nan_to_num(scores, nan=np.inf, posinf=np.finfo(float).max)
    truth = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return float(roc_auc_score(truth, scores))


def anomaly_metrics(
    model: Any,
    conf: np.ndarray,
    y: np.ndarray,
    *,
    noise: float,
    box: float,
    rows: int,
    seed: int,
    ordered: bool = True,
) -> dict[str, Any]:
    """ROC AUC of the model's anomaly score: held-out vs perturbed configurations.

    ``conf`` ``(B, N, D)`` held-out configurations, ``y`` ``(B, 2)`` their (gamma, T); at
    most ``rows`` of them, each also perturbed by ``noise`` (sigma).
    """
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(conf))[:rows]
    clean, cond = conf[pick], y[pick]
    moved = perturb(clean, noise, box, rng, ordered)
    flat = [c.reshape(len(c), -1) for c in (clean, moved)]
    scores = [np.asarray(model.anomaly_score(f, cond), dtype=np.float64) for f in flat]
    # The physics reference: the exact Boltzmann log-density up to a constant, -U/T.
    beta_u = [potential_energy(c, cond[:, 0]) / cond[:, 1] for c in (clean, moved)]
    n = clean.shape[1]
    return {
        "anomaly_rows": len(pick),
        "anomaly_noise": float(noise),
        "anomaly_auc": _auc(*scores),
        "anomaly_auc_energy": _auc(*beta_u),
        # Median U/N the perturbation adds: a mean would be one close contact's 1e4.
        "anomaly_energy_shift": float(np.median((beta_u[1] - beta_u[0]) * cond[:, 1]) / n),
    }
