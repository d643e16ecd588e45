"""The in-process grid: real Flower messages in, the ClientApp's own replies out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import Error
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg

from pollinate.config import RunSettings
from pollinate.data import load_dataset
from pollinate.models import build_model
from pollinate.privacy import ClientAccountant, MechanismStep
from pollinate.serverapp.calibration import client_config
from pollinate.serverapp.nodes import NodeDirectory, SampledGrid, reply_node
from pollinate.simulation.local_array import LocalArray
from pollinate.simulation.local_grid import JOURNAL_NAME, LocalGrid, read_journal

POPULATION = 50


def _train_messages(
    grid: LocalGrid, tmp_path: Path, node_ids: list[int], rnd: int = 1, **overrides: object
) -> list[Message]:
    settings = RunSettings.from_run_config({"run-dir": str(tmp_path), **overrides})
    data = load_dataset("mnist", test_fraction=0.2, seed=settings.seed)
    cfg = client_config(settings, data, population=POPULATION, noise=1.0, run_dir=tmp_path)
    model = build_model("cnn")
    arrays = ArrayRecord(model.state_dict())
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    return list(strategy.configure_train(rnd, arrays, cfg, SampledGrid(grid, node_ids)))


def test_nodes_identify_themselves_by_partition() -> None:
    grid = LocalGrid(POPULATION)
    directory = NodeDirectory(grid, timeout=5)
    assert directory.settle() == POPULATION  # no waiting: every node is there from the start
    directory.refresh()
    assert len(directory) == POPULATION
    keys = sorted(directory.key_of(n) for n in grid.get_node_ids())
    assert keys == [f"p{i:06d}" for i in range(POPULATION)]


def test_a_train_round_replies_like_the_client_app_and_journals_accountants(
    tmp_path: Path,
) -> None:
    grid = LocalGrid(POPULATION)
    nodes = list(grid.get_node_ids())[:5]
    replies = list(grid.send_and_receive(_train_messages(grid, tmp_path, nodes)))
    assert len(replies) == 5 and not any(r.has_error() for r in replies)
    assert {r.metadata.src_node_id for r in replies} == set(nodes)
    # 80 samples per client, batch 32 -> 3 Poisson batches, q = 1/3, one epoch
    one_round = ClientAccountant([MechanismStep(1.0, 1 / 3, 3)]).epsilon(1e-5)
    for reply in replies:
        metrics = reply.content.metric_records["metrics"]
        assert metrics["steps"] == 3 and metrics["client-weight"] == 1
        # under DP nothing exact about the local data leaves the node
        assert not {"num-examples", "train-loss", "train-accuracy"} & set(metrics)
        assert metrics["epsilon"] == pytest.approx(one_round, rel=1e-12)
        arrays = reply.content.array_records["arrays"]
        assert set(arrays.keys()) == set(build_model("cnn").state_dict())
        assert all(np.all(np.isfinite(a.numpy())) for a in arrays.values())
    journal = read_journal(tmp_path / "clients" / JOURNAL_NAME)
    assert sorted(journal) == [f"p{i:06d}" for i in range(5)]

    # A new process (a resumed run) continues every client's history from the journal.
    again = LocalGrid(POPULATION)
    replies = list(again.send_and_receive(_train_messages(again, tmp_path, nodes, rnd=2)))
    two_rounds = ClientAccountant([MechanismStep(1.0, 1 / 3, 6)]).epsilon(1e-5)
    for reply in replies:
        metrics = reply.content.metric_records["metrics"]
        assert metrics["total-steps"] == 6
        assert metrics["epsilon"] == pytest.approx(two_rounds, rel=1e-12)
    lines = (tmp_path / "clients" / JOURNAL_NAME).read_text().splitlines()
    assert len(lines) == 10  # compacted to 5 on restore, then 5 appended


def test_clients_past_their_budget_decline(tmp_path: Path) -> None:
    grid = LocalGrid(POPULATION)
    nodes = list(grid.get_node_ids())[:3]
    replies = list(
        grid.send_and_receive(_train_messages(grid, tmp_path, nodes, **{"epsilon-budget": 0.5}))
    )
    assert len(replies) == 3
    for reply in replies:
        assert reply.content.metric_records["metrics"]["declined"] == 1
        assert "budget" in str(reply.content.config_records["info"]["declined"])
    assert not (tmp_path / "clients" / JOURNAL_NAME).exists()


def test_a_failing_client_gets_an_error_reply_and_the_others_train(tmp_path: Path) -> None:
    grid = LocalGrid(POPULATION)
    nodes = list(grid.get_node_ids())[:3]
    messages = _train_messages(grid, tmp_path, nodes)
    index = next(i for i, m in enumerate(messages) if m.metadata.dst_node_id == nodes[1])
    content = messages[index].content  # shared by all messages: give node 1 its own copy
    broken = ConfigRecord(dict(content.config_records["config"]))
    broken["batch-size"] = "thirty-two"
    own = RecordDict({"arrays": content.array_records["arrays"], "config": broken})
    messages[index] = Message(own, dst_node_id=nodes[1], message_type="train")
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages)}
    assert replies[nodes[1]].has_error()
    assert "batch-size" in replies[nodes[1]].error.reason
    assert not replies[nodes[0]].has_error() and not replies[nodes[2]].has_error()


def test_local_array_behaves_like_a_flower_array() -> None:
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    local, flower = LocalArray(value), Array(value)
    assert (local.dtype, local.shape, local.stype) == (flower.dtype, flower.shape, flower.stype)
    assert local.data == flower.data
    value[0, 0] = -1.0  # the sender's array is copied once, at construction
    shared = local.numpy()
    with pytest.raises(ValueError, match="read-only"):
        shared[0, 0] = 99.0  # every reader gets the one copy: nobody may change it in place
    np.testing.assert_array_equal(local.numpy(), np.arange(12, dtype=np.float32).reshape(3, 4))
    np.testing.assert_array_equal(local.numpy(), flower.numpy())
    assert json.dumps(list(local.shape)) == "[3, 4]"


def test_an_owning_local_array_takes_the_array_itself_read_only() -> None:
    """A cohort's replies take their trained arrays without a copy; readers still cannot
    change them, and the trainer's own buffer stays writable."""
    buffer = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    row = buffer[1]
    local = LocalArray.owning(row)
    assert np.shares_memory(local.numpy(), buffer)
    with pytest.raises(ValueError, match="read-only"):
        local.numpy()[0, 0] = 99.0
    assert buffer.flags.writeable
    assert local.data == Array(np.array(row)).data
    strided = LocalArray.owning(buffer[:, 0])  # not contiguous: then it is copied
    assert not np.shares_memory(strided.numpy(), buffer)
    np.testing.assert_array_equal(strided.numpy(), buffer[:, 0])


