"""Refinement of geometries through the simulator, and the merge of duplicate solutions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowrecon.systems.cei.constants import MASSES
from flowrecon.systems.cei.geometry import sample_ocs
from flowrecon.systems.cei.physics import remove_centre_of_mass
from flowrecon.systems.cei.refine import (
    distinct_solutions,
    refine,
    refine_posterior,
    solution_log_mass,
)
from flowrecon.systems.cei.simulator import asymptotic_momenta


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _max_atom_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).reshape(-1, 3, 3).norm(dim=-1).max(1).values


def test_refine_recovers_noise_free_geometries():
    truth = sample_ocs(64, _gen(0))
    momenta = asymptotic_momenta(truth)
    noise = 0.03 * torch.randn(truth.shape, generator=_gen(1), dtype=torch.float64)
    start = remove_centre_of_mass(truth + noise)  # posterior samples share the truth's COM
    result = refine(start, momenta)
    assert result.converged.float().mean() >= 0.95
    ok = result.converged
    # "converged" means exactly: the reported residual is below the tolerance (1e-9).
    assert torch.equal(ok, result.residual < 1e-9)
    assert (result.residual <= 1e-8).float().mean() >= 0.95  # over all starts, not the converged
    assert (_max_atom_error(result.positions, truth)[ok] <= 1e-5).float().mean() >= 0.95
    # The residual is what the full simulator says of the refined geometry.
    check = asymptotic_momenta(result.positions[ok])
    rel = (check - momenta[ok]).norm(dim=1) / momenta[ok].norm(dim=1)
    np.testing.assert_allclose(rel, result.residual[ok], atol=1e-12)


def test_refine_keeps_the_centre_of_mass_of_the_start():
    truth = sample_ocs(4, _gen(2))
    shift = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64).repeat(3)
    result = refine(truth + shift + 0.01, asymptotic_momenta(truth))
    assert result.converged.all()
    assert torch.allclose(result.positions, truth + shift + 0.01, atol=1e-6)


def test_refine_counts_iterations_and_stops_at_the_limit():
    truth = sample_ocs(3, _gen(3))
    momenta = asymptotic_momenta(truth)
    result = refine(truth, momenta)  # already the answer
    assert result.converged.all() and (result.iterations == 0).all()
    far = refine(
        truth + torch.randn(3, 9, generator=_gen(4), dtype=torch.float64), momenta, max_iter=1
    )
    assert (far.iterations <= 1).all()


@pytest.mark.parametrize(
    ("positions", "momenta", "message"),
    [
        (np.zeros((2, 9)), np.zeros((3, 9)), r"shape \(B, 9\)"),
        (np.zeros((2, 8)), np.zeros((2, 8)), r"shape \(B, 9\)"),
    ],
)
def test_refine_bad_shapes(positions, momenta, message):
    with pytest.raises(ValueError, match=message):
        refine(positions, momenta)


# A bent, unequal-bond OCS geometry (r_CO 1.6, r_CS 3.6 bohr, 110 deg) and a second,
# very different geometry (r_CO 4.12, r_CS 2.20 bohr, 24.8 deg) whose explosion gives the
# same momenta: found by refining random starts, rounded to 1e-6 bohr.
_ANGLE = math.radians(110)
_GEOMETRY_A = [0.0, 0.0, 0.0, 1.6, 0.0, 0.0, 3.6 * math.cos(_ANGLE), 3.6 * math.sin(_ANGLE), 0.0]
_GEOMETRY_B = [-2.026706, -0.898181, 0.0, 2.017218, -0.104998, 0.0, -0.247371, 0.388893, 0.0]


def _two_geometry_event(near_a: int, near_b: int, seed: int):
    """Geometries A and B (COM at 0), their common momenta, and samples scattered
    0.02 bohr around each, as a two-mode posterior would give."""
    a = remove_centre_of_mass(torch.tensor([_GEOMETRY_A], dtype=torch.float64))
    b = remove_centre_of_mass(torch.tensor([_GEOMETRY_B], dtype=torch.float64))
    starts = torch.cat([a.expand(near_a, 9), b.expand(near_b, 9)])
    starts = remove_centre_of_mass(
        starts + 0.02 * torch.randn(starts.shape, generator=_gen(seed), dtype=torch.float64)
    )
    return a, b, asymptotic_momenta(a), starts


def test_an_event_with_two_geometries_returns_both():
    a, b, momenta, starts = _two_geometry_event(6, 6, seed=5)
    result = refine(starts, momenta.expand(12, 9))
    solutions = distinct_solutions(result.positions, result.residual, result.converged)
    assert len(solutions) == 2
    assert (solutions.residual <= 1e-8).all() and solutions.count.sum() == result.converged.sum()
    found = torch.as_tensor(solutions.positions)
    err_a = _max_atom_error(found, a.expand(2, 9))
    err_b = _max_atom_error(found, b.expand(2, 9))
    assert sorted([int(err_a.argmin()), int(err_b.argmin())]) == [0, 1]
    assert err_a.min() < 1e-5 and err_b.min() < 1e-5
    # Two genuinely different geometries: bonds differ by more than a bohr.
    assert _max_atom_error(found[:1], found[1:]) > 1.0


def test_distinct_solutions_merges_and_ignores_unconverged():
    base = np.array(_GEOMETRY_A)
    other = np.array(_GEOMETRY_B)
    nudge = np.zeros(9)
    nudge[3] = 1.0  # moves the O atom only (a move of all atoms would be a mere COM shift)
    refined = np.stack([base, base + 1e-6 * nudge, other, base + 5e-5 * nudge, other + 0.5])
    residual = np.array([1e-12, 2e-12, 3e-12, 1e-11, 1e-3])
    converged = np.array([True, True, True, True, False])
    sol = distinct_solutions(refined, residual, converged, merge_tol=1e-4)
    assert sol.count.tolist() == [3, 1]  # ordered by how many samples reached each
    assert sol.labels.tolist() == [0, 0, 1, 0, -1]
    np.testing.assert_array_equal(sol.positions[0], base)  # the best residual represents
    assert sol.residual.tolist() == [1e-12, 3e-12]
    tight = distinct_solutions(refined, residual, converged, merge_tol=2e-6)
    assert tight.count.tolist() == [2, 1, 1]
    none = distinct_solutions(refined, residual, np.zeros(5, dtype=bool))
    assert len(none) == 0 and none.positions.shape == (0, 9)


def test_refine_posterior_refines_the_mean_and_chosen_samples():

    truth = sample_ocs(8, _gen(6))
    momenta = asymptotic_momenta(truth)
    noise = 0.02 * torch.randn((5, 8, 9), generator=_gen(7), dtype=torch.float64)
    samples = remove_centre_of_mass(truth + noise)
    only_mean = refine_posterior(samples, momenta, refine_samples=0)
    assert only_mean.samples.shape == (0, 8, 9)
    assert (only_mean.n_solutions == 1).all()
    assert (_max_atom_error(torch.as_tensor(only_mean.best), truth) < 1e-5).all()
    two = refine_posterior(samples, momenta, refine_samples=2)
    assert two.samples.shape == (2, 8, 9) and two.converged.shape == (2, 8)
    assert two.converged.mean() >= 0.9  # 2 % noise: nearly every start reaches a solution
    np.testing.assert_array_equal(two.converged, two.residual < 1e-9)
    assert (only_mean.best_residual <= 1e-8).all()
    assert (only_mean.atom_error(truth.numpy()) < 1e-5).all()


def test_solution_log_mass_is_prior_over_the_momentum_volume():
    x = remove_centre_of_mass(torch.tensor([_GEOMETRY_A, _GEOMETRY_B], dtype=torch.float64))
    m = torch.tensor(MASSES, dtype=torch.float64)

    def momenta_of_relative(q: torch.Tensor, com: torch.Tensor) -> torch.Tensor:
        c = com - (m[1] * q[:3] + m[2] * q[3:]) / m.sum()
        pos = torch.cat([c, c + q[:3], c + q[3:]])[None]
        return asymptotic_momenta(pos, general=True, compile=False)[0]

    expected = []
    for row in x:
        a = row.reshape(3, 3)
        q = torch.cat([a[1] - a[0], a[2] - a[0]])
        com = (m[:, None] * a).sum(0) / m.sum()
        jac = torch.autograd.functional.jacobian(lambda qq, c=com: momenta_of_relative(qq, c), q)
        expected.append(2.0 - 0.5 * torch.logdet(jac.T @ jac).item())
    got = solution_log_mass(x, lambda pos: np.full(len(pos), 2.0))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("favoured", [0, 1])
def test_refine_posterior_picks_the_solution_of_largest_posterior_mass(favoured):
    # More samples near A than B, and the posterior mean nearer A.
    a, b, momenta, starts = _two_geometry_event(5, 3, seed=6)
    target = [a, b][favoured].numpy()[0]

    def log_prior(pos: np.ndarray) -> np.ndarray:  # sharply peaked at the favoured one
        return -50.0 * np.linalg.norm(pos - target, axis=-1) ** 2

    refined = refine_posterior(starts[:, None], momenta, log_prior=log_prior)
    assert refined.n_solutions[0] == 2
    assert np.abs(refined.best[0] - target).max() < 1e-5
    plain = refine_posterior(starts[:, None], momenta)  # without a prior: the refined mean
    assert np.abs(plain.best[0] - a.numpy()[0]).max() < 1e-5
    # B is not the chosen one, but it is among the solutions reported.
    assert plain.atom_error(b.numpy())[0] > 1.0
    assert plain.nearest_solution_error(b.numpy())[0] < 1e-5


def _molecule_events(name: str, n: int, seed: int):
    from flowrecon.systems.cei.geometry import simulate_molecule_events
    from flowrecon.systems.cei.molecule import load_molecule

    m = load_molecule(name)
    ev = simulate_molecule_events(m, n, seed=seed)
    x = torch.as_tensor(np.asarray(ev.positions), dtype=torch.float64)
    return m, x, torch.as_tensor(np.asarray(ev.momenta), dtype=torch.float64)


def _atom_error(a: torch.Tensor, b: torch.Tensor, masses) -> torch.Tensor:
    d = remove_centre_of_mass(a, masses) - remove_centre_of_mass(b, masses)
    return d.reshape(len(a), len(masses), 3).norm(dim=-1).amax(1)


@pytest.mark.parametrize("name", ["so2", "ch2i2", "chbrclf"])
def test_refine_recovers_any_molecule(name):
    """3N - 3 relative coordinates through the molecule's own simulator, 3 to 5 atoms."""
    m, truth, momenta = _molecule_events(name, 40, seed=3)
    start = truth + 0.02 * torch.randn(truth.shape, generator=_gen(2), dtype=torch.float64)
    result = refine(start, momenta, masses=m.masses, charges=m.charges)
    assert result.positions.shape == truth.shape
    assert result.converged.float().mean() >= 0.95
    err = _atom_error(result.positions, truth, m.masses)
    assert (err[result.converged] < 1e-5).float().mean() >= 0.95
    # The residual is that of the molecule's own simulator, not a three-atom one.
    from flowrecon.systems.cei.explosion import final_momenta

    resim = final_momenta(result.positions, m.masses, m.charges)
    rel = (resim - momenta).norm(dim=1) / momenta.norm(dim=1)
    torch.testing.assert_close(rel, result.residual, rtol=1e-3, atol=1e-12)


