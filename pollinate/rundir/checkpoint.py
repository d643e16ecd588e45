"""Run directories: atomic per-round checkpoints and resume.

Layout of a run directory::

    run.json                      settings of the run (written once)
    checkpoints/round-0003/       one complete checkpoint per round (last K kept)
        model.safetensors         global model
        strategy.safetensors      server-optimizer state (FedAdam/FedYogi moments)
        state.json                round, history, node->client map, client-level accountant
    LATEST                        name of the newest complete checkpoint folder
    metrics.json                  per-round history (also in the checkpoint)
    ledger.sqlite                 the privacy ledger (privacy.ledger_store: rows appended per round)
    privacy.json                  the ledger's summary (the whole ledger at the end of the run)
    clients/                      simulated clients' accountants (one JSON file each)

A checkpoint folder is written under a temporary name, fsynced and renamed when complete
(:func:`pollinate._atomic.atomic_dir`); ``LATEST`` is replaced atomically after that. A crash at
any point leaves the previous round intact. :func:`atomic_write_json` is the JSON writer of
the run directory's other files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from pollinate._atomic import atomic_dir, atomic_write_text
from pollinate.errors import CheckpointError

__all__ = [
    "Checkpoint",
    "atomic_write_json",
    "atomic_write_text",
    "latest_checkpoint",
    "save_checkpoint",
]

LATEST = "LATEST"
CHECKPOINTS = "checkpoints"


@dataclass
class Checkpoint:
    """Everything needed to continue a run after ``server_round``."""

    server_round: int
    model: dict[str, np.ndarray]
    strategy: dict[str, np.ndarray] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def atomic_write_json(path: Path, data: Any, *, indent: int | None = 2) -> None:
    """JSON form of :func:`atomic_write_text` (keys sorted; ``indent=None``: compact, and
    several times faster, since only the compact form has a C encoder)."""
    text = json.dumps(data, indent=indent, sort_keys=True, allow_nan=True)
    atomic_write_text(path, text + "\n")


def save_checkpoint(run_dir: Path, ckpt: Checkpoint, *, keep: int = 3) -> Path:
    """Write ``ckpt`` atomically and point ``LATEST`` at it; prune to the newest ``keep``.

    The folder is built by :func:`~pollinate._atomic.atomic_dir` (a rewrite of the same round
    replaces the older folder); ``LATEST`` moves only once the folder is complete.
    """
    root = run_dir / CHECKPOINTS
    name = f"round-{ckpt.server_round:04d}"
    final = root / name
    with atomic_dir(final, replace=True) as tmp:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in ckpt.model.items()},
            str(tmp / "model.safetensors"),
        )
        save_file(
            {k: np.ascontiguousarray(v) for k, v in ckpt.strategy.items()},
            str(tmp / "strategy.safetensors"),
        )
        state = dict(ckpt.state, server_round=ckpt.server_round)
        (tmp / "state.json").write_text(json.dumps(state, sort_keys=True))  # compact: C encoder
    atomic_write_text(run_dir / LATEST, f"{CHECKPOINTS}/{name}\n")
    done = sorted(p for p in root.iterdir() if p.name.startswith("round-"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of ``run_dir``, or ``None`` if there is none yet."""
    if not run_dir.is_dir():
        raise CheckpointError(
            f"run directory {run_dir} does not exist; pass the folder a previous "
            "`pollinate simulate` wrote (it holds run.json and checkpoints/)"
        )
    pointer = run_dir / LATEST
    if not pointer.exists():
        return None
    folder = run_dir / pointer.read_text().strip()
    try:
        model = load_file(str(folder / "model.safetensors"))
        strategy = load_file(str(folder / "strategy.safetensors"))
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(
            f"checkpoint {folder} is unreadable ({err}); delete {pointer} to start over"
        ) from err
    return Checkpoint(
        server_round=int(state["server_round"]), model=model, strategy=strategy, state=state
    )
