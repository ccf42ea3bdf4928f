"""Backend-specific tests of the FrEIA, nflows, zuko and cVAE estimators (small, fast).

Every adapter exposes ``to_latent(x, y) -> (z, log|det dz/dx|)``, so the density convention
of ``flowrecon.models._estimator`` is checked the same way for all of them: the
log-determinant against autograd, and ``log_prob = log N(z; 0, I) + log|det dz/dx|``.
"""

import inspect
import math
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
import torch

from flowrecon import nn as nn_module
from flowrecon.models import freia
from flowrecon.models import nflows as nflows_backend
from flowrecon.models import zuko as zuko_backend
from flowrecon.models._estimator import Estimator

X_DIM, Y_DIM, BATCH = 3, 2, 8

BUILDERS: dict[str, Callable[..., Estimator]] = {
    "freia-cinn": partial(freia.build_cinn, blocks=3, hidden=16),
    "freia-cinn-affine-flip": partial(
        freia.build_cinn, blocks=4, hidden=16, coupling="affine", permute="flip"
    ),
    "freia-cinn-rnvp-embed": partial(
        freia.build_cinn, blocks=2, hidden=16, coupling="rnvp", cond_hidden=8
    ),
    "freia-allinone": partial(freia.build_allinone, blocks=3, hidden=16),
    "nflows-maf": partial(nflows_backend.build_maf, transforms=2, hidden=16),
    "nflows-nsf": partial(nflows_backend.build_nsf, transforms=2, hidden=16, tail_bound=4.0),
    "zuko-nsf": partial(zuko_backend.build_nsf, transforms=2, hidden=16),
    "zuko-maf": partial(zuko_backend.build_maf, transforms=2, hidden=16),
    "zuko-realnvp": partial(zuko_backend.build_realnvp, transforms=2, hidden=16),
    # The libraries' own affine steps, still available with bounded=False.
    "nflows-maf-unbounded": partial(
        nflows_backend.build_maf, transforms=2, hidden=16, bounded=False
    ),
    "zuko-maf-unbounded": partial(zuko_backend.build_maf, transforms=2, hidden=16, bounded=False),
    "zuko-realnvp-unbounded": partial(
        zuko_backend.build_realnvp, transforms=2, hidden=16, bounded=False
    ),
    "freia-cinn-unbounded": partial(freia.build_cinn, blocks=3, hidden=16, bounded=False),
}
FREIA = [name for name in BUILDERS if name.startswith("freia")]
# The public builders under their registry names.
PUBLIC_BUILDERS = [
    pytest.param(builder, id=name)
    for name, builder in {
        "freia-cinn": freia.build_cinn,
        "freia-allinone": freia.build_allinone,
        "nflows-maf": nflows_backend.build_maf,
        "nflows-nsf": nflows_backend.build_nsf,
        "zuko-nsf": zuko_backend.build_nsf,
        "zuko-maf": zuko_backend.build_maf,
        "zuko-realnvp": zuko_backend.build_realnvp,
    }.items()
]


def make(
    name: str, x_dim: int = X_DIM, y_dim: int = Y_DIM, dtype=torch.float32, scale: float = 0.1
) -> Estimator:
    """A small model whose parameters are moved off their initial values.

    FrEIA subnets and nflows-maf start with a zero last layer (identity); perturbing every
    parameter makes the Jacobian and gradient checks non-trivial.
    """
    torch.manual_seed(0)
    model = BUILDERS[name](x_dim, y_dim).to(dtype)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.add_(scale * noise)
    return model


def data(x_dim: int = X_DIM, y_dim: int = Y_DIM, dtype=torch.float32):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, x_dim, generator=generator, dtype=dtype)
    y = torch.randn(BATCH, y_dim, generator=generator, dtype=dtype)
    return x, y


def latent_jacobian(model: Estimator, x0: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """dz/dx ``(D, D)`` of one event, by autograd."""
    return torch.autograd.functional.jacobian(lambda v: model.to_latent(v[None], y0)[0][0], x0[0])


def normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)


