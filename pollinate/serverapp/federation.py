"""The round loop of the ServerApp.

Per round: sample clients by identity -> the strategy configures training -> replies are
split into failed / declined / rejected / accepted -> the privacy ledger records every
client's cumulative epsilon -> the strategy aggregates the accepted updates (sorted by client,
so the sum order is fixed) -> central evaluation -> optional federated evaluation ->
checkpoint. Flower's strategy objects do the configuring and aggregating; this module owns
sampling, validation, accounting and persistence.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy

from pollinate.clientapp.training import dp_plan, seed_for
from pollinate.clientapp.training import evaluate as evaluate_model
from pollinate.config import ClientDP, RunSettings, SampleDP
from pollinate.data import DatasetSplit, load_dataset
from pollinate.errors import ConfigError, PollinateError
from pollinate.log import logger
from pollinate.models import build_model
from pollinate.privacy import PrivacyLedger
from pollinate.privacy.noise import NOT_PRIVATE
from pollinate.serverapp import events
from pollinate.rundir.checkpoint import (
    Checkpoint,
    atomic_write_json,
    latest_checkpoint,
    save_checkpoint,
)
from pollinate.serverapp.delivery import deliver_bundle, delivers_to_devices
from pollinate.serverapp.nodes import NodeDirectory, SampledGrid, reply_node
from pollinate.rundir.report import RoundRecord, write_report
from pollinate.serverapp.secagg import secure_round
from pollinate.serverapp.strategy import (
    UNIFORM_WEIGHT_KEY,
    build_strategy,
    client_noise,
    dp_wrapper,
    load_strategy_state,
    strategy_state,
    weight_key_for,
)
from pollinate.serverapp.validation import validate_update

__all__ = ["RunResult", "run_federation"]

# Settings that must not change when a run is resumed (the result would not be the same run).
_FIXED_ON_RESUME = (
    "seed", "model", "dataset", "partitioner", "strategy", "dp", "client-dp", "noise-multiplier",
    "max-grad-norm", "target-delta", "fraction-train", "batch-size", "local-epochs",
    "dirichlet-alpha", "shards-per-client", "samples-per-client", "test-fraction",
    "reproducible-noise", "local-eval-fraction", "eval-noise-multiplier",
)  # fmt: skip


@dataclass(frozen=True)
class RunResult:
    """What a finished run returns to its caller."""

    run_dir: Path
    history: list[RoundRecord]
    privacy: dict[str, Any]
    model: dict[str, np.ndarray]


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def _from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(a.numpy()) for k, a in record.items()}


def _central_eval(
    model: torch.nn.Module, arrays: dict[str, np.ndarray], data: DatasetSplit
) -> tuple[float, float]:
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    result = evaluate_model(model, data.test.x, data.test.y)
    return result.accuracy, result.loss


def resolve_noise(settings: RunSettings, data: DatasetSplit, population: int) -> float:
    """The DP-SGD noise multiplier: as given, or calibrated to ``target-epsilon``.

    Calibration is for the worst client: the noise is the largest any partition size needs
    (its sample rate and steps) to stay within the target over ``participation-bound`` rounds
    (every round by default). The target is also each client's budget, so a client that would
    go past it declines instead.
    """
    if settings.dp != SampleDP.DPSGD or settings.target_epsilon == 0:
        return settings.noise_multiplier
    from pollinate.privacy import noise_multiplier_for_budget

    rounds = settings.local_epochs * settings.max_participations()
    plans = {dp_plan(n, settings.batch_size) for n in _train_sizes(settings, data, population)}
    return max(
        noise_multiplier_for_budget(
            target_epsilon=settings.target_epsilon,
            delta=settings.target_delta,
            sample_rate=rate,
            steps=per_epoch * rounds,
        )
        for rate, per_epoch in sorted(plans)
    )


def _train_sizes(settings: RunSettings, data: DatasetSplit, population: int) -> list[int]:
    """How many samples each client trains on (after its held-out split), as far as the server
    can know: the partitions of its own data set, or the average where they cannot be made."""
    from pollinate.data import partition_indices

    try:
        sizes = [
            len(p)
            for p in partition_indices(
                data.train.y, population, settings.partitioner, seed=settings.seed,
                alpha=settings.dirichlet_alpha, shards_per_partition=settings.shards_per_client,
                samples_per_partition=settings.samples_per_client,
            )
        ]  # fmt: skip
    except (PollinateError, ValueError):
        sizes = [max(1, len(data.train) // population)]
    fraction = local_eval_fraction(settings)
    return [n - (math.floor(n * fraction) if n >= 2 else 0) for n in sizes]


def local_eval_fraction(settings: RunSettings) -> float:
    """The share of each client's data held out for federated evaluation (0 without it)."""
    return settings.local_eval_fraction if settings.fraction_evaluate > 0 else 0.0


