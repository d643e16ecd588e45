"""refapp: the model, the data and the train/test loops (Flower's `opacus_fl/task.py`).

Differences from the official example are kept to what the benchmark needs: MNIST with
the Opacus MNIST example's CNN instead of CIFAR-10 and the example's LeNet, and data from
pollinate's shipped MNIST subset instead of a Flower Datasets download (no network on the
benchmark machines).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 -- the example's spelling
from flwr.app import Context
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# The [tool.flwr.app.config] of pyproject.toml. `flwr run` passes it in the run config;
# `flwr.simulation.run_simulation` (used by run.py) passes none, so these are the fallback.
DEFAULT_CONFIG: dict[str, int | float | str] = {
    "num-server-rounds": 5,
    "fraction-train": 0.1,
    "fraction-evaluate": 0.0,
    "batch-size": 32,
    "learning-rate": 0.5,
    "momentum": 0.0,
    "noise-multiplier": 1.0,
    "max-grad-norm": 1.0,
    "target-delta": 1e-5,
    "dataset": "mnist",
    "partitioner": "iid",
    "test-fraction": 0.2,
    "seed": 42,
    "model": "opacus-mnist",
}


def config_value(context: Context, key: str) -> Any:
    """``context.run_config[key]``; else ``$REFAPP_<KEY>`` (set by run.py); else the default."""
    if key in context.run_config:
        return context.run_config[key]
    env = os.environ.get("REFAPP_" + key.upper().replace("-", "_"))
    return env if env is not None else DEFAULT_CONFIG[key]


class Net(nn.Module):
    """The CNN of Opacus' MNIST example (``SampleConvNet``), as the issue's workload names it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # -> [B, 16, 14, 14]
        x = F.max_pool2d(x, 2, 1)  # -> [B, 16, 13, 13]
        x = F.relu(self.conv2(x))  # -> [B, 32, 5, 5]
        x = F.max_pool2d(x, 2, 1)  # -> [B, 32, 4, 4]
        x = x.view(-1, 32 * 4 * 4)  # -> [B, 512]
        x = F.relu(self.fc1(x))
        out: torch.Tensor = self.fc2(x)
        return out


def make_model(context: Context) -> nn.Module:
    """``Net`` (model "opacus-mnist", the default) or a pollinate built-in by name: its
    default CNN (model "cnn"), its GroupNorm ResNet (model "resnet", benchmarks/models.py)."""
    name = str(config_value(context, "model"))
    if name == "opacus-mnist":
        return Net()
    from pollinate.models import build_model

    return build_model(name)


Loader = DataLoader[tuple[torch.Tensor, ...]]


def load_data(partition_id: int, num_partitions: int, context: Context) -> Loader:
    """The train loader of one partition (IID, pollinate's shipped MNIST subset)."""
    from pollinate.data import load_partition

    part = load_partition(
        str(config_value(context, "dataset")),
        partition_id,
        num_partitions,
        str(config_value(context, "partitioner")),
        seed=int(config_value(context, "seed")),
        test_fraction=float(config_value(context, "test-fraction")),
    )
    dataset = TensorDataset(torch.from_numpy(part.x.copy()), torch.from_numpy(part.y.copy()))
    return DataLoader(dataset, batch_size=int(config_value(context, "batch-size")), shuffle=True)


def load_test_data(context: Context) -> Loader:
    """The central test split, for the server's ``evaluate_fn``."""
    from pollinate.data import load_dataset

    split = load_dataset(
        str(config_value(context, "dataset")),
        test_fraction=float(config_value(context, "test-fraction")),
        seed=int(config_value(context, "seed")),
    ).test
    dataset = TensorDataset(torch.from_numpy(split.x.copy()), torch.from_numpy(split.y.copy()))
    return DataLoader(dataset, batch_size=512)


def train(
    net: nn.Module,
    train_loader: Loader,
    privacy_engine: PrivacyEngine,
    optimizer: torch.optim.Optimizer,
    target_delta: float,
    device: torch.device,
    epochs: int = 1,
) -> tuple[float, float]:
    """DP-SGD through the private module/optimizer/loader; returns (mean loss, epsilon).

    Opacus' Poisson sampling can draw an empty batch. Like the example, it still goes through
    the model and the optimizer (Opacus turns it into a noise-only step); only its loss
    (the mean over zero samples, NaN) is left out of the reported mean.
    """
    criterion = nn.CrossEntropyLoss()
    net.to(device)
    net.train()
    loss_sum, seen = 0.0, 0
    for _ in range(epochs):
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            if len(labels):
                loss_sum += float(loss.detach()) * len(labels)
                seen += len(labels)
    epsilon = privacy_engine.get_epsilon(delta=target_delta)
    return (loss_sum / seen if seen else math.nan), float(epsilon)


def test(net: nn.Module, test_loader: Loader, device: torch.device) -> tuple[float, float]:
    """Summed cross-entropy loss over batches and accuracy, as in the example."""
    net.to(device)
    net.eval()
    criterion = nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in test_loader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item()
            correct += int((torch.max(outputs.data, 1)[1] == labels.to(device)).sum().item())
    accuracy = correct / len(test_loader.dataset)  # type: ignore[arg-type]
    return loss, accuracy
