from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pollinate.clientapp.training import evaluate, seed_for, train
from pollinate.data import load_dataset
from pollinate.models import build_model
from pollinate.privacy.noise import NoiseSource


def _data(n: int) -> tuple[np.ndarray, np.ndarray]:
    split = load_dataset("digits", seed=0)
    return np.array(split.train.x[:n]), np.array(split.train.y[:n])


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize(("n", "batch", "steps"), [(4, 32, 1), (40, 8, 5), (41, 8, 6)])
def test_dp_steps_and_sample_rate_are_what_the_accountant_needs(
    n: int, batch: int, steps: int
) -> None:
    x, y = _data(n)
    model = build_model("cnn", input_shape=(1, 8, 8))
    result = train(
        model, x, y, epochs=1, batch_size=batch, learning_rate=0.1, dp=True,
        noise_multiplier=1.0, max_grad_norm=1.0, seed=1,
    )  # fmt: skip
    assert result.steps == steps
    assert result.sample_rate == pytest.approx(1 / math.ceil(n / batch))
    assert result.num_examples == n
    # Opacus' hooks are gone: the module is a plain torch module again.
    assert not hasattr(model, "_module")
    assert all(p.grad_sample is None for p in model.parameters() if hasattr(p, "grad_sample"))


def _dp_params(seed: int, noise: NoiseSource | None = None, *, dp: bool = True) -> torch.Tensor:
    x, y = _data(16)
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=(1, 8, 8))
    train(model, x, y, epochs=1, batch_size=8, learning_rate=0.1, dp=dp,
          noise_multiplier=1.0, max_grad_norm=1.0, seed=seed, noise=noise)  # fmt: skip
    return _params(model)


def test_the_seed_does_not_fix_dp_noise() -> None:
    """The same seed twice gives different DP-SGD results: sampling and noise are secret."""
    a, b = _dp_params(7), _dp_params(7)
    assert float(torch.linalg.vector_norm(a - b)) > 1e-3


def test_without_dp_the_seed_fixes_everything() -> None:
    assert torch.equal(_dp_params(7, dp=False), _dp_params(7, dp=False))
    assert not torch.equal(_dp_params(7, dp=False), _dp_params(8, dp=False))


def test_the_test_only_switch_reproduces_the_noise() -> None:
    same = [_dp_params(7, NoiseSource.for_tests(1, 2)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    assert not torch.equal(same[0], _dp_params(7, NoiseSource.for_tests(1, 3)))


def test_clipping_bounds_the_noiseless_step() -> None:
    """With noise 0 the DP-SGD update per step is at most lr * clip (mean of clipped grads)."""
    x, y = _data(8)
    model = build_model("mlp", input_shape=(1, 8, 8))
    before = _params(model).clone()
    train(model, x, y, epochs=1, batch_size=8, learning_rate=1.0, dp=True,
          noise_multiplier=0.0, max_grad_norm=0.01, seed=3)  # fmt: skip
    # Poisson batch size varies; Opacus divides by the expected batch size (8), so a batch of
    # up to 8 clipped gradients moves the parameters by at most lr * clip * (|B| / 8).
    moved = float(torch.linalg.vector_norm(_params(model) - before))
    assert moved <= 0.01 * 16 / 8 + 1e-6


def test_plain_sgd_learns_the_digits() -> None:
    split = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=(1, 8, 8))
    before = evaluate(model, split.test.x, split.test.y)
    train(model, split.train.x, split.train.y, epochs=3, batch_size=32, learning_rate=0.1,
          momentum=0.9, dp=False, seed=0)  # fmt: skip
    after = evaluate(model, split.test.x, split.test.y)
    assert after.accuracy > 0.85 > before.accuracy
    assert after.loss < before.loss


def test_seed_for_is_stable_and_spreads() -> None:
    assert seed_for(42, 1, 3) == seed_for(42, 1, 3)
    assert len({seed_for(42, r, c) for r in range(20) for c in range(50)}) == 1000
    assert 0 <= seed_for(1, 2, 3) < 2**63


def test_empty_poisson_batches_are_noise_only_steps() -> None:
    """With rate 1/4 on 4 samples, some Poisson batches are empty; they must still step."""
    x, y = _data(4)
    for seed in range(15):
        model = build_model("cnn", input_shape=(1, 8, 8))
        before = _params(model).clone()
        result = train(model, x, y, epochs=2, batch_size=1, learning_rate=0.1, dp=True,
                       noise_multiplier=1.0, max_grad_norm=1.0, seed=seed)  # fmt: skip
        assert result.steps == 8
        assert result.sample_rate == 0.25
        assert not torch.equal(before, _params(model))


@pytest.mark.parametrize("dp", [True, False])
def test_gradient_accumulation_gives_the_same_steps_as_the_whole_batch(dp: bool) -> None:
    """A logical batch of 24 in physical pieces of 5 (the last one 4) is the same DP-SGD
    step as the whole batch: same Poisson draw and noise (reproducible source), same
    per-sample clipping, one optimizer step per logical batch."""
    x, y = _data(48)

    def run(physical: int) -> tuple[torch.Tensor, int]:
        torch.manual_seed(0)
        model = build_model("cnn", input_shape=(1, 8, 8))
        result = train(
            model, x, y, epochs=2, batch_size=24, learning_rate=0.1, momentum=0.5, dp=dp,
            noise_multiplier=0.7, max_grad_norm=0.5, seed=3,
            noise=NoiseSource.for_tests(1, 2, 3), physical_batch_size=physical,
        )  # fmt: skip
        return _params(model), result.steps

    whole, steps = run(0)
    pieces, steps_in_pieces = run(5)
    assert steps == steps_in_pieces == 4
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-5)
    assert float(torch.linalg.vector_norm(whole - run(0)[0])) == 0.0
