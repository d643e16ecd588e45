"""Checks a model must pass before anyone trains it: DP-SGD compatibility and output shape.

Both run before the first round (``pollinate simulate`` and the ServerApp's setup), so a
model with a BatchNorm layer or the wrong number of outputs is one clear line, not a
traceback in round 1 on every client.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from pollinate.errors import ConfigError
from pollinate.models.registry import build_model
from pollinate.tasks import Task, TaskKind, check_loss_hook

__all__ = ["check_dp_compatible", "check_output", "checked_model", "dp_problems"]

_FIX_HINT = (
    "Pass --fix-model (run config fix-model = true) to let Opacus replace them "
    "(BatchNorm -> GroupNorm, LSTM/GRU/MultiheadAttention -> their DP versions), or change "
    "the model"
)


#: torch.nn layers none of Opacus' validators covers (a test keeps this true). Opacus registers
#: validators for torch.nn types only (BatchNorm, InstanceNorm, LSTM, GRU, attention), so a
#: model built of these layers and of classes from outside torch needs none of them, and its
#: check skips importing Opacus (``opacus/__init__`` takes seconds: the whole PrivacyEngine).
PLAIN_LAYERS: frozenset[type[nn.Module]] = frozenset(
    {
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Bilinear, nn.Embedding,
        nn.EmbeddingBag, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.Sequential,
        nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout,
        nn.Dropout1d, nn.Dropout2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU,
        nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softmax, nn.LogSoftmax,
        nn.Hardswish, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
        nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
    }
)  # fmt: skip


def _validators(model: nn.Module) -> dict[type, Callable[[nn.Module], list[Any]]]:
    """Opacus' validators by layer type; none needed (Opacus not imported) for a model of
    :data:`PLAIN_LAYERS` and non-torch classes, unless Opacus is loaded already (a user may
    have registered their own)."""
    if "opacus.validators" not in sys.modules and all(
        type(m) in PLAIN_LAYERS or not type(m).__module__.startswith("torch.")
        for m in model.modules()
    ):
        return {}
    from opacus.validators import ModuleValidator

    return dict(ModuleValidator.VALIDATORS)


def dp_problems(model: nn.Module) -> list[str]:
    """Each layer of ``model`` that DP-SGD cannot train, as ``"name (Type): why"``."""
    validators = _validators(model)
    problems: list[str] = []
    for name, module in model.named_modules():
        label = f"{name or '<model>'} ({type(module).__name__})"
        validator = validators.get(type(module))
        if validator is not None:
            for err in validator(module):
                why = str(err).split(". ")[0].rstrip(".")
                problems.append(f"{label}: {why}")
            continue
        own_params = any(p.requires_grad for p in module.parameters(recurse=False))
        if own_params and any(True for _ in module.buffers(recurse=False)):
            problems.append(f"{label}: a trainable layer with buffers (not private)")
    return problems


def check_dp_compatible(model: nn.Module, spec: str) -> None:
    """ConfigError naming every layer DP-SGD cannot train, with the fix."""
    problems = dp_problems(model)
    if problems:
        listed = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise ConfigError(f"model {spec!r} cannot be trained with DP-SGD: {listed}. {_FIX_HINT}")


def checked_model(
    spec: str,
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    fix: bool,
    dp: bool,
    task: Task | None = None,
) -> nn.Module:
    """:func:`build_model`, then :func:`check_output` (with ``task``: its output width and
    its loss on the outputs), and with ``dp`` (DP-SGD) :func:`check_dp_compatible`: the model
    a run starts from, or one ConfigError."""
    if task is not None:
        num_outputs = task.num_outputs
    model = build_model(spec, input_shape=input_shape, num_classes=num_outputs, fix=fix)
    try:
        check_output(model, spec, input_shape, num_outputs, task=task)
    except ConfigError as err:
        if not fix:
            raise
        raise ConfigError(
            f"{err} (with --fix-model: where Opacus put GroupNorm in place of a BatchNorm on flat "
            "features, each group normalizes a single value; use nn.LayerNorm there instead)"
        ) from None
    if dp:
        check_dp_compatible(model, spec)
    return model


@torch.no_grad()
def check_output(
    model: nn.Module,
    spec: str,
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    task: Task | None = None,
) -> None:
    """ConfigError unless a batch of two samples gives ``(2, num_outputs)`` outputs (and, with
    ``task``, its loss gives one number per sample on them).

    The batch goes through a copy of ``model`` in training mode, as training will run it
    (normalization layers check their inputs only there); ``model`` itself is untouched.
    """
    batch = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
    probe = copy.deepcopy(model).train()
    try:
        out = probe(batch)
    except Exception as err:
        raise ConfigError(
            f"model {spec!r} fails on a batch of shape {tuple(batch.shape)} (the data's "
            f"sample shape {tuple(input_shape)}): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"model {spec!r} returns a {type(out).__name__}; it must return one tensor of "
            "outputs per sample"
        )
    if tuple(out.shape) != (2, num_outputs):
        raise ConfigError(
            f"model {spec!r} returns shape {tuple(out.shape)} for a batch of 2; the task "
            f"needs (2, {num_outputs}), {_what_outputs(task, num_outputs)}"
        )
    if task is not None:
        targets = torch.zeros(2, dtype=torch.from_numpy(np.zeros(0, task.target_dtype)).dtype)
        check_loss_hook(task, out, targets)


def _what_outputs(task: Task | None, num_outputs: int) -> str:
    if task is None or task.kind == TaskKind.CLASSIFICATION:
        hint = ""
        if task is not None and num_outputs == 2:
            hint = " (or set task = 'binary' for one output with a logistic loss)"
        return "one output per class" + hint
    if task.kind == TaskKind.BINARY:
        return (
            "one output per sample, the logit of class 1 (or set task = 'classification' for "
            "one output per class)"
        )
    return "one output per sample, the predicted value"