def test_bad_population_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LocalGrid(0)


def test_a_torn_journal_line_is_skipped_and_the_last_record_wins(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    first = ClientAccountant([MechanismStep(1.0, 0.5, 2)]).to_record()
    second = ClientAccountant([MechanismStep(1.0, 0.5, 4)]).to_record()
    path.write_text(
        json.dumps({"client": "p000001", "record": first}) + "\n"
        + json.dumps({"client": "p000001", "record": second}) + "\n"
        + '{"client": "p000002", "rec'  # the process died while appending
    )  # fmt: skip
    journal = read_journal(path)
    assert list(journal) == ["p000001"]
    assert ClientAccountant.from_record(journal["p000001"]).total_steps == 4


def test_a_round_with_fewer_replies_than_min_replies_keeps_the_model(tmp_path: Path) -> None:
    from pollinate.simulation.runner import SimulationOptions, simulate

    def losses(min_replies: int, where: str) -> tuple[float | None, float | None]:
        settings = RunSettings.from_run_config({
            "run-dir": str(tmp_path / where), "num-server-rounds": 1, "fraction-train": 1.0,
            "min-train-nodes": 1, "min-replies": min_replies, "dataset": "digits",
        })  # fmt: skip
        history = simulate(settings, SimulationOptions(num_clients=3, num_cpus=1)).history
        assert [r.replied for r in history[1:]] == [3]
        return history[0].loss, history[1].loss

    before, after = losses(4, "kept")
    assert after == before  # three replies < 4: the initial model is evaluated again
    before, after = losses(3, "trained")
    assert after != before


def test_the_fast_engine_clips_updates_for_client_side_client_level_dp(tmp_path: Path) -> None:
    grid = LocalGrid(POPULATION)
    nodes = list(grid.get_node_ids())[:3]
    messages = _train_messages(grid, tmp_path, nodes)
    for msg in messages:
        msg.content.config_records["config"]["clipping_norm"] = 0.05
    sent = {k: v.numpy() for k, v in messages[0].content.array_records["arrays"].items()}
    for reply in grid.send_and_receive(messages):
        arrays = reply.content.array_records["arrays"]
        squares = sum(float(np.sum((arrays[k].numpy() - sent[k]).astype(np.float64) ** 2))
                      for k in sent)  # fmt: skip
        assert np.sqrt(squares) == pytest.approx(0.05, rel=1e-4)  # DP-SGD moves it further


def test_error_replies_from_the_superlink_are_traced_to_the_node_they_answer_for() -> None:
    grid = LocalGrid(3)
    a, b, _ = list(grid.get_node_ids())
    sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (a, b)]
    for m in sent:  # what a Grid's push does
        m.metadata.__dict__["_message_id"] = m.object_id
    expired = Message(Error(code=0, reason="message expired"), reply_to=sent[1])
    expired.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    assert reply_node(expired, sent) == b
    own = Message(Error(code=0, reason="client raised"), reply_to=sent[0])
    own.metadata.__dict__["_src_node_id"] = a
    assert reply_node(own, sent) == a
    stray = Message(Error(code=0, reason="?"), reply_to=sent[0])
    stray.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    assert reply_node(stray, sent[1:]) == SUPERLINK_NODE_ID  # nothing to trace it to


