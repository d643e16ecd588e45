"""The regression part of ``benchmarks/models.py``: federated MAPE against centralised models.

Two data sets that ship inside PyPI packages (nothing is downloaded):

- ``diabetes``: scikit-learn's diabetes progression (442 patients, 10 features, targets
  25..346);
- ``friedman``: scikit-learn's Friedman #1 generator (4000 samples, 10 features in [0, 1], no
  noise), a smooth nonlinear target a small MLP can fit closely.

Each is saved as ``.npz`` with standardised features and the target divided by a constant
(100 and 10): SGD wants targets of order 1, and MAPE does not change with the unit. pollinate's
split of the file (80/20, seed 42) is used by every model here, so all are tested on the same
samples:

- ``linear``: scikit-learn's least squares, centralised;
- ``central_mlp``: the built-in ``mlp`` trained centrally with Adam (the best the model can do);
- ``federated``: ``pollinate simulate`` on the fast engine, 20 clients (IID), all of them each
  round, FedAvg, SGD with momentum, without DP;
- ``federated_dp``: the same with DP-SGD (noise multiplier 1.0, clip 1.0; its epsilon).

The goal: under 5 % MAPE federated on the set where the centralised model reaches it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._measure import Stopwatch, run_pollinate

__all__ = ["regression"]

CLIENTS = 20
DATASETS = {"diabetes": 100.0, "friedman": 10.0}  # name -> the constant the target is divided by
TRAINING = {"momentum": 0.9, "local-epochs": 5, "batch-size": 32}
LEARNING_RATE = {"diabetes": 0.01, "friedman": 0.1}  # the better of 0.01 / 0.05 / 0.1 here
ROUNDS = {"diabetes": 40, "friedman": 40}


def _write(name: str, path: Path) -> Path:
    from sklearn.datasets import load_diabetes, make_friedman1

    if name == "diabetes":
        bunch = load_diabetes()
        x, y = bunch.data, bunch.target
    else:
        x, y = make_friedman1(n_samples=4000, noise=0.0, random_state=0)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    np.savez(path, x=x.astype(np.float32), y=(y / DATASETS[name]).astype(np.float32))
    return path


def _mape(pred: np.ndarray, y: np.ndarray) -> float:
    return float(100.0 * np.mean(np.abs(pred - y) / np.abs(y)))


def _central(path: Path, epochs: int = 200) -> dict[str, float]:
    """Least squares and the built-in mlp trained centrally (Adam), on pollinate's split."""
    import torch
    from sklearn.linear_model import LinearRegression

    from pollinate.data import load_dataset
    from pollinate.models import build_model

    data = load_dataset(path, seed=42, task="regression")
    x, y = np.array(data.train.x), np.array(data.train.y)  # copies: the cache is read-only
    xt, yt = np.array(data.test.x), np.array(data.test.y)
    linear = LinearRegression().fit(x, y)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    watch = Stopwatch()
    for _ in range(epochs):
        order = torch.randperm(len(xs))
        for start in range(0, len(xs), 32):
            idx = order[start : start + 32]
            optimizer.zero_grad()
            loss = ((model(xs[idx])[:, 0] - ys[idx]) ** 2).mean()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    with torch.no_grad():
        pred = model(torch.from_numpy(xt))[:, 0].numpy()
    return {
        "linear_mape": round(_mape(linear.predict(xt), yt), 2),
        "central_mlp_mape": round(_mape(pred, yt), 2),
        "central_mlp_epochs": epochs,
        "central_mlp_wall_s": watch.seconds(1),
        "test_samples": len(yt),
    }


def _federated(path: Path, work: Path, name: str, *, dp: bool) -> dict[str, Any]:
    run_dir = work / name
    args = [
        "simulate", "-n", str(CLIENTS), "--rounds", str(ROUNDS[path.stem]), "--model", "mlp",
        "--data", str(path), "--task", "regression", "--fraction", "1.0",
        "--dp", "sample" if dp else "none", "--run-dir", str(run_dir),
        "--set", f"min-train-nodes={CLIENTS}",
        "--set", f"learning-rate={LEARNING_RATE[path.stem]}",
        *(a for key, value in TRAINING.items() for a in ("--set", f"{key}={value}")),
    ]  # fmt: skip
    run = run_pollinate(args, run_dir)
    if run.returncode != 0:
        raise SystemExit(f"pollinate {' '.join(args)} failed:\n{run.stderr_tail}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())["summary"]["sample_level"]
    last = metrics[-1]["metrics"]
    return {
        "mape": round(last["mape"], 2),
        "rmse_scaled": round(last["rmse"], 4),
        "rounds": ROUNDS[path.stem],
        "wall_s": round(run.wall_s, 1),
        "max_client_epsilon": privacy.get("max_epsilon") if dp else None,
        "mape_per_round": [round(m["metrics"]["mape"], 2) for m in metrics],
    }


def regression(work: Path) -> dict[str, Any]:
    """Both data sets, every model; the JSON section of ``models.json``."""
    section: dict[str, Any] = {
        "workload": {
            "clients": CLIENTS, "fraction": 1.0, "partitioner": "iid", "model": "mlp",
            "training": TRAINING, "learning_rate": LEARNING_RATE, "rounds": ROUNDS,
            "target_divided_by": DATASETS,
            "features": "standardised", "dp": "DP-SGD noise 1.0 clip 1.0 (federated_dp)",
            "split": "pollinate's 80/20, seed 42, the same for every model",
        },
        "goal": "federated MAPE < 5 % on the set where the centralised mlp reaches it",
    }  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    for name in DATASETS:
        path = _write(name, work / f"{name}.npz")
        print(f"regression {name}: centralised models ...", file=sys.stderr)
        result: dict[str, Any] = _central(path)
        print(f"regression {name}: pollinate, no DP ...", file=sys.stderr)
        result["federated"] = _federated(path, work, f"{name}-plain", dp=False)
        print(f"regression {name}: pollinate, DP-SGD ...", file=sys.stderr)
        result["federated_dp"] = _federated(path, work, f"{name}-dp", dp=True)
        section[name] = result
    friedman = section["friedman"]
    section["diabetes_mape"] = section["diabetes"]["federated"]["mape"]
    section["friedman_mape"] = friedman["federated"]["mape"]
    section["goal_met"] = friedman["central_mlp_mape"] < 5.0 and friedman["federated"]["mape"] < 5.0
    return section