def client_config(
    settings: RunSettings, data: DatasetSplit, *, population: int, noise: float, run_dir: Path
) -> ConfigRecord:
    """Everything a ClientApp needs, sent with every train/evaluate message."""
    budget = settings.epsilon_budget
    if budget == 0 and settings.target_epsilon > 0:
        budget = settings.target_epsilon
    return ConfigRecord(
        {
            "model": settings.model,
            "input-shape": [int(d) for d in data.input_shape],
            "num-classes": int(data.num_classes),
            "dataset": settings.dataset,
            "test-fraction": settings.test_fraction,
            "partitioner": settings.partitioner,
            "num-partitions": population,
            "dirichlet-alpha": settings.dirichlet_alpha,
            "shards-per-client": settings.shards_per_client,
            "samples-per-client": settings.samples_per_client,
            "seed": settings.seed,
            "local-epochs": settings.local_epochs,
            "batch-size": settings.batch_size,
            "learning-rate": settings.learning_rate,
            "momentum": settings.momentum,
            "dp": settings.dp.value,
            "noise-multiplier": noise,
            "max-grad-norm": settings.max_grad_norm,
            "target-delta": settings.target_delta,
            "epsilon-budget": budget,
            "client-state-dir": str(run_dir / "clients"),
            "local-eval-fraction": local_eval_fraction(settings),
            "eval-noise-multiplier": settings.eval_noise_multiplier,
            "reproducible-noise": settings.reproducible_noise,
        }
    )


class _Round:
    """Counters of one round."""

    def __init__(self) -> None:
        self.sampled = 0
        self.replied = 0
        self.declined = 0
        self.rejected = 0
        self.failed = 0
        self.refused = 0


