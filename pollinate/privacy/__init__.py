"""pollinate.privacy: privacy accounting of clients (sample-level) and of the run (ledger).

Sample-level epsilon (each client's DP-SGD) and client-level epsilon (the server's DP-FedAvg) are
separate guarantees: both are reported, never added.
"""

from __future__ import annotations

from pollinate.privacy.accountant import (
    ClientAccountant,
    MechanismStep,
    noise_multiplier_for_budget,
)
from pollinate.privacy.ledger import PrivacyLedger

__all__ = [
    "ClientAccountant",
    "MechanismStep",
    "PrivacyLedger",
    "noise_multiplier_for_budget",
]
