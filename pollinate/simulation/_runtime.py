"""The fast engine's process: threads for work torch runs one call at a time (noise draws),
and malloc settings for its large, short-lived tensors."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import sys
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
    """``work`` over ``range(count)`` split in contiguous parts over torch's intra-op threads
    (torch kernels release the GIL); in this thread alone when there is one."""
    threads = min(torch.get_num_threads(), count)
    if threads <= 1:
        work(range(count))
        return
    pool = _POOLS.get(threads)
    if pool is None:
        pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="pollinate-noise")
    bounds = [count * i // threads for i in range(threads + 1)]
    futures = [pool.submit(work, range(a, b)) for a, b in itertools.pairwise(bounds)]
    for future in futures:
        future.result()
