"""Sample-level epsilon of a DP-SGD history, by Opacus' RDP accountant.

:func:`epsilon_of` computes exactly what ``opacus.accountants.RDPAccountant`` reports for the
same history (same orders, same per-block ``compute_rdp``, same summation and conversion), but
caches each block's one-step RDP curve and each history's epsilon, so a growing history and
clients with the same history are not recomputed.

Opacus' RDP analysis module is loaded from Opacus' own file without importing the ``opacus``
package: ``import opacus.accountants`` runs ``opacus/__init__``, which imports the whole
PrivacyEngine (about 1.8 s of start-up here: optimizers, torch.distributed, dynamo), while the
analysis needs only math, numpy and scipy. Where Opacus is already imported, its module is used.

One step's curve takes about 0.2 CPU s (the 99 fractional orders are series summed in Python).
A device runs each message in a fresh fork of its warm executor, where the in-process cache is
empty, so :func:`keep_curves_in` lets the device keep the curves in its state directory
(``rdp-curves.json``, next to its ledger): a later fork reads the curve of the same noise and
sample rate instead of computing it again. The file holds only what ``compute_rdp`` returned
for the Opacus version and orders it names; a file from another version, or one that cannot
be read, is ignored and rewritten.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pollinate._atomic import atomic_write_text
from pollinate._imports import module_from_file
from pollinate.log import logger
from pollinate.privacy.mechanism import MechanismStep

__all__ = ["CURVES_FILE", "epsilon_of", "keep_curves_in"]

#: the file name :func:`keep_curves_in` is given by a device (in its state directory)
CURVES_FILE = "rdp-curves.json"
_CURVES_FORMAT = 1

# The Renyi orders of Opacus' RDP accountant (``RDPAccountant.DEFAULT_ALPHAS``; a test checks
# that they still are).
_ORDERS: list[float | int] = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


@functools.cache
def _analysis() -> Any:
    """Opacus' ``accountants/analysis/rdp.py``, loaded without the ``opacus`` package."""
    return module_from_file(
        "opacus", "accountants/analysis/rdp.py", "pollinate.privacy._opacus_rdp"
    )


_store: Path | None = None


def keep_curves_in(path: Path | None) -> None:
    """Keep the one-step curves this process computes in the JSON file ``path`` (``None``:
    in memory only), and use the ones already there."""
    global _store
    _store = None if path is None else Path(path)


@functools.cache
def _stamp() -> dict[str, object]:
    """What a stored curve depends on: the file format, Opacus' version and the orders."""
    return {
        "format": _CURVES_FORMAT,
        "opacus": importlib.metadata.version("opacus"),
        "orders": [float(order) for order in _ORDERS],
    }


def _curve_key(noise_multiplier: float, sample_rate: float) -> str:
    return f"{float(noise_multiplier)!r}/{float(sample_rate)!r}"


def _stored_curves(path: Path) -> dict[str, list[float]]:
    """The curves in ``path``; empty when it is missing, unreadable or from another stamp."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        logger.warning("ignoring the RDP curve store %s (%s); it will be rewritten", path, err)
        return {}
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in _stamp().items()):
        return {}
    curves = data.get("curves")
    if not isinstance(curves, dict):
        return {}
    return {
        key: curve
        for key, curve in curves.items()
        if isinstance(curve, list)
        and len(curve) == len(_ORDERS)
        and all(isinstance(v, float) and v >= 0 for v in curve)
    }


def _store_curve(path: Path, curves: dict[str, list[float]], key: str, curve: list[float]) -> None:
    """Write the store's ``curves`` (as just read) with ``curve`` added, atomically; a lost
    race with another fork only means one of them computes its curve again later."""
    try:
        atomic_write_text(path, json.dumps({**_stamp(), "curves": {**curves, key: curve}}))
    except OSError as err:
        logger.warning("cannot write the RDP curve store %s: %s", path, err)


@functools.lru_cache(maxsize=256)
def _unit_rdp(noise_multiplier: float, sample_rate: float) -> npt.NDArray[np.float64]:
    """RDP of ONE step of the sampled Gaussian mechanism at Opacus' default orders (read-only).

    ``compute_rdp`` is linear in the number of steps (it returns ``rdp * steps``), so
    ``_unit_rdp(...) * steps`` is bitwise what Opacus' ``RDPAccountant`` sums. Read from, and
    added to, the store of :func:`keep_curves_in` where one is set.
    """
    store, key = _store, _curve_key(noise_multiplier, sample_rate)
    curves = _stored_curves(store) if store is not None else {}
    stored = curves.get(key)
    if stored is not None:
        rdp = np.asarray(stored, dtype=np.float64)
    else:
        rdp = np.asarray(
            _analysis().compute_rdp(
                q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_ORDERS
            ),
            dtype=np.float64,
        )
        if store is not None:
            _store_curve(store, curves, key, [float(v) for v in rdp])
    rdp.flags.writeable = False
    return rdp


@functools.lru_cache(maxsize=4096)
def _composed_epsilon(history: tuple[MechanismStep, ...], delta: float) -> float:
    """Epsilon of ``history`` at ``delta`` (cached: clients with the same history share it)."""
    if not history:
        return 0.0
    rdp = sum(
        [_unit_rdp(entry.noise_multiplier, entry.sample_rate) * entry.steps for entry in history]
    )
    with warnings.catch_warnings():  # the bound at the smallest order is loose, not wrong:
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        epsilon, _ = _analysis().get_privacy_spent(orders=_ORDERS, rdp=rdp, delta=delta)
    epsilon = float(epsilon)
    if math.isnan(epsilon):
        return math.inf
    return epsilon


def epsilon_of(history: Sequence[MechanismStep], delta: float) -> float:
    """Compose ``history`` with Opacus' RDP accountant and convert to epsilon at ``delta``.

    ``delta`` must already be checked (0 < delta < 1). Returns 0.0 for an empty history and
    ``inf`` where the conversion gives NaN.
    """
    if not history:
        return 0.0
    return _composed_epsilon(tuple(history), delta)
