"""The canonical order of identical atoms, which a detector cannot tell apart.

Two O+ ions from CO2 hit the detector as two momenta; nothing says which came from which
end of the molecule. Labels must therefore be a function of what is measured: within
every group of identical atoms (same element, mass and charge,
`flowrecon.systems.cei.molecule.Molecule.identical_groups`) the atom with the largest
momentum magnitude takes the group's first label (``o1``), the next the second, and so
on; exact ties are broken by the larger ``px``, then ``py``, then ``pz``. Positions are
permuted with their atoms. Simulation
(`flowrecon.systems.cei.geometry.simulate_molecule_events`), training and evaluation all
apply it, to simulated and measured data alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flowrecon.systems.cei.molecule import Molecule, load_molecule

__all__ = ["apply_permutation", "canonical_order", "canonical_order_table", "canonical_permutation"]


def _sort_keys(p_atoms: torch.Tensor, group: Sequence[int]) -> torch.Tensor:
    """Rank of each member of ``group``: by decreasing |p|, then decreasing px, py, pz."""
    sub = p_atoms[..., list(group), :]  # (..., g, 3)
    order = torch.arange(len(group), device=p_atoms.device).expand(sub.shape[:-1]).clone()
    keys = [sub[..., 2], sub[..., 1], sub[..., 0], torch.linalg.vector_norm(sub, dim=-1)]
    # Least significant key first; each stable sort keeps the order of equal keys.
    for key in keys:
        current = torch.gather(key, -1, order)
        idx = torch.sort(-current, dim=-1, stable=True).indices
        order = torch.gather(order, -1, idx)
    return order


def canonical_permutation(
    momenta: torch.Tensor, molecule: Molecule | str, charges: Sequence[float] | None = None
) -> torch.Tensor | None:
    """For each event, which atom goes to each slot in the canonical order: ``(..., N)``.

    None when the molecule has no identical atoms (the order is then the identity).
    See :func:`canonical_order` for the rule.
    """
    molecule = load_molecule(molecule)
    groups = molecule.identical_groups(charges)
    width = 3 * molecule.n_atoms
    if momenta.shape[-1] != width:
        raise ValueError(
            f"momenta must have {width} columns for {molecule.name} ({molecule.n_atoms} atoms); "
            f"got shape {tuple(momenta.shape)}"
        )
    if not groups:
        return None
    pa = momenta.reshape(*momenta.shape[:-1], molecule.n_atoms, 3)
    perm = torch.arange(molecule.n_atoms, device=momenta.device).expand(pa.shape[:-1]).clone()
    for group in groups:
        order = _sort_keys(pa, group)
        perm[..., list(group)] = torch.tensor(group, device=momenta.device)[order]
    return perm


def apply_permutation(values: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Reorders the atoms of flat ``(..., 3N)`` values: slot ``s`` gets atom ``perm[..., s]``."""
    va = values.reshape(*values.shape[:-1], values.shape[-1] // 3, 3)
    index = perm.to(values.device)[..., None].expand(va.shape)
    return torch.gather(va, -2, index).reshape(values.shape)


def canonical_order(
    positions: np.ndarray | torch.Tensor | None,
    momenta: np.ndarray | torch.Tensor,
    molecule: Molecule | str,
    charges: Sequence[float] | None = None,
) -> tuple[Any, Any]:
    """Relabels identical atoms so that within each group momenta decrease in magnitude.

    A detector measures a momentum for each ion but cannot say which of two O+ ions came
    from which end of CO2. The canonical order makes labels a function of what is
    measured: within every group of identical atoms (:meth:`Molecule.identical_groups`),
    the atom with the largest ``|p|`` takes the group's first label (``o1``), the next the
    second, and so on. Exact ties in ``|p|`` are broken by the larger ``px``, then ``py``,
    then ``pz``, so the result depends only on the set of measured momenta, never on the
    input labelling. Positions (when given) are permuted with their atoms. Apply it to
    simulated, training and measured data alike; it is idempotent.

    Args:
        positions: ``(..., 3N)`` positions or None (measured data).
        momenta: ``(..., 3N)`` momenta, numpy or torch.
        molecule: The molecule or its preset name (its atoms set N and the groups).
        charges: The explosion channel if not the molecule's own (changes the groups).

    Returns:
        ``(positions, momenta)`` reordered, of the input kind (None stays None).

    Example:
        >>> p = np.array([[0.0, 0, 0, 1, 0, 0, -3, 0, 0]])   # o2 is faster
        >>> canonical_order(None, p, "co2")[1]
        array([[ 0.,  0.,  0., -3.,  0.,  0.,  1.,  0.,  0.]])
    """
    is_numpy = not isinstance(momenta, torch.Tensor)
    p = torch.as_tensor(np.array(momenta, copy=True) if is_numpy else momenta)
    x = None
    if positions is not None:
        x = torch.as_tensor(np.array(positions, copy=True) if is_numpy else positions)
        if x.shape != p.shape:
            raise ValueError(
                f"positions {tuple(x.shape)} and momenta {tuple(p.shape)} must have one shape"
            )
    perm = canonical_permutation(p, molecule, charges)
    if perm is None:
        return positions, momenta
    p_out = apply_permutation(p, perm)
    x_out = None if x is None else apply_permutation(x, perm)
    if is_numpy:
        return (None if x_out is None else x_out.numpy()), p_out.numpy()
    return x_out, p_out


def canonical_order_table(
    table: Any, molecule: Molecule | str, charges: Sequence[float] | None = None
) -> Any:
    """:func:`canonical_order` on a DataFrame with the molecule's columns; returns a copy.

    Position columns are permuted with the momenta when all are present (momenta-only
    tables work too); other columns are left alone.

    Example:
        >>> import pandas as pd
        >>> from flowrecon.systems.cei.molecule import load_molecule
        >>> columns = load_molecule("co2").momentum_columns
        >>> t = pd.DataFrame([[0.0, 0, 0, 1, 0, 0, -3, 0, 0]], columns=columns)
        >>> canonical_order_table(t, "co2")[["po1x", "po2x"]].to_numpy()
        array([[-3.,  1.]])
    """
    molecule = load_molecule(molecule)
    pcols, xcols = list(molecule.momentum_columns), list(molecule.position_columns)
    missing = [c for c in pcols if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks the momentum column {missing[0]!r} of {molecule.name}")
    has_x = all(c in table.columns for c in xcols)
    x = table[xcols].to_numpy(np.float64) if has_x else None
    x, p = canonical_order(x, table[pcols].to_numpy(np.float64), molecule, charges)
    out = table.copy()
    out[pcols] = p
    if has_x:
        out[xcols] = x
    return out
