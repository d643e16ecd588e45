"""The built-in models, registered by name through the same plug-in point as a user's model.

Every model here is built without BatchNorm so that Opacus' ``ModuleValidator`` accepts it
as is (per-sample gradients are undefined for batch statistics).
"""

from __future__ import annotations

import torch
from torch import nn

from pollinate.errors import ConfigError
from pollinate.models.registry import register_model

__all__ = ["MLP", "OpacusMnistCNN", "SmallCNN"]


class SmallCNN(nn.Module):
    """The default model: two conv blocks (GroupNorm, no BatchNorm) and a linear head.

    Sized for 28x28 MNIST; adapts to any square single- or multi-channel input through an
    adaptive pooling layer, so the 8x8 digits work too.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.GroupNorm(4, 32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


class MLP(nn.Module):
    """A two-hidden-layer perceptron on the flattened input."""

    def __init__(self, in_features: int, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class OpacusMnistCNN(nn.Module):
    """The CNN of Opacus' MNIST example (``SampleConvNet``), for 28x28 inputs.

    26,010 parameters and about 0.4 M multiply-adds per image (the default ``cnn`` does about
    2.8 M): the model of the plain-Flower reference app in ``benchmarks/``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2, 1)
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv2(x)), 2, 1)
        x = nn.functional.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)  # type: ignore[no-any-return]


@register_model("opacus-mnist")
def _opacus_mnist(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3 or tuple(input_shape[1:]) != (28, 28):
        raise ConfigError(
            f"model 'opacus-mnist' needs 28x28 images (C, 28, 28), got {input_shape}; "
            "use model 'cnn' for other image sizes"
        )
    return OpacusMnistCNN(in_channels=input_shape[0], num_classes=num_classes)


@register_model("cnn")
def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ConfigError(
            f"model 'cnn' needs image input of shape (C, H, W), got {input_shape}; "
            "use model 'mlp' for tabular data"
        )
    return SmallCNN(in_channels=input_shape[0], num_classes=num_classes)


@register_model("mlp")
def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    in_features = 1
    for dim in input_shape:
        in_features *= dim
    return MLP(in_features=in_features, num_classes=num_classes)
