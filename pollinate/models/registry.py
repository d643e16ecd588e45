"""The model plug-in point: a registered name or an import path, built the same way.

A model spec is either a registered name (``cnn``, ``mlp``, ``opacus-mnist``, ``lstm``,
``resnet``, ``scatnet``, or one a package adds with :func:`register_model`) or an import path
``"pkg.module:Name"`` naming an
``nn.Module`` class or a factory function. Either is called with the keyword arguments its
signature asks for, out of:

* ``input_shape``: the shape of one sample, e.g. ``(1, 28, 28)``;
* ``num_classes`` / ``num_outputs`` / ``output_size``: the model's output width.

So ``class Net(nn.Module): def __init__(self)`` (Flower's ``flwr new`` template) and
``def make(input_shape, num_classes)`` both work. Every process that builds the model (the
ServerApp, each ClientApp, export, serving) resolves the same spec, so the module must be
importable in all of them (``pollinate simulate`` puts the working directory on the path).

Example::

    model = build_model("mymodels:Net", input_shape=(1, 28, 28), num_classes=10)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from pollinate._imports import import_object, is_import_path
from pollinate.errors import ConfigError

__all__ = [
    "MODELS",
    "OUTPUT_ARGUMENTS",
    "build_model",
    "fix_for_dp",
    "is_import_path",
    "model_label",
    "register_model",
    "resolve_model",
]

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=Callable[..., nn.Module])

#: the registered models by name (the built-ins register on import of :mod:`pollinate.models`)
MODELS: dict[str, ModelFactory] = {}

#: argument names a model may take for its output width (all get the same number)
OUTPUT_ARGUMENTS = ("num_classes", "num_outputs", "output_size")
_SHAPE_ARGUMENT = "input_shape"


def register_model(name: str) -> Callable[[F], F]:
    """Register a model class or factory under ``name`` (a decorator).

    ``name`` is what ``--model`` and the run config's ``model`` accept; it may not contain a
    colon (that marks an import path) and may not be taken already.
    """
    if not name or ":" in name or name != name.strip():
        raise ValueError(f"model name {name!r}: use a non-empty name without ':' or spaces")

    def add(factory: F) -> F:
        if name in MODELS and MODELS[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return add


def resolve_model(spec: str) -> ModelFactory:
    """The class or factory ``spec`` names; ConfigError saying which part does not resolve."""
    if not is_import_path(spec):
        try:
            return MODELS[spec]
        except KeyError:
            choices = ", ".join(sorted(MODELS))
            raise ConfigError(
                f"unknown model {spec!r}; choose one of: {choices}, or give an import path "
                "such as 'mypackage.models:Net'"
            ) from None
    return _import(spec)


def _import(spec: str) -> ModelFactory:
    obj = import_object(spec, "model")
    if not callable(obj):
        raise ConfigError(
            f"model {spec!r} is a {type(obj).__name__}, not an nn.Module class or a factory"
        )
    return obj  # type: ignore[no-any-return]


def _arguments(
    factory: ModelFactory, spec: str, input_shape: tuple[int, ...], num_outputs: int
) -> dict[str, Any]:
    """The keyword arguments ``factory``'s signature asks for; ConfigError for others."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: call it bare
        return {}
    kwargs: dict[str, Any] = {}
    for name, param in params.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name == _SHAPE_ARGUMENT:
            kwargs[name] = tuple(input_shape)
        elif name in OUTPUT_ARGUMENTS:
            kwargs[name] = num_outputs
        elif param.default is param.empty:
            known = ", ".join((_SHAPE_ARGUMENT, *OUTPUT_ARGUMENTS))
            raise ConfigError(
                f"model {spec!r} needs argument {name!r}, which pollinate cannot give (it "
                f"passes only {known}); give it a default or wrap the model in a factory"
            )
    return kwargs


def build_model(
    spec: str,
    *,
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    fix: bool = False,
) -> nn.Module:
    """Build the model ``spec`` names for one sample's ``input_shape`` and ``num_classes``
    outputs (the task's output width: one per class, or 1 for binary and regression);
    ``fix``: replace the layers DP-SGD cannot train (Opacus' ``ModuleValidator.fix``:
    BatchNorm -> GroupNorm, LSTM/GRU/MultiheadAttention -> their DP versions)."""
    factory = resolve_model(spec)
    if num_classes < 1:
        raise ConfigError(f"the model's output width must be at least 1, got {num_classes}")
    kwargs = _arguments(factory, spec, input_shape, num_classes)
    try:
        model = factory(**kwargs)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(
            f"model {spec!r}: building it failed: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model {spec!r} returned an object of type {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    return fix_for_dp(model) if fix else model


def fix_for_dp(model: nn.Module) -> nn.Module:
    """``model`` with the layers DP-SGD cannot train replaced (Opacus' ModuleValidator.fix)."""
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model)
    if not isinstance(fixed, nn.Module):  # pragma: no cover - Opacus returns the module
        raise ConfigError("Opacus' ModuleValidator.fix did not return a model")
    return fixed


def model_label(spec: str) -> str:
    """A file-name-safe name for ``spec``: the registered name, or the import path's last
    part in lower case (``"mymodels:Net"`` -> ``"net"``), e.g. a serving repository's model."""
    if not is_import_path(spec):
        return spec
    last = spec.rpartition(":")[2].rpartition(".")[2]
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in last.lower()) or "model"
