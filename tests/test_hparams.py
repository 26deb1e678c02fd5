"""Hyperparameters: typed parsing of -P key=value, range validation, description."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from muse_bench.core.errors import ConfigError
from muse_bench.core.hparams import describe, params_dict, parse_params, require
from muse_bench.unlearners import GA, NPO, NPO_GDR, WHP, GradientUnlearner, TaskVector


@dataclass(kw_only=True)
class Toy:
    """A dataclass with one field of every supported type."""

    lr: float = field(default=1e-5, metadata={"help": "learning rate"})
    epochs: int = 10
    flag: bool = False
    name: str = "x"
    limit: int | None = None
    alphas: tuple[float, ...] = (1.0, 2.0)
    pair: tuple[int, int] = (0, 1)
    mode: Literal["constant", "cosine"] = "constant"


def test_parse_params_converts_every_supported_type():
    got = parse_params(
        Toy,
        [
            "lr=3e-4",
            "epochs=3",
            "flag=yes",
            "name=a=b",
            "limit=none",
            "alphas=1,2,4.5",
            "pair=(3, 4)",
            "mode=cosine",
        ],
    )
    assert got == {
        "lr": 3e-4,
        "epochs": 3,
        "flag": True,
        "name": "a=b",
        "limit": None,
        "alphas": (1.0, 2.0, 4.5),
        "pair": (3, 4),
        "mode": "cosine",
    }
    assert type(got["epochs"]) is int and type(got["alphas"][0]) is float
    assert parse_params(Toy, ["limit=7", "flag=0", "alphas=[8]"]) == {
        "limit": 7,
        "flag": False,
        "alphas": (8.0,),
    }
    assert parse_params(Toy, []) == {}


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("lr=abc", "lr='abc' is not a valid value: expected float"),
        ("lr=nan", "expected float"),
        ("epochs=2.5", "epochs='2.5' is not a valid value: expected int"),
        ("flag=maybe", "expected bool"),
        ("limit=x", "expected int | None"),
        ("alphas=1,two", "expected tuple[float, ...]"),
        ("alphas=", "expected tuple[float, ...]"),
        ("pair=1,2,3", "expected tuple[int, int]"),
        ("mode=step", "expected {constant, cosine}"),
    ],
)
def test_bad_values_name_key_value_and_type(item, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("|", r"\|")):
        parse_params(Toy, [item])


def test_unknown_key_suggests_the_closest_names():
    with pytest.raises(
        ConfigError, match=r"unknown hyperparameter 'lrr' for ga\. Did you mean: lr\b"
    ):
        parse_params(GA, ["lrr=1e-5"])
    with pytest.raises(ConfigError, match=r"unknown hyperparameter 'beta' for ga"):
        parse_params(GA, ["beta=0.1"])  # NPO has beta; GA does not
    assert parse_params(NPO, ["beta=0.2"]) == {"beta": 0.2}


def test_malformed_and_repeated_items():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_params(GA, ["lr"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_params(GA, ["=3"])
    with pytest.raises(ConfigError, match="'lr' is given twice"):
        parse_params(GA, ["lr=1e-5", "lr=2e-5"])


@pytest.mark.parametrize(
    ("cls", "params", "message"),
    [
        (GA, {"lr": -1e-5}, "lr must be > 0"),
        (GA, {"lr": 0.0}, "lr must be > 0"),
        (GA, {"epochs": 0}, "epochs must be >= 1"),
        (GA, {"batch_size": 0}, "batch_size must be >= 1"),
        (GA, {"grad_accum": 0}, "grad_accum must be >= 1"),
        (GA, {"max_len": 1}, "max_len must be >= 2"),
        (GA, {"weight_decay": -0.1}, "weight_decay must be >= 0"),
        (GA, {"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        (NPO, {"beta": 0.0}, "beta must be > 0"),
        (NPO_GDR, {"retain_weight": -1.0}, "retain_weight must be >= 0"),
        (TaskVector, {"alphas": ()}, "alphas must list at least one value"),
        (TaskVector, {"alphas": (1.0, -2.0)}, "alphas must be finite and >= 0"),
        (WHP, {"ft_lr": -1.0}, "ft_lr must be > 0"),
        (WHP, {"ft_epochs": 0}, "ft_epochs must be >= 1"),
    ],
)
def test_validate_rejects_out_of_range_values(cls, params, message):
    with pytest.raises(ConfigError, match=message):
        cls(**params)


def test_parsed_values_construct_and_validate():
    algo = NPO_GDR(
        **parse_params(NPO_GDR, ["lr=2e-5", "epochs=3", "retain_weight=0.5", "beta=0.2"])
    )
    assert (algo.lr, algo.epochs, algo.retain_weight, algo.beta) == (2e-5, 3, 0.5, 0.2)
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        GA(**parse_params(GA, ["epochs=-3"]))
    assert params_dict(TaskVector(alphas=(1.0, 4.0)))["alphas"] == [1.0, 4.0]  # JSON-ready


def test_require_raises_config_error():
    require(True, "unused")
    with pytest.raises(ConfigError, match="boom"):
        require(False, "boom")


def test_describe_lists_name_type_default_help():
    rows = {row.name: row for row in describe(Toy)}
    assert list(rows) == ["lr", "epochs", "flag", "name", "limit", "alphas", "pair", "mode"]
    assert rows["lr"] == ("lr", "float", 1e-5, "learning rate")
    assert rows["epochs"].help == ""
    assert rows["limit"].type == "int | None"
    assert rows["alphas"].type == "tuple[float, ...]"
    assert rows["mode"].type == "{constant, cosine}"


def test_every_builtin_hyperparameter_has_help_text():
    for cls in (GA, NPO, NPO_GDR, TaskVector, WHP):
        for row in describe(cls):
            assert row.help, f"{cls.__name__}.{row.name} has no help text"


def test_muse_7b_recipe_is_the_dataclass_default_and_embedded_overrides_lr():
    ga = GA()
    assert (ga.lr, ga.epochs, ga.batch_size * ga.grad_accum, ga.max_grad_norm) == (1e-5, 10, 4, 1.0)
    assert ga.lr_scheduler == "constant" and ga.weight_decay == 0.0
    assert NPO().beta == 0.1 and NPO_GDR().retain_weight == 1.0
    assert GA.defaults_for("embedded") == {"lr": 3e-4}
    assert NPO_GDR.defaults_for("embedded-news-v2") == {"lr": 1e-3}
    assert GA.defaults_for("hub") == {}
    assert TaskVector.defaults_for("embedded") == {"ft_lr": 1e-3}
    assert GA(**GA.defaults_for("embedded")).lr == 3e-4


def test_defaults_for_merges_along_the_mro_and_keeps_only_fields():
    @dataclass(kw_only=True)
    class Custom(GA):
        """A GA variant with its own embedded defaults."""

        beta: float = 1.0
        benchmark_defaults = {"embedded": {"beta": 2.0, "not_a_field": 1}}

    assert Custom.defaults_for("embedded") == {"lr": 3e-4, "beta": 2.0}
    assert issubclass(Custom, GradientUnlearner)


def test_defaults_for_applies_family_then_version_then_exact_id():
    @dataclass(kw_only=True)
    class Versioned(GA):
        """A GA variant calibrated per benchmark version."""

        benchmark_defaults = {
            "embedded": {"lr": 1.0, "epochs": 2},
            "embedded-v3": {"lr": 3.0},
            "embedded-books-v3": {"epochs": 7},
        }

    assert Versioned.defaults_for("embedded-news-v2") == {"lr": 1.0, "epochs": 2}
    assert Versioned.defaults_for("embedded-news-v3") == {"lr": 3.0, "epochs": 2}
    assert Versioned.defaults_for("embedded-books-v3") == {"lr": 3.0, "epochs": 7}
    assert Versioned.defaults_for("embedded") == {"lr": 1.0, "epochs": 2}
    assert Versioned.defaults_for("hub-muse-bench/MUSE-News@v3") == {}
