"""Sample-level epsilon of a DP-SGD history, by Opacus' RDP accountant.

:func:`epsilon_of` computes exactly what ``opacus.accountants.RDPAccountant`` reports for the
same history (same orders, same per-block ``compute_rdp``, same summation and conversion), but
caches each block's one-step RDP curve and each history's epsilon, so a growing history and
clients with the same history are not recomputed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from pollinate.privacy.mechanism import MechanismStep

__all__ = ["epsilon_of"]

# The Renyi orders of Opacus' RDP accountant (its defaults).
_ORDERS: list[float | int] = list(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=256)
def _unit_rdp(noise_multiplier: float, sample_rate: float) -> npt.NDArray[np.float64]:
    """RDP of ONE step of the sampled Gaussian mechanism at Opacus' default orders (read-only).

    ``compute_rdp`` is linear in the number of steps (it returns ``rdp * steps``), so
    ``_unit_rdp(...) * steps`` is bitwise what Opacus' ``RDPAccountant`` sums.
    """
    rdp = np.asarray(
        rdp_analysis.compute_rdp(
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
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=_ORDERS, rdp=rdp, delta=delta)
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
