"""Privacy claims, each tested by playing the attacker (issue: privacy that holds).

(a) a server that knows the run seed replays the DP noise and subtracts it from a client's
    update: it must fail by the noise scale, and succeed under the test-only reproducible
    switch (so this test can fail);
(b) a malicious ServerApp asks a device for no DP, more epochs, less noise: the device refuses;
(c) a device that re-registers under a new node id keeps its epsilon; a lost ledger stops it;
(d) a DP reply carries no exact loss, accuracy or count.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.common import MessageType
from flwr.common.config import parse_config_args
from torch import nn

from pollinate.clientapp.app import app
from pollinate.clientapp.training import TrainSettings
from pollinate.config import ClientDP, RunSettings
from pollinate.data import ArrayDataset, load_dataset, load_partition
from pollinate.device.daemon import DaemonSettings
from pollinate.device.ledger import ACCOUNTANT_FILE, DeviceLedger
from pollinate.models import build_model
from pollinate.privacy.noise import NoiseSource
from pollinate.protocol import ACCOUNTING_KEYS
from pollinate.serverapp.calibration import client_config
from pollinate.serverapp.strategy import build_strategy
from pollinate.simulation.cohort import CohortMember, train_cohort
from tests.support.messages import set_identity

NODE = 21
CLIP = 1.0
SIGMA = 1.0
LR = 1.0


def _message(
    server_round: int, run_dir: Path, *, kind: str = MessageType.TRAIN, **overrides: object
) -> tuple[Message, dict[str, np.ndarray]]:
    settings = RunSettings.from_run_config(
        {"dataset": "digits", "batch-size": 512, "learning-rate": LR, "model": "mlp",
         "noise-multiplier": SIGMA, "max-grad-norm": CLIP, **overrides}
    )  # fmt: skip
    data = load_dataset("digits", seed=settings.seed)
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=data.input_shape)
    sent = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    arrays = ArrayRecord(OrderedDict((k, Array(v)) for k, v in sent.items()))
    noise = settings.noise_multiplier
    cfg = client_config(settings, data, population=10, noise=noise, run_dir=run_dir)
    cfg["server-round"] = server_round
    set_identity()
    msg = Message(
        RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=NODE, message_type=kind
    )
    set_identity(NODE)
    return msg, sent


def _context(node_config: dict[str, object], node_id: int = NODE) -> Context:
    return Context(
        run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={}
    )


def _metrics(reply: Message) -> dict[str, float]:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return {k: float(v) for k, v in reply.content.metric_records["metrics"].items()}  # type: ignore[arg-type]


def _clipped_sum(model: nn.Module, x: np.ndarray, y: np.ndarray) -> list[torch.Tensor]:
    """What DP-SGD protects: the sum of the per-sample gradients, each clipped to CLIP."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    xt, yt = torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(y))
    for j in range(len(yt)):
        model.zero_grad()
        nn.functional.cross_entropy(model(xt[j : j + 1]), yt[j : j + 1].long()).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
        factor = min(1.0, CLIP / (norm + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return total


def _surrogate(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The attacker's own data, of the client's (public) size."""
    rng = np.random.default_rng(123)
    return rng.random((n, 1, 8, 8), dtype=np.float32) * 16, rng.integers(0, 10, n)


def _noised_sum(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], n: int
) -> torch.Tensor:
    """One full-batch step (q = 1): update = -lr * (clipped sum + noise) / n."""
    return torch.cat(
        [torch.from_numpy(before[k] - after[k]).flatten() * (n / LR) for k in _param_names()]
    )


def _param_names() -> list[str]:
    return [name for name, _ in build_model("mlp", input_shape=(1, 8, 8)).named_parameters()]


def _start_model(sent: dict[str, np.ndarray]) -> nn.Module:
    model = build_model("mlp", input_shape=(1, 8, 8))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sent.items()})
    return model


def _attack(truth: torch.Tensor, observed: torch.Tensor, replay: torch.Tensor, mine: torch.Tensor):
    """Replay the client's noise (replay run minus the attacker's known clipped sum) and
    subtract it from the observed update; returns (error, noise scale)."""
    noise = replay - mine
    return float((observed - noise - truth).norm()), float(noise.norm())


@pytest.mark.parametrize("reproducible", [False, True], ids=["secure", "reproducible-switch"])
def test_a_server_with_the_seed_cannot_subtract_the_dp_noise(
    tmp_path: Path, reproducible: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ClientApp path (Opacus). The attacker knows the model it sent and got back, the seed,
    the round, the client and its (public) data size; it runs the client's own code again with
    the same public inputs on data of its own, learns the noise of that replay, and subtracts
    it. One full-batch step (q = 1) keeps the algebra exact."""
    import pollinate.clientapp.jobs as client_jobs

    msg, sent = _message(1, tmp_path, **{"reproducible-noise": reproducible})
    reply = app(msg, _context({"partition-id": 3, "num-partitions": 10}))
    assert _metrics(reply)["steps"] == 1
    received = {k: a.numpy() for k, a in reply.content.array_records["arrays"].items()}
    part = load_partition("digits", 3, 10, "iid", seed=42)
    n = len(part)
    truth = torch.cat([t.flatten() for t in _clipped_sum(_start_model(sent), part.x, part.y)])
    # the replay: the same message to the same client identity, the attacker's data
    x, y = _surrogate(n)
    monkeypatch.setattr(client_jobs, "local_data", lambda *_: ArrayDataset(x, y))
    replay_msg, _ = _message(1, tmp_path / "replay", **{"reproducible-noise": reproducible})
    replayed = app(replay_msg, _context({"partition-id": 3, "num-partitions": 10}))
    replay = {k: a.numpy() for k, a in replayed.content.array_records["arrays"].items()}
    mine = torch.cat([t.flatten() for t in _clipped_sum(_start_model(sent), x, y)])
    error, scale = _attack(
        truth, _noised_sum(sent, received, n), _noised_sum(sent, replay, n), mine
    )
    if reproducible:  # the attack works: the switch is NOT PRIVATE, and the test can fail
        assert error < 1e-3 * scale
    else:  # it fails by the noise scale (about sqrt(2) x: two independent noises)
        assert error > 0.8 * scale


@pytest.mark.parametrize("reproducible", [False, True], ids=["secure", "reproducible-switch"])
def test_the_fast_engines_noise_cannot_be_replayed_either(reproducible: bool) -> None:
    part = load_partition("digits", 4, 10, "iid", seed=42)
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 8, 8))
    sent = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    settings = TrainSettings(epochs=1, batch_size=512, learning_rate=LR, noise_multiplier=SIGMA)

    def member(x: np.ndarray, y: np.ndarray) -> CohortMember:
        source = NoiseSource.for_tests(42, 1, 4) if reproducible else NoiseSource.secure()
        return CohortMember(x, y, seed=7, noise=source)  # the seed: the same, public

    ((_, state),) = train_cohort(model, [member(part.x, part.y)], settings)
    n = len(part)
    x, y = _surrogate(n)
    ((_, replay),) = train_cohort(model, [member(x, y)], settings)
    truth = torch.cat([t.flatten() for t in _clipped_sum(_start_model(sent), part.x, part.y)])
    mine = torch.cat([t.flatten() for t in _clipped_sum(_start_model(sent), x, y)])
    error, scale = _attack(
        truth, _noised_sum(sent, dict(state), n), _noised_sum(sent, dict(replay), n), mine
    )
    assert (error < 1e-3 * scale) if reproducible else (error > 0.8 * scale)


