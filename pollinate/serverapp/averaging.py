"""Weighted means of the replies, as Flower's strategies compute them, with fewer record
reads.

Flower's ``aggregate_metricrecords`` writes every partial sum back into a ``MetricRecord``,
whose type checks then run once per reply and key (several ms a round for 100 replies here).
:func:`weighted_metrics` reads each value once, sums in Python floats, and builds one record.

Flower's ``FedAvg.aggregate_train`` (which FedAvgM, FedProx, FedAdam and FedYogi call for
their mean) rebuilds a reply's typed record views five times (each access of
``content.metric_records`` or ``.array_records`` checks every record again) and adds the
arrays one reply and key at a time. :class:`FlatMean` is FedAvg with the same checks and the
same weighted mean, reading each reply's records once and summing each key over all replies
in one product; the strategies here put it under Flower's own update rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app.typing import MetricRecordValues
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from pollinate.log import logger
from pollinate.protocol import records_of

__all__ = [
    "FlatMean",
    "FlatMeanFedAdam",
    "FlatMeanFedAvgM",
    "FlatMeanFedProx",
    "FlatMeanFedYogi",
    "check_replies",
    "weighted_arrays",
    "weighted_metrics",
]

#: the most bytes of one key's replies stacked at once (a cohort of a large model is summed
#: in row blocks, so the mean needs about one model's memory more, not the cohort's)
_STACK_BYTES = 64 << 20


def weighted_metrics(records: Sequence[RecordDict], weight_key: str) -> MetricRecord:
    """The ``weight_key``-weighted mean of every metric of ``records`` (lists element-wise),
    the weight key left out; the weight is read from each record's first MetricRecord, as in
    Flower's ``aggregate_metricrecords``, whose result this equals."""
    metric_records = [[v for v in r.values() if isinstance(v, MetricRecord)] for r in records]
    weights = [float(cast(float, m[0][weight_key])) for m in metric_records]
    total = sum(weights)
    sums: dict[str, float | list[float]] = {}
    for parts, weight in zip(metric_records, weights, strict=True):
        factor = weight / total
        for part in parts:
            for key, value in part.items():
                if key == weight_key:
                    continue
                if isinstance(value, list):
                    scaled = [float(v) * factor for v in value]
                    held = sums.get(key)
                    sums[key] = (
                        scaled
                        if held is None
                        else [a + b for a, b in zip(cast(list[float], held), scaled, strict=True)]
                    )
                else:
                    sums[key] = cast(float, sums.get(key, 0.0)) + float(value) * factor
    return MetricRecord(cast(dict[str, MetricRecordValues], sums))


def _only(content: RecordDict, kind: type[ArrayRecord] | type[MetricRecord]) -> str:
    """The key of the one record of ``kind`` in ``content``; Flower's error if not one."""
    keys = [k for k, _ in records_of(content, kind)]
    if len(keys) != 1:
        raise InconsistentMessageReplies(
            reason=f"Expected exactly one {kind.__name__} in replies, found {len(keys)}. "
            "Skipping aggregation."
        )
    return keys[0]


def check_replies(contents: Sequence[RecordDict], weight_key: str) -> tuple[str, str]:
    """Flower's ``validate_message_reply_consistency`` for train replies, each record read
    once: one ArrayRecord and one MetricRecord per reply, the same keys in all, the weight
    key among the metrics. Returns the keys of the array and metric records."""
    first = contents[0]
    arrays_key, metrics_key = _only(first, ArrayRecord), _only(first, MetricRecord)
    array_keys = set(cast(ArrayRecord, first[arrays_key]).keys())
    metric_keys = set(cast(MetricRecord, first[metrics_key]).keys())
    for content in contents[1:]:
        a, m = _only(content, ArrayRecord), _only(content, MetricRecord)
        if set(cast(ArrayRecord, content[a]).keys()) != array_keys:
            raise InconsistentMessageReplies(
                reason="All ArrayRecords must have the same keys for aggregation. "
                "This condition wasn't met. Skipping aggregation."
            )
        if set(cast(MetricRecord, content[m]).keys()) != metric_keys:
            raise InconsistentMessageReplies(
                reason="All MetricRecords must have the same keys for aggregation. "
                "This condition wasn't met. Skipping aggregation."
            )
    if weight_key not in metric_keys:
        raise InconsistentMessageReplies(
            reason=f"Missing required key `{weight_key}` in the MetricRecord of reply "
            "messages. Cannot average ArrayRecords and MetricRecords. Skipping aggregation."
        )
    return arrays_key, metrics_key


def weighted_arrays(contents: Sequence[RecordDict], weight_key: str) -> ArrayRecord:
    """The ``weight_key``-weighted mean of the replies' arrays, as Flower's
    ``aggregate_arrayrecords`` computes it (floating arrays keep their dtype, integer ones
    become float64), each key summed over all replies in one product."""
    arrays_key, metrics_key = check_replies(contents, weight_key)
    records = [cast(ArrayRecord, c[arrays_key]) for c in contents]
    weights = np.array(
        [float(cast(float, cast(MetricRecord, c[metrics_key])[weight_key])) for c in contents]
    )
    factors = weights / weights.sum()
    out = ArrayRecord()
    for key in records[0]:
        values = [r[key].numpy() for r in records]
        dtype = values[0].dtype if np.issubdtype(values[0].dtype, np.floating) else np.float64
        rows = max(1, _STACK_BYTES // max(1, values[0].size * np.dtype(dtype).itemsize))
        total = np.zeros(values[0].shape, dtype=dtype)
        for start in range(0, len(values), rows):
            block = np.stack(values[start : start + rows]).astype(dtype, copy=False)
            total += np.tensordot(factors[start : start + rows].astype(dtype), block, axes=1)
        out[key] = Array(total)
    return out


class FlatMean(FedAvg):
    """Flower's FedAvg, its mean by :func:`weighted_arrays`: the same checks, the same
    weighted mean (summed in another order: equal to float rounding)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        for msg in replies:
            if msg.has_error():
                logger.info("reply from node %d: error %s", msg.metadata.src_node_id,
                            msg.error.reason)  # fmt: skip
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        arrays = weighted_arrays(contents, self.weighted_by_key)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


# Flower's update rules over the flat mean: their aggregate_train calls super()'s, which
# the method resolution order makes FlatMean's (class X(Rule, FlatMean): X, Rule, FlatMean,
# FedAvg)
class FlatMeanFedAvgM(FedAvgM, FlatMean):
    """Flower's FedAvgM over :class:`FlatMean`."""


class FlatMeanFedProx(FedProx, FlatMean):
    """Flower's FedProx over :class:`FlatMean`."""


class FlatMeanFedAdam(FedAdam, FlatMean):
    """Flower's FedAdam over :class:`FlatMean`."""


class FlatMeanFedYogi(FedYogi, FlatMean):
    """Flower's FedYogi over :class:`FlatMean`."""
