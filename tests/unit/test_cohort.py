"""The vectorised cohort trainer against Opacus and against a slow per-sample reference."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from pollinate.clientapp.training import TrainSettings, train
from pollinate.data import load_partition
from pollinate.models import build_model
from pollinate.privacy.noise import NoiseSource, gaussian
from pollinate.simulation.cohort import CohortMember, train_cohort


def _model(name: str = "cnn") -> nn.Module:
    torch.manual_seed(0)
    return build_model(name)


def _members(count: int, population: int, *, seed0: int = 0) -> list[CohortMember]:
    out = []
    for i in range(count):
        part = load_partition("mnist", i, population, "iid", seed=42)
        out.append(_member(part.x, part.y, seed0 + i))
    return out


def _member(x: np.ndarray, y: np.ndarray, seed: int) -> CohortMember:
    """A member whose DP randomness is reproducible (test-only) so results can be compared."""
    return CohortMember(x, y, seed=seed, noise=NoiseSource.for_tests(seed))


def _max_diff(a: dict[str, np.ndarray], model: nn.Module) -> float:
    return max(
        float(np.abs(a[k] - v.detach().numpy()).max()) for k, v in model.state_dict().items()
    )


@pytest.mark.parametrize("name", ["cnn", "opacus-mnist"])  # torch.func; plain autograd
@pytest.mark.parametrize(
    ("epochs", "momentum", "mu"), [(1, 0.0, 0.0), (3, 0.9, 0.0), (2, 0.0, 0.1), (2, 0.5, 0.05)]
)
def test_dp_sgd_equals_opacus_when_deterministic(
    epochs: int, momentum: float, mu: float, name: str
) -> None:
    """With every sample in every batch (n <= B, so q = 1) and no noise, DP-SGD has no
    randomness left: the cohort must reproduce Opacus' clipping, scaling and update."""
    model = _model(name)
    members = _members(4, 200)  # 20 samples each, batch 32 -> q = 1
    settings = TrainSettings(
        epochs=epochs, batch_size=32, learning_rate=0.5, momentum=momentum, dp=True,
        noise_multiplier=0.0, max_grad_norm=1.0, proximal_mu=mu,
    )  # fmt: skip
    results = train_cohort(model, members, settings)
    for member, (result, state) in zip(members, results, strict=True):
        reference = copy.deepcopy(model)
        expected = train(
            reference, member.x, member.y, epochs=epochs, batch_size=32, learning_rate=0.5,
            momentum=momentum, dp=True, noise_multiplier=0.0, max_grad_norm=1.0,
            proximal_mu=mu, seed=1,
        )  # fmt: skip
        assert _max_diff(state, reference) < 1e-5
        assert result.steps == expected.steps == epochs
        assert result.sample_rate == expected.sample_rate == 1.0
        assert result.loss == pytest.approx(expected.loss, rel=1e-5)
        assert result.accuracy == expected.accuracy


@pytest.mark.parametrize("name", ["cnn", "opacus-mnist"])
def test_plain_sgd_equals_torch_for_one_batch_per_epoch(name: str) -> None:
    model = _model(name)
    members = _members(3, 200)
    settings = TrainSettings(
        epochs=2, batch_size=32, learning_rate=0.1, momentum=0.9, dp=False, proximal_mu=0.01
    )
    for member, (_, state) in zip(members, train_cohort(model, members, settings), strict=True):
        reference = copy.deepcopy(model)
        train(reference, member.x, member.y, epochs=2, batch_size=32, learning_rate=0.1,
              momentum=0.9, dp=False, proximal_mu=0.01, seed=0)  # fmt: skip
        # the first step agrees to float rounding (1e-6); a max-pool window whose two
        # largest inputs differ by that rounding routes the second step's gradient to the
        # other input (seen: 2.6e-5 in one conv weight of one member of the default CNN)
        assert _max_diff(state, reference) < 5e-5


