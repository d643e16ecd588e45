"""Fixtures shared by the export tests: the real data and the default CNN trained on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pollinate.data import DatasetSplit, load_dataset
from pollinate.export._parity import torch_logits
from tests.support.models import train_default_cnn


@pytest.fixture(scope="module")
def split() -> DatasetSplit:
    return load_dataset("mnist", seed=42)


@pytest.fixture(scope="module")
def trained(split: DatasetSplit) -> torch.nn.Module:
    """The default CNN after two epochs of SGD on the real MNIST subset (>= 85% test accuracy)."""
    return train_default_cnn(split.train.x, split.train.y)


@pytest.fixture(scope="module")
def reference(trained: torch.nn.Module, split: DatasetSplit) -> np.ndarray:
    logits = torch_logits(trained, split.test.x)
    accuracy = float(np.mean(logits.argmax(axis=1) == split.test.y))
    assert accuracy >= 0.85, f"the trained model is too weak for parity checks: {accuracy:.2%}"
    return logits
