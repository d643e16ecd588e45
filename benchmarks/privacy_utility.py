"""Privacy-utility curves: two workloads, each privacy setting and its non-private baseline,
measured in one run and written to one JSON.

W-client: 10,000 clients (``resample`` partitioner, 4 MNIST samples each), a cohort of 1000 per
round, client-level DP at epsilon 1, 2, 4, 8 (delta 1e-6) with each mechanism (server-fixed,
server-adaptive, ftrl-tree, ftrl-banded; noise calibrated by ``--target-epsilon`` for the
worst-placed client, no amplification; and server-fixed+poisson: secret Poisson cohorts,
amplified accounting), the non-private run with the same recipe, and Apple's
pfl as a peer (its own venv, ``benchmarks/pfl_peer``: the same exported client data and model,
central DP-FedAvg, pfl's own accountant, which assumes Poisson sampling of the cohort).

W-sample: 100 clients x 40 samples, a quarter per round for 20 rounds, each client in at most 5
(the sampler keeps to it), sample-level DP-SGD at epsilon 1, 2, 4, 8 (delta 1e-5, noise
calibrated for those 5 rounds): one full-batch step per round (batch 40, learning rate 0.7,
clip 1.0) and server momentum 0.9, with the ``scatnet`` model (fixed scattering features and a
linear head, after Tramer and Boneh 2021); the non-private runs with the same recipe and with a
learning rate of 0.1 (the better is the baseline). ``sample_cnn``: the default CNN at epsilon
8 and without DP (learning rate 1.0 and 0.1), the same recipe otherwise, for comparison.

Each cell: ``accuracy`` (final, central test split), ``epsilon`` (what the run reports),
``noise_multiplier``, ``wall_s``. Writes benchmarks/results/privacy_utility.json and
privacy_utility.png. ``--modes`` re-measures a part and keeps the rest of an existing file.

Usage: python benchmarks/privacy_utility.py [--rounds 10] [--epsilons 1,2,4,8]
           [--modes client,pfl,sample] [--mechanisms server-fixed,ftrl-banded]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import RESULTS, run_pollinate, write_result

ROOT = Path(__file__).resolve().parent.parent
PFL_PYTHON = ROOT / ".venv-pfl" / "bin" / "python"
MECHANISMS = (
    "nonprivate", "nonprivate-fedavg", "server-fixed", "server-adaptive", "ftrl-tree",
    "ftrl-banded", "server-fixed+poisson",
)  # fmt: skip
CLIENT_DELTA, SAMPLE_DELTA = 1e-6, 1e-5


def _client_recipe(args: argparse.Namespace) -> list[str]:
    return [
        "--num-clients", str(args.clients), "--rounds", str(args.rounds),
        "--fraction", str(args.cohort / args.clients), "--partitioner", "resample",
        "--set", f"samples-per-client={args.samples}", "--set", f"target-delta={CLIENT_DELTA}",
        "--strategy", "fedavgm", "--set", "server-momentum=0.9",
        "--set", f"learning-rate={args.client_lr}", "--set", "momentum=0.9",
        "--set", f"local-epochs={args.local_epochs}", "--set", f"batch-size={args.batch}",
        "--set", f"client-dp-clip={args.clip}", "--set", f"participation-bound={args.bound}",
    ]  # fmt: skip


def _sample_recipe(args: argparse.Namespace) -> list[str]:
    return [
        "--model", args.sample_model,
        "--num-clients", "100", "--rounds", str(args.sample_rounds), "--fraction", "0.25",
        "--partitioner", "resample", "--set", "samples-per-client=40",
        "--set", f"target-delta={SAMPLE_DELTA}", "--strategy", "fedavgm",
        "--set", "server-momentum=0.9", "--set", f"learning-rate={args.sample_lr}",
        "--set", f"batch-size={args.sample_batch}", "--set", f"local-epochs={args.sample_epochs}",
        "--set", f"max-grad-norm={args.sample_clip}",
        "--set", f"participation-bound={args.sample_rounds // 4}",
    ]  # fmt: skip


def _mechanism_args(mechanism: str, eps: float) -> list[str]:
    """``NAME`` or ``NAME+poisson`` (secret Poisson cohorts, amplified accounting, no bound)."""
    name, _, sampling = mechanism.partition("+")
    out = ["--dp", "none", "--client-dp", name, "--target-epsilon", str(eps)]
    if sampling == "poisson":
        out += ["--set", "client-sampling=poisson", "--set", "participation-bound=0"]
    return out


def _cell(tmp: Path, name: str, args: list[str]) -> dict[str, Any]:
    run_dir = tmp / name
    run = run_pollinate(["simulate", *args, "--run-dir", str(run_dir)], run_dir, timeout=7200)
    if run.returncode != 0:
        raise SystemExit(f"{name} failed:\n{run.stderr_tail}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = json.loads((run_dir / "privacy.json").read_text())["summary"]
    settings = json.loads((run_dir / "run.json").read_text())
    client, sample = summary.get("client_level", {}), summary.get("sample_level", {})
    out: dict[str, Any] = {
        "accuracy": round(metrics[-1]["accuracy"], 4),
        "epsilon": client.get("epsilon") if client.get("enabled") else sample.get("max_epsilon"),
        "noise_multiplier": (
            settings.get("client_noise")
            if client.get("enabled")
            else settings.get("noise")
            if sample.get("enabled")
            else None
        ),
        "wall_s": round(run.wall_s, 1),
    }
    if client.get("enabled"):
        out.update(epsilon_rdp=client.get("epsilon_rdp"), epsilon_pld=client.get("epsilon_pld"))
    if sample.get("enabled"):
        out["declined"] = sum(m["declined"] for m in metrics)
    else:
        out["epsilon"] = out["epsilon"] if client.get("enabled") else None
    print(name, json.dumps(out), flush=True)
    return out


def _pfl(tmp: Path, args: argparse.Namespace, eps: float) -> dict[str, Any]:
    data = tmp / "pfl-data.npz"
    if not data.exists():
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks/pfl_peer/export_data.py"),
             "--num-clients", str(args.clients), "--samples-per-client", str(args.samples),
             "--out", str(data)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    cmd = [
        str(PFL_PYTHON), str(ROOT / "benchmarks/pfl_peer/run_pfl.py"), "--data", str(data),
        "--cohort-size", str(args.cohort), "--rounds", str(args.rounds), "--epsilon", str(eps),
        "--delta", str(CLIENT_DELTA), "--clip", str(args.clip), "--accountant", "prv",
        "--local-epochs", str(args.local_epochs), "--local-lr", str(args.client_lr),
        "--local-batch-size", str(args.batch), "--threads", "2",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if run.returncode != 0:
        raise SystemExit(f"pfl at epsilon {eps} failed:\n{run.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"pfl-{eps}", json.dumps(out), flush=True)
    return out


def _best(result: dict[str, Any], eps: float) -> float | None:
    accs = [cells[str(eps)]["accuracy"] for m, cells in result["client"].items()
            if not m.startswith("nonprivate") and str(eps) in cells]  # fmt: skip
    return max(accs) if accs else None


def _headline(result: dict[str, Any]) -> None:
    client, sample, pfl = result["client"], result["sample"], result.get("pfl", {})
    # the best non-private recipe is the baseline (with and without server momentum)
    baselines = [c["accuracy"] for m, c in client.items() if m.startswith("nonprivate")]
    nonprivate = max(baselines) if baselines else None
    result["nonprivate_accuracy"] = nonprivate
    result["best_client_level_acc_at_eps2"] = _best(result, 2.0)
    result["best_client_level_acc_at_eps8"] = _best(result, 8.0)
    result["pfl_acc_at_eps2"] = pfl.get("2.0", {}).get("accuracy")
    plain = [c["accuracy"] for k, c in sample.items() if k.startswith("nonprivate")]
    result["sample_nonprivate_accuracy"] = max(plain) if plain else None
    result["sample_level_acc_at_eps8"] = sample.get("8.0", {}).get("accuracy")
    cnn = result.get("sample_cnn", {})
    cnn_plain = [c["accuracy"] for k, c in cnn.items() if k.startswith("nonprivate")]
    result["sample_cnn_nonprivate_accuracy"] = max(cnn_plain) if cnn_plain else None
    result["sample_cnn_acc_at_eps8"] = cnn.get("8.0", {}).get("accuracy")

    def gap(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 4)

    result["goals"] = {
        "client_eps2_within_5_points": gap(result["best_client_level_acc_at_eps2"], nonprivate),
        "client_eps8_within_2_points": gap(result["best_client_level_acc_at_eps8"], nonprivate),
        "client_eps2_minus_pfl": gap(
            result["pfl_acc_at_eps2"], result["best_client_level_acc_at_eps2"]
        ),
        "sample_eps8_within_5_points": gap(
            result["sample_level_acc_at_eps8"], result["sample_nonprivate_accuracy"]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--clients", type=int, default=10_000)
    add("--cohort", type=int, default=1000)
    add("--samples", type=int, default=4, help="samples per W-client client")
    add("--rounds", type=int, default=10)
    add("--bound", type=int, default=1, help="W-client participation bound per client")
    add("--local-epochs", type=int, default=2)
    add("--batch", type=int, default=2)
    add("--client-lr", type=float, default=0.1)
    add("--clip", type=float, default=1.0, help="client-level clip")
    add("--sample-rounds", type=int, default=20)
    add("--sample-model", default="scatnet", help="W-sample's model")
    add("--sample-lr", type=float, default=0.7)
    add("--sample-batch", type=int, default=40)
    add("--sample-epochs", type=int, default=1)
    add("--sample-clip", type=float, default=1.0)
    add("--epsilons", default="1,2,4,8")
    add("--mechanisms", default=",".join(MECHANISMS))
    add("--modes", default="client,pfl,sample", help="a subset keeps the rest of the file")
    add("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args()
    epsilons = [float(e) for e in args.epsilons.split(",")]
    modes = set(args.modes.split(","))
    previous = RESULTS / "privacy_utility.json"
    result: dict[str, Any] = {}
    if previous.exists():
        old = json.loads(previous.read_text())
        if "workloads" in old:  # this layout; older files start afresh
            result = old
    if args.plot_only:
        _plot(result)
        return
    result.setdefault("client", {})
    result.setdefault("sample", {})
    result.setdefault("pfl", {})
    workloads = result.setdefault("workloads", {})
    with tempfile.TemporaryDirectory(prefix="pollinate-pu-") as t:
        tmp = Path(t)
        if "client" in modes:
            recipe = _client_recipe(args)
            workloads["client"] = {"recipe": recipe, "delta": CLIENT_DELTA, "data": "MNIST 5k"}
            if "nonprivate" in args.mechanisms.split(","):
                result["client"]["nonprivate"] = _cell(tmp, "client-np", [*recipe, "--dp", "none"])
            if "nonprivate-fedavg" in args.mechanisms.split(","):  # no server momentum
                result["client"]["nonprivate-fedavg"] = _cell(
                    tmp, "client-np-fedavg", [*recipe, "--dp", "none", "--strategy", "fedavg"]
                )
            for mechanism in args.mechanisms.split(","):
                if mechanism.startswith("nonprivate"):
                    continue
                cells = result["client"].setdefault(mechanism, {})
                for eps in epsilons:
                    cells[str(eps)] = _cell(
                        tmp, f"{mechanism}-{eps}", [*recipe, *_mechanism_args(mechanism, eps)]
                    )
        if "pfl" in modes:
            if not PFL_PYTHON.exists():
                raise SystemExit("the pfl peer is not installed: run benchmarks/pfl_peer/setup.sh")
            workloads["pfl"] = {
                "accounting": "pfl's own (PRV), Poisson sampling q = cohort/population"
            }
            result["pfl"]["nonprivate"] = _pfl(tmp, args, 0.0)
            for eps in epsilons:
                result["pfl"][str(eps)] = _pfl(tmp, args, eps)
        if "sample" in modes:
            recipe = _sample_recipe(args)
            workloads["sample"] = {"recipe": recipe, "delta": SAMPLE_DELTA}
            result["sample"]["nonprivate"] = _cell(tmp, "sample-np", [*recipe, "--dp", "none"])
            # without clipping DP-SGD's learning rate is too large: the best plain one counts
            slow = [*recipe, "--dp", "none", "--set", "learning-rate=0.1"]  # the later --set wins
            result["sample"]["nonprivate-lr0.1"] = _cell(tmp, "sample-np-lr0.1", slow)
            for eps in epsilons:
                dp = ["--dp", "sample", "--target-epsilon", str(eps)]
                result["sample"][str(eps)] = _cell(tmp, f"sample-{eps}", [*recipe, *dp])
            # the default CNN on the same recipe (the later --set and --model win)
            cnn = [*recipe, "--model", "cnn", "--set", "learning-rate=1.0"]
            result["sample_cnn"] = {
                "nonprivate": _cell(tmp, "cnn-np", [*cnn, "--dp", "none"]),
                "nonprivate-lr0.1": _cell(
                    tmp, "cnn-np-lr0.1", [*cnn, "--dp", "none", "--set", "learning-rate=0.1"]
                ),
                "8.0": _cell(tmp, "cnn-8.0", [*cnn, "--dp", "sample", "--target-epsilon", "8"]),
            }
    _headline(result)
    write_result("privacy_utility", result)
    _plot(result)


def _plot(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    for ax, title, series, baseline in (
        (fig.add_subplot(1, 2, 1), "W-client: 10,000 clients, cohort 1000 (delta 1e-6)",
         {**{m: c for m, c in result["client"].items() if not m.startswith("nonprivate")},
          "pfl (amplified accounting)": result.get("pfl", {})},
         max((c for m, c in result["client"].items() if m.startswith("nonprivate")),
             key=lambda c: c["accuracy"], default=None)),
        (fig.add_subplot(1, 2, 2), "W-sample: 100 clients x 40 (delta 1e-5)",
         {"DP-SGD, scatnet": {k: c for k, c in result["sample"].items()
                              if not k.startswith("non")},
          "DP-SGD, cnn": {k: c for k, c in result.get("sample_cnn", {}).items()
                          if not k.startswith("non")}},
         max((c for k, c in result["sample"].items() if k.startswith("nonprivate")),
             key=lambda c: c["accuracy"], default=None)),
    ):  # fmt: skip
        for label, cells in series.items():
            points = sorted(
                (float(e), c["accuracy"]) for e, c in cells.items() if e != "nonprivate"
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        if baseline:
            ax.axhline(baseline["accuracy"], ls="--", c="grey", label="no DP")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("epsilon (worst client, whole run)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "privacy_utility.png", dpi=120)


if __name__ == "__main__":
    main()
