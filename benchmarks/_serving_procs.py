"""Start, watch and stop inference-server subprocesses for the serving benchmarks.

Generic over the server: a command list and the path of the port file it writes once
listening (a JSON object of port numbers, e.g. ``{"http": 8000}`` for
``benchmarks/naive_server.py`` or ``{"http": .., "grpc": .., "metrics": ..}`` for
``pollinate serve``). :func:`start_server` waits for that file (and, optionally, for
``GET /v2/health/ready`` to answer 200), failing with the process's log tail if it dies or
takes too long; :class:`RssSampler` samples the RSS of its process tree in a thread;
:meth:`ServerProcess.stop` sends SIGTERM, then SIGKILL, to its whole session. The process
machinery underneath (port files, waiting, process groups, tree RSS) is
:mod:`tests.support`'s.

Example::

    cmd = naive_server_cmd(Path("cnn.onnx"), "cnn", port_file)
    with start_server(cmd, port_file) as server, RssSampler(server.pid) as rss:
        run_load(LoadConfig(url=server.url()))
    print(rss.peak_mb, server.cpu_s)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

from tests.support import REPO
from tests.support.commands import tree_cpu_s, tree_rss
from tests.support.processes import (
    POLLINATE,
    StartError,
    log_tail,
    spawn,
    stop_group,
    wait_for_port_file,
    wait_until,
)

NAIVE_SERVER = REPO / "benchmarks" / "naive_server.py"


class ServerStartError(StartError):
    """The server exited, or did not become ready in time."""


@dataclass
class ServerProcess:
    """A running server subprocess (its own session) and the ports it reported."""

    popen: subprocess.Popen[bytes]
    ports: dict[str, int]
    port_file: Path
    log_path: Path
    host: str = "127.0.0.1"
    started_at: float = 0.0  # time.monotonic() at launch
    ready_s: float = 0.0  # seconds from launch to ready

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.popen.pid

    def url(self, key: str = "http") -> str:
        """``http://HOST:PORT`` of the port named ``key``."""
        return f"http://{self.host}:{self.ports[key]}"

    def address(self, key: str = "grpc") -> str:
        """``HOST:PORT`` of the port named ``key`` (for gRPC clients)."""
        return f"{self.host}:{self.ports[key]}"

    def rss_mb(self) -> float:
        """Current RSS of the server's process tree, MiB."""
        try:
            return tree_rss(psutil.Process(self.pid)) / 2**20
        except psutil.NoSuchProcess:
            return 0.0

    @property
    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server's process tree has used so far."""
        return tree_cpu_s(self.pid)

    def log_tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of the server's stdout+stderr."""
        return log_tail(self.log_path, chars)

    def alive(self) -> bool:
        """Whether the server is still running."""
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the server's session, SIGKILL it after ``timeout`` s; the exit code."""
        return stop_group(self.popen, timeout)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def naive_server_cmd(
    model_file: Path,
    name: str,
    port_file: Path,
    *,
    threads: int | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> list[str]:
    """The command line of ``benchmarks/naive_server.py`` serving ``model_file``."""
    cmd = [sys.executable, str(NAIVE_SERVER), "--model-file", str(model_file), "--name", name]
    cmd += ["--host", host, "--port", str(port), "--port-file", str(port_file)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd


def pollinate_serve_cmd(
    repository: Path,
    port_file: Path,
    *,
    device: str = "cpu",
    host: str = "127.0.0.1",
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of ``pollinate serve`` on ephemeral ports, writing ``port_file``."""
    return [
        *POLLINATE, "serve", "--repository", str(repository),
        "--host", host, "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        "--port-file", str(port_file), "--device", device, *extra,
    ]  # fmt: skip


def start_server(
    cmd: Sequence[str],
    port_file: Path,
    *,
    required_ports: Sequence[str] = ("http",),
    ready_path: str | None = "/v2/health/ready",
    timeout_s: float = 120.0,
    env_extra: dict[str, str] | None = None,
    cwd: Path = REPO,
    host: str = "127.0.0.1",
    log_path: Path | None = None,
) -> ServerProcess:
    """Start ``cmd`` in its own session and wait until it is ready.

    Ready: ``port_file`` holds a JSON object with every key in ``required_ports`` and, when
    ``ready_path`` is set, ``GET http://HOST:PORT[http]READY_PATH`` answers 200. A stale
    ``port_file`` is removed first. Stdout and stderr go to ``log_path`` (default: a
    temporary file). Raises ServerStartError, with the log's tail, if the process exits or
    is not ready within ``timeout_s`` (the process is stopped then).
    """
    port_file = Path(port_file)
    port_file.unlink(missing_ok=True)
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="pollinate-server-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    Path(log_path).write_bytes(b"")
    start = time.monotonic()
    popen = spawn(cmd, Path(log_path), {**os.environ, **(env_extra or {})}, cwd=cwd)
    server = ServerProcess(popen, {}, port_file, Path(log_path), host, start)
    try:
        try:
            server.ports = wait_for_port_file(popen, port_file, timeout_s, required=required_ports)
            if ready_path is not None:
                _wait_ready(server, ready_path, start + timeout_s - time.monotonic())
        except StartError as exc:
            code = server.popen.poll()
            status = f"exited with code {code}" if code is not None else "still running"
            raise ServerStartError(
                f"server {exc} ({status}): {' '.join(cmd)}\n--- log tail ---\n{server.log_tail()}"
            ) from exc
    except BaseException:
        server.stop(timeout=5)
        raise
    server.ready_s = time.monotonic() - start
    return server


def _wait_ready(server: ServerProcess, path: str, timeout: float) -> None:
    """Wait until ``GET`` of ``path`` answers 200; StartError if the server dies first."""
    url = server.url() + path

    def ready() -> bool:
        if server.popen.poll() is not None:
            raise StartError("died before it was ready")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=2) as response,
        ):
            return bool(response.status == 200)
        return False

    wait_until(f"{url} to answer 200", ready, max(0.0, timeout), interval=0.05, error=StartError)


class RssSampler:
    """Samples the RSS of a process tree every ``interval_s`` in a background thread.

    ``samples`` holds (seconds since start, MiB) pairs; use as a context manager or call
    :meth:`start` and :meth:`stop`.
    """

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        """Start sampling (one sample is taken at once)."""
        self._proc = psutil.Process(self.pid)
        self._t0 = time.monotonic()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        rss = tree_rss(self._proc)
        if rss:
            self.samples.append((time.monotonic() - self._t0, rss / 2**20))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> None:
        """Stop sampling (one last sample is taken)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._sample()

    @property
    def peak_mb(self) -> float:
        """Highest RSS sampled, MiB."""
        return max((m for _, m in self.samples), default=0.0)

    @property
    def mean_mb(self) -> float:
        """Mean RSS over the samples, MiB."""
        return sum(m for _, m in self.samples) / len(self.samples) if self.samples else 0.0

    @property
    def last_mb(self) -> float:
        """The latest RSS sample, MiB."""
        return self.samples[-1][1] if self.samples else 0.0

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
