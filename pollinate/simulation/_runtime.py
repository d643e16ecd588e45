"""The fast engine's process: threads for work torch runs one call at a time (noise draws),
and malloc settings for its large, short-lived tensors."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["in_parallel", "keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> None:
    """Keep blocks up to 1 GiB in glibc's heap when freed, instead of unmapping them.

    glibc serves blocks over its mmap threshold with fresh pages and unmaps them on free, so
    every round's per-sample gradients (tens of MB) page-fault in again: with this, one
    100-client DP-SGD cohort step took 63 ms instead of 95 ms here (with the short OpenMP
    spin of ``cli._process``). Peak memory is unchanged; memory the process freed is reused
    rather than returned, so only a process that runs a simulation calls this. Nothing where
    the C library is not glibc, or where the user set ``MALLOC_MMAP_THRESHOLD_``.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)
    except (OSError, AttributeError):  # musl and others: no mallopt, their own defaults
        return


_POOLS: dict[int, ThreadPoolExecutor] = {}


def in_parallel(work: Callable[[range], None], count: int) -> None:
    """``work`` over ``range(count)`` in contiguous blocks handed to torch's intra-op threads
    as each finishes its last (torch kernels release the GIL), so a thread slowed by the rest
    of the machine takes fewer blocks; in this thread alone when there is one."""
    threads = min(torch.get_num_threads(), count)
    if count <= 0:
        return
    if threads <= 1:
        work(range(count))
        return
    pool = _POOLS.get(threads)
    if pool is None:
        pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="pollinate-noise")
    step = max(1, count // (threads * 8))
    blocks = iter(range(0, count, step))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                start = next(blocks, None)
            if start is None:
                return
            work(range(start, min(count, start + step)))

    futures = [pool.submit(worker) for _ in range(threads)]
    for future in futures:
        future.result()
