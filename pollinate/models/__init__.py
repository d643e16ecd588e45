"""Models: the built-ins, and the plug-in point for a user's own.

* :func:`build_model` builds a model from a spec: a registered name (``cnn``, ``mlp``,
  ``opacus-mnist``, ``lstm``, ``resnet``, ``scatnet``) or an import path ``"pkg.module:Net"``
  (:mod:`pollinate.models.registry`).
* :func:`register_model` adds a name; the built-ins (:mod:`pollinate.models.builtin`) use it.
* :func:`check_dp_compatible` / :func:`check_output` (:mod:`pollinate.models.compat`) refuse,
  before training, a model DP-SGD cannot train or whose outputs do not fit the task.
"""

from __future__ import annotations

from pollinate.models.builtin import MLP, OpacusMnistCNN, SmallCNN
from pollinate.models.compat import check_dp_compatible, check_output, checked_model, dp_problems
from pollinate.models.registry import (
    MODELS,
    build_model,
    fix_for_dp,
    is_import_path,
    model_label,
    register_model,
    resolve_model,
)

__all__ = [
    "MLP",
    "MODELS",
    "OpacusMnistCNN",
    "SmallCNN",
    "build_model",
    "check_dp_compatible",
    "check_output",
    "checked_model",
    "dp_problems",
    "fix_for_dp",
    "is_import_path",
    "model_label",
    "register_model",
    "resolve_model",
]
