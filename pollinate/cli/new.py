"""``pollinate new NAME``: a Flower App that trains the user's model with pollinate.

The app is Flower's own layout (``pyproject.toml`` with ``[tool.flwr.app]``, a package with
``task.py``), but its ServerApp and ClientApp are pollinate's: the user's ``Net`` and
``load_data`` plug in through the run config's ``model`` and ``dataset`` import paths, so DP-SGD,
the ledger, both simulation engines, export and serving work on them unchanged. It runs as
generated with ``pollinate simulate`` from inside it (or ``--app DIR``) and with ``flwr run``.
"""

from __future__ import annotations

import keyword
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from pollinate._atomic import atomic_dir
from pollinate.cli.console import make_console
from pollinate.errors import ConfigError

__all__ = ["SIMULATE_TABLE", "AppDefaults", "find_app", "new_command", "read_app", "write_app"]

#: the pyproject table of ``pollinate simulate``'s defaults for an app (flags override it)
SIMULATE_TABLE = "pollinate"

#: the app's own choices; every other run-config key is written at its default
_APP_CONFIG: dict[str, bool | int | float | str] = {
    "model": "{package}.task:Net",
    "dataset": "{package}.task:load_data",
    "num-server-rounds": 3,
    "fraction-train": 0.5,
    "batch-size": 16,
}

_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{project}"
version = "0.1.0"
description = "A federated-learning app on pollinate (Flower, Opacus DP-SGD)"
requires-python = ">=3.11"
dependencies = ["pollinate"]

[tool.hatch.build.targets.wheel]
packages = ["{package}"]

[tool.flwr.app]
publisher = "{publisher}"

# pollinate's apps, with your model and data (the `model` and `dataset` import paths below)
[tool.flwr.app.components]
serverapp = "pollinate.serverapp.app:app"
clientapp = "pollinate.clientapp.app:app"

# pollinate's run config: every key, so `flwr run --run-config` and `pollinate server run`
# may set any of them (Flower accepts only keys the app declares); README lists them all
[tool.flwr.app.config]
{config}
# `pollinate simulate` from this folder (or --app DIR): how many simulated clients
[tool.{table}]
num-clients = 10
"""

_TASK = '''\
"""Your model and your data: pollinate's ServerApp and ClientApp train them with DP-SGD.

`Net` is built with no arguments (or with `input_shape` and `num_classes` when its
signature asks for them); `load_data` returns the whole labelled dataset, which pollinate
splits, partitions among the clients and checks. Replace both with your own.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


class Net(nn.Module):
    """A small CNN for 8x8 grey images, 10 classes. GroupNorm, not BatchNorm: DP-SGD needs
    per-sample gradients, which batch statistics do not have."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (shipped with it: nothing is downloaded), as (N, 1, 8, 8)
    floats in [0, 1] and labels 0..9."""
    digits = load_digits()
    return (digits.images[:, None] / 16.0).astype(np.float32), digits.target
'''

_TEST = '''\
"""The model fits the data, and pollinate accepts both for DP-SGD."""

from __future__ import annotations

import torch

from pollinate.models import checked_model
from {package}.task import Net, load_data


def test_the_model_fits_the_data_and_can_train_with_dp_sgd() -> None:
    x, y = load_data()
    assert len(x) == len(y) and set(y.tolist()) == set(range(10))
    out = Net()(torch.from_numpy(x[:4]))
    assert out.shape == (4, 10)
    checked_model("{package}.task:Net", tuple(x.shape[1:]), 10, fix=False, dp=True)
