"""The learned CEI prior: internal coordinates, their Jacobian, agreement with ocs_log_prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowrecon.density import Density
from flowrecon.systems.cei.constants import R_CO_EQ, R_CS_EQ
from flowrecon.systems.cei.geometry import random_rotations, sample_ocs
from flowrecon.systems.cei.likelihood import ocs_log_prior
from flowrecon.systems.cei.prior import (
    fit_learned_prior,
    internal_coordinates,
    learned_log_prior,
)


def geometries(n: int, seed: int) -> np.ndarray:
    return sample_ocs(n, torch.Generator().manual_seed(seed)).numpy()


def test_internal_coordinates_are_rotation_and_translation_invariant() -> None:
    x = geometries(50, 0)
    rot = random_rotations(50, torch.Generator().manual_seed(1)).numpy()
    moved = np.einsum("bij,baj->bai", rot, x.reshape(50, 3, 3)).reshape(50, 9) + np.tile(
        [0.3, -2.0, 1.0], 3
    )
    f, lj = internal_coordinates(x)
    g, lk = internal_coordinates(moved)
    np.testing.assert_allclose(g, f, atol=1e-9)
    np.testing.assert_allclose(lk, lj, atol=1e-9)
    assert f.shape == (50, 3) and lj.shape == (50,)
    assert internal_coordinates(x.reshape(5, 10, 9))[0].shape == (5, 10, 3)


def test_jacobian_with_the_sampler_law_reproduces_ocs_log_prior_exactly() -> None:
    # The sampler's law in internal coordinates: bonds Gaussian, bend Rayleigh. In
    # l = log b the bend density is Rayleigh(b) * b; adding the Jacobian must give the
    # analytic density over relative coordinates.
    x = geometries(500, 2)
    f, log_jacobian = internal_coordinates(x)
    r1, r2, b = f[:, 0], f[:, 1], np.exp(f[:, 2])
    s_bond, s_bend = 0.1, math.radians(10.0)

    def log_normal(v: np.ndarray, mean: float) -> np.ndarray:
        return -0.5 * ((v - mean) / s_bond) ** 2 - math.log(s_bond * math.sqrt(2 * math.pi))

    log_rayleigh = np.log(b / s_bend**2) - b**2 / (2 * s_bend**2)
    log_features = log_normal(r1, R_CO_EQ) + log_normal(r2, R_CS_EQ) + log_rayleigh + np.log(b)
    np.testing.assert_allclose(log_features + log_jacobian, ocs_log_prior(x), rtol=1e-9)


def test_nearly_linear_geometries_stay_finite() -> None:
    x = np.array([[0.0, 0, 0, -2.2, 0, 0, 2.9, 0, 0], [0.0, 0, 0, -2.2, 0, 0, 2.9, 1e-12, 0]])
    f, lj = internal_coordinates(x)
    assert np.isfinite(f).all() and np.isfinite(lj).all()


def test_learned_prior_agrees_with_the_analytic_prior_up_to_a_constant(tmp_path) -> None:
    density = fit_learned_prior(geometries(10_000, 3), device="cpu", epochs=30, seed=0)
    path = tmp_path / "prior.pt"
    density.save(path)
    prior = learned_log_prior(Density.load(path, device="cpu"))
    held_out = geometries(2000, 4)
    learned, analytic = prior(held_out), ocs_log_prior(held_out)
    assert learned.shape == (2000,) and np.isfinite(learned).all()
    # Ranks agree everywhere; values where the training geometries were. A spline flow's
    # far tails are Gaussian while log b has an exponential left tail, so the one
    # geometry in a few thousand bent by under 0.1 degree is underrated by tens of nats:
    # the density's own domain check flags exactly those.
    ranks = [np.argsort(np.argsort(v)) for v in (learned, analytic)]
    assert np.corrcoef(*ranks)[0, 1] > 0.97
    inside = density.in_domain(internal_coordinates(held_out)[0])
    assert inside.mean() > 0.99
    assert np.corrcoef(learned[inside], analytic[inside])[0, 1] > 0.95
    # Differences between pairs of geometries (what choosing among solutions and
    # normalised importance weights use) agree; so does the constant (both normalised).
    pairs = (learned[::2] - learned[1::2]) - (analytic[::2] - analytic[1::2])
    assert np.median(np.abs(pairs)) < 0.25
    assert abs(np.median(learned - analytic)) < 0.1
    assert prior(held_out.reshape(40, 50, 9)).shape == (40, 50)


def test_learned_prior_needs_three_features() -> None:
    d = Density(hidden=8, transforms=1, device="cpu").fit(
        np.random.default_rng(0).normal(size=(50, 2)), epochs=1
    )
    with pytest.raises(ValueError, match="needs the 3 internal coordinates"):
        learned_log_prior(d)
    with pytest.raises(ValueError, match="positions must have 9 columns"):
        internal_coordinates(np.zeros((2, 6)))


def test_posterior_weights_take_a_callable_prior() -> None:
    from flowrecon.systems.cei.likelihood import posterior_weights
    from flowrecon.systems.cei.simulator import asymptotic_momenta

    x = geometries(3, 5)
    p = asymptotic_momenta(torch.as_tensor(x)).numpy()
    samples = x + 0.02 * np.random.default_rng(0).normal(size=(6, 3, 9))
    log_q = np.zeros((6, 3))
    by_name = posterior_weights(samples, p, log_q, 0.01, prior="ocs")
    by_callable = posterior_weights(samples, p, log_q, 0.01, prior=ocs_log_prior)
    np.testing.assert_allclose(by_callable.weights, by_name.weights)


def _euler_coordinates(q: torch.Tensor, molecule) -> torch.Tensor:
    """(features, alpha, beta, gamma) of relative coordinates q (3N - 3,), differentiable.

    The orientation as ZYZ Euler angles of the frame whose z axis points along the second
    Z-matrix atom's bond and whose xz plane holds the third atom's; Haar measure
    sin(beta) dalpha dbeta dgamma, total 8 pi^2.
    """

    x = torch.cat([torch.zeros(3, dtype=q.dtype), q])
    atoms = x.reshape(-1, 3)
    rows = molecule.zmatrix
    e1 = atoms[rows[1].atom] - atoms[rows[1].bond_to]
    e1 = e1 / e1.norm()
    beta = torch.acos(e1[2])
    alpha = torch.atan2(e1[1], e1[0])
    # The frame after Rz(alpha) Ry(beta); gamma turns its x axis towards the third atom.
    ca, sa, cb, sb = torch.cos(alpha), torch.sin(alpha), torch.cos(beta), torch.sin(beta)
    ex = torch.stack([ca * cb, sa * cb, -sb])
    ey = torch.stack([-sa, ca, torch.zeros((), dtype=q.dtype)])
    w = atoms[rows[2].atom] - atoms[rows[2].bond_to]
    gamma = torch.atan2((w * ey).sum(), (w * ex).sum())
    # The features come from numpy: rebuild them with autograd through torch instead.
    features = _torch_features(atoms, molecule)
    return torch.cat([features, torch.stack([alpha, beta, gamma])])


def _torch_features(atoms: torch.Tensor, molecule) -> torch.Tensor:
    from flowrecon.systems.cei.physics import dihedral_torch

    out = []
    for number, row in enumerate(molecule.zmatrix[1:], start=1):
        bond = atoms[row.atom] - atoms[row.bond_to]
        out.append(bond.norm())
        if number < 2:
            continue
        axis = atoms[row.angle_to] - atoms[row.bond_to]
        cos = (bond * axis).sum() / (bond.norm() * axis.norm())
        out.append(torch.log(math.pi - torch.acos(cos)) if row.linear else torch.acos(cos))
        if number >= 3:
            out.append(dihedral_torch(atoms[row.atom], atoms[row.bond_to], atoms[row.angle_to],
                                      atoms[row.dihedral_to]))  # fmt: skip
    return torch.stack(out)


@pytest.mark.parametrize("name", ["co2", "so2", "ch2i2", "chbrclf"])
def test_molecule_features_jacobian_is_the_exact_change_of_measure(name) -> None:
    """log_jacobian = log|d(features, Euler angles)/dq| + log sin(beta) - log 8 pi^2.

    A density p_f over the features and the uniform (Haar) orientation give the density
    p_f * sin(beta) / (8 pi^2) * |det J| over the relative coordinates q; the features'
    log-Jacobian must say exactly that, for bent, linear and five-atom molecules.
    """
    from flowrecon.systems.cei.molecule import load_molecule
    from flowrecon.systems.cei.prior import molecule_features
    from flowrecon.systems.cei.zmatrix import sample_zmatrix

    m = load_molecule(name)
    x = sample_zmatrix(m, 3, torch.Generator().manual_seed(4))
    rot = random_rotations(3, torch.Generator().manual_seed(5))
    x = torch.einsum("bij,baj->bai", rot, x)
    features = molecule_features(m)
    assert features is not None
    for geometry in x:
        q = (geometry[1:] - geometry[0]).reshape(-1)  # the Z-matrix's first atom is atom 0
        jac = torch.autograd.functional.jacobian(lambda v: _euler_coordinates(v, m), q)
        angles = _euler_coordinates(q, m)
        haar = torch.log(torch.sin(angles[-2])) - math.log(8 * math.pi**2)
        expected = torch.linalg.slogdet(jac)[1] + haar
        f, log_j = features(geometry.reshape(1, -1).numpy())
        assert log_j[0] == pytest.approx(float(expected), abs=1e-7)
        # The features themselves; dihedrals as offsets from their reference values.
        plain = angles[:-3].detach().numpy()
        wrapped = np.isclose(f[0], plain, atol=1e-9)
        assert wrapped.sum() >= len(plain) - (m.n_atoms - 3)


def test_molecule_features_of_ocs_are_the_ocs_internal_coordinates() -> None:
    from flowrecon.systems.cei.molecule import load_molecule
    from flowrecon.systems.cei.prior import molecule_features

    x = geometries(500, 3)
    features = molecule_features(load_molecule("ocs"))
    assert features is not None
    f, log_j = features(x)
    g, log_k = internal_coordinates(x)
    np.testing.assert_allclose(f, g, rtol=0, atol=1e-12)
    np.testing.assert_allclose(log_j, log_k, rtol=0, atol=1e-12)


def test_molecule_features_refuse_the_wrong_width() -> None:
    from flowrecon.systems.cei.molecule import load_molecule
    from flowrecon.systems.cei.prior import molecule_features

    features = molecule_features(load_molecule("chbrclf"))
    assert features is not None
    with pytest.raises(ValueError, match="must have 15 columns for 'chbrclf', got 9"):
        features(np.zeros((2, 9)))
