"""A/B/n tests: the always-valid statistics against slow references, the settings, the
sticky split, feedback and the saved state."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from scipy import integrate, optimize, stats
from typer.testing import CliRunner

from pollinate.cli.main import app
from pollinate.errors import ConfigError, DataError
from pollinate.serving.ab_config import ABSettings, ExperimentSettings, VariantSettings
from pollinate.serving.ab_routing import Experiments, bucket
from pollinate.serving.ab_store import read_status
from pollinate.serving.abtest import (
    SequentialTest,
    diff_and_variance,
    halfwidth,
    holm_adjust,
    log_mixture_ratio,
    running_paths,
)
from pollinate.serving.config import load_serve_settings, settings_from_json, settings_to_json
from pollinate.serving.metrics import ServingMetrics
from pollinate.serving.repository import ModelSpec, TensorMeta
from pollinate.serving.versions import ModelNotFoundError

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- references
def _mixture_ratio_by_integration(d: float, v: float, tau: float, theta0: float = 0.0) -> float:
    """Lambda as its definition: the likelihood of d averaged over theta ~ N(theta0, tau^2),
    over its likelihood at theta0 (numerical integration)."""
    null = stats.norm.pdf(d, theta0, math.sqrt(v))

    def integrand(theta: float) -> float:
        return float(stats.norm.pdf(d, theta, math.sqrt(v)) * stats.norm.pdf(theta, theta0, tau))

    lo, hi = theta0 - 12 * tau, theta0 + 12 * tau
    value, _ = integrate.quad(integrand, lo, hi, points=[d], limit=200, epsabs=0, epsrel=1e-10)
    return float(value / null)


@pytest.mark.parametrize(
    ("d", "v", "tau"),
    [(0.0, 1e-4, 0.02), (0.01, 1e-4, 0.02), (-0.03, 5e-5, 0.02), (0.2, 0.01, 0.1), (1.0, 0.5, 1)],
)
def test_the_mixture_ratio_is_the_integral_it_stands_for(d: float, v: float, tau: float) -> None:
    expected = _mixture_ratio_by_integration(d, v, tau)
    assert math.exp(float(log_mixture_ratio(d, v, tau**2))) == pytest.approx(expected, rel=1e-6)
    shifted = _mixture_ratio_by_integration(d, v, tau, theta0=0.01)
    got = math.exp(float(log_mixture_ratio(d, v, tau**2, theta0=0.01)))
    assert got == pytest.approx(shifted, rel=1e-6)


@pytest.mark.parametrize("alpha", [0.05, 0.0125])
def test_the_interval_ends_where_the_ratio_reaches_one_over_alpha(alpha: float) -> None:
    d, v, tau = 0.015, 4e-5, 0.02

    def excess(theta0: float) -> float:
        return math.log(_mixture_ratio_by_integration(d, v, tau, theta0)) + math.log(alpha)

    upper = optimize.brentq(excess, d, d + 0.08, xtol=1e-12)
    lower = optimize.brentq(excess, d - 0.08, d, xtol=1e-12)
    h = float(halfwidth(v, tau**2, alpha))
    assert (d - h, d + h) == (pytest.approx(lower, abs=1e-8), pytest.approx(upper, abs=1e-8))


def _plain_loop(stream: list[tuple[int, float]], tau: float, alpha: float, min_n: int) -> Any:
    """The whole test redone with lists and ``math`` after every observation."""
    values: list[list[float]] = [[], [], []]
    p, lo, hi = [1.0, 1.0], [-math.inf, -math.inf], [math.inf, math.inf]
    for arm, x in stream:
        values[arm].append(x)
        for k in (1, 2):
            a, b = values[0], values[k]
            if min(len(a), len(b)) < min_n:
                continue
            var = statistics.variance(a) / len(a) + statistics.variance(b) / len(b)
            d = statistics.fmean(b) - statistics.fmean(a)
            t2 = tau * tau
            ratio = math.sqrt(var / (var + t2)) * math.exp(t2 * d * d / (2 * var * (var + t2)))
            p[k - 1] = min(p[k - 1], 1.0 / ratio)
            h = math.sqrt(2 * var * (var + t2) / t2 * math.log(math.sqrt((var + t2) / var) / alpha))
            lo[k - 1], hi[k - 1] = max(lo[k - 1], d - h), min(hi[k - 1], d + h)
    return p, lo, hi


def test_the_sequential_test_matches_a_plain_loop_after_every_observation() -> None:
    rng = np.random.default_rng(7)
    arms = rng.choice(3, size=3000, p=[0.4, 0.3, 0.3])
    rates = np.array([0.80, 0.86, 0.79])
    stream = [(int(a), float(rng.random() < rates[a])) for a in arms]
    test = SequentialTest(3, alpha=0.05, mixture_sd=0.03, min_samples=30)
    for arm, x in stream:
        test.observe(arm, x)
    p, lo, hi = _plain_loop(stream, 0.03, 0.05 / 2, 30)
    for k, monitor in enumerate(test.monitors):
        assert monitor.p == pytest.approx(p[k], rel=1e-9, abs=1e-300)
        assert (monitor.lower, monitor.upper) == (pytest.approx(lo[k]), pytest.approx(hi[k]))
    assert [a.n for a in test.arms] == [int((arms == k).sum()) for k in range(3)]


def test_the_array_paths_match_the_one_at_a_time_test() -> None:
    """The benchmark's vectorised paths and the server's incremental test agree."""
    rng = np.random.default_rng(3)
    x0, x1 = rng.normal(1.0, 2.0, 400), rng.normal(1.3, 1.0, 400)
    test = SequentialTest(2, alpha=0.05, mixture_sd=0.2, min_samples=10)
    ps = []
    for a, b in zip(x0, x1, strict=True):
        test.observe(0, float(a))
        test.observe(1, float(b))
        ps.append(test.monitors[0].p)
    # the same looks as arrays: after each observation, alternating control, challenger
    c0, c1 = np.concatenate([[0.0], np.cumsum(x0)]), np.concatenate([[0.0], np.cumsum(x1)])
    q0, q1 = np.concatenate([[0.0], np.cumsum(x0**2)]), np.concatenate([[0.0], np.cumsum(x1**2)])
    n0 = np.repeat(np.arange(1, 401), 2)
    n1 = np.arange(1, 801) // 2
    d, v = diff_and_variance(n0, c0[n0], q0[n0], n1, c1[n1], q1[n1])
    p, lo, hi = running_paths(d, v, np.minimum(n0, n1) >= 10, tau2=0.04, alpha=0.05)
    np.testing.assert_allclose(p[1::2], ps, rtol=1e-9)
    assert (lo[-1], hi[-1]) == (
        pytest.approx(test.monitors[0].lower),
        pytest.approx(test.monitors[0].upper),
    )


def _holm_step_down(p: list[float], alpha: float) -> list[bool]:
    order = sorted(range(len(p)), key=lambda i: p[i])
    rejected = [False] * len(p)
    for rank, i in enumerate(order):
        if p[i] > alpha / (len(p) - rank):
            break
        rejected[i] = True
    return rejected


def test_holm_adjusted_p_values_reject_what_the_step_down_procedure_rejects() -> None:
    np.testing.assert_allclose(holm_adjust([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    rng = np.random.default_rng(0)
    for _ in range(500):
        p = list(rng.random(int(rng.integers(1, 5))) ** 3)
        for alpha in (0.01, 0.05, 0.2):
            assert list(holm_adjust(p) <= alpha) == _holm_step_down(p, alpha), (p, alpha)


def test_aa_tests_watched_after_every_observation_rarely_reject() -> None:
    """Equal arms, looked at after every one of 3000 outcomes each: the always-valid test
    stays under alpha; the fixed-horizon z-test looked at as often does not."""
    rng = np.random.default_rng(11)
    runs, n_max = 300, 3000
    s0 = np.cumsum(rng.random((runs, n_max)) < 0.8, axis=1)
    s1 = np.cumsum(rng.random((runs, n_max)) < 0.8, axis=1)
    n = np.arange(1, n_max + 1)
    d, v = diff_and_variance(n, s0, s0, n, s1, s1)
    p, _, _ = running_paths(d, v, n >= 100, tau2=0.02**2, alpha=0.05)
    always_valid = float((p[:, -1] <= 0.05).mean())
    naive = float((np.abs(d / np.sqrt(v))[:, 99:] >= 1.96).any(axis=1).mean())
    assert always_valid <= 0.05 and naive > 0.2, (always_valid, naive)


def _feed(test: SequentialTest, rates: list[float], n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        for arm, rate in enumerate(rates):
            test.observe(arm, float(rng.random() < rate))


def test_a_large_effect_is_declared_and_equal_arms_end_as_no_difference() -> None:
    test = SequentialTest(3, mixture_sd=0.05, min_samples=50)
    _feed(test, [0.5, 0.7, 0.3], 1000, seed=1)
    report = test.report(["control", "better", "worse"], margin=0.01)
    assert [r.decision for r in report] == ["control", "winner", "loser"]
    assert report[1].ci is not None and report[1].ci[0] > 0 and report[2].ci is not None
    assert report[1].p_value is not None and report[1].p_value <= 0.05
    same = SequentialTest(2, mixture_sd=0.05)
    _feed(same, [0.9, 0.9], 4000, seed=2)
    assert [r.decision for r in same.report(["a", "b"], margin=0.05)][1] == "no difference"
    assert [r.decision for r in same.report(["a", "b"], margin=0.001)][1] == "running"


def test_the_state_survives_json() -> None:
    test = SequentialTest(3, min_samples=20)
    _feed(test, [0.6, 0.7, 0.6], 200, seed=4)
    again = SequentialTest.from_dict(json.loads(json.dumps(test.to_dict())))
    names = ["a", "b", "c"]
    assert again.report(names, 0.01) == test.report(names, 0.01)
    assert SequentialTest(2).to_dict()["monitors"][0]["lower"] is None


# --------------------------------------------------------------------------- settings
AB_TOML = """
[server]
repository = "repo"
[ab]
state-dir = "state"
[ab.exp]
model = "cnn"
variants = [
  { name = "control", version = 3, weight = 0.5 },
  { version = 4, weight = 0.3 },
  { model = "small", weight = 0.2 },
]
"""


def _load(tmp_path: Path, text: str, **overrides: Any) -> Any:
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return load_serve_settings(path, overrides)


def test_an_experiment_is_read_with_its_defaults(tmp_path: Path) -> None:
    settings = _load(tmp_path, AB_TOML)
    (exp,) = settings.ab.experiments
    assert [v.name for v in exp.variants] == ["control", "cnn/4", "small"]
    assert [v.target for v in exp.variants] == ["cnn/3", "cnn/4", "small"]
    assert exp.metric == "accuracy" and exp.alpha == 0.05 and exp.min_samples == 100
    assert settings.ab.state_dir == (tmp_path / "state").resolve()
    assert settings_from_json(settings_to_json(settings)) == settings


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("weight = 0.2 }", "weight = 0.25 }"), r"\[ab.exp\] variants: the weights sum to 1.05"),
        (("weight = 0.2 }", "weight = 0 }"), r"variants\[2\].weight must be > 0"),
        (("weight = 0.2 }", 'weight = "0.2" }'), r"variants\[2\] weight must be a number"),
        (("version = 4,", "version = 4, colour = 1,"), r"variants\[1\] has an unknown key"),
        (("version = 4,", 'name = "control", version = 4,'), r"variants\[1\].name 'control'"),
        (("[ab.exp]", '[ab."bad name"]'), "A/B experiment name 'bad name'"),
        (('model = "cnn"', 'model = "cnn"\nalpha = 1.5'), r"\[ab.exp\] alpha must be in"),
        (('model = "cnn"', 'model = "cnn"\nmetric = "auc"'), "metric must be accuracy or reward"),
        (('model = "cnn"', ""), r"\[ab.exp\] needs `model`"),
        (('state-dir = "state"', "states = 1"), r"\[ab\] has an unknown key 'states'"),
    ],
)
def test_bad_experiments_name_the_field(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, AB_TOML.replace(*change))


def test_five_variants_at_most(tmp_path: Path) -> None:
    six = [VariantSettings(f"v{i}", "cnn", i + 1, 1 / 6) for i in range(6)]
    with pytest.raises(ConfigError, match=r"\[ab.x\] variants: 6 given; .* 2 to 5"):
        ExperimentSettings("x", "cnn", tuple(six))
    assert _load(tmp_path, AB_TOML, workers=2).workers == 2  # the workers share the records


# --------------------------------------------------------------------------- the split
def _experiments(
    tmp_path: Path,
    metric: str = "accuracy",
    metrics: ServingMetrics | None = None,
    memory: int = 100_000,
    **kw: Any,
) -> Experiments:
    variants = (
        VariantSettings("control", "cnn", 3, 0.5),
        VariantSettings("v4", "cnn", 4, 0.3),
        VariantSettings("small", "small", None, 0.2),
    )
    exp = ExperimentSettings("exp", "cnn", variants, metric=metric, min_samples=5, **kw)  # type: ignore[arg-type]
    ab = ABSettings((exp,), state_dir=tmp_path / "state", memory=memory)
    experiments = Experiments(ab, metrics or ServingMetrics())
    spec = ModelSpec("cnn", "onnxruntime_onnx", 8, (TensorMeta("x", "FP32", (-1, 4)),),
                     (TensorMeta("logits", "FP32", (-1, 3)),))  # fmt: skip
    experiments.check(lambda model, version: SimpleNamespace(spec=spec))  # type: ignore[arg-type,return-value]
    return experiments


def test_a_user_keeps_a_variant_and_users_split_by_the_weights(tmp_path: Path) -> None:
    experiments = _experiments(tmp_path)
    first = {u: experiments.route("cnn", f"user-{u}") for u in range(20000)}
    assert all(experiments.route("cnn", f"user-{u}") == first[u] for u in range(0, 20000, 97))
    counts = [sum(a is not None and a.arm == k for a in first.values()) for k in range(3)]
    assert stats.chisquare(counts, [10000, 6000, 4000]).pvalue > 1e-3, counts
    # the name salts the hash: another experiment sorts the same users afresh
    same = sum((bucket("exp", f"u{u}") < 0.5) == (bucket("other", f"u{u}") < 0.5)
               for u in range(2000))  # fmt: skip
    assert 900 < same < 1100
    assert experiments.route("other-model", "user-1") is None
    anonymous = {experiments.route("cnn", None).variant for _ in range(200)}  # type: ignore[union-attr]
    assert anonymous == {"control", "v4", "small"}


def test_a_variant_the_server_does_not_hold_is_a_config_error(tmp_path: Path) -> None:
    def spec(inputs: int) -> ModelSpec:
        return ModelSpec("m", "onnxruntime_onnx", 8, (TensorMeta("x", "FP32", (-1, inputs)),),
                         (TensorMeta("logits", "FP32", (-1, 3)),))  # fmt: skip

    def missing_v4(model: str, version: int | None) -> Any:
        if version == 4:
            raise ModelNotFoundError("model 'cnn' version 4 is not loaded (loaded: 3)")
        return SimpleNamespace(spec=spec(4))

    exp = ExperimentSettings("exp", "cnn", (VariantSettings("a", "cnn", 3, 0.5),
                                            VariantSettings("b", "cnn", 4, 0.5)))  # fmt: skip
    experiments = Experiments(ABSettings((exp,), state_dir=tmp_path), ServingMetrics())
    with pytest.raises(ConfigError, match=r"\[ab.exp\] variants\[1\] \(b, cnn/4\): .*version 4"):
        experiments.check(missing_v4)
    other_inputs = {None: spec(4), 3: spec(4), 4: spec(5)}
    with pytest.raises(ConfigError, match=r"variants\[1\] .* takes other inputs than 'cnn'"):
        experiments.check(lambda model, v: SimpleNamespace(spec=other_inputs[v]))  # type: ignore[arg-type,return-value]


def _counter(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_feedback_scores_the_remembered_answer_once(tmp_path: Path) -> None:
    metrics = ServingMetrics()
    experiments = _experiments(tmp_path, metrics=metrics)
    a = experiments.route("cnn", "alice")
    assert a is not None
    logits = np.array([[0.1, 2.0, 0.3], [5.0, 0.0, 0.0]], dtype=np.float32)
    experiments.answered(a, "r1", {"logits": logits})
    status, reply = experiments.feedback("cnn", b'{"id": "r1", "label": [1, 2]}')
    assert status == 200 and reply["variant"] == a.variant and reply["outcome"] == 0.5
    assert experiments.feedback("cnn", b'{"id": "r1", "label": [1, 0]}')[0] == 409
    status, reply = experiments.feedback("cnn", b'{"id": "nope", "label": 1}')
    assert status == 404 and "remembers no answer with id 'nope'" in reply["error"]
    assert experiments.feedback("cnn", b'{"id": "r1", "reward": 1}')[0] == 400
    assert experiments.feedback("cnn", b'{"id": "r1", "label": 1}')[0] == 409
    experiments.answered(a, "r2", {"logits": logits})
    status, reply = experiments.feedback("cnn", b'{"id": "r2", "label": 1}')
    assert status == 400 and "a list of 2" in reply["error"]
    assert experiments.feedback("small", b'{"id": "r2", "label": [1, 0]}')[0] == 404
    assert _counter(metrics.registry, "pollinate_serving_ab_feedback_rejected_total",
                    model="cnn", reason="unknown_id") == 1  # fmt: skip
    assert _counter(metrics.registry, "pollinate_serving_ab_feedback_total",
                    experiment="exp", variant=a.variant) == 1  # fmt: skip


def test_the_memory_is_bounded(tmp_path: Path) -> None:
    experiments = _experiments(tmp_path, memory=3)
    a = experiments.route("cnn", "bob")
    assert a is not None
    for i in range(5):
        experiments.answered(a, f"r{i}", {"logits": np.zeros((1, 3), np.float32)})
    assert experiments.feedback("cnn", b'{"id": "r1", "label": 0}')[0] == 404
    assert experiments.feedback("cnn", b'{"id": "r2", "label": 0}')[0] == 200


def test_the_counts_survive_a_restart_and_ab_status_shows_them(tmp_path: Path) -> None:
    async def serve_some() -> None:
        experiments = _experiments(tmp_path, metric="reward")
        experiments.start()
        for i in range(30):
            a = experiments.route("cnn", f"u{i}")
            assert a is not None
            experiments.answered(a, f"r{i}", {"logits": np.zeros((1, 3), np.float32)})
            assert (
                experiments.feedback("cnn", f'{{"id": "r{i}", "reward": {i}}}'.encode())[0] == 200
            )
        await experiments.close()

    asyncio.run(serve_some())
    (status,) = read_status(tmp_path / "state")
    assert sum(r.n for r in status.reports) == 30 and status.metric == "reward"
    again = _experiments(tmp_path, metric="reward")
    assert sum(a.n for a in again._by_model["cnn"].test.arms) == 30
    with pytest.raises(ConfigError, match="rename the experiment to start a new one"):
        _experiments(tmp_path, metric="reward", alpha=0.01)
    result = CliRunner().invoke(
        app, ["serve", "ab", "status", "--state-dir", str(tmp_path / "state")]
    )
    assert result.exit_code == 0, result.output
    assert "A/B experiment exp on cnn" in result.output and "control" in result.output
    result = CliRunner().invoke(
        app, ["serve", "ab", "status", "--state-dir", str(tmp_path / "state"), "--json"]
    )
    reports = json.loads(result.output)[0]["reports"]
    assert [r["n"] for r in reports] == [a.n for a in again._by_model["cnn"].test.arms]


def test_two_workers_share_the_answers_and_the_outcomes_in_one_order(tmp_path: Path) -> None:
    """Two Experiments on one state dir, as two `--workers` processes hold them: feedback
    reaches either, an answer takes one outcome whichever worker gets it, and both tests (and
    `ab status`, before any save) count every outcome in the store's order."""
    first, second = _experiments(tmp_path, metric="reward"), _experiments(tmp_path, metric="reward")
    logits = {"logits": np.zeros((1, 3), np.float32)}
    for i in range(40):
        answering, told = (first, second) if i % 2 else (second, first)
        a = answering.route("cnn", f"u{i}")
        assert a is not None
        answering.answered(a, f"r{i}", logits)
        status, reply = told.feedback("cnn", f'{{"id": "r{i}", "reward": {i % 7}}}'.encode())
        assert status == 200 and reply["variant"] == a.variant, reply
        assert answering.feedback("cnn", f'{{"id": "r{i}", "reward": 1}}'.encode())[0] == 409
    assert second.feedback("cnn", b'{"id": "never", "reward": 1}')[0] == 404
    for exp in (first, second):
        held = exp._by_model["cnn"]
        assert held.store is not None
        held.catch_up(held.store.outcomes(held.seq))
    one, two = (e._by_model["cnn"].test.to_dict() for e in (first, second))
    assert one == two and sum(arm["n"] for arm in one["arms"]) == 40

    async def save() -> None:  # the first worker saves; the second goes on alone
        first.start()
        await first.close()

    asyncio.run(save())
    a = second.route("cnn", "late")
    assert a is not None
    second.answered(a, "late", logits)
    assert second.feedback("cnn", b'{"id": "late", "reward": 3}')[0] == 200
    (status,) = read_status(tmp_path / "state")  # the saved 40 and the one after
    assert sum(r.n for r in status.reports) == 41


def test_a_state_file_ahead_of_its_outcome_store_is_refused(tmp_path: Path) -> None:
    experiments = _experiments(tmp_path, metric="reward")
    a = experiments.route("cnn", "u")
    assert a is not None
    experiments.answered(a, "r", {"logits": np.zeros((1, 3), np.float32)})
    assert experiments.feedback("cnn", b'{"id": "r", "reward": 1}')[0] == 200
    asyncio.run(_start_and_close(experiments))
    (tmp_path / "state" / "exp.sqlite").unlink()
    with pytest.raises(DataError, match=r"counts outcomes up to number 1, but .* holds fewer"):
        _experiments(tmp_path, metric="reward")


async def _start_and_close(experiments: Experiments) -> None:
    experiments.start()
    await experiments.close()
