"""Sample-level epsilon of a DP-SGD history, by Opacus' RDP accountant.

:func:`epsilon_of` computes exactly what ``opacus.accountants.RDPAccountant`` reports for the
same history (same orders, same per-block ``compute_rdp``, same summation and conversion), but
caches each block's one-step RDP curve and each history's epsilon, so a growing history and
clients with the same history are not recomputed.

Opacus' RDP analysis module is loaded from Opacus' own file without importing the ``opacus``
package: ``import opacus.accountants`` runs ``opacus/__init__``, which imports the whole
PrivacyEngine (about 1.8 s of start-up here: optimizers, torch.distributed, dynamo), while the
analysis needs only math, numpy and scipy. Where Opacus is already imported, its module is used.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from pollinate.privacy.mechanism import MechanismStep

__all__ = ["epsilon_of"]

# The Renyi orders of Opacus' RDP accountant (``RDPAccountant.DEFAULT_ALPHAS``; a test checks
# that they still are).
_ORDERS: list[float | int] = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

_ANALYSIS = "opacus.accountants.analysis.rdp"


@functools.cache
def _analysis() -> Any:
    """Opacus' ``accountants/analysis/rdp.py``, loaded without the ``opacus`` package."""
    loaded = sys.modules.get(_ANALYSIS)
    if isinstance(loaded, ModuleType):
        return loaded
    package = importlib.util.find_spec("opacus")  # finds, does not import, a top-level package
    if package is None or package.origin is None:
        raise ImportError("Opacus is not installed: pip install opacus")
    path = Path(package.origin).parent / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location("pollinate.privacy._opacus_rdp", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load Opacus' RDP analysis from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=256)
def _unit_rdp(noise_multiplier: float, sample_rate: float) -> npt.NDArray[np.float64]:
    """RDP of ONE step of the sampled Gaussian mechanism at Opacus' default orders (read-only).

    ``compute_rdp`` is linear in the number of steps (it returns ``rdp * steps``), so
    ``_unit_rdp(...) * steps`` is bitwise what Opacus' ``RDPAccountant`` sums.
    """
    rdp = np.asarray(
        _analysis().compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_ORDERS
        ),
        dtype=np.float64,
    )
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
