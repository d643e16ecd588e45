"""Retraining triggers from the serving tier, consumed by ``pollinate server run --trigger-dir``.

``pollinate serve --trigger-dir DIR`` writes a ``retrain-*.json`` event when the inputs of
a served model drift. :func:`claim_triggers` takes every pending event by moving it into
``DIR/consumed/`` (one rename each, so two consumers never take the same event); the run is
started; :func:`record` writes the run id into each claimed event. When the run cannot be
started, :func:`release` moves the events back: a trigger is never lost, and never starts
two runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollinate._atomic import atomic_write_text
from pollinate.errors import ConfigError
from pollinate.serving.drift import pending_triggers

__all__ = ["CONSUMED", "Claim", "claim_triggers", "describe", "record", "release"]

CONSUMED = "consumed"


@dataclass(frozen=True)
class Claim:
    """One event taken from the trigger directory."""

    pending: Path  # where it waited
    path: Path  # where it is now (DIR/consumed/NAME)
    event: dict[str, Any]


def claim_triggers(trigger_dir: Path) -> list[Claim]:
    """Move every pending retrain event of ``trigger_dir`` into ``consumed/``, oldest first.

    A missing ``trigger_dir`` holds no events (`pollinate serve` creates it with the first).

    Raises:
        ConfigError: If ``consumed/`` cannot be made.
    """
    folder = Path(trigger_dir)
    pending = pending_triggers(folder)
    if not pending:
        return []
    done = folder / CONSUMED
    try:
        done.mkdir(exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create {done}: {err.strerror}") from err
    claims = []
    for path, event in pending:
        target = done / path.name
        try:
            os.rename(path, target)
        except FileNotFoundError:  # another consumer took it first
            continue
        claims.append(Claim(pending=path, path=target, event=event))
    return claims


def release(claims: list[Claim]) -> None:
    """Put claimed events back where they waited (the run they were for did not start)."""
    for claim in claims:
        os.rename(claim.path, claim.pending)


def record(claims: list[Claim], run_id: str) -> None:
    """Write ``run_id`` and the time into each claimed event (atomically, in ``consumed/``)."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for claim in claims:
        event = {**claim.event, "run_id": run_id, "consumed": now}
        atomic_write_text(claim.path, json.dumps(event, indent=2) + "\n")


def describe(claims: list[Claim]) -> str:
    """``cnn v3 (PSI input 0.41, output 0.30)``, one per event, comma-separated."""
    parts = []
    for claim in claims:
        e = claim.event
        psi = e.get("psi")
        numbers = psi.items() if isinstance(psi, dict) else ()
        values = ", ".join(f"{k} {v:.2f}" for k, v in numbers if isinstance(v, int | float))
        parts.append(f"{e.get('model')} v{e.get('version')} (PSI {values or 'n/a'})")
    return ", ".join(parts)
