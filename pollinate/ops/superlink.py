"""``pollinate server start``: Flower's SuperLink with TLS, SuperNode authentication and state
on disk, plus the flwr CLI connection that talks to it.

Built on Flower's own tools: ``flower-superlink`` (through ``ops/flower_superlink.py``, which
gives its SQLite state 60 s for the write lock, not 5 s) runs as a child process with
``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``, ``--enable-supernode-auth`` (only
registered SuperNode public keys may connect) and ``--database STATE_DIR/superlink.db`` (a
restarted SuperLink keeps its runs and its registered nodes). Trusted keys are registered
with ``flwr supernode register``; ``flwr`` finds the SuperLink through the connection
``pollinate`` that this module writes to ``STATE_DIR/flwr/config.toml`` (``FLWR_HOME``).

The SuperLink runs with ``--isolation process``: the ServerApps are launched by a separate
``flower-superexec`` that this module starts and supervises (restarted with back-off if it
dies, which with Flower's default in-SuperLink launcher would leave every later run pending
forever). SuperExec and SuperLink share a secret (``STATE_DIR/superexec.secret``, 0600), so
nothing else that reaches the SuperLink's port can take ServerApp runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollinate._atomic import atomic_write_bytes, atomic_write_text
from pollinate.errors import ConfigError, ExitCode, PollinateError

__all__ = [
    "CONNECTION",
    "SuperLinkError",
    "SuperLinkSettings",
    "flwr_env",
    "list_nodes",
    "run_superlink",
    "trust_node",
    "write_connection",
]

logger = logging.getLogger("pollinate")
CONNECTION = "pollinate"


class SuperLinkError(PollinateError):
    """The SuperLink could not be started, reached, or asked to do something."""

    exit_code = ExitCode.SUPERLINK


@dataclass(frozen=True)
class SuperLinkSettings:
    """Where the certificates and the state live, and where the SuperLink listens."""

    certs: Path
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 9093
    address: str | None = None  # how the flwr CLI and SuperNodes reach it; default host:port

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port must be 1..65535, got {self.port}")
        for name in ("ca.crt", "server.pem", "server.key"):
            if not (Path(self.certs) / name).is_file():
                raise ConfigError(
                    f"{Path(self.certs) / name} is missing; make a development set with "
                    f"`pollinate certs {self.certs}` or bring your own CA-signed certificate"
                )

    @property
    def reach(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return self.address or f"{host}:{self.port}"

    @property
    def ca(self) -> Path:
        return (Path(self.certs) / "ca.crt").resolve()


def flwr_env(state_dir: Path) -> dict[str, str]:
    """The environment for flwr tools: this federation's FLWR_HOME, the venv's scripts on PATH."""
    return {
        **os.environ,
        "FLWR_HOME": str((Path(state_dir) / "flwr").resolve()),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def write_connection(settings: SuperLinkSettings) -> Path:
    """Write the flwr CLI's connection ``pollinate`` (address + CA) into STATE_DIR/flwr."""
    path = Path(settings.state_dir) / "flwr" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        path,
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{settings.reach}"\nroot-certificates = "{settings.ca}"\n',
    )
    return path


def _flwr(
    state_dir: Path, *args: str, options: tuple[str, ...] = (), timeout: float = 120.0
) -> dict[str, Any]:
    """Run ``flwr ARGS pollinate OPTIONS --format json`` on this federation; the JSON answer."""
    if not (Path(state_dir) / "flwr" / "config.toml").is_file():
        raise SuperLinkError(
            f"{state_dir} is not the state directory of a federation: start one with "
            f"`pollinate server start --state-dir {state_dir}`, or pass the --state-dir it uses"
        )
    flwr = str(Path(sys.executable).parent / "flwr")
    cmd = [flwr, *args, CONNECTION, *options, "--format", "json"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=flwr_env(state_dir)
    )
    start = proc.stdout.find("{")
    try:
        answer: dict[str, Any] = json.loads(proc.stdout[start:]) if start >= 0 else {}
    except ValueError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success", False):
        detail = answer.get("error-message") or (proc.stderr or proc.stdout).strip()[-400:]
        raise SuperLinkError(f"`flwr {' '.join(args)}` failed: {detail}")
    return answer


def trust_node(state_dir: Path, public_key: Path) -> str | None:
    """Register a SuperNode public key (OpenSSH format); returns its node id.

    Returns None for a key registered before (the SuperLink keeps them in its database), so
    starting again with the same ``--trust`` keys is harmless.
    """
    if not Path(public_key).is_file():
        raise ConfigError(f"public key {public_key} does not exist")
    try:
        return str(_flwr(state_dir, "supernode", "register", str(public_key))["node-id"])
    except SuperLinkError as err:
        if "already" not in str(err).lower():  # flwr: "Public key already in use."
            raise
    return None


def list_nodes(state_dir: Path) -> list[dict[str, Any]]:
    """The registered SuperNodes and their status (``flwr supernode list``)."""
    nodes: list[dict[str, Any]] = _flwr(state_dir, "supernode", "list")["nodes"]
    return nodes