@pytest.mark.parametrize("name", BUILDERS)
def test_shapes_finite_and_no_graph_under_no_grad(name):
    model = make(name)
    x, y = data()
    samples = model.sample(5, y)
    assert samples.shape == (5, BATCH, X_DIM)
    log_prob = model.log_prob(x, y)
    assert log_prob.shape == (BATCH,)
    assert torch.isfinite(samples).all() and torch.isfinite(log_prob).all()
    losses = model.loss(x, y)
    assert set(losses) >= {"loss", "nll"} and losses["loss"].dim() == 0
    with torch.no_grad():
        assert not model.sample(5, y).requires_grad
        assert not model.log_prob(x, y).requires_grad


@pytest.mark.parametrize("name", BUILDERS)
def test_log_prob_is_base_density_plus_log_det(name):
    # Checks the sign convention and that the N(0, I) constant is included.
    model = make(name, dtype=torch.float64)
    x, y = data(dtype=torch.float64)
    z, ladj = model.to_latent(x, y)
    assert z.shape == x.shape and ladj.shape == (BATCH,)
    torch.testing.assert_close(model.log_prob(x, y), normal_log_prob(z) + ladj)


@pytest.mark.parametrize("name", FREIA)
def test_freia_log_prob_matches_library_forward_pass(name):
    model = make(name)
    x, y = data()
    z, log_jac_det = model.inn(x, c=[model.condition_net(y)])
    torch.testing.assert_close(model.log_prob(x, y), normal_log_prob(z) + log_jac_det)


@pytest.mark.parametrize("name", BUILDERS)
def test_log_det_matches_autograd_jacobian(name):
    model = make(name, dtype=torch.float64)
    x, y = data(dtype=torch.float64)
    x0, y0 = x[:1], y[:1]
    _, expected = torch.linalg.slogdet(latent_jacobian(model, x0, y0))
    torch.testing.assert_close(model.to_latent(x0, y0)[1][0], expected)


@pytest.mark.parametrize("name", BUILDERS)
def test_sample_follows_the_dtype(name):
    model = make(name, dtype=torch.float64)
    _, y = data(dtype=torch.float64)
    assert model.sample(2, y).dtype == torch.float64


@pytest.mark.parametrize("name", [n for n in BUILDERS if n.startswith("nflows")])
def test_nflows_sample_is_sample_first_version_of_library_sample(name):
    # Same noise, same flow: the adapter's (n, B, D) is nflows' (B, n, D) transposed.
    model = make(name)
    _, y = data()
    torch.manual_seed(3)
    ours = model.sample(4, y)
    torch.manual_seed(3)
    theirs = model.flow.sample(4, context=y)
    assert theirs.shape == (BATCH, 4, X_DIM)
    torch.testing.assert_close(ours, theirs.transpose(0, 1))


@pytest.mark.parametrize("name", BUILDERS)
def test_round_trip_through_the_latent_space(name):
    model = make(name, dtype=torch.float64)
    x, y = data(dtype=torch.float64)
    z, _ = model.to_latent(x, y)
    torch.testing.assert_close(model.from_latent(z, y), x)


@pytest.mark.parametrize("name", FREIA)
def test_freia_reverse_pass_reports_minus_log_det(name):
    model = make(name, dtype=torch.float64)
    x, y = data(dtype=torch.float64)
    z, ladj = model.to_latent(x, y)
    _, rev_ladj = model.inn(z, c=[model.condition_net(y)], rev=True)
    torch.testing.assert_close(rev_ladj, -ladj)


@pytest.mark.parametrize("name", [*FREIA, "nflows-maf", "nflows-maf-unbounded"])
def test_fresh_network_is_identity_up_to_permutation(name):
    # Zero-initialised last layers: the flow is a permutation, so log_prob is exactly the
    # standard normal density of x, constant included.
    torch.manual_seed(0)
    model = BUILDERS[name](X_DIM, Y_DIM)
    x, y = data()
    torch.testing.assert_close(model.log_prob(x, y), normal_log_prob(x))


