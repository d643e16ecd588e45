"""`pollinate new`: the files it writes, the names it refuses, and how `pollinate simulate`
finds and reads an app (the run of one is tests/e2e/test_flwr_run.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pollinate.cli.new import find_app, read_app, write_app
from pollinate.config import RunSettings
from pollinate.errors import ConfigError
from tests.support import REPO


def test_the_app_names_pollinates_apps_and_the_users_model_and_data(tmp_path: Path) -> None:
    files = write_app(tmp_path / "Sensor-App", "Sensor-App")
    assert {str(p) for p in files} == {
        "pyproject.toml", "sensor_app/__init__.py", "sensor_app/task.py",
        "tests/test_task.py", "README.md",
    }  # fmt: skip
    doc = tomllib.loads((tmp_path / "Sensor-App" / "pyproject.toml").read_text())
    assert doc["project"]["name"] == "sensor-app"
    assert doc["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "pollinate.serverapp.app:app",
        "clientapp": "pollinate.clientapp.app:app",
    }
    # its run config is pollinate's: every key is known and checked
    settings = RunSettings.from_run_config(doc["tool"]["flwr"]["app"]["config"])
    assert settings.model == "sensor_app.task:Net"
    assert settings.dataset == "sensor_app.task:load_data"
    defaults = read_app(tmp_path / "Sensor-App")
    assert defaults.num_clients == 10 and defaults.config["batch-size"] == 16
    # every key pollinate has, so `server run` / `flwr run --run-config` may set any of them
    # (Flower refuses an override the app does not declare)
    assert set(defaults.config) == set(RunSettings().to_run_config())


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("9lives", "starting with a letter"),
        ("my app", "use letters, digits"),
        ("class", "would shadow the module 'class'"),
        ("pollinate", "would shadow the module 'pollinate'"),
    ],
)
def test_a_name_that_cannot_be_a_package_is_refused(
    tmp_path: Path, name: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        write_app(tmp_path / "x", name)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_an_existing_folder_is_never_written_into(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists"):
        write_app(tmp_path / "app", "app")
    assert [p.name for p in (tmp_path / "app").iterdir()] == ["mine.txt"]


def test_simulate_reads_an_app_only_when_asked_or_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # pollinate's own repository is a Flower App without the mark
    assert find_app(None) is None
    write_app(tmp_path / "a", "a")
    monkeypatch.chdir(tmp_path / "a")
    assert find_app(None) == tmp_path / "a"
    assert find_app(tmp_path / "elsewhere") == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tool.flwr.app\n", "is not valid TOML"),
        ("[tool.flwr.app]\nconfig = 3\n", "must be a table of settings"),
        ("[tool.pollinate]\nnum-clients = 'ten'\n", "num-clients must be an integer"),
    ],
)
def test_a_broken_app_pyproject_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "pyproject.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_app(tmp_path)