def run_federation(grid: Grid, settings: RunSettings, *, threads: int = 1) -> RunResult:
    """Run (or resume) the federation described by ``settings`` on ``grid``.

    ``threads``: torch threads for the server's own work (central evaluation). One where
    clients run beside the server on the same cores; more for the in-process engine.
    """
    torch.set_num_threads(max(1, threads))
    run_dir = Path(settings.run_dir or f"runs/run-{int(time.time())}").resolve()
    data = load_dataset(settings.dataset, test_fraction=settings.test_fraction, seed=settings.seed)
    torch.manual_seed(settings.seed)
    model = build_model(settings.model, input_shape=data.input_shape, num_classes=data.num_classes)
    arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    # the server's copy only evaluates: channels-last is 1.1-3x faster for the CNNs here
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    if settings.secure_aggregation and getattr(grid, "static_population", False):
        raise ConfigError(
            "secure-aggregation needs the ClientApp on every node, which the fast engine "
            "bypasses; run it on a federation (`pollinate server run`) or with "
            "`pollinate simulate --engine ray`"
        )
    directory = NodeDirectory(grid, timeout=settings.round_timeout)
    directory.wait_for(max(settings.min_train_nodes, settings.min_available_nodes))
    directory.settle()
    directory.refresh()
    population = len(directory)
    strategy = build_strategy(settings, population=population)
    noise = resolve_noise(settings, data, population)
    ledger = PrivacyLedger(
        delta=settings.target_delta,
        sample_level=settings.dp == SampleDP.DPSGD,
        client_level=settings.client_dp != ClientDP.NONE,
        reproducible_noise=settings.reproducible_noise,
    )
    if settings.reproducible_noise:
        logger.warning("reproducible-noise is on: %s", NOT_PRIVATE)
    history: list[RoundRecord] = []
    first_round = 1
    ckpt = latest_checkpoint(run_dir) if settings.resume and run_dir.exists() else None
    if ckpt is not None:
        _check_resume(run_dir, settings)
        first_round = ckpt.server_round + 1
        arrays = ckpt.model
        load_strategy_state(strategy, ckpt.strategy)
        history = [RoundRecord.from_dict(r) for r in ckpt.state.get("history", [])]
        ledger = PrivacyLedger.from_dict(ckpt.state["ledger"])
        ledger.truncate_after(ckpt.server_round)
        wrapper = dp_wrapper(strategy)
        acc_state = ckpt.state.get("client_level_accountant")
        if wrapper is not None and wrapper.accountant is not None and acc_state:
            wrapper.accountant.load_state_dict(acc_state)
        logger.info("resuming %s after round %d", run_dir, ckpt.server_round)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            run_dir / "run.json",
            {
                "settings": settings.to_run_config(),
                "population": population,
                "noise": noise,
                "client_noise": (
                    client_noise(settings, population=population)
                    if settings.client_dp != ClientDP.NONE
                    else None
                ),
            },
        )
        accuracy, loss = _central_eval(model, arrays, data)
        history.append(RoundRecord(server_round=0, accuracy=accuracy, loss=loss))
        logger.info("initial model: accuracy %.4f, loss %.4f", accuracy, loss)

    events.emit_start(first_round, settings.num_server_rounds)
    cfg = client_config(settings, data, population=population, noise=noise, run_dir=run_dir)
    sample_size = settings.sample_size(population)
    bound = update_bound(settings, arrays, mean_samples=len(data.train) / population, noise=noise)
    secagg_weight = settings.secagg_max_weight or (
        1.0
        if weight_key_for(settings) == UNIFORM_WEIGHT_KEY
        else max(1.0, 4.0 * len(data.train) / population)
    )
    logger.info("updates moving the model by more than %.4g (L2) are rejected", bound)
    for rnd in range(first_round, settings.num_server_rounds + 1):
        started = time.monotonic()
        # Flower's DP wrappers and sampling use the global generators: seed them per round.
        random.seed(seed_for(settings.seed, rnd, 11))
        np.random.seed(seed_for(settings.seed, rnd, 12) % 2**32)
        directory.refresh()
        counts = _Round()
        chosen = directory.sample(
            sample_size, np.random.default_rng(seed_for(settings.seed, rnd, 13))
        )
        counts.sampled = len(chosen)
        try:
            messages = list(
                strategy.configure_train(
                    rnd, _to_record(arrays), ConfigRecord(dict(cfg)), SampledGrid(grid, chosen)
                )
            )
        except PrivacyBudgetExhausted as err:
            logger.warning("stopping before round %d: client-level budget spent (%s)", rnd, err)
            break
        if settings.secure_aggregation:
            replies = secure_round(grid, messages, rnd, settings, max_weight=secagg_weight)
        else:
            replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
        accepted = _triage(
            replies, messages, directory, arrays, settings, ledger, rnd, counts, bound
        )
        if len(replies) < len(messages):  # no reply within round-timeout: late or gone
            counts.failed += len(messages) - len(replies)
            logger.warning(
                "round %d: %d sampled client(s) did not reply within %.0f s; the round goes on "
                "with the %d that did", rnd, len(messages) - len(replies),
                settings.round_timeout, len(replies),
            )  # fmt: skip
        train_metrics: dict[str, float] = {}
        if accepted and len(accepted) < settings.min_replies:
            logger.warning(
                "round %d: %d acceptable update(s), fewer than min-replies=%d; the global model "
                "is unchanged", rnd, len(accepted), settings.min_replies,
            )  # fmt: skip
        elif accepted:
            accepted.sort(key=lambda m: directory.key_of(m.metadata.src_node_id))
            new_arrays, agg_metrics = strategy.aggregate_train(rnd, accepted)
            if new_arrays is not None:
                candidate = _from_record(new_arrays)
                if all(np.all(np.isfinite(v)) for v in candidate.values()):
                    arrays = {k: candidate[k].astype(arrays[k].dtype) for k in arrays}
                else:
                    logger.error(
                        "round %d: aggregate is not finite; keeping the previous model", rnd
                    )
            if agg_metrics is not None:
                train_metrics = {
                    k: float(v) for k, v in agg_metrics.items() if isinstance(v, int | float)
                }
        else:
            logger.warning("round %d: no acceptable update; the global model is unchanged", rnd)
        client_eps = _client_level(strategy, ledger, settings, rnd, sample_size, population)
        accuracy, loss = _central_eval(model, arrays, data)
        fed = _federated_eval(strategy, grid, directory, settings, arrays, cfg, rnd, ledger)
        summary = ledger.summary()
        sample_level = summary.get("sample_level", {})
        assert isinstance(sample_level, dict)
        record = RoundRecord(
            server_round=rnd,
            accuracy=accuracy,
            loss=loss,
            sampled=counts.sampled,
            replied=counts.replied,
            declined=counts.declined,
            rejected=counts.rejected,
            failed=counts.failed,
            refused=counts.refused,
            train_loss=train_metrics.get("train-loss"),
            train_accuracy=train_metrics.get("train-accuracy"),
            federated_accuracy=fed,
            max_epsilon=sample_level.get("max_epsilon") if ledger_enabled(sample_level) else None,
            median_epsilon=sample_level.get("median_epsilon")
            if ledger_enabled(sample_level)
            else None,
            client_level_epsilon=client_eps,
            seconds=time.monotonic() - started,
        )
        history.append(record)
        _persist(run_dir, settings, rnd, arrays, strategy, history, ledger, directory)
        logger.info(
            "round %d: accuracy %.4f loss %.4f | sampled %d replied %d declined %d rejected %d "
            "failed %d | %.1f s",
            rnd, accuracy, loss, counts.sampled, counts.replied, counts.declined,
            counts.rejected, counts.failed, record.seconds or 0.0,
        )  # fmt: skip
        events.emit_round(record)

    privacy = ledger.summary()
    atomic_write_json(run_dir / "privacy.json", {"summary": privacy, "ledger": ledger.to_dict()})
    write_report(run_dir, history, privacy=privacy, settings=settings.to_run_config())
    bundle_dir = settings.bundle_dir(run_dir)
    if bundle_dir is not None:
        archive = _export_at_end(run_dir, bundle_dir, settings)
        if archive is not None and settings.deliver_bundle and delivers_to_devices(grid):
            deliver_bundle(grid, directory, archive, run_dir, timeout=settings.round_timeout)
    return RunResult(run_dir=run_dir, history=history, privacy=privacy, model=arrays)


