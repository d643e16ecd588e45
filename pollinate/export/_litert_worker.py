# mypy: disable-error-code="import-not-found,import-untyped"
"""Convert a saved ``torch.export`` program to TFLite, inside the LiteRT environment.

This file is a script, not part of the importable package API: it runs under the Python of
the separate environment made by ``scripts/setup-litert`` (torch 2.13.0 + litert-torch), which
cannot share an environment with flwr (litert-torch pins ``xdsl``, which pins an old
``typing-extensions`` that breaks pydantic). It imports torch, numpy and litert-torch only,
never pollinate. :func:`pollinate.export._tflite.export_tflite` calls it as::

    python -I _litert_worker.py --program P.pt2 --calibration C.npy \
        [--out-fp32 F.tflite] [--out-int8 I.tflite]

* ``--program``: an ``ExportedProgram`` written by ``torch.export.save`` with one float32
  input of batch 1, ``(1, *sample_shape)``.
* ``--calibration``: a float32 ``.npy`` array ``(N, *sample_shape)`` of representative samples.
  Its first sample is also the example input for tracing.
* ``--out-fp32``: write a float32 model here.
* ``--out-int8``: write a full-integer INT8 model here: PT2E static quantization (symmetric
  per-channel int8 weights, int8 activations with histogram-observed ranges over every
  calibration sample),
  int8 input and output tensors with their scale and zero point in the model.

The converted models have a FIXED batch of 1 (NCHW input ``(1, *sample_shape)``): litert-torch
0.10 cannot lower ``group_norm`` with a symbolic batch, and XNNPack refuses to resize the
static graph afterwards. Callers run larger batches one sample at a time.

Tensors other than the input and output get short names (``t<i>``) before the file is
renamed into place; each file is written to a temporary file next to its destination first.
On success the last line of stdout is one JSON object (``{"outputs": [...]}``) describing the
files; converter chatter goes to stderr. Any failure exits non-zero with the reason on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "POLLINATE_LITERT_RESULT "


def _atomic_write(dest: Path, write: Any) -> int:
    """Call ``write(tmp_path)``, then fsync and rename the file to ``dest``; return its size."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(str(tmp))
        size = tmp.stat().st_size
        if size == 0:
            raise RuntimeError(f"the converter wrote an empty file for {dest.name}")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return size


def _export_compact(model: Any) -> Any:
    """A ``write(path)`` that exports ``model`` and then gives its tensors short names.

    litert-torch names every tensor after its torch module path
    (``pollinate.models.SmallCNN/torch.nn.modules.container.Sequential_features/...``): about
    10 KB of a 40 KB INT8 model. The interpreter needs no names; the model's input and output
    tensors keep theirs (the signature refers to them), every other tensor becomes ``t<i>``.
    The rewrite goes through LiteRT's own ``flatbuffer_utils`` (read, rename, write), which
    also drops the converter's empty placeholder buffers; operators and data are unchanged.
    """

    def write(path: str) -> None:
        from ai_edge_litert.tools import flatbuffer_utils

        model.export(path)
        flat = flatbuffer_utils.read_model(path)
        for subgraph in flat.subgraphs:
            keep = {int(i) for i in (*subgraph.inputs, *subgraph.outputs)}
            for index, tensor in enumerate(subgraph.tensors):
                if index not in keep:
                    tensor.name = f"t{index}"
        flatbuffer_utils.write_model(flat, path)

    return write


def _io_details(path: Path) -> dict[str, Any]:
    """Input/output shapes and dtypes of a written model, read back with the interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    return {
        "input_shape": [int(d) for d in inp["shape"]],
        "input_dtype": str(inp["dtype"].__name__),
        "output_shape": [int(d) for d in out["shape"]],
        "output_dtype": str(out["dtype"].__name__),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--program", required=True, type=Path)
    parser.add_argument("--calibration", required=True, type=Path)
    parser.add_argument("--out-fp32", type=Path)
    parser.add_argument("--out-int8", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.out_fp32 is None and args.out_int8 is None:
        parser.error("give --out-fp32 and/or --out-int8")

    started = time.perf_counter()
    outputs: list[dict[str, Any]] = []
    # litert-torch prints progress to stdout; keep stdout for the result line only.
    with contextlib.redirect_stdout(sys.stderr):
        import numpy as np
        import torch

        torch.set_num_threads(max(1, args.threads))
        import litert_torch

        program = torch.export.load(str(args.program))
        calibration = np.ascontiguousarray(np.load(args.calibration), dtype=np.float32)
        if calibration.ndim < 2 or len(calibration) == 0:
            raise SystemExit(f"calibration must be (N, ...) with N >= 1, got {calibration.shape}")
        sample = (torch.from_numpy(calibration[:1].copy()),)

        if args.out_fp32 is not None:
            module = program.module()
            model = litert_torch.convert(module, sample)
            size = _atomic_write(args.out_fp32, _export_compact(model))
            outputs.append(
                {
                    "precision": "fp32",
                    "path": str(args.out_fp32),
                    "size_bytes": size,
                    "recipe": None,
                    **_io_details(args.out_fp32),
                }
            )

        if args.out_int8 is not None:
            from litert_torch.quantize import pt2e_quantizer
            from litert_torch.quantize.quant_config import QuantConfig
            from torchao.quantization.pt2e import quantize_pt2e

            quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
                pt2e_quantizer.get_symmetric_quantization_config(
                    is_per_channel=True, is_dynamic=False
                )
            )
            prepared = quantize_pt2e.prepare_pt2e(program.module(), quantizer)
            with torch.no_grad():
                for i in range(len(calibration)):  # the program takes a batch of exactly 1
                    prepared(torch.from_numpy(calibration[i : i + 1].copy()))
            quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
            model = litert_torch.convert(
                quantized, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer)
            )
            size = _atomic_write(args.out_int8, _export_compact(model))
            recipe = (
                "litert-torch PT2E static full-integer: symmetric per-channel int8 weights, "
                f"int8 activations and I/O (histogram calibration on {len(calibration)} samples)"
            )
            outputs.append(
                {
                    "precision": "int8",
                    "path": str(args.out_int8),
                    "size_bytes": size,
                    "recipe": recipe,
                    **_io_details(args.out_int8),
                }
            )
        versions = {"torch": torch.__version__, "litert_torch": litert_torch.__version__}

    result = {
        "outputs": outputs,
        "versions": versions,
        "seconds": round(time.perf_counter() - started, 2),
    }
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
