"""Flower's object pulls, paced for rounds of seconds (flwr 1.42).

A Flower message travels as a tree of objects that every hop pulls after the message itself:
the SuperNode from the SuperLink, the ClientApp from its SuperNode, the ServerApp (replies)
from the SuperLink. A hop that asks before the previous one has stored the objects (the
SuperNode hands the task to its executor before it pulled the objects; a device pushes a
reply's objects after the reply) gets "unavailable" and backs off 1 s, then 2, 4, ... 10 s.
On a fleet of small models that was a 1-3 s stall in most messages, both ways.

:func:`pace_object_pulls` makes those retries start at :data:`FIRST_RETRY_S` and stop
growing at :data:`LONGEST_RETRY_S`; the number of tries grows to match, so a slow upload is
waited for as long as before (Flower's two-hour limit for the whole pull still holds). It
changes the defaults of Flower's own functions, so every caller in the process (Flower's
SuperNode loop, ClientApp runtime and grid) gets them; it is called where those processes
start: ``device/supernode.py``, ``device/warm_executor.py`` (and the zygote, through its
``warm_up``) and the ServerApp (``serverapp/transport.py``, when it wraps a real grid).

:func:`patient_sqlite` is for the SuperLink (``ops/flower_superlink.py``): its SQLite state
gives a writer 5 s to get the lock, then answers "database is locked" and the message in
hand is lost. With 25-40 devices on two busy cores that lost replies; it waits 60 s instead.

:func:`quick_abort_checks` is for the SuperLink too: before it answers a device's request
(pull a message, push or pull an object, confirm a receipt), Flower asks its SQLite state
whether the run was stopped, and every such check also sweeps expired task tokens, two
``UPDATE`` statements and a ``SELECT`` per request, about a sixth of a busy SuperLink's CPU.
The answer "the run goes on" is kept for :data:`ABORT_CHECK_TTL_S`; a stopped or finished run
is asked about every time, so a stopped run's devices hear it at most that much later.

:func:`quick_record_items` is for the fast engine (``simulation/runner.py``), which builds
and reads a few thousand Flower records a round: Flower's ``TypedDict`` (every record's base)
wraps each check and read in ``typing.cast(Callable[[K], None], ...)``, which builds two
typing aliases per item set (about 8 ms of a 100-client round of 0.11 s, measured). It swaps
in the same methods without the casts: the same checks, the same errors, the same storage.

:func:`quick_task_expiry` is for a device with a warm executor. Flower gives a task its
executor claimed :data:`FLOWER_TASK_HEARTBEAT_S` (30 s) to start before it offers the task
again, and a running task twice that without a heartbeat before it fails the task with an
error reply; its SuperNode meanwhile waits for that reply and pulls nothing else. Sized for a
cold ``flwr-clientapp`` start, that made a fork killed mid-message (out of memory, say) cost
its device the next round too (the 40 s round after the kill was over before the 60 s were).
The SuperNode (``side="node"``) judges by :data:`WARM_TASK_HEARTBEAT_S` instead, and the
executor's forks (``side="task"``) send their heartbeats on that clock (every 3.5-4.5 s).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Literal

__all__ = [
    "ABORT_CHECK_TTL_S",
    "FIRST_RETRY_S",
    "FLOWER_TASK_HEARTBEAT_S",
    "LONGEST_RETRY_S",
    "SQLITE_BUSY_TIMEOUT_MS",
    "TASK_HEARTBEAT_ENV",
    "WARM_TASK_HEARTBEAT_S",
    "pace_object_pulls",
    "patient_sqlite",
    "quick_abort_checks",
    "quick_record_items",
    "quick_task_expiry",
    "run_flower",
    "task_heartbeat_s",
]

FIRST_RETRY_S = 0.05
LONGEST_RETRY_S = 1.0
#: tries per object: Flower's 500 at up to 10 s apart, at up to 1 s apart
_TRIES = 5000


def pace_object_pulls() -> bool:
    """Pace Flower's object-pull retries in this process; ``False`` (and nothing changed)
    when this Flower's pull functions no longer take those settings."""
    from flwr.supercore.inflatable import inflatable_utils

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    keys = ("initial_backoff", "backoff_cap", "max_tries_per_object")
    defaults = [getattr(f, "__kwdefaults__", None) or {} for f in functions]
    if not all(all(k in d for k in keys) for d in defaults):
        return False
    for kw in defaults:
        kw.update(
            initial_backoff=FIRST_RETRY_S, backoff_cap=LONGEST_RETRY_S, max_tries_per_object=_TRIES
        )
    return True


#: how long a SuperLink's SQLite connection waits for the write lock (Flower's: 5 s)
SQLITE_BUSY_TIMEOUT_MS = 60_000


def patient_sqlite() -> bool:
    """Give this process's Flower SQLite connections :data:`SQLITE_BUSY_TIMEOUT_MS` to get
    the write lock; ``False`` (nothing changed) when this Flower sets its pragmas otherwise."""
    from flwr.supercore import sql_mixin

    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if not isinstance(pragmas, tuple) or not any(name == "busy_timeout" for name, _ in pragmas):
        return False
    sql_mixin.SQLITE_PRAGMAS = tuple(  # type: ignore[attr-defined,assignment]
        (name, str(SQLITE_BUSY_TIMEOUT_MS) if name == "busy_timeout" else value)
        for name, value in pragmas
    )
    return True


