"""Energies and observables of Lennard-Jones particles under gravity in a closed box.

Reduced units throughout: lengths in sigma, energies in epsilon, masses in m, so that a
temperature T means k_B T / epsilon. A configuration of N particles in D dimensions
(D = 1, 2 or 3) is an array ``(..., N, D)`` or, flat as in a data table, ``(..., N * D)``
with columns ``x0 y0 z0 x1 ...``; gravity acts along the *last* axis (z in 3-D, y in
2-D), which is called the height h. The potential energy is

    U = 4 * sum_{i<j} (r_ij^-12 - r_ij^-6) + 4 * gamma * sum_i h_i,

with gamma = m g sigma / (4 epsilon) and no cutoff; the walls of the box [0, L]^D are
hard (a configuration with a particle outside has zero probability).

Everything here is numpy, float64, chunked so that a million configurations never make
an ``(n, N, N)`` array at once.

Example:
    >>> import numpy as np
    >>> conf = np.array([[[0.0, 0.0, 1.0], [0.0, 0.0, 2.0 ** (1 / 6) + 1.0]]])
    >>> float(lj_energy(conf)[0])  # a pair at the minimum of the potential
    -1.0
    >>> float(potential_energy(conf, gamma=0.25)[0])  # plus 4 * 0.25 * (1 + 2.122)
    2.122462048309373
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "as_configurations",
    "barometric_density",
    "density_profile",
    "gravity_energy",
    "heights",
    "ideal_pair_distances",
    "lj_energy",
    "min_pair_distance",
    "outside_box",
    "pair_distances",
    "potential_energy",
]

#: Configurations per chunk in pair computations: ~40 MB of temporaries for N = 30.
CHUNK = 8192


def as_configurations(x: np.ndarray, n_particles: int, dim: int) -> np.ndarray:
    """``(..., N * D)`` or ``(..., N, D)`` coordinates -> float64 ``(..., N, D)``.

    Example:
        >>> as_configurations(np.arange(6.0), 2, 3).shape
        (2, 3)
    """
    a = np.asarray(x, dtype=np.float64)
    if a.shape[-2:] == (n_particles, dim):
        return a
    if a.shape[-1] != n_particles * dim:
        raise ValueError(
            f"configurations must have {n_particles * dim} columns ({n_particles} particles "
            f"in {dim}-D) or shape (..., {n_particles}, {dim}), got {a.shape}"
        )
    return a.reshape(*a.shape[:-1], n_particles, dim)


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, 1)


def pair_distances(conf: np.ndarray) -> np.ndarray:
    """Distances of all pairs i < j, ``(..., N (N - 1) / 2)``, in ``triu_indices`` order.

    Example:
        >>> pair_distances(np.array([[0.0, 0], [3, 4], [0, 1]])).round(3).tolist()
        [5.0, 1.0, 4.243]
    """
    c = np.asarray(conf, dtype=np.float64)
    i, j = _pairs(c.shape[-2])
    return np.sqrt(((c[..., i, :] - c[..., j, :]) ** 2).sum(-1))


def _chunked(conf: np.ndarray, func) -> np.ndarray:
    c = np.asarray(conf, dtype=np.float64)
    lead = c.shape[:-2]
    flat = c.reshape(-1, *c.shape[-2:])
    out = np.empty(flat.shape[0])
    for s in range(0, flat.shape[0], CHUNK):
        out[s : s + CHUNK] = func(flat[s : s + CHUNK])
    return out.reshape(lead)


def lj_energy(conf: np.ndarray) -> np.ndarray:
    """Lennard-Jones energy 4 * sum_{i<j} (r^-12 - r^-6) of each configuration, ``(...)``."""

    def energy(c: np.ndarray) -> np.ndarray:
        inv6 = pair_distances(c) ** -6.0
        return 4.0 * (inv6 * (inv6 - 1.0)).sum(-1)

    with np.errstate(divide="ignore", over="ignore"):
        return _chunked(conf, energy)


def min_pair_distance(conf: np.ndarray) -> np.ndarray:
    """Smallest pair distance of each configuration, ``(...)``."""
    return _chunked(conf, lambda c: pair_distances(c).min(-1))


def heights(conf: np.ndarray) -> np.ndarray:
    """Heights (the last coordinate, along which gravity acts), ``(..., N)``."""
    return np.asarray(conf, dtype=np.float64)[..., -1]


def gravity_energy(conf: np.ndarray, gamma: float | np.ndarray) -> np.ndarray:
    """4 * gamma * sum_i h_i, ``(...)``; gamma broadcasts against the leading shape."""
    return 4.0 * np.asarray(gamma, dtype=np.float64) * heights(conf).sum(-1)


def potential_energy(conf: np.ndarray, gamma: float | np.ndarray) -> np.ndarray:
    """Total potential energy U (Lennard-Jones plus gravity), ``(...)``."""
    return lj_energy(conf) + gravity_energy(conf, gamma)


def outside_box(conf: np.ndarray, box: float) -> np.ndarray:
    """Whether any coordinate of a configuration lies outside [0, box], ``(...)``."""
    c = np.asarray(conf, dtype=np.float64)
    return ((c < 0.0) | (c > box)).any(axis=(-1, -2))


def density_profile(conf: np.ndarray, box: float, bins: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Number density along the height, averaged over configurations.

    Returns ``(centres, rho)``: rho is particles per unit volume at each height bin
    (counts / (configurations * bin width * box^(D-1))), so that it integrates over the
    box to N. Heights outside [0, box] are not counted.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> _, rho = density_profile(rng.uniform(0, 5, (4000, 30, 3)), 5.0, bins=5)
        >>> np.allclose(rho, 30 / 125, rtol=0.03)
        True
    """
    c = np.asarray(conf, dtype=np.float64)
    dim = c.shape[-1]
    h = heights(c).reshape(-1)
    n_conf = h.size // c.shape[-2]
    edges = np.linspace(0.0, box, bins + 1)
    counts, _ = np.histogram(h, edges)
    width = box / bins
    rho = counts / (max(n_conf, 1) * width * box ** (dim - 1))
    return 0.5 * (edges[:-1] + edges[1:]), rho


