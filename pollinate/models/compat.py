"""Checks a model must pass before anyone trains it: DP-SGD compatibility and output shape.

Both run before the first round (``pollinate simulate`` and the ServerApp's setup), so a
model with a BatchNorm layer or the wrong number of outputs is one clear line, not a
traceback in round 1 on every client.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pollinate.errors import ConfigError
from pollinate.models.registry import build_model

__all__ = ["check_dp_compatible", "check_output", "checked_model", "dp_problems"]

_FIX_HINT = (
    "Pass --fix-model (run config fix-model = true) to let Opacus replace them "
    "(BatchNorm -> GroupNorm, LSTM/GRU/MultiheadAttention -> their DP versions), or change "
    "the model"
)


def dp_problems(model: nn.Module) -> list[str]:
    """Each layer of ``model`` that DP-SGD cannot train, as ``"name (Type): why"``."""
    from opacus.validators import ModuleValidator

    problems: list[str] = []
    for name, module in model.named_modules():
        label = f"{name or '<model>'} ({type(module).__name__})"
        validator = ModuleValidator.VALIDATORS.get(type(module))
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
    spec: str, input_shape: tuple[int, ...], num_outputs: int, *, fix: bool, dp: bool
) -> nn.Module:
    """:func:`build_model`, then :func:`check_output`, and with ``dp`` (DP-SGD)
    :func:`check_dp_compatible`: the model a run starts from, or one ConfigError."""
    model = build_model(spec, input_shape=input_shape, num_classes=num_outputs, fix=fix)
    try:
        check_output(model, spec, input_shape, num_outputs)
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
    model: nn.Module, spec: str, input_shape: tuple[int, ...], num_outputs: int
) -> None:
    """ConfigError unless a batch of two samples gives ``(2, num_outputs)`` outputs.

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
            f"needs (2, {num_outputs}), one output per class"
        )
