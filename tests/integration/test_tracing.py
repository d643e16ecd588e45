"""A real `pollinate serve` process exports its spans over OTLP/HTTP to a collector on
loopback: the request's spans, under the caller's trace, from service ``pollinate-serve``."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.support.otlp import MODEL, OtlpReceiver, infer_body, tiny_repository
from tests.support.serving import serve

pytestmark = pytest.mark.integration

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def test_a_served_request_reaches_the_collector_as_spans(tmp_path: Path) -> None:
    repo = tiny_repository(tmp_path)
    with OtlpReceiver() as otlp:
        flags = ("--trace-endpoint", otlp.endpoint, "--trace-sample-rate", "1.0")
        # the exporter's batches leave every 100 ms instead of every 5 s
        with serve(repo, tmp_path, *flags, env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as server:
            request = urllib.request.Request(
                f"http://{server.http_url}/v2/models/{MODEL}/infer",
                data=json.dumps(infer_body(2)).encode(), method="POST",
                headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200
                returned = answer.headers["traceparent"]
            # a root of its own: sampled at rate 1.0
            with urllib.request.urlopen(
                urllib.request.Request(
                    f"http://{server.http_url}/v2/models/{MODEL}/infer",
                    data=json.dumps(infer_body()).encode(), method="POST",
                ), timeout=10,
            ) as answer:  # fmt: skip
                own = answer.headers["traceparent"].split("-")[1]
            names = {"infer", "decode", "queue", "batch", "inference", "encode"}
            spans = otlp.wait_for(names, traces={TRACE_ID, own})
    assert set(otlp.posts) == {"/v1/traces"}
    assert {s.service for s in spans} == {"pollinate-serve"}
    ours = [s for s in spans if s.trace_id == TRACE_ID]
    by_name = {s.name: s for s in ours}
    assert set(by_name) == {"infer", "decode", "queue", "batch", "inference", "encode"}
    infer = by_name["infer"]
    assert infer.parent_id == PARENT_ID
    assert returned == f"00-{TRACE_ID}-{infer.span_id}-01"
    assert infer.attributes["pollinate.model"] == MODEL
    assert infer.attributes["pollinate.status"] == "200"
    assert by_name["inference"].parent_id == by_name["batch"].span_id
    assert by_name["batch"].links == (infer.span_id,)
    assert by_name["batch"].attributes["pollinate.batch.rows"] == 2
    assert {by_name[n].parent_id for n in ("decode", "queue", "batch", "encode")} == {infer.span_id}
    assert own != TRACE_ID and {s.name for s in spans if s.trace_id == own} == names
