"""Shared set-up of the end-to-end tests: real processes with Flower's home in the temp area."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def e2e_env(tmp_path: Path) -> dict[str, str]:
    """An environment for a subprocess: its own FLWR_HOME, one thread, no runtime installs."""
    return {
        **os.environ,
        "FLWR_HOME": str(tmp_path / ".flwr"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "OMP_NUM_THREADS": "1",
        # flwr starts `flower-superlink` by name: the venv's scripts must be on PATH even
        # when pytest was started without activating the venv.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # Wide --help panels and tables. Errors are one line off a terminal at any width
        # (test_cli_errors runs them at COLUMNS=40 with 200+ character paths).
        "COLUMNS": "200",
    }
