"""One contract, every registered model: shapes, gradients, flows' maths, save/load, errors.

Each model is fitted once per module on a small toy problem, with tiny networks, so the
whole file runs in seconds. A model whose backend is not installed is skipped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flowrecon as fr
from flowrecon import registry
from flowrecon.base import NotFittedError
from flowrecon.guard import Support

X_DIM, Y_DIM = 3, 2

#: Small sizes applied to whichever of these hyper-parameters a builder has.
TINY = {
    "hidden": 16,
    "hidden_dim": 8,
    "latent_dim": 4,
    "num_layers": 2,
    "blocks": 2,
    "transforms": 2,
    "residual_blocks": 1,
    "hidden_layers": 1,
    "subnet_layers": 1,
    "bins": 4,
}


def tiny_hparams(name: str, x_dim: int = X_DIM) -> dict:
    defaults = registry.hparam_defaults(name)
    tiny = {k: v for k, v in TINY.items() if k in defaults}
    if "particle_dim" in defaults:  # the particle flow: x is one particle of x_dim axes
        tiny.update(particle_dim=x_dim, rounds=1)
    return tiny


def installed(name: str):
    return pytest.param(
        name,
        marks=pytest.mark.skipif(
            not registry.is_installed(name), reason=f"{name}: backend missing"
        ),
    )


ALL = [installed(name) for name in registry.MODELS]
FLOWS = [installed(name) for name, spec in registry.MODELS.items() if spec.has_density]


def toy(n: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, Y_DIM))
    x = y @ np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]) + 0.5 * rng.normal(size=(n, X_DIM))
    return x, y


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return toy()


@pytest.fixture(scope="module")
def fitted(data) -> dict[str, fr.ConditionalGenerator]:
    cache: dict[str, fr.ConditionalGenerator] = {}

    def get(name: str) -> fr.ConditionalGenerator:
        if name not in cache:
            x, y = data
            model = fr.make(name, device="cpu", **tiny_hparams(name))
            cache[name] = model.fit(x, y, epochs=2, batch_size=64, quiet=True)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ALL)
def test_sample_shapes_and_values(name, fitted, data) -> None:
    model = fitted(name)
    _, y = data
    s = model.sample(y[:4], n=3)
    assert isinstance(s, np.ndarray) and s.shape == (3, 4, X_DIM) and np.isfinite(s).all()
    assert model.sample(y[0], n=5).shape == (5, X_DIM)
    yt = torch.as_tensor(y[:6], dtype=torch.float32).reshape(2, 3, Y_DIM)
    st = model.sample(yt, n=2)
    assert isinstance(st, torch.Tensor) and st.shape == (2, 2, 3, X_DIM)
    assert st.dtype == torch.float32
    assert model.sample(y[:5], n=4, max_chunk=4).shape == (4, 5, X_DIM)
    assert model.sample(y[:2], n=7, max_chunk=3).shape == (7, 2, X_DIM)  # n itself chunked


@pytest.mark.parametrize("name", ALL)
def test_sample_diagnostics_and_finite_samples_everywhere(name, fitted, data) -> None:
    model = fitted(name)
    _, y = data
    d = model.sample(y[:6].reshape(2, 3, Y_DIM), n=5, seed=0, return_diagnostics=True)
    plain = model.sample(y[:6].reshape(2, 3, Y_DIM), n=5, seed=0)
    np.testing.assert_array_equal(d.samples, plain)
    assert d.redrawn.shape == d.unresolved.shape == d.condition_log_prob.shape == (2, 3)
    assert d.redrawn.dtype == np.int64 and d.in_domain.dtype == bool
    assert (d.unresolved <= d.redrawn).all() and (d.redrawn <= 5).all()
    np.testing.assert_array_equal(d.in_domain, model.in_domain(y[:6]).reshape(2, 3))
    # Conditions far beyond the training ones: finite samples inside the sane region of
    # model space, and every event flagged.
    far = np.array([[30.0, -30.0], [0.0, 200.0], [-1e4, 5.0]])
    d = model.sample(far, n=50, seed=0, return_diagnostics=True)
    assert np.isfinite(d.samples).all() and not d.in_domain.any()
    x_model = model.preprocessing_.encode_x(
        torch.as_tensor(d.samples).reshape(-1, X_DIM), torch.as_tensor(far).repeat(50, 1)
    )
    # Draws projected onto the region's edge may leave it by rounding in the round trip.
    s = model.support_
    edge = Support(s.lo - 1e-4, s.hi + 1e-4, s.radius * (1 + 1e-6))
    assert edge.inside(x_model).all()


def test_sampling_in_chunks_keeps_the_layout(fitted, data, monkeypatch) -> None:
    model = fitted("cvae")
    _, y = data
    width = model.preprocessing_.model_x_dim

    def fake(n: int, ym: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        # Deterministic: sample i of condition b is i + (b's first model-space column).
        return (torch.arange(n)[:, None] + ym[:, 0]).unsqueeze(-1).expand(n, -1, width)

    monkeypatch.setattr(model.estimator_, "sample", fake)
    whole = model.sample(y[:7], n=3)
    np.testing.assert_allclose(model.sample(y[:7], n=3, max_chunk=6), whole)  # 2 conditions
    # n chunked too: the fake restarts its count in each chunk of 2 draws.
    np.testing.assert_allclose(model.sample(y[:7], n=3, max_chunk=2), whole[[0, 1, 0]])
    assert len(np.unique(whole[0, :, 0])) == 7


@pytest.mark.parametrize("name", FLOWS)
def test_log_prob_shapes_broadcasting_and_gradients(name, fitted, data) -> None:
    model = fitted(name)
    x, y = data
    lp = model.log_prob(x[:4], y[:4])
    assert lp.shape == (4,) and np.isfinite(lp).all()
    samples = model.sample(y[:4], n=3)
    assert model.log_prob(samples, y[:4]).shape == (3, 4)
    xt = torch.as_tensor(x[:4]).requires_grad_()
    model.log_prob(xt, torch.as_tensor(y[:4])).sum().backward()
    assert xt.grad is not None and torch.isfinite(xt.grad).all()


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name) -> None:
    torch.manual_seed(0)
    # The particle flow's neighbour map needs two particles to be heard at all.
    width = 2 * X_DIM if "particle_dim" in registry.hparam_defaults(name) else X_DIM
    est = registry.build_estimator(name, width, Y_DIM, **tiny_hparams(name))
    with torch.no_grad():  # move zero-initialised layers off zero, so every path is live
        for p in est.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(16, width), torch.randn(16, Y_DIM)
    est.loss(x, y)["loss"].backward()
    for pname, p in est.named_parameters():
        assert p.grad is not None, f"no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {pname}"
        assert p.grad.abs().sum() > 0, f"zero gradient in {pname}"
    # Physics terms need samples that carry gradients.
    assert est.sample(2, y).requires_grad


@pytest.mark.parametrize("name", FLOWS)
def test_flow_inverse_and_log_det_against_autograd(name) -> None:
    torch.manual_seed(1)
    est = registry.build_estimator(name, X_DIM, Y_DIM, **tiny_hparams(name)).double()
    with torch.no_grad():
        for p in est.parameters():
            p.add_(0.1 * torch.randn_like(p))
    est.eval()
    if not hasattr(est, "to_latent"):
        pytest.skip(f"{name} does not expose to_latent")
    x, y = torch.randn(5, X_DIM, dtype=torch.float64), torch.randn(5, Y_DIM, dtype=torch.float64)
    z, ladj = est.to_latent(x, y)
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(
            lambda row, i=i: est.to_latent(row[None], y[i : i + 1])[0][0], x[i]
        )
        assert torch.linalg.slogdet(jac).logabsdet.item() == pytest.approx(ladj[i].item(), abs=1e-6)
    # log_prob is the standard normal at z plus log|det dz/dx| (the documented convention).
    normal = -0.5 * (z.square().sum(-1) + X_DIM * math.log(2 * math.pi))
    torch.testing.assert_close(est.log_prob(x, y), normal + ladj)
    # Invertibility: with one sample per condition every backend draws its noise as a
    # (B, D) block of standard normals; mapping the samples back recovers that block.
    # (float32: nflows draws its noise in the default dtype.)
    est, y = est.float(), y.float()
    torch.manual_seed(7)
    xs = est.sample(1, y)[0]
    torch.manual_seed(7)
    noise = torch.randn(5, X_DIM)
    torch.testing.assert_close(est.to_latent(xs, y)[0], noise, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FLOWS)
def test_log_prob_integrates_to_one_in_user_space(name) -> None:
    # A 2-D toy with correlated, shifted, scaled x: the integral over the user's space
    # checks the flow's log-det and the preprocessing's (scaler, whitening) together.
    rng = np.random.default_rng(0)
    y = rng.normal(size=(200, 1))
    e = rng.normal(size=(200, 2))
    x = np.column_stack([3.0 + y[:, 0] + e[:, 0], 0.5 * e[:, 1] + 0.3 * e[:, 0]])
    model = fr.make(name, device="cpu", **tiny_hparams(name, 2)).fit(x, y, epochs=2, quiet=True)
    g = np.linspace(-9, 15, 121)
    h = np.linspace(-6, 6, 61)
    gx, gy = np.meshgrid(g, h, indexing="ij")
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    for cond, temperature in ((-1.0, None), (0.5, None), (0.5, 0.7)):
        lp = model.log_prob(grid, np.full((len(grid), 1), cond), temperature=temperature)
        integral = np.exp(lp).sum() * (g[1] - g[0]) * (h[1] - h[0])
        assert integral == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("name", ALL)
def test_temperature_scales_the_spread_of_samples(name, fitted, data) -> None:
    model = fitted(name)
    _, y = data
    wide = model.sample(y[:20], n=200, seed=1, temperature=1.0)
    narrow = model.sample(y[:20], n=200, seed=1, temperature=0.3)
    assert narrow.std(0).mean() < 0.6 * wide.std(0).mean(), name
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        model.sample(y[:2], n=2, temperature=0.0)


def test_calibrate_brings_held_out_coverage_to_the_level() -> None:
    from flowrecon.evaluation.metrics import central_interval_coverage

    def data(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        y = rng.normal(size=(n, Y_DIM))
        return y @ np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]) + noise * rng.normal(
            size=(n, X_DIM)
        ), y

    # Trained where x scatters by 0.5, used where it scatters by 0.2: far too wide.
    name = next(n for n, s in registry.MODELS.items() if s.has_density and registry.is_installed(n))
    model = fr.make(name, device="cpu", **tiny_hparams(name))
    model.fit(*data(2000, 0.5, 1), epochs=5, batch_size=64, quiet=True, calibrate=False)
    assert model.temperature_ == 1.0
    xt, yt = data(600, 0.2, 3)
    before = central_interval_coverage(model.sample(yt, n=100, seed=0), xt, 0.9)
    temperature = model.calibrate(*data(600, 0.2, 2), n=100, max_rows=600)
    after = central_interval_coverage(model.sample(yt, n=100, seed=0), xt, 0.9)
    assert temperature == model.temperature_ < 0.8
    assert abs(after - 0.9) < 0.03 < abs(before - 0.9), (before, after)


def test_coverage_and_scale_on_known_gaussians() -> None:
    from flowrecon.base import _coverage_and_scale

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(4000, 2))
    draws = 2.0 * rng.normal(size=(200, 4000, 2))  # twice as wide as the truth's spread
    coverage, scale = _coverage_and_scale(draws, truth, 0.9)
    assert coverage == pytest.approx(0.99, abs=0.01)  # P(|N(0,1)| < 2 * 1.645)
    assert scale == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("name", ALL)
def test_save_load_reproduces_seeded_samples(name, fitted, data, tmp_path) -> None:
    model = fitted(name)
    x, y = data
    s1 = model.sample(y[:6], n=4, seed=3)
    np.testing.assert_array_equal(s1, model.sample(y[:6], n=4, seed=3))
    assert not np.array_equal(s1, model.sample(y[:6], n=4, seed=4))
    path = tmp_path / "run" / "model.pt"
    model.save(path)
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temporary file
    torch.load(path, weights_only=True)  # tensors and plain values only
    loaded = fr.load(path, device="cpu")
    np.testing.assert_array_equal(loaded.sample(y[:6], n=4, seed=3), s1)
    if loaded.has_density:
        np.testing.assert_array_equal(loaded.log_prob(x[:6], y[:6]), model.log_prob(x[:6], y[:6]))
    assert loaded.history_.to_dict() == model.history_.to_dict()
    assert loaded.temperature_ == model.temperature_
    assert (loaded.model_, loaded.hparams_) == (model.model_, model.hparams_)
    assert (
        loaded.hparams_full_
        == model.hparams_full_
        == {
            **registry.hparam_defaults(name),
            **model.hparams_,
        }
    )
    # The sane region and the condition density come back too.
    far = np.vstack([y[:4], [[30.0, -30.0]]])
    a, b = (m.sample(far, n=4, seed=3, return_diagnostics=True) for m in (model, loaded))
    for field in a._fields:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(loaded.condition_log_prob(y), model.condition_log_prob(y))
    torch.testing.assert_close(loaded.support_.lo, model.support_.lo)


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_raise_with_clear_messages(name, fitted, data) -> None:
    model = fitted(name)
    x, y = data
    with pytest.raises(
        ValueError, match="y must have 2 columns like the training condition, got 3"
    ):
        model.sample(np.zeros((4, 3)), n=2)
    with pytest.raises(ValueError, match="y contains NaN or Inf in 1 rows \\(first: 2\\)"):
        model.sample(np.where(np.arange(4)[:, None] == 2, np.nan, y[:4]), n=2)
    with pytest.raises(ValueError, match="x and y must have the same number of rows, got 10 and 9"):
        fr.make(name, **tiny_hparams(name)).fit(x[:10], y[:9])
    with pytest.raises(ValueError, match="x must be 2-D"):
        fr.make(name, **tiny_hparams(name)).fit(x[:, 0], y)
    if model.has_density:
        with pytest.raises(
            ValueError, match="x must have 3 columns like the training target, got 4"
        ):
            model.log_prob(np.zeros((4, 4)), y[:4])
    else:
        with pytest.raises(ValueError, match="has no tractable density"):
            model.log_prob(x[:4], y[:4])


@pytest.mark.parametrize("name", ALL)
def test_use_before_fit_raises(name) -> None:
    model = fr.make(name, **tiny_hparams(name))
    with pytest.raises(NotFittedError, match="not fitted yet: call fit"):
        model.sample(np.zeros((2, Y_DIM)))
    with pytest.raises(NotFittedError, match="not fitted"):
        model.save("never-written.pt")


@pytest.mark.parametrize("name", ALL)
def test_unknown_hyper_parameter_lists_valid_ones(name) -> None:
    valid = list(registry.hparam_defaults(name))
    typo = valid[0] + "s"
    with pytest.raises(
        ValueError, match=f"unknown hyper-parameter '{typo}'.*Did you mean '{valid[0]}'"
    ):
        fr.make(name, **{typo: 1})
    with pytest.raises(ValueError, match="Valid: " + ", ".join(valid)):
        fr.make(name, not_a_parameter=1)


def test_bad_generator_options_fail_in_make() -> None:
    with pytest.raises(ValueError, match="unknown scaler 'zscore'"):
        fr.make("cvae", x_scaler="zscore")
    with pytest.raises(ValueError, match="unknown transform 'frame'"):
        fr.make("cvae", transform="frame")
    with pytest.raises(ValueError, match="unknown device"):
        fr.make("cvae", device="gpu0")


def test_builder_errors_name_the_model_space_width() -> None:
    # Two collinear columns: whitening keeps one, too few for coupling blocks.
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 1))
    u = y[:, 0] + rng.normal(size=50)
    x = np.column_stack([u, 2 * u])
    with pytest.raises(ValueError, match="x has 1 columns, whitening dropped 1 null directions"):
        fr.make("freia-cinn", blocks=1, hidden=8).fit(x, y, epochs=1)


def test_same_seed_same_fit(data) -> None:
    x, y = data
    a, b = (
        fr.make("cvae", hidden_dim=8, latent_dim=2, seed=5).fit(x, y, epochs=2, quiet=True)
        for _ in "ab"
    )
    np.testing.assert_array_equal(a.sample(y[:3], n=2, seed=0), b.sample(y[:3], n=2, seed=0))
    assert a.history_.train == b.history_.train


def test_unknown_model_suggests_the_closest_name() -> None:
    with pytest.raises(ValueError, match="unknown model 'zuko-nfs'. Did you mean 'zuko-nsf'"):
        fr.make("zuko-nfs")
    with pytest.raises(ValueError, match="Valid models: cvae, freia-allinone"):
        fr.make("nothing-like-it")


def test_available_models_lists_every_registered_model() -> None:
    listed = fr.available_models()
    assert [m["name"] for m in listed] == list(registry.MODELS)
    assert all(
        set(m) == {"name", "backend", "installed", "has_density", "description", "aliases"}
        for m in listed
    )
    assert {m["name"]: m["has_density"] for m in listed}["cvae"] is False


@pytest.mark.parametrize(
    ("short", "model"),
    [("cinn", "freia-cinn"), ("nsf", "zuko-nsf"), ("maf", "zuko-maf"),
     ("realnvp", "zuko-realnvp"), ("allinone", "freia-allinone"), ("ZUKO-NSF", "zuko-nsf")],
)  # fmt: skip
def test_short_names_and_any_case_resolve_to_registered_models(short: str, model: str) -> None:
    assert registry.resolve(short)[0] == model
    assert short in registry.ALIASES or short.lower() == model
    if short in registry.ALIASES:
        listed = {m["name"]: m["aliases"] for m in fr.available_models()}
        assert short in listed[model]


def test_unknown_name_in_capitals_gets_a_suggestion() -> None:
    with pytest.raises(ValueError, match="Did you mean 'zuko-nsf'"):
        fr.make("ZUKO-NFS")


def test_presets_resolve_to_valid_hyper_parameters() -> None:
    for name, preset in registry.PRESETS.items():
        model, hparams, training = registry.resolve(name)
        assert model == preset.model and hparams == preset.hparams
        assert set(training) <= set(fr.make(name).training) | set(
            __import__("flowrecon.training", fromlist=["x"]).training_options()
        )
    model, hparams, training = registry.resolve("cvae-seed", {"latent_dim": 8})
    assert hparams["latent_dim"] == 8 and training["clip_grad"] == 5.0
    seed_cvae = registry.build_estimator("cvae", 9, 9, **registry.PRESETS["cvae-seed"].hparams)
    widths = [m.out_features for m in seed_cvae.encoder if isinstance(m, torch.nn.Linear)]
    assert widths == [256, 512, 1024, 2 * 1024]
    cinn = registry.build_estimator(
        "freia-cinn", 4, 3, **{**registry.PRESETS["freia-cinn-proposal"].hparams, "hidden": 8}
    )
    assert len(cinn.inn.module_list) == 40  # 20 couplings, each followed by a flip


def test_coerce_hparams_from_strings() -> None:
    assert registry.coerce_hparams(
        "cvae", {"hidden_dim": "64", "beta": "0.5", "activation": "elu"}
    ) == {
        "hidden_dim": 64,
        "beta": 0.5,
        "activation": "elu",
    }
    with pytest.raises(ValueError, match="'latent_sampling'.*not one of"):
        registry.coerce_hparams("cvae", {"latent_sampling": "posterior"})


def test_cvae_latent_sampling_from_training_statistics(data) -> None:
    x, y = data
    model = fr.make("cvae", hidden_dim=8, latent_dim=4, latent_sampling="train_stats", device="cpu")
    model.fit(x, y, epochs=2, quiet=True)
    est = model.estimator_
    # The statistics are those of the encoder means over the training rows, set after fit.
    assert not torch.equal(est.latent_std, torch.ones(4))
    assert torch.all(est.latent_std > 0)
    assert model.sample(y[:3], n=2).shape == (2, 3, X_DIM)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL)
def test_cuda_fit_sample_and_cross_device_load(name, data, tmp_path) -> None:
    x, y = data
    model = fr.make(name, device="cuda", **tiny_hparams(name)).fit(x, y, epochs=1, quiet=True)
    assert next(model.estimator_.parameters()).is_cuda
    yt = torch.as_tensor(y[:4], device="cuda")
    assert model.sample(yt, n=2).is_cuda
    s = model.sample(y[:4], n=2, seed=0)
    assert isinstance(s, np.ndarray)
    model.save(tmp_path / "m.pt")
    on_cpu = fr.load(tmp_path / "m.pt", device="cpu")
    assert on_cpu.sample(y[:4], n=2).shape == s.shape
    if model.has_density:
        np.testing.assert_allclose(
            on_cpu.log_prob(x[:4], y[:4]), model.log_prob(x[:4], y[:4]), atol=1e-4
        )
