"""Representations of identical particles: canonical order, distance matrices, MDS.

Canonical order and densities. The particles are identical, so the Boltzmann density of
*labelled* configurations X in box^N, p(X) = exp(-U(X) / T) / Z, is symmetric under the
N! permutations of the labels, and a model of raw coordinates must learn N! copies of
every mode (the source study's networks averaged them into "all particles in the middle
of the box"). `canonical_order` sorts the particles by height (gravity axis), mapping X
to Y = s(X) in the chamber C = {h_0 <= h_1 <= ... <= h_(N-1)}. The map is N!-to-one and
volume-preserving on each branch, so the density of ordered configurations is

    p_C(Y) = N! * p(Y)     for Y in C,    and 0 outside C.

A model q_C fitted to ordered configurations therefore defines a labelled density
q(X) = q_C(s(X)) / N!: its negative log-likelihood per labelled configuration is the
ordered one plus log N! (log 30! = 74.658). Boltzmann importance weights of draws Y ~ q_C
are w = N! exp(-U(Y) / T) / q_C(Y) for Y in C and 0 for a draw outside C (or outside the
box), where the target density vanishes; the constant N! (and Z) cancel in self-normalised
weights, while the mass q_C puts outside C is lost, which the effective sample size shows.

Distances. A distance matrix is invariant under rotations, reflections and translations;
`classical_mds` recovers coordinates from it through the Gram matrix (exactly for an
exact Euclidean matrix, as the best rank-D approximation for a noisy or non-Euclidean
one), and `align` puts them back into a reference frame by the optimal orthogonal map
(Kabsch, with reflections allowed by default, since MDS cannot tell a configuration from
its mirror image). Gravity breaks these symmetries, so a configuration generated as a
distance matrix needs a reference (e.g. a configuration of the same condition) to be
placed in the box.

Example:
    >>> rng = np.random.default_rng(0)
    >>> x = rng.uniform(0, 5, (4, 30, 3))
    >>> y = reconstruct(distance_matrix(x), reference=x)
    >>> bool(np.abs(y - x).max() < 1e-9)
    True
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "align",
    "canonical_order",
    "classical_mds",
    "distance_matrix",
    "in_canonical_order",
    "log_permutations",
    "reconstruct",
]


def log_permutations(n_particles: int) -> float:
    """log N!, the log-density offset between ordered and labelled configurations.

    Example:
        >>> round(log_permutations(30), 3)
        74.658
    """
    return math.lgamma(int(n_particles) + 1)


def canonical_order(conf: np.ndarray) -> np.ndarray:
    """Particles sorted by height (the last coordinate), ``(..., N, D)`` -> same shape.

    Ties (a set of measure zero) keep their order, so the map is deterministic and
    idempotent.

    Example:
        >>> canonical_order(np.array([[0.0, 3.0], [1.0, 1.0], [2.0, 2.0]])).tolist()
        [[1.0, 1.0], [2.0, 2.0], [0.0, 3.0]]
    """
    c = np.asarray(conf, dtype=np.float64)
    idx = np.argsort(c[..., -1], axis=-1, kind="stable")
    return np.take_along_axis(c, idx[..., None], axis=-2)


def in_canonical_order(conf: np.ndarray) -> np.ndarray:
    """Whether each configuration's heights are non-decreasing, ``(...)``."""
    h = np.asarray(conf, dtype=np.float64)[..., -1]
    return (np.diff(h, axis=-1) >= 0).all(-1)


def distance_matrix(conf: np.ndarray) -> np.ndarray:
    """Pair distances ``(..., N, N)`` of configurations ``(..., N, D)``."""
    c = np.asarray(conf, dtype=np.float64)
    d = c[..., :, None, :] - c[..., None, :, :]
    return np.sqrt((d * d).sum(-1))


def classical_mds(dm: np.ndarray, dim: int) -> np.ndarray:
    """Coordinates ``(..., N, dim)`` whose distances best match ``dm`` ``(..., N, N)``.

    Classical (Torgerson) scaling: the Gram matrix of centred coordinates is
    G = -J D^2 J / 2 with J = I - 11^T / N; its ``dim`` largest eigenpairs give the
    coordinates sqrt(lambda) v, centred at the origin. The input is symmetrised and
    negative eigenvalues (a non-Euclidean matrix) are clipped at zero. Exact up to an
    orthogonal map and a translation when ``dm`` is an exact Euclidean matrix.
    """
    d = np.asarray(dm, dtype=np.float64)
    if d.ndim < 2 or d.shape[-1] != d.shape[-2]:
        raise ValueError(f"dm must be square distance matrices (..., N, N), got {d.shape}")
    n = d.shape[-1]
    if not 1 <= dim <= n:
        raise ValueError(f"dim must lie in [1, {n}], got {dim}")
    sq = 0.5 * (d * d + np.swapaxes(d * d, -1, -2))
    centred = sq - sq.mean(-1, keepdims=True)
    centred = centred - centred.mean(-2, keepdims=True)
    gram = -0.5 * centred
    vals, vecs = np.linalg.eigh(gram)
    vals, vecs = vals[..., ::-1][..., :dim], vecs[..., ::-1][..., :dim]
    return vecs * np.sqrt(np.clip(vals, 0.0, None))[..., None, :]


def align(conf: np.ndarray, reference: np.ndarray, *, reflection: bool = True) -> np.ndarray:
    """``conf`` moved onto ``reference`` by the optimal orthogonal map and translation.

    Kabsch's solution of min ||R (x - x_bar) + r_bar - r||: with the SVD
    ``(x - x_bar)^T (r - r_bar) = U S V^T``, R^T = U V^T. With ``reflection=True`` the
    map may be improper (a mirror image is matched too); with False a proper rotation
    is enforced by flipping the sign of the smallest singular direction.

    Example:
        >>> r = np.array([[0.0, 0], [1, 0], [0, 2]])
        >>> mirrored = r * [-1, 1] + 3.0
        >>> bool(np.allclose(align(mirrored, r), r))
        True
    """
    x = np.asarray(conf, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    xb, rb = x.mean(-2, keepdims=True), r.mean(-2, keepdims=True)
    xc, rc = x - xb, r - rb
    u, _, vt = np.linalg.svd(np.swapaxes(xc, -1, -2) @ rc)
    if not reflection:
        sign = np.sign(np.linalg.det(u @ vt))
        sign = np.where(sign == 0, 1.0, sign)
        u = u.copy()
        u[..., :, -1] *= sign[..., None]
    return xc @ (u @ vt) + rb


def reconstruct(dm: np.ndarray, reference: np.ndarray, *, reflection: bool = True) -> np.ndarray:
    """Coordinates from distance matrices, placed onto a reference by `align`.

    Args:
        dm: Distance matrices ``(..., N, N)`` (possibly generated, noisy or not exactly
            Euclidean).
        reference: ``(..., N, D)`` configurations that fix the frame (D is taken from
            it); particle i of the result is matched to particle i of the reference.
        reflection: Allow a mirror image in the alignment.
    """
    ref = np.asarray(reference, dtype=np.float64)
    return align(classical_mds(dm, ref.shape[-1]), ref, reflection=reflection)
