"""A warm executor's fork that dies by a signal: its message gets an error reply at once.

Flower learns that a ClientApp process died only from its silence: a task claimed and never
started is offered again after the heartbeat interval, a started one whose message was taken
fails after twice that with an error reply, and one killed between the two (started, its
message not yet taken) is failed without any reply, so its SuperNode waits for a reply that
never comes and takes no other message. Before the warm executor, a process start took
seconds and that window was rarely hit; a fork is killed in milliseconds (out of memory, an
operator's ``kill``), and a test that killed forks lost its device for the rest of the run.

So each fork tells its parent, over a pipe, what Flower's runtime gave it: the message's
metadata (:data:`GOT`) once it has the message, and :data:`REPLIED` once its reply is with
the SuperNode. When a fork dies by a signal, the parent (:func:`report`), with the fork's
task token:

- no reply pushed: answers the message with Flower's ``CLIENT_APP_CRASHED`` error (taking it
  from the SuperNode first if the fork never did), then finishes the task as failed, so the
  server hears of the failure in about a second (the executor's next loop), not after 10-20 s
  or never;
- reply pushed: nothing (the reply goes out; Flower finishes the task on its clock).

Only metadata crosses the pipe (ids, run, group, TTL), never the message's content; whatever
goes wrong here is one line on stderr, and Flower's own expiry still stands behind it.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Any

__all__ = ["GOT", "REPLIED", "report", "tell_parent"]

#: a record: the message's metadata follows (a 4-byte length, then the protobuf)
GOT = b"G"
#: a record: the reply is stored in the SuperNode
REPLIED = b"R"


def tell_parent(fd: int) -> None:
    """In the fork: wrap Flower's ``run_clientapp`` steps so they write their records to
    ``fd`` (the write end of the fork's pipe)."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.supernode.runtime import run_clientapp as flower

    pull, push = flower.pull_task_input, flower.push_message

    def pull_task_input(client: Any) -> Any:
        got = pull(client)
        proto = message_to_proto(remove_content_from_message(got[0]))
        proto.metadata.message_id = got[0].metadata.message_id
        data = proto.SerializeToString()
        os.write(fd, GOT + struct.pack(">I", len(data)) + data)
        return got

    def push_message(client: Any, message: Any, context: Any) -> None:
        push(client, message, context)
        os.write(fd, REPLIED)

    flower.pull_task_input = pull_task_input
    flower.push_message = push_message


def _records(data: bytes) -> tuple[bytes | None, bool]:
    """The message metadata (protobuf bytes) and whether a reply was pushed, from a pipe."""
    metadata, replied, at = None, False, 0
    while at < len(data):
        kind = data[at : at + 1]
        if kind == REPLIED:
            replied, at = True, at + 1
        elif kind == GOT and at + 5 <= len(data):
            (size,) = struct.unpack(">I", data[at + 1 : at + 5])
            if at + 5 + size > len(data):
                break  # cut short: the fork died writing it
            metadata, at = data[at + 5 : at + 5 + size], at + 5 + size
        else:
            break  # cut short, or not a record
    return metadata, replied


def report(spec: Any, signum: int, records: bytes) -> bool:
    """In the parent: answer the task of a fork killed by ``signum`` (see the module's text);
    ``True`` when an error reply was stored."""
    got, replied = _records(records)
    if replied:
        return False
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as MessageProto
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    invoker = make_simple_http_retry_invoker()
    invoker.max_tries = 2
    client = RuntimeHttpClient.from_server_address(
        server_address=spec.runtime_api_address,
        insecure=spec.insecure,
        root_certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(spec.token),
        ],
        retry_invoker=invoker,
    )
    try:
        if got is None:  # the fork died before it took its message: take it here
            pulled = client.PullMessages(PullAppMessagesRequest())
            if not pulled.messages_list:
                return False  # taken, not told: Flower's expiry answers it (10-20 s)
            proto = pulled.messages_list[0]
            proto.metadata.message_id = pulled.message_object_trees[0].object_id
        else:
            proto = MessageProto.FromString(got)
        message = message_from_proto(proto)
        message.metadata.__dict__["_message_id"] = proto.metadata.message_id
        name = _signal_name(signum)
        reason = f"the ClientApp's process (a fork of the warm executor) was killed by {name}"
        reply = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=message)
        where = _Where(message.metadata.dst_node_id, message.metadata.run_id)
        push_message(client, reply, where)  # type: ignore[arg-type]
        push_task_output(client, None, SubStatus.FAILED, reason)
        return True
    except Exception as err:  # Flower's expiry is still behind this
        name = _signal_name(signum)
        print(f"warm executor: could not report a fork killed by {name} ({type(err).__name__}: "
              f"{err}); Flower's task expiry will", file=sys.stderr)  # fmt: skip
        return False
    finally:
        client.close()


class _Where:
    """What Flower's ``push_message`` reads of a ``Context``: the node and the run."""

    def __init__(self, node_id: int, run_id: int) -> None:
        self.node_id, self.run_id = node_id, run_id


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
