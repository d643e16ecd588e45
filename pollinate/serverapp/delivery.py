"""Deliver the exported bundle to the devices at the end of a run.

Each connected node gets one ``query.bundle`` message with the bundle archive's bytes and
their sha256; the pollinate ClientApp verifies and installs it on the device
(:mod:`pollinate.device.bundles`) and answers ``installed`` or ``refused`` with a reason.
The outcome per client is written to ``RUN_DIR/delivery.json``. Simulated nodes have no
device to install on, so a simulation delivers nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from pollinate._atomic import atomic_write_text
from pollinate.log import logger
from pollinate.serverapp.nodes import NodeDirectory, reply_node

__all__ = ["BUNDLE_MESSAGE", "deliver_bundle", "delivers_to_devices"]

BUNDLE_MESSAGE = "query.bundle"


def delivers_to_devices(grid: Grid) -> bool:
    """True for a grid of real SuperNodes (not Flower's or pollinate's simulation grids)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    grid = getattr(grid, "inner", grid)  # through transport.PollingGrid
    return not isinstance(grid, InMemoryGrid) and not getattr(grid, "static_population", False)


def deliver_bundle(
    grid: Grid, directory: NodeDirectory, archive: Path, run_dir: Path, *, timeout: float
) -> dict[str, Any]:
    """Send ``archive`` to every connected node; returns (and writes) the delivery report."""
    data = Path(archive).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    directory.refresh()
    nodes = directory.nodes()
    messages = [
        Message(
            RecordDict(
                {
                    "bundle": ConfigRecord(
                        {"archive": data, "sha256": digest, "name": Path(archive).name}
                    )
                }
            ),
            dst_node_id=node_id,
            message_type=BUNDLE_MESSAGE,
        )
        for node_id in nodes
    ]
    installed: dict[str, str] = {}
    refused: dict[str, str] = {}
    failed: dict[str, str] = {}
    answered: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        src = reply_node(reply, messages)
        answered.add(src)
        key = directory.key_of(src)
        if reply.has_error():
            failed[key] = reply.error.reason or "an error reply"
            continue
        info = reply.content.config_records.get("info")
        if info is not None and info.get("status") == "installed":
            installed[key] = str(info.get("bundle"))
        else:
            refused[key] = str(info.get("reason")) if info is not None else "no answer content"
    for node_id in set(nodes) - answered:
        failed[directory.key_of(node_id)] = f"no reply within {timeout:.0f} s"
    report = {
        "bundle": Path(archive).name,
        "sha256": digest,
        "bytes": len(data),
        "delivered": dt.datetime.now(dt.UTC).isoformat(),
        "installed": installed,
        "refused": refused,
        "failed": failed,
    }
    atomic_write_text(Path(run_dir) / "delivery.json", json.dumps(report, indent=2) + "\n")
    logger.info(
        "bundle %s delivered: installed on %d node(s), refused by %d, failed on %d",
        Path(archive).name, len(installed), len(refused), len(failed),
    )  # fmt: skip
    for key, reason in refused.items():
        logger.warning("client %s refused the bundle: %s", key, reason)
    return report