#: how long the SuperLink trusts that a run it checked is neither stopped nor finished
ABORT_CHECK_TTL_S = 0.5


def quick_abort_checks(ttl_s: float = ABORT_CHECK_TTL_S) -> bool:
    """Keep a fleet request's "the run goes on" answer for ``ttl_s`` in this process (see
    the module's text); ``False`` (nothing changed) when this Flower's fleet handlers no
    longer check through ``check_abort(run_id, abort_status_list, state)``."""
    import inspect
    import threading
    import time

    from flwr.superlink.servicer.fleet import fleet_handlers

    check = getattr(fleet_handlers, "check_abort", None)
    if getattr(check, "__module__", None) == __name__:
        return True  # done before
    if not callable(check) or list(inspect.signature(check).parameters) != [
        "run_id", "abort_status_list", "state"
    ]:  # fmt: skip
        return False
    live_until: dict[tuple[int, tuple[str, ...], int], float] = {}
    lock = threading.Lock()

    def check_abort(run_id: int, abort_status_list: list[str], state: Any) -> str | None:
        key = (run_id, tuple(abort_status_list), id(state))
        now = time.monotonic()
        with lock:
            if live_until.get(key, -1.0) > now:
                return None
        message: str | None = check(run_id, abort_status_list, state)
        if message is None:
            with lock:
                live_until[key] = now + ttl_s
        return message

    check_abort.__doc__ = check.__doc__
    fleet_handlers.check_abort = check_abort  # type: ignore[attr-defined]
    return True


def quick_record_items() -> bool:
    """Flower's ``TypedDict`` item methods without their per-call ``typing.cast`` aliases,
    in this process; ``False`` (nothing changed) unless this Flower's methods are the ones
    replaced (the item checks stored on the instance, the items in its ``_data`` dict)."""
    from flwr.app.message import typeddict

    cls = typeddict.TypedDict
    setter = cls.__dict__.get("__setitem__")
    if getattr(setter, "__module__", None) == __name__:
        return True  # done before
    code = getattr(setter, "__code__", None)
    words = {*getattr(code, "co_names", ()), *getattr(code, "co_consts", ())}
    if not {"cast", "_check_key_fn", "_check_value_fn", "_data"} <= words:
        return False

    def set_item(self: Any, key: Any, value: Any) -> None:
        held = self.__dict__
        held["_check_key_fn"](key)
        held["_check_value_fn"](value)
        held["_data"][key] = value

    def get_item(self: Any, item: Any) -> Any:
        return self.__dict__["_data"][item]

    def del_item(self: Any, key: Any) -> None:
        del self.__dict__["_data"][key]

    for name, method in (
        ("__setitem__", set_item), ("__getitem__", get_item), ("__delitem__", del_item)
    ):  # fmt: skip
        method.__doc__ = getattr(cls, name).__doc__
        setattr(cls, name, method)
    return True


#: Flower's task heartbeat interval (flwr 1.42): a claimed task starts within it, a running
#: one is heard from within twice it
FLOWER_TASK_HEARTBEAT_S = 30
#: the warm executor's (its forks start in milliseconds); more than Flower's heartbeat call
#: timeout of 5 s, since a sender waits (interval - 5 s) x 0.7-0.9 between heartbeats
WARM_TASK_HEARTBEAT_S = 10.0
#: the environment variable a daemon with a warm executor passes it in, to both processes
TASK_HEARTBEAT_ENV = "POLLINATE_TASK_HEARTBEAT_S"


def task_heartbeat_s(value: str) -> float:
    """``$POLLINATE_TASK_HEARTBEAT_S`` as seconds; ``SystemExit`` with one line when it is not
    a number from 6 to Flower's 30."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 6 <= seconds <= FLOWER_TASK_HEARTBEAT_S:  # also refuses nan
        raise SystemExit(
            f"{TASK_HEARTBEAT_ENV}={value!r} is not a number of seconds from 6 to "
            f"{FLOWER_TASK_HEARTBEAT_S} (Flower's heartbeat call may take 5 s); unset it or use "
            f"{WARM_TASK_HEARTBEAT_S:g}"
        )
    return seconds


def quick_task_expiry(
    interval_s: float = WARM_TASK_HEARTBEAT_S, *, side: Literal["node", "task"]
) -> bool:
    """Put Flower's task heartbeat on ``interval_s`` in this process (see the module's text):
    the SuperNode's task state (``"node"``: claims expire after it, running tasks after twice
    it) or the task heartbeats this process sends (``"task"``; a SuperNode's heartbeats to
    its SuperLink are another clock, left as they are). ``False`` (nothing changed) when this
    Flower keeps that interval elsewhere."""
    import importlib

    name = "supercore.corestate.in_memory_corestate" if side == "node" else "supercore.heartbeat"
    module = importlib.import_module(f"flwr.{name}")
    if not isinstance(getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None), int | float):
        return False
    module.HEARTBEAT_DEFAULT_INTERVAL = interval_s  # type: ignore[attr-defined]
    return True


def run_flower(command: str, entry: Callable[[], object], *, patched: bool, fallback: str) -> None:
    """Run Flower's console script ``command`` (its entry point ``entry``) with this argv.

    ``patched`` says whether the caller's patch of Flower applied; when it did not, one line
    (``pollinate SUPERNODE: fallback``) says so and Flower runs as it is.
    """
    if not patched:
        print(f"pollinate {command.removeprefix('flower-')}: {fallback}", file=sys.stderr)
    sys.argv[0] = command
    entry()