def update_bound(
    settings: RunSettings, arrays: dict[str, np.ndarray], *, mean_samples: float, noise: float
) -> float:
    """The L2 bound above which an update is rejected as malformed.

    ``max-update-norm`` when set. Otherwise 100, plus with DP-SGD five times the norm that
    the DP noise alone gives an honest update of an average client (noise std
    ``lr * sigma * C / B`` per coordinate and step, a random walk over its local steps,
    amplified by momentum): honest noisy updates pass, NaN, scaled or broken ones do not.
    """
    if settings.max_update_norm > 0:
        return settings.max_update_norm
    bound = 100.0
    if settings.dp == SampleDP.DPSGD:
        dims = sum(int(v.size) for v in arrays.values())
        batch = max(1.0, min(float(settings.batch_size), mean_samples))
        steps = settings.local_epochs * max(1, math.ceil(mean_samples / settings.batch_size))
        per_step = settings.learning_rate * noise * settings.max_grad_norm * math.sqrt(dims) / batch
        bound += 5.0 * per_step * math.sqrt(steps) / max(1e-6, 1.0 - settings.momentum)
    return bound


def _export_at_end(run_dir: Path, out: Path, settings: RunSettings) -> Path | None:
    """Export the final global model to ``out`` (and ``export-triton-repo``); a failed export
    never loses the run.

    Returns the bundle archive, or None when nothing was exported.
    """
    from pollinate.errors import PollinateError

    try:
        from pollinate.export.pipeline import ExportOptions, Format, export_run

        formats = tuple(Format(f.strip()) for f in settings.export_formats.split(",") if f.strip())
        key = Path(settings.export_sign_key) if settings.export_sign_key else None
        repo = settings.export_triton_repo
        triton = Path(repo).resolve() if repo else None
        options = ExportOptions(
            out=out.resolve(), formats=formats, sign_key=key, triton_repo=triton
        )
        result = export_run(run_dir, options)
    except ImportError as err:
        logger.error(
            "the run finished but cannot be exported (%s); pip install \"pollinate[export]\" "
            "and run `pollinate export %s --out %s`", err, run_dir, out,
        )  # fmt: skip
        return None
    except PollinateError as err:
        logger.error("the run finished but its export failed: %s", err)
        return None
    logger.info("exported the final model to %s", result.bundle)
    if result.triton_version is not None:
        logger.info(
            "published it as version %d to %s", result.triton_version, settings.export_triton_repo
        )
    return result.archive


