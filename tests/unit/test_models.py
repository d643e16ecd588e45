from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from pollinate.errors import ConfigError
from pollinate.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8)])
def test_every_model_builds_and_passes_opacus_validation(
    name: str, shape: tuple[int, int, int]
) -> None:
    if name == "opacus-mnist" and shape != (1, 28, 28):
        with pytest.raises(ConfigError, match="28x28"):
            build_model(name, input_shape=shape)
        return
    model = build_model(name, input_shape=shape, num_classes=10)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    out = model(torch.zeros(3, *shape))
    assert out.shape == (3, 10)


def test_mlp_takes_tabular_input() -> None:
    model = build_model("mlp", input_shape=(13,), num_classes=3)
    assert model(torch.zeros(5, 13)).shape == (5, 3)


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown model 'vgg'.*cnn, lstm, mlp, opacus-mnist, resnet"
    ):
        build_model("vgg")


def test_cnn_rejects_tabular_input_with_a_hint() -> None:
    with pytest.raises(ConfigError, match="use model 'mlp'"):
        build_model("cnn", input_shape=(13,))


def test_opacus_mnist_is_the_opacus_example_architecture() -> None:
    model = build_model("opacus-mnist")
    assert sum(p.numel() for p in model.parameters()) == 26010
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes[0] == (16, 1, 8, 8) and shapes[2] == (32, 16, 4, 4) and shapes[4] == (32, 512)
