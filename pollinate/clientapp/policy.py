"""The device's own privacy policy, checked before a task runs.

A task is what the server asks; the policy is what the device owner allows (node-config keys
:data:`pollinate.protocol.POLICY_KEYS`, set by ``pollinate edge run``). A task asking for
weaker privacy than the policy (no DP where DP is required, less noise than the floor, a larger
clipping norm than the ceiling, more local epochs, reproducible test noise) is refused, never
trained, and the refusal is counted on the device (:class:`pollinate.device.ledger.DeviceLedger`)
and reported to the server. So is a task naming a model or a data loader by an import path the
owner did not allow (``pollinate edge run --allow-import``): importing a module is running its
code, and a device runs only code its owner chose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from pollinate._imports import is_import_path
from pollinate.errors import ConfigError
from pollinate.protocol import ClientTask, NodeKey

__all__ = ["DevicePolicy"]


def _float(node: Mapping[str, object], key: str) -> float:
    value = node.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"node config {key!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"node config {key!r} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"node config {key!r} must be a finite number >= 0, got {value!r}")
    return number


@dataclass(frozen=True)
class DevicePolicy:
    """What this node's owner allows, from its node config.

    Attributes:
        device: A real device (its node config names a ``state-dir`` or ``data-path``), as
            opposed to a node of the server's own simulation.
        require_dp: Train only with DP-SGD (a device's default; ``privacy-dp="none"`` lifts it).
        min_noise: Noise-multiplier floor (0: any positive noise).
        max_clip: Ceiling on the clipping norm (0: none).
        max_epochs: Ceiling on local epochs per round (0: none).
        budget: The owner's own epsilon budget (0: none); the stricter of it and the task's wins.
        new_ledger: The operator's explicit consent to start a new ledger over a lost one.
        allowed_imports: Import paths (models, data loaders) this device may import; registered
            models, built-in datasets and files are always allowed, and a simulation's own
            nodes allow any.
        own_data: The device trains on its own data (``data-path``), so a task's data loader
            is never imported there.
    """

    device: bool
    require_dp: bool
    min_noise: float = 0.0
    max_clip: float = 0.0
    max_epochs: int = 0
    budget: float = 0.0
    new_ledger: bool = False
    allowed_imports: tuple[str, ...] = ()
    own_data: bool = False

    @classmethod
    def from_node_config(cls, node: Mapping[str, object]) -> DevicePolicy:
        """The policy of a node; a device requires DP-SGD unless it says ``privacy-dp="none"``."""
        device = bool(node.get(NodeKey.STATE_DIR)) or NodeKey.DATA_PATH in node
        mode = str(node.get(NodeKey.PRIVACY_DP, "sample" if device else "task"))
        if mode not in ("sample", "none", "task"):
            raise ConfigError(
                f'node config \'privacy-dp\' must be "sample" or "none", got {mode!r}'
            )
        epochs = _float(node, NodeKey.PRIVACY_MAX_EPOCHS)
        return cls(
            device=device,
            require_dp=mode == "sample",
            min_noise=_float(node, NodeKey.PRIVACY_MIN_NOISE),
            max_clip=_float(node, NodeKey.PRIVACY_MAX_CLIP),
            max_epochs=int(epochs),
            budget=_float(node, NodeKey.EPSILON_BUDGET),
            new_ledger=str(node.get(NodeKey.NEW_LEDGER, "false")).lower() in ("true", "1", "yes"),
            own_data=NodeKey.DATA_PATH in node,
            allowed_imports=tuple(
                m.strip()
                for m in str(node.get(NodeKey.ALLOWED_IMPORTS, "")).split(",")
                if m.strip()
            ),
        )

    def budget_for(self, task: ClientTask) -> float:
        """The stricter of the task's and the owner's budget (0 means none)."""
        positive = [b for b in (task.epsilon_budget, self.budget) if b > 0]
        return min(positive) if positive else 0.0

    def refusal(self, task: ClientTask, *, evaluate: bool = False) -> str | None:
        """Why this task asks for weaker privacy than the policy allows, or None."""
        problems: list[str] = []
        wanted = [("model", task.model), ("loss", task.loss)]
        wanted += [] if self.own_data else [("data", task.dataset)]
        for what, spec in wanted:
            if self.device and is_import_path(spec) and spec not in self.allowed_imports:
                problems.append(
                    f"it asks for {what} {spec!r}, an import path this device does not allow "
                    f"(its owner can: pollinate edge run --allow-import {spec})"
                )
        if task.reproducible_noise and (self.device or self.require_dp):
            problems.append("it asks for reproducible (seeded) noise, which is for tests only")
        if self.require_dp and not task.dp:
            problems.append("it asks for no DP, this device trains only with DP-SGD")
        if task.dp and self.min_noise > 0:
            noise = task.eval_noise_multiplier if evaluate else task.noise_multiplier
            if noise < self.min_noise:
                problems.append(f"noise multiplier {noise:g} is below the floor {self.min_noise:g}")
        if not evaluate and task.dp and self.max_clip > 0 and task.max_grad_norm > self.max_clip:
            problems.append(
                f"clipping norm {task.max_grad_norm:g} is above the ceiling {self.max_clip:g}"
            )
        if not evaluate and self.max_epochs > 0 and task.local_epochs > self.max_epochs:
            problems.append(f"{task.local_epochs} local epochs, the ceiling is {self.max_epochs}")
        if not problems:
            return None
        return "refused: the task asks for more than this device allows: " + "; ".join(problems)