def ledger_enabled(section: dict[str, Any]) -> bool:
    """Whether a ledger summary section is on and has data."""
    return bool(section.get("enabled")) and section.get("max_epsilon") is not None


def _triage(
    replies: list[Message],
    sent: list[Message],
    directory: NodeDirectory,
    arrays: dict[str, np.ndarray],
    settings: RunSettings,
    ledger: PrivacyLedger,
    rnd: int,
    counts: _Round,
    bound: float,
) -> list[Message]:
    """Split replies into failed, declined, rejected and accepted; account every client."""
    accepted: list[Message] = []
    for reply in replies:
        key = directory.key_of(reply_node(reply, sent))
        if reply.has_error():
            counts.failed += 1
            logger.warning("round %d: client %s failed: %s", rnd, key, reply.error.reason)
            continue
        counts.replied += 1
        content = reply.content
        metrics = content.metric_records.get("metrics")
        info = content.config_records.get("info")
        if metrics is not None and int(metrics.get("declined", 0)) == 1:  # type: ignore[arg-type]
            counts.declined += 1
            if int(metrics.get("refused", 0)) == 1:  # type: ignore[arg-type]
                counts.refused += 1
            reason = str(info["declined"]) if info and "declined" in info else "declined"
            ledger.record_decline(server_round=rnd, client=key, reason=reason)
            continue
        if settings.dp == SampleDP.DPSGD and metrics is not None:
            eps = float(metrics.get("epsilon", -1.0))  # type: ignore[arg-type]
            if eps >= 0:
                try:
                    ledger.record_client(
                        server_round=rnd,
                        client=key,
                        epsilon=eps,
                        delta=float(metrics.get("delta", settings.target_delta)),  # type: ignore[arg-type]
                        noise_multiplier=float(metrics.get("noise-multiplier", 0.0)),  # type: ignore[arg-type]
                        sample_rate=float(metrics.get("sample-rate", 0.0)),  # type: ignore[arg-type]
                        steps=int(metrics.get("steps", 0)),  # type: ignore[arg-type]
                    )
                except ValueError as err:
                    counts.rejected += 1
                    logger.warning("round %d: client %s rejected: %s", rnd, key, err)
                    continue
        problem = validate_update(
            reply, arrays, max_update_norm=bound, weight_key=weight_key_for(settings)
        )
        if problem is not None:
            counts.rejected += 1
            logger.warning("round %d: update of client %s rejected: %s", rnd, key, problem)
            continue
        accepted.append(reply)
    return accepted


def _client_level(
    strategy: Strategy,
    ledger: PrivacyLedger,
    settings: RunSettings,
    rnd: int,
    sample_size: int,
    population: int,
) -> float | None:
    wrapper = dp_wrapper(strategy)
    if wrapper is None or wrapper.accountant is None:
        return None
    spent = wrapper.privacy_spent()
    ledger.record_client_level(
        server_round=rnd,
        epsilon=float(spent.epsilon),
        delta=float(spent.delta),
        noise_multiplier=client_noise(settings, population=population),
        clipping_norm=settings.client_dp_clip,
        num_sampled=sample_size,
        population=population,
        accounting="Flower RdpAccountant, no amplification",
    )
    return float(spent.epsilon)


