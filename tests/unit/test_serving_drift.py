"""Tests of pollinate.serving.drift: PSI, the sliding-window monitor and retrain triggers."""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.data import DatasetSplit
from pollinate.edge_runtime.manifest import reference_distribution
from pollinate.errors import ConfigError
from pollinate.serving.drift import (
    DriftMonitor,
    DriftReading,
    DriftSettings,
    TriggerSink,
    psi,
    read_triggers,
)

pytestmark = pytest.mark.unit

EVENT_NAME = re.compile(r"^retrain-(?P<model>.+)-v(?P<version>\d+)-\d{8}T\d{6}Z-[0-9a-f]{8}\.json$")


def _slow_psi(expected: Sequence[float], actual: Sequence[float], eps: float = 1e-4) -> float:
    """PSI the long way: one bin at a time."""
    total_e, total_a = sum(expected), sum(actual)
    result = 0.0
    for e_count, a_count in zip(expected, actual, strict=True):
        e = max(e_count / total_e, eps)
        a = max(a_count / total_a, eps)
        result += (a - e) * math.log(a / e)
    return result


def _fake_logits(labels: np.ndarray, seed: int) -> np.ndarray:
    """Logits of a decent classifier: a margin of 4 on the true class plus unit noise."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), 10)).astype(np.float32)
    logits[np.arange(len(labels)), labels] += 4.0
    return logits


def _batches(
    x: np.ndarray, logits: np.ndarray, seed: int, size: int = 16
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    order = np.random.default_rng(seed).permutation(len(x))
    for start in range(0, len(x), size):
        idx = order[start : start + size]
        yield x[idx], logits[idx]


def _stream(
    monitor: DriftMonitor, x: np.ndarray, logits: np.ndarray, seed: int = 0
) -> list[DriftReading]:
    readings = [monitor.observe(xb, yb) for xb, yb in _batches(x, logits, seed)]
    return [r for r in readings if r is not None]


@pytest.fixture(scope="module")
def reference(split: DatasetSplit) -> dict[str, Any]:
    """The reference the export would write, from the training split and its logits."""
    return reference_distribution(split.train.x, _fake_logits(split.train.y, seed=1))


@pytest.fixture(scope="module")
def live(split: DatasetSplit) -> tuple[np.ndarray, np.ndarray]:
    """In-distribution traffic: the held-out test split and its logits."""
    return split.test.x, _fake_logits(split.test.y, seed=2)


@pytest.fixture(scope="module")
def drifted(split: DatasetSplit) -> tuple[np.ndarray, np.ndarray]:
    """Drifted traffic: inverted images, and a model that now predicts mostly class 3."""
    x = 1.0 - split.test.x
    logits = _fake_logits(split.test.y, seed=3)
    logits[: int(0.9 * len(x)), 3] += 10.0
    return x, logits


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- psi ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=20).flatmap(
        lambda k: st.tuples(
            st.lists(st.integers(0, 1000), min_size=k, max_size=k).filter(lambda c: sum(c) > 0),
            st.lists(st.integers(0, 1000), min_size=k, max_size=k).filter(lambda c: sum(c) > 0),
        )
    )
)
def test_psi_matches_the_bin_by_bin_formula(pair: tuple[list[int], list[int]]) -> None:
    expected, actual = pair
    value = psi(expected, actual)
    assert value == pytest.approx(_slow_psi(expected, actual), rel=1e-9, abs=1e-12)
    assert value >= 0.0


def test_psi_of_identical_distributions_is_zero() -> None:
    counts = [5, 0, 12, 3, 80]
    assert psi(counts, counts) == 0.0
    # counts and shares of the same distribution are the same distribution
    shares = np.asarray(counts) / sum(counts)
    assert psi(counts, shares) == pytest.approx(0.0, abs=1e-15)


def test_psi_of_a_real_shift() -> None:
    # all mass moved from the first to the last of two bins: (1-e)*ln(1/e) twice
    assert psi([1, 0], [0, 1]) == pytest.approx(2 * (1 - 1e-4) * math.log(1e4))


@pytest.mark.parametrize(
    ("expected", "actual", "message"),
    [
        ([1, 2], [1, 2, 3], "bins"),
        ([], [], "empty"),
        ([1, -1], [1, 1], ">= 0"),
        ([0, 0], [1, 1], "sums to zero"),
        ([1, float("nan")], [1, 1], "finite"),
    ],
)
def test_psi_rejects_bad_histograms(
    expected: list[float], actual: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        psi(expected, actual)


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.0}, "'threshold' must be a PSI > 0"),
        ({"threshold": float("nan")}, "'threshold'"),
        ({"window": 0}, "'window' must be a whole number of samples >= 1"),
        ({"window": 10.5}, "'window'"),
        ({"every": 0}, "'every'"),
        ({"every": True}, "'every'"),
        ({"min_samples": 0}, "'min_samples'"),
        ({"window": 100, "min_samples": 200}, r"'min_samples' must be .* \[1, window=100\]"),
        ({"cooldown_s": -1.0}, "'cooldown_s' must be a number of seconds >= 0"),
        ({"webhook": "ftp://example.com/x"}, "'webhook' must be an http"),
        ({"webhook": "file:///etc/passwd"}, "'webhook' must be an http"),
        ({"webhook_token": "secret"}, "'webhook_token' is set but 'webhook' is not"),
        ({"webhook": "http://h/x", "webhook_token": "a\nb"}, "single-line"),
    ],
)
def test_settings_reject_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DriftSettings(**kwargs)


def test_settings_defaults_and_path_coercion(tmp_path: Path) -> None:
    default = DriftSettings()
    assert (default.threshold, default.window, default.min_samples) == (0.2, 1000, 200)
    assert (default.every, default.cooldown_s) == (100, 300.0)
    assert DriftSettings(trigger_dir=str(tmp_path)).trigger_dir == tmp_path  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'webhook' must be an http"):
        TriggerSink(None, "not a url")


# --- monitor ------------------------------------------------------------------------------


def test_in_distribution_stream_never_crosses_the_threshold(
    reference: dict[str, Any], live: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    monitor = DriftMonitor("mnist", 1, reference, DriftSettings(trigger_dir=tmp_path))
    readings = _stream(monitor, *live, seed=0) + _stream(monitor, *live, seed=1)  # wraps
    assert monitor.seen == 2 * len(live[0])
    assert len(readings) >= 15
    assert readings[0].samples >= 200
    assert readings[-1].samples == 1000
    worst = max(max(r.input_psi, r.output_psi) for r in readings)
    assert worst < 0.2, f"in-distribution traffic read as drift: PSI {worst:.3f}"
    assert not any(r.drifted for r in readings)
    assert monitor.last == readings[-1]
    assert _files(tmp_path) == []


def test_readings_follow_min_samples_and_every(
    reference: dict[str, Any], live: tuple[np.ndarray, np.ndarray]
) -> None:
    monitor = DriftMonitor("mnist", 1, reference, DriftSettings(min_samples=50, every=40))
    seen_at = []
    for xb, yb in _batches(live[0][:992], live[1][:992], seed=0):  # 62 full batches of 16
        if monitor.observe(xb, yb) is not None:
            seen_at.append(monitor.seen)
    assert seen_at[0] == 64  # first batch boundary at or past min_samples=50
    gaps = np.diff(seen_at)
    assert np.all(gaps == 48)  # every=40 rounded up to whole batches of 16
    assert monitor.observe(live[0][:0], live[1][:0]) is None  # an empty batch changes nothing


def test_window_readings_equal_psi_of_the_last_window_samples(
    reference: dict[str, Any], live: tuple[np.ndarray, np.ndarray], drifted: Any
) -> None:
    """The ring buffer holds exactly the newest `window` samples, across wrap-arounds."""
    x = np.concatenate([live[0], drifted[0]])
    y = np.concatenate([live[1], drifted[1]])
    window = 300
    monitor = DriftMonitor("mnist", 1, reference, DriftSettings(window=window, every=20))
    edges = np.asarray(reference["input"]["bin_edges"])
    order = np.random.default_rng(5).permutation(len(x))
    x, y = x[order], y[order]
    checked = 0
    end = 0
    for size in [
        23,
        7,
        16,
        5,
        31,
        500,
        11,
        9,
        64,
        3,
    ] * 10:  # a batch larger than the window included
        start, end = end, min(end + size, len(x))
        if start == end:
            break
        reading = monitor.observe(x[start:end], y[start:end])
        if reading is None:
            continue
        lo = max(0, end - window)
        means = x[lo:end].reshape(end - lo, -1).mean(axis=1)
        hist, _ = np.histogram(np.clip(means, edges[0], edges[-1]), bins=edges)
        shares = np.bincount(y[lo:end].argmax(axis=1), minlength=10)
        assert reading.samples == end - lo
        assert reading.input_psi == pytest.approx(psi(reference["input"]["counts"], hist))
        assert reading.output_psi == pytest.approx(
            psi(reference["output"]["predicted_class_share"], shares)
        )
        checked += 1
    assert checked >= 10


def test_drifted_stream_fires_one_trigger_within_the_cooldown(
    reference: dict[str, Any], drifted: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    folder = tmp_path / "triggers"
    monitor = DriftMonitor("mnist", 7, reference, DriftSettings(trigger_dir=folder))
    readings = _stream(monitor, *drifted)
    assert sum(r.drifted for r in readings) >= 5
    assert all(r.input_psi > 0.2 and r.output_psi > 0.2 for r in readings)
    names = _files(folder)
    assert len(names) == 1, names  # many drifted readings, one trigger per cooldown
    match = EVENT_NAME.match(names[0])
    assert match is not None and match["model"] == "mnist" and match["version"] == "7"
    event = json.loads((folder / names[0]).read_text(encoding="utf-8"))
    assert set(event) == {
        "event", "reason", "model", "version", "psi", "threshold", "samples", "time"
    }  # fmt: skip
    first = next(r for r in readings if r.drifted)
    assert event["event"] == "pollinate.retrain"
    assert event["reason"] == "drift"
    assert (event["model"], event["version"]) == ("mnist", 7)
    assert event["psi"] == {"input": first.input_psi, "output": first.output_psi}
    assert event["threshold"] == 0.2
    assert event["samples"] == first.samples
    assert event["time"].endswith("Z")
    assert read_triggers(folder) == [event]


def test_zero_cooldown_fires_on_every_drifted_reading(
    reference: dict[str, Any], drifted: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    monitor = DriftMonitor(
        "mnist", 1, reference, DriftSettings(cooldown_s=0.0, every=200, trigger_dir=tmp_path)
    )
    readings = _stream(monitor, *drifted)
    assert len(readings) >= 3
    assert len(_files(tmp_path)) == len(readings)
    events = read_triggers(tmp_path)
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    assert [e["samples"] for e in events] == [r.samples for r in readings]


def test_monitors_of_two_models_are_independent(
    reference: dict[str, Any],
    live: tuple[np.ndarray, np.ndarray],
    drifted: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    drift = DriftSettings(trigger_dir=tmp_path)
    first = DriftMonitor("mnist", 1, reference, drift)
    other = DriftMonitor("mnist/large", 2, reference, drift)
    assert any(r.drifted for r in _stream(first, *drifted))
    assert not any(r.drifted for r in _stream(other, *live))
    assert other.last is not None and not other.last.drifted
    assert [e["model"] for e in read_triggers(tmp_path)] == ["mnist"]
    # the first model's cooldown does not hold back the second
    assert any(r.drifted for r in _stream(other, *drifted))
    events = read_triggers(tmp_path)
    assert sorted((e["model"], e["version"]) for e in events) == [("mnist", 1), ("mnist/large", 2)]
    names = _files(tmp_path)
    assert len(names) == 2 and all(EVENT_NAME.match(n) for n in names)  # '/' made safe


def test_no_temp_files_are_left_behind(
    reference: dict[str, Any], drifted: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    monitor = DriftMonitor("m", 1, reference, DriftSettings(cooldown_s=0, trigger_dir=tmp_path))
    _stream(monitor, *drifted)
    names = _files(tmp_path)
    assert names and all(EVENT_NAME.match(n) for n in names)
    # a write in progress (the atomic writer's temp name) is not an event
    (tmp_path / ".retrain-m-v1-x.json.abc.tmp").write_text("{", encoding="utf-8")
    (tmp_path / "retrain-garbage.json").write_text("{", encoding="utf-8")
    assert len(read_triggers(tmp_path)) == len(names)
    assert read_triggers(tmp_path / "missing") == []


def test_observe_is_thread_safe(
    reference: dict[str, Any], live: tuple[np.ndarray, np.ndarray]
) -> None:
    monitor = DriftMonitor("mnist", 1, reference, DriftSettings(every=50))
    readings: list[DriftReading] = []
    errors: list[BaseException] = []

    def feed(seed: int) -> None:
        try:
            readings.extend(_stream(monitor, *live, seed=seed))
        except BaseException as err:  # surfaced by the assert below
            errors.append(err)

    threads = [threading.Thread(target=feed, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert monitor.seen == 4 * len(live[0])
    assert len(readings) >= 40
    assert not any(r.drifted for r in readings)


def test_bad_batches_are_rejected(
    reference: dict[str, Any], live: tuple[np.ndarray, np.ndarray]
) -> None:
    monitor = DriftMonitor("mnist", 1, reference, DriftSettings())
    x, y = live
    with pytest.raises(ValueError, match="outputs samples x 10"):
        monitor.observe(x[:4], y[:3])
    with pytest.raises(ValueError, match="outputs samples x 10"):
        monitor.observe(x[:4], y[:4, :5])


def test_missing_reference_disables_the_monitor_with_one_warning(
    reference: dict[str, Any],
    live: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pollinate")
    monitor = DriftMonitor("mnist", 4, {"samples": 10}, DriftSettings())
    assert not monitor.enabled
    assert all(monitor.observe(xb, yb) is None for xb, yb in _batches(*live, seed=0))
    assert monitor.last is None
    warnings = [r for r in caplog.records if r.name == "pollinate"]
    assert len(warnings) == 1
    assert "drift monitoring disabled for model 'mnist' v4" in warnings[0].getMessage()

    caplog.clear()
    missing = DriftMonitor.from_reference("mnist", 5, tmp_path, DriftSettings())
    assert not missing.enabled
    assert len(caplog.records) == 1 and "manifest.json" in caplog.records[0].getMessage()

    bad = dict(reference, input=dict(reference["input"], counts=[1, 2]))
    caplog.clear()
    assert not DriftMonitor("mnist", 6, bad, DriftSettings()).enabled
    assert "input.counts must have" in caplog.records[0].getMessage()

    caplog.clear()
    (tmp_path / "manifest.json").write_text(
        json.dumps({"schema": 1, "reference": reference}), encoding="utf-8"
    )
    loaded = DriftMonitor.from_reference("mnist", 5, tmp_path, DriftSettings())
    assert loaded.enabled
    assert caplog.records == []
    assert _stream(loaded, *live)


# --- webhook ------------------------------------------------------------------------------


class _Hook(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], dict[str, Any]]] = []  # noqa: RUF012
    arrived = threading.Event()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers), json.loads(body)))
        self.send_response(204)
        self.end_headers()
        type(self).arrived.set()

    def log_message(self, format: str, *args: Any) -> None:  # silence the server
        pass


@pytest.fixture(autouse=True)
def _direct_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """POSTs to 127.0.0.1 must not go through a proxy configured in the environment."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def hook_server() -> Iterator[str]:
    _Hook.received = []
    _Hook.arrived = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/retrain"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _reading(**kw: Any) -> DriftReading:
    values: dict[str, Any] = {
        "model": "mnist",
        "version": 3,
        "samples": 1000,
        "input_psi": 0.8,
        "output_psi": 1.5,
        "threshold": 0.2,
        "drifted": True,
    }
    values.update(kw)
    return DriftReading(**values)


