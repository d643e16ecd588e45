"""The blocking entry point of ``pollinate serve``: one server process, or N workers.

:func:`run_server` runs :func:`~pollinate.serving.server.serve` in this process, or with
``--workers N`` (N > 1) makes this process the supervisor of N worker processes
(:func:`~pollinate.serving.workers.run_workers`). It sits above both, so the imports run one
way: ``launch`` -> ``workers`` -> ``server`` -> ``ports``.
"""

from __future__ import annotations

import asyncio
import logging

from pollinate.serving.config import ServeSettings
from pollinate.serving.server import serve
from pollinate.serving.workers import run_workers

__all__ = ["run_server"]


def run_server(
    settings: ServeSettings, *, json_logs: bool = True, log_level: int = logging.INFO
) -> None:
    """Blocking entry point of ``pollinate serve`` (the log settings go to the workers)."""
    if settings.workers > 1:
        run_workers(settings, json_logs=json_logs, log_level=log_level)
        return
    asyncio.run(serve(settings))
