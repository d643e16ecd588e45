"""Process-wide settings for the command line, made before torch or Flower is imported.

* **OpenMP spin.** After each parallel region torch's OpenMP (libgomp) threads spin for
  ``GOMP_SPINCOUNT`` (300,000) iterations before they sleep. Work that follows on other threads
  (the fast engine's noise, drawn per client on two threads; Python) then shares its cores
  with spinning threads: on two cores the noise of a 100-client step took 28-30 ms right after
  the per-sample gradients and 20 ms with a spin count of 1,000, which is what the command
  line sets. libgomp reads it once, when torch loads it.
* **Flower's telemetry off.** Flower sends a usage event to telemetry.flower.ai from every
  process it starts (SuperLink, SuperNode, SuperExec, each ClientApp run) unless
  ``FLWR_TELEMETRY_ENABLED=0``. A device that promises its data stays put should not phone
  home, and each event cost a ClientApp run about 0.2 s of CPU here (a TLS context built, a
  connection tried): with it off a ten-device fleet's round took 6.7-7.7 s instead of
  8.0-10.5 s. Every process the command starts inherits the setting.

A value the user set in the environment wins (``FLWR_TELEMETRY_ENABLED=1`` turns Flower's
telemetry back on).
"""

from __future__ import annotations

import os
import sys

__all__ = ["TELEMETRY_ENV", "tune_process"]

_SPINCOUNT = "1000"
#: Flower's switch for its telemetry (read once, when ``flwr.supercore.telemetry`` loads)
TELEMETRY_ENV = "FLWR_TELEMETRY_ENABLED"


def tune_process() -> None:
    """Set the short OpenMP spin (unless torch is loaded already) and turn Flower's telemetry
    off for this process and its children, unless the user set either."""
    if "torch" not in sys.modules:
        os.environ.setdefault("GOMP_SPINCOUNT", _SPINCOUNT)
    os.environ.setdefault(TELEMETRY_ENV, "0")
