"""The durable privacy ledger a device keeps in its state directory, and its identity.

The ledger of a device is keyed by the device, not by the node id the SuperLink hands out:
``STATE_DIR/device-id`` names it and ``STATE_DIR/device.accountant.json`` holds its whole
DP history, so a device that re-registers under a new node id keeps its epsilon. Once a device
has an identity, a missing or corrupt ledger means lost history: the device refuses to train
until its operator starts a new ledger explicitly (``pollinate edge run --start-new-ledger``,
logged in ``ledger-restarts.jsonl``). Refused tasks are counted in ``refusals.json``.
Loading the ledger also keeps the accountant's one-step RDP curves in ``rdp-curves.json``
beside it (:func:`pollinate.privacy.rdp.keep_curves_in`), so each message's fork reads them
instead of computing them again.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

from pollinate._atomic import append_line, atomic_write_text
from pollinate.errors import ConfigError, PrivacyLedgerError
from pollinate.log import logger
from pollinate.privacy import ClientAccountant
from pollinate.privacy.rdp import CURVES_FILE, keep_curves_in

__all__ = ["ACCOUNTANT_FILE", "IDENTITY_FILE", "REFUSALS_FILE", "RESTARTS_FILE", "DeviceLedger"]

IDENTITY_FILE = "device-id"
ACCOUNTANT_FILE = "device.accountant.json"
REFUSALS_FILE = "refusals.json"
RESTARTS_FILE = "ledger-restarts.jsonl"


class DeviceLedger:
    """A device's identity and its whole DP history, in its state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)

    @property
    def accountant_path(self) -> Path:
        """Where the accountant lives."""
        return self.state_dir / ACCOUNTANT_FILE

    def identity(self) -> str:
        """This device's stable id; a device seen for the first time gets one (and an empty
        ledger). Naming the device never checks its ledger: :meth:`load` does."""
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
        return device_id

    def load(self, *, allow_new: bool = False) -> ClientAccountant:
        """The device's accountant; with ``allow_new`` a lost ledger is replaced by an empty one
        (the operator's explicit choice, logged in ``ledger-restarts.jsonl``)."""
        keep_curves_in(self.state_dir / CURVES_FILE)
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
        append_line(self.state_dir / RESTARTS_FILE, json.dumps(note))
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
