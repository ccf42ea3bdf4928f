"""Molecules for Coulomb explosion imaging: atoms, charges, geometry, vibrations, columns.

A :class:`Molecule` is a frozen description: its atoms (label, element, mass, charge of
the explosion channel), a reference geometry in bohr, a vibrational spread around it, the
bonds and angles to report, the reference atoms of the momentum frame and, for a chiral
molecule, its stereocentre. It is read from a small TOML file (built-in presets live in
``flowrecon/systems/cei/molecules/``; :func:`available_molecules` lists them) or written
in Python, and round-trips through :meth:`Molecule.to_dict` / :func:`molecule_from_dict`
(plain JSON values, so a run's ``config.json`` can keep it).

The TOML format (lengths in the file's ``[geometry] unit``, ``bohr`` or ``angstrom``;
angles in degrees; masses in electron masses; charges in units of e)::

    name = "co2"
    description = "carbon dioxide, CO2^3+ -> C+ + O+ + O+"
    source = "where the geometry comes from"
    frame = ["o1", "c"]                 # optional: e1 along p_o1, e2 from p_c

    [[atoms]]                           # one table per atom, in column order
    label = "c"                         # optional: lower-case element, numbered if repeated
    element = "C"                       # symbol; D and T are hydrogen isotopes
    charge = 1                          # the explosion channel's charge
    # isotope = 13                      # optional mass number (default: most abundant)
    # mass = 21868.66                   # optional mass in electron masses (overrides)

    [geometry]
    unit = "angstrom"
    positions = [[0, 0, 0], [-1.16, 0, 0], [1.16, 0, 0]]   # one row per atom

    [vibration]                         # Gaussian spread along Z-matrix coordinates
    zmatrix = [
      {atom = "c"},
      {atom = "o1", bond = "c", bond_sigma = 0.05},
      {atom = "o2", bond = "c", bond_sigma = 0.05, angle = "o1", angle_sigma = 10,
       linear = true},
    ]

    [report]                            # optional: default the Z-matrix bonds and angles
    bonds = [["c", "o1"], ["c", "o2"]]
    angles = [["o1", "c", "o2"]]

Columns: positions ``{label}x {label}y {label}z`` (bohr) and momenta ``p{label}x ...``
(a.u.), atoms in file order, so OCS keeps ``cx ... sz`` and ``pcx ... psz``.

Identical atoms (same element, mass and charge, such as the two O of CO2) cannot be told
apart by a detector; `flowrecon.systems.cei.canonical.canonical_order` sorts each group
of them by decreasing momentum magnitude, so that ``o1`` is always the faster oxygen ion.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from flowrecon.systems.cei.constants import BOHR_IN_ANGSTROM, DALTON_IN_ELECTRON_MASSES
from flowrecon.systems.cei.zmatrix import check_zmatrix

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "Atom",
    "Molecule",
    "ZMatrixRow",
    "available_molecules",
    "describe_molecule",
    "isotope_mass",
    "load_molecule",
    "molecule_from_dict",
    "preset_names",
]

#: Length units a molecule file may state, with their size in bohr.
LENGTH_UNITS: dict[str, float] = {"bohr": 1.0, "angstrom": 1.0 / BOHR_IN_ANGSTROM}

_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Atom:
    """One atom (ion) of a molecule.

    Attributes:
        label: Lower-case name used in the columns (``c``, ``o1``).
        element: Element symbol as written (``C``, ``O``, ``D``).
        mass: Mass in electron masses.
        charge: Charge in units of e in the default explosion channel.
    """

    label: str
    element: str
    mass: float
    charge: float


@dataclass(frozen=True)
class ZMatrixRow:
    """One row of the vibrational Z-matrix: how atom ``atom`` is placed, with spreads.

    The atom sits at distance ``bond`` from atom ``bond_to``, at angle
    ``atom-bond_to-angle_to`` and dihedral ``atom-bond_to-angle_to-dihedral_to``; the
    reference values of these coordinates come from the reference geometry, and each is
    drawn from a Gaussian around it with the given sigma. A ``linear`` row has a reference
    angle of 180 degrees and a two-dimensional, isotropic Gaussian bend (the doubly
    degenerate bending mode of a linear molecule): its deviation from linear follows a
    Rayleigh law, and no dihedral is needed.

    Attributes:
        atom: Index of the placed atom.
        bond_to, angle_to, dihedral_to: Indices of the reference atoms (None if unused).
        bond_sigma: Spread of the bond length, bohr.
        angle_sigma_deg: Spread of the angle (per bend component if ``linear``), degrees.
        dihedral_sigma_deg: Spread of the dihedral, degrees.
        linear: Whether the angle is a 180-degree linear bend.
    """

    atom: int
    bond_to: int | None = None
    bond_sigma: float = 0.0
    angle_to: int | None = None
    angle_sigma_deg: float = 0.0
    linear: bool = False
    dihedral_to: int | None = None
    dihedral_sigma_deg: float = 0.0


@dataclass(frozen=True)
class Molecule:
    """A molecule for CEI: atoms, reference geometry, vibrational spread and reporting.

    Build one with :func:`load_molecule` (a preset name or a TOML file) or
    :func:`molecule_from_dict`; the constructor checks consistency only.

    Attributes:
        name: Short name (``ocs``, ``co2``, or the file's ``name``).
        description: One line for listings.
        atoms: The atoms, in column order.
        geometry: Reference positions, bohr, one ``(x, y, z)`` per atom.
        zmatrix: Rows of the vibrational Z-matrix (every atom once, references first);
            empty when ``cartesian_sigma`` describes the spread instead.
        cartesian_sigma: Isotropic Gaussian displacement of every atom, bohr, used when
            there is no Z-matrix (0: the rigid reference geometry).
        bonds: Atom index pairs whose lengths are reported.
        angles: Atom index triples ``(i, j, k)`` whose angles at ``j`` are reported.
        frame: Indices ``(a, b)`` of the momentum frame's reference atoms, or None to let
            the frame choose from the data.
        chirality: ``(centre, a, b, c)`` indices for the handedness of a chiral molecule.
        racemic: Whether simulated events are a 50/50 mixture of both enantiomers.
        source: Where the geometry comes from.
        geometry_unit: The unit the file stated (geometry is always kept in bohr).
    """

    name: str
    description: str
    atoms: tuple[Atom, ...]
    geometry: tuple[tuple[float, float, float], ...]
    zmatrix: tuple[ZMatrixRow, ...] = ()
    cartesian_sigma: float = 0.0
    bonds: tuple[tuple[int, int], ...] = ()
    angles: tuple[tuple[int, int, int], ...] = ()
    frame: tuple[int, int] | None = None
    chirality: tuple[int, int, int, int] | None = None
    racemic: bool = False
    source: str = ""
    geometry_unit: str = field(default="bohr", compare=False)
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "atoms", tuple(self.atoms))
        object.__setattr__(
            self, "geometry", tuple(tuple(float(c) for c in row) for row in self.geometry)
        )
        where = f"molecule {self.name!r}"
        if len(self.atoms) < 2:
            raise ValueError(f"{where}: needs at least 2 atoms, got {len(self.atoms)}")
        labels = [a.label for a in self.atoms]
        for atom in self.atoms:
            _check_label(atom.label, where)
            if not (math.isfinite(atom.mass) and atom.mass > 0):
                raise ValueError(f"{where}: atom {atom.label!r} has mass {atom.mass}; need > 0")
            if not (math.isfinite(atom.charge) and atom.charge > 0):
                raise ValueError(
                    f"{where}: atom {atom.label!r} has charge {atom.charge}; charges must be "
                    "positive and finite (neutral fragments are not detected)"
                )
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"{where}: atom labels must be unique; repeated: {', '.join(dup)}")
        _check_column_clash(labels, where)
        if len(self.geometry) != len(self.atoms) or any(len(r) != 3 for r in self.geometry):
            raise ValueError(
                f"{where}: geometry needs one (x, y, z) row per atom ({len(self.atoms)}); "
                f"got {len(self.geometry)} rows"
            )
        object.__setattr__(self, "_index", {label: i for i, label in enumerate(labels)})

    # --- atoms and columns ---------------------------------------------------------

    @property
    def n_atoms(self) -> int:
        return len(self.atoms)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(a.label for a in self.atoms)

    @property
    def masses(self) -> tuple[float, ...]:
        """Masses in electron masses, in atom order."""
        return tuple(a.mass for a in self.atoms)

    @property
    def charges(self) -> tuple[float, ...]:
        """Charges of the default explosion channel, in atom order."""
        return tuple(a.charge for a in self.atoms)

    @property
    def formula(self) -> str:
        """Hill formula: C, then H, then the other elements alphabetically (``CH2I2``).

        Example:
            >>> load_molecule("ocs").formula
            'COS'
        """
        counts: dict[str, int] = {}
        for atom in self.atoms:
            counts[atom.element] = counts.get(atom.element, 0) + 1
        first = ["C", "H"] if "C" in counts else []
        order = [e for e in first if e in counts] + sorted(e for e in counts if e not in first)
        return "".join(e + (str(counts[e]) if counts[e] > 1 else "") for e in order)

    @property
    def position_columns(self) -> tuple[str, ...]:
        """``{label}x {label}y {label}z`` for every atom (bohr)."""
        return tuple(f"{a.label}{c}" for a in self.atoms for c in "xyz")

    @property
    def momentum_columns(self) -> tuple[str, ...]:
        """``p{label}x p{label}y p{label}z`` for every atom (atomic units)."""
        return tuple(f"p{a.label}{c}" for a in self.atoms for c in "xyz")

    def index(self, label: str) -> int:
        """The index of the atom with ``label``; a clear error for unknown labels."""
        try:
            return self._index[label]
        except KeyError:
            raise ValueError(
                f"molecule {self.name!r} has no atom {label!r}; atoms: {', '.join(self.labels)}"
            ) from None

    def with_charges(self, charges: Sequence[float] | None) -> Molecule:
        """The same molecule in another explosion channel (None keeps the charges).

        Example:
            >>> load_molecule("ocs").with_charges((2, 1, 1)).charges
            (2.0, 1.0, 1.0)
        """
        if charges is None:
            return self
        values = check_charges(charges, self.n_atoms, f"molecule {self.name!r}")
        atoms = tuple(replace(a, charge=q) for a, q in zip(self.atoms, values))
        return replace(self, atoms=atoms)

    def identical_groups(
        self, charges: Sequence[float] | None = None
    ) -> tuple[tuple[int, ...], ...]:
        """Groups (two or more) of atoms a detector cannot tell apart, in atom order.

        Atoms are identical when element, mass and charge agree; with other ``charges``
        (another channel) the groups can change.

        Example:
            >>> load_molecule("co2").identical_groups()
            ((1, 2),)
        """
        q = self.charges if charges is None else check_charges(charges, self.n_atoms, "charges")
        groups: dict[tuple, list[int]] = {}
        for i, (atom, qi) in enumerate(zip(self.atoms, q)):
            groups.setdefault((atom.element, atom.mass, qi), []).append(i)
        return tuple(tuple(g) for g in groups.values() if len(g) > 1)

    # --- serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The molecule as plain JSON/TOML values (geometry in bohr, masses explicit).

        Example:
            >>> m = load_molecule("so2")
            >>> molecule_from_dict(m.to_dict()) == m
            True
        """
        labels = self.labels
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "atoms": [
                {"label": a.label, "element": a.element, "mass": a.mass, "charge": a.charge}
                for a in self.atoms
            ],
            "geometry": {"unit": "bohr", "positions": [list(r) for r in self.geometry]},
            "report": {
                "bonds": [[labels[i] for i in b] for b in self.bonds],
                "angles": [[labels[i] for i in a] for a in self.angles],
            },
        }
        if self.frame is not None:
            out["frame"] = [labels[i] for i in self.frame]
        if self.zmatrix:
            out["vibration"] = {"zmatrix": [_row_to_dict(r, labels) for r in self.zmatrix]}
        else:
            out["vibration"] = {"cartesian_sigma": self.cartesian_sigma}
        if self.chirality is not None:
            centre, *rest = (labels[i] for i in self.chirality)
            out["chirality"] = {"centre": centre, "atoms": rest, "racemic": self.racemic}
        return out


