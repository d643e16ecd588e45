"""The fast engine's per-sample gradients by plain autograd against torch.func's vmap(grad)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from pollinate.models import build_model
from pollinate.simulation._per_sample import HookedPerSample, _patches, hookable

pytestmark = pytest.mark.unit


class Mixed(nn.Module):
    """Convolutions with stride, padding, dilation and no bias; a Linear on a sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.b = nn.Conv2d(3, 4, 3, bias=False)
        self.seq = nn.Linear(5, 6)
        self.out = nn.Linear(6 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.b(torch.relu(self.a(x))))  # (N, 4, H, W)
        h = nn.functional.adaptive_avg_pool2d(h, (4, 5))  # (N, 4, 4, 5): 4 steps of 5
        h = torch.relu(self.seq(h.flatten(1, 2)))  # a Linear over (N, 16, 5)
        return self.out(h.reshape(len(h), 4, 4, 6).mean(2).flatten(1))  # type: ignore[no-any-return]


class Normed(nn.Module):
    """GroupNorm on images (channels-last friendly) and on flat features, between convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.norm = nn.GroupNorm(3, 6)
        self.flat = nn.GroupNorm(2, 4, eps=1e-3)
        self.fc = nn.Linear(6 * 4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x)))
        h = nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.out(torch.tanh(self.flat(self.fc(h))))  # type: ignore[no-any-return]


def _vmap_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("model", "shape"),
    [(Mixed(), (2, 9, 11)), (build_model("opacus-mnist"), (1, 28, 28)),
     (build_model("mlp", input_shape=(1, 8, 8)), (1, 8, 8)), (Normed(), (2, 5, 5)),
     (build_model("cnn"), (1, 28, 28))],
)  # fmt: skip
def test_hooked_per_sample_gradients_equal_vmap(model: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(7, *shape), torch.randint(0, 3, (7,))
    assert hookable(model)
    hooked = HookedPerSample(
        model, lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
    )
    grads, losses, outputs = hooked(x, y)
    expected = _vmap_reference(model, x, y)
    assert set(grads) == set(expected)
    for k, g in expected.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(outputs, model(x).detach())
    torch.testing.assert_close(losses, nn.functional.cross_entropy(model(x), y, reduction="none"))
    assert all(p.grad is None for p in model.parameters())  # nothing left on the model


@pytest.mark.parametrize("name", ["mixed", "normed"])
def test_weighted_group_sums_equal_the_sums_of_per_sample_gradients(name: str) -> None:
    torch.manual_seed(2)
    model, shape = (Mixed(), (2, 9, 11)) if name == "mixed" else (Normed(), (2, 5, 5))
    x, y = torch.randn(12, *shape), torch.randint(0, 3, (12,))
    hooked = HookedPerSample(
        model, lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
    )
    weights = torch.rand(4, 3)  # 4 members of 3 samples, as a cohort's masked means
    weights[1, 2] = 0.0  # a padded slot
    per_sample, losses, _ = hooked(x, y)
    grouped, grouped_losses, _ = hooked(x, y, weights)
    for k, g in per_sample.items():
        expected = torch.einsum("cb,cb...->c...", weights, g.reshape(4, 3, *g.shape[1:]))
        torch.testing.assert_close(grouped[k], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grouped_losses, losses)


@pytest.mark.parametrize("name", ["mixed", "normed"])
def test_clipped_sums_equal_clipping_the_per_sample_gradients(name: str) -> None:
    torch.manual_seed(3)
    model, shape = (Mixed(), (2, 9, 11)) if name == "mixed" else (Normed(), (2, 5, 5))
    x, y = torch.randn(12, *shape), torch.randint(0, 3, (12,))
    hooked = HookedPerSample(
        model, lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
    )
    valid = torch.ones(4, 3, dtype=torch.bool)
    valid[2, 1:] = False  # a member with one sample, padded
    per_sample, _, _ = hooked(x, y)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in per_sample.values()]).sum(0).sqrt()
    clip = float(norms.median())  # some samples clipped, some not
    factor = ((clip / (norms + 1e-6)).clamp(max=1.0) * valid.flatten()).reshape(4, 3)
    assert (factor[valid] < 1).any() and (factor[valid] == 1).any()
    clipped, _, _ = hooked.clipped_sums(x, y, valid, clip)
    for k, g in per_sample.items():
        expected = torch.einsum("cb,cb...->c...", factor, g.reshape(4, 3, *g.shape[1:]))
        torch.testing.assert_close(clipped[k], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [(8, 2, 3, 1), (4, 2, 0, 1), (3, 1, 1, 2), ((3, 5), (2, 1), (1, 2), (2, 1)), (2, 3, 0, 3)],
)
def test_conv_patches_equal_torch_unfold_in_either_layout(
    kernel: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    dilation: int | tuple[int, int],
) -> None:
    """The strided patches the hooked path multiplies are exactly ``functional.unfold``'s
    columns, transposed, for plain and channels-last inputs."""
    layer = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    a = torch.randn(4, 3, 17, 19)
    expected = nn.functional.unfold(
        a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
    ).transpose(1, 2)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = _patches(a.contiguous(memory_format=layout), layer)
        assert got.shape == expected.shape
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["mixed", "opacus-mnist", "cnn"])
def test_a_channels_last_module_gives_the_same_clipped_sums(name: str) -> None:
    """The fast engine lays its cohort's model out channels-last (faster pooling): the
    clipped sums, losses and outputs equal those of the same weights laid out plainly."""
    torch.manual_seed(4)
    model, shape = (Mixed(), (2, 9, 11)) if name == "mixed" else (build_model(name), (1, 28, 28))
    x, y = torch.randn(12, *shape), torch.randint(0, 3, (12,))
    valid = torch.ones(4, 3, dtype=torch.bool)
    valid[1, 2] = False

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, t, reduction="none")

    plain = HookedPerSample(model, loss).clipped_sums(x, y, valid, 0.5)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    assert any(p.dim() == 4 and not p.is_contiguous() for p in last.parameters())
    fast = HookedPerSample(last, loss).clipped_sums(x, y, valid, 0.5)
    assert set(plain[0]) == set(fast[0])
    for k, g in plain[0].items():
        torch.testing.assert_close(fast[0][k], g, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast[1], plain[1])
    torch.testing.assert_close(fast[2], plain[2])


def test_only_linear_plain_conv_and_group_norm_layers_are_hooked() -> None:
    assert hookable(build_model("cnn")) and hookable(build_model("resnet"))  # GroupNorm
    assert not hookable(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)))
    assert not hookable(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    assert not hookable(nn.Sequential(nn.Conv2d(4, 4, 3, padding="same")))
    assert not hookable(nn.Sequential(nn.Conv2d(4, 4, 3, padding_mode="reflect")))
    assert not hookable(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))


def test_a_layer_called_twice_is_refused_not_miscounted() -> None:
    layer = nn.Linear(4, 4)
    twice = nn.Sequential(layer, nn.ReLU(), layer)
    hooked = HookedPerSample(twice, lambda out, t: out.sum(1))
    with pytest.raises(RuntimeError, match="called twice"):
        hooked(torch.randn(3, 4), torch.zeros(3))


@pytest.mark.parametrize("name", ["opacus-mnist", "cnn"])  # the default CNN: GroupNorm
def test_a_one_step_fast_simulation_of_a_hooked_model_never_loads_dynamo(
    tmp_path: Path, name: str
) -> None:
    """torch.func's first gradient imports dynamo (about a second, 70 MB); a model the
    hooked path covers, trained one step a round, never needs it."""
    code = (
        "import sys\n"
        "from pollinate.clientapp.training import TrainSettings\n"
        "from pollinate.data import load_partition\n"
        "from pollinate.models import build_model\n"
        "from pollinate.simulation.cohort import CohortMember, train_cohort\n"
        f"model = build_model({name!r})\n"
        "members = [CohortMember(p.x, p.y, seed=i) for i, p in\n"
        "           enumerate(load_partition('mnist', i, 1000, 'iid', seed=1) for i in range(5))]\n"
        "for dp in (True, False):\n"
        "    train_cohort(model, members, TrainSettings(epochs=1, batch_size=32,\n"
        "                 learning_rate=0.1, dp=dp, noise_multiplier=1.0))\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:3])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert run.stdout.strip().splitlines()[-1] == "[]"


class Ghosted(nn.Module):
    """Layers whose per-sample gradients are larger than their positions squared (ghost
    norms: a wide conv on a small map, a Linear over a short sequence) beside a conv that
    forms them."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv2d(3, 16, 3, padding=1)  # on 4x4: 16 positions, 16^2 < 16 * 27
        self.small = nn.Conv2d(16, 2, 1, bias=False)  # 16 positions, 16^2 > 2 * 16: formed
        self.seq = nn.Linear(8, 12)  # over 4 steps: 4^2 < 12 * 8
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.small(torch.relu(self.wide(x))))  # (N, 2, 4, 4)
        h = torch.tanh(self.seq(h.reshape(len(h), 4, 8)))  # 4 steps of 8 features
        return self.out(h.mean(1))  # type: ignore[no-any-return]


