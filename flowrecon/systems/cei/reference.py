"""An independent reference integrator, to check the fast simulators against.

scipy's DOP853 in plain Cartesian coordinates and plain time, for any number of atoms
(the number of masses), run to t = 1e10 a.u. by default, where about 3e-8 of an OCS
explosion's energy is still potential: the reference momenta are converged to ~1e-8
relative, independently of the simulators' own tricks (log time, drift-free variables,
the analytic tail). Molecules with heavy, slow fragments (I, Br) need a later ``t_end``;
:func:`residual_potential_fraction` says how converged a reference run is.
"""

from __future__ import annotations

import numpy as np

from flowrecon.systems.cei.constants import DEFAULT_CHARGES, MASSES
from flowrecon.systems.cei.physics import atom_pairs


def reference_momenta(
    positions: np.ndarray,
    initial_momenta: np.ndarray | None = None,
    charges=DEFAULT_CHARGES,
    masses=MASSES,
    t_end: float = 1e10,
    rtol: float = 1e-12,
) -> np.ndarray:
    """Momenta at ``t_end`` for each event of positions (B, 3N); returns (B, 3N).

    The number of atoms N is the number of ``masses`` (and ``charges``). Slow (a Python
    loop over events, ~5 ms each for three atoms): meant for a few hundred events.
    Needs scipy (``pip install flowrecon[bench]``).
    """
    return reference_state(positions, initial_momenta, charges, masses, t_end, rtol)[1]


def reference_state(
    positions: np.ndarray,
    initial_momenta: np.ndarray | None = None,
    charges=DEFAULT_CHARGES,
    masses=MASSES,
    t_end: float = 1e10,
    rtol: float = 1e-12,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions and momenta at ``t_end``, each (B, 3N): see :func:`reference_momenta`."""
    try:
        from scipy.integrate import solve_ivp
    except ImportError as err:  # scipy is a test/benchmark extra, not a runtime need
        raise ImportError("the reference integrator needs scipy: pip install scipy") from err
    m = np.asarray(masses, dtype=float)
    q = np.asarray(charges, dtype=float)
    n_atoms, width = len(m), 3 * len(m)
    if len(q) != n_atoms:
        raise ValueError(f"need one charge per mass, got {len(q)} charges and {n_atoms} masses")
    i_idx, j_idx = (np.array(v) for v in zip(*atom_pairs(n_atoms)))
    k = q[i_idx] * q[j_idx]

    def rhs(_t, s):
        x = s[:width].reshape(n_atoms, 3)
        d = x[j_idx] - x[i_idx]
        f = (k / np.einsum("pc,pc->p", d, d) ** 1.5)[:, None] * d
        force = np.zeros((n_atoms, 3))
        np.add.at(force, j_idx, f)
        np.add.at(force, i_idx, -f)
        return np.concatenate([s[width:], (force / m[:, None]).ravel()])

    xs, ps = [], []
    positions = np.asarray(positions, dtype=float).reshape(-1, width)
    for n, x0 in enumerate(positions):
        v0 = np.zeros(width)
        if initial_momenta is not None:
            p0 = np.asarray(initial_momenta, dtype=float).reshape(-1, n_atoms, 3)[n]
            v0 = (p0 / m[:, None]).ravel()
        sol = solve_ivp(
            rhs, (0.0, t_end), np.concatenate([x0, v0]), method="DOP853", rtol=rtol, atol=1e-30
        )
        xs.append(sol.y[:width, -1])
        ps.append((sol.y[width:, -1].reshape(n_atoms, 3) * m[:, None]).ravel())
    return np.array(xs), np.array(ps)


def residual_potential_fraction(
    positions_end: np.ndarray, positions_start: np.ndarray, charges=DEFAULT_CHARGES
) -> np.ndarray:
    """Coulomb energy left at the end over the initial one, per event: how converged it is.

    The momenta still miss roughly half this fraction of their final size.
    """
    from flowrecon.systems.cei.physics import coulomb_potential

    return coulomb_potential(positions_end, charges) / coulomb_potential(positions_start, charges)