def _row_to_dict(row: ZMatrixRow, labels: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"atom": labels[row.atom]}
    if row.bond_to is not None:
        out.update(bond=labels[row.bond_to], bond_sigma=row.bond_sigma)
    if row.angle_to is not None:
        out.update(angle=labels[row.angle_to], angle_sigma=row.angle_sigma_deg)
        if row.linear:
            out["linear"] = True
    if row.dihedral_to is not None:
        out.update(dihedral=labels[row.dihedral_to], dihedral_sigma=row.dihedral_sigma_deg)
    return out


def _check_label(label: str, where: str) -> None:
    if not isinstance(label, str) or not _LABEL.match(label):
        raise ValueError(
            f"{where}: atom label {label!r} must be lower-case letters, digits or _ "
            "starting with a letter (e.g. 'o1')"
        )


def _check_column_clash(labels: Sequence[str], where: str) -> None:
    seen: dict[str, str] = {}
    for label in labels:
        for column in (f"{label}x", f"p{label}x"):
            if column in seen and seen[column] != label:
                raise ValueError(
                    f"{where}: atom labels {seen[column]!r} and {label!r} both give the "
                    f"column {column!r}; rename one"
                )
            seen[column] = label


def check_charges(charges: Sequence[float], n_atoms: int, where: str) -> tuple[float, ...]:
    """Charges as floats, one per atom, positive and finite, or a one-line error."""
    try:
        values = tuple(float(q) for q in charges)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: charges must be numbers, got {charges!r}") from None
    if len(values) != n_atoms:
        raise ValueError(f"{where}: needs {n_atoms} charges (one per atom), got {len(values)}")
    if not all(math.isfinite(q) and q > 0 for q in values):
        raise ValueError(f"{where}: charges must be positive and finite, got {charges!r}")
    return values


