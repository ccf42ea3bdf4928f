"""Search spaces of the hyper-parameter search: registry defaults, TOML overrides, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowrecon import registry
from flowrecon.registry import Choice, Range
from flowrecon.tune import SearchSpace, read_search_file

optuna = pytest.importorskip("optuna")


INSTALLED = [m for m in registry.MODELS if registry.is_installed(m)]


@pytest.mark.parametrize("model", INSTALLED)
def test_every_default_space_parses(model: str) -> None:
    space = SearchSpace.for_model(model, check=False)
    assert {"lr", "batch_size", "lr_schedule"} <= set(space.params)
    assert set(space.params) - space.training_keys <= set(registry.hparam_defaults(model))
    assert space.default_params()  # the defaults lie in the space: queued as trial 0


@pytest.mark.slow
@pytest.mark.parametrize("model", INSTALLED)
def test_every_default_space_builds_at_its_corners(model: str) -> None:
    SearchSpace.for_model(model)  # builds every choice and range end; raises if one fails


def test_toml_override_ranges_choices_and_fixed_values(tmp_path: Path) -> None:
    path = tmp_path / "tune.toml"
    path.write_text(
        "[search]\n"
        "hidden = {low = 64, high = 512, log = true}\n"
        'activation = ["relu", "elu"]\n'
        "lr = {low = 1e-4, high = 3e-3, log = true}\n"
        "transforms = 3\n"
        "batch_size = 512\n"
    )
    space = SearchSpace.for_model("zuko-nsf", read_search_file(path))
    assert space.params["hidden"] == Range(64, 512, True, None)
    assert "hidden" in space.int_params and "lr" not in space.int_params
    assert space.params["activation"] == Choice(("relu", "elu"))
    assert space.hparams["transforms"] == 3 and "transforms" not in space.params
    assert space.training["batch_size"] == 512 and "batch_size" not in space.params
    assert space.training_keys == {"lr", "lr_schedule"}


def test_fixed_options_leave_the_default_space() -> None:
    space = SearchSpace.for_model("zuko-maf", hparams={"hidden": 32}, training={"lr": 1e-3})
    assert "hidden" not in space.params and space.hparams["hidden"] == 32
    assert "lr" not in space.params and space.training["lr"] == 1e-3


def test_a_preset_fixes_what_is_not_searched() -> None:
    space = SearchSpace.for_model("freia-cinn-proposal", {"blocks": [4, 6], "hidden": 64})
    assert space.model == "freia-cinn"
    assert space.hparams["coupling"] == "affine" and space.hparams["permute"] == "flip"
    assert space.params["blocks"] == Choice((4, 6))


def test_suggested_configurations_are_valid_hparams() -> None:
    space = SearchSpace.for_model("zuko-nsf")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        hparams, training = space.suggest(study.ask())
        assert registry.coerce_hparams("zuko-nsf", hparams) == hparams
        assert 64 <= hparams["hidden"] <= 512 and isinstance(hparams["hidden"], int)
        assert 1e-4 <= training["lr"] <= 3e-3 and training["batch_size"] in (128, 256, 512, 1024)


def test_default_params_lie_in_the_space() -> None:
    space = SearchSpace.for_model("zuko-nsf", {"hidden": {"low": 200, "high": 300}})
    defaults = space.default_params()
    assert defaults["transforms"] == 5 and defaults["lr"] == 1e-3
    assert "hidden" not in defaults  # the default 128 is outside 200 .. 300


@pytest.mark.parametrize(
    ("search", "message"),
    [
        (
            {"hiden": [64]},
            "search.hiden: unknown parameter of model 'zuko-nsf'. Did you mean 'hidden'?",
        ),
        ({"hidden": {"low": 512, "high": 64}}, "search.hidden: low (512) must be below high (64)"),
        ({"hidden": {"low": 64, "high": 64}}, "search.hidden: low (64) must be below high (64)"),
        ({"hidden": {"low": 1.5, "high": 64}}, "search.hidden: low: expected an integer, got 1.5"),
        (
            {"hidden": {"low": 64}},
            "search.hidden: a range needs both low and high; high is missing",
        ),
        ({"hidden": {"lo": 1, "high": 64}}, "search.hidden: unknown key 'lo'"),
        ({"lr": {"low": 0.0, "high": 1e-2, "log": True}}, "search.lr: a log scale needs low > 0"),
        ({"lr": {"low": 1e-4, "high": 1e-2, "log": "yes"}}, "search.lr: log must be true or false"),
        ({"lr": {"low": -1.0, "high": 1e-2}}, "search.lr: -1.0 is not a valid training option"),
        ({"hidden": []}, "search.hidden: the list of choices is empty"),
        ({"hidden": ["wide"]}, "search.hidden: expected an integer, got 'wide'"),
        ({"activation": {"low": 1, "high": 2}}, "search.activation: a range needs a numeric"),
        ({"activation": ["relu", "relux"]}, "search.activation: 'relux' is not valid for model"),
        ({"transforms": 0}, "search.transforms: 0 is not valid for model 'zuko-nsf'"),
        ({"lr_schedule": ["constant", "cyclic"]}, "search.lr_schedule: 'cyclic' is not a valid"),
        ({"batch_size": [0, 64]}, "search.batch_size: 0 is not a valid training option"),
    ],
)
def test_bad_search_spaces_fail_with_one_line_naming_the_key(search: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SearchSpace.for_model("zuko-nsf", search)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_a_parameter_fixed_and_searched_is_an_error() -> None:
    with pytest.raises(ValueError, match="search.lr: fixed by hparams/training and named in"):
        SearchSpace.for_model("zuko-nsf", {"lr": [1e-3]}, training={"lr": 1e-3})


def test_search_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[search\n")
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        read_search_file(bad)
    empty = tmp_path / "empty.toml"
    empty.write_text("[training]\nlr = 1e-3\n")
    with pytest.raises(ValueError, match=r"empty.toml: no \[search\] table"):
        read_search_file(empty)