def _slow_reference(
    model: nn.Module, member: CohortMember, s: TrainSettings
) -> tuple[dict[str, np.ndarray], int, float]:
    """One client, one sample at a time, the obvious way; the same random draws as the cohort
    (per step k: the Poisson mask from the sampling stream of k, the noise from its noise
    stream; without DP a permutation per epoch from the seed)."""
    net = copy.deepcopy(model)
    start = [p.detach().clone() for p in net.parameters()]
    gen = torch.Generator().manual_seed(member.seed)
    x = torch.from_numpy(np.asarray(member.x, dtype=np.float32))
    y = torch.from_numpy(np.asarray(member.y, dtype=np.int64))
    n = len(y)
    batches = max(1, math.ceil(n / s.batch_size))
    rate = 1.0 / batches
    dp_steps = int(1 / rate)  # what Opacus' Poisson sampler runs
    buffers: list[torch.Tensor] | None = None
    steps = 0
    loss_sum, seen = 0.0, 0
    for _ in range(s.epochs):
        if s.dp:  # the mask of each step is drawn when the step starts, after the last noise
            plan: list[torch.Tensor | None] = [None] * dp_steps
        else:
            order = torch.randperm(n, generator=gen)
            size = min(s.batch_size, n)
            plan = [order[i : i + size] for i in range(0, n, size)]
        for idx in plan:
            if idx is None:
                mask = torch.rand(n, generator=member.noise.sampling_generator(steps)) < rate
                idx = torch.nonzero(mask).flatten()
            if s.dp:
                total = [torch.zeros_like(p) for p in net.parameters()]
                for j in idx.tolist():
                    net.zero_grad()
                    loss = nn.functional.cross_entropy(net(x[j : j + 1]), y[j : j + 1])
                    loss.backward()
                    loss_sum += float(loss.detach())
                    seen += 1
                    grads = [p.grad.detach().clone() for p in net.parameters()]  # type: ignore[union-attr]
                    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
                    factor = min(1.0, s.max_grad_norm / (norm + 1e-6))
                    total = [t + factor * g for t, g in zip(total, grads, strict=True)]
                numel = sum(p.numel() for p in net.parameters())
                std = s.noise_multiplier * s.max_grad_norm
                noise = gaussian((numel,), std, member.noise.generator(step=steps))
                expected = max(1.0, math.floor(n * rate))
                grads, offset = [], 0
                for p, t in zip(net.parameters(), total, strict=True):
                    chunk = noise[offset : offset + p.numel()].reshape(p.shape)
                    offset += p.numel()
                    grads.append((t + chunk) / expected)
            else:
                net.zero_grad()
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                prox = sum(
                    ((p - g) ** 2).sum() for p, g in zip(net.parameters(), start, strict=True)
                )
                (loss + 0.5 * s.proximal_mu * prox).backward()
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
                grads = [p.grad.detach().clone() for p in net.parameters()]  # type: ignore[union-attr]
            with torch.no_grad():
                if s.momentum > 0:
                    if buffers is None:
                        buffers = [g.clone() for g in grads]
                    else:
                        buffers = [b * s.momentum + g for b, g in zip(buffers, grads, strict=True)]
                    direction = buffers
                else:
                    direction = grads
                for p, d in zip(net.parameters(), direction, strict=True):
                    p -= s.learning_rate * d
                if s.dp and s.proximal_mu > 0:
                    for p, g in zip(net.parameters(), start, strict=True):
                        p -= s.learning_rate * s.proximal_mu * (p - g)
            steps += 1
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    return state, steps, loss_sum / seen if seen else math.nan


@pytest.mark.parametrize(
    "settings",
    [
        TrainSettings(epochs=2, batch_size=8, learning_rate=0.3, momentum=0.5, dp=True,
                       noise_multiplier=1.0, max_grad_norm=0.7, proximal_mu=0.02),
        TrainSettings(epochs=2, batch_size=8, learning_rate=0.1, momentum=0.9, dp=False,
                       proximal_mu=0.05),
    ],
    ids=["dp-sgd", "sgd"],
)  # fmt: skip
def test_cohort_equals_a_slow_per_client_reference(settings: TrainSettings) -> None:
    """Several batches per epoch, Poisson sampling with empty and uneven batches, noise,
    momentum, FedProx, members of different sizes (two step-count groups) and one without
    data: every member must match the obvious one-client-at-a-time computation."""
    model = _model("mlp")
    base = _members(3, 200)  # 20 samples each -> 3 batches of 8
    small = load_partition("mnist", 5, 800, "iid", seed=42)  # 5 samples -> 1 batch
    members = [*base, _member(small.x, small.y, 99)]
    members.append(_member(base[0].x[:0], base[0].y[:0], 5))
    results = train_cohort(model, members, settings)
    assert len(results) == len(members)
    for member, (result, state) in zip(members[:-1], results[:-1], strict=True):
        expected, steps, loss = _slow_reference(model, member, settings)
        assert result.steps == steps
        assert result.num_examples == len(member.y)
        for key, value in expected.items():
            np.testing.assert_allclose(state[key], value, rtol=1e-4, atol=2e-6)
        if math.isfinite(loss):
            assert result.loss == pytest.approx(loss, rel=1e-4)
    empty_result, empty_state = results[-1]
    assert empty_result.steps == 0 and empty_result.num_examples == 0
    assert _max_diff(empty_state, model) == 0.0


def test_a_members_training_does_not_depend_on_its_cohort() -> None:
    model = _model()
    members = _members(5, 1000)
    settings = TrainSettings(epochs=1, batch_size=32, learning_rate=0.5)
    together = train_cohort(model, members, settings)
    alone = train_cohort(model, members[2:3], settings)
    for key, value in alone[0][1].items():
        np.testing.assert_allclose(together[2][1][key], value, rtol=1e-5, atol=1e-6)


def test_dp_randomness_is_secret_by_default() -> None:
    """Members with the same seed but the default (secure) noise source train differently:
    the seed does not fix DP noise or sampling."""
    model = _model()
    part = load_partition("mnist", 0, 200, "iid", seed=42)
    twins = [CohortMember(part.x, part.y, seed=3), CohortMember(part.x, part.y, seed=3)]
    settings = TrainSettings(epochs=1, batch_size=8, learning_rate=0.5, noise_multiplier=1.0)
    (_, a), (_, b) = train_cohort(model, twins, settings)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) > 1e-3
    (_, c), (_, d) = train_cohort(model, [_member(part.x, part.y, 3)] * 2, settings)
    assert all(np.array_equal(c[k], d[k]) for k in c)  # the test-only switch reproduces


