"""pollinate.privacy: privacy accounting of clients (sample-level) and of the run (ledger).

Sample-level epsilon (each client's DP-SGD) and client-level epsilon (the server's DP-FedAvg) are
separate guarantees: both are reported, never added.

Modules, each importing only those listed before it (and :mod:`pollinate.errors`,
:mod:`pollinate.log`, :mod:`pollinate._atomic`, :mod:`pollinate._imports`):

* ``noise``: the only source of DP randomness (secret; reproducible for tests only);
* ``_checks``: argument checks shared by the accountant and the ledger;
* ``mechanism``: :class:`MechanismStep`, one block of DP-SGD steps;
* ``rdp``: the epsilon of a history of blocks (Opacus' RDP accountant, cached in memory and,
  on a device, in a file beside its ledger);
* ``gaussian``: the exact epsilon of a full-batch history (sample rate 1: one Gaussian
  mechanism; dp-accounting's analytic Gaussian accountant), and the noise for a target;
* ``calibration``: :func:`noise_multiplier_for_budget`, the noise that meets a target epsilon;
* ``accountant_io``: a history as a Flower record, a JSON document and a file;
* ``accountant``: :class:`ClientAccountant`, one client's history over the whole run;
* ``ledger_entries``: the ledger's per-round records, each checked on its own;
* ``ledger_summary``: the ledger's summary statistics (the two guarantees side by side);
* ``ledger_io``: the ``privacy.json`` document and its atomic file I/O;
* ``ledger``: :class:`PrivacyLedger`, the server's record of the run's privacy spending.
"""

from __future__ import annotations

from pollinate.privacy.accountant import ClientAccountant
from pollinate.privacy.calibration import noise_multiplier_for_budget
from pollinate.privacy.ledger import PrivacyLedger
from pollinate.privacy.mechanism import MechanismStep

__all__ = [
    "ClientAccountant",
    "MechanismStep",
    "PrivacyLedger",
    "noise_multiplier_for_budget",
]
