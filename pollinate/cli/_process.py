"""Process-wide CPU runtime settings for the command line, made before torch is imported.

After each parallel region torch's OpenMP (libgomp) threads spin for ``GOMP_SPINCOUNT``
(300,000) iterations before they sleep. Work that follows on other threads (the fast engine's
noise, drawn per client on two threads; Python) then shares its cores with spinning threads:
on two cores the noise of a 100-client step took 28-30 ms right after the per-sample
gradients and 20 ms with a spin count of 1,000, which is what the command line sets. libgomp
reads it once, when torch loads it; a value the user set in the environment wins.
"""

from __future__ import annotations

import os
import sys

__all__ = ["tune_process"]

_SPINCOUNT = "1000"


def tune_process() -> None:
    """Set the short OpenMP spin, unless torch is loaded already or the user set one."""
    if "torch" not in sys.modules:
        os.environ.setdefault("GOMP_SPINCOUNT", _SPINCOUNT)
