"""Roll-out decisions shared by the worker processes of one ``pollinate serve --workers N``.

Worker 0 leads: it judges each canary as a single-process server does (on the traffic it
serves) and writes the outcome here. The other workers never judge; they apply worker 0's
decision to the same version, recognised by its files' fingerprint, so every worker promotes
or rolls back together. A worker that starts (or restarts) takes the newest promoted version
as its current one and never a rolled-back one. Worker 0 is the only writer; each write
replaces the whole file atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pollinate._atomic import atomic_write_text
from pollinate.log import logger
from pollinate.serving.repository import VersionFiles

__all__ = ["Outcome", "RolloutLedger"]


Outcome = Literal["promoted", "rolled_back"]


def _fingerprint(files: VersionFiles) -> list[list[Any]]:
    return [list(entry) for entry in files.fingerprint]


class RolloutLedger:
    """``path``: the shared JSON file; ``leader``: whether this worker decides (worker 0)."""

    def __init__(self, path: Path, *, leader: bool) -> None:
        self.path = Path(path)
        self.leader = leader

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            logger.warning("cannot read the roll-out ledger %s: %s", self.path, err)
            return {}
        return data if isinstance(data, dict) else {}

    def outcome(self, model: str, files: VersionFiles) -> Outcome | None:
        """What worker 0 decided for these exact files of ``model`` (None: nothing yet)."""
        return _outcome(self._read(), model, files)

    def record(self, model: str, files: VersionFiles, outcome: Outcome) -> None:
        """Write worker 0's decision for ``files`` (the leader only)."""
        if not self.leader:
            raise RuntimeError("only worker 0 records roll-out decisions")
        data = self._read()
        entry = {"outcome": outcome, "fingerprint": _fingerprint(files)}
        data.setdefault(model, {})[str(files.version)] = entry
        atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")

    def starting_version(self, model: str, versions: dict[int, VersionFiles]) -> VersionFiles:
        """The version a starting worker serves: the newest one promoted, else the newest one
        not rolled back (else the newest)."""
        data = self._read()  # once, not once per version
        decided = {v: _outcome(data, model, f) for v, f in versions.items()}
        promoted = [v for v, outcome in decided.items() if outcome == "promoted"]
        if promoted:
            return versions[max(promoted)]
        usable = [v for v, outcome in decided.items() if outcome != "rolled_back"]
        return versions[max(usable or versions)]


def _outcome(data: dict[str, Any], model: str, files: VersionFiles) -> Outcome | None:
    entry = data.get(model, {}).get(str(files.version))
    if not isinstance(entry, dict) or entry.get("fingerprint") != _fingerprint(files):
        return None
    outcome = entry.get("outcome")
    return outcome if outcome in ("promoted", "rolled_back") else None
