"""Physics loss terms of the Lennard-Jones system."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowrecon.systems.lj import make_system
from flowrecon.systems.lj.losses import TERMS, physics_loss
from flowrecon.systems.lj.physics import potential_energy


def test_terms_vanish_on_valid_configurations_and_match_the_energy():
    rng = np.random.default_rng(0)
    # A 3 x 3 x 3 lattice of spacing 1.2 inside the box: no overlap, nothing outside.
    grid = np.stack(np.meshgrid(*[np.arange(3) * 1.2 + 0.5] * 3, indexing="ij"), -1)
    conf = grid.reshape(27, 3)[None] + rng.uniform(-0.05, 0.05, (4, 27, 3))
    x = torch.tensor(conf.reshape(1, 4, -1))
    y = torch.tensor([[0.25, 1.5]] * 4, dtype=torch.float64)
    terms = physics_loss(27, 3, 5.0)(x, None, y)
    assert set(terms) == set(TERMS)
    assert float(terms["overlap"]) == 0 and float(terms["wall"]) == 0
    expected = potential_energy(conf, 0.25).mean() / (27 * 1.5)
    assert float(terms["energy"]) == pytest.approx(expected, rel=1e-9)


def test_overlap_and_wall_terms_push_the_right_way():
    x = torch.tensor([[[0.5, 0.5, 0.5, 0.9, 0.5, 0.5]]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    terms = physics_loss(2, 3, 5.0)(x, None, y)  # r = 0.4
    assert terms["overlap"].item() == pytest.approx(0.45**2)
    terms["overlap"].backward()
    assert x.grad[0, 0, 0] > 0 and x.grad[0, 0, 3] < 0  # gradient descent separates them
    outside = torch.tensor([[[-0.1, 1.0, 1.0, 3.0, 3.0, 5.3]]], dtype=torch.float64)
    assert float(physics_loss(2, 3, 5.0)(outside, None, y)["wall"]) == pytest.approx(0.1)


def test_energy_is_soft_clipped_for_overlaps():
    x = torch.tensor([[[1.0, 1.0, 1.0, 1.0, 1.0, 1.2]]])  # r = 0.2: U ~ 4e8
    terms = physics_loss(2, 3, 5.0, clip=100.0)(x, None, torch.tensor([[0.0, 1.0]]))
    assert 50 < float(terms["energy"]) < 100  # (100 + log(4e8)) / 2


def test_the_system_offers_the_terms():
    system = make_system(n_particles=4, box=3.0, gamma=(0.5,))
    assert system.physics_terms == TERMS
    terms = system.physics_loss()(torch.rand(2, 3, 12) * 3, None, torch.rand(3, 2) + 0.5)
    assert all(torch.isfinite(v) for v in terms.values())