def test_refine_posterior_with_a_bank_finds_five_atom_solutions():
    from flowrecon.systems.cei.refine import StartBank

    m, x_bank, p_bank = _molecule_events("chbrclf", 1000, seed=4)
    _, truth, momenta = _molecule_events("chbrclf", 20, seed=5)
    bank = StartBank(x_bank, p_bank, m.masses, m.frame)
    # A bank finds its own events again, in their own orientation.
    again = torch.as_tensor(bank.starts(p_bank[:5], k=1)[0])
    assert _atom_error(again, x_bank[:5], m.masses).max() < 1e-9
    # Posterior samples 0.1 bohr off: too far for most to converge alone.
    g = _gen(6)
    samples = truth[None] + 0.1 * torch.randn((3, *truth.shape), generator=g, dtype=torch.float64)
    refined = refine_posterior(samples, momenta, charges=m.charges, masses=m.masses, bank=bank)
    assert refined.best.shape == (20, 15)
    assert (refined.nearest_solution_error(truth.numpy()) <= 1e-5).mean() >= 0.9
    assert refined.masses == m.masses


def test_solution_log_mass_of_a_five_atom_molecule():
    m, truth, _ = _molecule_events("chbrclf", 4, seed=7)
    flat = solution_log_mass(truth, lambda x: np.zeros(len(x)), charges=m.charges,
                             masses=m.masses)  # fmt: skip
    assert flat.shape == (4,) and np.isfinite(flat).all()
    # A prior that prefers one geometry moves its mass by exactly the prior's difference.
    prior = solution_log_mass(truth, lambda x: np.arange(len(x), dtype=float),
                              charges=m.charges, masses=m.masses)  # fmt: skip
    np.testing.assert_allclose(prior - flat, np.arange(4.0), atol=1e-9)


def test_refine_names_the_width_a_molecule_needs():
    m, truth, momenta = _molecule_events("chbrclf", 2, seed=8)
    with pytest.raises(ValueError, match=r"shape \(B, 15\) for 5 atoms; got \(2, 9\)"):
        refine(truth[:, :9], momenta[:, :9], masses=m.masses, charges=m.charges)
    with pytest.raises(ValueError, match="one charge per atom"):
        refine(truth, momenta, masses=m.masses, charges=m.charges[:3])