def test_client_level_noise_is_not_fixed_by_the_seed() -> None:
    """The server's client-level noise comes from the secure source: seeding numpy and torch
    (what the round loop does from the run seed) does not fix it, unless the test-only switch
    is on. Every mechanism; the noise has the std it claims."""
    from pollinate.serverapp.strategy import dp_wrapper

    def noised(reproducible: bool, mechanism: ClientDP) -> np.ndarray:
        settings = RunSettings(client_dp=mechanism, reproducible_noise=reproducible)
        wrapper = dp_wrapper(build_strategy(settings, population=10))
        assert wrapper is not None
        np.random.seed(0)
        torch.manual_seed(0)
        source = wrapper._source(1)
        return wrapper.stream.next(1, [(2000,)], 1.0, source)[0]

    for mechanism in (ClientDP.SERVER_FIXED, ClientDP.FTRL_TREE, ClientDP.FTRL_BANDED):
        a, b = noised(False, mechanism), noised(False, mechanism)
        assert float(np.abs(a - b).max()) > 1e-3
        assert np.array_equal(noised(True, mechanism), noised(True, mechanism))
        assert float(np.std(a)) == pytest.approx(1.0, rel=0.1)


def _device(tmp_path: Path, **policy: object) -> dict[str, object]:
    """The node config exactly as `pollinate edge run` hands it to the SuperNode."""
    (tmp_path / "ca.crt").write_text("ca")
    (tmp_path / "key").write_text("key")
    daemon = DaemonSettings(
        superlink="127.0.0.1:9092", root_certificates=tmp_path / "ca.crt", key=tmp_path / "key",
        state_dir=tmp_path / "device", partition_id=2, num_partitions=10, **policy,  # type: ignore[arg-type]
    )  # fmt: skip
    return parse_config_args([daemon.node_config()])


