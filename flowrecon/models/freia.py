"""FrEIA backend: conditional invertible neural networks (cINN) built from coupling blocks.

FrEIA supplies invertible blocks but no base distribution. The adapter adds the standard
normal, constant included, so ``log_prob(x, y) = log N(z; 0, I) + log|det dz/dx|`` with
``z, log|det dz/dx| = inn(x, c=[y])``, exactly the convention of
``flowrecon.models._estimator``.

Every subnet's last layer starts at zero, so a freshly built network is a pure permutation
of x: training starts from a well-conditioned identity map and log_prob starts at the
standard normal density.

Bounded samples. FrEIA soft-clamps each block's log-scales, but its translations are the
raw outputs of the subnets, which grow with their inputs: in the sampling direction a
block then feeds a large feature into the next block's translation, and a rare condition
compounds into runaway draws (83 bohr from a cINN trained on sparse bends). With
``bounded=True`` (the default) every subnet's outputs are soft-bounded (`SoftBound`), so
that each translation stays below `FREIA_MAX_SHIFT` in model space; ``bounded=False`` is
FrEIA's own blocks.
"""

import contextlib
from collections.abc import Iterator

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
from torch import nn

from flowrecon.models._estimator import Estimator, standard_normal_log_prob
from flowrecon.nn import (
    check_at_least,
    check_conditional_dims,
    check_positive,
    choose,
    mlp,
    subnet_constructor,
)

#: Largest translation of a coupling block with ``bounded=True`` (model space, where the
#: data are standardised): far beyond what centring standardised features needs.
FREIA_MAX_SHIFT = 100.0

_COUPLINGS: dict[str, type[Fm.InvertibleModule]] = {
    # two-sided, one subnet predicts (s, t) for each half
    "glow": Fm.GLOWCouplingBlock,
    # one-sided: half of x is transformed, conditioned on the other half
    "affine": Fm.AffineCouplingOneSided,
    # two-sided, separate subnets for s and t
    "rnvp": Fm.RNVPCouplingBlock,
}
_CLAMP_ACTIVATIONS = {"atan": "ATAN", "tanh": "TANH", "sigmoid": "SIGMOID"}
_GLOBAL_AFFINE_TYPES = {"softplus": "SOFTPLUS", "sigmoid": "SIGMOID", "exp": "EXP"}


