"""``pollinate edge run``: the device daemon around Flower's SuperNode.

It runs Flower's ``flower-supernode`` (paced: ``device/supernode.py``, ``--poll-interval``)
with TLS and this device's authentication key, pointing the pollinate ClientApp at the
device's own data and state directory (node config ``data-path``, ``state-dir``, ``epsilon-
budget``; ``--emulate-latency`` for straggler tests), and supervises it:

- a SuperNode that exits is started again after a back-off that doubles from 1 s to 60 s
  (reset once it has run for a minute); while it runs, Flower itself reconnects to a
  SuperLink that went away;
- outside the training window (``--window 22:00-06:00``) no SuperNode runs;
- the ClientApp's threads are capped (``OMP_NUM_THREADS`` and friends);
- SIGTERM / SIGINT stop the SuperNode (SIGTERM to its process group, SIGKILL after 20 s) and
  the daemon exits 0.

The device's privacy policy is its own (``--dp``, ``--min-noise-multiplier``,
``--max-grad-norm``, ``--max-local-epochs``, ``--epsilon-budget``, passed to the ClientApp as
node config): a task asking for weaker privacy is refused. Its ledger lives in the state
directory (``device-id`` and ``device.accountant.json``, written by the ClientApp before each
reply), keyed by the device, not its node id, so a restarted daemon, a re-registered node or
a restarted device never resets epsilon. The daemon checks that ledger before it starts: a
missing or corrupt one (exit 11, unless ``--start-new-ledger``) or a spent budget (exit 4)
stops it before anything is trained or sent. The daemon's own state is
``STATE_DIR/daemon.json``; its log lines are JSON.

Bundles the server delivers are installed by the ClientApp into ``STATE_DIR/bundles``
(:mod:`pollinate.device.bundles`; verified with ``--bundle-public-key`` when given); with
``--serve-port`` the daemon answers local inference requests from the installed bundle
(:mod:`pollinate.device.local_serving`) on loopback.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollinate._atomic import atomic_write_text
from pollinate.config.latency import LatencyModel
from pollinate.device.supernode import DEFAULT_POLL_S, POLL_ENV, poll_interval
from pollinate.device.wake import warm_executor_env
from pollinate.device.zygote import check_zygote
from pollinate.errors import ConfigError
from pollinate.protocol import NodeKey

if TYPE_CHECKING:
    from pollinate.device.local_serving import LocalInference

__all__ = ["DaemonSettings", "EdgeDaemon", "parse_window", "read_status"]

logger = logging.getLogger("pollinate")
STATUS_FILE = "daemon.json"


def parse_window(text: str) -> tuple[dt.time, dt.time]:
    """``"HH:MM-HH:MM"`` (local time; may wrap past midnight) -> (start, end)."""
    try:
        start_s, end_s = text.split("-")
        start = dt.time.fromisoformat(start_s.strip())
        end = dt.time.fromisoformat(end_s.strip())
    except ValueError:
        msg = f"--window {text!r} is not HH:MM-HH:MM (for example 22:00-06:00)"
        raise ConfigError(msg) from None
    if start == end:
        raise ConfigError(f"--window {text!r} is empty; give different start and end times")
    return start, end


def _in_window(window: tuple[dt.time, dt.time] | None, now: dt.datetime) -> bool:
    if window is None:
        return True
    start, end = window
    t = now.time()
    return start <= t < end if start < end else (t >= start or t < end)


@dataclass(frozen=True)
class DaemonSettings:
    """What the daemon runs and how it supervises it."""

    superlink: str
    root_certificates: Path
    key: Path
    state_dir: Path
    data: Path | None = None
    partition_id: int | None = None
    num_partitions: int | None = None
    epsilon_budget: float | None = None
    threads: int = 1
    window: tuple[dt.time, dt.time] | None = None
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    stable_s: float = 60.0
    bundle_public_key: Path | None = None
    serve_port: int | None = None
    serve_host: str = "127.0.0.1"
    dp: str = "sample"
    min_noise_multiplier: float = 0.0
    max_grad_norm: float | None = None
    max_local_epochs: int | None = None
    start_new_ledger: bool = False
    allowed_imports: tuple[str, ...] = ()
    #: warm: ClientApp tasks run in forks of one process that imported torch and the app once
    #: (``device/warm_executor.py``); cold: Flower's fresh ``flwr-clientapp`` per message
    executor: str = "warm"
    #: seconds between the SuperNode's pulls while a run is active (``device/supernode.py``)
    poll_interval: float = DEFAULT_POLL_S
    #: a zygote's socket (``pollinate edge zygote``): the warm executor is forked from it
    zygote: Path | None = None
    emulate_latency: str = ""  #: answer train messages as late as this LatencyModel spec says

    def __post_init__(self) -> None:
        if ":" not in self.superlink:
            raise ConfigError(f"--superlink {self.superlink!r} must be HOST:PORT")
        for what, path in (("--root-certificates", self.root_certificates), ("--key", self.key)):
            if not Path(path).is_file():
                raise ConfigError(f"{what} {path} does not exist")
        if self.data is not None and not Path(self.data).exists():
            raise ConfigError(f"--data {self.data} does not exist")
        if (self.partition_id is None) != (self.num_partitions is None):
            raise ConfigError("--partition-id and --num-partitions go together")
        if self.data is None and self.partition_id is None:
            raise ConfigError(
                "say which data this device trains on: --data PATH (its own data), or "
                "--partition-id I --num-partitions N (a slice of the built-in data, for demos)"
            )
        if self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if self.bundle_public_key is not None and not Path(self.bundle_public_key).is_file():
            raise ConfigError(f"--bundle-public-key {self.bundle_public_key} does not exist")
        if self.serve_port is not None and not 1 <= self.serve_port <= 65535:
            raise ConfigError(f"--serve-port must be 1..65535, got {self.serve_port}")
        if self.epsilon_budget is not None and self.epsilon_budget <= 0:
            raise ConfigError(f"--epsilon-budget must be positive, got {self.epsilon_budget}")
        if self.executor not in ("warm", "cold"):
            raise ConfigError(f"--executor must be warm or cold, got {self.executor!r}")
        poll_interval(self.poll_interval)  # one ConfigError when out of range
        if self.zygote is not None:
            check_zygote(Path(self.zygote), self.executor)
        if self.dp not in ("sample", "none"):
            raise ConfigError(f"--dp must be sample or none, got {self.dp!r}")
        if not (noise := self.min_noise_multiplier) >= 0:
            raise ConfigError(f"--min-noise-multiplier must be >= 0, got {noise}")
        if self.emulate_latency:
            LatencyModel.parse(self.emulate_latency)  # one ConfigError naming the bad part
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"--max-grad-norm must be positive, got {self.max_grad_norm}")
        if self.max_local_epochs is not None and self.max_local_epochs < 1:
            raise ConfigError(f"--max-local-epochs must be >= 1, got {self.max_local_epochs}")
        for spec in self.allowed_imports:
            module, _, name = spec.partition(":")
            if not module or not name or "," in spec or '"' in spec:
                raise ConfigError(
                    f"--allow-import {spec!r} must be an import path 'package.module:Name'"
                )

    def node_config(self) -> str:
        """The SuperNode's ``--node-config``: what the ClientApp learns about this device."""
        items: dict[str, str] = {NodeKey.STATE_DIR: f'"{Path(self.state_dir).resolve()}"'}
        if self.data is not None:
            items[NodeKey.DATA_PATH] = f'"{Path(self.data).resolve()}"'
        else:
            items[NodeKey.PARTITION_ID] = str(self.partition_id)
            items[NodeKey.NUM_PARTITIONS] = str(self.num_partitions)
        if self.epsilon_budget is not None:
            items[NodeKey.EPSILON_BUDGET] = repr(float(self.epsilon_budget))
        if self.bundle_public_key is not None:
            items[NodeKey.BUNDLE_PUBLIC_KEY] = f'"{Path(self.bundle_public_key).resolve()}"'
        # the device's privacy policy: the ClientApp refuses tasks asking for weaker privacy
        items[NodeKey.PRIVACY_DP] = f'"{self.dp}"'
        if self.min_noise_multiplier > 0:
            items[NodeKey.PRIVACY_MIN_NOISE] = repr(float(self.min_noise_multiplier))
        if self.max_grad_norm is not None:
            items[NodeKey.PRIVACY_MAX_CLIP] = repr(float(self.max_grad_norm))
        if self.max_local_epochs is not None:
            items[NodeKey.PRIVACY_MAX_EPOCHS] = str(int(self.max_local_epochs))
        if self.start_new_ledger:
            items[NodeKey.NEW_LEDGER] = '"true"'
        if self.allowed_imports:  # code the owner chose to run; any other import path is refused
            items[NodeKey.ALLOWED_IMPORTS] = '"' + ",".join(self.allowed_imports) + '"'
        if self.emulate_latency:
            items[NodeKey.EMULATE_LATENCY] = f'"{LatencyModel.parse(self.emulate_latency).spec()}"'
        return " ".join(f"{k}={v}" for k, v in items.items())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_status(state_dir: Path) -> dict[str, Any]:
    """The daemon's ``daemon.json`` (empty when it never ran here)."""
    path = Path(state_dir) / STATUS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class EdgeDaemon:
    """Runs and supervises one SuperNode; :meth:`run` returns when asked to stop."""

    def __init__(self, settings: DaemonSettings) -> None:
        self.settings = settings
        self.stop = threading.Event()
        self.restarts = 0
        self._status: dict[str, Any] = {}
        self._port = _free_port()  # the SuperNode's runtime (ClientAppIo) API

    def command(self) -> list[str]:
        s = self.settings
        isolation = ["--isolation", "process"] if s.executor == "warm" else []
        return [
            sys.executable, "-m", "pollinate.device.supernode",  # Flower's, paced
            "--superlink", s.superlink,
            "--root-certificates", str(Path(s.root_certificates).resolve()),
            "--auth-supernode-private-key", str(Path(s.key).resolve()),
            "--node-config", s.node_config(),
            "--port", str(self._port), *isolation,
        ]  # fmt: skip

    def executor_command(self) -> list[str]:
        """The warm executor, polling the SuperNode's runtime API for tasks (forked from the
        zygote, through an attachment that stands for it, with ``--zygote``)."""
        args = ["--runtime-api-address", f"127.0.0.1:{self._port}"]
        if self.settings.zygote is not None:
            zygote = str(Path(self.settings.zygote).resolve())
            return [sys.executable, "-m", "pollinate.device.zygote", "attach", zygote, "--", *args]
        return [sys.executable, "-m", "pollinate.device.warm_executor", *args]

    def _env(self) -> dict[str, str]:
        threads = str(self.settings.threads)
        return {
            **os.environ,
            "FLWR_HOME": str((Path(self.settings.state_dir) / "flwr").resolve()),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            POLL_ENV: str(self.settings.poll_interval),
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def _write_status(self, **changes: Any) -> None:
        self._status.update(
            changes, updated=dt.datetime.now(dt.UTC).isoformat(), restarts=self.restarts
        )
        atomic_write_text(
            Path(self.settings.state_dir) / STATUS_FILE, json.dumps(self._status, indent=2) + "\n"
        )

    def _event(self, message: str, **fields: Any) -> None:
        logger.info(message, extra={"event": message, **fields})

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        """Stop ``process``'s group (a SuperNode, or the warm executor and its forks)."""
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def check_ledger(self) -> float:
        """The epsilon this device has spent (at delta 1e-5), from its own ledger.

        Raises:
            PrivacyLedgerError: The ledger is missing or corrupt (and no ``--start-new-ledger``).
            PrivacyBudgetError: The device's own budget is already spent: nothing would train.
        """
        from pollinate.device.ledger import DeviceLedger
        from pollinate.errors import PrivacyBudgetError

        s = self.settings
        ledger = DeviceLedger(Path(s.state_dir))
        ledger.identity()
        spent = ledger.load(allow_new=s.start_new_ledger).epsilon(1e-5)
        if s.dp == "sample" and s.epsilon_budget is not None and spent >= s.epsilon_budget:
            raise PrivacyBudgetError(
                f"this device's epsilon budget {s.epsilon_budget:g} is already spent (epsilon "
                f"{spent:.4f} at delta 1e-05, {ledger.accountant_path}); it would refuse every "
                "training round, so the daemon does not start"
            )
        return spent

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (or :attr:`stop` is set); returns 0."""
        s = self.settings
        state = Path(s.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        spent = self.check_ledger()
        self._event("privacy ledger checked", epsilon=spent, budget=s.epsilon_budget)
        settings_record = {k: str(v) for k, v in asdict(s).items() if v is not None}
        self._status = {"pid": os.getpid(), "settings": settings_record, "state": "starting"}
        serving = self._start_serving()
        self._write_status()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop.set())
        delay = s.backoff_initial_s
        while not self.stop.is_set():
            if not _in_window(s.window, dt.datetime.now()):
                self._write_status(state="waiting for the training window", supernode_pid=None)
                self._event("outside the training window; not training")
                while not self.stop.is_set() and not _in_window(s.window, dt.datetime.now()):
                    self.stop.wait(5.0)
                continue
            self._port = _free_port()
            executor, env = None, self._env()
            if s.executor == "warm":  # the SuperNode wakes it; its forks' 10 s heartbeat clock
                env.update(warm_executor_env(state))
            with (state / "supernode.log").open("ab") as log_file:
                process = subprocess.Popen(
                    self.command(), stdout=log_file, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True,
                )  # fmt: skip
                if s.executor == "warm":  # stopped and restarted with the SuperNode
                    executor = subprocess.Popen(
                        self.executor_command(), stdout=log_file, stderr=subprocess.STDOUT,
                        env=env, start_new_session=True,
                    )  # fmt: skip
            started = time.monotonic()
            self._write_status(
                state="running",
                supernode_pid=process.pid,
                executor_pid=executor.pid if executor is not None else None,
                started=dt.datetime.now(dt.UTC).isoformat(),
            )
            self._event("supernode started", pid=process.pid, superlink=s.superlink)
            while process.poll() is None and not self.stop.is_set():
                if not _in_window(s.window, dt.datetime.now()):
                    self._event("the training window closed; stopping the supernode")
                    break
                if executor is not None and executor.poll() is not None:
                    self._event("the warm executor exited; restarting the supernode with it",
                                exit_code=executor.returncode)  # fmt: skip
                    break
                self.stop.wait(0.5)
            self._terminate(process)  # and whatever of its group is left
            if executor is not None:
                self._terminate(executor)  # with its forks
            if self.stop.is_set():
                break
            code = process.returncode
            if time.monotonic() - started >= s.stable_s:
                delay = s.backoff_initial_s
            self.restarts += 1
            self._write_status(
                state="restarting", supernode_pid=None, executor_pid=None, last_exit=code
            )
            self._event("supernode exited; restarting", exit_code=code, restart_in_s=delay)
            self.stop.wait(delay)
            delay = min(delay * 2, s.backoff_max_s)
        if serving is not None:
            serving.close()
        self._write_status(state="stopped", supernode_pid=None, executor_pid=None)
        self._event("stopped")
        return 0

    def _start_serving(self) -> LocalInference | None:
        """Local inference from the installed bundle (``--serve-port``), on its own thread."""
        s = self.settings
        if s.serve_port is None:
            return None
        from pollinate.device.local_serving import LocalInference

        try:
            serving = LocalInference(
                s.state_dir, host=s.serve_host, port=s.serve_port, threads=s.threads,
                public_key=s.bundle_public_key,
            )  # fmt: skip
        except OSError as err:
            raise ConfigError(
                f"--serve-port {s.serve_port}: cannot listen on {s.serve_host} ({err.strerror}); "
                "choose a free port"
            ) from err
        serving.start()
        host, port = serving.address
        self._status["serving"] = f"http://{host}:{port}"
        self._event("serving local inference", url=f"http://{host}:{port}/v1/predict")
        return serving
