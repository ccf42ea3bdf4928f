"""Shared network constructors: activations by name, MLPs and FrEIA-style subnets.

Every backend builds its networks from these so that ``activation="elu"`` means the same
thing everywhere and a typo fails with the list of valid names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

#: Activation name -> module class. Keys are what users type (``activation="gelu"``).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module from its name.

    Example:
        >>> activation("elu")
        ELU(alpha=1.0)
    """
    try:
        return ACTIVATIONS[name.lower()]()
    except (KeyError, AttributeError):
        valid = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; choose one of: {valid}") from None


def check_activation(name: str) -> str:
    """Returns the normalised activation name or raises the same error as `activation`."""
    activation(name)
    return name.lower()


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: Sequence[int],
    activation_name: str = "relu",
    *,
    zero_last: bool = False,
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
    return nn.Sequential(*layers)


def subnet_constructor(
    hidden: int, num_layers: int = 2, activation_name: str = "relu", *, zero_last: bool = True
) -> Callable[[int, int], nn.Module]:
    """A FrEIA-style ``subnet_constructor(dims_in, dims_out)`` of constant width.

    Example:
        >>> make_subnet = subnet_constructor(64, 2, "relu")
        >>> make_subnet(4, 8)[-1].out_features
        8
    """
    check_activation(activation_name)
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")

    def construct(dims_in: int, dims_out: int) -> nn.Module:
        return mlp(dims_in, dims_out, [hidden] * num_layers, activation_name, zero_last=zero_last)

    return construct
