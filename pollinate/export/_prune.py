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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pollinate.errors import ConfigError
from pollinate.export._finetune import SupervisedLoss, cross_entropy_loss, tuned

__all__ = ["MAX_AMOUNT", "PruneResult", "SupervisedLoss", "cross_entropy_loss", "prune_structured"]

#: Largest pruning amount accepted (share of channels removed from each layer group).
MAX_AMOUNT = 0.95
#: Layers whose output channels head a pruning group (torch-pruning's "root" layers).
_ROOTS: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


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
        finetuned = finetune_x is not None and finetune_y is not None and epochs > 0
        if finetune_x is not None and finetune_y is not None and epochs > 0:
            teacher = model if distill else None
            pruned = tuned(pruned, teacher, finetune_x, finetune_y, epochs, seed, loss)
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
    if finetuned:
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
