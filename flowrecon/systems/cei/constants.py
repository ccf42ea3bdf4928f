"""Constants and the column contract of Coulomb explosion imaging of OCS.

Atomic units throughout: positions in bohr, momenta in hbar/bohr, energies in hartree,
masses in electron masses. Atoms are always ordered C, O, S.
"""

from __future__ import annotations

ATOMS: tuple[str, ...] = ("C", "O", "S")

#: Masses of C, O and S in electron masses: the standard atomic weights 12.011, 15.999 and
#: 32.06 u (natural isotope mixtures, not 12C, 16O and 32S) times 1822.888486 m_e/u.
MASSES: tuple[float, ...] = (21894.71361, 29164.39289, 58441.80487)

#: Default charge state of the (2,2,2) explosion channel.
DEFAULT_CHARGES: tuple[float, ...] = (2.0, 2.0, 2.0)

#: Equilibrium bond lengths of linear OCS in bohr (1.16 and 1.56 angstrom).
R_CO_EQ: float = 2.19
R_CS_EQ: float = 2.95

BOHR_IN_ANGSTROM: float = 0.529177210903

#: The atomic mass constant in electron masses, m_u / m_e (CODATA 2018).
DALTON_IN_ELECTRON_MASSES: float = 1822.888486209
HARTREE_IN_EV: float = 27.211386245988

#: The Boltzmann constant in hartree per kelvin (CODATA 2018).
BOLTZMANN_IN_HARTREE_PER_KELVIN: float = 3.166811563e-6

#: Initial positions (the model's target x), bohr, ordered C, O, S and x, y, z.
POSITION_COLUMNS: tuple[str, ...] = ("cx", "cy", "cz", "ox", "oy", "oz", "sx", "sy", "sz")

#: Final momenta (the condition y), atomic units, same ordering.
MOMENTUM_COLUMNS: tuple[str, ...] = (
    "pcx", "pcy", "pcz", "pox", "poy", "poz", "psx", "psy", "psz",
)  # fmt: skip

ALL_COLUMNS: tuple[str, ...] = POSITION_COLUMNS + MOMENTUM_COLUMNS
