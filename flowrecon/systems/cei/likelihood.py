"""Likelihood of observed momenta (any molecule) and the prior of simulated OCS geometries.

Together with a model's ``log_prob`` they give importance weights for posterior samples
(`posterior_weights`): w ∝ L(p_obs | x) p(x) / q(x | p_obs), which keep the posterior
calibrated where the model is not.

Densities are over the 3N - 3 relative coordinates x_i - x_0 (for OCS the six
r_CO = x_O - x_C and r_CS = x_S - x_C; the centre of mass is not observable); the
model's density differs from that by a constant Jacobian, which cancels when the
weights are normalised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from flowrecon.evaluation.weights import ImportanceWeights, importance_weights
from flowrecon.systems.cei.constants import DEFAULT_CHARGES, MASSES, R_CO_EQ, R_CS_EQ
from flowrecon.systems.cei.explosion import final_momenta

__all__ = ["momentum_log_likelihood", "ocs_log_prior", "posterior_weights"]


def momentum_log_likelihood(
    positions: np.ndarray | torch.Tensor,
    momenta: np.ndarray | torch.Tensor,
    noise: float,
    *,
    charges: Sequence[float] = DEFAULT_CHARGES,
    masses: Sequence[float] = MASSES,
    compile: bool | None = None,
) -> np.ndarray:
    """log L(p_obs | x) under the detector model of `simulate_events`.

    Each ion's observed momentum is its simulated momentum plus isotropic Gaussian noise
    of standard deviation ``noise * |p_i|``.

    Args:
        positions: geometries (..., B, 3N), bohr (e.g. K posterior samples (K, B, 3N)).
        momenta: observed momenta (B, 3N), a.u.
        noise: relative momentum resolution sigma (0.01 = 1 %), > 0.
        charges: ion charges, one per atom (default OCS: C, O, S).
        masses: ion masses, one per atom.
        compile: see `flowrecon.systems.cei.explosion.final_momenta`.

    Returns:
        Log-likelihoods of shape ``positions.shape[:-1]``.
    """
    if not noise > 0:
        raise ValueError(f"the likelihood needs a momentum noise > 0, got {noise}")
    x = torch.as_tensor(np.asarray(positions, dtype=float))
    p_obs = torch.as_tensor(np.asarray(momenta, dtype=float))
    n_atoms = len(masses)
    if x.shape[-1] != 3 * n_atoms or p_obs.shape[-1] != 3 * n_atoms:
        raise ValueError(
            f"positions and momenta need {3 * n_atoms} columns for {n_atoms} atoms; got "
            f"{x.shape[-1]} and {p_obs.shape[-1]}"
        )
    p_sim = final_momenta(x.reshape(-1, 3 * n_atoms), masses, charges, compile=compile).reshape(
        x.shape
    )
    sim = p_sim.reshape(*x.shape[:-1], n_atoms, 3)
    obs = p_obs.reshape(*p_obs.shape[:-1], n_atoms, 3)
    var = (noise * sim.norm(dim=-1)) ** 2  # (..., B, 3)
    sq = (obs - sim).pow(2).sum(-1)
    log_l = -0.5 * (3 * torch.log(2 * math.pi * var) + sq / var)
    return log_l.sum(-1).numpy()


def ocs_log_prior(
    positions: np.ndarray | torch.Tensor,
    *,
    bond_sigma: float = 0.1,
    bend_sigma_deg: float = 10.0,
    r_co: float = R_CO_EQ,
    r_cs: float = R_CS_EQ,
) -> np.ndarray:
    """Log density of the ``ocs`` geometry sampler over the relative coordinates.

    Bonds Gaussian, the bend Rayleigh-distributed (a 2-D Gaussian bending mode),
    orientation uniform: p(r1, r2) = N(|r1|) N(|r2|) Rayleigh(b) / (8 pi^2 |r1|^2 |r2|^2
    sin b), with b = pi - angle(O-C-S). The sampler's clamps (bonds >= 0.5 bohr, b <= pi)
    are ignored: they cut far tails only.

    Args:
        positions: geometries (..., 9), bohr.
        bond_sigma, bend_sigma_deg, r_co, r_cs: the sampler's settings.
    """
    x = torch.as_tensor(np.asarray(positions, dtype=float)).reshape(-1, 3, 3)
    r1, r2 = x[:, 1] - x[:, 0], x[:, 2] - x[:, 0]
    d1, d2 = r1.norm(dim=-1), r2.norm(dim=-1)
    angle = torch.atan2(torch.linalg.cross(r1, r2).norm(dim=-1), (r1 * r2).sum(-1))
    bend = math.pi - angle
    sb = math.radians(bend_sigma_deg)

    def log_normal(v: torch.Tensor, mean: float) -> torch.Tensor:
        return -0.5 * ((v - mean) / bond_sigma) ** 2 - math.log(bond_sigma * math.sqrt(2 * math.pi))

    # log(b / sin b) via sinc keeps the nearly linear molecules exact.
    log_bend = -torch.log(torch.sinc(bend / math.pi)) - 2 * math.log(sb) - bend**2 / (2 * sb * sb)
    log_p = (
        log_normal(d1, r_co)
        + log_normal(d2, r_cs)
        + log_bend
        - math.log(8 * math.pi**2)
        - 2 * torch.log(d1)
        - 2 * torch.log(d2)
    )
    return log_p.reshape(np.shape(positions)[:-1]).numpy()


def posterior_weights(
    samples: np.ndarray,
    momenta: np.ndarray,
    log_q: np.ndarray,
    noise: float,
    *,
    prior: str | Callable[[np.ndarray], np.ndarray] = "ocs",
    charges: Sequence[float] = DEFAULT_CHARGES,
    masses: Sequence[float] = MASSES,
    compile: bool | None = None,
) -> ImportanceWeights:
    """Importance weights of posterior samples under the noise model and a prior.

    Args:
        samples: (K, B, 3N) posterior samples, bohr.
        momenta: (B, 3N) observed momenta.
        log_q: (K, B) the model's log density of each sample given its event's momenta.
        noise: relative momentum resolution of the detector.
        prior: ``"ocs"`` (the simulated OCS geometry distribution, `ocs_log_prior`),
            ``"flat"`` (constant in the relative coordinates), or a callable taking
            positions ``(..., 3N)`` to log-densities over the relative coordinates (e.g.
            `flowrecon.systems.cei.prior.learned_log_prior`).
        charges, masses: the explosion channel.
        compile: see `flowrecon.systems.cei.explosion.final_momenta`.
    """
    if not callable(prior) and prior not in ("ocs", "flat"):
        raise ValueError(f"unknown prior {prior!r}; choose 'ocs', 'flat' or a callable")
    log_w = momentum_log_likelihood(
        samples, momenta, noise, charges=charges, masses=masses, compile=compile
    )
    if callable(prior):
        log_w = log_w + np.asarray(prior(samples), dtype=float)
    elif prior == "ocs":
        log_w = log_w + ocs_log_prior(samples)
    return importance_weights(log_w - np.asarray(log_q, dtype=float))
