"""Structured channel pruning of any model, with a short fine-tune on server-side data.

Structured pruning removes whole channels (convolution filters, hidden units of linear layers),
so the result is a smaller *dense* model that every runtime (ONNX Runtime, OpenVINO, TFLite)
runs faster and stores smaller without any sparse-kernel support. Combined with INT8
quantization it is what takes the default model below 10% of its FP32 ONNX size.

:func:`prune_structured` traces a copy of the model with torch-pruning's dependency graph
(DepGraph), which finds the layers whose channels must be removed together (a convolution,
its GroupNorm, the next layer's inputs, the other branch of a residual sum), ranks the channels
of each such group by L1 norm, removes the weakest ones, and fine-tunes the smaller model on
the data the caller passes. That data must be **server-side** data (in a real federation: a
small public or server-held set), never the test split the export pipeline validates on, or
the reported accuracy would be optimistic.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pollinate.errors import ConfigError

__all__ = ["MAX_AMOUNT", "PruneResult", "SupervisedLoss", "cross_entropy_loss", "prune_structured"]

#: Largest pruning amount accepted (share of channels removed from each layer group).
MAX_AMOUNT = 0.95
#: Fine-tune batch size and learning rate (Adam). 1e-2 suits the tiny pruned default CNN
#: but scatters a pruned ResNet (MNIST, 75%: -1.7 to +1.1 points of accuracy drop over three
#: seeds, where 3e-3 gains 2.3 to 3.1 points); with 3e-3 the default CNN drops 0.2-0.5.
_BATCH = 32
#: Candidate learning rates, the better chosen on a fifth of the fine-tune data held out
#: (server-side data, never the test split): 1e-2 suits the tiny default CNN (3e-3 lost up
#: to a point there), 3e-3 the pruned ResNet (1e-2 scattered it from +1.7 to -1.1 points).
_LRS = (1e-2, 3e-3)
#: Distillation temperature and the weight of the distillation term in the fine-tune loss.
_TEMPERATURE = 4.0
_DISTILL_WEIGHT = 0.3
#: Layers whose output channels head a pruning group (torch-pruning's "root" layers).
_ROOTS: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)

#: ``loss(outputs, targets)``: the supervised fine-tune loss of a batch (per-sample losses are
#: averaged). The default, :func:`cross_entropy_loss`, reads integer class labels.
SupervisedLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class logits ``(N, K)`` against integer labels ``(N,)``."""
    return nn.functional.cross_entropy(outputs, targets.long())


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_structured` produced.

    Attributes:
        model: The pruned, fine-tuned dense model (a pruned copy of the input, in eval mode).
        kept_channels: For every convolution and linear layer, by module name,
            ``(output channels before, output channels after)``.
        params_before: Parameters of the original model.
        params_after: Parameters of the pruned model.
        recipe: One line for the bundle manifest.
    """

    model: nn.Module
    kept_channels: dict[str, tuple[int, int]]
    params_before: int
    params_after: int
    recipe: str


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution and linear layer, by module name."""
    widths: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            widths[name] = module.out_features
    return widths


def _check_inputs(
    model: nn.Module,
    amount: float,
    x: np.ndarray | None,
    y: np.ndarray | None,
    epochs: int,
) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"structured pruning needs a torch.nn.Module, got {type(model).__name__}")
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


def _output_layers(graph: Any) -> list[nn.Module]:
    """The convolution / linear layers whose outputs reach the model's outputs unmixed.

    Walks back from the graph's sinks (nodes nothing else reads) through channel-preserving
    operations (activations, norms, reshapes, sums) to the first layers that set a width.
    """
    stack = [node for node in graph.module2node.values() if not node.outputs]
    found: list[nn.Module] = []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, _ROOTS):
            found.append(node.module)
        else:
            stack.extend(node.inputs)
    return found


def _channel_groups(graph: Any, group: Any) -> tuple[int, bool]:
    """The equal channel groups ``group``'s layers impose, and whether positions are shared.

    A GroupNorm of ``G`` groups needs every group to lose the same number of channels but may
    choose different ones in each; a grouped convolution needs the same positions in each group.
    """
    count, shared = 1, False
    for dep, _ in group:
        module = dep.target.module
        pruner = graph.get_pruner_of_module(module) if isinstance(module, nn.Module) else None
        if pruner is None:
            continue
        if isinstance(module, nn.modules.conv._ConvNd):
            if module.groups == module.out_channels:  # depthwise: coupled one to one
                continue
            shared = shared or module.groups > 1
        if graph.is_out_channel_pruning_fn(dep.handler):
            count = math.lcm(count, int(pruner.get_out_channel_groups(module)))
        elif graph.is_in_channel_pruning_fn(dep.handler):
            count = math.lcm(count, int(pruner.get_in_channel_groups(module)))
    return count, shared


def _weakest(importance: torch.Tensor, amount: float, groups: int, shared: bool) -> list[int]:
    """Indices of the channels to remove: the lowest-scoring ``amount`` of each channel group.

    Each channel group keeps ``round((1 - amount) * size)`` channels, at least one.
    """
    if importance.numel() % groups:
        return []
    size = importance.numel() // groups
    keep = max(1, round((1.0 - amount) * size))
    if keep >= size:
        return []
    scores = importance.detach().float().cpu().reshape(groups, size)
    if shared:
        scores = scores.mean(dim=0, keepdim=True).expand(groups, size)
    drop = torch.argsort(scores, dim=1, stable=True)[:, : size - keep]
    return sorted((drop + torch.arange(groups)[:, None] * size).flatten().tolist())


def _recurrent_layer(model: nn.Module) -> str | None:
    """``name (Class)`` of the first recurrent layer of ``model`` (torch's or Opacus'), if any."""
    kinds: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)
    try:
        from opacus.layers.dp_rnn import DPRNNBase

        kinds = (*kinds, DPRNNBase)
    except ImportError:  # pragma: no cover - opacus is a dependency of pollinate
        pass
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            return f"{name} ({type(module).__name__})"
    return None


def _unprunable(label: str, why: str) -> ConfigError:
    return ConfigError(
        f"cannot prune model {label}: {why}; export without --prune, or use a model of "
        "convolution and linear layers (e.g. 'cnn', 'mlp', 'resnet')"
    )


def _prune_copy(model: nn.Module, example: torch.Tensor, amount: float, label: str) -> nn.Module:
    """A copy of ``model`` with the weakest ``amount`` of each prunable channel group removed."""
    import torch_pruning as tp  # type: ignore[import-untyped]

    recurrent = _recurrent_layer(model)
    if recurrent is not None:
        raise _unprunable(
            label, f"its recurrent layer {recurrent} cannot be pruned (channel pruning covers "
            "convolution and linear layers only)",
        )  # fmt: skip
    pruned = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            expected = tuple(model(example).shape)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(
                pruned, example_inputs=example, verbose=False
            )
            score = tp.importance.GroupMagnitudeImportance(p=1)
            candidates = 0
            plans: list[tuple[Any, Any, list[int]]] = []
            for group in graph.get_all_groups(
                ignored_layers=_output_layers(graph), root_module_types=_ROOTS
            ):
                groups, shared = _channel_groups(graph, group)
                importance = score(group)
                if importance is None:
                    continue
                candidates += 1
                drop = _weakest(importance, amount, groups, shared)
                if drop:
                    plans.append((group[0].dep.target.module, group[0].dep.handler, drop))
            for module, handler, drop in plans:
                graph.get_pruning_group(module, handler, drop).prune(record_history=False)
        with torch.no_grad():
            got = tuple(pruned(example).shape)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise _unprunable(
            label, f"torch-pruning cannot trace or cut it ({type(err).__name__}: {reason})"
        ) from err
    if candidates == 0 and amount > 0:
        raise _unprunable(
            label, "it has no channels that can be removed without changing its outputs"
        )
    if got != expected:
        raise _unprunable(label, f"pruning changed its output shape from {expected} to {got}")
    return pruned


def _finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    seed: int,
    loss_fn: SupervisedLoss = cross_entropy_loss,
    lr: float = _LRS[-1],
) -> None:
    """Adam on (x, y) for ``epochs`` with ``loss_fn``; with a teacher, plus distillation."""
    xs = torch.tensor(np.asarray(x, dtype=np.float32))
    ys = torch.as_tensor(np.asarray(y))
    soft: torch.Tensor | None = None
    if teacher is not None:
        teacher.eval()
        with torch.no_grad():
            soft = torch.log_softmax(teacher(xs) / _TEMPERATURE, dim=1)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, epochs * math.ceil(len(xs) / _BATCH))
    )
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), _BATCH):
            idx = order[start : start + _BATCH]
            logits = student(xs[idx])
            loss = loss_fn(logits, ys[idx]).mean()
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


def _tuned(
    pruned: nn.Module,
    teacher: nn.Module | None,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    seed: int,
    loss: SupervisedLoss,
) -> nn.Module:
    """The pruned model fine-tuned with each of :data:`_LRS` on four fifths of (x, y); the
    one with the lower loss on the last fifth (too few samples: the last rate on all)."""
    n = len(x)
    held = n // 5 if n >= 10 else 0
    if held == 0:
        _finetune(pruned, teacher, x, y, epochs=epochs, seed=seed, loss_fn=loss)
        return pruned
    order = np.random.default_rng(seed).permutation(n)
    fit, val = order[held:], order[:held]
    x_val = torch.tensor(np.asarray(x, dtype=np.float32)[val])
    y_val = torch.as_tensor(np.asarray(y)[val])
    best: tuple[float, nn.Module] | None = None
    for lr in _LRS:
        candidate = copy.deepcopy(pruned)
        _finetune(candidate, teacher, np.asarray(x)[fit], np.asarray(y)[fit], epochs=epochs,
                  seed=seed, loss_fn=loss, lr=lr)  # fmt: skip
        with torch.no_grad():
            score = float(loss(candidate(x_val), y_val).mean())
        if best is None or score < best[0]:
            best = (score, candidate)
    assert best is not None
    return best[1]


def prune_structured(
    model: nn.Module,
    *,
    input_shape: tuple[int, ...],
    amount: float,
    finetune_x: np.ndarray | None,
    finetune_y: np.ndarray | None,
    epochs: int = 10,
    seed: int = 0,
    distill: bool = True,
    loss: SupervisedLoss = cross_entropy_loss,
    name: str | None = None,
) -> PruneResult:
    """Remove the weakest ``amount`` of channels of every layer group and fine-tune the rest.

    torch-pruning traces a copy of ``model`` on a zero batch of ``input_shape`` and groups the
    layers whose channels are coupled. Every group headed by a convolution or linear layer is
    ranked by the mean L1 norm of its weights per channel (the layer's filters and the next
    layers' input weights); each keeps ``round((1 - amount) * C)`` channels, at least one. A
    GroupNorm keeps its number of groups, so every norm group keeps that share of its channels.
    The layers that produce the outputs keep their width and the first layer keeps its input
    channels, so the pruned model takes and returns tensors of the same shapes.

    Removing channels changes the activations, so the model is then fine-tuned (Adam, cosine
    schedule, one CPU thread) on ``finetune_x`` / ``finetune_y`` with ``loss``; with ``distill``
    the loss adds knowledge distillation from the unpruned model's logits on the same samples.
    The fine-tune data must be data the server holds (a public or server-side set): never the
    split the exported artifacts are validated on.

    Args:
        model: The trained model; it is not modified.
        input_shape: Shape of one input sample, without the batch dimension.
        amount: Share of channels removed from each layer group, in ``[0, 0.95]``.
        finetune_x: Server-side samples ``(N, *input_shape)``; ``None`` skips the fine-tune.
        finetune_y: Their targets, ``(N,)`` (integer labels for the default loss).
        epochs: Fine-tune epochs (0 skips it).
        seed: Seed of the fine-tune shuffling.
        distill: Distil the unpruned model's logits into the pruned one while fine-tuning.
        loss: The supervised loss ``loss(outputs, targets)``; cross-entropy by default.
        name: What error messages call the model (a registry name); its class name if ``None``.

    Returns:
        The pruned model (eval mode) and what was done.

    Raises:
        ConfigError: ``amount`` or ``epochs`` is out of range, the fine-tune data is
            inconsistent, or torch-pruning cannot prune the model (an LSTM, a graph it cannot
            trace): the message names the model and the reason.
    """
    _check_inputs(model, amount, finetune_x, finetune_y, epochs)
    label = f"{name!r} ({type(model).__name__})" if name else type(model).__name__
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    was_training = model.training
    try:
        torch.manual_seed(seed)
        model.eval()
        pruned = _prune_copy(model, torch.zeros((2, *input_shape)), float(amount), label)
        tuned = finetune_x is not None and finetune_y is not None and epochs > 0
        if finetune_x is not None and finetune_y is not None and epochs > 0:
            teacher = model if distill else None
            pruned = _tuned(pruned, teacher, finetune_x, finetune_y, epochs, seed, loss)
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    pruned.eval()
    before, after = _widths(model), _widths(pruned)
    kept = {layer: (before[layer], after[layer]) for layer in before}
    cut = [layer for layer, (old, new) in kept.items() if new < old]
    params_before, params_after = _count(model), _count(pruned)
    recipe = (
        f"structured L1 channel pruning (torch-pruning) of {amount:.0%}: {len(cut)} layers, "
        f"{sum(before[k] for k in cut)}->{sum(after[k] for k in cut)} channels, "
        f"{params_before}->{params_after} parameters"
    )
    if tuned:
        assert finetune_x is not None
        how = " with distillation" if distill else ""
        recipe += f", fine-tuned {epochs} epochs on {len(finetune_x)} server-side samples{how}"
    else:
        recipe += ", not fine-tuned"
    return PruneResult(
        model=pruned,
        kept_channels=kept,
        params_before=params_before,
        params_after=params_after,
        recipe=recipe,
    )
