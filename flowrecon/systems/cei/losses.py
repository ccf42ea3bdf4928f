"""Physics loss terms of CEI for `flowrecon.training.train` (the seed decks' extra terms).

Use them through ``ConditionalGenerator.fit(..., physics_loss=physics_loss(),
physics_weights={"energy_diff2": 0.1})``; they are computed on differentiable posterior
samples in the user's own frame and units, so they need a model whose samples carry
gradients (every flow here and the cVAE do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from flowrecon.systems.cei.constants import DEFAULT_CHARGES, MASSES
from flowrecon.systems.cei.physics import energy_difference_squared

#: Names of the terms `physics_loss` returns, for ``physics_weights``.
TERMS: tuple[str, ...] = ("energy_diff2", "rel_err2")


def physics_loss(
    charges: Sequence[float] = DEFAULT_CHARGES,
    masses: Sequence[float] = MASSES,
    *,
    eps: float = 1e-10,
) -> Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]]:
    """The CEI physics terms as a ``physics_loss(x_sample, x_true, p_obs)`` callable.

    Terms (batch means):

    - ``energy_diff2``: ``((KE(p_obs) - PE(x_sample)) / KE(p_obs))^2``, energy
      conservation checked on each sample; needs no true geometry.
    - ``rel_err2``: the seed decks' squared relative error
      ``((x_sample - x_true) / (x_true + eps))^2`` over coordinates. It blows up for
      coordinates near zero (out-of-plane ones, an atom at the origin): weight it lightly
      or not at all in such conventions.

    Args:
        charges: Ion charges of C, O, S.
        masses: Masses of C, O, S in electron masses.
        eps: The seed decks' guard in the relative error.

    Example:
        >>> import torch
        >>> terms = physics_loss()(torch.ones(2, 3, 9), torch.ones(3, 9), torch.ones(3, 9))
        >>> sorted(terms)
        ['energy_diff2', 'rel_err2']
    """

    def loss(x_sample: Tensor, x_true: Tensor, p_obs: Tensor) -> dict[str, Tensor]:
        return {
            "energy_diff2": energy_difference_squared(x_sample, p_obs, charges, masses).mean(),
            "rel_err2": ((x_sample - x_true) / (x_true + eps)).square().mean(),
        }

    return loss
