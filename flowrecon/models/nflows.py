"""nflows backend: masked autoregressive flows (affine MAF and rational-quadratic NSF).

Two habits of nflows are avoided here: ``Flow.sample(n, context)`` returns context-first
``(B, n, D)`` (the adapter samples through the inverse transform and returns sample-first
``(n, B, D)``), and a conditional flow called without a context silently ignores it (the
adapter always passes y).

Bounded samples. The spline flow is bounded by construction (each spline maps
[-tail_bound, tail_bound] onto itself, with identity tails); its inverse runs in float64
(`SplineAutoregressiveTransform`), where nflows' float32 arithmetic can fail an assertion
on conditions far from the training data. The affine flow uses
`BoundedMaskedAffineTransform` by default (``bounded=True``): soft-bounded location and
log-scale (`flowrecon.nn.AFFINE_MAX_EXPANSION`), so no sampling step can amplify its
input by more than a fixed factor; ``bounded=False`` is nflows' own affine MADE layer.
"""

import math
from collections.abc import Callable

import torch
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.transforms.autoregressive import (
    MaskedAffineAutoregressiveTransform,
    MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
)
from nflows.transforms.base import CompositeTransform, Transform
from nflows.transforms.permutations import ReversePermutation

from flowrecon.models._estimator import Estimator
from flowrecon.nn import (
    activation_function,
    bounded_affine_parameters,
    check_at_least,
    check_conditional_dims,
    check_positive,
)


