"""SecAgg+ rounds (Flower's SecAggPlusWorkflow and secaggplus_mod) through `pollinate simulate`
on Flower's Ray engine, where every client runs the real ClientApp.

The reference is the same run without secure aggregation: the server only ever sees the
masked sum, yet after one round the global model equals plain FedAvg's up to the protocol's
quantization step. With client-level DP (client-side clipping, server noise on the sum) the
run completes and reports both epsilons, each on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.support.federation import Federation

pytestmark = pytest.mark.slow
ENV = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1",
       "COLUMNS": "250"}  # fmt: skip
# reproducible-noise (test-only, NOT PRIVATE): the plain and the secure run must draw the same
# DP noise for their models to be compared
COMMON = ["-n", "3", "--engine", "ray", "--set", "fraction-train=1.0", "--set", "dataset=digits",
          "--set", "reproducible-noise=true"]  # fmt: skip


def _simulate(tmp: Path, run: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pollinate", "simulate", *COMMON, "--run-dir", str(tmp / run),
         *args],
        capture_output=True, text=True, timeout=600, env={**ENV, "FLWR_HOME": str(tmp / ".flwr")},
    )  # fmt: skip


def test_secure_aggregation_gives_fedavg_up_to_quantization(tmp_path: Path) -> None:
    plain = _simulate(tmp_path, "plain", "--rounds", "1")
    assert plain.returncode == 0, plain.stderr[-3000:]
    secure = _simulate(tmp_path, "secure", "--rounds", "1", "--set", "secure-aggregation=true")
    assert secure.returncode == 0, secure.stderr[-3000:]
    a = load_file(str(tmp_path / "plain" / "checkpoints" / "round-0001" / "model.safetensors"))
    b = load_file(str(tmp_path / "secure" / "checkpoints" / "round-0001" / "model.safetensors"))
    # SecAgg+ quantizes weight/max_weight * params to 2**22 levels over [-8, 8]; the weights
    # are the clients' examples, max_weight 4x their mean: a step of 16 / 2**22 / (1/4 * w/w̄)
    metrics = json.loads((tmp_path / "secure" / "metrics.json").read_text())
    assert metrics[1]["replied"] == 3 and metrics[1]["failed"] == 0
    run = json.loads((tmp_path / "secure" / "run.json").read_text())
    step = 16 / 2**22 * 4  # one quantization step at weight = mean
    diffs = {k: float(np.max(np.abs(a[k] - b[k]))) for k in a}
    assert max(diffs.values()) <= 10 * step, diffs
    assert max(diffs.values()) > 0, "the secure run must not be the plain one"
    assert run["settings"]["secure-aggregation"] is True
    # the clients' own (sample-level) accounting is the same with and without SecAgg
    ledgers = [sorted(json.loads((tmp_path / r / "privacy.json").read_text())["ledger"]["clients"],
                      key=lambda e: e["client"]) for r in ("plain", "secure")]  # fmt: skip
    assert ledgers[0] == ledgers[1] and len(ledgers[0]) == 3


def test_secure_aggregation_with_client_level_dp(tmp_path: Path) -> None:
    done = _simulate(tmp_path, "cdp", "--rounds", "2", "--set", "secure-aggregation=true",
                     "--set", "client-dp=client-fixed", "--set", "client-dp-noise=0.5",
                     "--set", "client-dp-clip=2.0")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "cdp" / "metrics.json").read_text())
    assert [m["replied"] for m in metrics[1:]] == [3, 3]
    assert metrics[2]["client_level_epsilon"] > 0 and metrics[2]["max_epsilon"] > 0
    final = load_file(str(tmp_path / "cdp" / "checkpoints" / "round-0002" / "model.safetensors"))
    assert all(np.all(np.isfinite(v)) for v in final.values())


def test_secure_aggregation_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    server = _simulate(tmp_path, "x", "--set", "secure-aggregation=true",
                       "--set", "client-dp=server-fixed")  # fmt: skip
    assert server.returncode == 2 and "cannot clip updates it never sees" in server.stderr
    robust = _simulate(tmp_path, "y", "--set", "secure-aggregation=true", "--set", "robust=krum")
    assert robust.returncode == 2 and "robust aggregators need each" in robust.stderr
    fast = subprocess.run(
        [sys.executable, "-m", "pollinate", "simulate", "-n", "3", "--set", "dataset=digits",
         "--set", "secure-aggregation=true", "--run-dir", str(tmp_path / "z")],
        capture_output=True, text=True, timeout=600, env={**ENV, "FLWR_HOME": str(tmp_path)},
    )  # fmt: skip
    assert fast.returncode == 2 and "--engine ray" in fast.stderr, fast.stderr[-2000:]


@pytest.mark.integration
def test_secure_aggregation_on_a_real_federation(tmp_path: Path) -> None:
    """SecAgg+ over gRPC between a real SuperLink (TLS, node auth) and five edge daemons.

    The same federation first runs one plain round, then one SecAgg+ round with the same seed:
    the devices train identically without DP (the seed fixes everything else; under DP their
    noise is secret and devices refuse reproducible noise), so the two global models agree up
    to SecAgg+'s quantization step. The devices' own policy allows training without DP; it
    allows importing a user app's model and data loader on device 0 only (a third run)."""
    common = ["--rounds", "1", "--round-timeout", "240", "--min-train-nodes", "5",
              "--set", "fraction-train=1.0", "--set", "fraction-evaluate=0.0",
              "--set", "dataset=digits", "--set", "dp=none"]  # fmt: skip
    app_code = ["--allow-import", "my_app.task:Net", "--allow-import", "my_app.task:load_data"]

    def device_args(i: int) -> list[str]:  # device 0's owner allows the app's code
        return ["--dp", "none", *(app_code if i == 0 else [])]

    with Federation(tmp_path, 5, device_args=device_args) as fed:
        fed.start()
        fed.start_run(tmp_path / "plain", common)
        assert fed.wait_finished("the plain run", 400)["status"] == "finished:completed"
        fed.start_run(tmp_path / "secure", [*common, "--set", "secure-aggregation=true"])
        secure = fed.wait_finished("the SecAgg+ run", 600)
        assert secure["status"] == "finished:completed", fed.cli(
            "server", "logs", "--state-dir", str(fed.state)
        )[-3000:]
        # An app `pollinate new` made, on the same federation (`server run --app`): the
        # ServerApp builds its model and data from the app's code (import paths). Device 0's
        # owner allowed them (`edge run --allow-import`): its ClientApp imports them from the
        # app Flower shipped and trains. The other four refuse before importing anything.
        app = tmp_path / "my-app"
        fed.cli("new", "my-app", "--dir", str(app))
        app_id = fed.start_run(tmp_path / "app", [
            "--app", str(app), "--rounds", "1", "--round-timeout", "240",
            "--min-train-nodes", "5", "--set", "fraction-train=1.0",
        ])  # fmt: skip
        fed.wait_finished("the app's run", 400, app_id)
        asked = json.loads((tmp_path / "app" / "metrics.json").read_text())
        assert asked[1]["replied"] == 5 and asked[1]["refused"] == 4, asked
        assert asked[1]["max_epsilon"] > 0, asked  # device 0 trained, with DP-SGD
        assert (
            json.loads((tmp_path / "app" / "run.json").read_text())["settings"]["model"]
            == "my_app.task:Net"
        )
        status = json.loads(
            fed.cli("edge", "status", "--state-dir", str(fed.device_dir(1)), "--json")
        )
        reason = status["refusals"]["last"]["reason"]
        assert "--allow-import my_app.task:Net" in reason, reason
        assert "--allow-import my_app.task:load_data" in reason, reason
    assert fed.codes == [0] * 5
    metrics = json.loads((tmp_path / "secure" / "metrics.json").read_text())
    assert metrics[1]["replied"] == 5 and metrics[1]["failed"] == 0, metrics
    a = load_file(str(tmp_path / "plain" / "checkpoints" / "round-0001" / "model.safetensors"))
    b = load_file(str(tmp_path / "secure" / "checkpoints" / "round-0001" / "model.safetensors"))
    step = 16 / 2**22 * 4
    diffs = {k: float(np.max(np.abs(a[k] - b[k]))) for k in a}
    assert 0 < max(diffs.values()) <= 10 * step, diffs
