"""A warm ClientApp executor for a device's SuperNode: ``python -m pollinate.device.warm_executor``.

Flower's SuperNode (``--isolation process``) hands each message to whatever SuperExec pulls
its task from the ClientAppIo (runtime) API; Flower's own executor then starts a fresh
``flwr-clientapp`` process, which imports Python, torch, Flower and the app again for every
message. This process is Flower's SuperExec loop (``run_superexec``: the same task API,
tokens and TLS) with one executor swapped in: torch, Flower and pollinate's ClientApp are
imported once, and each task runs in a ``fork`` of this warm process, through Flower's own
``run_clientapp`` (pull the message, run the app, push the reply).

A task that crashes or leaks takes only its fork down, and the next task gets a fresh fork of
the clean parent. A fork killed by a signal has its message answered with an error reply by
the parent at once (:mod:`.fork_crash`); behind that, Flower's task expiry offers a task again
or fails it with an error reply on a 10 s heartbeat clock rather than Flower's 30 s
(``_flower.quick_task_expiry``, set in both the SuperNode and here). The parent
never runs torch itself (no OpenMP threads to inherit) and holds no thread of its own when it
forks. The daemon (``device/daemon.py``, ``--executor warm``) starts it in the SuperNode's
process group, so stopping or killing the SuperNode stops it too.

The ClientApp a fork runs is the one installed on the device (already imported here), not a
copy from the run's FAB: a device runs its own pollinate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from typing import Any

from pollinate.device.fork_crash import report, tell_parent
from pollinate.device.wake import IDLE_POLL_S, WAKE_ENV, WakeableTime

__all__ = ["ForkExecutor", "main", "warm_up"]

#: Flower's setting for how often its SuperExec asks the SuperNode for a task
POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
#: how often an executor that the SuperNode cannot wake asks (a task waits half of it)
UNWOKEN_POLL_S = 0.2

#: what is imported once, before the first task (the cost a cold start pays per message).
#: torch._dynamo: torch imports it when the first optimizer is built, 1.5 s in every fork;
#: scipy.stats and scipy.optimize: the exact full-batch accountant's (privacy.gaussian);
#: Flower's ClientApp runner and TLS helpers, which each fork imported first (about 30 ms together)
WARM_MODULES = (
    "torch", "torch._dynamo", "opacus", "scipy.stats", "scipy.optimize", "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp", "flwr.supercore.tls", "pollinate.clientapp.app",
)  # fmt: skip


class ForkExecutor:
    """Flower's executor protocol (``flwr.supercore.superexec.executor.types.Executor``):
    ClientApp tasks in forks of this process; other task kinds as Flower's subprocesses."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self._fallback = SubprocessExecutor()
        self._children: dict[int, tuple[Any, int]] = {}  # pid: (its task, its pipe)

    def get_eligible_capacity(
        self, supported_task_types: set[Any], **_: Any
    ) -> tuple[set[Any], set[str]]:
        """Every task type, at once (a fork needs no capacity wait)."""
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: Any = None, **_: Any) -> None:
        """Nothing to wait for."""

    def launch(self, spec: Any) -> Any:
        """Run the task in a fork (a ClientApp), or as Flower would (anything else)."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        self.reconcile()
        read, write = os.pipe()  # what Flower's runtime gave the fork (.fork_crash)
        pid = os.fork()
        if pid == 0:  # the task: Flower's ClientApp process, minus its imports
            os.close(read)
            _run_task(spec, write)
        os.close(write)
        os.set_blocking(read, False)  # should the fork leave a child holding its end
        self._children[pid] = (spec, read)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap the forks that finished; one killed by a signal has its message answered
        with an error reply at once (:func:`.fork_crash.report`)."""
        for pid, (spec, read) in list(self._children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if not done:
                continue
            del self._children[pid]
            records = b""
            with contextlib.suppress(OSError):
                while chunk := os.read(read, 65536):
                    records += chunk
            os.close(read)
            if os.WIFSIGNALED(status):
                report(spec, os.WTERMSIG(status), records)

    def close(self) -> None:
        """Stop the forks still running."""
        for pid, (_, read) in self._children.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            os.close(read)
        self._children.clear()


def _run_task(spec: Any, tell: int) -> None:
    """In the fork: Flower's ``run_clientapp`` for one token, telling the parent what it got
    over ``tell``; then leave at once."""
    code = 0
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        tell_parent(tell)
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(
                spec.root_certificates_path, spec.insecure
            ),
            parent_pid=None,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def warm_up() -> None:
    """Import :data:`WARM_MODULES` and pace Flower's object pulls: what every task would
    otherwise pay for itself; then freeze what is loaded out of the garbage collector, so a
    task's collections never walk (and copy the pages of) the imported objects. A no-op the
    second time (in a zygote's fork)."""
    import gc
    import importlib

    for module in WARM_MODULES:
        importlib.import_module(module)
    from pollinate._flower import pace_object_pulls

    pace_object_pulls()  # a fork asks for its message's objects every 50 ms, not 1-4 s
    gc.collect()
    gc.freeze()


def _listen_for_wakes(flower: Any) -> bool:
    """Sleep Flower's SuperExec loop on the SuperNode's wake FIFO (:mod:`.wake`) when the
    daemon named one; ``False`` (and Flower's clock kept) when it did not, or it is unusable."""
    path = os.environ.get(WAKE_ENV)
    if not path or getattr(flower, "time", None) is not time:
        if path:
            print("warm executor: Flower's SuperExec loop changed; polling for tasks every "
                  f"{UNWOKEN_POLL_S} s", file=sys.stderr)  # fmt: skip
        return False
    try:
        flower.time = WakeableTime(path)
    except OSError as err:
        print(f"warm executor: no wakes from the SuperNode ({err}); polling for tasks every "
              f"{UNWOKEN_POLL_S} s", file=sys.stderr)  # fmt: skip
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    """Import what every task needs, then run Flower's SuperExec loop with forks."""
    parser = argparse.ArgumentParser(
        prog="python -m pollinate.device.warm_executor",
        description="A SuperExec whose ClientApp tasks run in forks of one warm process.",
    )
    parser.add_argument("--runtime-api-address", required=True, help="The SuperNode's API.")
    parser.add_argument("--parent-pid", type=int, default=None, help="Exit with this process.")
    args = parser.parse_args(argv)
    warm_up()
    from flwr.supercore.superexec import run_superexec as flower

    from pollinate._flower import (
        TASK_HEARTBEAT_ENV,
        WARM_TASK_HEARTBEAT_S,
        quick_task_expiry,
        task_heartbeat_s,
    )

    # forks heartbeat on the clock the SuperNode judges them by (more often is harmless)
    heartbeat = os.environ.get(TASK_HEARTBEAT_ENV)
    interval = task_heartbeat_s(heartbeat) if heartbeat else WARM_TASK_HEARTBEAT_S
    quick_task_expiry(interval, side="task")

    woken = _listen_for_wakes(flower)
    # a task is taken when the SuperNode wakes us; without the FIFO, poll as we used to
    os.environ.setdefault(POLL_INTERVAL_ENV, str(IDLE_POLL_S if woken else UNWOKEN_POLL_S))
    executor = ForkExecutor()
    # Flower's loop, our executor
    flower.get_executor = lambda *_a, **_k: executor  # type: ignore[attr-defined]
    flower.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=True,  # the SuperNode's runtime API listens on loopback only
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