@pytest.mark.parametrize(
    ("ask", "why"),
    [
        ({"dp": "none"}, "no DP"),
        ({"local-epochs": 5}, "local epochs"),
        ({"noise-multiplier": 0.3}, "below the floor"),
        ({"max-grad-norm": 4.0}, "above the ceiling"),
        ({"reproducible-noise": True}, "reproducible"),
    ],
)
def test_a_device_refuses_a_task_weaker_than_its_policy(
    tmp_path: Path, ask: dict[str, object], why: str
) -> None:
    node = _device(tmp_path, min_noise_multiplier=0.8, max_grad_norm=2.0, max_local_epochs=2)
    ctx = _context(node)
    msg, _ = _message(1, tmp_path, **ask)
    reply = app(msg, ctx)
    metrics = _metrics(reply)
    assert metrics["refused"] == 1 and metrics["declined"] == 1
    assert "arrays" not in reply.content.array_records  # nothing trained, nothing sent
    assert why in str(reply.content.config_records["info"]["refused"])
    assert DeviceLedger(tmp_path / "device").refusals()["total"] == 1
    assert DeviceLedger(tmp_path / "device").load().total_steps == 0
    # the same device trains a task within its policy
    fine, _ = _message(2, tmp_path)
    assert _metrics(app(fine, ctx))["steps"] >= 1


def test_a_re_registered_device_keeps_its_epsilon(tmp_path: Path) -> None:
    node = _device(tmp_path)
    first = _metrics(app(_message(1, tmp_path)[0], _context(node, node_id=5)))
    # the SuperLink forgot it: same state dir, a new node id, a fresh process (empty state)
    again = app(_message(2, tmp_path)[0], _context(node, node_id=6))
    second = _metrics(again)
    assert second["total-steps"] == 2 * first["total-steps"]
    assert second["epsilon"] > first["epsilon"]
    key = str(again.content.config_records["info"]["client"])
    assert key.startswith("d-") and key[2:] in (tmp_path / "device" / "device-id").read_text()


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_device_with_a_lost_ledger_refuses_until_told(tmp_path: Path, damage: str) -> None:
    node = _device(tmp_path)
    app(_message(1, tmp_path)[0], _context(node))
    ledger_file = tmp_path / "device" / ACCOUNTANT_FILE
    if damage == "missing":
        ledger_file.unlink()
    else:
        ledger_file.write_text("{not json")
    reply = app(_message(2, tmp_path)[0], _context(node, node_id=9))
    assert _metrics(reply)["refused"] == 1 and "arrays" not in reply.content.array_records
    assert "--start-new-ledger" in str(reply.content.config_records["info"]["refused"])
    told = _device(tmp_path, start_new_ledger=True)
    fresh = _metrics(app(_message(3, tmp_path)[0], _context(told, node_id=10)))
    assert fresh["total-steps"] == fresh["steps"]  # a new ledger, by the operator's choice
    assert (tmp_path / "device" / "ledger-restarts.jsonl").read_text().count("\n") == 1


def test_a_dp_reply_carries_nothing_exact_about_the_data(tmp_path: Path) -> None:
    ctx = _context({"partition-id": 1, "num-partitions": 10})
    reply = app(_message(1, tmp_path, **{"batch-size": 16})[0], ctx)
    metrics = _metrics(reply)
    assert set(metrics) <= set(ACCOUNTING_KEYS)
    assert not {"num-examples", "train-loss", "train-accuracy"} & set(metrics)
    # federated evaluation under DP: noised counts only, charged to the same accountant
    msg, _ = _message(
        1, tmp_path, kind=MessageType.EVALUATE, **{"batch-size": 16, "fraction-evaluate": 0.5}
    )
    ev = _metrics(app(msg, ctx))
    assert {"eval-accuracy", "eval-loss", "num-examples"}.isdisjoint(ev)
    assert ev["epsilon"] > metrics["epsilon"]  # the release was accounted
    held = len(load_partition("digits", 1, 10, "iid", seed=42)) // 5
    assert ev["eval-count-noised"] != held  # noised (a continuous draw never hits it)
    assert abs(ev["eval-count-noised"] - held) < 8 * 5.0 * math.sqrt(2)