class ReversePermutation(Fm.InvertibleModule):
    """Reverses the order of the features; FrEIA has no such block.

    A fixed permutation: no parameters, log-determinant zero, its own inverse.
    """

    def __init__(self, dims_in: list[tuple[int]], dims_c: list[tuple[int]] | None = None):
        super().__init__(dims_in, dims_c)

    def forward(
        self,
        x: list[torch.Tensor],
        c: list[torch.Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[tuple[torch.Tensor], torch.Tensor]:
        out = x[0].flip(1)
        return (out,), out.new_zeros(out.shape[0])

    def output_dims(self, input_dims: list[tuple[int]]) -> list[tuple[int]]:
        return input_dims


_PERMUTATIONS: dict[str, type[Fm.InvertibleModule]] = {
    # a fixed random permutation per block
    "random": Fm.PermuteRandom,
    "flip": ReversePermutation,
}


class FrEIAFlow(Estimator):
    """Adapter around a FrEIA ``SequenceINN`` whose blocks all take the condition.

    Args:
        x_dim: Width of x.
        y_dim: Width of y.
        inn: The invertible network, mapping x to z in its forward direction.
        condition_net: Maps y to the condition seen by every block (identity or an MLP).
    """

    def __init__(self, x_dim: int, y_dim: int, inn: Ff.SequenceINN, condition_net: nn.Module):
        super().__init__(x_dim, y_dim)
        _frozen_parameters_to_buffers(inn)
        self.inn = inn
        self.condition_net = condition_net

    def to_latent(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps x ``(B, x_dim)`` to z ``(B, x_dim)`` and ``log|det dz/dx|`` ``(B,)``."""
        z, ladj = self.inn(x, c=[self.condition_net(y)])
        return z, ladj

    def from_latent(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_latent`: maps z ``(B, x_dim)`` back to x."""
        x, _ = self.inn(z, c=[self.condition_net(y)], rev=True, jac=False)
        return x

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z, ladj = self.to_latent(x, y)
        return standard_normal_log_prob(z) + ladj

    def sample(self, n: int, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        batch = y.shape[0]
        # Embed the condition once, then repeat it: row i * B + b of the flattened batch
        # is sample i of event b, which the final reshape turns into (n, B, x_dim).
        c = self.condition_net(y)
        z = temperature * torch.randn(n * batch, self.x_dim, dtype=c.dtype, device=c.device)
        x, _ = self.inn(z, c=[c.repeat(n, 1)], rev=True, jac=False)
        return x.reshape(n, batch, self.x_dim)


def build_cinn(
    x_dim: int,
    y_dim: int,
    *,
    blocks: int = 12,
    hidden: int = 256,
    subnet_layers: int = 2,
    activation: str = "relu",
    coupling: str = "glow",
    permute: str = "random",
    clamp: float = 2.0,
    clamp_activation: str = "atan",
    cond_hidden: int = 0,
    permutation_seed: int = 0,
    bounded: bool = True,
) -> Estimator:
    """Builds a conditional INN: ``blocks`` x (coupling block, permutation), FrEIA.

    The seed documents' network, 20 affine coupling blocks each followed by a flip, is
    ``build_cinn(x_dim, y_dim, blocks=20, coupling="affine", permute="flip")``.

    Args:
        x_dim: Width of x; at least 2, since coupling blocks split x into two halves.
        y_dim: Width of the condition y.
        blocks: Number of (coupling block, permutation) pairs.
        hidden: Width of the hidden layers of each coupling subnet.
        subnet_layers: Number of hidden layers of each coupling subnet.
        activation: Subnet activation: relu, leaky_relu, elu, gelu, silu or tanh.
        coupling: "glow" (GLOW coupling, both halves transformed, one subnet per half),
            "affine" (one-sided affine coupling: one half transformed per block) or "rnvp"
            (RealNVP coupling, separate scale and shift subnets).
        permute: Permutation after each coupling block: "random" (a fixed random
            permutation per block) or "flip" (reverse the feature order).
        clamp: Soft clamp of the log-scales: each block scales a feature by at most
            exp(+-clamp).
        clamp_activation: Soft-clamping function: atan, tanh or sigmoid.
        cond_hidden: Width of a small MLP embedding y, shared by all blocks; 0 feeds the
            raw y to every block.
        permutation_seed: Seed of the random permutations (they are also saved in the
            state dict).
        bounded: Soft-bounded translations (see the module docstring); False is FrEIA's
            own coupling, whose samples can run away on rare conditions.

    Example:
        >>> flow = build_cinn(3, 2, blocks=2, hidden=8)
        >>> flow.sample(5, torch.zeros(4, 2)).shape
        torch.Size([5, 4, 3])
    """
    _check_common("freia-cinn", x_dim, y_dim, blocks, hidden, subnet_layers, cond_hidden)
    check_positive(clamp=clamp)
    coupling_block = choose("coupling", coupling, _COUPLINGS)
    permutation = choose("permute", permute, _PERMUTATIONS)
    clamp_fn = choose("clamp_activation", clamp_activation, _CLAMP_ACTIVATIONS)
    return _build(
        x_dim,
        y_dim,
        coupling_block,
        permutation,
        blocks=blocks,
        hidden=hidden,
        subnet_layers=subnet_layers,
        activation=activation,
        cond_hidden=cond_hidden,
        permutation_seed=permutation_seed,
        output_bound=FREIA_MAX_SHIFT if bounded else None,
        clamp=clamp,
        clamp_activation=clamp_fn,
        # The passive part is the smaller half, so a one-sided block transforms
        # ceil(D/2) features and, with flips, every feature is transformed
        # (FrEIA's default round(D/2) leaves the middle of D = 3, 7, ... untouched).
        split_len=x_dim // 2,
    )


def build_allinone(
    x_dim: int,
    y_dim: int,
    *,
    blocks: int = 12,
    hidden: int = 256,
    subnet_layers: int = 2,
    activation: str = "relu",
    clamp: float = 2.0,
    cond_hidden: int = 0,
    permute_soft: bool = False,
    reverse_permutation: bool = False,
    global_affine_init: float = 1.0,
    global_affine_type: str = "softplus",
    permutation_seed: int = 0,
    bounded: bool = True,
) -> Estimator:
    """Builds a stack of FrEIA ``AllInOneBlock`` (coupling, global affine, permutation).

    Args:
        x_dim: Width of x; at least 2, since coupling blocks split x into two halves.
        y_dim: Width of the condition y.
        blocks: Number of all-in-one blocks.
        hidden: Width of the hidden layers of each coupling subnet.
        subnet_layers: Number of hidden layers of each coupling subnet.
        activation: Subnet activation: relu, leaky_relu, elu, gelu, silu or tanh.
        clamp: Soft clamp of the coupling log-scales (tanh clamping).
        cond_hidden: Width of a small MLP embedding y, shared by all blocks; 0 feeds the
            raw y to every block.
        permute_soft: Use random rotations from SO(D) instead of hard permutations.
        reverse_permutation: Also apply the inverse permutation before each coupling.
        global_affine_init: Initial value of the per-feature global scale (> 0).
        global_affine_type: Activation of the global scale: softplus, sigmoid or exp.
        permutation_seed: Seed of the random permutations/rotations (they are also
            saved in the state dict).
        bounded: Soft-bounded translations (see the module docstring); False is FrEIA's
            own block.

    Example:
        >>> flow = build_allinone(3, 2, blocks=2, hidden=8)
        >>> flow.log_prob(torch.zeros(4, 3), torch.zeros(4, 2)).shape
        torch.Size([4])
    """
    _check_common("freia-allinone", x_dim, y_dim, blocks, hidden, subnet_layers, cond_hidden)
    check_positive(clamp=clamp, global_affine_init=global_affine_init)
    affine_type = choose("global_affine_type", global_affine_type, _GLOBAL_AFFINE_TYPES)
    if affine_type == "SIGMOID" and global_affine_init >= 10.0:
        # FrEIA's sigmoid global scale is 10 * sigmoid(.), so it cannot start at >= 10.
        raise ValueError(
            f"global_affine_init must be < 10 with global_affine_type='sigmoid', "
            f"got {global_affine_init}"
        )
    return _build(
        x_dim,
        y_dim,
        Fm.AllInOneBlock,
        None,
        blocks=blocks,
        hidden=hidden,
        subnet_layers=subnet_layers,
        activation=activation,
        cond_hidden=cond_hidden,
        permutation_seed=permutation_seed,
        # The block multiplies its subnet's outputs by 0.1 before using them.
        output_bound=10 * FREIA_MAX_SHIFT if bounded else None,
        affine_clamping=clamp,
        global_affine_init=global_affine_init,
        global_affine_type=affine_type,
        permute_soft=permute_soft,
        reverse_permutation=reverse_permutation,
    )


def _build(
    x_dim: int,
    y_dim: int,
    block: type[Fm.InvertibleModule],
    permutation: type[Fm.InvertibleModule] | None,
    *,
    blocks: int,
    hidden: int,
    subnet_layers: int,
    activation: str,
    cond_hidden: int,
    permutation_seed: int,
    output_bound: float | None,
    **block_options: object,
) -> Estimator:
    """Stacks ``blocks`` x (``block``, then ``permutation`` unless None) into a `FrEIAFlow`.

    Every ``block`` gets the same y embedding as its condition, subnets of ``subnet_layers``
    hidden layers of width ``hidden`` whose last layer starts at zero, and ``block_options``.
    """
    subnet = subnet_constructor(
        hidden, subnet_layers, activation, zero_last=True, output_bound=output_bound
    )
    condition_net, cond_dim = _condition_net(y_dim, cond_hidden, activation)
    inn = Ff.SequenceINN(x_dim)
    # FrEIA draws its random permutations from numpy's global generator: seed it here
    # (and restore it afterwards) so that building a model is reproducible.
    with _seeded_numpy(permutation_seed):
        for _ in range(blocks):
            inn.append(
                block, cond=0, cond_shape=(cond_dim,), subnet_constructor=subnet, **block_options
            )
            if permutation is not None:
                inn.append(permutation)
    return FrEIAFlow(x_dim, y_dim, inn, condition_net)


def _frozen_parameters_to_buffers(module: nn.Module) -> None:
    """Re-registers FrEIA's fixed permutations (``requires_grad=False`` parameters) as buffers.

    FrEIA stores them as ``nn.Parameter``, some of them int64, so they would show up in
    ``parameters()`` (optimisers, parameter counts, ``parameters_to_vector``). As buffers
    they keep their state-dict keys and still follow ``.to(device)``.
    """
    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is not None and not param.requires_grad:
                del submodule._parameters[name]
                submodule.register_buffer(name, param.detach())


def _condition_net(y_dim: int, cond_hidden: int, activation: str) -> tuple[nn.Module, int]:
    """The y embedding shared by all blocks and the width of its output."""
    if cond_hidden == 0:
        return nn.Identity(), y_dim
    return mlp(y_dim, cond_hidden, [cond_hidden], activation), cond_hidden


@contextlib.contextmanager
def _seeded_numpy(seed: int) -> Iterator[None]:
    """Seeds numpy's global generator, which FrEIA uses, and restores it on exit.

    FrEIA's ``PermuteRandom(seed=...)`` would reseed the global generator for good, a side
    effect on the caller's own numpy random state.
    """
    # The legacy global API is the point here: it is what FrEIA draws from.
    state = np.random.get_state()  # noqa: NPY002
    np.random.seed(seed)  # noqa: NPY002
    try:
        yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


def _check_common(
    model: str,
    x_dim: int,
    y_dim: int,
    blocks: int,
    hidden: int,
    subnet_layers: int,
    cond_hidden: int,
) -> None:
    if x_dim < 2:
        raise ValueError(
            f"{model} needs x_dim >= 2 (its coupling blocks split x into two non-empty "
            f"halves), got x_dim={x_dim}; for one-dimensional x use zuko-maf, zuko-nsf, "
            f"nflows-maf or nflows-nsf"
        )
    check_conditional_dims(model, x_dim, y_dim)
    check_at_least(
        blocks=blocks,
        hidden=hidden,
        subnet_layers=(subnet_layers, 0),
        cond_hidden=(cond_hidden, 0),
    )