def barometric_density(
    h: np.ndarray, gamma: float, temperature: float, box: float, n_particles: int, dim: int
) -> np.ndarray:
    """Exact number density of an ideal gas (no pair interaction) at height h.

    rho(h) = N a exp(-a h) / ((1 - exp(-a L)) L^(D-1)) with a = 4 gamma / T.

    Example:
        >>> float(barometric_density(np.array(0.0), 0.0, 1.0, 5.0, 30, 3))  # uniform: N / L^3
        0.24
    """
    a = 4.0 * gamma / temperature
    h = np.asarray(h, dtype=np.float64)
    area = box ** (dim - 1)
    if a * box < 1e-12:
        return np.full_like(h, n_particles / (box * area))
    return n_particles * a * np.exp(-a * h) / (-math.expm1(-a * box) * area)


def barometric_mean_height(gamma: float, temperature: float, box: float) -> float:
    """Mean height of an ideal-gas particle in [0, box] under gravity.

    Example:
        >>> barometric_mean_height(0.0, 1.0, 5.0)
        2.5
    """
    a = 4.0 * gamma / temperature
    if a * box < 1e-9:
        return box / 2
    return 1.0 / a - box / math.expm1(a * box)


def ideal_pair_distances(box: float, dim: int, n: int = 200_000, seed: int = 0) -> np.ndarray:
    """Distances between independent uniform points in the box: the ideal-gas reference.

    g(r) in a closed box is the pair-distance density divided by this one (there is no
    4 pi r^2 shell normalisation without periodic images).
    """
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.0, box, (2, n, dim))
    return np.sqrt(((a - b) ** 2).sum(-1))