def _wait_tls(
    settings: SuperLinkSettings, process: subprocess.Popen[bytes], timeout: float
) -> None:
    """Wait until the SuperLink completes a TLS handshake that verifies against the CA."""
    host, _, port = settings.reach.rpartition(":")
    context = ssl.create_default_context(cafile=str(settings.ca))
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SuperLinkError(
                f"flower-superlink exited with code {process.returncode} while starting; "
                f"see {Path(settings.state_dir) / 'superlink.log'}"
            )
        try:
            address = (host.strip("[]"), int(port))
            with (
                socket.create_connection(address, timeout=2) as raw,
                context.wrap_socket(raw, server_hostname=host.strip("[]")),
            ):
                return
        except (OSError, ssl.SSLError) as err:
            if time.monotonic() > deadline:
                raise SuperLinkError(
                    f"the SuperLink at {settings.reach} is not answering: {err}"
                ) from err
            time.sleep(0.2)


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    certs = Path(settings.certs).resolve()
    return [
        sys.executable, "-m", "pollinate.ops.flower_superlink",  # Flower's, patient SQLite
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth",
        "--database", str((Path(settings.state_dir) / "superlink.db").resolve()),
        "--host", settings.host,
        "--port", str(settings.port),
        "--disable-runtime-dependency-installation",
        "--isolation", "process",
        "--superexec-auth-secret-file", str(_secret_file(settings.state_dir)),
    ]  # fmt: skip


def superexec_command(settings: SuperLinkSettings, superlink_pid: int) -> list[str]:
    """Flower's SuperExec for ServerApps, bound to the SuperLink (it exits when that does)."""
    return [
        str(Path(sys.executable).parent / "flower-superexec"),
        "--runtime-api-address", settings.reach,
        "--root-certificates", str(settings.ca),
        "--parent-pid", str(superlink_pid),
        "--superexec-auth-secret-file", str(_secret_file(settings.state_dir)),
    ]  # fmt: skip


def _secret_file(state_dir: Path) -> Path:
    return (Path(state_dir) / "superexec.secret").resolve()


def _ensure_secret(state_dir: Path) -> None:
    """Create the SuperLink/SuperExec shared secret once (owner-only), keep it afterwards."""
    path = _secret_file(state_dir)
    if path.is_file() and path.stat().st_size > 0:
        return
    atomic_write_bytes(path, secrets.token_hex(32).encode(), mode=0o600)


def _stop_leftovers(state_dir: Path) -> None:
    """Stop the ServerApps a crashed earlier ``server start`` left behind.

    A ServerApp exits on its own a while after its SuperExec dies, and until then it still
    talks to whatever SuperLink answers on the address, the restarted one included. The
    earlier SuperExec led its own process group (its ServerApps are in it): whatever is left
    of that group is killed, if it still runs Flower's programs (pids are reused).
    """
    try:
        info = json.loads((Path(state_dir) / "superlink.json").read_text())
        group = int(info.get("superexec_pid") or 0)
    except (OSError, ValueError, TypeError):
        return
    if group <= 1 or not Path("/proc").is_dir():
        return
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and (b"flwr-serverapp" in cmdline or b"superexec" in cmdline):
            members.append(int(stat.parent.name))
    if members:
        logger.warning(
            "stopping %d process(es) left by an earlier server start (SuperExec group %d)",
            len(members), group,
        )  # fmt: skip
        for pid in members:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


class _SuperExec:
    """Keeps one ``flower-superexec`` running beside the SuperLink (back-off 1 s .. 60 s)."""

    def __init__(self, settings: SuperLinkSettings, superlink_pid: int, log_path: Path) -> None:
        self.command = superexec_command(settings, superlink_pid)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._next_start = 0.0
        self._backoff = 1.0
        self._started_at = 0.0

    def check(self, env: dict[str, str]) -> None:
        """Start it if it is not running (and its back-off has passed)."""
        now = time.monotonic()
        if self.process is not None:
            code = self.process.poll()
            if code is None:
                if now - self._started_at > 60:
                    self._backoff = 1.0  # it has been up a while: the next failure starts over
                return
            logger.warning(
                "flower-superexec exited with code %s; starting it again in %.0f s "
                "(runs it was executing must be resumed: `pollinate server resume`)",
                code, self._backoff,
            )  # fmt: skip
            self.process = None
            self.restarts += 1
            self._next_start = now + self._backoff
            self._backoff = min(self._backoff * 2, 60.0)
        if now < self._next_start:
            return
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        self._started_at = now

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_superlink(
    settings: SuperLinkSettings,
    trust: list[Path],
    *,
    on_ready: Any = None,
    startup_timeout: float = 60.0,
) -> int:
    """Start the SuperLink, register ``trust`` keys, run until SIGTERM/SIGINT; its exit code.

    The SuperLink's own log goes to STATE_DIR/superlink.log.
    """
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    for key in trust:
        if not Path(key).is_file():
            raise ConfigError(f"--trust {key}: no such public key file")
    write_connection(settings)
    _ensure_secret(state)
    _stop_leftovers(state)
    log_path = state / "superlink.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            superlink_command(settings), stdout=log_file, stderr=subprocess.STDOUT,
            env=flwr_env(state), start_new_session=True,
        )  # fmt: skip
    superexec = _SuperExec(settings, process.pid, state / "superexec.log")

    def record() -> None:
        # who runs what, for operators and crash tests (SuperExec and its ServerApps exit
        # when the SuperLink does)
        pids = {"pid": process.pid, "wrapper_pid": os.getpid(), "address": settings.reach,
                "superexec_pid": superexec.process.pid if superexec.process else None,
                "superexec_restarts": superexec.restarts}  # fmt: skip
        atomic_write_text(state / "superlink.json", json.dumps(pids) + "\n")

    record()
    stopping = {"signal": 0}

    def forward(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        _wait_tls(settings, process, startup_timeout)
        for key in trust:
            node_id = trust_node(state, key)
            if node_id is None:
                logger.info("SuperNode key %s was already trusted", key)
            else:
                logger.info("trusted SuperNode key %s (node %s)", key, node_id)
        if on_ready is not None:
            on_ready(settings)
        while True:
            if stopping["signal"] == 0:
                running = superexec.process
                superexec.check(flwr_env(state))
                if superexec.process is not running:
                    record()
            try:
                return process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        raise
    finally:
        superexec.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
