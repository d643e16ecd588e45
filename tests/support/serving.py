"""Model repositories and real ``pollinate serve`` processes for the serving tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pollinate.config import RunSettings
from pollinate.data import load_dataset
from pollinate.export.pipeline import ExportOptions, Format, Precision, export_run
from pollinate.rundir.checkpoint import Checkpoint, atomic_write_json, save_checkpoint
from tests.support.models import train_default_cnn
from tests.support.processes import POLLINATE, StartError, terminate, wait_for_port_file

MODEL = "cnn"


def default_repository(root: Path) -> Path:
    """``root/repo`` with version 3 of the default CNN, exported by the real pipeline.

    The model is trained for one epoch on the default data (about 90% test accuracy); the
    version directory holds model.onnx, model.safetensors, torch.json and manifest.json.
    """
    run = root / "run"
    run.mkdir(parents=True)
    settings = RunSettings.from_run_config({"dp": "none", "run-dir": str(run)})
    data = load_dataset("mnist", seed=settings.seed)
    model = train_default_cnn(data.train.x, data.train.y, epochs=1)
    atomic_write_json(run / "run.json", {"settings": settings.to_run_config(), "population": 1})
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    save_checkpoint(run, Checkpoint(server_round=3, model=state))
    repo = root / "repo"
    options = ExportOptions(
        out=root / "bundle", formats=(Format.ONNX,), precisions=(Precision.FP32,),
        triton_repo=repo,
    )  # fmt: skip
    export_run(run, options)
    return repo


def copy_version(
    repo: Path, src: int, dst: int, *, onnx_model: onnx.ModelProto | None = None
) -> Path:
    """Publish version ``dst`` the way the exporter does: every file first, model.onnx last."""
    source = repo / MODEL / str(src)
    staging = repo / MODEL / f".staging-{dst}"
    shutil.copytree(source, staging)
    (staging / "model.onnx").unlink()
    if onnx_model is None:
        shutil.copy2(source / "model.onnx", staging / "model.tmp")
    else:
        onnx.save(onnx_model, staging / "model.tmp")
    target = repo / MODEL / str(dst)
    os.replace(staging, target)
    os.replace(target / "model.tmp", target / "model.onnx")
    return target


def _graph(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def slow_model(width: int = 1536, layers: int = 6) -> onnx.ModelProto:
    """Same inputs and outputs as the CNN, many times its compute (a regression to catch)."""
    rng = np.random.default_rng(0)
    shape = numpy_helper.from_array(np.array([-1, 784], dtype=np.int64), "shape")
    inits = [
        shape,
        numpy_helper.from_array(
            (rng.standard_normal((784, width)) * 0.01).astype(np.float32), "w0"
        ),
    ]
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["h0"]),
        helper.make_node("MatMul", ["h0", "w0"], ["m0"]),
    ]
    prev = "m0"
    for i in range(1, layers):
        w = (rng.standard_normal((width, width)) * 0.01).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        prev = f"m{i}"
    inits.append(
        numpy_helper.from_array((rng.standard_normal((width, 10)) * 0.01).astype(np.float32), "wo")
    )
    nodes.append(helper.make_node("MatMul", [prev, "wo"], ["logits"]))
    return _graph(nodes, inits)


def nan_model() -> onnx.ModelProto:
    """Same inputs and outputs as the CNN; answers NaN (0/0) for every input."""
    zeros = numpy_helper.from_array(np.zeros((784, 10), dtype=np.float32), "zeros")
    shape = numpy_helper.from_array(np.array([-1, 784], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "zeros"], ["z"]),
        helper.make_node("Div", ["z", "z"], ["logits"]),
    ]
    return _graph(nodes, [zeros, shape])


@dataclass
class Server:
    """A running `pollinate serve` process and its ports."""

    process: subprocess.Popen[str]
    http: int
    grpc: int
    metrics: int
    log: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics}/metrics", timeout=5
        ) as answer:
            text = answer.read()
        total = 0.0
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines


@contextmanager
def serve(repo: Path, tmp: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start `python -m pollinate serve` on free loopback ports; stop it with SIGTERM after.

    SIGTERM goes to the server alone (with ``--workers`` it stops its workers itself);
    SIGKILL after 20 s. RuntimeError, with the server's log, if it does not start in 60 s.
    """
    port_file = tmp / f"ports-{time.monotonic_ns()}.json"
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    cmd = [
        *POLLINATE, "serve", "--repository", str(repo),
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        "--port-file", str(port_file), "--device", "cpu", *args,
    ]  # fmt: skip
    with log.open("w") as sink:
        process = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )  # fmt: skip
    try:
        try:
            ports = wait_for_port_file(process, port_file, 60)
        except StartError as exc:
            raise RuntimeError(f"pollinate serve {exc}:\n{log.read_text()}") from exc
        yield Server(process, ports["http"], ports["grpc"], ports["metrics"], log)
    finally:
        terminate(process, timeout=20)


def mnist_images(n: int = 256) -> np.ndarray:
    """Real MNIST test images, float32 (n, 1, 28, 28) in [0, 1]."""
    return np.array(load_dataset("mnist", seed=42).test.x[:n], dtype=np.float32)
