"""The built-in models, registered by name through the same plug-in point as a user's model.

Every model here is built without BatchNorm so that Opacus' ``ModuleValidator`` accepts it
as is (per-sample gradients are undefined for batch statistics).
"""

from __future__ import annotations

import torch
from torch import nn

from pollinate.errors import ConfigError
from pollinate.models.registry import register_model
from pollinate.models.scattering import KERNEL, ScatterNet

__all__ = ["MLP", "GroupNormResNet", "OpacusMnistCNN", "RowLSTM", "SmallCNN"]


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


class RowLSTM(nn.Module):
    """A sequence model: an image's rows (or a (T, F) sequence) through Opacus' ``DPLSTM``,
    whose per-sample gradients DP-SGD can clip, and a linear head on the last step."""

    def __init__(self, steps: int, features: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        from opacus.layers import DPLSTM

        self.steps, self.features = steps, features
        self.rnn = DPLSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(x.shape[0], self.steps, self.features))
        return self.head(out[:, -1])  # type: ignore[no-any-return]


class _Block(nn.Module):
    """A ResNet basic block with GroupNorm (DP-SGD cannot train BatchNorm)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(8, cout)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.GroupNorm(8, cout))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.norm1(self.conv1(x)))
        return nn.functional.relu(self.norm2(self.conv2(out)) + self.skip(x))


class GroupNormResNet(nn.Module):
    """A small ResNet (7 basic blocks, 32-64-128-192 channels, GroupNorm): 1.27 M parameters,
    for 28x28 (or any) images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False),
                                  nn.GroupNorm(8, 32), nn.ReLU())  # fmt: skip
        self.blocks = nn.Sequential(
            _Block(32, 32, 1), _Block(32, 32, 1), _Block(32, 64, 2), _Block(64, 64, 1),
            _Block(64, 128, 2), _Block(128, 128, 1), _Block(128, 192, 2),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(192, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))  # type: ignore[no-any-return]


@register_model("lstm")
def _lstm(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) == 3:  # an image: its rows are the steps
        channels, height, width = input_shape
        return RowLSTM(height, channels * width, num_classes)
    if len(input_shape) == 2:
        return RowLSTM(input_shape[0], input_shape[1], num_classes)
    raise ConfigError(
        f"model 'lstm' needs sequences (T, F) or images (C, H, W), got {input_shape}; use "
        "model 'mlp' for flat features"
    )


@register_model("resnet")
def _resnet(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ConfigError(f"model 'resnet' needs images (C, H, W), got {input_shape}")
    return GroupNormResNet(in_channels=input_shape[0], num_classes=num_classes)


@register_model("scatnet")
def _scatnet(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Fixed scattering features and a linear head (:mod:`pollinate.models.scattering`)."""
    smallest = KERNEL // 2 + 1  # the filters' reflected border needs this many pixels
    if len(input_shape) != 3 or min(input_shape[1:]) < smallest:
        raise ConfigError(
            f"model 'scatnet' needs images (C, H, W) of at least {smallest} x {smallest} "
            f"pixels, got {input_shape}; use model 'mlp' for flat features"
        )
    channels, height, width = input_shape
    return ScatterNet((channels, height, width), num_classes)