# --- masses ----------------------------------------------------------------------------


def isotope_mass(element: str, isotope: int | None = None) -> float:
    """Mass of an isotope in electron masses; the most abundant one by default.

    Masses are those of the ``periodictable`` package (AME2020, Wang et al. 2021,
    Chinese Phys. C 45 030003; abundances IUPAC CIAAW 2021), converted with
    m_u / m_e = 1822.888486209 (CODATA 2018). ``D`` and ``T`` name the hydrogen isotopes.

    Example:
        >>> round(isotope_mass("O") / 1822.888486209, 6)   # 16O
        15.994915
        >>> round(isotope_mass("C", 13) / 1822.888486209, 6)
        13.003355
    """
    import periodictable

    try:
        el = periodictable.elements.symbol(element)
    except ValueError:
        raise ValueError(f"unknown element {element!r}") from None
    if isinstance(el, periodictable.core.Isotope):  # D or T: the symbol names the isotope
        if isotope is not None and isotope != el.isotope:
            raise ValueError(f"element {element!r} is hydrogen-{el.isotope}, not {isotope}")
        return float(el.mass) * DALTON_IN_ELECTRON_MASSES
    if isotope is None:
        natural = [el[i] for i in el.isotopes if el[i].abundance > 0]
        if not natural:
            raise ValueError(f"element {element!r} has no stable isotope; give mass or isotope")
        iso = max(natural, key=lambda i: i.abundance)
    else:
        if isotope not in el.isotopes:
            raise ValueError(f"{element}-{isotope} is not a known isotope")
        iso = el[isotope]
    return float(iso.mass) * DALTON_IN_ELECTRON_MASSES