@pytest.mark.parametrize("builder", [p for p in PUBLIC_BUILDERS if not p.id.endswith("nsf")])
def test_fresh_default_model_samples_moderate_values(builder):
    # Loss terms on samples are computed from the first step on: an untrained flow must
    # not draw huge values (nflows' own MAF initialisation drew up to 1e14 here). Spline
    # flows are left out: they map [-B, B] onto itself and are the identity outside.
    torch.manual_seed(0)
    model = builder(9, 9)
    with torch.no_grad():
        samples = model.sample(50, torch.randn(2, 9))
    assert samples.abs().max() < 20


@pytest.mark.parametrize("name", BUILDERS)
def test_density_integrates_to_one(name):
    # An independent check of every constant: integrate exp(log_prob) on a 2-D grid.
    # A mild perturbation keeps the density smooth enough for a 0.1 grid step.
    model = make(name, x_dim=2, dtype=torch.float64, scale=0.03)
    axis = torch.linspace(-7.0, 7.0, 141, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    y = torch.full((len(grid), Y_DIM), 0.3, dtype=torch.float64)
    with torch.no_grad():
        density = model.log_prob(grid, y).exp()
    step = float(axis[1] - axis[0])
    assert float(density.sum()) * step**2 == pytest.approx(1.0, abs=5e-3)


@pytest.mark.parametrize("name", BUILDERS)
def test_gradients_reach_every_parameter(name):
    model = make(name)
    x, y = data()
    model.loss(x, y)["loss"].backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", BUILDERS)
def test_samples_are_differentiable(name):
    # Physics loss terms on samples need gradients through the sampler.
    model = make(name)
    _, y = data()
    model.sample(3, y).pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", BUILDERS)
def test_one_optimiser_step_over_all_parameters(name):
    model = make(name)
    x, y = data()
    assert all(p.requires_grad and p.is_floating_point() for p in model.parameters())
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.loss(x, y)["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimiser.step()
    assert torch.isfinite(model.log_prob(x, y)).all()


@pytest.mark.parametrize("name", BUILDERS)
def test_state_dict_round_trip_reproduces_the_model(name):
    # A rebuilt model with other random weights and permutations becomes the saved one.
    model = make(name)
    torch.manual_seed(123)
    kwargs = {"permutation_seed": 7} if name in FREIA else {}
    other = BUILDERS[name](X_DIM, Y_DIM, **kwargs)
    other.load_state_dict(model.state_dict())
    x, y = data()
    torch.testing.assert_close(other.log_prob(x, y), model.log_prob(x, y))
    torch.manual_seed(5)
    expected = model.sample(4, y)
    torch.manual_seed(5)
    torch.testing.assert_close(other.sample(4, y), expected)


def test_freia_permutations_are_seeded_and_leave_numpy_alone():
    # FrEIA draws from numpy's legacy global generator: building must not disturb it.
    np.random.seed(42)  # noqa: NPY002
    expected_draw = np.random.rand()  # noqa: NPY002
    np.random.seed(42)  # noqa: NPY002
    first = freia.build_cinn(9, 2, blocks=4, hidden=4, permutation_seed=3)
    assert np.random.rand() == expected_draw  # noqa: NPY002
    second = freia.build_cinn(9, 2, blocks=4, hidden=4, permutation_seed=3)
    third = freia.build_cinn(9, 2, blocks=4, hidden=4, permutation_seed=4)

    def perms(model):
        return [b for k, b in model.named_buffers() if k.endswith(".perm")]

    assert all(torch.equal(a, b) for a, b in zip(perms(first), perms(second), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(perms(first), perms(third), strict=True))
    # One seeded stream: the blocks get different permutations.
    assert len({tuple(p.tolist()) for p in perms(first)}) > 1


@pytest.mark.parametrize("x_dim", [3, 7, 9])
def test_affine_flip_transforms_every_feature(x_dim):
    # The seed documents' network: one-sided affine couplings each followed by a flip.
    # Had a feature never been in the transformed half, its Jacobian row would be a unit
    # vector.
    torch.manual_seed(0)
    model = make_affine_flip(x_dim)
    x0, y0 = torch.randn(1, x_dim, dtype=torch.float64), torch.randn(1, Y_DIM).double()
    jacobian = latent_jacobian(model, x0, y0)
    unit_rows = (jacobian - torch.eye(x_dim, dtype=torch.float64)).abs().sum(1) < 1e-12
    assert not unit_rows.any()


def make_affine_flip(x_dim: int) -> Estimator:
    model = freia.build_cinn(
        x_dim, Y_DIM, blocks=20, hidden=8, coupling="affine", permute="flip"
    ).double()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("builder", [freia.build_cinn, freia.build_allinone])
def test_freia_rejects_one_dimensional_x(builder):
    with pytest.raises(ValueError, match=r"x_dim >= 2"):
        builder(1, Y_DIM)


@pytest.mark.parametrize("name", [n for n in BUILDERS if n not in FREIA])
def test_one_dimensional_x_works_elsewhere(name):
    model = make(name, x_dim=1)
    x, y = data(x_dim=1)
    assert model.sample(4, y).shape == (4, BATCH, 1)
    log_prob = model.log_prob(x, y)
    assert log_prob.shape == (BATCH,) and torch.isfinite(log_prob).all()


@pytest.mark.parametrize(
    ("builder", "hparam", "listed"),
    [
        (freia.build_cinn, "coupling", "'glow', 'affine', 'rnvp'"),
        (freia.build_cinn, "permute", "'random', 'flip'"),
        (freia.build_cinn, "clamp_activation", "'atan'"),
        (freia.build_allinone, "global_affine_type", "'softplus'"),
        *[(p.values[0], "activation", "'relu'") for p in PUBLIC_BUILDERS],
    ],
)
def test_unknown_choice_lists_valid_ones(builder, hparam, listed):
    with pytest.raises(ValueError, match=rf"unknown {hparam}='bogus'.*{listed}"):
        builder(X_DIM, Y_DIM, **{hparam: "bogus"})


@pytest.mark.parametrize("builder", PUBLIC_BUILDERS)
def test_invalid_sizes_are_rejected(builder):
    first_size = "blocks" if builder.__module__.endswith("freia") else "transforms"
    with pytest.raises(ValueError, match=first_size):
        builder(X_DIM, Y_DIM, **{first_size: 0})
    with pytest.raises(ValueError, match="y_dim >= 1"):
        builder(X_DIM, 0)


@pytest.mark.parametrize("builder", PUBLIC_BUILDERS)
def test_builder_signature_is_registry_ready(builder):
    # The registry reads hyper-parameters, defaults and types with inspect.signature and
    # the CLI prints the docstring's Args section.
    params = list(inspect.signature(builder).parameters.values())
    assert [p.name for p in params[:2]] == ["x_dim", "y_dim"]
    doc = inspect.getdoc(builder)
    for param in params[2:]:
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, param.name
        assert param.default is not inspect.Parameter.empty, param.name
        assert param.annotation in (int, float, str, bool), param.name
        assert isinstance(param.default, param.annotation), param.name
        assert f"\n    {param.name}: " in doc, param.name


# -- bounded samples -------------------------------------------------------------------


def _wild(builder: Callable[..., Estimator], scale: float) -> Estimator:
    """A model whose every parameter is large: the worst a rare condition can meet."""
    torch.manual_seed(0)
    model = builder(4, 2)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(scale * torch.randn_like(param))
    return model


AFFINE = (nn_module.AFFINE_MAX_EXPANSION, nn_module.AFFINE_MAX_LOC)


@pytest.mark.parametrize(
    ("name", "layers", "expansion", "shift"),
    [
        ("zuko-maf", 2, *AFFINE),
        ("zuko-realnvp", 2, *AFFINE),
        ("nflows-maf", 2, *AFFINE),
        ("freia-cinn", 3, 2.0, freia.FREIA_MAX_SHIFT),  # clamp 2: |s| <= 2
    ],
)
def test_bounded_flows_cannot_run_away(name, layers, expansion, shift):
    y = 50 * torch.randn(64, 2)  # conditions far outside anything seen in training
    with torch.no_grad():
        bounded = _wild(BUILDERS[name], 30.0).sample(20, y)
        raw = _wild(BUILDERS[f"{name}-unbounded"], 30.0).sample(20, y)
    # Each sampling step maps |v| to at most (|v| + shift) exp(expansion), whatever its
    # conditioner sees.
    bound = 8.0  # beyond any of these 2,560 standard normal draws per feature
    for _ in range(layers):
        bound = (bound + shift) * math.exp(expansion)
    assert torch.isfinite(bounded).all() and bounded.abs().max() < bound
    assert not (torch.isfinite(raw).all() and raw.abs().max() < bound)  # the libraries' own


@pytest.mark.parametrize("name", ["zuko-nsf", "nflows-nsf"])
def test_spline_flows_are_bounded_by_construction(name):
    y = 50 * torch.randn(64, 2)
    torch.manual_seed(3)
    z = torch.randn(20, 64, 4)
    with torch.no_grad():
        samples = _wild(BUILDERS[name], 30.0).sample(20, y)
    assert torch.isfinite(samples).all()  # nflows' float32 inverse failed an assertion here
    assert samples.abs().max() <= max(float(z.abs().max()) + 2.0, 5.0)


# -- the cVAE ------------------------------------------------------------------------------


def test_cvae_gaussian_decoder_loss_is_a_negative_log_likelihood():
    from flowrecon.models.cvae import build_cvae

    torch.manual_seed(0)
    vae = build_cvae(3, 2, hidden_dim=8, num_layers=1, latent_dim=2)
    assert vae.decoder[-1].out_features == 6  # mean and log-variance per coordinate
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    with torch.no_grad():
        vae.decoder[-1].weight.zero_()
        vae.decoder[-1].bias.zero_()  # mean 0, log-variance 0: N(0, I)
        parts = vae.loss(x, y)
    nll = -torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1).mean()
    torch.testing.assert_close(parts["recon"], nll)
    old = build_cvae(3, 2, hidden_dim=8, num_layers=1, latent_dim=2, decoder="deterministic")
    assert old.decoder[-1].out_features == 3
    with pytest.raises(ValueError, match="unknown decoder='point'"):
        build_cvae(3, 2, decoder="point")


def test_cvae_samples_carry_the_noise_width():
    import flowrecon as fr

    rng = np.random.default_rng(0)
    y = rng.normal(size=(4000, 2))
    x = y @ np.array([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]) + 0.3 * rng.normal(size=(4000, 3))
    model = fr.make("cvae", hidden_dim=32, num_layers=2, latent_dim=2, device="cpu")
    model.fit(x, y, epochs=40, batch_size=256, lr=3e-3, quiet=True, calibrate=False)
    spread = model.sample(y[:200], n=200, seed=0).std(0).mean()
    assert spread == pytest.approx(0.3, rel=0.25)


def test_cvae_beta_nll_weights_each_term_by_its_variance_and_temperature_scales_the_noise():
    from flowrecon.models.cvae import build_cvae

    torch.manual_seed(0)
    vae = build_cvae(3, 2, hidden_dim=8, num_layers=1, latent_dim=2, nll_beta=0.5)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    with torch.no_grad():
        vae.decoder[-1].weight.zero_()
        vae.decoder[-1].bias.zero_()
        v = math.log(4.0)  # variance 4, weight 4^0.5 = 2; the raw output is soft-clamped
        vae.decoder[-1].bias[3:] = v / (1 - v / 10.0)
        parts = vae.loss(x, y)
    nll = -torch.distributions.Normal(0.0, 2.0).log_prob(x).sum(-1).mean()
    torch.testing.assert_close(parts["recon"], 2.0 * nll)
    with torch.no_grad():  # the decoder's noise is what the temperature scales
        wide, narrow = (vae.sample(4000, y[:1], temperature=t) for t in (1.0, 0.5))
    assert float(wide.std()) == pytest.approx(2.0, rel=0.05)
    assert float(narrow.std()) == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="nll_beta must be in"):
        build_cvae(3, 2, nll_beta=2.0)
