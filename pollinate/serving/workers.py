"""``pollinate serve --workers N``: N server processes behind the same ports.

One process answers HTTP on one core (Python's event loop); past that rate, requests queue
in the kernel while the model's cores idle. With ``--workers N`` this process becomes a
supervisor:

1. it checks that the HTTP and gRPC ports are free, then holds each with a socket bound with
   ``SO_REUSEPORT`` (so port 0 resolves once); every worker binds the same ports the same
   way, and the kernel spreads new connections across the workers;
2. it starts N workers (``python -m pollinate.serving.workers``), each a whole server (its
   own model instances, batchers, REST and gRPC) that writes its metrics into a shared
   ``PROMETHEUS_MULTIPROC_DIR``; worker 0 decides roll-outs, the others follow its ledger
   (``ledger.py``);
3. it serves ``/metrics``: counters and histograms summed over the workers, gauges as the
   largest value among live workers;
4. once every worker is ready it writes the port file; a worker that exits is started again
   (back-off 1 s doubling to 30 s, reset after a minute up); SIGTERM / SIGINT stop the
   workers (each finishes its queued requests) and it exits 0.

The runtime directory (settings, metrics, ledger; mode 0700) is removed on exit. The worker
side is :func:`main` here too; each worker runs :func:`~pollinate.serving.server.serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import IO

from pollinate._atomic import atomic_write_text
from pollinate.errors import ConfigError, ExitCode, PollinateError
from pollinate.log import log_to_stderr, logger
from pollinate.serving.ab_routing import check_state
from pollinate.serving.config import ServeSettings, settings_from_json, settings_to_json
from pollinate.serving.ledger import RolloutLedger
from pollinate.serving.ports import hold_port, start_metrics_server
from pollinate.serving.repository import scan_repository
from pollinate.serving.server import WorkerContext, serve

__all__ = ["WorkerStartError", "main", "run_workers"]

_BACKOFF_MAX_S = 30.0
_STABLE_S = 60.0
_START_TIMEOUT_S = 300.0
_STOP_TIMEOUT_S = 30.0


class WorkerStartError(PollinateError):
    """A worker exited while starting; exits with the worker's own exit code (one of
    :class:`ExitCode`; any other code, a crash, is :attr:`ExitCode.FAILURE`)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.worker_exit_code = exit_code
        try:
            self.exit_code = ExitCode(exit_code)
        except ValueError:
            self.exit_code = ExitCode.FAILURE


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff_s: float = 1.0
    restart_at: float = 0.0
    restarts: int = 0


