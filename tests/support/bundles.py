"""A tiny classifier and its bundles, for the edge-runtime and bundle-writer tests.

The model is real: Flatten -> MatMul -> Add (opset 18) built with ``onnx.helper`` from
seeded weights, so the expected logits (:func:`reference`) are known exactly; its OpenVINO IR
stores the weights as fp16. :func:`make_sources` gives a bundle's source files and manifest
for ``pollinate.export._bundle.write_bundle``.

:data:`RNG` drew the weights; the tests draw their inputs from it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pollinate.edge_runtime.manifest import (
    Artifact,
    Manifest,
    ModelInfo,
    Preprocessing,
    TensorSpec,
)

RNG = np.random.default_rng(7)
WEIGHTS = RNG.normal(0, 0.3, size=(64, 10)).astype(np.float32)
BIAS = RNG.normal(0, 0.1, size=(10,)).astype(np.float32)
MEAN, STD = 0.5, 0.25
LABELS = [f"digit-{i}" for i in range(10)]


def make_onnx(path: Path, *, batch: int | str = "N") -> Path:
    """Write the tiny classifier: input [batch, 1, 8, 8] -> logits [batch, 10]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["scores"]),
        helper.make_node("Add", ["scores", "B"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        initializer=[numpy_helper.from_array(WEIGHTS, "W"), numpy_helper.from_array(BIAS, "B")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="pollinate-tests"
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_openvino(onnx_path: Path, xml_path: Path) -> Path:
    """An fp16-compressed OpenVINO IR of ``onnx_path`` (weights stored as fp16)."""
    import openvino

    xml_path.parent.mkdir(parents=True, exist_ok=True)
    openvino.save_model(openvino.convert_model(str(onnx_path)), str(xml_path))
    return xml_path


def reference(x: np.ndarray, *, fp16_weights: bool = False) -> np.ndarray:
    """The expected logits of a preprocessed float batch [N, 1, 8, 8]."""
    w = WEIGHTS.astype(np.float16).astype(np.float32) if fp16_weights else WEIGHTS
    b = BIAS.astype(np.float16).astype(np.float32) if fp16_weights else BIAS
    return x.reshape(len(x), 64).astype(np.float32) @ w + b


def raw_to_model(raw: np.ndarray) -> np.ndarray:
    """What the manifest's preprocessing makes of uint8 pixels."""
    return (raw.astype(np.float32) * np.float32(1 / 255) - np.float32(MEAN)) / np.float32(STD)


def artifact(file: str, runtime: str, precision: str, **extra: object) -> Artifact:
    """An artifact entry with placeholder size and hash (the writer fills them)."""
    return Artifact(
        file=file,
        runtime=runtime,
        min_runtime_version="1.0",
        precision=precision,
        quantization=None,
        opset=18,
        size_bytes=0,
        sha256="",
        **extra,  # type: ignore[arg-type]
    )


def make_manifest(artifacts: list[Artifact], *, batch: int = -1) -> Manifest:
    """A manifest of the tiny model with the given artifacts."""
    return Manifest(
        model=ModelInfo(
            name="tiny", version="1", source_run="tests", source_round=3, created="2026-01-01"
        ),
        inputs=[TensorSpec("input", "float32", [batch, 1, 8, 8])],
        outputs=[TensorSpec("logits", "float32", [batch, 10])],
        preprocessing=Preprocessing(mean=[MEAN], std=[STD]),
        labels=LABELS,
        artifacts=artifacts,
    )


def make_sources(folder: Path, *, openvino: bool = True) -> tuple[Manifest, dict[str, Path]]:
    """Source files and manifest of a bundle: onnxruntime fp32 (+ OpenVINO fp16 IR)."""
    onnx_path = make_onnx(folder / "model.fp32.onnx")
    files = {"model.fp32.onnx": onnx_path}
    arts = [artifact("model.fp32.onnx", "onnxruntime", "fp32")]
    if openvino:
        xml = make_openvino(onnx_path, folder / "openvino" / "model.fp16.xml")
        files["openvino/model.fp16.xml"] = xml
        files["openvino/model.fp16.bin"] = xml.with_suffix(".bin")
        arts.append(
            artifact(
                "openvino/model.fp16.xml",
                "openvino",
                "fp16",
                extra_files={"openvino/model.fp16.bin": ""},
            )
        )
    return make_manifest(arts), files
