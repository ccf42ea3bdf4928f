"""The CEI pair transform for any molecule: rotate positions and momenta into its frame.

Like `flowrecon.systems.cei.transform.MomentumFrameTransform` (OCS), but for N atoms:
the frame (`flowrecon.systems.cei.frames.molecule_frame`) is built from the momenta y
alone, ``e1`` along one reference atom's momentum and ``e2`` from another's, so it is
known at inference time and never leaks x. It only rotates (``log|det| = 0``); the
whitening that follows drops the directions the data do not fill (centre of mass,
out-of-plane coordinates of planar molecules). The reference atoms are the molecule's
own (``frame`` in its file), or, when none are given, chosen in ``fit`` from the training
momenta (`flowrecon.systems.cei.frames.choose_frame_atoms`). By name the reference atoms
are given as ``cei-molecule-frame:A,B`` (atom indices; the CEI system names its
molecule's that way). The state is two integers and the number of atoms, so a saved
model rebuilds the same frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor

from flowrecon.preprocessing import PairTransform
from flowrecon.systems.cei.frames import choose_frame_atoms, from_frame, molecule_frame, to_frame
from flowrecon.systems.cei.molecule import Molecule, load_molecule

__all__ = ["MoleculeFrameTransform"]


class MoleculeFrameTransform(PairTransform):
    """Rotates x (positions) and y (momenta), both ``(..., 3N)``, into the molecule frame.

    Args:
        molecule: A Molecule or preset name: fixes N and, if it names them, the frame's
            reference atoms. None learns N (and the atoms) from the data in ``fit``.
        reference: Reference atom indices ``(a, b)``, overriding the molecule's.

    Example:
        >>> import torch
        >>> t = MoleculeFrameTransform("chbrclf")
        >>> x, y = torch.randn(4, 15, dtype=torch.float64), torch.randn(4, 15, dtype=torch.float64)
        >>> t = t.fit(x, y)
        >>> torch.allclose(t.inverse_x(t.forward_x(x, y), y), x)
        True
        >>> t.state_dict()
        {'n_atoms': 5, 'reference': [3, 0]}
    """

    name: ClassVar[str] = "cei-molecule-frame"

    def __init__(
        self, molecule: Molecule | str | None = None, reference: Sequence[int] | None = None
    ) -> None:
        self.n_atoms: int | None = None
        self.reference: tuple[int, int] | None = None
        if molecule is not None:
            m = load_molecule(molecule)
            self.n_atoms, self.reference = m.n_atoms, m.frame
        if reference is not None:
            self.reference = (int(reference[0]), int(reference[1]))

    @classmethod
    def from_options(cls, text: str) -> MoleculeFrameTransform:
        """The transform named ``cei-molecule-frame:A,B``: reference atoms A and B.

        Example:
            >>> MoleculeFrameTransform.from_options("3,0").reference
            (3, 0)
        """
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or parts[0] == parts[1]:
            raise ValueError(
                f"transform {cls.name}:A,B takes two different atom indices, got {text!r}"
            )
        return cls(reference=(int(parts[0]), int(parts[1])))

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
        return self

    def _frame(self, y: Tensor) -> Tensor:
        if self.reference is None:
            raise ValueError("MoleculeFrameTransform is not fitted: call fit(x, y) first")
        return molecule_frame(y, self.reference)

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
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n_atoms = state["n_atoms"]
        ref = state["reference"]
        self.reference = None if ref is None else (int(ref[0]), int(ref[1]))
