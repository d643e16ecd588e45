from __future__ import annotations

import re

import numpy as np
import pytest

from pollinate.serverapp.validation import update_norm, validate_update
from tests.support.messages import reply_from

GLOBAL = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def _ok() -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), 0.1, np.float32), "b": np.full(2, 0.1, np.float32)}


def test_a_good_update_passes() -> None:
    assert (
        validate_update(reply_from(5, _ok(), {"num-examples": 4}), GLOBAL, max_update_norm=1.0)
        is None
    )


@pytest.mark.parametrize(
    ("arrays", "metrics", "reason"),
    [
        ({**_ok(), "w": np.full((3, 2), np.nan, np.float32)}, {"num-examples": 4}, "NaN or Inf"),
        ({**_ok(), "b": np.array([np.inf, 0], np.float32)}, {"num-examples": 4}, "NaN or Inf"),
        ({**_ok(), "w": np.zeros((2, 3), np.float32)}, {"num-examples": 4}, "shape"),
        ({**_ok(), "w": np.zeros((3, 2), np.float64)}, {"num-examples": 4}, "dtype"),
        ({"w": _ok()["w"]}, {"num-examples": 4}, "missing \\['b'\\]"),
        (
            {**_ok(), "extra": np.zeros(1, np.float32)},
            {"num-examples": 4},
            "unexpected \\['extra'\\]",
        ),
        (
            {**_ok(), "w": np.full((3, 2), 10.0, np.float32)},
            {"num-examples": 4},
            "exceeds the bound",
        ),
        (_ok(), {"num-examples": 0}, "num-examples must be a positive"),
        (_ok(), {"num-examples": float("nan")}, "num-examples must be a positive"),
    ],
)
def test_malformed_updates_are_rejected_with_a_reason(
    arrays: dict[str, np.ndarray], metrics: dict[str, float], reason: str
) -> None:
    got = validate_update(reply_from(5, arrays, metrics), GLOBAL, max_update_norm=5.0)
    assert got is not None

    assert re.search(reason, got), got


def test_update_norm_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    a = {
        "x": rng.normal(size=(4, 5)).astype(np.float32),
        "y": rng.normal(size=7).astype(np.float32),
    }
    b = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in a.items()}
    flat = np.concatenate([(b[k].astype(np.float64) - a[k]).ravel() for k in a])
    assert update_norm(a, b) == pytest.approx(float(np.linalg.norm(flat)), rel=1e-12)


def test_auto_bound_passes_honest_dp_updates_and_rejects_scaled_ones() -> None:
    import torch

    from pollinate.clientapp.training import train
    from pollinate.config import RunSettings
    from pollinate.data import load_partition
    from pollinate.models import build_model
    from pollinate.serverapp.calibration import update_bound

    settings = RunSettings.from_run_config({"learning-rate": 2.0, "noise-multiplier": 5.0})
    data = load_partition("mnist", 0, 1000, "iid", seed=42)
    torch.manual_seed(0)
    model = build_model("cnn")
    before = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    bound = update_bound(settings, before, mean_samples=4.0, noise=5.0)
    for seed in range(5):
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in before.items()})
        train(model, data.x, data.y, epochs=1, batch_size=32, learning_rate=2.0, dp=True,
              noise_multiplier=5.0, max_grad_norm=1.0, seed=seed)  # fmt: skip
        after = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        honest = update_norm(before, after)
        assert honest < bound
        scaled = {k: before[k] + 10 * (after[k] - before[k]) for k in before}
        assert update_norm(before, scaled) > bound
    assert update_bound(settings.replace(max_update_norm=7.0), before, mean_samples=4, noise=5) == 7
