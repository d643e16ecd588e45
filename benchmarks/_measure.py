"""Helpers shared by the benchmarks: run a command, sample the RSS of its process tree."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """A finished command with its timing and memory."""

    returncode: int
    wall_s: float
    peak_rss_mb: float
    first_round_s: float | None
    stderr_tail: str


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


def run_pollinate(args: Sequence[str], run_dir: Path, *, timeout: float = 1800) -> Run:
    """Run ``python -m pollinate ARGS``, sampling tree RSS and the first checkpoint's time."""
    first_round: list[float] = []
    first = run_dir / "checkpoints" / "round-0001"

    def watch(elapsed: float) -> None:
        if not first_round and first.exists():
            first_round.append(elapsed)

    run = run_command(
        [sys.executable, "-m", "pollinate", *args],
        env_extra={
            "FLWR_HOME": str(run_dir.parent / ".flwr"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": "1",
        },
        timeout=timeout,
        on_poll=watch,
    )
    return Run(
        returncode=run.returncode,
        wall_s=run.wall_s,
        peak_rss_mb=run.peak_rss_mb,
        first_round_s=first_round[0] if first_round else None,
        stderr_tail=run.stderr_tail[-2000:],
    )


def write_json(out: Path, result: dict[str, Any], *, sort_keys: bool = False) -> Path:
    """Write ``result`` to ``out`` atomically (temp file + rename) and print the JSON."""
    from pollinate._atomic import atomic_write_text

    text = json.dumps(result, indent=2, sort_keys=sort_keys)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text + "\n")
    print(text)
    return out


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/NAME.json`` and print the JSON."""
    return write_json(REPO / "benchmarks" / "results" / f"{name}.json", result, sort_keys=True)


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
        _end_session(child)
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


def _end_session(child: subprocess.Popen[str]) -> None:
    """Stop ``child`` (if still running) and whatever it left in its own session."""
    with contextlib.suppress(ProcessLookupError):
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        # The leader is gone; members of its session (process group) may not be.
        os.killpg(child.pid, signal.SIGKILL)
