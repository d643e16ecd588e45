"""Running a command to its end while sampling its process tree, and the tree's resources.

:func:`run_command` starts a command in a session of its own, samples the summed RSS of its
whole process tree every 0.1 s, keeps the tail of its stderr, and ends whatever it leaves
running in its session. :func:`tree_rss` and :func:`tree_cpu_s` measure a live tree.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.support import REPO
from tests.support.processes import stop_group


def tree_rss(proc: psutil.Process) -> int:
    """RSS of ``proc`` and all its descendants, in bytes (each process counted once)."""
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its live descendants."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system
    return total


@dataclass
class CommandRun:
    """A finished command: exit status, wall time, peak RSS of its process tree."""

    returncode: int
    started_at: float  # time.time() when the command was started
    wall_s: float
    peak_rss_mb: float
    stderr_tail: str


def run_command(
    cmd: Sequence[str],
    *,
    env_extra: dict[str, str] | None = None,
    timeout: float = 1800,
    cwd: Path = REPO,
    on_poll: Callable[[float], None] | None = None,
) -> CommandRun:
    """Run ``cmd`` in its own session, sampling the summed RSS of its whole process tree.

    ``on_poll(seconds since start)`` is called at every sample (every 0.1 s).

    Anything the command leaves running in its session (Ray's processes, say) is ended with
    it: on success, on failure and on timeout.
    """
    env = {**os.environ, **(env_extra or {})}
    started_at = time.time()
    start = time.monotonic()
    child = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    proc = psutil.Process(child.pid)
    peak = 0
    stderr_chunks: list[str] = []

    def drain() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            stderr_chunks.append(line)
            del stderr_chunks[:-400]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        while child.poll() is None:
            peak = max(peak, tree_rss(proc))
            if on_poll is not None:
                on_poll(time.monotonic() - start)
            if time.monotonic() - start > timeout:
                break
            time.sleep(0.1)
    finally:
        wall = time.monotonic() - start
        stop_group(child, timeout=10)  # and whatever it left in its session
        reader.join(timeout=5)
        if child.stderr is not None:
            child.stderr.close()
    return CommandRun(
        returncode=child.returncode,
        started_at=started_at,
        wall_s=wall,
        peak_rss_mb=peak / 2**20,
        stderr_tail="".join(stderr_chunks)[-4000:],
    )
