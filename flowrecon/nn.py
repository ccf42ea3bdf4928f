"""Shared network constructors and argument checks of the model builders.

Every backend builds its networks and checks its hyper-parameters with these, so that
``activation="elu"`` means the same thing everywhere and a typo fails with the list of
valid names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn

_T = TypeVar("_T")

#: Activation name -> module class. Keys are what users type (``activation="gelu"``).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def choose(name: str, value: str, options: Mapping[str, _T]) -> _T:
    """Looks a string hyper-parameter up, with an error that lists the valid choices.

    Example:
        >>> choose("permute", "flip", {"random": 0, "flip": 1})
        1
        >>> choose("permute", "flop", {"random": 0, "flip": 1})
        Traceback (most recent call last):
        ...
        ValueError: unknown permute='flop'; valid choices: 'random', 'flip'
    """
    if value not in options:
        valid = ", ".join(repr(key) for key in options)
        raise ValueError(f"unknown {name}={value!r}; valid choices: {valid}")
    return options[value]


def activation_class(name: str) -> type[nn.Module]:
    """The activation module class from its name, in any case (see `ACTIVATIONS`).

    Example:
        >>> activation_class("GELU")
        <class 'torch.nn.modules.activation.GELU'>
    """
    return choose("activation", name.lower() if isinstance(name, str) else name, ACTIVATIONS)


def activation(name: str) -> nn.Module:
    """A fresh activation module from its name.

    Example:
        >>> activation("elu")
        ELU(alpha=1.0)
    """
    return activation_class(name)()


def activation_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation as a plain function, for code that calls it (nflows' MADE).

    A bound ``forward`` rather than a module, so that it is not registered as a submodule.

    Example:
        >>> activation_function("relu")(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    return activation(name).forward


def check_activation(name: str) -> str:
    """Returns the normalised activation name or raises the same error as `activation`."""
    activation_class(name)
    return name.lower()


def check_conditional_dims(model: str, x_dim: int, y_dim: int) -> None:
    """Checks that a conditional model has a non-empty x and a non-empty condition y.

    Example:
        >>> check_conditional_dims("zuko-maf", 3, 0)
        Traceback (most recent call last):
        ...
        ValueError: zuko-maf is conditional and needs y_dim >= 1, got y_dim=0
    """
    if x_dim < 1:
        raise ValueError(f"{model} needs x_dim >= 1, got x_dim={x_dim}")
    if y_dim < 1:
        raise ValueError(f"{model} is conditional and needs y_dim >= 1, got y_dim={y_dim}")


def check_at_least(**values: float | tuple[float, float]) -> None:
    """Checks numeric hyper-parameters; a tuple value is (value, minimum), default 1.

    Example:
        >>> check_at_least(blocks=4, subnet_layers=(0, 0), bins=(1, 2))
        Traceback (most recent call last):
        ...
        ValueError: bins must be >= 2, got 1
    """
    for name, spec in values.items():
        value, minimum = spec if isinstance(spec, tuple) else (spec, 1)
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_positive(**values: float) -> None:
    """Checks that hyper-parameters are strictly positive (NaN is not).

    Example:
        >>> check_positive(clamp=0.0)
        Traceback (most recent call last):
        ...
        ValueError: clamp must be > 0, got 0.0
    """
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


#: Soft bounds of the affine steps of MAF and RealNVP flows (zuko and nflows adapters),
#: ``z = (x - loc) * exp(log_scale)`` in the direction data -> latent. Sampling runs the
#: inverse, ``x = z * exp(-log_scale) + loc``: with ``log_scale >= -AFFINE_MAX_EXPANSION``
#: a step widens its input by at most exp(2.5) = 12, and with ``|loc| < AFFINE_MAX_LOC``
#: it moves it by a bounded amount whatever the other features are. Unbounded, an
#: autoregressive step's shift grows with the features it depends on and the scale may
#: reach 1e-3, so on a condition at the edge of the training data a few stacked steps
#: compound into samples as large as 1e18 (seen with zuko's MAF). Contraction is bounded
#: loosely (exp(7) ~ 1100 a step, zuko's own bound) since narrow posteriors need it.
AFFINE_MAX_EXPANSION, AFFINE_MAX_CONTRACTION, AFFINE_MAX_LOC = 2.5, 7.0, 50.0


def soft_clamp(u: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Smooth, monotonic map of the reals onto ``(lower, upper)``, the identity near 0.

    ``u / (1 + |u| / bound)`` with ``bound = upper`` for u >= 0 and ``-lower`` for u < 0
    (``lower < 0 < upper``); slope 1 at 0, so it reparametrises rather than distorts small
    values.

    Example:
        >>> soft_clamp(torch.tensor([-1e9, 0.0, 1.0, 1e9], dtype=torch.float64), -2.0, 7.0)
        tensor([-2.0000,  0.0000,  0.8750,  7.0000], dtype=torch.float64)
    """
    bound = torch.where(u >= 0, upper, -lower).to(u.dtype)
    return u / (1 + u.abs() / bound)


