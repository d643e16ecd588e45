"""Shared test set-up: one thread per process, no runtime installs, markers by folder.

The shared harness (processes, the real federation, serving, Flower messages, the trained
CNN, the privacy audit) is the package :mod:`tests.support`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# tracking is on by default (an embedded MLflow store in the working folder); the suite runs
# many simulations, so it is off here except where a test turns it back on (the default's own
# tests, in tests/integration/test_tracking_mlflow.py); an explicit --tracking-uri still tracks
os.environ["POLLINATE_TRACKING"] = "off"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by folder: tests/unit -> unit, tests/integration -> integration, ..."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for marker in ("unit", "integration", "e2e"):
            if marker in parts:
                item.add_marker(getattr(pytest.mark, marker))
