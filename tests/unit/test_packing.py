"""The model on the wire: packed into one flat array for nodes that read it (Flower stores
and sends each array as its own objects), unpacked exactly, and only where both sides agree.
The echo grid below stands in for a SuperLink and its nodes; the real one is behind every
integration test of a federation."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from pollinate import protocol
from pollinate.errors import ConfigError
from pollinate.models import build_model
from pollinate.protocol import (
    PACKED_ARRAYS_KEY,
    PACKED_ARRAYS_VERSION,
    pack_arrays,
    reads_packed,
    unpack_arrays,
)
from pollinate.serverapp.nodes import NodeDirectory
from pollinate.serverapp.transport import PollingGrid
from tests.support.grids import PushPullGrid
from tests.support.messages import SERVER_NODE, set_identity

pytestmark = pytest.mark.unit


def _model_arrays() -> OrderedDict[str, np.ndarray]:
    model = build_model("cnn", input_shape=(1, 28, 28))
    return OrderedDict((k, v.detach().numpy().copy()) for k, v in model.state_dict().items())


_LAYOUT_AB = {"names": ["a", "b"], "ranks": [1, 1], "dims": [1, 1]}


def _content(arrays: dict[str, np.ndarray]) -> RecordDict:
    record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))
    return RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 3})})


@pytest.mark.parametrize("inline", [True, False], ids=["bytes-in-layout", "flat-array"])
def test_a_packed_model_unpacks_to_the_same_named_arrays(
    inline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not inline:  # a model over Flower's chunk size keeps its values in one flat Array
        monkeypatch.setattr(protocol, "_inline_limit", lambda: 16)
    rng = np.random.default_rng(0)
    odd = OrderedDict(
        [("w", rng.normal(size=(3, 4, 5)).astype(np.float32)),
         ("scalar", np.array(2.5, np.float32)), ("empty", np.zeros((0, 3), np.float32)),
         ("b", rng.normal(size=7).astype(np.float32))]
    )  # fmt: skip
    for arrays in (_model_arrays(), odd):
        packed = pack_arrays(_content(arrays))
        assert packed is not None
        layout = packed.config_records["arrays~layout"]
        if inline:
            assert "arrays" not in packed and isinstance(layout["flat"], bytes)
        else:
            assert list(packed.array_records["arrays"].keys()) == ["flat"]
            assert "flat" not in layout
        assert packed.config_records["config"]["server-round"] == 3  # the rest goes as it was
        unpacked = unpack_arrays(packed)
        assert unpacked is not None and "arrays~layout" not in unpacked
        got = unpacked.array_records["arrays"]
        assert list(got.keys()) == list(arrays)
        for name, want in arrays.items():
            value = got[name].numpy()
            assert value.dtype == np.float32 and value.shape == np.shape(want)
            np.testing.assert_array_equal(value, want)


def test_packing_cuts_the_objects_flower_stores_and_sends() -> None:
    content = _content(_model_arrays())
    packed = pack_arrays(content)
    assert packed is not None
    before, after = len(get_all_nested_objects(content)), len(get_all_nested_objects(packed))
    # ten tensors: an Array and a chunk each; packed: the RecordDict and two ConfigRecords
    assert before >= 20 and after == 3, (before, after)


def test_what_does_not_pack_is_left_alone() -> None:
    single = _content({"w": np.ones(3, np.float32)})
    mixed = _content({"w": np.ones(3, np.float32), "steps": np.array([3], np.int64)})
    other_key = RecordDict(
        {"weights": ArrayRecord(OrderedDict((k, Array(np.ones(2, np.float32))) for k in "ab"))}
    )
    for content in (single, mixed, other_key, RecordDict({"m": MetricRecord({"a": 1.0})})):
        assert pack_arrays(content) is None
        assert unpack_arrays(content) is None


@pytest.mark.parametrize(
    "layout",
    [
        {"names": ["a", "b"], "ranks": [1, 1], "dims": [3, 3]},  # 6 values, 7 sent
        {"names": ["a", "b"], "ranks": [1, 1], "dims": [4, 4]},  # 8 values, 7 sent
        {"names": ["a"], "ranks": [2], "dims": [7]},  # ranks and dims disagree
        {"names": ["a", "b"], "ranks": [1, 1], "dims": [-1, 8]},  # a negative dimension
        {"names": ["a"], "ranks": [1]},  # no dims
    ],
)
def test_a_layout_that_does_not_fit_is_refused(layout: dict[str, Any]) -> None:
    content = RecordDict(
        {"arrays": ArrayRecord(OrderedDict([("flat", Array(np.ones(7, np.float32)))])),
         "arrays~layout": ConfigRecord(layout)}
    )  # fmt: skip
    inline = RecordDict(
        {"arrays~layout": ConfigRecord({**layout, "flat": np.ones(7, "<f4").tobytes()})}
    )
    for packed in (content, inline):
        with pytest.raises(ConfigError, match="'arrays': its packed layout does not fit"):
            unpack_arrays(packed)


@pytest.mark.parametrize(
    "content",
    [
        RecordDict({"arrays~layout": ConfigRecord({**_LAYOUT_AB, "flat": b"\0" * 7})}),
        RecordDict({"arrays~layout": ConfigRecord({**_LAYOUT_AB, "flat": "text"})}),
        RecordDict(
            {
                "arrays": ArrayRecord(OrderedDict([("flat", Array(np.ones(2, np.float32)))])),
                "arrays~layout": ConfigRecord({**_LAYOUT_AB, "flat": b"\0" * 8}),
            }
        ),  # values twice
        RecordDict({"arrays~layout": ConfigRecord(_LAYOUT_AB)}),  # no values at all
    ],
    ids=["ragged-bytes", "not-bytes", "values-twice", "no-values"],
)
def test_values_that_cannot_be_read_are_refused(content: RecordDict) -> None:
    with pytest.raises(ConfigError, match="'arrays': cannot be decoded"):
        unpack_arrays(content)


def test_only_a_node_that_names_this_format_reads_packed_models() -> None:
    assert reads_packed(ConfigRecord({PACKED_ARRAYS_KEY: PACKED_ARRAYS_VERSION}))
    for said in (True, 1, "2", 2.0):  # True: the first format (a flat Array), 2026-12-06
        assert not reads_packed(ConfigRecord({PACKED_ARRAYS_KEY: said}))
    assert not reads_packed(ConfigRecord({"client": "c1"})) and not reads_packed(None)


class _EchoGrid(PushPullGrid):
    """Each node answers at once: an identity query with its info (node 1 reads packed
    models, node 2 is an older pollinate that read the first format), any other message
    with the content it received (kept in ``received``)."""

    def __init__(self) -> None:
        super().__init__(nodes=(1, 2))
        self.received: dict[int, RecordDict] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            self.received[msg.metadata.dst_node_id] = msg.content
        return super().push_messages(messages)

    def answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        set_identity(node)
        try:
            if msg.metadata.message_type == "query":
                info: dict[str, Any] = {"client": f"c{node}"}
                info[PACKED_ARRAYS_KEY] = PACKED_ARRAYS_VERSION if node == 1 else True
                return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)
            return Message(msg.content, reply_to=msg)
        finally:
            set_identity(SERVER_NODE)


def test_the_grid_packs_only_for_nodes_that_said_they_read_it() -> None:
    inner = _EchoGrid()
    grid = PollingGrid(inner)
    arrays = _model_arrays()

    def train(node: int) -> Message:
        set_identity()
        return Message(_content(arrays), dst_node_id=node, message_type="train")

    grid.send_and_receive([train(1), train(2)], timeout=5)  # nobody has said anything yet
    assert all(len(c.array_records["arrays"]) == len(arrays) for c in inner.received.values())
    set_identity()
    queries = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n,
                       message_type="query") for n in (1, 2)]  # fmt: skip
    grid.send_and_receive(queries, timeout=5)
    replies = list(grid.send_and_receive([train(1), train(2)], timeout=5))
    assert "arrays" not in inner.received[1] and "arrays~layout" in inner.received[1]
    assert len(inner.received[2].array_records["arrays"]) == len(arrays)
    assert len(replies) == 2
    for reply in replies:  # node 1 echoed the packed model: the round loop sees names again
        got = reply.content.array_records["arrays"]
        assert "arrays~layout" not in reply.content and list(got.keys()) == list(arrays)
        for name, want in arrays.items():
            np.testing.assert_array_equal(got[name].numpy(), want)


def test_a_reply_whose_model_does_not_unpack_is_left_for_the_round_to_reject() -> None:
    """A device's malformed packed reply must not stop the server: the grid leaves it as
    sent, and the round's validation rejects a model whose tensors are not the global's."""
    inner = _EchoGrid()
    grid = PollingGrid(inner)
    set_identity()
    grid.send_and_receive([Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1,
                                   message_type="query")], timeout=5)  # fmt: skip
    bad = RecordDict(
        {"arrays": ArrayRecord(OrderedDict([("flat", Array(np.ones(3, np.float32)))])),
         "arrays~layout": ConfigRecord({"names": ["w"], "ranks": [1], "dims": [4]})}
    )  # fmt: skip
    set_identity()
    (reply,) = grid.send_and_receive([Message(bad, dst_node_id=1, message_type="train")], timeout=5)
    assert list(reply.content.array_records["arrays"].keys()) == ["flat"]  # as it came


def test_the_server_says_how_many_nodes_read_the_packed_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grid = PollingGrid(_EchoGrid())
    directory = NodeDirectory(grid, timeout=5)
    with caplog.at_level("INFO", logger="pollinate"):
        directory.refresh()
    assert directory.nodes() == {1: "c1", 2: "c2"}
    assert "2 node(s) identified, 1 of them read the packed model" in caplog.text
