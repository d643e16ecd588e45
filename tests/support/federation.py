"""A real pollinate federation on loopback, for the real-federation tests and the federation
benchmark.

Started the way a deployment starts one: ``pollinate certs``
(a development CA, the SuperLink's TLS certificate, one key pair per device),
``pollinate server start`` (Flower's SuperLink with TLS and SuperNode authentication, every
device key trusted) and one ``pollinate edge run`` daemon per device (a supervised
``flower-supernode`` training a slice of the built-in data). Runs are started and followed
with ``pollinate server run`` / ``pollinate server status``.

Every process runs in a session of its own. :meth:`Federation.stop` (also on leaving the
``with`` block, whatever the reason) sends SIGTERM to every session, SIGKILL to those still
running after the timeout, and SIGKILL to every descendant left over (SuperNodes, the
SuperLink and Flower's app processes run in sessions of their own).

Example::

    with Federation(Path("/tmp/fed"), devices=3, say=print) as fed:
        fed.start()
        run_id = fed.start_run(Path("/tmp/fed/run"), ["--rounds", "2"])
        print(fed.status(run_id))
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pollinate.errors import PollinateError
from pollinate.ops.superlink import flwr_env, list_nodes
from tests.support import REPO
from tests.support.processes import POLLINATE, Proc, free_port, stop_all, wait_until


class FederationError(RuntimeError):
    """A federation process died, a command failed, or something did not happen in time."""


def rounds_done(run_dir: Path) -> int:
    """Rounds a run directory records (metrics.json has round 0, the initial model, first)."""
    path = run_dir / "metrics.json"
    return len(json.loads(path.read_text())) - 1 if path.exists() else 0


#: seconds between looks at a run's status (a CLI process each; see Federation.wait_finished)
STATUS_POLL_S = 4.0


def _wait(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.5) -> float:
    """Poll ``check`` until it is true; the seconds it took. FederationError on timeout."""
    return wait_until(what, check, timeout, interval=interval, error=FederationError)


class Federation:
    """A SuperLink and ``devices`` edge daemons on 127.0.0.1, all state under ``root``.

    ``daemon_nice``: the daemons' niceness (``nice -n``); their SuperNodes and ClientApps
    inherit it. On a real deployment the devices do not share the server's CPU; emulated on
    one machine, ten ClientApps starting at once can starve the SuperLink.
    """

    def __init__(
        self,
        root: Path,
        devices: int,
        *,
        threads: int = 1,
        daemon_nice: int = 0,
        server_args: Sequence[str] = (),
        device_args: Callable[[int], list[str]] = lambda _: [],
        device_env: Mapping[str, str] | None = None,
        say: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.root = Path(root).resolve()
        self.devices = devices
        self.threads = threads
        self.daemon_nice = daemon_nice
        self.say = say
        self.certs = self.root / "certs"
        self.state = self.root / "state"
        self.port = free_port()
        self.env = {
            **flwr_env(self.state),
            "OMP_NUM_THREADS": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        self.env.pop("FLWR_TELEMETRY_ENABLED", None)  # pollinate's own default, as deployed
        self.server_args = list(server_args)
        self.device_args = device_args
        self.device_env = {**self.env, **(device_env or {})}  # the daemons' own, on top
        self.server: Proc | None = None
        self.daemons: list[Proc] = []
        self.codes: list[int] = []  # the daemons' exit codes, once stopped

    # ------------------------------------------------------------------ life cycle
    def device_dir(self, i: int) -> Path:
        """Device ``i``'s state directory (accountant, daemon.json, supernode.log)."""
        return self.root / f"device-{i}"

    def start(self, timeout: float = 300.0) -> dict[str, float]:
        """Make certificates, start the SuperLink and the daemons; wait until all are online.

        Returns seconds: ``certs_s`` (``pollinate certs``), ``superlink_ready_s`` (``pollinate
        server start`` launched -> "SuperLink ready"), ``nodes_online_s`` (daemons launched ->
        every SuperNode listed online by ``flwr supernode list``, polled every 2 s) and
        ``start_s`` (the last two together).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        made = subprocess.run(
            [*POLLINATE, "certs", str(self.certs), "--nodes", str(self.devices)],
            cwd=REPO, capture_output=True, text=True, timeout=120, env=self.env,
        )  # fmt: skip
        if made.returncode != 0:
            raise FederationError(f"pollinate certs failed:\n{made.stderr[-2000:]}")
        certs_s = time.monotonic() - t0

        t1 = time.monotonic()
        superlink_ready_s = self.start_server(timeout=timeout)
        self.say(
            f"SuperLink ready after {superlink_ready_s:.1f} s; starting {self.devices} daemons"
        )

        t2 = time.monotonic()
        for i in range(self.devices):
            log = self.root / f"daemon-{i}.log"
            self.daemons.append(
                Proc.spawn(f"daemon-{i}", self.daemon_command(i), log, self.device_env)
            )

        def all_online() -> bool:
            self.check_alive()
            return self.all_online()

        _wait(f"{self.devices} SuperNodes online", all_online, timeout, interval=2.0)
        done = time.monotonic()
        nodes_online_s, start_s = done - t2, done - t1
        self.say(f"{self.devices} SuperNodes online after {nodes_online_s:.1f} s")
        return {
            "certs_s": certs_s,
            "superlink_ready_s": superlink_ready_s,
            "nodes_online_s": nodes_online_s,
            "start_s": start_s,
        }

    def start_server(self, ready_count: int = 1, timeout: float = 300.0) -> float:
        """Start ``pollinate server start`` (again, after a crash: ``ready_count`` 2); wait for
        its ``ready_count``-th "SuperLink ready" in ``server.log``; the seconds it took."""
        trust: list[str] = []
        for i in range(self.devices):
            trust += ["--trust", str(self.certs / "nodes" / f"node-{i}.pub")]
        self.say(f"starting the SuperLink on 127.0.0.1:{self.port} (TLS, node auth)")
        log = self.root / "server.log"
        self.server = Proc.spawn(
            "server",
            [*POLLINATE, "server", "start", "--certs", str(self.certs), "--state-dir",
             str(self.state), "--port", str(self.port), *trust, *self.server_args],
            log,
            self.env,
        )  # fmt: skip

        def ready() -> bool:
            self.check_alive()
            return log.read_text(errors="replace").count("SuperLink ready") >= ready_count

        return _wait("the SuperLink", ready, timeout, interval=0.2)

    def daemon_command(self, i: int) -> list[str]:
        """Device ``i``'s ``pollinate edge run`` command line."""
        cmd = [
            *POLLINATE, "edge", "run", "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs / "ca.crt"),
            "--key", str(self.certs / "nodes" / f"node-{i}"),
            "--state-dir", str(self.device_dir(i)),
            "--partition-id", str(i), "--num-partitions", str(self.devices),
            "--threads", str(self.threads), *self.device_args(i),
        ]  # fmt: skip
        if self.daemon_nice:  # the SuperNodes and ClientApps inherit it
            cmd = ["nice", "-n", str(self.daemon_nice), *cmd]
        return cmd

    def check_alive(self) -> None:
        """FederationError, with its log's tail, if the server or a daemon has exited."""
        for p in ([self.server] if self.server else []) + self.daemons:
            if not p.alive():
                raise FederationError(
                    f"{p.name} exited with code {p.popen.returncode}\n--- {p.log_path} ---\n"
                    f"{p.tail()}"
                )

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM the daemons, then the server (SIGKILL after ``timeout``); exit codes."""
        codes = stop_all(self.daemons, timeout) if self.daemons else {}
        self.codes = [codes[d.name] for d in self.daemons]
        if self.server is not None:
            codes.update(stop_all([self.server], timeout))
        self.daemons, self.server = [], None
        return codes

    def __enter__(self) -> Federation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries
    def superlink_errors(self) -> dict[str, int]:
        """Counts of trouble in the SuperLink's log: sqlite lock errors, tracebacks."""
        try:
            text = (self.state / "superlink.log").read_text(errors="replace")
        except OSError:
            return {}
        return {
            "database_is_locked": text.count("database is locked"),
            "tracebacks": text.count("Traceback (most recent call last)"),
            "http_500": text.count('HTTP/1.1" 500'),
        }

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list``: every registered node and its status ([] if unreachable)."""
        try:
            return list_nodes(self.state)
        except (PollinateError, subprocess.TimeoutExpired):
            return []

    def wait_finished(self, what: str, timeout: float, run_id: str | None = None) -> dict[str, Any]:
        """Wait until the run (the newest by default) is finished, any way; its status.

        Each look is a CLI process plus ``flwr ls``, seconds of CPU on a two-core machine where
        the devices train beside it, so it looks every :data:`STATUS_POLL_S` seconds.
        """
        seen: dict[str, Any] = {}

        def finished() -> bool:
            seen.update(self.status(run_id))
            return str(seen.get("status", "")).startswith("finished")

        _wait(what, finished, timeout, interval=STATUS_POLL_S)
        return dict(seen)

    def online(self) -> int:
        """How many SuperNodes the SuperLink lists as online."""
        return sum(n.get("status") == "online" for n in self.nodes())

    def wait_online(self, what: str, timeout: float) -> None:
        """Wait until every device's SuperNode is listed online (a ``flwr`` call a look)."""
        _wait(what, self.all_online, timeout, interval=STATUS_POLL_S)

    def all_online(self) -> bool:
        """Whether every device's SuperNode is listed online."""
        return self.online() == self.devices

    def environments(self, name: str) -> dict[str, str | None]:
        """``name``'s value in the environment of every live process the federation's
        commands started (SuperLink, SuperExec, ServerApp, SuperNodes, executors), keyed
        ``pid command``. Not the ``pollinate`` commands themselves: ``/proc`` shows the
        environment a process was started with, not what it set for itself and its children."""
        import psutil

        roots = [p.popen.pid for p in ([self.server] if self.server else []) + self.daemons]
        seen: dict[str, str | None] = {}
        for root in roots:
            try:
                procs = psutil.Process(root).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    label = f"{proc.pid} {' '.join(proc.cmdline())[:120]}"
                    seen[label] = proc.environ().get(name)
        return seen

    def daemon_status(self, i: int) -> dict[str, Any]:
        """Device ``i``'s ``daemon.json`` ({} while it is being written or missing)."""
        try:
            status: dict[str, Any] = json.loads((self.device_dir(i) / "daemon.json").read_text())
        except (OSError, ValueError):
            return {}
        return status

    def kill_supernode(self, i: int, timeout: float = 30.0) -> int:
        """SIGKILL device ``i``'s SuperNode process group (not the daemon); its pid."""
        pid: int | None = None

        def running() -> bool:
            nonlocal pid
            pid = self.daemon_status(i).get("supernode_pid")
            return pid is not None

        _wait(f"device {i}'s SuperNode pid", running, timeout, interval=0.2)
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        return pid

    def crash_server(self) -> dict[str, Any]:
        """A server crash: SIGKILL the SuperLink's process group (with its ServerApp) and its
        ``pollinate server start`` wrapper; returns the SuperLink's ``superlink.json``."""
        link: dict[str, Any] = json.loads((self.state / "superlink.json").read_text())
        os.killpg(link["pid"], signal.SIGKILL)
        assert self.server is not None
        os.killpg(self.server.popen.pid, signal.SIGKILL)
        self.server.popen.wait()
        time.sleep(1.0)  # the killed processes' sockets and files settle
        return link

    # ------------------------------------------------------------------ runs
    def cli(self, *args: str, timeout: float = 300.0) -> str:
        """``pollinate ARGS`` against this federation; its stdout. FederationError on failure."""
        done = subprocess.run([*POLLINATE, *args], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, env=self.env)  # fmt: skip
        if done.returncode != 0:
            raise FederationError(
                f"pollinate {' '.join(args[:2])} failed ({done.returncode}):\n{done.stderr[-2000:]}"
            )
        return done.stdout

    def start_run(self, run_dir: Path, options: Sequence[str]) -> str:
        """``pollinate server run --run-dir RUN_DIR OPTIONS``; the run id."""
        out = self.cli("server", "run", "--state-dir", str(self.state), "--run-dir",
                       str(run_dir), *options)  # fmt: skip
        return out.strip().splitlines()[-1]

    def status(self, run_id: str | None = None) -> dict[str, Any]:
        """``pollinate server status --json`` of ``run_id`` (the newest run by default)."""
        which = ["--run-id", run_id] if run_id is not None else []
        out = self.cli("server", "status", "--state-dir", str(self.state), *which, "--json",
                       timeout=120)  # fmt: skip
        report: dict[str, Any] = json.loads(out)
        return report