def _federated_eval(
    strategy: Strategy,
    grid: Grid,
    directory: NodeDirectory,
    settings: RunSettings,
    arrays: dict[str, np.ndarray],
    cfg: ConfigRecord,
    rnd: int,
    ledger: PrivacyLedger,
) -> float | None:
    """Accuracy of the global model on the sampled clients' held-out local splits.

    Under DP each client releases only noised counts, charged to its accountant; the ledger
    records that release, and the accuracy is the ratio of the noised sums."""
    size = settings.evaluate_size(len(directory))
    if size == 0:
        return None
    chosen = directory.sample(size, np.random.default_rng(seed_for(settings.seed, rnd, 14)))
    messages = list(
        strategy.configure_evaluate(
            rnd, _to_record(arrays), ConfigRecord(dict(cfg)), SampledGrid(grid, chosen)
        )
    )
    replies = [
        r
        for r in grid.send_and_receive(messages, timeout=settings.round_timeout)
        if not r.has_error() and "metrics" in r.content.metric_records
    ]
    answered = [
        r
        for r in replies
        if int(r.content.metric_records["metrics"].get("declined", 0)) == 0  # type: ignore[arg-type]
    ]
    if not answered:
        return None
    if settings.dp != SampleDP.DPSGD:
        metrics = strategy.aggregate_evaluate(rnd, answered)
        if metrics is None or "eval-accuracy" not in metrics:
            return None
        return float(metrics["eval-accuracy"])  # type: ignore[arg-type]
    correct = count = 0.0
    for reply in answered:
        m = reply.content.metric_records["metrics"]
        correct += float(m.get("eval-correct-noised", 0.0))  # type: ignore[arg-type]
        count += float(m.get("eval-count-noised", 0.0))  # type: ignore[arg-type]
        key = directory.key_of(reply_node(reply, messages))
        try:
            ledger.record_client(
                server_round=rnd, client=key, release="evaluate",
                epsilon=float(m.get("epsilon", 0.0)),  # type: ignore[arg-type]
                delta=float(m.get("delta", settings.target_delta)),  # type: ignore[arg-type]
                noise_multiplier=float(m.get("noise-multiplier", 0.0)),  # type: ignore[arg-type]
                sample_rate=1.0, steps=1,
            )  # fmt: skip
        except (ValueError, PollinateError) as err:
            logger.warning("round %d: evaluation of client %s not recorded: %s", rnd, key, err)
    return min(1.0, max(0.0, correct / count)) if count > 0 else None


def _persist(
    run_dir: Path,
    settings: RunSettings,
    rnd: int,
    arrays: dict[str, np.ndarray],
    strategy: Strategy,
    history: list[RoundRecord],
    ledger: PrivacyLedger,
    directory: NodeDirectory,
) -> None:
    wrapper = dp_wrapper(strategy)
    acc_state = (
        wrapper.accountant.state_dict() if wrapper is not None and wrapper.accountant else None
    )
    state = {
        "history": [r.to_dict() for r in history],
        "ledger": ledger.to_dict(),
        "client_level_accountant": acc_state,
        "settings": settings.to_run_config(),
    }
    save_checkpoint(
        run_dir,
        Checkpoint(server_round=rnd, model=arrays, strategy=strategy_state(strategy), state=state),
        keep=settings.keep_checkpoints,
    )
    atomic_write_json(run_dir / "metrics.json", [r.to_dict() for r in history])
    # compact while the run goes on (the ledger grows every round); indented at the end
    atomic_write_json(
        run_dir / "privacy.json",
        {"summary": ledger.summary(), "ledger": ledger.to_dict()},
        indent=None,
    )


def _check_resume(run_dir: Path, settings: RunSettings) -> None:
    try:
        saved = json.loads((run_dir / "run.json").read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return
    now = settings.to_run_config()
    changed = [k for k in _FIXED_ON_RESUME if k in saved and saved[k] != now.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot resume {run_dir} with different settings ({detail}); "
            "resume with the original settings or start a new run directory"
        )
