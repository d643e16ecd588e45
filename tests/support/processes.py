"""Real processes in tests and benchmarks: free loopback ports, starting subprocesses in
sessions of their own, waiting for what they do, and stopping them with their process groups.

Every long-running process is started with :func:`spawn` (a new session, so its process
group is its own and :func:`stop_group` reaches the children that stay in it);
:func:`stop_all` also reaches descendants that started sessions of their own (Flower's
SuperNodes, the SuperLink and its app processes); :func:`kill_group` is the crash (SIGKILL
at once). :func:`wait_until` is the one polling loop: :func:`wait_for_port_file`,
:func:`exited` and the federation harness are built on it. Processes a test did not start
(Flower's local SuperLink, say) are found by their command lines with
:func:`processes_mentioning` and ended with :func:`end_processes`.

Example::

    port = free_port()
    proc = Proc.spawn("server", [*POLLINATE, "serve", ...], tmp / "server.log", env)
    wait_until("the server", lambda: "ready" in proc.tail(), 60)
    stop_all([proc])
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.support import REPO

POLLINATE = [sys.executable, "-m", "pollinate"]
"""The command that runs this checkout's CLI with the current interpreter."""


class StartError(RuntimeError):
    """A process exited, or was not ready in time, before what was waited for happened."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------- starting
def spawn(
    cmd: Sequence[str], log_path: Path, env: dict[str, str], *, cwd: Path = REPO
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session (so :func:`stop_group` reaches its children), no stdin,
    stdout and stderr appended to ``log_path``."""
    with Path(log_path).open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            list(cmd), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


@dataclass
class Proc:
    """A long-running subprocess (the leader of its own session) and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def spawn(cls, name: str, cmd: Sequence[str], log_path: Path, env: dict[str, str]) -> Proc:
        """:func:`spawn` ``cmd`` under ``name``."""
        return cls(name, spawn(cmd, log_path, env), Path(log_path))

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        """The end of its log."""
        return log_tail(self.log_path, chars)


def log_tail(path: Path, chars: int = 4000) -> str:
    """The last ``chars`` characters of the file at ``path`` ("" if it is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------- waiting
def wait_until(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    *,
    interval: float = 0.5,
    error: Callable[[str], Exception] = AssertionError,
) -> float:
    """Poll ``check`` every ``interval`` s until it is true; the seconds it took.

    After ``timeout`` s raises ``error("timed out after ... waiting for WHAT")``: an
    AssertionError by default (a failed test), a harness' own error when it passes one.
    Whatever ``check`` raises (a process that died, say) goes through.
    """
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise error(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


def wait_for_port_file(
    process: subprocess.Popen[Any],
    path: Path,
    timeout: float,
    *,
    required: Collection[str] = (),
) -> dict[str, int]:
    """The ports ``process`` writes to ``path`` once it listens (a JSON object of numbers).

    Waits until the file holds a JSON object with every key in ``required``; raises
    :class:`StartError` if the process exits first or the file is not there in ``timeout`` s.
    """
    path = Path(path)
    found: dict[str, int] = {}

    def written() -> bool:
        if process.poll() is not None:
            raise StartError(f"exited with code {process.returncode} before writing {path}")
        with contextlib.suppress(OSError, ValueError):
            ports = json.loads(path.read_text())
            if isinstance(ports, dict) and all(k in ports for k in required):
                found.update({str(k): int(v) for k, v in ports.items()})
                return True
        return False

    wait_until(f"the port file {path}", written, timeout, interval=0.05, error=StartError)
    return found


def exited(pid: int, timeout: float = 15.0) -> bool:
    """Whether process ``pid`` exits (or is a zombie waiting for its parent) within
    ``timeout`` s, polled every 0.2 s through ``/proc``."""

    def gone() -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return True
        return state == "Z"

    try:
        wait_until(f"process {pid} to exit", gone, timeout, interval=0.2)
    except AssertionError:
        return False
    return True


# ---------------------------------------------------------------------- stopping
def stop_group(process: subprocess.Popen[Any], timeout: float = 30.0) -> int:
    """SIGTERM the process' group (it was started in a session of its own), SIGKILL it after
    ``timeout`` s, then SIGKILL whatever the leader left behind in the group.

    Returns the exit code (negative: the signal that ended it).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        os.killpg(process.pid, signal.SIGKILL)  # members of the session the leader left behind
    return process.wait()


def kill_group(process: subprocess.Popen[Any]) -> int:
    """SIGKILL the process' group at once (a crash: nothing gets to clean up); its exit code."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


def terminate(process: subprocess.Popen[Any], timeout: float = 20.0) -> int:
    """SIGTERM the process alone (it stops its own children), SIGKILL it after ``timeout`` s;
    its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below ``pid`` ([] when it is gone)."""
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def stop_all(procs: Sequence[Proc], timeout: float = 30.0) -> dict[str, int]:
    """Stop ``procs`` and everything they started; their exit codes by name.

    SIGTERM to every session at once, SIGKILL to sessions still running after ``timeout``
    seconds, then SIGKILL to any descendant still alive (those that started sessions of
    their own are not reached through their parent's process group) and to every process
    group a descendant was in (which also reaches processes orphaned earlier, e.g. a
    ServerApp whose launcher died).
    """
    leftovers = [child for p in procs for child in descendants(p.popen.pid)]
    groups = set()
    for child in leftovers:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(child.pid))
    groups -= {os.getpgrp(), *(p.popen.pid for p in procs)}
    for p in procs:
        if p.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes: dict[str, int] = {}
    for p in procs:
        try:
            codes[p.name] = p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.popen.pid, signal.SIGKILL)
            codes[p.name] = p.popen.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, signal.SIGKILL)  # members of the session left behind
    _, alive = psutil.wait_procs(leftovers, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    return codes


# ---------------------------------------------------------------------- processes found by name
def cmdline(proc: psutil.Process) -> str:
    """``proc``'s command line as one string ("" once it is gone or not ours to read)."""
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def running(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs (a zombie does not)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_mentioning(marks: Collection[str]) -> dict[int, psutil.Process]:
    """Every process but this one with a command-line argument containing one of ``marks``,
    and every process below each of them, by pid."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            args = proc.info["cmdline"] or []
            if proc.pid == os.getpid() or not any(m in arg for arg in args for m in marks):
                continue
            found[proc.pid] = proc
            for child in proc.children(recursive=True):
                found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def end_processes(
    procs: Sequence[psutil.Process], timeout: float = 15.0, kill_timeout: float = 10.0
) -> list[psutil.Process]:
    """SIGTERM ``procs``, SIGKILL those alive after ``timeout`` s; those still running
    ``kill_timeout`` s after that."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=kill_timeout)
    return [p for p in alive if running(p)]
