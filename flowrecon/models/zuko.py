"""zuko backend: conditional NSF, MAF and RealNVP flows.

zuko already speaks the contract's language: ``flow(y)`` is a distribution over x whose
``rsample((n,))`` is sample-first ``(n, B, D)`` and differentiable, and whose ``log_prob``
includes the base constant. With ``x_dim == 1`` zuko replaces the autoregressive or
coupling layers by element-wise transforms whose parameters depend on y only.

Bounded samples. The spline flow is bounded by construction: each spline maps [-5, 5]
onto itself and is the identity outside, so a sample is never larger than
``max(|z|, 5)`` in model space. The affine flows (MAF, RealNVP) use `BoundedAffineTransform`
by default (``bounded=True``), whose soft-bounded location and log-scale keep every
sampling step from amplifying its input by more than a fixed factor
(`flowrecon.nn.AFFINE_MAX_EXPANSION`); ``bounded=False`` is zuko's own affine step.
"""

import torch
import zuko
from zuko.transforms import MonotonicAffineTransform

from flowrecon.models._estimator import Estimator
from flowrecon.nn import (
    activation_class,
    bounded_affine_parameters,
    check_at_least,
    check_conditional_dims,
)


class BoundedAffineTransform(MonotonicAffineTransform):
    """``z = (x - loc) * exp(log_scale)`` with soft-bounded loc and log-scale.

    Takes the same two unconstrained parameters as zuko's ``MonotonicAffineTransform``
    (so the hyper-network is unchanged) and maps them with
    `flowrecon.nn.bounded_affine_parameters`. The location is subtracted before scaling,
    so the inverse (sampling) step ``x = z * exp(-log_scale) + loc`` moves a feature by a
    bounded amount whatever the features it depends on.

    Example:
        >>> t = BoundedAffineTransform(torch.tensor([1e9]), torch.tensor([-1e9]))
        >>> bool(t.inv(torch.tensor([1.0])).abs().max() < 70)
        True
    """

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, **kwargs) -> None:
        torch.distributions.Transform.__init__(self, **kwargs)
        self.loc, self.log_scale = bounded_affine_parameters(shift, scale)
        self.scale = self.log_scale.exp()

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.loc) * self.scale

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale + self.loc


