"""Final momenta of any molecule's explosion from its masses and charges alone.

The inverse problems (refinement, the detector likelihood) know a molecule by its masses
and charges, not by a `Molecule`: this is their one entry to the simulator. Three atoms
go through the planar three-atom integrator (`asymptotic_momenta`, which reproduces OCS
bit for bit), more atoms through the N-body integrator (`flowrecon.systems.cei.nbody`),
both on the molecule's own grid (`default_settings`: longer in log time when heavy and
light fragments separate on different time scales).

Example:
    >>> import torch
    >>> from flowrecon.systems.cei.molecule import load_molecule
    >>> m = load_molecule("d2o")
    >>> x = torch.tensor(m.geometry, dtype=torch.float64).reshape(1, 9)
    >>> final_momenta(x, m.masses, m.charges).shape
    torch.Size([1, 9])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowrecon.systems.cei.simulator import IntegratorSettings, asymptotic_momenta

__all__ = ["coarse_settings", "final_momenta", "full_settings"]

#: Steps, log-time end (for OCS-like molecules) and grid power of the coarse grid used for
#: Jacobians: about 1e-4 relative accuracy, a fifth of the full grid's cost.
_COARSE = IntegratorSettings(steps=12, sigma_end=7.0, grid_power=1.5)


def full_settings(masses: Sequence[float], charges: Sequence[float]) -> IntegratorSettings:
    """The molecule's full-accuracy grid (~1e-8 relative momentum error)."""
    from flowrecon.systems.cei.nbody import default_settings

    return default_settings(masses, charges, "high")


def coarse_settings(masses: Sequence[float], charges: Sequence[float]) -> IntegratorSettings:
    """The coarse grid for Jacobians: 12 steps, reaching as much further as the full grid.

    For OCS-like molecules this is 12 steps to sigma = 7; molecules with slow heavy
    fragments (CH2I2) get the extra log time their full grid gets.
    """
    longer = full_settings(masses, charges).sigma_end - IntegratorSettings().sigma_end
    return IntegratorSettings(_COARSE.steps, _COARSE.sigma_end + longer, _COARSE.grid_power)


def final_momenta(
    positions: torch.Tensor,
    masses: Sequence[float],
    charges: Sequence[float],
    *,
    coarse: bool = False,
    compile: bool | None = None,
) -> torch.Tensor:
    """Asymptotic momenta ``(B, 3N)`` of geometries ``(B, 3N)`` exploding from rest.

    Args:
        positions: Geometries, bohr, atoms in the order of ``masses``.
        masses: One mass per atom, electron masses.
        charges: One charge per atom.
        coarse: Use the coarse Jacobian grid (`coarse_settings`) instead of the full one.
        compile: Fuse the integrator step (``None``: the integrator's own default; the
            N-body path compiles only when asked, as its first compilation takes minutes).
    """
    settings = (coarse_settings if coarse else full_settings)(masses, charges)
    if len(masses) == 3:
        return asymptotic_momenta(
            positions, charges=charges, masses=masses, settings=settings, compile=compile
        )
    from flowrecon.systems.cei.nbody import explode

    return explode(
        positions, masses=masses, charges=charges, settings=settings, compile=bool(compile)
    )