def test_ghost_norms_clip_as_the_formed_per_sample_gradients() -> None:
    """The ghost norms (two Gram matrices per layer) clip each sample exactly as the norm
    of its formed gradient does."""
    torch.manual_seed(6)
    model = Ghosted()
    x, y = torch.randn(12, 3, 4, 4), torch.randint(0, 3, (12,))
    hooked = HookedPerSample(
        model, lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
    )
    valid = torch.ones(4, 3, dtype=torch.bool)
    valid[0, 2] = False
    grams = []  # the ghost branch runs (two Gram products per ghost layer)
    real_bmm = torch.bmm

    def counting_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[1] == b.shape[2] and a.shape[2] == b.shape[1] and a.shape[1] != a.shape[2]:
            grams.append(a.shape[1])
        return real_bmm(a, b)

    per_sample, _, _ = hooked(x, y)
    expected_ps = _vmap_reference(model, x, y)
    for k, g in expected_ps.items():
        torch.testing.assert_close(per_sample[k], g, rtol=1e-4, atol=1e-6)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in expected_ps.values()]).sum(0).sqrt()
    clip = float(norms.median())
    factor = ((clip / (norms + 1e-6)).clamp(max=1.0) * valid.flatten()).reshape(4, 3)
    assert (factor[valid] < 1).any() and (factor[valid] == 1).any()
    torch.bmm = counting_bmm  # type: ignore[assignment]
    try:
        clipped, _, _ = hooked.clipped_sums(x, y, valid, clip)
    finally:
        torch.bmm = real_bmm
    assert sorted(set(grams)) == [4, 16]  # the sequence's and the wide conv's positions
    for k, g in expected_ps.items():
        expected = torch.einsum("cb,cb...->c...", factor, g.reshape(4, 3, *g.shape[1:]))
        torch.testing.assert_close(clipped[k], expected, rtol=1e-4, atol=1e-6)