class NflowsFlow(Estimator):
    """Adapter around a conditional nflows ``Flow`` (y is its context).

    Args:
        x_dim: Width of x.
        y_dim: Width of y.
        flow: The nflows flow; its transform maps x to z.
    """

    def __init__(self, x_dim: int, y_dim: int, flow: Flow):
        super().__init__(x_dim, y_dim)
        self.flow = flow

    def to_latent(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps x ``(B, x_dim)`` to z ``(B, x_dim)`` and ``log|det dz/dx|`` ``(B,)``."""
        # nflows' public transform_to_noise drops the log-determinant.
        return self.flow._transform(x, context=self.flow._embedding_net(y))

    def from_latent(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_latent`: maps z ``(B, x_dim)`` back to x."""
        x, _ = self.flow._transform.inverse(z, context=self.flow._embedding_net(y))
        return x

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(x, context=y)

    def sample(self, n: int, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        # Flow.sample returns context-first (B, n, D) and draws its noise in torch's
        # default dtype whatever the model's. This draws the same noise, in y's dtype, and
        # returns the same samples sample-first: Flow.sample(n, y).transpose(0, 1).
        batch = y.shape[0]
        z = torch.randn(batch, n, self.x_dim, dtype=y.dtype, device=y.device).transpose(0, 1)
        z = temperature * z
        x = self.from_latent(z.reshape(n * batch, self.x_dim), y.repeat(n, 1))
        return x.reshape(n, batch, self.x_dim)


class BoundedMaskedAffineTransform(MaskedAffineAutoregressiveTransform):
    """nflows' affine MADE layer as ``z = (x - loc) * exp(log_scale)``, soft-bounded.

    Same network and parameter layout as ``MaskedAffineAutoregressiveTransform``; its two
    outputs per feature become (log_scale, loc) through
    `flowrecon.nn.bounded_affine_parameters` instead of nflows' ``softplus(u) + 1e-3``
    scale and unbounded shift.
    """

    def _bounded(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_scale, raw_loc = self._unconstrained_scale_and_shift(params)
        loc, log_scale = bounded_affine_parameters(raw_loc, raw_scale)
        return loc, log_scale

    def _elementwise_forward(self, inputs, autoregressive_params):
        loc, log_scale = self._bounded(autoregressive_params)
        return (inputs - loc) * log_scale.exp(), log_scale.sum(-1)

    def _elementwise_inverse(self, inputs, autoregressive_params):
        loc, log_scale = self._bounded(autoregressive_params)
        return inputs * (-log_scale).exp() + loc, -log_scale.sum(-1)


class SplineAutoregressiveTransform(MaskedPiecewiseRationalQuadraticAutoregressiveTransform):
    """nflows' rational-quadratic MADE layer whose inverse (sampling) runs in float64.

    The inverse solves a quadratic per feature and asserts a non-negative discriminant;
    in float32, a condition far from the training data (sharp bins, large derivatives)
    makes it round below zero and sampling stops with an ``AssertionError``. The same
    network and parameters, only the spline arithmetic of the inverse in double precision.
    """

    def _elementwise_inverse(self, inputs, autoregressive_params):
        outputs, logabsdet = self._elementwise(
            inputs.double(), autoregressive_params.double(), inverse=True
        )
        return outputs.to(inputs.dtype), logabsdet.to(inputs.dtype)


def build_maf(
    x_dim: int,
    y_dim: int,
    *,
    transforms: int = 5,
    hidden: int = 128,
    residual_blocks: int = 2,
    activation: str = "relu",
    dropout: float = 0.0,
    bounded: bool = True,
) -> Estimator:
    """Builds a conditional masked autoregressive flow (affine MADE layers), nflows.

    Args:
        x_dim: Width of x.
        y_dim: Width of the condition y.
        transforms: Number of autoregressive transforms; the feature order is reversed
            between consecutive ones.
        hidden: Width of the hidden layers of each MADE network.
        residual_blocks: Number of masked residual blocks in each MADE network.
        activation: MADE activation: relu, leaky_relu, elu, gelu, silu or tanh.
        dropout: Dropout probability inside the MADE networks.
        bounded: Soft-bounded affine layers (`BoundedMaskedAffineTransform`); False uses
            nflows' own, whose samples can run away on rare conditions.

    Example:
        >>> flow = build_maf(3, 2, transforms=2, hidden=8)
        >>> flow.sample(5, torch.zeros(4, 2)).shape
        torch.Size([5, 4, 3])
    """
    made = _made_kwargs(
        "nflows-maf", x_dim, y_dim, transforms, hidden, residual_blocks, activation, dropout
    )
    cls = BoundedMaskedAffineTransform if bounded else MaskedAffineAutoregressiveTransform

    def layer() -> Transform:
        transform = cls(**made)
        _start_as_identity(transform)
        return transform

    return NflowsFlow(x_dim, y_dim, _flow(x_dim, transforms, layer))


def build_nsf(
    x_dim: int,
    y_dim: int,
    *,
    transforms: int = 5,
    hidden: int = 128,
    residual_blocks: int = 2,
    bins: int = 8,
    tail_bound: float = 5.0,
    activation: str = "relu",
    dropout: float = 0.0,
) -> Estimator:
    """Builds a conditional autoregressive neural spline flow (rational-quadratic), nflows.

    Args:
        x_dim: Width of x.
        y_dim: Width of the condition y.
        transforms: Number of autoregressive transforms; the feature order is reversed
            between consecutive ones.
        hidden: Width of the hidden layers of each MADE network.
        residual_blocks: Number of masked residual blocks in each MADE network.
        bins: Number of spline bins per feature.
        tail_bound: The splines act on [-tail_bound, tail_bound]; outside it each
            transform is the identity (linear tails).
        activation: MADE activation: relu, leaky_relu, elu, gelu, silu or tanh.
        dropout: Dropout probability inside the MADE networks.

    Example:
        >>> flow = build_nsf(3, 2, transforms=2, hidden=8)
        >>> flow.log_prob(torch.zeros(4, 3), torch.zeros(4, 2)).shape
        torch.Size([4])
    """
    made = _made_kwargs(
        "nflows-nsf", x_dim, y_dim, transforms, hidden, residual_blocks, activation, dropout
    )
    check_at_least(bins=(bins, 2))
    check_positive(tail_bound=tail_bound)

    def layer() -> Transform:
        return SplineAutoregressiveTransform(
            **made, num_bins=bins, tails="linear", tail_bound=tail_bound
        )

    return NflowsFlow(x_dim, y_dim, _flow(x_dim, transforms, layer))


def _start_as_identity(transform: MaskedAffineAutoregressiveTransform) -> None:
    """Makes an affine MADE transform start as the identity (scale 1, shift 0).

    With nflows' own initialisation the scales start near softplus(0) = 0.69, and the
    shifts grow with the preceding features: the inverse pass of a few stacked layers then
    draws samples as large as 1e12 from an untrained flow, which breaks any loss term
    computed on samples. A zero last layer, as in the FrEIA adapter, avoids that.
    """
    final = transform.autoregressive_net.final_layer
    with torch.no_grad():
        final.weight.zero_()
        final.bias.zero_()  # the bounded layer: log-scale 0, location 0
        if not isinstance(transform, BoundedMaskedAffineTransform):
            # The outputs interleave (unconstrained scale, shift) per feature;
            # softplus(u) + epsilon = 1 at u = log(exp(1 - epsilon) - 1).
            final.bias[0::2] = math.log(math.expm1(1.0 - transform._epsilon))


def _flow(x_dim: int, transforms: int, layer: Callable[[], Transform]) -> Flow:
    """Chains ``transforms`` layers with reversals between them over a N(0, I) base."""
    steps: list[Transform] = []
    for i in range(transforms):
        if i > 0:
            # Alternate the autoregressive order, so no feature is always first.
            steps.append(ReversePermutation(features=x_dim))
        steps.append(layer())
    return Flow(CompositeTransform(steps), StandardNormal([x_dim]))


def _made_kwargs(
    model: str,
    x_dim: int,
    y_dim: int,
    transforms: int,
    hidden: int,
    residual_blocks: int,
    activation: str,
    dropout: float,
) -> dict[str, object]:
    """Checks the hyper-parameters both flows share; returns the keywords of their MADE layers.

    ``transforms`` is only checked here: `_flow` stacks that many layers.
    """
    check_conditional_dims(model, x_dim, y_dim)
    check_at_least(transforms=transforms, hidden=hidden, residual_blocks=residual_blocks)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return {
        "features": x_dim,
        "hidden_features": hidden,
        "context_features": y_dim,
        "num_blocks": residual_blocks,
        # MADE calls its activation as a function.
        "activation": activation_function(activation),
        "dropout_probability": dropout,
    }
