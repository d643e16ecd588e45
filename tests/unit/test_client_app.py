"""The ClientApp called with real Flower Messages and Contexts (no simulation engine)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType

from pollinate.clientapp.app import app
from pollinate.config import RunSettings
from pollinate.data import load_dataset, load_partition
from pollinate.models import build_model
from pollinate.privacy import ClientAccountant
from pollinate.protocol import PACKED_ARRAYS_KEY, pack_arrays, reads_packed, unpack_arrays
from pollinate.serverapp.calibration import client_config
from tests.support.messages import set_identity

NODE = 77


def _context(node_config: dict[str, bool | float | int | str]) -> Context:
    return Context(
        run_id=1, node_id=NODE, node_config=node_config, state=RecordDict(), run_config={}
    )


def _message(
    server_round: int, run_dir: Path, *, kind: str = MessageType.TRAIN, **overrides: object
) -> Message:
    settings = RunSettings.from_run_config({"dataset": "digits", "batch-size": 16, **overrides})
    data = load_dataset("digits", seed=settings.seed)
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=data.input_shape)
    arrays = ArrayRecord(
        OrderedDict((k, Array(v.detach().numpy().copy())) for k, v in model.state_dict().items())
    )
    cfg = client_config(
        settings, data, population=10, noise=settings.noise_multiplier, run_dir=run_dir
    )
    cfg["server-round"] = server_round
    set_identity()
    msg = Message(
        RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=NODE, message_type=kind
    )
    set_identity(NODE)
    return msg


def _metrics(reply: Message) -> dict[str, float]:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return {k: float(v) for k, v in reply.content.metric_records["metrics"].items()}  # type: ignore[arg-type]


def test_epsilon_composes_across_rounds_in_one_accountant(tmp_path: Path) -> None:
    ctx = _context({"partition-id": 3, "num-partitions": 10})
    first = _metrics(app(_message(1, tmp_path), ctx))
    second = _metrics(app(_message(2, tmp_path), ctx))
    assert first["declined"] == 0
    assert second["total-steps"] == 2 * first["total-steps"] == 2 * first["steps"]
    assert second["epsilon"] > first["epsilon"] > 0
    # The reported epsilon is the accountant's over the whole history, not one round's.
    saved = ClientAccountant.load(tmp_path / "clients" / "p000003.accountant.json")
    assert saved.total_steps == second["total-steps"]
    assert second["epsilon"] == pytest.approx(saved.epsilon(1e-5), rel=1e-12)


def test_a_restarted_client_continues_from_its_state_file(tmp_path: Path) -> None:
    app(_message(1, tmp_path), _context({"partition-id": 1, "num-partitions": 10}))
    fresh = _context({"partition-id": 1, "num-partitions": 10})  # new process: empty state
    after = _metrics(app(_message(2, tmp_path), fresh))
    assert after["total-steps"] == 2 * after["steps"]


def test_a_client_past_its_budget_declines_with_a_reason(tmp_path: Path) -> None:
    ctx = _context({"partition-id": 2, "num-partitions": 10})
    first = _metrics(app(_message(1, tmp_path), ctx))
    budget = first["epsilon"] * 1.01  # a second round cannot fit
    reply = app(_message(2, tmp_path, **{"epsilon-budget": budget}), ctx)
    metrics = _metrics(reply)
    assert metrics["declined"] == 1
    assert metrics["epsilon"] == pytest.approx(first["epsilon"])
    reason = str(reply.content.config_records["info"]["declined"])
    assert "budget" in reason
    assert "arrays" not in reply.content.array_records
    # The device owner's own, stricter budget wins too.
    owner = _context({"partition-id": 4, "num-partitions": 10, "epsilon-budget": 0.01})
    assert _metrics(app(_message(1, tmp_path), owner))["declined"] == 1


def test_a_device_trains_on_its_own_data_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(
        path, x=rng.integers(0, 255, size=(24, 8, 8), dtype=np.uint8), y=rng.integers(0, 10, 24)
    )
    # its owner allows training without DP (a device requires DP-SGD unless it says so)
    ctx = _context({"data-path": str(path), "client-id": "kitchen-sensor", "privacy-dp": "none"})
    reply = app(_message(1, tmp_path, dp="none"), ctx)
    metrics = _metrics(reply)
    assert metrics["num-examples"] == 24
    assert metrics["epsilon"] == -1.0  # no DP: no epsilon claimed
    assert reply.content.config_records["info"]["client"] == "kitchen-sensor"
    strict = _context({"data-path": str(path), "client-id": "kitchen-sensor"})
    refused = app(_message(1, tmp_path, dp="none"), strict)
    assert _metrics(refused)["refused"] == 1 and "arrays" not in refused.content.array_records


def test_evaluate_and_query(tmp_path: Path) -> None:
    ctx = _context({"partition-id": 5, "num-partitions": 10})
    msg = _message(1, tmp_path, kind=MessageType.EVALUATE, dp="none", **{"fraction-evaluate": 0.5})
    ev = _metrics(app(msg, ctx))
    train_share = _metrics(app(_message(1, tmp_path, dp="none", **{"fraction-evaluate": 0.5}), ctx))
    # the held-out fifth of the partition, disjoint from what it trains on
    n = len(load_partition("digits", 5, 10, "iid", seed=42))
    assert ev["num-examples"] == n // 5 and train_share["num-examples"] == n - n // 5
    assert 0.0 <= ev["eval-accuracy"] <= 1.0
    without = _metrics(app(_message(1, tmp_path, kind=MessageType.EVALUATE, dp="none"), ctx))
    assert without["declined"] == 1  # no held-out split: never evaluates on training samples
    set_identity()
    q = Message(
        RecordDict({"config": ConfigRecord()}), dst_node_id=NODE, message_type=MessageType.QUERY
    )
    set_identity(NODE)
    reply = app(q, ctx)
    assert reply.content.config_records["info"]["client"] == "p000005"
    assert reads_packed(reply.content.config_records["info"])
    assert PACKED_ARRAYS_KEY in reply.content.config_records["info"]


def test_a_packed_model_trains_as_the_named_arrays_and_goes_back_packed(tmp_path: Path) -> None:
    """The server packs the model into one flat array for nodes that say they read it: the
    ClientApp trains exactly as on the named arrays and packs its reply the same way."""
    ctx = _context({"partition-id": 2, "num-partitions": 10})
    plain = app(_message(1, tmp_path / "a", dp="none"), ctx)
    msg = _message(1, tmp_path / "b", dp="none")
    packed_content = pack_arrays(msg.content)
    assert packed_content is not None
    msg.content = packed_content
    reply = app(msg, _context({"partition-id": 2, "num-partitions": 10}))
    assert "arrays" not in reply.content and "arrays~layout" in reply.content
    unpacked = unpack_arrays(reply.content)
    assert unpacked is not None
    got, want = unpacked.array_records["arrays"], plain.content.array_records["arrays"]
    assert list(got.keys()) == list(want.keys())
    for name in want:
        np.testing.assert_array_equal(got[name].numpy(), want[name].numpy())


def test_client_side_clipping_bounds_the_update_when_the_server_asks(tmp_path: Path) -> None:
    """client-dp=client-fixed: Flower's wrapper sends clipping_norm; the update the client
    returns is the unclipped one scaled to that L2 norm (a numpy reference, all tensors)."""
    ctx = _context({"partition-id": 6, "num-partitions": 10})
    plain_msg = _message(1, tmp_path / "a", dp="none")
    sent = {k: v.numpy() for k, v in plain_msg.content.array_records["arrays"].items()}
    plain = app(plain_msg, ctx).content.array_records["arrays"]
    update = {k: plain[k].numpy() - sent[k] for k in sent}
    norm = float(np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update.values())))
    assert norm > 0.05
    clip = norm / 4
    clipped_msg = _message(1, tmp_path / "b", dp="none")
    clipped_msg.content.config_records["config"]["clipping_norm"] = clip
    reply = app(clipped_msg, _context({"partition-id": 6, "num-partitions": 10}))
    clipped = reply.content.array_records["arrays"]
    for k in sent:
        np.testing.assert_allclose(clipped[k].numpy() - sent[k], update[k] / 4, atol=1e-6)
    assert _metrics(reply)["clipping-norm"] == pytest.approx(clip)
