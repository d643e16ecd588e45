from __future__ import annotations

import dataclasses
import tomllib
from enum import Enum
from pathlib import Path

import pytest

from pollinate.config import ClientDP, RunSettings, SampleDP, StrategyName
from pollinate.errors import ConfigError
from tests.support import REPO


def test_pyproject_app_config_matches_the_typed_defaults() -> None:
    """`flwr run .` and `pollinate simulate` must start from the same defaults."""
    app_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"
    ]
    defaults = RunSettings()
    for f in dataclasses.fields(RunSettings):
        if f.name == "extra":
            continue
        key = f.name.replace("_", "-")
        assert key in app_config, f"{key} missing from [tool.flwr.app.config]"
        value = getattr(defaults, f.name)
        expected = value.value if isinstance(value, Enum) else value
        assert app_config[key] == expected, key
    assert RunSettings.from_run_config(app_config) == defaults


def test_values_are_coerced_and_enums_parsed() -> None:
    s = RunSettings.from_run_config(
        {"num-server-rounds": "3", "strategy": "fedadam", "dp": "none", "client-dp": "server-fixed"}
    )
    assert s.num_server_rounds == 3
    assert s.strategy is StrategyName.FEDADAM
    assert s.dp is SampleDP.NONE
    assert s.client_dp is ClientDP.SERVER_FIXED
    assert RunSettings.from_run_config(s.to_run_config()) == s


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"strategy": "fedsgd"}, r"'strategy': unknown value 'fedsgd'.*'fedavg'"),
        ({"model": "vgg"}, r"unknown model 'vgg'"),
        ({"epsilon-budget": -1.0}, r"'epsilon-budget' must not be negative"),
        ({"target-epsilon": -2}, r"'target-epsilon' must not be negative"),
        ({"fraction-train": 1.5}, r"'fraction-train' must be in \(0, 1\]"),
        ({"num-server-rounds": 0}, r"'num-server-rounds' must be a positive integer"),
        ({"num-server-rounds": "five"}, r"'num-server-rounds' must be an integer"),
        ({"learning-rate": "fast"}, r"'learning-rate' must be a number"),
        ({"target-delta": 1.0}, r"'target-delta' must be in \(0, 1\)"),
        ({"noise-multiplier": 0.0}, r"DP-SGD without noise"),
        ({"partitioner": "random"}, r"'partitioner': unknown value 'random'"),
        ({"num-rounds": 3}, r"unknown setting 'num-rounds'"),
        ({"resume": "maybe"}, r"'resume' must be true or false"),
        (
            {"export-triton-repo": "models", "export-formats": "openvino"},
            r"'export-triton-repo'.*needs 'onnx' in 'export-formats'",
        ),
    ],
)
def test_bad_settings_name_the_key(config: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_run_config(config)


def test_sample_size_respects_fraction_and_minimum() -> None:
    s = RunSettings()
    assert s.sample_size(1000) == 100
    assert s.sample_size(5) == 2
    assert s.sample_size(1) == 1
    assert s.evaluate_size(1000) == 0
    assert s.replace(fraction_evaluate=0.02).evaluate_size(1000) == 20


def test_bundle_dir_is_export_dir_or_the_run_dir_for_a_serving_repository(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert RunSettings.from_run_config({}).bundle_dir(run) is None
    publish = RunSettings.from_run_config({"export-triton-repo": "models"})
    assert publish.bundle_dir(run) == run / "bundle"  # each run its own bundle
    both = RunSettings.from_run_config({"export-triton-repo": "models", "export-dir": "b"})
    assert both.bundle_dir(run) == Path("b")
