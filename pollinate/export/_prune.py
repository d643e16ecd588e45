"""Structured channel pruning of the default CNN, with a short fine-tune on server-side data.

Structured pruning removes whole convolution channels, so the result is a smaller *dense*
model that every runtime (ONNX Runtime, OpenVINO, TFLite) runs faster and stores smaller
without any sparse-kernel support. Combined with INT8 quantization it is what takes the
default model below 10% of its FP32 ONNX size.

:func:`prune_structured` ranks the output channels of both convolutions by the L1 norm of
their filters, keeps the strongest ones, copies their weights into a :class:`PrunedCNN`
(the same layer layout as :class:`~pollinate.models.SmallCNN`, with fewer channels) and
fine-tunes it on the data the caller passes. That data must be **server-side** data (in a
real federation: a small public or server-held set), never the test split the export pipeline
validates on, or the reported accuracy would be optimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pollinate.errors import ConfigError
from pollinate.models import SmallCNN

__all__ = ["MAX_AMOUNT", "PruneResult", "PrunedCNN", "prune_structured"]

#: Largest pruning amount accepted (share of channels removed from each convolution).
MAX_AMOUNT = 0.95
#: Fine-tune batch size and learning rate (Adam).
_BATCH = 32
_LR = 1e-2
#: Distillation temperature and the weight of the distillation term in the fine-tune loss.
_TEMPERATURE = 4.0
_DISTILL_WEIGHT = 0.3


class PrunedCNN(nn.Module):
    """:class:`~pollinate.models.SmallCNN` with ``c1`` / ``c2`` channels and chosen GroupNorms.

    The module names (``features.0`` ... ``head.1``) are those of ``SmallCNN``, so tools that
    walk its layers see the same structure; it exports with the dynamo ONNX exporter as is.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        c1: int,
        c2: int,
        groups1: int,
        groups2: int,
        num_classes: int = 10,
        pool: int = 4,
    ) -> None:
        super().__init__()
        self.c1, self.c2, self.groups1, self.groups2 = c1, c2, groups1, groups2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),
            nn.GroupNorm(groups1, c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.GroupNorm(groups2, c2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(pool),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * pool * pool, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_structured` produced.

    Attributes:
        model: The pruned, fine-tuned dense model (a :class:`PrunedCNN`, in eval mode).
        kept_channels: Output channels kept in ``(conv1, conv2)``.
        params_before: Parameters of the original model.
        params_after: Parameters of the pruned model.
        recipe: One line for the bundle manifest.
    """

    model: nn.Module
    kept_channels: tuple[int, int]
    params_before: int
    params_after: int
    recipe: str


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _kept(channels: int, amount: float) -> int:
    return max(1, min(channels, round((1.0 - amount) * channels)))


def _top_l1(conv: nn.Conv2d, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` output channels with the largest filter L1 norm."""
    norms = conv.weight.detach().abs().flatten(1).sum(dim=1)
    order = torch.argsort(norms, descending=True, stable=True)[:keep]
    return torch.sort(order).values


def _check_inputs(
    model: nn.Module,
    amount: float,
    x: np.ndarray | None,
    y: np.ndarray | None,
    epochs: int,
) -> None:
    if not isinstance(model, SmallCNN):
        raise ConfigError(
            f"structured pruning supports only the default model 'cnn' (SmallCNN), "
            f"got {type(model).__name__}"
        )
    if (
        isinstance(amount, bool)
        or not isinstance(amount, int | float)
        or not math.isfinite(amount)
        or not 0.0 <= amount <= MAX_AMOUNT
    ):
        raise ConfigError(f"pruning amount must be a number in [0, {MAX_AMOUNT}], got {amount!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be an integer >= 0, got {epochs!r}")
    if (x is None) != (y is None):
        raise ConfigError("finetune_x and finetune_y must be given together")
    if x is not None and y is not None:
        if len(x) == 0 or len(x) != len(y):
            raise ConfigError(
                f"fine-tune data must be non-empty with one label per sample, got "
                f"{len(x)} samples and {len(y)} labels"
            )
        if not np.all(np.isfinite(np.asarray(x, dtype=np.float32))):
            raise ConfigError("finetune_x contains NaN or infinite values")


_Layers = tuple[nn.Conv2d, nn.GroupNorm, nn.Conv2d, nn.GroupNorm, nn.AdaptiveAvgPool2d, nn.Linear]


def _layers(model: SmallCNN | PrunedCNN) -> _Layers:
    """The weighted layers of a ``SmallCNN``-shaped model, type-checked."""
    conv1, gn1, conv2 = model.features[0], model.features[1], model.features[4]
    gn2, pool, linear = model.features[5], model.features[7], model.head[1]
    if not (
        isinstance(conv1, nn.Conv2d)
        and isinstance(gn1, nn.GroupNorm)
        and isinstance(conv2, nn.Conv2d)
        and isinstance(gn2, nn.GroupNorm)
        and isinstance(pool, nn.AdaptiveAvgPool2d)
        and isinstance(linear, nn.Linear)
        and conv1.bias is not None
        and conv2.bias is not None
        and gn1.affine
        and gn2.affine
    ):
        raise ConfigError("structured pruning needs the unmodified SmallCNN layer layout")
    return conv1, gn1, conv2, gn2, pool, linear


def _copy(dest: torch.Tensor | None, src: torch.Tensor | None) -> None:
    assert dest is not None and src is not None  # _layers checked the biases and affines
    dest.copy_(src)


def _transplant(model: SmallCNN, amount: float) -> PrunedCNN:
    """Build the pruned model and copy the kept weights of ``model`` into it."""
    conv1, gn1, conv2, gn2, pool, linear = _layers(model)
    size = pool.output_size
    first = size[0] if isinstance(size, tuple) else size
    if first is None or (isinstance(size, tuple) and size[1] != first):
        raise ConfigError(f"structured pruning needs a square pooled map, got {size!r}")
    side = int(first)
    c1, c2 = _kept(conv1.out_channels, amount), _kept(conv2.out_channels, amount)
    keep1, keep2 = _top_l1(conv1, c1), _top_l1(conv2, c2)
    pruned = PrunedCNN(
        in_channels=conv1.in_channels,
        c1=c1,
        c2=c2,
        groups1=math.gcd(c1, gn1.num_groups),
        groups2=math.gcd(c2, gn2.num_groups),
        num_classes=linear.out_features,
        pool=side,
    )
    p_conv1, p_gn1, p_conv2, p_gn2, _, p_linear = _layers(pruned)
    spatial = side * side
    # Flatten is channel-major: input column c * spatial + s belongs to channel c.
    columns = (keep2[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
    bias1, bias2 = conv1.bias, conv2.bias
    assert bias1 is not None and bias2 is not None
    with torch.no_grad():
        _copy(p_conv1.weight, conv1.weight[keep1])
        _copy(p_conv1.bias, bias1[keep1])
        _copy(p_gn1.weight, gn1.weight[keep1])
        _copy(p_gn1.bias, gn1.bias[keep1])
        _copy(p_conv2.weight, conv2.weight[keep2][:, keep1])
        _copy(p_conv2.bias, bias2[keep2])
        _copy(p_gn2.weight, gn2.weight[keep2])
        _copy(p_gn2.bias, gn2.bias[keep2])
        _copy(p_linear.weight, linear.weight[:, columns])
        _copy(p_linear.bias, linear.bias)
    return pruned


def _finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    seed: int,
) -> None:
    """Adam on (x, y) for ``epochs``; with a teacher, cross-entropy plus distillation."""
    xs = torch.tensor(np.asarray(x, dtype=np.float32))
    ys = torch.tensor(np.asarray(y, dtype=np.int64))
    soft: torch.Tensor | None = None
    if teacher is not None:
        teacher.eval()
        with torch.no_grad():
            soft = torch.log_softmax(teacher(xs) / _TEMPERATURE, dim=1)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=_LR)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, epochs * math.ceil(len(xs) / _BATCH))
    )
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), _BATCH):
            idx = order[start : start + _BATCH]
            logits = student(xs[idx])
            loss = nn.functional.cross_entropy(logits, ys[idx])
            if soft is not None:
                distill = nn.functional.kl_div(
                    torch.log_softmax(logits / _TEMPERATURE, dim=1),
                    soft[idx],
                    reduction="batchmean",
                    log_target=True,
                )
                loss = (1 - _DISTILL_WEIGHT) * loss + _DISTILL_WEIGHT * _TEMPERATURE**2 * distill
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            scheduler.step()
    student.eval()


def prune_structured(
    model: SmallCNN,
    *,
    amount: float,
    finetune_x: np.ndarray | None,
    finetune_y: np.ndarray | None,
    epochs: int = 10,
    seed: int = 0,
    distill: bool = True,
) -> PruneResult:
    """Remove the weakest ``amount`` of channels of both convolutions and fine-tune the rest.

    Each convolution keeps ``round((1 - amount) * C)`` output channels (at least one): those
    whose filters have the largest L1 norm. Their weights, GroupNorm affine parameters, the
    matching input channels of conv2 and the matching columns of the linear head are copied
    into a :class:`PrunedCNN`; each GroupNorm keeps ``gcd(kept, original groups)`` groups so
    that it still divides the channels. Removing channels changes the GroupNorm statistics, so
    the model is then fine-tuned (Adam, cosine schedule, one CPU thread) on
    ``finetune_x`` / ``finetune_y``; with ``distill`` the loss adds knowledge distillation from
    the unpruned model's logits on the same samples.

    The fine-tune data must be data the server holds (a public or server-side set): never the
    split the exported artifacts are validated on.

    Args:
        model: The trained default model (``SmallCNN``); it is not modified.
        amount: Share of channels removed from each convolution, in ``[0, 0.95]``.
        finetune_x: Server-side samples, ``(N, C, H, W)``; ``None`` skips the fine-tune.
        finetune_y: Their integer labels, ``(N,)``.
        epochs: Fine-tune epochs (0 skips it).
        seed: Seed of the fine-tune shuffling.
        distill: Distil the unpruned model's logits into the pruned one while fine-tuning.

    Returns:
        The pruned model (eval mode) and what was done.

    Raises:
        ConfigError: ``model`` is not a ``SmallCNN``, ``amount`` or ``epochs`` is out of range,
            or the fine-tune data is inconsistent.
    """
    _check_inputs(model, amount, finetune_x, finetune_y, epochs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        was_training = model.training
        pruned = _transplant(model, float(amount))
        tuned = finetune_x is not None and finetune_y is not None and epochs > 0
        if finetune_x is not None and finetune_y is not None and epochs > 0:
            _finetune(
                pruned,
                model if distill else None,
                finetune_x,
                finetune_y,
                epochs=epochs,
                seed=seed,
            )
        model.train(was_training)
    finally:
        torch.set_num_threads(threads)
    pruned.eval()
    conv1, _, conv2, _, _, _ = _layers(model)
    recipe = (
        f"structured L1 channel pruning {conv1.out_channels}->{pruned.c1} / "
        f"{conv2.out_channels}->{pruned.c2}"
    )
    if tuned:
        assert finetune_x is not None
        how = " with distillation" if distill else ""
        recipe += f", fine-tuned {epochs} epochs on {len(finetune_x)} server-side samples{how}"
    else:
        recipe += ", not fine-tuned"
    return PruneResult(
        model=pruned,
        kept_channels=(pruned.c1, pruned.c2),
        params_before=_count(model),
        params_after=_count(pruned),
        recipe=recipe,
    )
