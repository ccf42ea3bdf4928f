"""The CEI pair transform: rotate positions and momenta into the momentum frame.

The frame (`flowrecon.systems.cei.frames.momentum_frame`) is built from the momenta y
alone, so it is known at inference time and never leaks x. It only rotates: the centre
of mass is *not* subtracted. The whitening that follows discovers whatever linear
constraints the user's convention implies (centre of mass at the origin, or one atom at
the origin) and the out-of-plane directions, and drops them; density models are never
asked to model degenerate directions, and results come back in the user's own frame and
units. A rotation has ``log|det| = 0``, so densities are unchanged by it.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from flowrecon.preprocessing import PairTransform
from flowrecon.systems.cei.frames import from_frame, momentum_frame, to_frame


class MomentumFrameTransform(PairTransform):
    """Rotates x (positions) and y (momenta), both ``(..., 9)``, into the momentum frame.

    Example:
        >>> import torch
        >>> t = MomentumFrameTransform()
        >>> x, y = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
        >>> torch.allclose(t.inverse_x(t.forward_x(x, y), y), x)
        True
    """

    name: ClassVar[str] = "cei-momentum-frame"

    def fit(self, x: Tensor, y: Tensor) -> MomentumFrameTransform:
        if x.shape[-1] != 9 or y.shape[-1] != 9:
            raise ValueError(
                "the momentum frame needs 9 position columns (C, O, S) and 9 momentum "
                f"columns, got {x.shape[-1]} and {y.shape[-1]}; use transform='none' for "
                "other data"
            )
        return self

    def forward_y(self, y: Tensor) -> Tensor:
        return to_frame(y, momentum_frame(y))

    def forward_x(self, x: Tensor, y: Tensor) -> Tensor:
        return to_frame(x, momentum_frame(y))

    def inverse_x(self, x_model: Tensor, y: Tensor) -> Tensor:
        # (n, B, 9) samples broadcast against the (B, 3, 3) frames.
        return from_frame(x_model, momentum_frame(y))
