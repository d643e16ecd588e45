"""Torch -> TFLite (LiteRT) export through litert-torch in its own environment.

litert-torch cannot live in pollinate's environment (it pins ``xdsl==0.28.0``, which pins
``typing-extensions<4.13`` and so breaks pydantic and flwr), so the conversion runs in a
separate virtual environment made by ``scripts/setup-litert``:

* :func:`litert_python` finds that environment's Python.
* :func:`export_tflite` saves the model as a ``torch.export`` program (batch 1) and the
  calibration samples to a temporary folder, runs ``_litert_worker.py`` there as a
  subprocess with a timeout, and returns what it wrote: an FP32 and/or a full-integer INT8
  ``.tflite`` file.
* :func:`tflite_runner` opens a ``.tflite`` file with ``ai-edge-litert`` (which does install
  cleanly here) through the edge runtime's LiteRT backend and returns ``fn(x) -> logits``.

The models have a fixed batch of 1 (litert-torch cannot lower ``group_norm`` with a symbolic
batch); the runner, like the edge runtime, feeds larger batches one sample at a time. Every
file is written to a temporary file next to its destination and renamed into place by the
worker, so a reader never sees a partial model.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pollinate.errors import ConfigError, ExportError
from pollinate.export._calibration import check_calibration
from pollinate.log import logger

__all__ = [
    "LITERT_PYTHON_ENV",
    "PRECISIONS",
    "TfliteInfo",
    "export_tflite",
    "litert_python",
    "tflite_runner",
]

#: Environment variable naming the Python of the LiteRT environment.
LITERT_PYTHON_ENV = "POLLINATE_LITERT_PYTHON"
#: Precisions :func:`export_tflite` writes.
PRECISIONS: tuple[str, ...] = ("fp32", "int8")
#: Default folder of the LiteRT environment, relative to the project root (or the cwd).
_VENV_NAME = ".venv-litert"
_WORKER = Path(__file__).with_name("_litert_worker.py")
_RESULT_PREFIX = "POLLINATE_LITERT_RESULT "
_STDERR_TAIL_LINES = 15


@dataclass(frozen=True)
class TfliteInfo:
    """One ``.tflite`` file written by :func:`export_tflite`.

    Attributes:
        path: The file.
        precision: ``"fp32"`` or ``"int8"``.
        size_bytes: Size of the file.
        recipe: How it was quantized (``None`` for FP32).
        input_shape: The model's input shape; the batch is fixed at 1.
        input_dtype: Dtype of the input tensor (``float32``, or ``int8`` for INT8 models,
            whose scale and zero point are in the file).
    """

    path: Path
    precision: str
    size_bytes: int
    recipe: str | None
    input_shape: tuple[int, ...]
    input_dtype: str


def _project_root() -> Path | None:
    """The source checkout this package is imported from, when it is one."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def litert_python(venv: Path | None = None) -> Path:
    """The Python of the LiteRT environment made by ``scripts/setup-litert``.

    Looked up in order: ``venv/bin/python`` when ``venv`` is given, else the
    ``POLLINATE_LITERT_PYTHON`` environment variable, else ``.venv-litert/bin/python`` in the
    project checkout, else in the current directory.

    Raises:
        ConfigError: No such Python exists.
    """
    if venv is not None:
        candidates = [Path(venv) / "bin" / "python"]
    elif os.environ.get(LITERT_PYTHON_ENV):
        candidates = [Path(os.environ[LITERT_PYTHON_ENV])]
    else:
        roots = [r for r in (_project_root(), Path.cwd()) if r is not None]
        candidates = [root / _VENV_NAME / "bin" / "python" for root in roots]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    where = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise ConfigError(
        f"the LiteRT converter environment was not found (looked for {where}); "
        f"create it with `scripts/setup-litert` or point {LITERT_PYTHON_ENV} at its python"
    )


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(input_shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ConfigError(
            f"input_shape must be a non-empty tuple of positive integers, got {input_shape!r}"
        )
    return dims


def _check_precisions(precisions: Sequence[str]) -> tuple[str, ...]:
    wanted = tuple(dict.fromkeys(str(p) for p in precisions))
    unknown = [p for p in wanted if p not in PRECISIONS]
    if not wanted or unknown:
        raise ConfigError(
            f"precisions must be a non-empty selection of {', '.join(PRECISIONS)}, "
            f"got {tuple(precisions)!r}"
        )
    return wanted


def _check_calibration(calibration: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    """The shared calibration check, plus the sample shape the program expects."""
    data = check_calibration(calibration)
    if tuple(data.shape[1:]) != dims:
        raise ConfigError(
            f"calibration samples have shape {tuple(data.shape[1:])}, the model input is {dims}"
        )
    return data


def _save_program(model: torch.nn.Module, dims: tuple[int, ...], path: Path) -> None:
    """``torch.export`` the model at batch 1 on its CPU copy of the weights and save it."""
    was_training = model.training
    model.eval()
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    cpu_model = model if device.type == "cpu" else model.to("cpu")
    try:
        example = torch.zeros((1, *dims), dtype=torch.float32)
        program = torch.export.export(cpu_model, (example,), strict=False)
        torch.export.save(program, os.fspath(path))
    except Exception as exc:  # torch.export raises many types; all mean "cannot export"
        raise ExportError(
            f"cannot torch.export the model for TFLite (input shape {dims}): "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        if cpu_model is not model:
            model.to(device)
        model.train(was_training)


def _tail(text: str, lines: int = _STDERR_TAIL_LINES) -> str:
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def export_tflite(
    model: torch.nn.Module,
    out_dir: Path,
    *,
    input_shape: tuple[int, ...],
    calibration: np.ndarray,
    precisions: Sequence[str] = PRECISIONS,
    venv: Path | None = None,
    timeout_s: float = 600.0,
) -> list[TfliteInfo]:
    """Convert ``model`` to ``model.fp32.tflite`` and/or ``model.int8.tflite`` in ``out_dir``.

    The model (eval mode, CPU weights) is saved with ``torch.export`` at batch 1; the
    conversion runs in the LiteRT environment (see :func:`litert_python`) with one torch
    thread. The INT8 model is full-integer: PT2E static quantization with symmetric
    per-channel int8 weights and int8 activations calibrated on ``calibration``, and int8
    input/output tensors (their scale and zero point are in the file). Both models take a
    fixed batch of 1, NCHW like the torch model.

    Args:
        model: The trained model (its training flag and device are restored afterwards).
        out_dir: Destination folder (created if needed).
        input_shape: Shape of one sample, e.g. ``(1, 28, 28)``.
        calibration: Representative ``float32`` samples ``(N, *input_shape)``; a few hundred
            real training samples are enough. Its first sample is the tracing example.
        precisions: Any of ``"fp32"`` and ``"int8"``.
        venv: The LiteRT environment (default: see :func:`litert_python`).
        timeout_s: Seconds the conversion may take.

    Returns:
        One :class:`TfliteInfo` per precision, in the order asked.

    Raises:
        ConfigError: Invalid arguments, or the LiteRT environment is missing.
        ExportError: torch.export or the converter failed (with the worker's last stderr
            lines), or it timed out.
    """
    dims = _check_shape(input_shape)
    wanted = _check_precisions(precisions)
    data = _check_calibration(calibration, dims)
    python = litert_python(venv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = {p: out_dir / f"model.{p}.tflite" for p in wanted}
    with tempfile.TemporaryDirectory(prefix="pollinate-tflite-") as work_name:
        work = Path(work_name)
        program = work / "program.pt2"
        calib = work / "calibration.npy"
        _save_program(model, dims, program)
        np.save(calib, data)
        command = [
            os.fspath(python),
            "-I",  # isolated: this environment's PYTHONPATH and user site stay out
            os.fspath(_WORKER),
            "--program",
            os.fspath(program),
            "--calibration",
            os.fspath(calib),
            "--threads",
            "1",
        ]
        for precision, target in targets.items():
            command += [f"--out-{precision}", os.fspath(target)]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}
        logger.debug("running the LiteRT converter: %s", " ".join(command))
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=env,
                cwd=work,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            raise ExportError(
                f"the LiteRT converter did not finish within {timeout_s:g} s"
                + (f"; its last output:\n{_tail(stderr)}" if stderr else "")
            ) from exc
        except OSError as exc:
            raise ExportError(f"cannot run the LiteRT converter {python}: {exc}") from exc
    if done.returncode != 0:
        raise ExportError(
            f"the LiteRT converter failed (exit code {done.returncode}); its last output:\n"
            f"{_tail(done.stderr)}"
        )
    result = _parse_result(done.stdout, done.stderr)
    by_precision = {str(o["precision"]): o for o in result.get("outputs", [])}
    infos: list[TfliteInfo] = []
    for precision, target in targets.items():
        entry = by_precision.get(precision)
        if entry is None or not target.is_file():
            raise ExportError(f"the LiteRT converter reported success but wrote no {target}")
        infos.append(
            TfliteInfo(
                path=target,
                precision=precision,
                size_bytes=target.stat().st_size,
                recipe=entry.get("recipe"),
                input_shape=tuple(int(d) for d in entry.get("input_shape", (1, *dims))),
                input_dtype=str(entry.get("input_dtype", "float32")),
            )
        )
        logger.debug("Exported %s (%d bytes)", target, infos[-1].size_bytes)
    return infos


def _parse_result(stdout: str, stderr: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            try:
                parsed = json.loads(line[len(_RESULT_PREFIX) :])
            except ValueError:
                break
            if isinstance(parsed, dict):
                return parsed
            break
    raise ExportError(
        "the LiteRT converter exited without reporting what it wrote; its last output:\n"
        f"{_tail(stderr)}"
    )


def tflite_runner(path: Path, *, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """Open ``path`` with ``ai-edge-litert`` on the CPU and return ``fn(x) -> logits``.

    Uses the edge runtime's LiteRT backend: ``fn`` takes a float batch of any size (a model
    with a fixed batch is run in chunks), (de)quantizes int8 input and output with the
    tensor's scale and zero point, and returns float32 logits.

    Raises:
        ConfigError: ``threads`` is not a positive integer.
        ExportError: The file is missing, ``ai-edge-litert`` is not installed, or it cannot
            load the file.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"cannot open {path}: no such TFLite file")
    from pollinate.edge_runtime._backends import open_backend
    from pollinate.edge_runtime.errors import BundleError, RuntimeMissingError

    try:
        backend = open_backend("litert", path, threads=threads)
    except (BundleError, RuntimeMissingError) as exc:
        raise ExportError(f"cannot open {path.name} with LiteRT: {exc}") from exc

    def run(x: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(x, dtype=np.float32)
        return np.asarray(backend.run(batch), dtype=np.float32)

    return run
