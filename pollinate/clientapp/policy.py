"""The device's own privacy policy, and the durable privacy ledger it keeps in its state dir.

A task is what the server asks; the policy is what the device owner allows. A task asking for
weaker privacy than the policy (no DP where DP is required, less noise than the floor, a larger
clipping norm than the ceiling, more local epochs, reproducible test noise) is refused, never
trained, and the refusal is counted on the device and reported to the server.

The ledger of a device is keyed by the device, not by the node id the SuperLink hands out:
``STATE_DIR/device-id`` names it and ``STATE_DIR/device.accountant.json`` holds its whole
DP history, so a device that re-registers under a new node id keeps its epsilon. Once a device
has an identity, a missing or corrupt ledger means lost history: the device refuses to train
until its operator starts a new ledger explicitly (``pollinate edge run --start-new-ledger``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pollinate._atomic import atomic_write_text
from pollinate.protocol import ClientTask
from pollinate.errors import ConfigError, PrivacyLedgerError
from pollinate.log import logger
from pollinate.privacy import ClientAccountant

__all__ = [
    "ACCOUNTANT_FILE",
    "IDENTITY_FILE",
    "POLICY_KEYS",
    "REFUSALS_FILE",
    "DeviceLedger",
    "DevicePolicy",
]

IDENTITY_FILE = "device-id"
ACCOUNTANT_FILE = "device.accountant.json"
REFUSALS_FILE = "refusals.json"
RESTARTS_FILE = "ledger-restarts.jsonl"

#: node-config keys of the policy (``pollinate edge run`` sets them from its flags)
POLICY_KEYS = (
    "privacy-dp",
    "privacy-min-noise",
    "privacy-max-clip",
    "privacy-max-epochs",
    "epsilon-budget",
    "new-ledger",
)


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
    """

    device: bool
    require_dp: bool
    min_noise: float = 0.0
    max_clip: float = 0.0
    max_epochs: int = 0
    budget: float = 0.0
    new_ledger: bool = False

    @classmethod
    def from_node_config(cls, node: Mapping[str, object]) -> DevicePolicy:
        """The policy of a node; a device requires DP-SGD unless it says ``privacy-dp="none"``."""
        device = bool(node.get("state-dir")) or "data-path" in node
        mode = str(node.get("privacy-dp", "sample" if device else "task"))
        if mode not in ("sample", "none", "task"):
            raise ConfigError(
                f'node config \'privacy-dp\' must be "sample" or "none", got {mode!r}'
            )
        epochs = _float(node, "privacy-max-epochs")
        return cls(
            device=device,
            require_dp=mode == "sample",
            min_noise=_float(node, "privacy-min-noise"),
            max_clip=_float(node, "privacy-max-clip"),
            max_epochs=int(epochs),
            budget=_float(node, "epsilon-budget"),
            new_ledger=str(node.get("new-ledger", "false")).lower() in ("true", "1", "yes"),
        )

    def budget_for(self, task: ClientTask) -> float:
        """The stricter of the task's and the owner's budget (0 means none)."""
        positive = [b for b in (task.epsilon_budget, self.budget) if b > 0]
        return min(positive) if positive else 0.0

    def refusal(self, task: ClientTask, *, evaluate: bool = False) -> str | None:
        """Why this task asks for weaker privacy than the policy allows, or None."""
        problems: list[str] = []
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
        return "refused: the task asks for weaker privacy than this device allows: " + "; ".join(
            problems
        )


class DeviceLedger:
    """A device's identity and its whole DP history, in its state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)

    @property
    def accountant_path(self) -> Path:
        """Where the accountant lives."""
        return self.state_dir / ACCOUNTANT_FILE

    def identity(self, *, allow_new: bool = False) -> str:
        """This device's stable id; a device seen for the first time gets one (and an empty
        ledger). Raises :class:`PrivacyLedgerError` when the id exists but its ledger is gone."""
        id_path = self.state_dir / IDENTITY_FILE
        try:
            device_id = id_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            device_id = ""
        except OSError as err:
            raise PrivacyLedgerError(f"cannot read the device identity {id_path}: {err}") from err
        if not device_id:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            if not self.accountant_path.exists():
                ClientAccountant().save(self.accountant_path)
            device_id = uuid.uuid4().hex
            atomic_write_text(id_path, device_id + "\n")
            logger.info("new device %s: an empty privacy ledger in %s", device_id, self.state_dir)
        self.load(allow_new=allow_new)
        return device_id

    def load(self, *, allow_new: bool = False) -> ClientAccountant:
        """The device's accountant; with ``allow_new`` a lost ledger is replaced by an empty one
        (the operator's explicit choice, logged in ``ledger-restarts.jsonl``)."""
        path = self.accountant_path
        try:
            if not path.exists():
                raise PrivacyLedgerError(
                    f"this device's privacy ledger {path} is missing, so the epsilon it has "
                    "spent is unknown"
                )
            return ClientAccountant.load(path)
        except (PrivacyLedgerError, ConfigError) as err:
            if not allow_new:
                raise PrivacyLedgerError(
                    f"{err}; it refuses to train until its operator starts a new ledger "
                    "(pollinate edge run ... --start-new-ledger, which forgets the lost history)"
                ) from err
            return self._start_new(str(err))

    def _start_new(self, reason: str) -> ClientAccountant:
        path = self.accountant_path
        if path.exists():
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
            path.replace(path.with_name(f"{path.name}.lost-{stamp}"))
        fresh = ClientAccountant()
        fresh.save(path)
        note = {"at": dt.datetime.now(dt.UTC).isoformat(), "reason": reason}
        with (self.state_dir / RESTARTS_FILE).open("a", encoding="utf-8") as log:
            log.write(json.dumps(note) + "\n")
        logger.warning("started a new privacy ledger on the operator's request: %s", reason)
        return fresh

    def save(self, accountant: ClientAccountant) -> None:
        """Write the accountant atomically."""
        accountant.save(self.accountant_path)

    def note_refusal(self, reason: str, *, run_id: int, server_round: int) -> int:
        """Count a refused task; returns the device's total of refusals."""
        counts = self.refusals()
        previous = counts.get("total", 0)
        total = (previous if isinstance(previous, int) else 0) + 1
        record = {
            "total": total,
            "last": {
                "reason": reason,
                "run_id": run_id,
                "server_round": server_round,
                "at": dt.datetime.now(dt.UTC).isoformat(),
            },
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.state_dir / REFUSALS_FILE, json.dumps(record) + "\n")
        return total

    def refusals(self) -> dict[str, object]:
        """The refusal counter (``total`` and the ``last`` one), empty when none."""
        try:
            data = json.loads((self.state_dir / REFUSALS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}