'''

_README = """\
# {project}

A federated-learning app on [pollinate](https://example.invalid/pollinate): Flower's
ServerApp and ClientApp from pollinate, with the model and data in `{package}/task.py`.
Every client trains with Opacus DP-SGD and keeps its own privacy accountant.

```bash
pollinate simulate                      # from this folder: 10 clients ([tool.pollinate])
pollinate simulate --engine ray -n 20   # the same on Flower's Ray engine
pytest                                  # the model fits the data and can train with DP-SGD
flwr run . --run-config 'run-dir="/abs/path/run"'   # Flower's own CLI (set FLWR_HOME)
```

Change `Net` and `load_data` in `{package}/task.py`; settings are the
`[tool.flwr.app.config]` keys of `pyproject.toml` (`pollinate simulate --help`).
"""


@dataclass(frozen=True)
class AppDefaults:
    """What an app's pyproject.toml gives ``pollinate simulate``: its run config and clients."""

    folder: Path
    config: dict[str, Any]
    num_clients: int | None


def find_app(app: Path | None) -> Path | None:
    """The app folder to simulate: ``--app DIR``, else the working directory when its
    pyproject.toml has a ``[tool.pollinate]`` table (what ``pollinate new`` writes), else none
    (pollinate's own repository is a Flower App too, but its config is the built-in defaults)."""
    if app is not None:
        return app
    here = Path.cwd() / "pyproject.toml"
    if not here.is_file():
        return None
    try:
        tools = tomllib.loads(here.read_text(encoding="utf-8")).get("tool", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return Path.cwd() if isinstance(tools, dict) and SIMULATE_TABLE in tools else None


def read_app(folder: Path) -> AppDefaults:
    """Read a Flower App's ``[tool.flwr.app.config]`` and ``[tool.pollinate]`` num-clients."""
    path = Path(folder) / "pyproject.toml"
    if not path.is_file():
        raise ConfigError(f"--app {folder}: no pyproject.toml there; pass a Flower App's folder")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path} is not valid TOML ({err}); fix the file") from None
    tools = doc.get("tool", {})
    flwr_app = tools.get("flwr", {}).get("app", {}) if isinstance(tools, dict) else {}
    config = flwr_app.get("config", {}) if isinstance(flwr_app, dict) else {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: [tool.flwr.app.config] must be a table of settings")
    ours = tools.get(SIMULATE_TABLE, {}) if isinstance(tools, dict) else {}
    clients = ours.get("num-clients") if isinstance(ours, dict) else None
    if clients is not None and (isinstance(clients, bool) or not isinstance(clients, int)):
        raise ConfigError(f"{path}: [tool.{SIMULATE_TABLE}] num-clients must be an integer")
    return AppDefaults(folder=Path(folder), config=dict(config), num_clients=clients)


def _run_config(package: str) -> str:
    """The ``[tool.flwr.app.config]`` lines: the app's choices first, then every other key."""
    from pollinate.config import RunSettings
    from pollinate.ops.runs import toml_value

    ours = {k: v.format(package=package) if isinstance(v, str) else v
            for k, v in _APP_CONFIG.items()}  # fmt: skip
    rest = {k: v for k, v in RunSettings().to_run_config().items() if k not in ours}
    lines = [f"{k} = {toml_value(v)}" for k, v in ours.items()]
    lines += ["# the rest at pollinate's defaults"]
    lines += [f"{k} = {toml_value(v)}" for k, v in rest.items()]
    return "\n".join(lines) + "\n"


def _names(name: str) -> tuple[str, str]:
    """(project name, package name) for NAME; ConfigError for a name that is neither."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise ConfigError(
            f"app name {name!r}: use letters, digits, '-' and '_', starting with a letter "
            "(e.g. my-app)"
        )
    package = name.replace("-", "_").lower()
    if keyword.iskeyword(package) or package in ("pollinate", "flwr", "torch", "test", "tests"):
        raise ConfigError(f"app name {name!r} would shadow the module {package!r}; choose another")
    return name.lower(), package


def write_app(target: Path, name: str, *, publisher: str = "me") -> list[Path]:
    """Write the app NAME into the new folder ``target``; the files written (relative).

    The files are written into a temporary folder beside ``target`` and renamed into place,
    so an interruption leaves no half-written app.
    """
    project, package = _names(name)
    if target.exists():
        raise ConfigError(f"{target} already exists; choose another NAME or --dir")
    files = {
        Path("pyproject.toml"): _PYPROJECT.format(
            project=project,
            package=package,
            publisher=publisher,
            table=SIMULATE_TABLE,
            config=_run_config(package),
        ),
        Path(package) / "__init__.py": f'"""{project}: a pollinate app."""\n',
        Path(package) / "task.py": _TASK,
        Path("tests") / "test_task.py": _TEST.format(package=package),
        Path("README.md"): _README.format(project=project, package=package),
    }
    with atomic_dir(target) as staging:
        staging.chmod(0o755)  # mkdtemp makes it private; an app folder is an ordinary one
        for rel, text in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_text(text, encoding="utf-8")
    return list(files)


def new_command(
    name: Annotated[str, typer.Argument(help="The app's name (a folder of that name is made).")],
    dir_: Annotated[
        Path | None,
        typer.Option("--dir", help="Where to make the app's folder [./NAME].", show_default=False),
    ] = None,
    publisher: Annotated[str, typer.Option(help="[tool.flwr.app] publisher.")] = "me",
) -> None:
    """Make a Flower App that trains your model with pollinate (DP-SGD, ledger, export).

    It holds a pyproject.toml naming pollinate's ServerApp and ClientApp, a task.py with a
    model and a data loader to replace with yours, a README and a test. It runs as made.

    Examples:

      pollinate new my-app && cd my-app && pollinate simulate

      pollinate new my-app --dir apps/my-app && pollinate simulate --app apps/my-app
    """
    target = dir_ if dir_ is not None else Path(name)
    written = write_app(target, name, publisher=publisher)
    out = make_console()
    out.print(f"made {target}/ with " + ", ".join(str(p) for p in written))
    out.print(f"next: cd {target} && pollinate simulate")
