"""Weighted means of the replies' metrics, as Flower's strategies take them, in plain floats.

Flower's ``aggregate_metricrecords`` writes every partial sum back into a ``MetricRecord``,
whose type checks then run once per reply and key (several ms a round for 100 replies here).
:func:`weighted_metrics` reads each value once, sums in Python floats, and builds one record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from flwr.app import MetricRecord, RecordDict
from flwr.app.typing import MetricRecordValues

__all__ = ["weighted_metrics"]


def weighted_metrics(records: Sequence[RecordDict], weight_key: str) -> MetricRecord:
    """The ``weight_key``-weighted mean of every metric of ``records`` (lists element-wise),
    the weight key left out; the weight is read from each record's first MetricRecord, as in
    Flower's ``aggregate_metricrecords``, whose result this equals."""
    metric_records = [list(r.metric_records.values()) for r in records]
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