def test_secure_aggregation_sends_no_metric_in_clear(tmp_path: Path) -> None:
    """The legacy FitRes beside the masked update holds the accounting keys only."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    from pollinate.clientapp.app import _train_for_secagg
    from pollinate.protocol import SECAGG_TASK_KEY, SECAGG_WEIGHT_KEY

    msg, sent = _message(1, tmp_path, **{"dp": "none"})
    cfg = dict(msg.content.config_records["config"])
    fitins_like = compat.fitins_to_recorddict(
        compat.FitIns(
            ndarrays_to_parameters(list(sent.values())),
            {SECAGG_TASK_KEY: json.dumps(cfg), SECAGG_WEIGHT_KEY: "num-examples"},
        ),
        keep_input=True,
    )
    assert RECORD_KEY_CONFIGS not in fitins_like.config_records
    secagg_msg = Message(fitins_like, dst_node_id=NODE, message_type=MessageType.TRAIN)
    reply = _train_for_secagg(secagg_msg, _context({"partition-id": 1, "num-partitions": 10}))
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert set(fitres.metrics) <= set(ACCOUNTING_KEYS)
    assert "train-loss" not in fitres.metrics and "train-accuracy" not in fitres.metrics


def test_edge_run_stops_before_anything_when_the_policy_cannot_be_met(tmp_path: Path) -> None:
    """A lost ledger (exit 11) or a spent budget (exit 4): one line, nothing started."""
    import os
    import subprocess
    import sys

    node = _device(tmp_path)
    app(_message(1, tmp_path)[0], _context(node))  # the device trained once
    state = tmp_path / "device"
    spent = DeviceLedger(state).load().epsilon(1e-5)
    assert spent > 0
    common = [sys.executable, "-m", "pollinate", "edge", "run", "--superlink", "127.0.0.1:1",
              "--root-certificates", str(tmp_path / "ca.crt"), "--key", str(tmp_path / "key"),
              "--state-dir", str(state), "--partition-id", "2",
              "--num-partitions", "10"]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    budget = subprocess.run(
        [*common, "--epsilon-budget", f"{spent / 2:.6f}"], capture_output=True, text=True,
        timeout=120, env=env,
    )  # fmt: skip
    assert budget.returncode == 4, budget.stderr
    assert "already spent" in budget.stderr
    (state / ACCOUNTANT_FILE).unlink()
    lost = subprocess.run(common, capture_output=True, text=True, timeout=120, env=env)
    assert lost.returncode == 11, lost.stderr
    assert "--start-new-ledger" in lost.stderr
    assert not (state / "supernode.log").exists()  # no SuperNode was started either time


def test_target_epsilon_is_calibrated_for_the_worst_client() -> None:
    """Uneven (Dirichlet) partitions: every client's planned epsilon stays within the target,
    and the worst one is at it (the average-sized client would have got less noise)."""
    from pollinate.clientapp.training import dp_plan
    from pollinate.data import partition_indices
    from pollinate.privacy import ClientAccountant, MechanismStep
    from pollinate.serverapp.calibration import resolve_noise

    settings = RunSettings(dataset="digits", partitioner="dirichlet", dirichlet_alpha=0.3,
                           target_epsilon=3.0, num_server_rounds=4, batch_size=16)  # fmt: skip
    data = load_dataset("digits", seed=settings.seed)
    sigma = resolve_noise(settings, data, 20)
    parts = partition_indices(data.train.y, 20, "dirichlet", seed=settings.seed, alpha=0.3)
    epsilons = []
    for part in parts:
        rate, per_epoch = dp_plan(len(part), settings.batch_size)
        step = MechanismStep(sigma, rate, per_epoch * settings.num_server_rounds)
        epsilons.append(ClientAccountant([step]).epsilon(settings.target_delta))
    assert max(epsilons) <= 3.0 + 1e-9
    assert max(epsilons) >= 3.0 - 0.02
    average = len(data.train) // 20
    rate, per_epoch = dp_plan(average, settings.batch_size)
    mean_step = MechanismStep(sigma, rate, per_epoch * settings.num_server_rounds)
    assert ClientAccountant([mean_step]).epsilon(settings.target_delta) < max(epsilons)
