"""Canonical order, distance matrices and reconstruction by classical MDS plus alignment."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flowrecon.systems.lj.data import coordinate_columns, prepare
from flowrecon.systems.lj.geometry import (
    align,
    canonical_order,
    classical_mds,
    distance_matrix,
    in_canonical_order,
    log_permutations,
    reconstruct,
)
from flowrecon.systems.lj.physics import lj_energy, pair_distances, potential_energy


def _random_rotation(rng: np.random.Generator, dim: int, proper: bool) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) > 0) != proper:
        q[:, 0] *= -1
    return q


def test_canonical_order_sorts_by_height_and_keeps_invariants():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 5, (50, 30, 3))
    ordered = canonical_order(conf)
    assert in_canonical_order(ordered).all() and not in_canonical_order(conf).all()
    np.testing.assert_array_equal(canonical_order(ordered), ordered)  # idempotent
    np.testing.assert_allclose(lj_energy(ordered), lj_energy(conf))
    np.testing.assert_allclose(potential_energy(ordered, 0.3), potential_energy(conf, 0.3))
    # The same particles: each ordered configuration is a permutation of the original.
    np.testing.assert_allclose(np.sort(ordered[..., 0], -1), np.sort(conf[..., 0], -1))


def test_ordered_density_is_n_factorial_times_the_labelled_one():
    """Monte Carlo check of p_C = N! p on the chamber, for 3 uniform particles in 1-D."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (400_000, 3, 1))
    y = canonical_order(x)
    # p(labelled) = 1 on the unit cube, so the ordered density should be 3! = 6: the
    # fraction of ordered points in a small box around a point of the chamber.
    centre, half = np.array([0.2, 0.5, 0.8]), 0.05
    inside = (np.abs(y[..., 0] - centre) < half).all(1).mean()
    assert inside / (2 * half) ** 3 == pytest.approx(math.factorial(3), rel=0.05)
    assert log_permutations(3) == pytest.approx(math.log(6))


def test_prepare_reorders_the_coordinate_columns_only():
    import pandas as pd

    rng = np.random.default_rng(2)
    cols = coordinate_columns(4, 2)
    table = pd.DataFrame(rng.uniform(0, 3, (5, 8)), columns=list(cols))
    table["gamma"], table["chain"] = 0.5, np.arange(5)
    out = prepare(table, 4, 2)
    heights = out[[f"y{i}" for i in range(4)]].to_numpy()
    assert (np.diff(heights, axis=1) >= 0).all()
    pd.testing.assert_series_equal(out["chain"], table["chain"])
    assert (table[list(cols)] != out[list(cols)]).any().any()  # the input is not modified
    with pytest.raises(ValueError, match="no column"):
        prepare(table.drop(columns="y3"), 4, 2)


def test_distance_matrix_agrees_with_pair_distances():
    rng = np.random.default_rng(3)
    conf = rng.uniform(0, 5, (7, 12, 3))
    dm = distance_matrix(conf)
    i, j = np.triu_indices(12, 1)
    np.testing.assert_allclose(dm[:, i, j], pair_distances(conf))
    np.testing.assert_allclose(dm, np.swapaxes(dm, 1, 2))
    assert (np.diagonal(dm, axis1=1, axis2=2) == 0).all()


@pytest.mark.parametrize("dim", [2, 3])
def test_mds_and_alignment_are_exact_on_exact_matrices(dim):
    rng = np.random.default_rng(4)
    conf = rng.uniform(0, 5, (20, 30, dim))
    coords = classical_mds(distance_matrix(conf), dim)
    np.testing.assert_allclose(coords.mean(1), 0, atol=1e-10)  # centred
    np.testing.assert_allclose(distance_matrix(coords), distance_matrix(conf), atol=1e-9)
    np.testing.assert_allclose(reconstruct(distance_matrix(conf), conf), conf, atol=1e-9)


@pytest.mark.parametrize("proper", [True, False])
def test_alignment_undoes_rotations_and_reflections(proper):
    rng = np.random.default_rng(5)
    ref = rng.uniform(0, 5, (10, 30, 3))
    rot = np.stack([_random_rotation(rng, 3, proper) for _ in range(10)])
    moved = ref @ rot + rng.normal(size=(10, 1, 3))
    np.testing.assert_allclose(align(moved, ref), ref, atol=1e-10)
    rotation_only = align(moved, ref, reflection=False)
    if proper:
        np.testing.assert_allclose(rotation_only, ref, atol=1e-10)
    else:  # a mirror image cannot be rotated onto the original
        assert np.abs(rotation_only - ref).max() > 0.1


def test_reconstruction_degrades_gracefully_with_noise():
    rng = np.random.default_rng(6)
    conf = rng.uniform(0, 5, (20, 30, 3))
    dm = distance_matrix(conf)
    errors = []
    for noise in (0.001, 0.01, 0.05):
        noisy = dm + noise * rng.normal(size=dm.shape)  # not symmetric, not Euclidean
        noisy = np.abs(noisy) * (1 - np.eye(30))
        rec = reconstruct(noisy, conf)
        errors.append(np.sqrt(((rec - conf) ** 2).sum(-1).mean()))
    assert errors[0] < 0.01 and errors[-1] < 0.2
    assert errors[0] < errors[1] < errors[2]


def test_bad_distance_matrices_are_rejected():
    with pytest.raises(ValueError, match="square"):
        classical_mds(np.zeros((3, 4)), 2)
    with pytest.raises(ValueError, match="dim must lie"):
        classical_mds(np.zeros((3, 3)), 4)