class ZukoFlow(Estimator):
    """Adapter around a conditional zuko flow (``zuko.lazy.Flow``), y as its context.

    Args:
        x_dim: Width of x.
        y_dim: Width of y.
        flow: The zuko flow; ``flow(y)`` is the distribution of x given y.
    """

    def __init__(self, x_dim: int, y_dim: int, flow: zuko.lazy.Flow):
        super().__init__(x_dim, y_dim)
        self.flow = flow

    def to_latent(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps x ``(B, x_dim)`` to z ``(B, x_dim)`` and ``log|det dz/dx|`` ``(B,)``."""
        z, ladj = self.flow(y).transform.call_and_ladj(x)
        if ladj.dim() == x.dim():  # element-wise log-determinants: one per feature
            ladj = ladj.sum(-1)
        return z, ladj

    def from_latent(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_latent`: maps z ``(B, x_dim)`` back to x."""
        return self.flow(y).transform.inv(z)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.flow(y).log_prob(x)

    def sample(self, n: int, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        dist = self.flow(y)
        if temperature == 1.0:
            return dist.rsample((int(n),))
        # What NormalizingFlow.rsample does, with the base draw scaled.
        return dist.transform.inv(temperature * dist.base.rsample((int(n),)))


def build_nsf(
    x_dim: int,
    y_dim: int,
    *,
    transforms: int = 5,
    hidden: int = 128,
    hidden_layers: int = 2,
    bins: int = 8,
    activation: str = "relu",
    randperm: bool = False,
) -> Estimator:
    """Builds a conditional autoregressive neural spline flow, zuko (``zuko.flows.NSF``).

    zuko's splines act on [-5, 5] and are the identity outside: standardised x suits them.

    Args:
        x_dim: Width of x.
        y_dim: Width of the condition y.
        transforms: Number of autoregressive spline transforms.
        hidden: Width of the hidden layers of each masked MLP.
        hidden_layers: Number of hidden layers of each masked MLP.
        bins: Number of spline bins per feature.
        activation: MLP activation: relu, leaky_relu, elu, gelu, silu or tanh.
        randperm: Random feature orders between transforms instead of alternating
            ascending and descending orders.

    Example:
        >>> flow = build_nsf(3, 2, transforms=2, hidden=8)
        >>> flow.sample(5, torch.zeros(4, 2)).shape
        torch.Size([5, 4, 3])
    """
    kwargs = _flow_kwargs("zuko-nsf", x_dim, y_dim, transforms, hidden, hidden_layers, activation)
    check_at_least(bins=(bins, 2))
    return ZukoFlow(x_dim, y_dim, zuko.flows.NSF(**kwargs, bins=bins, randperm=randperm))


def build_maf(
    x_dim: int,
    y_dim: int,
    *,
    transforms: int = 5,
    hidden: int = 128,
    hidden_layers: int = 2,
    activation: str = "relu",
    randperm: bool = False,
    bounded: bool = True,
) -> Estimator:
    """Builds a conditional masked autoregressive flow, zuko (``zuko.flows.MAF``).

    Args:
        x_dim: Width of x.
        y_dim: Width of the condition y.
        transforms: Number of affine autoregressive transforms.
        hidden: Width of the hidden layers of each masked MLP.
        hidden_layers: Number of hidden layers of each masked MLP.
        activation: MLP activation: relu, leaky_relu, elu, gelu, silu or tanh.
        randperm: Random feature orders between transforms instead of alternating
            ascending and descending orders.
        bounded: Soft-bounded affine steps (`BoundedAffineTransform`); False uses
            zuko's own, whose samples can run away on rare conditions.

    Example:
        >>> flow = build_maf(3, 2, transforms=2, hidden=8)
        >>> flow.log_prob(torch.zeros(4, 3), torch.zeros(4, 2)).shape
        torch.Size([4])
    """
    kwargs = _flow_kwargs("zuko-maf", x_dim, y_dim, transforms, hidden, hidden_layers, activation)
    kwargs.update(_univariate(bounded))
    return ZukoFlow(x_dim, y_dim, zuko.flows.MAF(**kwargs, randperm=randperm))


def build_realnvp(
    x_dim: int,
    y_dim: int,
    *,
    transforms: int = 6,
    hidden: int = 128,
    hidden_layers: int = 2,
    activation: str = "relu",
    randmask: bool = False,
    bounded: bool = True,
) -> Estimator:
    """Builds a conditional RealNVP (affine coupling) flow, zuko (``zuko.flows.RealNVP``).

    Args:
        x_dim: Width of x.
        y_dim: Width of the condition y.
        transforms: Number of affine coupling transforms.
        hidden: Width of the hidden layers of each coupling MLP.
        hidden_layers: Number of hidden layers of each coupling MLP.
        activation: MLP activation: relu, leaky_relu, elu, gelu, silu or tanh.
        randmask: Random coupling masks instead of alternating checkerboard masks.
        bounded: Soft-bounded affine steps (`BoundedAffineTransform`); False uses
            zuko's own.

    Example:
        >>> flow = build_realnvp(3, 2, transforms=2, hidden=8)
        >>> flow.sample(5, torch.zeros(4, 2)).shape
        torch.Size([5, 4, 3])
    """
    kwargs = _flow_kwargs(
        "zuko-realnvp", x_dim, y_dim, transforms, hidden, hidden_layers, activation
    )
    kwargs.update(_univariate(bounded))
    return ZukoFlow(x_dim, y_dim, zuko.flows.RealNVP(**kwargs, randmask=randmask))


def _univariate(bounded: bool) -> dict[str, object]:
    """The affine step's keyword for zuko's MAF and RealNVP (none: zuko's default)."""
    return {"univariate": BoundedAffineTransform} if bounded else {}


def _flow_kwargs(
    model: str,
    x_dim: int,
    y_dim: int,
    transforms: int,
    hidden: int,
    hidden_layers: int,
    activation: str,
) -> dict[str, object]:
    """Checks the hyper-parameters every zuko flow shares; returns them as its keywords."""
    check_conditional_dims(model, x_dim, y_dim)
    check_at_least(transforms=transforms, hidden=hidden, hidden_layers=(hidden_layers, 0))
    return {
        "features": x_dim,
        "context": y_dim,
        "transforms": transforms,
        "hidden_features": [hidden] * hidden_layers,
        # zuko's MLPs take activation constructors.
        "activation": activation_class(activation),
    }
