"""One warm process for every device on a host: ``pollinate edge zygote SOCKET``.

A device's warm executor (``device/warm_executor.py``) imports torch, Opacus, Flower and the
ClientApp once and forks per message. Each device pays that import in memory: about 400 MB,
most of it Python objects private to the process. Where many devices share one host (a fleet
emulated on one machine, a gateway training for several sensors), a zygote imports them once
and forks each device's executor from itself, so every executor shares the zygote's pages
(copy-on-write, after ``gc.freeze``) and costs only what it changes.

``pollinate edge run --zygote SOCKET`` then starts, instead of a warm executor, a small
attachment (``python -m pollinate.device.zygote attach``, standard library only) that sends
the zygote its arguments, environment, working folder and standard streams over the Unix
socket. The zygote forks; the fork takes the device's streams, environment and folder, starts
its own session and runs :func:`pollinate.device.warm_executor.main`. The attachment waits for
the zygote to report the executor's exit status and exits with it, so the daemon supervises it
as it would the executor itself; a SIGTERM to the attachment stops the executor's session.

The zygote is single-threaded (a fork of a threaded process can inherit a held lock): one
``select`` loop accepts attachments and reaps executors. The socket is created private to
its user (0600), the only ones who may start executors through it.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

__all__ = ["attach", "check_zygote", "serve"]

_MAX_REQUEST = 1 << 20
_STATUS = struct.Struct("!ii")  # (pid, exit status), pid first then the status at the end


def check_zygote(path: Path, executor: str = "warm") -> None:
    """One :class:`~pollinate.errors.ConfigError` unless a zygote can serve a daemon whose
    executor is ``executor`` at ``path``."""
    from pollinate.errors import ConfigError

    if executor != "warm":
        raise ConfigError("--zygote forks warm executors: drop --executor cold")
    if not path.is_socket():
        raise ConfigError(
            f"--zygote {path}: no zygote listens there; start one with "
            f"`pollinate edge zygote {path}`"
        )


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One attachment's request: its JSON and the three standard streams' descriptors."""
    fds = array.array("i")
    data, ancillary, _flags, _addr = conn.recvmsg(_MAX_REQUEST, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return json.loads(data.decode("utf-8")), list(fds)


def _become_executor(
    request: dict[str, Any], fds: list[int], keep_closed: list[socket.socket]
) -> None:
    """In the fork: take the device's streams, environment and folder; run its executor."""
    code = 0
    try:
        for sock in keep_closed:
            sock.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()  # its own session: the attachment stops the executor and its forks at once
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        from pollinate.device import warm_executor

        sys.argv = ["python -m pollinate.device.warm_executor", *request["argv"]]
        warm_executor.main(list(request["argv"]))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(path: Path) -> None:
    """Import what every executor needs, then fork one per attachment until SIGTERM."""
    import gc

    from pollinate.device.warm_executor import warm_up
    from pollinate.errors import ConfigError

    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"zygote socket {path}: the folder {path.parent} does not exist")
    if len(os.fsencode(path.resolve())) > 100:  # sockaddr_un holds 108 bytes
        raise ConfigError(
            f"zygote socket {path}: the path is too long for a Unix socket (at most 100 "
            "bytes); choose a shorter one, e.g. /tmp/pollinate-zygote.sock"
        )

    warm_up()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    gc.collect()
    gc.freeze()  # the imported objects stay out of the collector: their pages stay shared
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    attached: dict[int, socket.socket] = {}  # executor pid -> its attachment
    print(f"zygote ready at {path} (pid {os.getpid()})", flush=True)
    try:
        while not stopping:
            for key, _ in selector.select(timeout=0.2):
                if key.fileobj is not listener:  # an attachment went away: stop its executor
                    _detached(selector, key)
                    continue
                conn, _addr = listener.accept()
                try:
                    request, fds = _recv_request(conn)
                except (OSError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    selector.close()  # the zygote's; the executor has none of its sockets
                    _become_executor(request, fds, [listener, conn, *attached.values()])
                for fd in fds:
                    os.close(fd)
                attached[pid] = conn
                with contextlib.suppress(OSError):
                    conn.sendall(_STATUS.pack(pid, 0))
                selector.register(conn, selectors.EVENT_READ, pid)
            _reap(selector, attached)
    finally:
        for pid in attached:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _detached(selector: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
    """An attachment's socket is readable: it closed (killed, or exited), so its executor
    and the executor's forks stop too (nothing else would stop them)."""
    conn = key.fileobj
    assert isinstance(conn, socket.socket)
    try:
        closed = not conn.recv(1)
    except OSError:
        closed = True
    if closed:
        selector.unregister(conn)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(key.data), signal.SIGTERM)


def _reap(selector: selectors.BaseSelector, attached: dict[int, socket.socket]) -> None:
    """Tell each finished executor's attachment its exit status."""
    while attached:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = attached.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(conn)
            with contextlib.suppress(OSError):
                conn.sendall(_STATUS.pack(pid, os.waitstatus_to_exitcode(status)))
            conn.close()


def attach(path: Path, argv: list[str]) -> int:
    """Have the zygote at ``path`` run a warm executor with ``argv`` and this process's
    streams, environment and folder; wait for it and return its exit status."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError as err:
        print(
            f"pollinate zygote: cannot reach the zygote at {path} ({err.strerror}); start it "
            f"with `pollinate edge zygote {path}`",
            file=sys.stderr,
        )
        return 2
    request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}
    fds = array.array("i", [0, 1, 2])
    conn.sendmsg(
        [json.dumps(request).encode("utf-8")], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
    )
    pid = _read_status(conn)[0]
    if pid <= 0:
        return 2

    def stop(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return _read_status(conn)[1]


def _read_status(conn: socket.socket) -> tuple[int, int]:
    """The next (pid, status) from the zygote; (0, 1) when it went away."""
    data = b""
    while len(data) < _STATUS.size:
        try:
            chunk = conn.recv(_STATUS.size - len(data))
        except InterruptedError:
            continue
        if not chunk:
            return 0, 1
        data += chunk
    pid, status = _STATUS.unpack(data)
    return int(pid), int(status)


def main(argv: list[str] | None = None) -> None:
    """``python -m pollinate.device.zygote serve SOCKET`` or ``attach SOCKET -- ARGS``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "serve":
        serve(Path(args[1]))
        return
    if len(args) >= 2 and args[0] == "attach":
        rest = args[2:]
        sys.exit(attach(Path(args[1]), rest[1:] if rest[:1] == ["--"] else rest))
    sys.exit("usage: python -m pollinate.device.zygote serve SOCKET | attach SOCKET -- ARGS")


if __name__ == "__main__":
    main()
