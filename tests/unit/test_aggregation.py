"""Aggregation through pollinate's strategy chain, checked against plain numpy references."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.config import RunSettings, SampleDP
from pollinate.serverapp.nodes import SampledGrid
from pollinate.serverapp.strategy import build_strategy, load_strategy_state, strategy_state
from tests.support.messages import NodeListGrid, reply_from, set_identity

SHAPES = {"w": (4, 3), "b": (3,)}


def _updates(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))


def _run_round(
    settings_: RunSettings,
    global_arrays: dict[str, np.ndarray],
    updates: list[dict[str, np.ndarray]],
    weights: list[int],
    strategy: Any = None,
    server_round: int = 1,
) -> tuple[dict[str, np.ndarray], Any]:
    set_identity()
    strategy = strategy or build_strategy(settings_, population=len(updates))
    grid = SampledGrid(
        cast(Any, NodeListGrid(list(range(10, 10 + len(updates))))), range(10, 10 + len(updates))
    )
    list(strategy.configure_train(server_round, _record(global_arrays), ConfigRecord(), grid))
    replies: list[Message] = [
        reply_from(10 + i, u, {"num-examples": w, "client-weight": 1})
        for i, (u, w) in enumerate(zip(updates, weights, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None
    return {k: a.numpy() for k, a in arrays.items()}, strategy


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    weights=st.lists(st.integers(1, 500), min_size=8, max_size=8),
)
def test_fedavg_is_the_example_weighted_mean(n: int, seed: int, weights: list[int]) -> None:
    rng = np.random.default_rng(seed)
    updates = _updates(rng, n)
    got, _ = _run_round(RunSettings(dp=SampleDP.NONE), _updates(rng, 1)[0], updates, weights[:n])
    w = np.array(weights[:n], dtype=np.float64)
    for key in SHAPES:
        stacked = np.stack([u[key].astype(np.float64) for u in updates])
        expected = np.tensordot(w / w.sum(), stacked, axes=1)
        np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-6)


def test_under_dp_sgd_replies_weigh_equally() -> None:
    """A DP reply carries no exact sample count: FedAvg takes the plain mean of the updates,
    whatever count a reply might claim."""
    rng = np.random.default_rng(3)
    updates = _updates(rng, 3)
    got, _ = _run_round(RunSettings(), _updates(rng, 1)[0], updates, [1, 50, 400])
    for key in SHAPES:
        expected = np.mean([u[key].astype(np.float64) for u in updates], axis=0)
        np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-6)


def test_trimmed_mean_matches_a_sorted_reference() -> None:
    rng = np.random.default_rng(1)
    updates = _updates(rng, 10)
    updates[3] = {k: v + 1000.0 for k, v in updates[3].items()}  # an attacker
    got, _ = _run_round(
        RunSettings(robust="trimmed-mean", trim_beta=0.2),  # type: ignore[arg-type]
        _updates(rng, 1)[0],
        updates,
        [1] * 10,
    )
    for key in SHAPES:
        stacked = np.sort(np.stack([u[key] for u in updates]).astype(np.float64), axis=0)
        cut = int(0.2 * 10)
        expected = stacked[cut : 10 - cut].mean(axis=0)
        np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-6)
        assert np.abs(got[key]).max() < 10  # the outlier did not leak in


def test_krum_picks_the_update_closest_to_its_neighbours() -> None:
    rng = np.random.default_rng(2)
    base = _updates(rng, 1)[0]
    updates = [
        {k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
        for _ in range(6)
    ]
    updates.append({k: v + 50.0 for k, v in base.items()})
    f = 1
    got, _ = _run_round(RunSettings(robust="krum", num_malicious=f), base, updates, [1] * 7)  # type: ignore[arg-type]
    flat = [np.concatenate([u[k].ravel() for k in SHAPES]).astype(np.float64) for u in updates]
    scores = []
    for i, fi in enumerate(flat):
        d = sorted(float(np.sum((fi - fj) ** 2)) for j, fj in enumerate(flat) if j != i)
        scores.append(sum(d[: len(flat) - f - 2]))
    best = updates[int(np.argmin(scores))]
    for key in SHAPES:
        np.testing.assert_allclose(got[key], best[key], rtol=1e-6)


def test_fedadam_follows_the_adam_rule_and_resumes_from_saved_moments() -> None:
    rng = np.random.default_rng(3)
    s = RunSettings(strategy="fedadam", server_learning_rate=0.1)  # type: ignore[arg-type]
    current = _updates(rng, 1)[0]
    rounds = [_updates(rng, 3) for _ in range(3)]
    # Reference: Flower's FedAdam rule written out in numpy.
    m = {k: np.zeros(sh) for k, sh in SHAPES.items()}
    v = {k: np.zeros(sh) for k, sh in SHAPES.items()}
    ref = {k: x.astype(np.float64) for k, x in current.items()}
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    for t, updates in enumerate(rounds, start=1):
        for k in SHAPES:
            avg = np.mean([u[k].astype(np.float64) for u in updates], axis=0)
            delta = avg - ref[k]
            m[k] = b1 * m[k] + (1 - b1) * delta
            v[k] = b2 * v[k] + (1 - b2) * delta**2
            # Flower's bias correction uses server_round + 1.
            eta_t = eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
            ref[k] = ref[k] + eta_t * m[k] / (np.sqrt(v[k]) + tau)
    # Rounds 1-2 in one strategy, then a fresh strategy restored from the saved moments.
    arrays, strategy = _run_round(s, current, rounds[0], [1, 1, 1], server_round=1)
    arrays, strategy = _run_round(
        s, arrays, rounds[1], [1, 1, 1], strategy=strategy, server_round=2
    )
    saved = strategy_state(strategy)
    assert any("m_t" in k for k in saved) and any("v_t" in k for k in saved)
    fresh = build_strategy(s, population=3)
    load_strategy_state(fresh, saved)
    arrays, _ = _run_round(s, arrays, rounds[2], [1, 1, 1], strategy=fresh, server_round=3)
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k], ref[k], rtol=1e-4, atol=1e-5)


def test_server_side_client_dp_is_the_clipped_sum_plus_noise_over_the_cohort() -> None:
    """The aggregate is current + (sum of clipped updates + noise) / cohort, against numpy:
    the noise is what is left after subtracting the clipped mean, and its std is z * clip / m.
    """
    rng = np.random.default_rng(4)
    s = RunSettings.from_run_config(
        {
            "dp": "none",
            "client-dp": "server-fixed",
            "client-dp-noise": 1.0,
            "client-dp-clip": 0.5,
            "fraction-train": 1.0,
        }
    )
    current = {k: rng.normal(size=sh).astype(np.float32) for k, sh in SHAPES.items()}
    updates = [{k: current[k] + v for k, v in u.items()} for u in _updates(rng, 4)]
    got, strategy = _run_round(s, current, updates, [1] * 4)
    clipped = np.zeros(sum(int(np.prod(sh)) for sh in SHAPES.values()))
    for u in updates:
        flat = np.concatenate([(u[k] - current[k]).astype(np.float64).ravel() for k in SHAPES])
        clipped += flat * min(1.0, 0.5 / np.linalg.norm(flat))
    flat_got = np.concatenate([(got[k] - current[k]).astype(np.float64).ravel() for k in SHAPES])
    noise = flat_got - clipped / 4
    assert 0.3 * 0.5 / 4 < float(np.std(noise)) < 2.0 * 0.5 / 4
    from pollinate.serverapp.strategy import dp_wrapper

    wrapper = dp_wrapper(strategy)
    assert wrapper is not None and wrapper.released_round == 1
    assert wrapper.last_clip == 0.5


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 8 * 15 * 2])  # one matrix; 2 rows a chunk
def test_clipped_sum_equals_a_per_reply_loop(
    chunk_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client-level clipped sum (matrices of flat updates, bounded in memory) against a
    loop over replies and tensors: each update scaled to norm at most the clip, those within
    it counted."""
    from pollinate.serverapp import client_dp
    from pollinate.serverapp.client_dp import _clipped_sum

    monkeypatch.setattr(client_dp, "_SUM_CHUNK_BYTES", chunk_bytes)

    rng = np.random.default_rng(11)
    current = {k: rng.normal(size=sh).astype(np.float32) for k, sh in SHAPES.items()}
    deltas = [{k: v * scale for k, v in u.items()} for u, scale in
              zip(_updates(rng, 5), (0.01, 3.0, 0.0, 0.2, 10.0), strict=True)]  # fmt: skip
    replies = [reply_from(10 + i, {k: current[k] + d[k] for k in SHAPES}, {"client-weight": 1})
               for i, d in enumerate(deltas)]  # fmt: skip
    keys = list(SHAPES)
    base = [current[k].astype(np.float64) for k in keys]
    total, within = _clipped_sum(replies, keys, base, 0.5)
    want = {k: np.zeros(SHAPES[k]) for k in keys}
    inside = 0
    for reply in replies:
        record = reply.content.array_records["arrays"]
        update = {k: record[k].numpy().astype(np.float64) - current[k] for k in keys}
        norm = math.sqrt(sum(float(np.sum(u * u)) for u in update.values()))
        inside += norm <= 0.5
        for k in keys:
            want[k] += update[k] * (min(1.0, 0.5 / norm) if norm > 0 else 1.0)
    assert within == inside == 3  # 0.01x, 0x and 0.2x a unit-normal update are within 0.5
    for k, got in zip(keys, total, strict=True):
        np.testing.assert_allclose(got, want[k], rtol=1e-12, atol=1e-12)


