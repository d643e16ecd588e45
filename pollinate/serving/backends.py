"""Inference backends: ONNX Runtime (CUDA execution provider or CPU) and, optionally, torch.

A backend runs one batch: ``run({input name: array}) -> {output name: array}``. Each model
instance owns one backend, so instances never share a session. ``select_backend`` picks one
from the ``--device`` and ``--backend`` settings and what the machine has:

- ``onnxruntime`` with ``CUDAExecutionProvider`` when the device is ``cuda`` (or ``auto`` and
  the installed onnxruntime has that provider), else the CPU provider;
- ``torch`` (the model rebuilt from ``model.safetensors`` + ``torch.json``, loaded without
  unpickling) when asked for, or when the device is ``cuda``/``auto``, a GPU is present and
  onnxruntime has no CUDA provider.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from pollinate.errors import ConfigError, RepositoryError
from pollinate.serving.repository import ModelSpec, VersionFiles

__all__ = ["Backend", "BackendName", "Device", "gpu_present", "select_backend"]


Device = Literal["auto", "cpu", "cuda"]
BackendName = Literal["auto", "onnxruntime", "torch"]


class Backend(Protocol):
    """One model instance."""

    name: str
    device: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def gpu_present() -> bool:
    """Whether an NVIDIA driver is visible (checked without importing torch or CUDA)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def _ort_cuda() -> bool:
    import onnxruntime as ort  # type: ignore[import-untyped]

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _torch_cuda() -> bool:
    if not gpu_present():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class OnnxRuntimeBackend:
    """An ``onnxruntime.InferenceSession`` on the CPU or the CUDA execution provider."""

    name = "onnxruntime"

    def __init__(self, path: Path, *, device: Literal["cpu", "cuda"], threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        providers: list[Any] = ["CPUExecutionProvider"]
        if device == "cuda":
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise RepositoryError(f"onnxruntime cannot load {path}: {err}") from err
        if device == "cuda" and "CUDAExecutionProvider" not in self._session.get_providers():
            raise RepositoryError(f"onnxruntime could not put {path} on the CUDA provider")
        self.device: str = device
        self._outputs = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._outputs, inputs)
        return dict(zip(self._outputs, results, strict=True))


class TorchBackend:
    """The pollinate model rebuilt in torch from ``model.safetensors`` (weights only)."""

    name = "torch"

    def __init__(
        self, files: VersionFiles, spec: ModelSpec, *, device: Literal["cpu", "cuda"], threads: int
    ) -> None:
        import torch
        from safetensors.torch import load_file

        from pollinate.models import build_model

        if files.safetensors is None or files.torch_spec is None:
            raise RepositoryError(
                f"{files.path}: the torch backend needs model.safetensors and torch.json "
                "(written by `pollinate export --triton-repo`)"
            )
        if len(spec.inputs) != 1 or len(spec.outputs) != 1:
            raise RepositoryError(f"{files.path}: the torch backend serves one input, one output")
        info = files.torch_spec
        try:
            model = build_model(
                str(info["architecture"]),
                input_shape=tuple(int(d) for d in info["input_shape"]),
                num_classes=int(info["num_classes"]),
                fix=bool(info.get("fix_model", False)),
            )
            model.load_state_dict(load_file(str(files.safetensors)))
        except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as err:
            raise RepositoryError(f"{files.path}: cannot rebuild the torch model ({err})") from err
        if device == "cpu":
            torch.set_num_threads(threads)
        else:  # full fp32 convolutions and matmuls: the answers the exported model gives
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self._torch = torch
        self._device = torch.device(device)
        self._model = model.to(self._device).eval()
        self._input = spec.inputs[0].name
        self._output = spec.outputs[0].name
        self.device: str = device

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(inputs[self._input]).to(self._device, non_blocking=True)
            y = self._model(x)
            return {self._output: y.float().cpu().numpy()}


def select_backend(
    files: VersionFiles, spec: ModelSpec, *, device: Device, backend: BackendName, threads: int
) -> Backend:
    """Build one instance of ``files`` as the settings and the machine allow."""
    want_cuda = device == "cuda" or (device == "auto" and gpu_present())
    if backend != "torch":
        if want_cuda and _ort_cuda():
            return OnnxRuntimeBackend(files.onnx, device="cuda", threads=threads)
        if backend == "onnxruntime" or not want_cuda:
            if device == "cuda":
                raise ConfigError(
                    "--device cuda: the installed onnxruntime has no CUDAExecutionProvider; "
                    "install onnxruntime-gpu, or use --backend torch (with a CUDA torch)"
                )
            return OnnxRuntimeBackend(files.onnx, device="cpu", threads=threads)
    # --backend torch, or auto on a GPU that the installed onnxruntime cannot use
    if want_cuda and _torch_cuda():
        return TorchBackend(files, spec, device="cuda", threads=threads)
    if device == "cuda":
        raise ConfigError("--device cuda: no CUDA device is usable by onnxruntime or torch")
    if backend == "auto":
        return OnnxRuntimeBackend(files.onnx, device="cpu", threads=threads)
    return TorchBackend(files, spec, device="cpu", threads=threads)
