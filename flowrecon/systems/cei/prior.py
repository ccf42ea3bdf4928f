"""A learned prior over molecular geometries, comparable with `ocs_log_prior`.

The prior of a CEI data set is what its training geometries say: `fit_learned_prior`
fits a `flowrecon.density.Density` to rotation-invariant internal coordinates of the
training positions, and `learned_log_prior` turns it into a log-density over positions
with the same measure as the analytic `flowrecon.systems.cei.likelihood.ocs_log_prior`
(the six relative coordinates r_CO = x_O - x_C and r_CS = x_S - x_C), so either can
choose among exact solutions and weight posterior samples.

Internal coordinates: r1 = |r_CO|, r2 = |r_CS| and l = log(b), where b = pi - angle(O-C-S)
is the bend (log b maps the bend's half-line onto the reals, where a spline flow works
best, and spreads the nearly linear molecules that a Rayleigh-like bend law crowds near
0). Orientation is uniform, so with d^3r1 d^3r2 = r1^2 r2^2 sin(b) dr1 dr2 db dOmega dphi
and db = b dl:

    log p(r_CO, r_CS) = log p_features(r1, r2, l) - log b - log(8 pi^2 r1^2 r2^2 sin b)

Any molecule (`molecule_features`): the internal coordinates of its Z-matrix, row by row,
which place each atom by spherical coordinates about atoms placed before it: a bond r, an
angle theta (for a linear row the log of its bend, as for OCS) and, from the fourth row
on, the dihedral (as its offset from the reference dihedral, wrapped to (-pi, pi], so that
the vibration does not straddle the cut). The same argument gives the measure

    log p(relative coordinates) = log p_features - sum log(r^2) - sum log(sin theta)
                                  - sum over linear rows of log b - log(8 pi^2)

(the first two rows' directions and the third row's azimuth are the orientation, uniform
over a volume 8 pi^2). For OCS these are exactly the features above.

Example:
    >>> import torch
    >>> from flowrecon.systems.cei.geometry import sample_ocs
    >>> x = sample_ocs(3000, torch.Generator().manual_seed(0)).numpy()
    >>> prior = learned_log_prior(fit_learned_prior(x, epochs=2, device="cpu"))
    >>> prior(x[:4]).shape
    (4,)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flowrecon.density import Density
from flowrecon.systems.cei.physics import dihedral_torch

if TYPE_CHECKING:
    from flowrecon.systems.cei.molecule import Molecule, ZMatrixRow

#: Geometries ``(..., 3N)`` -> internal coordinates and the log-Jacobian to positions.
FeatureMap = Callable[[Any], tuple[np.ndarray, np.ndarray]]

__all__ = ["fit_learned_prior", "internal_coordinates", "learned_log_prior", "molecule_features"]

#: Smallest bend used (radians): an exactly linear geometry has b = 0 and log b = -inf.
MIN_BEND = 1e-9

_LOG_8PI2 = math.log(8 * math.pi**2)


def internal_coordinates(positions: Any) -> tuple[np.ndarray, np.ndarray]:
    """Internal coordinates (r1, r2, log b) of geometries, and the log-Jacobian to positions.

    Args:
        positions: Geometries ``(..., 9)`` in bohr, atoms in the order C, O, S.

    Returns:
        ``features`` ``(..., 3)`` and ``log_jacobian`` ``(...,)`` such that the log-density
        over the relative coordinates is ``log p_features(features) + log_jacobian``.

    Example:
        >>> x = np.array([0.0, 0, 0, -2.0, 0, 0, 3.0, 0.1, 0])
        >>> f, lj = internal_coordinates(x)
        >>> np.round(f, 4).tolist()
        [2.0, 3.0017, -3.4016]
    """
    x = torch.as_tensor(np.array(positions, dtype=np.float64))  # a copy: inputs may be read-only
    if x.shape[-1] != 9:
        raise ValueError(f"positions must have 9 columns (C, O, S), got {x.shape[-1]}")
    atoms = x.reshape(*x.shape[:-1], 3, 3)
    r1, r2 = atoms[..., 1, :] - atoms[..., 0, :], atoms[..., 2, :] - atoms[..., 0, :]
    d1, d2 = r1.norm(dim=-1), r2.norm(dim=-1)
    bend = _bend(r1, r2)
    features = torch.stack([d1, d2, bend.log()], -1)
    log_jacobian = _log_bend_jacobian(bend) - _LOG_8PI2 - 2 * d1.log() - 2 * d2.log()
    return features.numpy(), log_jacobian.numpy()


def molecule_features(molecule: Molecule) -> FeatureMap | None:
    """The learned prior's features of any molecule, from its Z-matrix (see the module).

    Returns ``features(positions) -> (features, log_jacobian)`` for geometries
    ``(..., 3N)`` (3N - 6 features: a linear triatomic's bend azimuth is its orientation,
    as for OCS), or None when the molecule has no Z-matrix or a linear row after the
    third, whose bend azimuth is not an orientation (its prior then stays flat).

    Example:
        >>> from flowrecon.systems.cei.molecule import load_molecule
        >>> m = load_molecule("so2")
        >>> f, log_j = molecule_features(m)(np.array(m.geometry).reshape(1, 9))
        >>> f.shape, log_j.shape
        ((1, 3), (1,))
    """
    from flowrecon.systems.cei.zmatrix import reference_values

    rows = molecule.zmatrix
    if len(rows) != molecule.n_atoms or any(r.linear for r in rows[3:]):
        return None
    references = [ref[2] for ref in reference_values(molecule)]
    n_atoms = molecule.n_atoms

    def features(positions: Any) -> tuple[np.ndarray, np.ndarray]:
        x = torch.as_tensor(np.array(positions, dtype=np.float64))
        if x.shape[-1] != 3 * n_atoms:
            raise ValueError(
                f"positions must have {3 * n_atoms} columns for {molecule.name!r}, "
                f"got {x.shape[-1]}"
            )
        atoms = x.reshape(*x.shape[:-1], n_atoms, 3)
        columns: list[torch.Tensor] = []
        log_jacobian = torch.full(x.shape[:-1], -_LOG_8PI2, dtype=x.dtype)
        for number, row in enumerate(rows[1:], start=1):
            bond = atoms[..., row.atom, :] - atoms[..., row.bond_to, :]
            r = bond.norm(dim=-1)
            columns.append(r)
            log_jacobian = log_jacobian - 2 * r.log()
            if number < 2:
                continue
            axis = atoms[..., row.angle_to, :] - atoms[..., row.bond_to, :]
            if row.linear:  # the bend pi - theta, on a log scale, as for OCS
                bend = _bend(bond, axis)
                columns.append(bend.log())
                log_jacobian = log_jacobian + _log_bend_jacobian(bend)
                continue
            theta = torch.atan2(torch.linalg.cross(bond, axis).norm(dim=-1), (bond * axis).sum(-1))
            columns.append(theta)
            log_jacobian = log_jacobian - torch.sin(theta).clamp(min=MIN_BEND).log()
            if number >= 3:
                phi = dihedral_torch(*(atoms[..., i, :] for i in _dihedral_atoms(row)))
                columns.append(torch.remainder(phi - references[number] + math.pi, 2 * math.pi)
                               - math.pi)  # fmt: skip
        return torch.stack(columns, -1).numpy(), log_jacobian.numpy()

    return features


def _bend(bond: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """pi - angle(bond, axis), from atan2 so that nearly linear bends keep their digits."""
    bend = torch.atan2(torch.linalg.cross(bond, axis).norm(dim=-1), -(bond * axis).sum(-1))
    return bend.clamp(min=MIN_BEND)


def _log_bend_jacobian(bend: torch.Tensor) -> torch.Tensor:
    """-log b - log(sin b) of a log-bend feature: -2 log b - log(sinc), exact near linear."""
    return -2 * bend.log() - torch.log(torch.sinc(bend / math.pi))


def _dihedral_atoms(row: ZMatrixRow) -> tuple[int, int, int, int]:
    assert row.bond_to is not None and row.angle_to is not None and row.dihedral_to is not None
    return row.atom, row.bond_to, row.angle_to, row.dihedral_to


def fit_learned_prior(
    positions: Any,
    positions_val: Any = None,
    *,
    device: str = "auto",
    seed: int = 0,
    **options: Any,
) -> Density:
    """Fits the density of the internal coordinates of training geometries.

    Args:
        positions: Training geometries ``(N, 9)``, bohr (e.g. a run's training split).
        positions_val: Validation geometries for early stopping; when absent 15 % of
            ``positions`` are held out.
        device: Where to fit.
        seed: Seed of the split, initialisation and batches.
        **options: Options of `flowrecon.density.Density` (transforms, hidden, ...) and
            of its ``fit`` (epochs, max_minutes, max_rows, ...).

    Returns:
        The fitted density; save it with ``density.save("prior.pt")`` and read it back
        with ``Density.load``.
    """
    made = {"transforms", "hidden", "hidden_layers", "bins", "quantile", "whitening_tol"}
    density = Density(**{k: v for k, v in options.items() if k in made}, seed=seed, device=device)
    features, _ = internal_coordinates(positions)
    features_val = None if positions_val is None else internal_coordinates(positions_val)[0]
    return density.fit(
        features, features_val, **{k: v for k, v in options.items() if k not in made}
    )


def learned_log_prior(density: Density) -> Callable[[Any], np.ndarray]:
    """A log-prior over positions from a density fitted by `fit_learned_prior`.

    The returned ``log_prior(positions)`` takes geometries ``(..., 9)`` and returns
    log-densities ``(...)`` over the relative coordinates, the measure of
    `flowrecon.systems.cei.likelihood.ocs_log_prior`, so it can stand wherever that is
    called with positions only.
    """
    if density.dim != 3:
        raise ValueError(
            f"the density has {density.dim} features; a learned prior needs the 3 internal "
            "coordinates of fit_learned_prior"
        )

    def log_prior(positions: Any) -> np.ndarray:
        features, log_jacobian = internal_coordinates(positions)
        flat = density.log_prob(features.reshape(-1, 3)).reshape(features.shape[:-1])
        return flat + log_jacobian

    return log_prior
