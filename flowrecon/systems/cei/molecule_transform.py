"""The CEI pair transform for any molecule: rotate positions and momenta into its frame.

Like `flowrecon.systems.cei.transform.MomentumFrameTransform` (OCS), but for N atoms:
the frame (`flowrecon.systems.cei.frames.molecule_frame`) is built from the momenta y
alone, ``e1`` along one reference atom's momentum and ``e2`` from another's, so it is
known at inference time and never leaks x. It rotates, and for non-planar molecules
also reflects: ``e3`` points to the side of the ``e1 e2`` plane where a third atom's
momentum points (`flowrecon.systems.cei.frames.mirrored`), so that both mirror images
of a molecule share one set of out-of-plane coordinates. Either way ``log|det| = 0``; the
whitening that follows drops the directions the data do not fill (centre of mass,
out-of-plane coordinates of planar molecules). The reference atoms are the molecule's
own (``frame`` in its file), or, when none are given, chosen in ``fit`` from the training
momenta (`flowrecon.systems.cei.frames.choose_frame_atoms`); the mirror atom is chosen
in ``fit`` (`flowrecon.systems.cei.frames.choose_mirror_atom`, none for planar
molecules). By name the reference atoms are given as ``cei-molecule-frame:A,B`` (atom
indices; the CEI system names its molecule's that way), and ``A,B,C`` also fixes the
mirror atom, ``A,B,none`` turns reflection off. The state is a few integers, so a saved
model rebuilds the same frame; models saved before reflections existed load without one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor

from flowrecon.preprocessing import PairTransform
from flowrecon.systems.cei.frames import (
    choose_frame_atoms,
    choose_mirror_atom,
    from_frame,
    mirrored,
    molecule_frame,
    to_frame,
)
from flowrecon.systems.cei.molecule import Molecule, load_molecule

__all__ = ["MoleculeFrameTransform"]


class MoleculeFrameTransform(PairTransform):
    """Rotates x (positions) and y (momenta), both ``(..., 3N)``, into the molecule frame.

    Args:
        molecule: A Molecule or preset name: fixes N and, if it names them, the frame's
            reference atoms. None learns N (and the atoms) from the data in ``fit``.
        reference: Reference atom indices ``(a, b)``, overriding the molecule's.
        mirror: The atom whose momentum fixes the side of ``e3``; True chooses it in
            ``fit`` (none for planar molecules), False never reflects.

    Example:
        >>> import torch
        >>> t = MoleculeFrameTransform("chbrclf")
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(2, 4, 15, dtype=torch.float64, generator=g)
        >>> t = t.fit(x, y)
        >>> torch.allclose(t.inverse_x(t.forward_x(x, y), y), x)
        True
        >>> t.state_dict()
        {'n_atoms': 5, 'reference': [3, 0], 'mirror': 2}
    """

    name: ClassVar[str] = "cei-molecule-frame"

    def __init__(
        self,
        molecule: Molecule | str | None = None,
        reference: Sequence[int] | None = None,
        mirror: int | bool = True,
    ) -> None:
        self.n_atoms: int | None = None
        self.reference: tuple[int, int] | None = None
        # True: choose in fit; after fit an atom index or None (no reflection).
        self.mirror: int | bool | None = None if mirror is False else mirror
        if molecule is not None:
            m = load_molecule(molecule)
            self.n_atoms, self.reference = m.n_atoms, m.frame
        if reference is not None:
            self.reference = (int(reference[0]), int(reference[1]))

    @classmethod
    def from_options(cls, text: str) -> MoleculeFrameTransform:
        """The transform ``cei-molecule-frame:A,B[,C]``: reference atoms, mirror atom.

        Example:
            >>> MoleculeFrameTransform.from_options("3,0").reference
            (3, 0)
            >>> MoleculeFrameTransform.from_options("3,0,none").mirror is None
            True
        """
        parts = [p.strip() for p in text.split(",")]
        pair, rest = parts[:2], parts[2:]
        third_ok = not rest or (len(rest) == 1 and (rest[0].isdigit() or rest[0] == "none"))
        if (
            len(pair) != 2
            or not all(p.isdigit() for p in pair)
            or pair[0] == pair[1]
            or not third_ok
        ):
            raise ValueError(
                f"transform {cls.name}:A,B[,C] takes two different atom indices and "
                f"optionally a mirror atom index or 'none', got {text!r}"
            )
        mirror: int | bool = True if not rest else (False if rest[0] == "none" else int(rest[0]))
        return cls(reference=(int(pair[0]), int(pair[1])), mirror=mirror)

    def fit(self, x: Tensor, y: Tensor) -> MoleculeFrameTransform:
        width = y.shape[-1]
        if x.shape[-1] != width or width % 3 or width < 6:
            raise ValueError(
                "the molecule frame needs 3N position and 3N momentum columns (N >= 2 atoms), "
                f"got {x.shape[-1]} and {width}; use transform='none' for other data"
            )
        if self.n_atoms is not None and width != 3 * self.n_atoms:
            raise ValueError(
                f"the molecule frame was made for {self.n_atoms} atoms ({3 * self.n_atoms} "
                f"columns), got {width} columns"
            )
        self.n_atoms = width // 3
        if self.reference is None:
            self.reference = choose_frame_atoms(y)
        a, b = self.reference
        if a == b or not (0 <= a < self.n_atoms and 0 <= b < self.n_atoms):
            raise ValueError(
                f"frame reference atoms must be two different indices in 0..{self.n_atoms - 1}, "
                f"got {self.reference}"
            )
        if self.mirror is True:
            self.mirror = choose_mirror_atom(y, self.reference)
        elif self.mirror is not None and (
            self.mirror in self.reference or not 0 <= self.mirror < self.n_atoms
        ):
            raise ValueError(
                f"the mirror atom must be an index in 0..{self.n_atoms - 1} other than the "
                f"reference atoms {self.reference}, got {self.mirror}"
            )
        return self

    def _frame(self, y: Tensor) -> Tensor:
        # Unfitted: no reference atoms yet, or a mirror atom still to be chosen.
        if self.reference is None or self.mirror is True:
            raise ValueError("MoleculeFrameTransform is not fitted: call fit(x, y) first")
        frame = molecule_frame(y, self.reference)
        return frame if self.mirror is None else mirrored(frame, y, self.mirror)

    def forward_y(self, y: Tensor) -> Tensor:
        return to_frame(y, self._frame(y))

    def forward_x(self, x: Tensor, y: Tensor) -> Tensor:
        return to_frame(x, self._frame(y))

    def inverse_x(self, x_model: Tensor, y: Tensor) -> Tensor:
        # (n, B, 3N) samples broadcast against the (B, 3, 3) frames.
        return from_frame(x_model, self._frame(y))

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_atoms": self.n_atoms,
            "reference": None if self.reference is None else list(self.reference),
            "mirror": None if self.mirror is True else self.mirror,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n_atoms = state["n_atoms"]
        ref = state["reference"]
        self.reference = None if ref is None else (int(ref[0]), int(ref[1]))
        # Models saved before reflections existed were trained without one.
        mirror = state.get("mirror")
        self.mirror = None if mirror is None else int(mirror)
