"""The fast engine's thread helper: every index once, whatever the threads and the count."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

from pollinate.simulation._runtime import in_parallel

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("count", [0, 1, 2, 7, 100, 1001])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_in_parallel_visits_every_index_exactly_once(count: int, threads: int) -> None:
    before = torch.get_num_threads()
    seen: Counter[int] = Counter()
    workers: set[str] = set()
    lock = threading.Lock()

    def work(rows: range) -> None:
        assert rows.step == 1 and len(rows) > 0  # contiguous, never empty
        with lock:
            seen.update(rows)
            workers.add(threading.current_thread().name)

    torch.set_num_threads(threads)
    try:
        in_parallel(work, count)
    finally:
        torch.set_num_threads(before)
    assert seen == Counter(range(count))
    if threads == 1 or count <= 1:
        assert workers <= {threading.current_thread().name}