def test_webhook_receives_the_event_with_the_bearer_token(hook_server: str, tmp_path: Path) -> None:
    sink = TriggerSink(tmp_path, hook_server, webhook_token="s3cret")
    path = sink.emit(_reading())
    assert _Hook.arrived.wait(5)
    sink.join(5)
    (headers, event), *rest = _Hook.received
    assert rest == []
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["Content-Type"] == "application/json"
    assert path is not None
    assert event == json.loads(path.read_text(encoding="utf-8"))
    assert event["psi"] == {"input": 0.8, "output": 1.5}


def test_monitor_posts_to_the_webhook_without_files(
    hook_server: str, reference: dict[str, Any], drifted: tuple[np.ndarray, np.ndarray]
) -> None:
    monitor = DriftMonitor("mnist", 2, reference, DriftSettings(webhook=hook_server))
    assert monitor.sink is not None and monitor.sink.trigger_dir is None
    _stream(monitor, *drifted)
    assert _Hook.arrived.wait(5)
    monitor.sink.join(5)
    assert len(_Hook.received) == 1
    headers, event = _Hook.received[0]
    assert "Authorization" not in headers
    assert (event["model"], event["version"], event["reason"]) == ("mnist", 2, "drift")


def test_a_dead_webhook_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.WARNING, logger="pollinate")
    sink = TriggerSink(None, f"http://127.0.0.1:{port}/hook")
    assert sink.emit(_reading()) is None
    sink.join(10)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "drift webhook" in messages[0] and "failed" in messages[0]