def test_weighted_metrics_equal_flowers_aggregate_metricrecords() -> None:
    """The strategies' metric averaging gives what Flower's own would, lists included."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    from pollinate.serverapp.averaging import weighted_metrics

    rng = np.random.default_rng(3)
    records = [
        RecordDict({"metrics": MetricRecord({
            "num-examples": int(rng.integers(1, 50)), "loss": float(rng.random()),
            "accuracy": float(rng.random()), "curve": [float(v) for v in rng.random(3)],
            "steps": int(rng.integers(1, 9)),
        })})
        for _ in range(7)
    ]  # fmt: skip
    ours, flowers = (
        weighted_metrics(records, "num-examples"),
        aggregate_metricrecords(records, "num-examples"),
    )
    assert set(ours) == set(flowers) == {"loss", "accuracy", "curve", "steps"}
    for key, value in flowers.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-12)
    s = RunSettings.from_run_config({"dp": "none"})
    strategy = build_strategy(s, population=3)
    assert getattr(strategy, "train_metrics_aggr_fn", None) is weighted_metrics


def _flower_strategy(name: str) -> Any:
    """Flower's own strategy of that name, configured as build_strategy configures ours."""
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

    common = {"weighted_by_key": "num-examples"}
    return {
        "fedavg": lambda: FedAvg(**common),
        "fedavgm": lambda: FedAvgM(server_learning_rate=1.0, server_momentum=0.9, **common),
        "fedprox": lambda: FedProx(proximal_mu=0.1, **common),
        "fedadam": lambda: FedAdam(eta=0.1, **common),
        "fedyogi": lambda: FedYogi(eta=0.1, **common),
    }[name]()


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi"])
def test_each_strategy_aggregates_as_flowers_own_over_rounds(name: str) -> None:
    """The flat mean under Flower's update rules gives what Flower's own class gives, round
    after round (momentum and Adam moments carry over)."""
    from pollinate.serverapp import averaging

    ours_cls = {
        "fedavg": averaging.FlatMean, "fedavgm": averaging.FlatMeanFedAvgM,
        "fedprox": averaging.FlatMeanFedProx, "fedadam": averaging.FlatMeanFedAdam,
        "fedyogi": averaging.FlatMeanFedYogi,
    }[name]  # fmt: skip
    flowers = _flower_strategy(name)
    ours = ours_cls(**{k: getattr(flowers, k) for k in _init_args(flowers)})
    assert isinstance(ours, type(flowers))
    rng = np.random.default_rng(11)
    current = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    for rnd in (1, 2, 3):
        updates = [{k: current[k] + d[k] for k in SHAPES} for d in _updates(rng, 6)]
        weights = [int(w) for w in rng.integers(1, 40, 6)]
        got, _ = _run_round(RunSettings(), current, updates, weights, ours, rnd)
        want, _ = _run_round(RunSettings(), current, updates, weights, flowers, rnd)
        for k in SHAPES:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        current = want


