"""Load generator for KServe v2 / Open Inference Protocol REST servers (``pollinate serve``).

Lean on purpose: the benchmark machine has few cores, and a load generator that burns one of
them per thousand requests measures itself. So: asyncio with raw ``asyncio.open_connection``
HTTP/1.1 keep-alive connections (no HTTP client library per request), every request's bytes
built once before the clock starts (``BODIES`` distinct MNIST request bodies, cycled), and of
each response only the status line and the headers needed (Content-Length,
Inference-Header-Content-Length, Transfer-Encoding, Connection) are parsed, then the body read.

Two modes:

- closed loop (``rate`` unset): ``concurrency`` connections, each sending its next request as
  soon as the previous answer arrives; after a 503 (overloaded) or 504 (timed out) a client
  waits ``retry_after_s`` before sending again, like a client that backs off.
- open loop (``rate`` set): requests arrive at ``rate`` per second (Poisson or uniform
  inter-arrival times) whatever the server does, sent over a pool of ``concurrency``
  pre-opened connections. An arrival that finds no idle connection opens another, up to
  ``max_connections`` (these are counted in ``connections_opened``); past the cap it waits for
  one to come free (counted in ``waited_for_connection``). Latency is measured from the
  scheduled arrival time, so time spent waiting for a connection counts (no coordinated
  omission).

A request is measured when it is sent (closed loop) or scheduled (open loop) inside the
window ``[warmup_s, warmup_s + duration_s)`` from the start: its outcome is counted and its
latency kept. After the window no new request is sent and those still in flight are awaited
(a request unanswered after ``request_timeout_s`` is abandoned, as is an open-loop arrival
still waiting for a connection ``request_timeout_s`` after the window; both count in
``client_timeouts``). Throughput is the number of 200 answers that *arrived* inside the window
over ``duration_s`` (so an overloaded open loop's backlog, drained after the window, does not
inflate it).

Every 200 response is checked: its output has shape ``[batch, 10]`` and datatype FP32 and
decodes to finite floats, else it counts in ``bad_outputs``. Its values are also compared
(``atol`` 1e-3 + ``rtol`` 1e-3) with a reference for the same input: the logits computed with
onnxruntime from ``reference_model`` when one is given, otherwise the first 200 response seen
for that body; a difference counts in ``mismatched_outputs`` (a batching server that routes a
result to the wrong request fails this even with well-formed outputs).

``processes > 1`` spawns that many worker processes (multiprocessing ``spawn``), the
connections (or the rate) split among them, started together; their raw latencies are merged
before the percentiles are taken. The MNIST images are loaded once in the parent (importing
``pollinate.data`` imports torch) and passed to the workers, which import only numpy.

Usage (prints JSON)::

    python benchmarks/_loadgen.py --url http://127.0.0.1:8000 --model cnn \
        --concurrency 16 --duration 10 [--rate 2000] [--json] [--batch 4] [--processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import queue
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

BODIES = 32  # distinct request bodies each worker cycles through


@dataclass
class LoadConfig:
    """What load to generate, against which server."""

    url: str  # base URL, e.g. http://127.0.0.1:8000
    model: str = "cnn"
    batch: int = 1  # samples per request
    binary: bool = True  # Triton binary tensor extension; False: plain JSON bodies
    duration_s: float = 5.0  # measured window
    warmup_s: float = 1.0  # load before the window, not measured
    concurrency: int = 1  # closed loop: connections; open loop: initial connection pool
    rate: float | None = None  # open loop when set: requests per second, over all processes
    arrivals: str = "poisson"  # open loop inter-arrival times: "poisson" or "uniform"
    max_connections: int = 512  # open loop: cap on connections (per process)
    processes: int = 1
    seed: int = 0
    retry_after_s: float = 0.005  # closed loop: pause after a 503/504
    request_timeout_s: float = 30.0  # a request unanswered for this long is abandoned
    input_name: str = "input"
    output_name: str = "logits"
    classes: int = 10
    bodies: int = BODIES
    reference_model: str | None = None  # ONNX file: check outputs against its logits
    loop: str = "auto"  # "auto" (uvloop when installed), "uvloop" or "asyncio"


@dataclass
class LoadResult:
    """Counts and latencies of one load run (all processes merged)."""

    mode: str
    config: dict[str, Any]
    sent: int  # measured requests (answered or not)
    ok: int  # 200 answers to measured requests
    refused: int  # 503
    timed_out: int  # 504
    errors: int  # any other status, a connection error or an abandoned request
    client_timeouts: int  # of errors: no answer within request_timeout_s
    bad_outputs: int  # 200 responses whose output is malformed or not finite
    mismatched_outputs: int  # 200 responses whose logits differ from the reference
    duration_s: float
    throughput_rps: float  # 200 answers received inside the window / duration_s
    predictions_per_s: float  # throughput_rps * batch
    latency_ms: dict[str, float | None]  # of ok requests: p50 p95 p99 max mean
    refusal_latency_ms: dict[str, float | None]  # of 503/504 answers: p50 p95 max
    offered_rps: float | None  # open loop: measured requests scheduled per second
    connections_opened: int  # open loop: connections opened beyond the initial pool
    waited_for_connection: int  # open loop: arrivals that found the connection cap reached
    client_cpu_s: float  # CPU time of the load generator during the window (all processes)
    client_cpu_us_per_request: float | None
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


# ---------------------------------------------------------------------------- requests


def load_images(n: int, seed: int = 42) -> np.ndarray:
    """The first ``n`` MNIST test images, float32 (n, 1, 28, 28) in [0, 1] (imports torch)."""
    from pollinate.data import load_dataset

    x = np.asarray(load_dataset("mnist", seed=seed).test.x, dtype=np.float32)
    if n > len(x):
        x = np.concatenate([x] * math.ceil(n / len(x)))
    return np.ascontiguousarray(x[:n])


def infer_body(
    x: np.ndarray, *, binary: bool, input_name: str = "input", output_name: str = "logits"
) -> tuple[bytes, dict[str, str]]:
    """The body and content headers of a KServe v2 infer request for the float32 tensor ``x``.

    Binary: Triton's binary tensor extension (JSON header, then the raw little-endian bytes;
    the output asked in binary too). Otherwise a plain JSON body with the data inline.
    """
    x = np.ascontiguousarray(x, dtype="<f4")
    shape = list(x.shape)
    if binary:
        raw = x.tobytes()
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": input_name,
                        "shape": shape,
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
                "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
            },
            separators=(",", ":"),
        ).encode()
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
        return header + raw, headers
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": shape,
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        },
        separators=(",", ":"),
    ).encode()
    return body, {"Content-Type": "application/json"}


def http_request(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str], method: str = "POST"
) -> bytes:
    """The full bytes of one HTTP/1.1 keep-alive request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def decode_output(
    status_body: bytes, header_len: int | None, *, output_name: str = "logits"
) -> tuple[list[int], np.ndarray]:
    """Shape and values of output ``output_name`` of a v2 infer response body.

    ``header_len``: the response's Inference-Header-Content-Length (binary responses), or
    None for a JSON body. Raises ValueError when the body is malformed.
    """
    if header_len is not None:
        header = json.loads(status_body[:header_len])
        offset = header_len
        for out in header["outputs"]:
            size = (out.get("parameters") or {}).get("binary_data_size")
            if out["name"] == output_name:
                if out.get("datatype") != "FP32":
                    raise ValueError(f"datatype {out.get('datatype')}")
                if size is None:
                    values = np.asarray(out["data"], dtype=np.float32)
                else:
                    values = np.frombuffer(status_body, "<f4", int(size) // 4, offset)
                    if int(size) % 4 or offset + int(size) > len(status_body):
                        raise ValueError("binary_data_size does not fit the body")
                return [int(d) for d in out["shape"]], values
            if size is not None:
                offset += int(size)
        raise ValueError(f"no output {output_name!r}")
    doc = json.loads(status_body)
    for out in doc["outputs"]:
        if out["name"] == output_name:
            if out.get("datatype") != "FP32":
                raise ValueError(f"datatype {out.get('datatype')}")
            return [int(d) for d in out["shape"]], np.asarray(out["data"], dtype=np.float32)
    raise ValueError(f"no output {output_name!r}")


def reference_logits(model_file: str, xs: Sequence[np.ndarray], input_name: str) -> list[Any]:
    """Logits of each batch in ``xs`` computed with onnxruntime from ``model_file``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_file, opts, providers=["CPUExecutionProvider"])
    return [np.asarray(sess.run(None, {input_name: x})[0], dtype=np.float32) for x in xs]


# ---------------------------------------------------------------------------- one worker


class _Stats:
    """Raw counts and latencies of one worker."""

    def __init__(self) -> None:
        self.sent = self.ok = self.refused = self.timed_out = self.errors = 0
        self.ok_in_window = 0  # 200s that arrived inside the window (whenever sent)
        self.client_timeouts = self.bad = self.mismatched = 0
        self.connections_opened = self.waited = self.offered = 0
        self.cpu_s = 0.0  # CPU time of the process during the measured window
        self.lat: list[float] = []  # seconds, ok requests
        self.refusal_lat: list[float] = []  # seconds, 503/504
        self.error_samples: list[str] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5 and what not in self.error_samples:
            self.error_samples.append(what)


class _ConnectionClosedError(Exception):
    """The server closed a keep-alive connection before answering (retry on a new one)."""


class _Conn:
    """One keep-alive HTTP/1.1 connection."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _Worker:
    """The asyncio client of one process."""

    def __init__(
        self,
        cfg: LoadConfig,
        requests: list[bytes],
        expected: list[np.ndarray | None],
        concurrency: int,
        rate: float | None,
        seed: int,
    ) -> None:
        parts = urlsplit(cfg.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.cfg = cfg
        self.requests = requests
        self.expected = expected
        self.concurrency = concurrency
        self.rate = rate
        self.rng = np.random.default_rng(seed)
        self.stats = _Stats()
        self.shape = [cfg.batch, cfg.classes]
        self.t_measure = 0.0
        self.t_end = 0.0

    async def connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=2**20)
        return _Conn(reader, writer)

    async def roundtrip(self, conn: _Conn, data: bytes) -> tuple[int, bytes, int | None, bool]:
        """Send ``data``, read the answer: (status, body, inference header length, keep)."""
        writer = conn.writer
        writer.write(data)
        if writer.transport.get_write_buffer_size() > 65536:
            await writer.drain()
        try:
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise _ConnectionClosedError from e
            raise
        lines = head.split(b"\r\n")
        status = int(lines[0][9:12])
        length = -1
        header_len: int | None = None
        chunked = False
        keep = True
        for line in lines[1:]:
            if not line:
                continue
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"inference-header-content-length":
                header_len = int(value)
            elif key == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif key == b"connection":
                keep = b"close" not in value.lower()
        if chunked:
            body = await self._read_chunked(conn.reader)
        elif length >= 0:
            body = await conn.reader.readexactly(length)
        else:  # no length: the body runs to the end of the connection
            body = await conn.reader.read()
            keep = False
        return status, body, header_len, keep

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)

    def check(self, index: int, body: bytes, header_len: int | None) -> None:
        """Count a malformed or wrong 200 answer to request ``index``."""
        try:
            shape, values = decode_output(body, header_len, output_name=self.cfg.output_name)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            self.stats.bad += 1
            if len(self.stats.error_samples) < 5:
                self.stats.error_samples.append(f"bad output: {e!r}"[:200])
            return
        if shape != self.shape or values.size != self.cfg.batch * self.cfg.classes:
            self.stats.bad += 1
            return
        if not np.isfinite(values).all():
            self.stats.bad += 1
            return
        ref = self.expected[index]
        values = values.reshape(self.shape)
        if ref is None:
            self.expected[index] = values.copy()
        elif float(np.max(np.abs(values - ref) - 1e-3 * np.abs(ref))) > 1e-3:
            self.stats.mismatched += 1

    async def one(self, conn: _Conn | None, index: int, t_sched: float) -> tuple[_Conn | None, int]:
        """Send request ``index`` on ``conn`` (reconnect if needed), record it if measured.

        Returns the connection to reuse (None when it had to be closed) and the status
        (0 on a connection error or client timeout).
        """
        measured = self.t_measure <= t_sched < self.t_end
        stats = self.stats
        if measured:
            stats.sent += 1
        data = self.requests[index]
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                if conn is None:
                    conn = await self.connect()
                try:
                    status, body, header_len, keep = await self.roundtrip(conn, data)
                except (_ConnectionClosedError, ConnectionResetError, BrokenPipeError):
                    # A keep-alive connection the server closed while idle: retry once.
                    conn.close()
                    conn = await self.connect()
                    status, body, header_len, keep = await self.roundtrip(conn, data)
        except TimeoutError:
            if conn is not None:
                conn.close()
            if measured:
                stats.client_timeouts += 1
                stats.error("client timeout")
            return None, 0
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            if conn is not None:
                conn.close()
            if measured:
                stats.error(f"connection: {e!r}"[:200])
            return None, 0
        t_done = time.perf_counter()
        latency = t_done - t_sched
        if status == 200 and self.t_measure <= t_done < self.t_end:
            stats.ok_in_window += 1
        if not keep:
            conn.close()
            conn = None
        if measured:
            if status == 200:
                stats.ok += 1
                stats.lat.append(latency)
                self.check(index, body, header_len)
            elif status == 503:
                stats.refused += 1
                stats.refusal_lat.append(latency)
            elif status == 504:
                stats.timed_out += 1
                stats.refusal_lat.append(latency)
            else:
                stats.error(f"HTTP {status}: {body[:200]!r}")
        return conn, status

    # ------------------------------------------------------------------ closed loop

    async def closed_client(self, k: int, conn: _Conn | None) -> None:
        n = len(self.requests)
        i = k
        retry = self.cfg.retry_after_s
        while True:
            t = time.perf_counter()
            if t >= self.t_end:
                break
            conn, status = await self.one(conn, i % n, t)
            i += 1
            if status in (503, 504) and retry > 0:
                await asyncio.sleep(retry)
            elif status == 0:
                await asyncio.sleep(max(retry, 0.01))  # don't spin on a dead server
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------------ open loop

    async def open_loop(self, pool: list[_Conn]) -> None:
        assert self.rate is not None
        idle = pool
        n_open = len(pool)
        waiters: list[asyncio.Future[_Conn | None]] = []
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        stats = self.stats
        cap = max(self.cfg.max_connections, len(pool))

        def release(conn: _Conn | None) -> None:
            nonlocal n_open
            while waiters:
                fut = waiters.pop(0)
                if not fut.done():
                    fut.set_result(conn)
                    return
            if conn is None:
                n_open -= 1
            else:
                idle.append(conn)

        async def fire(index: int, t_sched: float) -> None:
            nonlocal n_open
            conn: _Conn | None
            if idle:
                conn = idle.pop()
            elif n_open < cap:
                n_open += 1
                conn = None  # one() connects
                if self.t_measure <= t_sched < self.t_end:
                    stats.connections_opened += 1
            else:
                if self.t_measure <= t_sched < self.t_end:
                    stats.waited += 1
                fut: asyncio.Future[_Conn | None] = loop.create_future()
                waiters.append(fut)
                try:
                    conn = await fut
                except asyncio.CancelledError:  # still waiting when the run ended
                    if self.t_measure <= t_sched < self.t_end:
                        stats.sent += 1
                        stats.client_timeouts += 1
                        stats.error("abandoned waiting for a free connection")
                    return
            conn, _ = await self.one(conn, index, t_sched)
            release(conn)

        n = len(self.requests)
        mean_gap = 1.0 / self.rate
        poisson = self.cfg.arrivals == "poisson"
        t_next = time.perf_counter()
        i = 0
        while t_next < self.t_end:
            delay = t_next - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.t_measure <= t_next:
                stats.offered += 1
            task = loop.create_task(fire(i % n, t_next))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            t_next += self.rng.exponential(mean_gap) if poisson else mean_gap
        if tasks:  # in-flight requests time out by themselves; queued ones are abandoned
            _, pending = await asyncio.wait(list(tasks), timeout=self.cfg.request_timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for conn in idle:
            conn.close()

    # ------------------------------------------------------------------ run

    async def run(self, start_at: float | None) -> _Stats:
        pool = [await self.connect() for _ in range(self.concurrency)]
        if start_at is not None:  # wall-clock start shared by all worker processes
            await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.perf_counter()
        self.t_measure = t0 + self.cfg.warmup_s
        self.t_end = self.t_measure + self.cfg.duration_s
        cpu = _CpuWindow(self.t_measure, self.t_end)
        cpu_task = asyncio.get_running_loop().create_task(cpu.watch())
        if self.rate is None:
            await asyncio.gather(*(self.closed_client(k, c) for k, c in enumerate(pool)))
        else:
            await self.open_loop(pool)
        await cpu_task
        self.stats.cpu_s = cpu.cpu_s
        return self.stats


class _CpuWindow:
    """CPU time of this process between two perf_counter instants."""

    def __init__(self, t_start: float, t_end: float) -> None:
        self.t_start = t_start
        self.t_end = t_end
        self.cpu_s = 0.0

    async def watch(self) -> None:
        await asyncio.sleep(max(0.0, self.t_start - time.perf_counter()))
        c0 = time.process_time()
        await asyncio.sleep(max(0.0, self.t_end - time.perf_counter()))
        self.cpu_s = time.process_time() - c0


def _make_worker(
    cfg_dict: dict[str, Any],
    images: np.ndarray,
    expected: list[np.ndarray | None],
    concurrency: int,
    rate: float | None,
    seed: int,
) -> _Worker:
    """One process's share of the load, its request bytes built."""
    cfg = LoadConfig(**cfg_dict)
    parts = urlsplit(cfg.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = f"{parts.path.rstrip('/')}/v2/models/{cfg.model}/infer"
    requests = []
    for j in range(len(images) // cfg.batch):
        body, headers = infer_body(
            images[j * cfg.batch : (j + 1) * cfg.batch],
            binary=cfg.binary,
            input_name=cfg.input_name,
            output_name=cfg.output_name,
        )
        requests.append(http_request(host, port, path, body, headers))
    return _Worker(cfg, requests, list(expected), concurrency, rate, seed)


def _run_worker(worker: _Worker, start_at: float | None) -> dict[str, Any]:
    """Generate the worker's load; its raw stats as a picklable dict."""
    stats = _run_async(worker.run(start_at), worker.cfg.loop)
    out = dict(vars(stats))
    out["lat"] = np.asarray(stats.lat, dtype=np.float64)
    out["refusal_lat"] = np.asarray(stats.refusal_lat, dtype=np.float64)
    return out


def _run_async(coro: Any, loop: str) -> Any:
    if loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(coro)
    return asyncio.run(coro)


def _worker_main(q: Any, start: Any, args: tuple[Any, ...]) -> None:
    """Entry point of a spawned worker: wait for the shared start time, report stats."""
    try:
        worker = _make_worker(*args)
        q.put(("ready", None))
        start_at = start.get()
        q.put(("done", _run_worker(worker, start_at)))
    except BaseException as e:  # report, don't hang the parent
        q.put(("error", f"{type(e).__name__}: {e}"))


# ---------------------------------------------------------------------------- driver


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _ms(values: np.ndarray, qs: Sequence[int]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in qs:
        out[f"p{q}"] = round(float(np.percentile(values, q)) * 1e3, 4) if values.size else None
    out["max"] = round(float(values.max()) * 1e3, 4) if values.size else None
    return out


def run_load(cfg: LoadConfig, images: np.ndarray | None = None) -> LoadResult:
    """Generate the load ``cfg`` describes and summarise it.

    ``images``: float32 (n, 1, 28, 28) inputs to build the request bodies from (default: the
    first ``cfg.bodies * cfg.batch`` MNIST test images, loaded here).
    """
    if cfg.processes < 1 or cfg.batch < 1 or cfg.concurrency < 1:
        raise ValueError("processes, batch and concurrency must be >= 1")
    if cfg.rate is None and cfg.concurrency < cfg.processes:
        raise ValueError("closed loop needs concurrency >= processes")
    if cfg.arrivals not in ("poisson", "uniform"):
        raise ValueError(f"arrivals must be poisson or uniform, not {cfg.arrivals!r}")
    n = cfg.bodies * cfg.batch
    if images is None:
        images = load_images(n)
    images = np.ascontiguousarray(images[:n], dtype=np.float32)
    batches = [images[j * cfg.batch : (j + 1) * cfg.batch] for j in range(len(images) // cfg.batch)]
    if not batches:
        raise ValueError("fewer images than one batch")
    expected: list[np.ndarray | None] = (
        list(reference_logits(cfg.reference_model, batches, cfg.input_name))
        if cfg.reference_model
        else [None] * len(batches)
    )
    conc = _split(cfg.concurrency, cfg.processes)
    conc = [max(c, 1) for c in conc] if cfg.rate is not None else conc
    rate = None if cfg.rate is None else cfg.rate / cfg.processes
    cfg_dict = asdict(cfg)
    if cfg.processes == 1:
        worker = _make_worker(cfg_dict, images, expected, conc[0], rate, cfg.seed)
        parts = [_run_worker(worker, None)]
    else:
        parts = _spawn_workers(cfg, cfg_dict, images, expected, conc, rate)
    return _summarise(cfg, parts)


def _spawn_workers(
    cfg: LoadConfig,
    cfg_dict: dict[str, Any],
    images: np.ndarray,
    expected: list[np.ndarray | None],
    conc: list[int],
    rate: float | None,
) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    starts = [ctx.Queue() for _ in range(cfg.processes)]
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(q, starts[i], (cfg_dict, images, expected, conc[i], rate, cfg.seed + i)),
            daemon=True,
        )
        for i in range(cfg.processes)
    ]
    for p in procs:
        p.start()
    try:
        _collect(q, procs, "ready", time.time() + 120)
        start_at = time.time() + 0.3  # time for the workers to connect
        for s in starts:
            s.put(start_at)
        budget = cfg.warmup_s + cfg.duration_s + cfg.request_timeout_s + 60
        parts = _collect(q, procs, "done", time.time() + budget)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return parts


def _collect(q: Any, procs: list[Any], kind: str, deadline: float) -> list[Any]:
    """One ``kind`` message from each worker; fail fast if a worker errs or dies."""
    got: list[Any] = []
    while len(got) < len(procs):
        try:
            what, payload = q.get(timeout=0.2)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"load generator worker died (exit code {dead[0]})") from None
            if time.time() > deadline:
                raise TimeoutError(f"load generator workers not {kind} in time") from None
            continue
        if what == "error":
            raise RuntimeError(f"load generator worker failed: {payload}")
        got.append(payload)
    return got


def _summarise(cfg: LoadConfig, parts: list[dict[str, Any]]) -> LoadResult:
    def total(key: str) -> int:
        return int(sum(p[key] for p in parts))

    lat = np.concatenate([p["lat"] for p in parts])
    refusal = np.concatenate([p["refusal_lat"] for p in parts])
    ok = total("ok")
    done = total("ok_in_window")
    sent = total("sent")
    cpu = float(sum(p["cpu_s"] for p in parts))
    lat_ms = _ms(lat, (50, 95, 99))
    lat_ms["mean"] = round(float(lat.mean()) * 1e3, 4) if lat.size else None
    return LoadResult(
        mode="closed" if cfg.rate is None else "open",
        config=asdict(cfg),
        sent=sent,
        ok=ok,
        refused=total("refused"),
        timed_out=total("timed_out"),
        errors=total("errors"),
        client_timeouts=total("client_timeouts"),
        bad_outputs=total("bad"),
        mismatched_outputs=total("mismatched"),
        duration_s=cfg.duration_s,
        throughput_rps=round(done / cfg.duration_s, 2),
        predictions_per_s=round(done * cfg.batch / cfg.duration_s, 2),
        latency_ms=lat_ms,
        refusal_latency_ms=_ms(refusal, (50, 95)),
        offered_rps=None if cfg.rate is None else round(total("offered") / cfg.duration_s, 2),
        connections_opened=total("connections_opened"),
        waited_for_connection=total("waited"),
        client_cpu_s=round(cpu, 3),
        client_cpu_us_per_request=round(cpu / sent * 1e6, 1) if sent else None,
        error_samples=[s for p in parts for s in p["error_samples"]][:10],
    )


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: run one load and print its LoadResult as JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="plain JSON bodies, not binary")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rate", type=float, default=None, help="open loop: requests/s")
    parser.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson")
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retry-after", type=float, default=0.005)
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--reference-model", default=None, help="ONNX file to check outputs")
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    args = parser.parse_args(argv)
    cfg = LoadConfig(
        url=args.url,
        model=args.model,
        batch=args.batch,
        binary=not args.json,
        duration_s=args.duration,
        warmup_s=args.warmup,
        concurrency=args.concurrency,
        rate=args.rate,
        arrivals=args.arrivals,
        max_connections=args.max_connections,
        processes=args.processes,
        seed=args.seed,
        retry_after_s=args.retry_after,
        request_timeout_s=args.request_timeout,
        reference_model=args.reference_model,
        loop=args.loop,
    )
    from benchmarks._measure import print_json  # not at the top: the workers import only numpy

    print_json(run_load(cfg).to_dict())


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make the repo importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