TWINS = '''
from torch import nn


class Twin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Branchy(Twin):
    """The same model with data-dependent control flow, which torch.func cannot vmap."""

    def forward(self, x):
        if x.sum().item() > 1e12:
            return self.fc(x.flatten(1)) * 0.0
        return self.fc(x.flatten(1))
'''


def test_a_model_torch_func_cannot_vectorise_trains_client_by_client_with_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "twins.py").write_text(TWINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = load_dataset("digits", test_fraction=0.2, seed=42)
    grid = LocalGrid(POPULATION)
    nodes = list(grid.get_node_ids())[:4]
    start: dict[str, np.ndarray] = {}

    def round_of(spec: str, rnd: int) -> dict[int, dict[str, np.ndarray]]:
        # DP-SGD with next to nothing random (every sample in every batch, q = 1; noise 1e-6):
        # the cohort and Opacus agree exactly there (as in tests/unit/test_cohort.py)
        settings = RunSettings.from_run_config({
            "run-dir": str(tmp_path / spec), "model": spec, "dataset": "digits",
            "batch-size": 64, "local-epochs": 2,
        })  # fmt: skip
        cfg = client_config(settings, data, population=POPULATION, noise=1e-6,
                            run_dir=tmp_path / spec)  # fmt: skip
        import torch

        torch.manual_seed(0)
        model = build_model(spec, input_shape=data.input_shape, num_classes=10)
        strategy = FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
        msgs = strategy.configure_train(rnd, ArrayRecord(model.state_dict()), cfg,
                                        SampledGrid(grid, nodes))  # fmt: skip
        start.update({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
        out = {}
        for reply in grid.send_and_receive(list(msgs)):
            assert not reply.has_error(), reply.error.reason
            arrays = reply.content.array_records["arrays"]
            out[reply.metadata.src_node_id] = {k: a.numpy() for k, a in arrays.items()}
        return out

    vectorised = round_of("twins:Twin", 1)
    with caplog.at_level("WARNING", logger="pollinate"):
        alone = round_of("twins:Branchy", 1)
        round_of("twins:Branchy", 2)
    notices = [r for r in caplog.records if "cannot vectorise model 'twins:Branchy'" in r.message]
    assert len(notices) == 1 and ".item()" in notices[0].getMessage()
    assert sorted(alone) == sorted(vectorised) == sorted(nodes)
    for node in nodes:
        for key, value in vectorised[node].items():
            np.testing.assert_allclose(alone[node][key], value, rtol=1e-5, atol=1e-5)
            assert np.abs(value - start[key]).max() > 1e-3  # and both did train


def test_a_node_that_does_not_identify_itself_is_not_sampled_until_it_does() -> None:
    """A lost or failed ``query`` reply leaves the node unknown (never a made-up key) and it
    is asked again at the next refresh."""
    from pollinate.clientapp.app import app as pollinate_app

    failing = {"left": 1}

    def flaky(msg: Message, context: object) -> Message:
        if msg.metadata.dst_node_id == first and failing["left"] > 0:
            failing["left"] -= 1
            raise RuntimeError("lost on the way")
        return pollinate_app(msg, context)  # type: ignore[arg-type]

    grid = LocalGrid(4, client_app=flaky)  # type: ignore[arg-type]
    first = next(iter(grid.get_node_ids()))
    directory = NodeDirectory(grid, timeout=5)
    directory.refresh()
    assert first not in directory.nodes() and len(directory.nodes()) == 3
    assert first not in directory.sample(4, np.random.default_rng(0))
    directory.refresh()
    assert directory.nodes()[first] == "p000000" and len(directory.nodes()) == 4