def test_steps_are_what_opacus_runs() -> None:
    """93 batches give Opacus int(1 / (1 / 93)) = 92 steps; the cohort takes and reports the
    same, so the accountant records the steps run."""
    model = _model("mlp")
    x = np.zeros((93, 1, 28, 28), dtype=np.float32)
    y = np.zeros(93, dtype=np.int64)
    settings = TrainSettings(epochs=1, batch_size=1, learning_rate=0.1, noise_multiplier=1.0)
    ((result, _),) = train_cohort(model, [_member(x, y, 1)], settings)
    reference = train(copy.deepcopy(model), x, y, epochs=1, batch_size=1, learning_rate=0.1,
                      dp=True, noise_multiplier=1.0, max_grad_norm=1.0)  # fmt: skip
    assert result.steps == reference.steps == 92
    assert result.sample_rate == reference.sample_rate == 1 / 93


def test_the_global_model_is_left_unchanged() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_cohort(
        model, _members(3, 1000), TrainSettings(epochs=1, batch_size=32, learning_rate=0.5)
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_a_cohort_trained_in_memory_bounded_chunks_gives_each_member_the_same_result() -> None:
    """A budget that holds one member's per-sample gradients at a time: the same models."""
    model = _model()
    settings = TrainSettings(epochs=1, batch_size=8, learning_rate=0.3, dp=True,
                             noise_multiplier=1.0, max_grad_norm=1.0)  # fmt: skip
    numel = sum(p.numel() for p in model.parameters())
    together = train_cohort(model, _members(4, 200), settings)
    chunked = train_cohort(model, _members(4, 200), settings, memory_budget=4 * numel * 16)
    for (r1, s1), (r2, s2) in zip(together, chunked, strict=True):
        assert r1.steps == r2.steps and r1.sample_rate == r2.sample_rate
        for key, value in s1.items():
            np.testing.assert_allclose(s2[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lstm", "resnet", "scatnet"])
def test_the_sequence_and_the_million_parameter_model_train_alike_on_both_paths(
    name: str,
) -> None:
    """Opacus' DPLSTM and the 1.27 M-parameter GroupNorm ResNet: the fast engine's cohort and
    the ClientApp's Opacus DP-SGD (what the Ray engine and devices run) take the same step
    when nothing random is left (q = 1, no noise), and both move the model."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:, None] / 16.0).astype(np.float32)
    y = digits.target
    torch.manual_seed(0)
    model = build_model(name, input_shape=(1, 8, 8), num_classes=10)
    if name == "resnet":
        assert sum(p.numel() for p in model.parameters()) > 1_000_000
    members = [_member(x[i * 12 : (i + 1) * 12], y[i * 12 : (i + 1) * 12], i) for i in range(2)]
    settings = TrainSettings(epochs=2, batch_size=16, learning_rate=0.5, dp=True,
                             noise_multiplier=0.0, max_grad_norm=1.0)  # fmt: skip
    results = train_cohort(model, members, settings, memory_budget=1 << 28)
    for member, (result, state) in zip(members, results, strict=True):
        reference = copy.deepcopy(model)
        expected = train(
            reference, member.x, member.y, epochs=2, batch_size=16, learning_rate=0.5, dp=True,
            noise_multiplier=0.0, max_grad_norm=1.0, seed=1,
        )  # fmt: skip
        assert result.steps == expected.steps == 2
        # every key of the state dict (DPLSTM lists its weights under two names each): what
        # the server's strict load_state_dict needs
        assert set(state) == set(model.state_dict())
        assert _max_diff(state, reference) < 1e-4
        assert _max_diff(state, model) > 1e-3


def test_full_batch_poisson_keeps_every_sample_without_drawing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At sample rate 1 Poisson sampling keeps every sample: the batch is each member's
    whole data, padded, and no sampling generator is made (a rate below 1 still draws)."""
    from pollinate.simulation._cohort_data import make_group, pad, poisson_batch

    sizes = [3, 1, 4]
    members = [
        _member(np.zeros((n, 1, 28, 28), np.float32), np.zeros(n, np.int64), i)
        for i, n in enumerate(sizes)
    ]
    group = make_group(members, [0, 1, 2], steps_per_epoch=1)
    drawn: list[int] = []
    real = NoiseSource.sampling_generator
    monkeypatch.setattr(
        NoiseSource, "sampling_generator", lambda self, step: drawn.append(step) or real(self, step)
    )
    idx, valid = poisson_batch(group, 1.0, step=0)
    want_idx, want_valid = pad([torch.arange(n) for n in sizes])
    assert torch.equal(idx, want_idx) and torch.equal(valid, want_valid) and drawn == []
    poisson_batch(group, 0.5, step=1)
    assert drawn == [1, 1, 1]
