"""The exception tree of pollinate.

Every error a user can cause derives from :class:`PollinateError`; the CLI turns it into one
clear line and a non-zero exit code instead of a traceback.
"""

from __future__ import annotations


class PollinateError(Exception):
    """Base class of every error pollinate raises on purpose."""

    exit_code: int = 1


class ConfigError(PollinateError):
    """A setting is missing, of the wrong type or out of range."""

    exit_code = 2


class DataError(PollinateError):
    """Data is missing, empty, corrupt or in a format pollinate cannot read."""

    exit_code = 3


class PrivacyBudgetError(PollinateError):
    """Training would spend more privacy than the configured budget allows."""

    exit_code = 4


class PrivacyLedgerError(PollinateError):
    """A device's privacy ledger is missing or corrupt: its spent epsilon is unknown."""

    exit_code = 11


class CheckpointError(PollinateError):
    """A run directory or checkpoint is missing, incomplete or inconsistent."""

    exit_code = 5


class ExportError(PollinateError):
    """An exported artifact failed validation against the torch model (or could not be made)."""

    exit_code = 6


class RepositoryError(PollinateError):
    """A serving model repository (or one model in it) is missing or malformed."""

    exit_code = 9
