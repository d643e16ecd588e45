"""The warm ClientApp executor on a real federation (SuperLink with TLS and node
authentication, two `pollinate edge run` daemons): a device whose task forks are SIGKILLed in
round 2 costs that round one reply, which the executor answers with an error reply at once
(`device/fork_crash.py`: the round does not wait for its timeout), while the daemon, its
SuperNode and the warm executor itself go on, and the device trains again in round 3. With a
zygote (`pollinate edge zygote`) both devices' executors are forks of one process, and each
takes its task when its SuperNode wakes it (`device/wake.py`), not on its own poll.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.support.federation import Federation, rounds_done
from tests.support.processes import POLLINATE, Proc, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROUNDS = 3


def test_a_killed_fork_costs_one_reply_and_the_device_trains_on(tmp_path: Path) -> None:
    fed = Federation(tmp_path, 2)  # --executor warm: the daemon's default
    with fed:
        fed.start()
        run_dir = tmp_path / "run"
        fed.start_run(run_dir, [
            "--rounds", str(ROUNDS), "--round-timeout", "40", "--min-train-nodes", "1",
            "--set", "fraction-train=1.0", "--set", "fraction-evaluate=0.0",
            "--set", "partitioner=resample", "--set", "samples-per-client=96",
        ])  # fmt: skip
        status = fed.daemon_status(0)
        executor, supernode = int(status["executor_pid"]), int(status["supernode_pid"])
        # looked at every 10 ms: a round of two devices can be over within the default 0.5 s
        wait_until("round 1", lambda: rounds_done(run_dir) >= 1, 300, interval=0.01)

        # every fork device 0's executor makes for round 2 is SIGKILLed (Flower offers an
        # unfinished task again, so once is not enough to lose it) until the round is over
        killed: list[int] = []
        parent = psutil.Process(executor)
        while rounds_done(run_dir) < 2:
            for fork in parent.children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    os.kill(fork.pid, signal.SIGKILL)
                    killed.append(fork.pid)
            time.sleep(0.01)
        assert killed, "device 0 never took round 2's message"

        final = fed.wait_finished("the run", 400)
        assert final["status"] == "finished:completed" and final["round"] == ROUNDS, final
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics[1]["replied"] == 2, metrics
        # the killed task: one reply short in round 2, an error reply, and at once: waiting for
        # Flower's task expiry instead took 10-20 s (or forever: a task killed between taking
        # its task and its message got no reply at all, and the device none after it)
        assert metrics[2]["replied"] == 1 and metrics[2]["failed"] == 1, metrics
        assert metrics[2]["seconds"] < 10, metrics
        assert metrics[3]["replied"] == 2, metrics  # device 0 trained again
        after = fed.daemon_status(0)
        assert (after["executor_pid"], after["supernode_pid"]) == (executor, supernode)
        assert after["restarts"] == 0 and psutil.pid_exists(executor)
        privacy = json.loads((run_dir / "privacy.json").read_text())["ledger"]["clients"]
        rounds_of = {}
        for entry in privacy:
            rounds_of.setdefault(entry["client"], []).append(entry["server_round"])
        assert sorted(map(len, rounds_of.values())) == [2, 3], rounds_of


def test_devices_on_one_host_share_a_zygote_and_a_lost_attachment_stops_its_executor(
    tmp_path: Path,
) -> None:
    """Two daemons with `--zygote`: both executors are forks of one zygote (their own memory
    a fraction of it) and a run completes, every task taken on its SuperNode's wake; killing
    a daemon's attachment (SIGKILL) makes the zygote stop that executor, and the daemon
    attaches a new one."""
    sock = tmp_path / "zygote.sock"
    zygote = Proc.spawn(
        "zygote", [*POLLINATE, "edge", "zygote", str(sock)], tmp_path / "zygote.log",
        {**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        wait_until("the zygote", sock.is_socket, 180)
        # the executors ask for tasks only every 60 s on their own (Flower's longest; more
        # than a round's timeout): each round's task is taken when its SuperNode wakes them
        fed = Federation(
            tmp_path / "fed", 2, device_args=lambda _: ["--zygote", str(sock)],
            device_env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "60"},
        )  # fmt: skip
        with fed:
            fed.start()
            run_dir = tmp_path / "run"
            fed.start_run(run_dir, [
                "--rounds", "2", "--round-timeout", "45", "--min-train-nodes", "2",
                "--set", "fraction-train=1.0", "--set", "fraction-evaluate=0.0",
                "--set", "partitioner=resample", "--set", "samples-per-client=96",
            ])  # fmt: skip
            final = fed.wait_finished("the run", 400)
            assert final["status"] == "finished:completed", final
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert [m["replied"] for m in metrics[1:]] == [2, 2], metrics

            parent = psutil.Process(zygote.popen.pid)
            executors = {p.pid for p in parent.children()}
            assert len(executors) == 2, zygote.tail()
            shared = parent.memory_info().rss
            for pid in executors:  # what an executor has of its own, after two rounds
                assert psutil.Process(pid).memory_full_info().uss < shared / 2

            os.kill(int(fed.daemon_status(0)["executor_pid"]), signal.SIGKILL)

            def replaced() -> bool:
                now = {p.pid for p in parent.children()}
                return len(now) == 2 and len(executors - now) == 1

            wait_until("the zygote to stop the lost executor and fork a new one", replaced, 120)
            assert fed.daemon_status(0)["restarts"] == 1
    finally:
        zygote.popen.send_signal(signal.SIGTERM)
        zygote.popen.wait(timeout=30)
    assert not sock.exists()
