"""An independent reference integrator, to check the fast simulator against.

scipy's DOP853 in plain Cartesian coordinates and plain time, run to t = 1e10 a.u.,
where about 3e-8 of the energy is still potential: the reference momenta are therefore
converged to ~1e-8 relative, independently of the simulator's own tricks.
"""

from __future__ import annotations

import numpy as np

from flowrecon.systems.cei.constants import DEFAULT_CHARGES, MASSES

_PAIRS = ((0, 1), (0, 2), (1, 2))


def reference_momenta(
    positions: np.ndarray,
    initial_momenta: np.ndarray | None = None,
    charges=DEFAULT_CHARGES,
    masses=MASSES,
    t_end: float = 1e10,
    rtol: float = 1e-12,
) -> np.ndarray:
    """Momenta at ``t_end`` for each event of positions (N, 9); returns (N, 9).

    Slow (a Python loop over events, ~5 ms each): meant for a few hundred events.
    Needs scipy (``pip install flowrecon[bench]``).
    """
    try:
        from scipy.integrate import solve_ivp
    except ImportError as err:  # scipy is a test/benchmark extra, not a runtime need
        raise ImportError("the reference integrator needs scipy: pip install scipy") from err
    m = np.asarray(masses, dtype=float)
    q = np.asarray(charges, dtype=float)

    def rhs(_t, s):
        x = s[:9].reshape(3, 3)
        a = np.zeros((3, 3))
        for i, j in _PAIRS:
            d = x[j] - x[i]
            f = q[i] * q[j] * d / np.dot(d, d) ** 1.5
            a[j] += f / m[j]
            a[i] -= f / m[i]
        return np.concatenate([s[9:], a.ravel()])

    out = []
    for n, x0 in enumerate(np.asarray(positions, dtype=float).reshape(-1, 9)):
        v0 = np.zeros(9)
        if initial_momenta is not None:
            v0 = (np.asarray(initial_momenta).reshape(-1, 3, 3)[n] / m[:, None]).ravel()
        sol = solve_ivp(
            rhs, (0.0, t_end), np.concatenate([x0, v0]), method="DOP853", rtol=rtol, atol=1e-30
        )
        out.append((sol.y[9:, -1].reshape(3, 3) * m[:, None]).ravel())
    return np.array(out)