# --- reading molecule files ------------------------------------------------------------

_TOP_KEYS = {
    "name", "description", "source", "frame", "atoms", "geometry", "vibration", "report",
    "chirality",
}  # fmt: skip
_ATOM_KEYS = {"label", "element", "charge", "mass", "isotope"}
_GEOMETRY_KEYS = {"unit", "positions"}
_VIBRATION_KEYS = {"zmatrix", "cartesian_sigma"}
_ROW_KEYS = {
    "atom", "bond", "bond_sigma", "angle", "angle_sigma", "linear", "dihedral", "dihedral_sigma",
}  # fmt: skip
_REPORT_KEYS = {"bonds", "angles"}
_CHIRALITY_KEYS = {"centre", "atoms", "racemic"}


def _unknown_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    if not isinstance(table, Mapping):
        raise ValueError(f"{where} must be a table, got {type(table).__name__}")
    extra = sorted(set(table) - allowed)
    if extra:
        raise ValueError(
            f"{where}: unknown key {extra[0]!r}; valid keys: {', '.join(sorted(allowed))}"
        )


def _number(value: Any, where: str, *, non_negative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (non_negative and v < 0):
        need = " and zero or positive" if non_negative else ""
        raise ValueError(f"{where} must be finite{need}, got {value!r}")
    return v


def _atoms_from(entries: Any, where: str) -> list[Atom]:
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: needs an [[atoms]] list with one table per atom")
    elements = [e.get("element") if isinstance(e, Mapping) else None for e in entries]
    atoms = []
    for n, entry in enumerate(entries):
        at = f"{where}: atoms[{n}]"
        _unknown_keys(entry, _ATOM_KEYS, at)
        element = entry.get("element")
        if not isinstance(element, str) or not element:
            raise ValueError(f"{at} needs an element symbol such as 'C'")
        label = entry.get("label")
        if label is None:  # o, or o1, o2 when the element repeats
            same = [i for i, e in enumerate(elements) if e == element]
            label = element.lower() + (str(same.index(n) + 1) if len(same) > 1 else "")
        _check_label(label, at)
        if "charge" not in entry:
            raise ValueError(f"{at} ({label}) needs a charge (its explosion channel)")
        charge = _number(entry["charge"], f"{at} ({label}) charge")
        if charge <= 0:
            raise ValueError(f"{at} ({label}) charge must be positive, got {entry['charge']!r}")
        if "mass" in entry:
            mass = _number(entry["mass"], f"{at} ({label}) mass")
            if mass <= 0:
                raise ValueError(f"{at} ({label}) mass must be positive, got {entry['mass']!r}")
        else:
            isotope = entry.get("isotope")
            if isotope is not None and (isinstance(isotope, bool) or not isinstance(isotope, int)):
                raise ValueError(f"{at} ({label}) isotope must be a mass number, got {isotope!r}")
            try:
                mass = isotope_mass(element, isotope)
            except ValueError as err:
                raise ValueError(f"{at} ({label}): {err}") from None
        atoms.append(Atom(label=label, element=element, mass=mass, charge=charge))
    return atoms


def _geometry_from(table: Any, n_atoms: int, where: str) -> tuple[list[list[float]], float, str]:
    if table is None:
        raise ValueError(f"{where}: needs a [geometry] table with unit and positions")
    _unknown_keys(table, _GEOMETRY_KEYS, f"{where}: [geometry]")
    unit = table.get("unit")
    if unit not in LENGTH_UNITS:
        raise ValueError(
            f"{where}: [geometry] unit must be one of {', '.join(LENGTH_UNITS)}, got {unit!r}"
        )
    rows = table.get("positions")
    if not isinstance(rows, list):
        raise ValueError(f"{where}: [geometry] positions must be a list of [x, y, z] rows")
    if len(rows) != n_atoms:
        raise ValueError(
            f"{where}: [geometry] positions has {len(rows)} rows but there are {n_atoms} atoms"
        )
    scale = LENGTH_UNITS[unit]
    out = []
    for n, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 3:
            raise ValueError(f"{where}: [geometry] positions[{n}] must be [x, y, z], got {row!r}")
        # Bohr values are kept exactly as written; only angstrom values are converted.
        values = [_number(c, f"{where}: [geometry] positions[{n}]") for c in row]
        out.append(values if scale == 1.0 else [c * scale for c in values])
    return out, scale, unit


def _label_index(label: Any, index: Mapping[str, int], where: str) -> int:
    if not isinstance(label, str) or label not in index:
        raise ValueError(f"{where}: unknown atom {label!r}; atoms: {', '.join(index)}")
    return index[label]


def _row_references(
    n: int, row: Mapping[str, Any], index: Mapping[str, int], placed: list[int], at: str
) -> dict[str, int]:
    """The reference atoms of Z-matrix row ``n``: which it needs, and that they come first."""
    name = row.get("atom")
    linear = row.get("linear", False)
    if not isinstance(linear, bool):
        raise ValueError(f"{at} ({name}): linear must be true or false, got {linear!r}")
    needed = [k for k, first in (("bond", 1), ("angle", 2)) if n >= first and k not in row]
    if needed:
        raise ValueError(f"{at} ({name}) needs {needed[0]!r} (row {n} of the Z-matrix)")
    if n >= 3 and "dihedral" not in row and not linear:
        raise ValueError(f"{at} ({name}) needs 'dihedral' (or linear = true)")
    extra = [
        k for k, first in (("bond", 1), ("angle", 2), ("dihedral", 3)) if n < first and k in row
    ]
    if extra:
        raise ValueError(f"{at} ({name}): row {n} of a Z-matrix has no {extra[0]!r}")
    refs: dict[str, int] = {}
    for key in ("bond", "angle", "dihedral"):
        if key not in row:
            continue
        ref = _label_index(row[key], index, f"{at} {key}")
        if ref not in placed:
            raise ValueError(f"{at}: {key} atom {row[key]!r} must be placed in an earlier row")
        if ref in refs.values():
            raise ValueError(f"{at}: {key} atom {row[key]!r} is already a reference of this row")
        refs[key] = ref
    return refs


def _zmatrix_from(
    rows: Any, index: Mapping[str, int], scale: float, where: str
) -> list[ZMatrixRow]:
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: [vibration] zmatrix must be a list of row tables")
    placed: list[int] = []
    out = []
    for n, row in enumerate(rows):
        at = f"{where}: zmatrix[{n}]"
        _unknown_keys(row, _ROW_KEYS, at)
        atom = _label_index(row.get("atom"), index, f"{at} atom")
        if atom in placed:
            raise ValueError(f"{at}: atom {row['atom']!r} is placed twice")
        refs = _row_references(n, row, index, placed, at)
        sigma = {
            key: _number(row.get(key, 0.0), f"{at} {key}", non_negative=True)
            for key in ("bond_sigma", "angle_sigma", "dihedral_sigma")
        }
        out.append(
            ZMatrixRow(
                atom=atom,
                bond_to=refs.get("bond"),
                bond_sigma=sigma["bond_sigma"] * scale,
                angle_to=refs.get("angle"),
                angle_sigma_deg=sigma["angle_sigma"],
                linear=row.get("linear", False),
                dihedral_to=refs.get("dihedral"),
                dihedral_sigma_deg=sigma["dihedral_sigma"],
            )
        )
        placed.append(atom)
    missing = [label for label, i in index.items() if i not in placed]
    if missing:
        raise ValueError(f"{where}: the Z-matrix does not place atom {missing[0]!r}")
    return out


def _groups_from(
    value: Any, size: int, index: Mapping[str, int], where: str
) -> list[tuple[int, ...]]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of {size}-atom lists")
    out = []
    for n, group in enumerate(value):
        if not isinstance(group, list) or len(group) != size:
            raise ValueError(f"{where}[{n}] must name {size} atoms, got {group!r}")
        idx = tuple(_label_index(g, index, f"{where}[{n}]") for g in group)
        if len(set(idx)) != size:
            raise ValueError(f"{where}[{n}] names an atom twice: {group!r}")
        out.append(idx)
    return out


def molecule_from_dict(data: Mapping[str, Any], where: str = "molecule") -> Molecule:
    """Builds a :class:`Molecule` from parsed TOML (or :meth:`Molecule.to_dict`) values.

    Raises:
        ValueError: One line naming ``where`` and the offending key, atom or row: unknown
            keys, missing atoms or charges, unknown elements, a wrong unit, a geometry
            whose length differs from the atoms, non-positive charges, a Z-matrix that does
            not place every atom or refers forward, a linear bend that is not 180 degrees.
    """
    _unknown_keys(data, _TOP_KEYS, where)
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: needs a name")
    atoms = _atoms_from(data.get("atoms"), where)
    index = {a.label: i for i, a in enumerate(atoms)}
    labels = [a.label for a in atoms]
    if len(index) != len(atoms):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise ValueError(f"{where}: atom label {dup!r} is used twice")
    _check_column_clash(labels, where)
    geometry, scale, unit = _geometry_from(data.get("geometry"), len(atoms), where)

    vibration = data.get("vibration", {})
    _unknown_keys(vibration, _VIBRATION_KEYS, f"{where}: [vibration]")
    if "zmatrix" in vibration and "cartesian_sigma" in vibration:
        raise ValueError(f"{where}: [vibration] takes zmatrix or cartesian_sigma, not both")
    zmatrix: list[ZMatrixRow] = []
    sigma = 0.0
    if "zmatrix" in vibration:
        zmatrix = _zmatrix_from(vibration["zmatrix"], index, scale, where)
    else:
        sigma = (
            _number(
                vibration.get("cartesian_sigma", 0.0),
                f"{where}: cartesian_sigma",
                non_negative=True,
            )
            * scale
        )

    report = data.get("report", {})
    _unknown_keys(report, _REPORT_KEYS, f"{where}: [report]")
    if "bonds" in report:
        bonds = _groups_from(report["bonds"], 2, index, f"{where}: report.bonds")
    else:
        bonds = [(r.bond_to, r.atom) for r in zmatrix if r.bond_to is not None]
    if "angles" in report:
        angles = _groups_from(report["angles"], 3, index, f"{where}: report.angles")
    else:
        angles = [(r.atom, r.bond_to, r.angle_to) for r in zmatrix if r.angle_to is not None]

    frame = None
    if "frame" in data:
        (frame,) = _groups_from([data["frame"]], 2, index, f"{where}: frame")

    chirality, racemic = None, False
    if "chirality" in data:
        table = data["chirality"]
        _unknown_keys(table, _CHIRALITY_KEYS, f"{where}: [chirality]")
        centre = _label_index(table.get("centre"), index, f"{where}: chirality.centre")
        (subs,) = _groups_from([table.get("atoms")], 3, index, f"{where}: chirality.atoms")
        if centre in subs:
            raise ValueError(f"{where}: chirality.atoms must not include the centre")
        chirality = (centre, *subs)
        racemic = table.get("racemic", False)
        if not isinstance(racemic, bool):
            raise ValueError(f"{where}: chirality.racemic must be true or false, got {racemic!r}")

    molecule = Molecule(
        name=name.strip(),
        description=str(data.get("description", "")),
        atoms=tuple(atoms),
        geometry=tuple(tuple(r) for r in geometry),
        zmatrix=tuple(zmatrix),
        cartesian_sigma=sigma,
        bonds=tuple(bonds),
        angles=tuple(angles),
        frame=frame,
        chirality=chirality,
        racemic=racemic,
        source=str(data.get("source", "")),
        geometry_unit=unit,
    )
    if zmatrix:
        check_zmatrix(molecule, where)
    return molecule


def _preset_files() -> dict[str, Any]:
    root = resources.files("flowrecon.systems.cei") / "molecules"
    return {p.name[: -len(".toml")]: p for p in root.iterdir() if p.name.endswith(".toml")}


def preset_names() -> list[str]:
    """Names of the built-in molecules.

    Example:
        >>> preset_names()
        ['ch2i2', 'chbrclf', 'co2', 'd2o', 'n2o', 'ocs', 'so2']
    """
    return sorted(_preset_files())


_CACHE: dict[str, Molecule] = {}


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{where}: not valid TOML: {err}") from None


def load_molecule(spec: str | Path | Molecule | Mapping[str, Any]) -> Molecule:
    """A molecule from a preset name, a TOML file path, a dict, or a Molecule (returned).

    Example:
        >>> m = load_molecule("ocs")
        >>> m.position_columns[:3], m.charges
        (('cx', 'cy', 'cz'), (2.0, 2.0, 2.0))
    """
    if isinstance(spec, Molecule):
        return spec
    if isinstance(spec, Mapping):
        return molecule_from_dict(spec)
    text = str(spec)
    presets = _preset_files()
    if text in presets:
        if text not in _CACHE:
            data = _parse_toml(presets[text].read_text(encoding="utf-8"), f"preset {text!r}")
            _CACHE[text] = molecule_from_dict(data, f"preset {text!r}")
        return _CACHE[text]
    path = Path(text)
    if path.suffix.lower() == ".toml" or path.exists():
        if not path.is_file():
            raise ValueError(f"molecule file {path} not found")
        data = _parse_toml(path.read_text(encoding="utf-8"), f"molecule file {path}")
        return molecule_from_dict(data, f"molecule file {path}")
    from flowrecon.registry import did_you_mean

    raise ValueError(
        f"unknown molecule {text!r}.{did_you_mean(text, sorted(presets))} Presets: "
        f"{', '.join(sorted(presets))}; or give a FILE.toml"
    )


def describe_molecule(molecule: Molecule) -> dict[str, Any]:
    """One molecule as a row of text: atoms, charges, masses, frame atoms, chirality.

    Example:
        >>> row = describe_molecule(load_molecule("co2"))
        >>> row["atoms"], row["charges"], row["frame"], row["identical"]
        ('c o1 o2', '1,1,1', 'o2,c', 'o1=o2')
    """
    labels = molecule.labels
    chiral = "no"
    if molecule.chirality is not None:
        centre, *subs = (labels[i] for i in molecule.chirality)
        chiral = f"{centre}: {','.join(subs)}" + (" (racemic)" if molecule.racemic else "")
    return {
        "name": molecule.name,
        "formula": molecule.formula,
        "atoms": " ".join(labels),
        "charges": ",".join(f"{q:g}" for q in molecule.charges),
        "masses (m_e)": ",".join(f"{m:.1f}" for m in molecule.masses),
        "frame": "from data"
        if molecule.frame is None
        else ",".join(labels[i] for i in molecule.frame),
        "chirality": chiral,
        "identical": " ".join("=".join(labels[i] for i in g) for g in molecule.identical_groups())
        or "-",
        "description": molecule.description,
    }


def available_molecules() -> list[dict[str, Any]]:
    """The built-in molecules (`flowrecon molecules`; `--molecule NAME` picks one).

    Each row: name, formula, atom labels, charges of the default channel, masses in
    electron masses, the momentum frame's reference atoms, the chirality centre and its
    substituents, the identical atoms, and a description.

    Example:
        >>> [m["name"] for m in available_molecules()][:2]
        ['ch2i2', 'chbrclf']
    """
    return [describe_molecule(load_molecule(name)) for name in preset_names()]
