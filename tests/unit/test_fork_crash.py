"""What a warm executor's fork tells its parent (`device/fork_crash.py`): the message's
metadata once Flower's runtime gave it the message, and that its reply is stored. Played
against Flower's own runtime functions (faked at their network edge only) and serde."""

from __future__ import annotations

import os
import struct
import time
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, Metadata, RecordDict
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as MessageProto
from flwr.supernode.runtime import run_clientapp

from pollinate.device.fork_crash import GOT, REPLIED, _records, tell_parent

SECRET = np.full(64, 1234.5678, dtype=np.float64)  # stands for a model's weights


def _message() -> Message:
    metadata = Metadata(
        run_id=5, message_id="", src_node_id=1, dst_node_id=7, reply_to_message_id="",
        group_id="2", created_at=time.time(), ttl=3600, message_type="train",
    )  # fmt: skip
    message = Message(metadata=metadata, content=RecordDict({"arrays": ArrayRecord([SECRET])}))
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def _drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_the_fork_tells_metadata_then_reply_and_never_the_content(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message, pushed = _message(), []
    monkeypatch.setattr(run_clientapp, "pull_task_input", lambda _c: (message, "ctx", "run", "fab"))
    monkeypatch.setattr(run_clientapp, "push_message", lambda *a: pushed.append(a))
    read, write = os.pipe()
    try:
        tell_parent(write)
        assert run_clientapp.pull_task_input("client")[0] is message
        got, replied = _records(_drain(read))
        assert got is not None and not replied
        assert SECRET.tobytes()[:16] not in got  # the weights never cross the pipe
        told = message_from_proto(MessageProto.FromString(got))
        assert not told.content.array_records  # metadata only: an empty record dict
        assert MessageProto.FromString(got).metadata.message_id == message.metadata.message_id
        assert (told.metadata.run_id, told.metadata.dst_node_id, told.metadata.group_id) == (
            5, 7, "2"
        )  # fmt: skip
        run_clientapp.push_message("client", "reply", "ctx")
        assert pushed == [("client", "reply", "ctx")]
        assert _records(_drain(read)) == (None, True)
    finally:
        os.close(read)
        os.close(write)


def test_records_survive_a_fork_killed_mid_record() -> None:
    body = b"metadata"
    whole = GOT + struct.pack(">I", len(body)) + body
    assert _records(whole + REPLIED) == (body, True)
    assert _records(whole) == (body, False)
    assert _records(b"") == (None, False)
    assert _records(whole[:3]) == (None, False)  # cut inside the length: nothing told
    assert _records(whole[:-2]) == (None, False)  # cut inside the body: nothing told


def test_a_reply_already_pushed_is_never_answered_again() -> None:
    from pollinate.device.fork_crash import report

    spec: Any = object()  # report must not touch the SuperNode at all
    assert report(spec, 9, GOT + struct.pack(">I", 1) + b"x" + REPLIED) is False