class _Supervisor:
    def __init__(self, settings: ServeSettings, runtime: Path, worker_args: list[str]) -> None:
        self.settings = settings
        self.runtime = runtime
        self.worker_args = worker_args
        self.metrics_dir = runtime / "metrics"
        self.workers = [_Worker(i) for i in range(settings.workers)]
        self.stopping = False

    def spawn(self, worker: _Worker) -> None:
        (self.runtime / f"ready-{worker.index}.json").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pollinate.serving.workers", "--runtime",
               str(self.runtime), "--index", str(worker.index), *self.worker_args]  # fmt: skip
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        worker.process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        worker.started = time.monotonic()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        pending = list(self.workers)
        while pending and not self.stopping:
            for worker in list(pending):
                assert worker.process is not None
                code = worker.process.poll()
                if code is not None:
                    raise WorkerStartError(
                        f"worker {worker.index} could not start (exit code {code}); "
                        "its error is above",
                        code if code > 0 else 1,
                    )
                if (self.runtime / f"ready-{worker.index}.json").exists():
                    pending.remove(worker)
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"{len(pending)} worker(s) not ready after {_START_TIMEOUT_S:.0f} s; "
                    "is the model repository loading?"
                )
            time.sleep(0.05)

    def watch(self) -> None:
        """Start workers that exit again, with back-off, until SIGTERM / SIGINT."""
        from prometheus_client.multiprocess import mark_process_dead

        while not self.stopping:
            time.sleep(0.2)
            now = time.monotonic()
            for worker in self.workers:
                process = worker.process
                if process is not None and process.poll() is not None:
                    mark_process_dead(process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
                    if now - worker.started > _STABLE_S:
                        worker.backoff_s = 1.0
                    worker.restart_at = now + worker.backoff_s
                    logger.error(
                        "worker %d (pid %d) exited with code %s; starting it again in %.0f s",
                        worker.index, process.pid, process.returncode, worker.backoff_s,
                    )  # fmt: skip
                    worker.backoff_s = min(2 * worker.backoff_s, _BACKOFF_MAX_S)
                    worker.process = None
                if worker.process is None and now >= worker.restart_at and not self.stopping:
                    worker.restarts += 1
                    self.spawn(worker)
                    assert worker.process is not None
                    logger.info("worker %d started again (pid %d, restart %d)",
                                worker.index, worker.process.pid, worker.restarts)  # fmt: skip

    def stop(self) -> None:
        """SIGTERM every worker (each drains its queue), SIGKILL those still up after 30 s."""
        live = [w.process for w in self.workers if w.process is not None]
        for process in live:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for process in live:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()


def run_workers(
    settings: ServeSettings, *, json_logs: bool = True, log_level: int = logging.INFO
) -> None:
    """Serve with ``settings.workers`` processes until SIGTERM / SIGINT (blocking)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    scan_repository(settings.repository)  # one clear error here, not one per worker
    check_state(settings.ab)  # the A/B records the workers will share, likewise
    host = settings.host
    holds = [hold_port(host, settings.http_port, "REST")]
    runtime = Path(tempfile.mkdtemp(prefix="pollinate-serve-"))
    worker_args = ["--log-format", "json" if json_logs else "text", "--log-level", str(log_level)]
    supervisor = _Supervisor(settings, runtime, worker_args)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        supervisor.stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    httpd = None
    try:
        holds.append(hold_port(host, settings.grpc_port, "gRPC"))
        http_port, grpc_port = (int(h.getsockname()[1]) for h in holds)
        supervisor.metrics_dir.mkdir()
        shared = replace(settings, http_port=http_port, grpc_port=grpc_port, port_file=None)
        # owner-only: the settings carry the bearer token
        atomic_write_text(runtime / "settings.json", settings_to_json(shared), mode=0o600)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(supervisor.metrics_dir))  # type: ignore[no-untyped-call]
        httpd, thread = start_metrics_server(host, settings.metrics_port, registry)
        for worker in supervisor.workers:
            supervisor.spawn(worker)
        supervisor.wait_ready()
        if supervisor.stopping:
            return
        ports = {"http": http_port, "grpc": grpc_port, "metrics": int(httpd.server_port)}
        if settings.port_file is not None:
            atomic_write_text(settings.port_file, json.dumps(ports) + "\n")
        logger.info(
            "serving %s with %d workers: http %d, grpc %d, metrics %d",
            settings.repository, settings.workers, ports["http"], ports["grpc"], ports["metrics"],
        )  # fmt: skip
        supervisor.watch()
        logger.info("shutting down: the workers finish their queued requests")
    finally:
        supervisor.stop()
        if httpd is not None:
            httpd.shutdown()
            thread.join(timeout=5)
        for hold in holds:
            hold.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(runtime, ignore_errors=True)
    logger.info("stopped")


class _WorkerField(logging.Filter):
    """Adds ``worker`` (its index) to every log record of a worker process."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def main(argv: list[str] | None = None, *, stderr: IO[str] | None = None) -> int:
    """A worker process (started by :func:`run_workers`, not by hand)."""
    parser = argparse.ArgumentParser(prog="python -m pollinate.serving.workers")
    parser.add_argument("--runtime", type=Path, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--log-format", choices=["json", "text"], default="json")
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    args = parser.parse_args(argv)
    log_to_stderr(json_lines=args.log_format == "json", level=args.log_level)
    for handler in logger.handlers:
        handler.addFilter(_WorkerField(args.index))
        if args.log_format == "text":
            handler.setFormatter(
                logging.Formatter(f"%(asctime)s %(levelname)s [worker {args.index}] %(message)s")
            )
    runtime: Path = args.runtime
    try:
        settings = settings_from_json((runtime / "settings.json").read_text(encoding="utf-8"))
        context = WorkerContext(
            index=args.index,
            ledger=RolloutLedger(runtime / "rollout.json", leader=args.index == 0),
            ready_file=runtime / f"ready-{args.index}.json",
            parent_pid=os.getppid(),
        )
        asyncio.run(serve(settings, worker=context))
    except PollinateError as err:
        out = stderr or sys.stderr
        out.write(f"error: worker {args.index}: {err}\n")  # one write: workers share stderr
        out.flush()
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
