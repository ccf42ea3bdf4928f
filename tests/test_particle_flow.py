"""The exchangeable-particle flow: symmetry, the ordered density, the box, the neighbour map."""

from __future__ import annotations

import math

import pytest
import torch

import flowrecon as fr
from flowrecon.models.particles import _Carving, build_particle_flow


def perturbed(flow: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """The flow with every parameter moved off its identity initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return flow.eval()


def logit_box(c: torch.Tensor, box: float) -> torch.Tensor:
    """Model space of the particle flow: logit(c / L) per coordinate, flattened."""
    return torch.logit(c / box).flatten(1)


@pytest.mark.parametrize("dim", [2, 3])
def test_density_is_symmetric_under_relabelling_the_particles(dim: int) -> None:
    torch.manual_seed(0)
    n = 7
    flow = perturbed(build_particle_flow(n * dim, 2, particle_dim=dim, rounds=2, hidden=16))
    c = 0.05 + 4.9 * torch.rand(32, n, dim, dtype=torch.float64)
    y = torch.randn(32, 2, dtype=torch.float64)
    flow = flow.double()
    lp = flow.log_prob(logit_box(c, 5.0), y)
    shuffled = c[:, torch.randperm(n)]
    torch.testing.assert_close(flow.log_prob(logit_box(shuffled, 5.0), y), lp)
    assert lp.isfinite().all()


def test_ordered_density_integrates_to_one_over_ordered_configurations() -> None:
    # Two particles in a square: importance sampling with uniform positions. Only
    # configurations in canonical order (ascending height) count, so the integral is
    # one only if log N! is added and the density is symmetric.
    torch.manual_seed(1)
    flow = perturbed(build_particle_flow(4, 1, particle_dim=2, rounds=2, hidden=8))
    t = 2.0 * torch.rand(100_000, 2, 2, dtype=torch.float64) - 1.0
    ordered = t[:, 0, 1] <= t[:, 1, 1]
    u = 2.0 * torch.atanh(t).flatten(1)
    with torch.no_grad():
        lp = flow.double().log_prob(u, torch.zeros(len(u), 1, dtype=torch.float64))
    # Density in t: divide by |dt/du| = prod 2 s (1 - s), s = sigmoid(u).
    log_dt = math.log(2.0) + torch.nn.functional.logsigmoid(u) + torch.nn.functional.logsigmoid(-u)
    density = (lp - log_dt.sum(1)).exp() * ordered
    # Standard error about 0.009 here; without log N! the integral would be 0.5.
    assert (density.mean() * 2.0**4).item() == pytest.approx(1.0, abs=0.04)


def test_draws_stay_in_the_box_in_canonical_order_and_map_back() -> None:
    torch.manual_seed(2)
    n, dim = 6, 3
    flow = perturbed(build_particle_flow(n * dim, 2, particle_dim=dim, rounds=1, hidden=16))
    y = torch.randn(50, 2)
    with torch.no_grad():
        u = flow.sample(4, y, temperature=1.5)  # wide draws reach the walls
    c = 5.0 * torch.sigmoid(u).reshape(4, 50, n, dim)
    assert ((c > 0) & (c < 5.0)).all()
    assert (c.amin() < 0.05) and (c.amax() > 4.95)
    heights = c[..., -1]
    assert (heights.diff(dim=-1) >= 0).all()
    with torch.no_grad():  # a draw maps to a latent point and back onto itself
        z, _ = flow.to_latent(u[0], y)
        back = flow.from_latent(z, y)
    torch.testing.assert_close(5.0 * torch.sigmoid(back), c[0].flatten(1), atol=1e-4, rtol=0)


def test_a_moving_particle_hears_only_neighbours_within_the_cutoff() -> None:
    torch.manual_seed(3)
    flow = perturbed(build_particle_flow(9, 1, particle_dim=3, rounds=1, hidden=16, cutoff=1.0))
    layer = flow.layers[4]  # moves z; the split is along x
    t = torch.tensor([[[-0.8, 0.0, 0.0], [-0.7, 0.05, 0.3], [0.7, 0.0, 0.3]]])
    y = torch.zeros(1, 1)
    moving = layer._moving(t)
    assert moving.tolist() == [[0, 2]]  # ranks 0 and 2 along x: particle 1 is fixed

    def spline_of_first(t: torch.Tensor) -> torch.Tensor:
        spline = layer._spline(t, y, moving)[0]
        return spline.horizontal[0, 0], spline.vertical[0, 0]

    base = spline_of_first(t)
    near = t.clone()
    near[0, 1, 2] = -0.5  # the fixed neighbour of particle 0 moves along z
    assert not torch.allclose(spline_of_first(near)[1], base[1])
    far = t.clone()
    far[0, 2, 2] = -0.5  # a moving particle far across: its z is not heard anyway
    torch.testing.assert_close(spline_of_first(far)[1], base[1])


def test_builder_and_make_messages() -> None:
    with pytest.raises(ValueError, match="x_dim=10 is not a multiple of particle_dim=3"):
        build_particle_flow(10, 1)
    with pytest.raises(ValueError, match="need box > 0, cutoff > 0 and core >= 0"):
        build_particle_flow(9, 1, cutoff=0.0)
    made = fr.make("particle-flow")
    assert (made.whitening, made.x_scaler) == (False, "none")
    assert fr.make("particle-flow", x_scaler="standard").x_scaler == "standard"
    assert fr.make("zuko-nsf").whitening is True


def test_carving_squeezes_the_excluded_intervals_and_is_exact() -> None:
    # Particle 0 moves along the last axis; particle 1 sits 0.1 across from it at 0.5,
    # particle 2 is too far across to exclude anything.
    column = torch.tensor([[0.0, 0.5, -0.5]], dtype=torch.float64)
    dist = torch.tensor([[[0.0, 0.1, 0.9]]], dtype=torch.float64).expand(1, 401, 3)
    fixed = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
    carving = _Carving(column, dist, fixed, 0.3)
    x = torch.linspace(-1, 1, 401, dtype=torch.float64)[None]
    value, log_slope = carving.forward(x)
    half = math.sqrt(0.3**2 - 0.1**2)
    inside = (x - 0.5).abs() < half
    assert (value.diff() >= 0).all() and value[0, 0] == -1 and value[0, -1] == pytest.approx(1)
    assert value[inside].max() - value[inside].min() < 1e-5  # the hole is squeezed flat
    torch.testing.assert_close(carving.inverse(value)[~inside], x[~inside])
    free = log_slope[~inside].exp()  # 2 / (free length), the hole weighing ~nothing
    torch.testing.assert_close(free, torch.full_like(free, 2 / (2 - 2 * half)), rtol=1e-5, atol=0)


def test_a_hard_core_keeps_drawn_particles_apart() -> None:
    torch.manual_seed(4)
    n, box = 8, 5.0
    flow = perturbed(build_particle_flow(n * 3, 2, core=0.8, rounds=1, hidden=16), 0.1)
    plain = perturbed(build_particle_flow(n * 3, 2, rounds=1, hidden=16), 0.1)
    y = torch.randn(100, 2)
    with torch.no_grad():
        for model, closest in ((flow, lambda d: d >= 0.8 - 1e-3), (plain, lambda d: d < 0.8)):
            c = box * torch.sigmoid(model.sample(4, y)).reshape(-1, n, 3)
            d = torch.cdist(c, c) + 10 * torch.eye(n)
            share = closest(d.amin((1, 2))).float().mean().item()
            # With the core every draw is apart; without it a good share overlaps.
            assert share > (0.99 if model is flow else 0.2)
        # A configuration with a pair closer than the core still has a finite density.
        c = torch.tensor([[[1.0, 1.0, 1.0], [1.0, 1.2, 1.3]] + [[4.0, 4.0, 4.0]] * (n - 2)])
        c[0, 2:, 0] = torch.linspace(0.5, 4.5, n - 2)
        assert flow.log_prob(torch.logit(c / box).flatten(1), y[:1]).isfinite().all()
