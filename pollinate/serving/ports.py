"""Listening sockets and the metrics endpoint, shared by a server and the ``--workers`` supervisor.

* :func:`bind_listener`: the REST listening socket of a server (with ``reuse_port`` for a
  worker, which shares the port with the other workers);
* :func:`hold_port`: the supervisor's check that a port is free, then its hold on it (bound
  with ``SO_REUSEPORT``, not listening) so port 0 resolves once for every worker;
* :func:`start_metrics_server`: ``/metrics`` of a Prometheus registry on its own thread.

A port that cannot be had is a :class:`ConfigError` naming it.
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING

from pollinate.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

__all__ = ["bind_listener", "hold_port", "start_metrics_server"]


def bind_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking TCP socket listening on ``host:port`` (``reuse_port``: SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says TCP; without it each response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {err.strerror}; pick another port"
        ) from err
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def hold_port(host: str, port: int, what: str) -> socket.socket:
    """Fail if ``port`` is taken; else hold it (SO_REUSEPORT, not listening) for the workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # no SO_REUSEPORT: must be free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({what}): {err.strerror}; pick another port"
            ) from err
        port = int(probe.getsockname()[1])
    hold = socket.socket(family, socket.SOCK_STREAM)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    hold.bind((host, port))
    return hold


def start_metrics_server(
    host: str, port: int, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` at ``http://host:port/metrics`` on a thread; a busy port is a
    ConfigError (the single server's registry, or the supervisor's multiprocess one)."""
    from prometheus_client import start_http_server

    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise ConfigError(
            f"cannot listen on {host}:{port} (metrics): {err.strerror}; pick another port"
        ) from err
