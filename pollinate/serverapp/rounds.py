"""One server round, step by step.

:func:`play_round` runs round ``rnd`` of a :class:`~pollinate.serverapp.state.RunState`:
seed Flower's global generators -> sample clients by identity -> the strategy configures
training -> send and receive (through SecAgg+ when enabled) -> :func:`triage` splits the
replies into failed / declined / rejected / accepted and records every client's cumulative
epsilon in the privacy ledger -> the strategy aggregates the accepted updates (sorted by
client, so the sum order is fixed) -> the client-level release is recorded -> central and
federated evaluation -> the round's :class:`~pollinate.rundir.records.RoundRecord`.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord

from pollinate.clientapp.training import seed_for
from pollinate.config import ClientSampling, SampleDP
from pollinate.log import logger
from pollinate.privacy.noise import secure_seed
from pollinate.protocol import record_of
from pollinate.rundir.records import RoundRecord
from pollinate.serverapp.client_dp import ACCOUNTING, account, eligibility
from pollinate.serverapp.evaluation import accuracy_of, central_eval, federated_eval
from pollinate.serverapp.nodes import SampledGrid, reply_node
from pollinate.serverapp.population import FRESH
from pollinate.serverapp.secagg import secure_round
from pollinate.serverapp.state import RunState, from_array_record, to_array_record
from pollinate.serverapp.strategy import weight_key_for
from pollinate.serverapp.tracing import phase
from pollinate.serverapp.validation import reference_of, validate_update

__all__ = [
    "RoundCounts",
    "account_reply",
    "aggregate_sorted",
    "evaluate_round",
    "play_round",
    "record_client_level",
    "sample_level_epsilons",
    "seed_globals",
    "triage",
    "who_may_train",
]


@dataclass
class RoundCounts:
    """Client outcomes of one round (see :class:`~pollinate.rundir.records.RoundRecord`)."""

    sampled: int = 0
    replied: int = 0
    declined: int = 0
    rejected: int = 0
    failed: int = 0
    refused: int = 0
    stale: int = 0


def play_round(run: RunState, rnd: int) -> RoundRecord | None:
    """Run round ``rnd``; the global model and the ledger of ``run`` are updated in place.

    Returns:
        The round's record, or ``None`` when the client-level privacy budget is spent and
        the run stops before this round.
    """
    started = time.monotonic()
    seed_globals(run.settings.seed, rnd)
    run.directory.refresh()
    counts = RoundCounts()
    rng = np.random.default_rng(seed_for(run.settings.seed, rnd, 13))
    with phase("sampling"):
        allowed = who_may_train(run, rnd)
        poisson = run.settings.client_sampling == ClientSampling.POISSON
        known = run.ledger.clients_seen() if allowed is not None else frozenset()
        if poisson:
            chosen = run.directory.sample_poisson(
                run.settings.fraction_train, _secret_coins(run, rnd), allowed=allowed, known=known
            )
        else:
            chosen = run.directory.sample(run.sample_size, rng, allowed=allowed, known=known)
    spent = poisson and allowed is not None and not allowed(FRESH)  # all clients alike
    if spent or (not chosen and not poisson):
        logger.warning(
            "stopping before round %d: no client may train again within its limits "
            "(participation-bound; client-level separation and budget)", rnd,
        )  # fmt: skip
        return None
    counts.sampled = len(chosen)
    messages: list[Message] = []
    if chosen:  # a Poisson draw may be empty: the round then releases noise only
        messages = list(
            run.strategy.configure_train(
                rnd,
                to_array_record(run.arrays),
                ConfigRecord(dict(run.cfg)),
                SampledGrid(run.grid, chosen),
            )
        )
    with phase("training"):
        replies = _send_train(run, rnd, messages) if messages else []
    with phase("aggregation"):
        accepted = triage(run, rnd, replies, messages, counts)
        _count_missing(run, rnd, replies, messages, counts)
        train_metrics = _aggregate(run, rnd, accepted)
        keys = [run.directory.key_of(m.metadata.src_node_id) for m in accepted]
        client_eps = record_client_level(run, rnd, keys)
    return evaluate_round(run, rnd, counts, train_metrics, client_eps, started=started)


def evaluate_round(
    run: RunState,
    rnd: int,
    counts: RoundCounts,
    train_metrics: dict[str, float],
    client_eps: float | None,
    *,
    started: float,
) -> RoundRecord:
    """Central and federated evaluation after round ``rnd``'s aggregate; its record
    (``started``: the round's ``time.monotonic()`` at its start)."""
    with phase("evaluation"):
        central = central_eval(run.model, run.arrays, run.data, run.task)
        federated = federated_eval(run, rnd)
    max_eps, median_eps = sample_level_epsilons(run)
    return RoundRecord(
        server_round=rnd,
        accuracy=accuracy_of(central),
        loss=central.loss,
        metrics=central.metrics,
        **vars(counts),  # sampled, replied, declined, rejected, failed, refused, stale
        train_loss=train_metrics.get("train-loss"),
        train_accuracy=train_metrics.get("train-accuracy"),
        federated_accuracy=federated,
        max_epsilon=max_eps,
        median_epsilon=median_eps,
        client_level_epsilon=client_eps,
        seconds=time.monotonic() - started,
    )


def who_may_train(run: RunState, rnd: int) -> Callable[[str], bool] | None:
    """Which clients may train in round ``rnd`` (``None``: all): client-level DP's limits
    (participation, DP-FTRL's separation, budget) and DP-SGD's ``participation-bound``."""
    wrapper = run.dp_wrapper
    allowed = None
    if wrapper is not None:
        allowed = eligibility(
            wrapper.plan, run.ledger.client_level_rounds(), rnd,
            noise=wrapper.noise_multiplier, delta=run.settings.target_delta,
            budget=run.settings.client_dp_budget,
        )  # fmt: skip
    return _both(allowed, _within_participation_bound(run))


def _within_participation_bound(run: RunState) -> Callable[[str], bool] | None:
    """Under DP-SGD with a ``participation-bound`` (what the noise was calibrated for): only
    clients that trained fewer rounds; the others would decline, wasting their cohort slot."""
    bound = run.settings.participation_bound
    if run.settings.dp != SampleDP.DPSGD or bound == 0:
        return None
    trained = Counter(e.client for e in run.ledger.entries if e.release == "train")
    return lambda client: trained[client] < bound


def _both(
    a: Callable[[str], bool] | None, b: Callable[[str], bool] | None
) -> Callable[[str], bool] | None:
    if a is None or b is None:
        return a or b
    return lambda client: a(client) and b(client)


def _secret_coins(run: RunState, rnd: int) -> np.random.Generator:
    """The Poisson sampler's coins: from the OS CSPRNG (the run seed does not fix them), or,
    with the test-only reproducible noise, from the seed."""
    if run.settings.reproducible_noise:
        return np.random.default_rng(seed_for(run.settings.seed, rnd, 14))
    return np.random.default_rng(secure_seed())


def seed_globals(seed: int, rnd: int) -> None:
    """Flower's strategies draw from the global generators: seed them per round (DP noise and
    Poisson coins never come from them)."""
    random.seed(seed_for(seed, rnd, 11))
    np.random.seed(seed_for(seed, rnd, 12) % 2**32)


def _send_train(run: RunState, rnd: int, messages: list[Message]) -> list[Message]:
    """Send the round's train messages and collect the replies (via SecAgg+ when enabled)."""
    if run.settings.secure_aggregation:
        return secure_round(run.grid, messages, rnd, run.settings, max_weight=run.secagg_weight)
    return list(run.grid.send_and_receive(messages, timeout=run.settings.round_timeout))


def _count_missing(
    run: RunState, rnd: int, replies: list[Message], sent: list[Message], counts: RoundCounts
) -> None:
    """Count the sampled clients that did not reply within ``round-timeout`` as failed."""
    if len(replies) >= len(sent):
        return
    counts.failed += len(sent) - len(replies)
    logger.warning(
        "round %d: %d sampled client(s) did not reply within %.0f s; the round goes on "
        "with the %d that did", rnd, len(sent) - len(replies),
        run.settings.round_timeout, len(replies),
    )  # fmt: skip


def triage(
    run: RunState, rnd: int, replies: list[Message], sent: list[Message], counts: RoundCounts
) -> list[Message]:
    """Split replies into failed, declined, rejected and accepted; account every client.

    Declines are recorded in the ledger, and so (under DP-SGD) is every other client's
    cumulative epsilon; an epsilon the ledger refuses rejects the update, as does one
    :func:`~pollinate.serverapp.validation.validate_update` finds malformed.

    Returns:
        The accepted replies, in reply order.
    """
    accepted: list[Message] = []
    reference = reference_of(run.arrays)
    weight_key = weight_key_for(run.settings)
    for reply in replies:
        key = run.directory.key_of(reply_node(reply, sent))
        if reply.has_error():
            counts.failed += 1
            logger.warning("round %d: client %s failed: %s", rnd, key, reply.error.reason)
            continue
        metrics = record_of(reply.content, "metrics", MetricRecord)
        info = record_of(reply.content, "info", ConfigRecord)
        if not account_reply(run, rnd, key, metrics, info, counts):
            continue
        problem = validate_update(
            reply, run.arrays, max_update_norm=run.bound, weight_key=weight_key, reference=reference
        )
        if problem is not None:
            counts.rejected += 1
            logger.warning("round %d: update of client %s rejected: %s", rnd, key, problem)
            continue
        accepted.append(reply)
    return accepted


def account_reply(
    run: RunState,
    rnd: int,
    key: str,
    metrics: MetricRecord | None,
    info: ConfigRecord | None,
    counts: RoundCounts,
) -> bool:
    """Count a reply that is not an error and record what the ledger keeps of it: a decline,
    or (under DP-SGD) the client's cumulative epsilon. False: nothing of it is aggregated."""
    counts.replied += 1
    if metrics is not None and int(metrics.get("declined", 0)) == 1:  # type: ignore[arg-type]
        counts.declined += 1
        if int(metrics.get("refused", 0)) == 1:  # type: ignore[arg-type]
            counts.refused += 1
        reason = str(info["declined"]) if info and "declined" in info else "declined"
        run.ledger.record_decline(server_round=rnd, client=key, reason=reason)
        return False
    return _account_sample_level(run, rnd, key, metrics, counts)


def _account_sample_level(
    run: RunState, rnd: int, key: str, metrics: MetricRecord | None, counts: RoundCounts
) -> bool:
    """Record a training client's reported epsilon (under DP-SGD); False: it is rejected."""
    if run.settings.dp != SampleDP.DPSGD or metrics is None:
        return True
    eps = float(metrics.get("epsilon", -1.0))  # type: ignore[arg-type]
    if eps < 0:
        return True
    try:
        run.ledger.record_client(
            server_round=rnd,
            client=key,
            epsilon=eps,
            delta=float(metrics.get("delta", run.settings.target_delta)),  # type: ignore[arg-type]
            noise_multiplier=float(metrics.get("noise-multiplier", 0.0)),  # type: ignore[arg-type]
            sample_rate=float(metrics.get("sample-rate", 0.0)),  # type: ignore[arg-type]
            steps=int(metrics.get("steps", 0)),  # type: ignore[arg-type]
        )
    except ValueError as err:
        counts.rejected += 1
        logger.warning("round %d: client %s rejected: %s", rnd, key, err)
        return False
    return True


def _aggregate(run: RunState, rnd: int, accepted: list[Message]) -> dict[str, float]:
    """Aggregate the accepted updates into the global model; returns the train metrics.

    Fewer than ``min-replies`` acceptable updates, or a non-finite aggregate, leave the
    global model unchanged.
    """
    if accepted and len(accepted) < run.settings.min_replies:
        logger.warning(
            "round %d: %d acceptable update(s), fewer than min-replies=%d; the global model "
            "is unchanged", rnd, len(accepted), run.settings.min_replies,
        )  # fmt: skip
        return {}
    if not accepted:
        logger.warning("round %d: no acceptable update; the global model is unchanged", rnd)
        return {}
    accepted.sort(key=lambda m: run.directory.key_of(m.metadata.src_node_id))
    return aggregate_sorted(run, rnd, accepted)


def aggregate_sorted(run: RunState, rnd: int, accepted: list[Message]) -> dict[str, float]:
    """The strategy chain's aggregate of ``accepted`` (in the order given) becomes the global
    model unless it is not finite; returns the train metrics."""
    new_arrays, agg_metrics = run.strategy.aggregate_train(rnd, accepted)
    if new_arrays is not None:
        candidate = from_array_record(new_arrays)
        if all(np.all(np.isfinite(v)) for v in candidate.values()):
            run.arrays = {k: candidate[k].astype(v.dtype) for k, v in run.arrays.items()}
        else:
            logger.error("round %d: aggregate is not finite; keeping the previous model", rnd)
    if agg_metrics is None:
        return {}
    return {k: float(v) for k, v in agg_metrics.items() if isinstance(v, int | float)}


def record_client_level(run: RunState, rnd: int, keys: list[str]) -> float | None:
    """Record the round's client-level release in the ledger; returns the cumulative epsilon
    of the worst-placed client (``None``: no client-level DP).

    ``keys``: the clients whose updates the release summed (none are recorded when the
    round released nothing); every client's whole history is accounted, and the worst
    one's epsilon (RDP and PLD, the tighter) is the run's.
    """
    wrapper = run.dp_wrapper
    if wrapper is None:
        return None
    plan = wrapper.plan
    contributors: list[str] = []
    if wrapper.released_round == rnd and plan.sample_rate == 0:
        # under Poisson sampling who was drawn is secret: not written down, all charged alike
        contributors = list(keys)
    history = run.ledger.client_level_rounds()
    for key in contributors:
        history.setdefault(key, []).append(rnd)
    noise = wrapper.noise_multiplier
    worst, eps = account(
        plan, history, noise=noise, delta=run.settings.target_delta,
        releases=len(run.ledger.releases) + 1,
    )  # fmt: skip
    run.ledger.record_client_level(
        server_round=rnd,
        epsilon=eps.epsilon,
        delta=run.settings.target_delta,
        noise_multiplier=noise,
        clipping_norm=wrapper.last_clip,
        num_sampled=plan.cohort,
        population=run.population,
        accounting=ACCOUNTING,
        mechanism=plan.mechanism.value,
        epsilon_rdp=eps.rdp,
        epsilon_pld=eps.pld,
        sensitivity=worst,
        bands=plan.bands,
        horizon=plan.horizon,
        clients=contributors,
        sample_rate=plan.sample_rate,
        count_noise=plan.count_noise,
    )
    return eps.epsilon


def sample_level_epsilons(run: RunState) -> tuple[float | None, float | None]:
    """Maximum and median sample-level epsilon so far (``None`` without DP-SGD data)."""
    return run.ledger.sample_level_range()