def _init_args(strategy: Any) -> list[str]:
    import inspect

    return [
        p for p in inspect.signature(type(strategy).__init__).parameters
        if p != "self" and hasattr(strategy, p)
    ]  # fmt: skip


def test_weighted_arrays_equal_flowers_mean_in_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float arrays keep their dtype, integer ones become float64 (as in Flower); summing in
    blocks of a few replies gives the mean of summing all at once."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from pollinate.serverapp import averaging

    rng = np.random.default_rng(5)
    contents = [
        RecordDict({
            "arrays": ArrayRecord(OrderedDict([
                ("w", Array(rng.normal(size=(5, 4)).astype(np.float32))),
                ("d", Array(rng.normal(size=(3,)))),
                ("n", Array(np.array([int(rng.integers(0, 9))], dtype=np.int64))),
            ])),
            "metrics": MetricRecord({"num-examples": int(rng.integers(1, 30))}),
        })
        for _ in range(9)
    ]  # fmt: skip
    want = aggregate_arrayrecords(contents, "num-examples")
    whole = averaging.weighted_arrays(contents, "num-examples")
    monkeypatch.setattr(averaging, "_STACK_BYTES", 5 * 4 * 4 * 2)  # two replies of "w"
    blocks = averaging.weighted_arrays(contents, "num-examples")
    for k in ("w", "d", "n"):
        assert whole[k].numpy().dtype == blocks[k].numpy().dtype == want[k].numpy().dtype
        np.testing.assert_allclose(whole[k].numpy(), want[k].numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(blocks[k].numpy(), whole[k].numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "spoil",
    ["two array records", "other array keys", "other metric keys", "no weight", "no arrays"],
)
def test_inconsistent_replies_are_refused_as_flower_refuses_them(spoil: str) -> None:
    from flwr.app import MetricRecord
    from flwr.serverapp.exception import InconsistentMessageReplies
    from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

    from pollinate.serverapp.averaging import check_replies

    rng = np.random.default_rng(2)
    replies = [reply_from(10 + i, u, {"num-examples": 3}) for i, u in enumerate(_updates(rng, 3))]
    last = replies[-1].content
    if spoil == "two array records":
        last["more"] = ArrayRecord(OrderedDict([("w", Array(np.zeros(2)))]))
    elif spoil == "other array keys":
        last["arrays"] = ArrayRecord(OrderedDict([("w", Array(np.zeros(2)))]))
    elif spoil == "other metric keys":
        last["metrics"] = MetricRecord({"num-examples": 3, "loss": 1.0})
    elif spoil == "no weight":
        for r in replies:
            r.content["metrics"] = MetricRecord({"steps": 3})
    else:
        del last["arrays"]
    contents = [r.content for r in replies]
    with pytest.raises(InconsistentMessageReplies):
        validate_message_reply_consistency(contents, "num-examples", check_arrayrecord=True)
    with pytest.raises(InconsistentMessageReplies):
        check_replies(contents, "num-examples")