def bounded_affine_parameters(
    raw_loc: torch.Tensor, raw_log_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, log_scale) of a bounded affine step from unconstrained network outputs.

    See `AFFINE_MAX_EXPANSION`. Zero outputs give the identity.

    Example:
        >>> loc, log_scale = bounded_affine_parameters(torch.zeros(2), torch.tensor([-1e9, 1e9]))
        >>> loc.tolist(), [round(v, 3) for v in log_scale.tolist()]
        ([0.0, 0.0], [-2.5, 7.0])
    """
    loc = soft_clamp(raw_loc, -AFFINE_MAX_LOC, AFFINE_MAX_LOC)
    log_scale = soft_clamp(raw_log_scale, -AFFINE_MAX_EXPANSION, AFFINE_MAX_CONTRACTION)
    return loc, log_scale


class SoftBound(nn.Module):
    """``u / (1 + |u| / bound)``: the outputs of a network soft-bounded to (-bound, bound).

    No parameters, so appending it to a network leaves its state dict unchanged.

    Example:
        >>> SoftBound(10.0)(torch.tensor([0.0, 1.0, 1e9]))
        tensor([ 0.0000,  0.9091, 10.0000])
    """

    def __init__(self, bound: float) -> None:
        super().__init__()
        self.bound = float(bound)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u / (1 + u.abs() / self.bound)

    def extra_repr(self) -> str:
        return f"bound={self.bound:g}"


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: Sequence[int],
    activation_name: str = "relu",
    *,
    zero_last: bool = False,
    output_bound: float | None = None,
) -> nn.Sequential:
    """A multilayer perceptron ``in_dim -> hidden[0] -> ... -> out_dim``.

    Works on any leading batch shape, e.g. sample-first ``(n, B, in_dim)``.

    Args:
        in_dim: Input width.
        out_dim: Output width.
        hidden: Widths of the hidden layers, possibly empty (a linear map).
        activation_name: Name of the activation between layers (see `ACTIVATIONS`).
        zero_last: Initialise the last layer to zero, so that a coupling or
            autoregressive block built on it starts as the identity.
        output_bound: Soft-bound the outputs to (-output_bound, output_bound)
            (`SoftBound`); None leaves them unbounded.

    Example:
        >>> import torch
        >>> net = mlp(3, 2, [16, 32], "gelu")
        >>> net(torch.zeros(5, 4, 3)).shape
        torch.Size([5, 4, 2])
    """
    check_activation(activation_name)
    widths = [int(in_dim), *(int(h) for h in hidden)]
    if any(w < 1 for w in widths[1:]) or out_dim < 1:
        raise ValueError(f"layer widths must be positive, got hidden={list(hidden)}")
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), activation(activation_name)]
    last = nn.Linear(widths[-1], int(out_dim))
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    if output_bound is not None:
        layers.append(SoftBound(output_bound))
    return nn.Sequential(*layers)


def subnet_constructor(
    hidden: int,
    num_layers: int = 2,
    activation_name: str = "relu",
    *,
    zero_last: bool = True,
    output_bound: float | None = None,
) -> Callable[[int, int], nn.Module]:
    """A FrEIA-style ``subnet_constructor(dims_in, dims_out)`` of constant width.

    ``num_layers`` hidden layers of width ``hidden`` (none: a linear map); with
    ``zero_last`` the last layer starts at zero, so a coupling block starts as the identity;
    ``output_bound`` soft-bounds the outputs (see `mlp`).

    Example:
        >>> make_subnet = subnet_constructor(64, 2, "relu")
        >>> make_subnet(4, 8)[-1].out_features
        8
    """
    check_activation(activation_name)
    check_at_least(num_layers=(num_layers, 0))

    def construct(dims_in: int, dims_out: int) -> nn.Module:
        return mlp(
            dims_in,
            dims_out,
            [hidden] * num_layers,
            activation_name,
            zero_last=zero_last,
            output_bound=output_bound,
        )

    return construct
