"""One server process: REST, gRPC and metrics servers over one :class:`ModelManager`.

Everything runs on one asyncio event loop (uvicorn for REST, ``grpc.aio`` for gRPC, the
batchers and the repository watcher); model calls run on one thread per instance, where
ONNX Runtime and torch release the GIL. The Prometheus endpoint runs on its own thread.
SIGTERM / SIGINT stop taking connections, finish queued requests, and exit 0. With
``--workers N`` each of N processes runs :func:`serve` as a worker (given a
:class:`WorkerContext`; see ``workers.py``); ``launch.py`` chooses between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from pollinate._atomic import atomic_write_text
from pollinate.errors import ConfigError
from pollinate.log import logger
from pollinate.serving.ab_routing import Experiments
from pollinate.serving.config import ServeSettings
from pollinate.serving.grpc_service import add_servicer
from pollinate.serving.ledger import RolloutLedger
from pollinate.serving.metrics import ServingMetrics
from pollinate.serving.models import ModelManager
from pollinate.serving.ports import bind_listener, start_metrics_server
from pollinate.serving.rest import build_rest_app
from pollinate.serving.tracing import ServingTracer, serving_tracer

__all__ = ["Ports", "WorkerContext", "serve"]

_GRPC_GRACE_S = 5.0


@dataclass(frozen=True)
class Ports:
    """The ports actually bound (port 0 in the settings means any free port)."""

    http: int
    grpc: int
    metrics: int


@dataclass(frozen=True)
class WorkerContext:
    """How worker ``index`` of ``pollinate serve --workers N`` serves: on ports shared with
    the other workers (SO_REUSEPORT), metrics in the shared multiprocess directory (the
    supervisor serves them), roll-out through ``ledger``; ready once ``ready_file`` exists;
    it stops when its supervisor (``parent_pid``) is gone."""

    index: int
    ledger: RolloutLedger
    ready_file: Path
    parent_pid: int


async def serve(
    settings: ServeSettings,
    *,
    stop: asyncio.Event | None = None,
    worker: WorkerContext | None = None,
    tracer: ServingTracer | None = None,
) -> None:
    """Run the server until ``stop`` is set (or SIGTERM/SIGINT).

    Requests are traced as ``settings.tracing`` says, or with ``tracer`` when given (its
    owner shuts it down).
    """
    import uvicorn

    tls = settings.tls_cert is not None and settings.tls_key is not None
    # first: a busy port fails before any work
    sock = bind_listener(settings.host, settings.http_port, reuse_port=worker is not None)
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.callback(sock.close)
        if tracer is None and (tracer := serving_tracer(settings.tracing)) is not None:
            cleanup.callback(tracer.shutdown)  # last out: flushes the spans of the drain
        metrics = ServingMetrics()
        experiments = Experiments(settings.ab, metrics)  # their saved state, or a clear error
        manager = ModelManager(settings, metrics, ledger=worker.ledger if worker else None)
        await manager.start()
        cleanup.push_async_callback(manager.close)
        experiments.check(manager.get)
        experiments.start()
        cleanup.push_async_callback(experiments.close)
        metrics_port = (
            _start_metrics(settings, metrics, cleanup) if worker is None else settings.metrics_port
        )

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_request_bytes),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                # workers share the port; a single server must find it free
                ("grpc.so_reuseport", int(worker is not None)),
            ]
        )
        add_servicer(server, manager, tracer, experiments)
        address = f"{settings.host}:{settings.grpc_port}"
        try:
            if tls:
                assert settings.tls_cert is not None and settings.tls_key is not None
                creds = grpc.ssl_server_credentials(
                    [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
                )
                grpc_port = server.add_secure_port(address, creds)
            else:
                grpc_port = server.add_insecure_port(address)
        except RuntimeError as err:
            raise ConfigError(
                f"cannot listen on {address} (gRPC): {err}; pick another port"
            ) from err
        await server.start()
        cleanup.push_async_callback(server.stop, _GRPC_GRACE_S)

        http_port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            build_rest_app(manager, experiments, tracer),
            http="httptools",
            loop="none",
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_keep_alive=30,
            proxy_headers=False,
            server_header=False,
            date_header=False,
            backlog=2048,
            ssl_certfile=str(settings.tls_cert) if tls else None,
            ssl_keyfile=str(settings.tls_key) if tls else None,
            ssl_version=ssl.PROTOCOL_TLS_SERVER,
        )
        web = uvicorn.Server(config)
        # Signals are ours (drain, then exit); uvicorn would re-raise them after its shutdown.
        web.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
                loop.add_signal_handler(sig, stop.set)
        web_task = loop.create_task(web.serve(sockets=[sock]))
        while not web.started and not web_task.done():
            await asyncio.sleep(0.01)
        ports = Ports(http=http_port, grpc=grpc_port, metrics=metrics_port)
        if worker is not None:
            ready = {"pid": os.getpid(), **ports.__dict__}
            atomic_write_text(worker.ready_file, json.dumps(ready) + "\n")
            orphaned = loop.create_task(_watch_parent(worker.parent_pid, stop))
            cleanup.callback(orphaned.cancel)
        elif settings.port_file is not None:
            atomic_write_text(settings.port_file, json.dumps(ports.__dict__) + "\n")
        logger.info(
            "serving %s: http %d, grpc %d, %s%s",
            settings.repository, ports.http, ports.grpc,
            f"metrics {ports.metrics}" if worker is None else f"worker {worker.index}",
            " (TLS)" if tls else "",
        )  # fmt: skip
        stop_task = loop.create_task(stop.wait())
        await asyncio.wait({web_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        logger.info("shutting down: finishing queued requests")
        web.should_exit = True
        await web_task
    logger.info("stopped")


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Stop a worker whose supervisor is gone (killed: it cannot stop its workers itself)."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.5)
    logger.warning("the supervisor (pid %d) is gone; stopping", parent_pid)
    stop.set()


def _start_metrics(
    settings: ServeSettings, metrics: ServingMetrics, cleanup: contextlib.AsyncExitStack
) -> int:
    httpd, thread = start_metrics_server(settings.host, settings.metrics_port, metrics.registry)

    def stop() -> None:
        httpd.shutdown()
        thread.join(timeout=5)
        httpd.server_close()

    cleanup.callback(stop)
    return int(httpd.server_port)
