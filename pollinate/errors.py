"""The exception tree of pollinate, and the one registry of the CLI's exit codes.

Every error a user can cause derives from :class:`PollinateError` and carries its
:class:`ExitCode`; the CLI turns it into one clear line and that exit code instead of a
traceback (``pollinate.cli._common``), and ``pollinate exit-codes`` prints
:data:`EXIT_MEANINGS`. The edge runtime's own errors (``pollinate.edge_runtime.errors``, which
imports nothing of pollinate) carry the same numbers as plain ints; a test keeps them equal.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "EXIT_MEANINGS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExitCode",
    "ExportError",
    "PollinateError",
    "PrivacyBudgetError",
    "PrivacyLedgerError",
    "RegistryError",
    "RepositoryError",
    "exit_code_of",
]


class ExitCode(IntEnum):
    """Exit codes of the ``pollinate`` command (stable: scripts and probes rely on them)."""

    OK = 0
    FAILURE = 1
    CONFIG = 2
    DATA = 3
    BUDGET = 4
    CHECKPOINT = 5
    EXPORT = 6
    BUNDLE = 7
    RUNTIME_MISSING = 8
    REPOSITORY = 9
    SUPERLINK = 10
    LEDGER = 11
    REGISTRY = 12
    INTERRUPTED = 130


#: what each exit code means, as ``pollinate exit-codes`` prints it
EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.FAILURE: "an unexpected failure (see the message)",
    ExitCode.CONFIG: "an invalid setting, flag or input (also click's usage errors)",
    ExitCode.DATA: "missing, empty or corrupt data",
    ExitCode.BUDGET: "a privacy budget would be exceeded",
    ExitCode.CHECKPOINT: "a missing or inconsistent run directory / checkpoint",
    ExitCode.EXPORT: "an exported artifact failed validation against the torch model",
    ExitCode.BUNDLE: "a bundle was refused (tampered, truncated, malformed or badly signed)",
    ExitCode.RUNTIME_MISSING: "the inference runtime a bundle needs is not installed",
    ExitCode.REPOSITORY: "a serving model repository is missing or malformed",
    ExitCode.SUPERLINK: "the SuperLink could not be started or reached",
    ExitCode.LEDGER: "a device's privacy ledger is missing or corrupt (start a new one explicitly)",
    ExitCode.REGISTRY: "the model registry (MLflow) was unreachable or refused the change",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


def exit_code_of(err: BaseException) -> ExitCode:
    """The exit code an error ends the command with: its own when it carries a registered one
    (every :class:`PollinateError`, the edge runtime's errors), else :attr:`ExitCode.FAILURE`."""
    if isinstance(err, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    code = getattr(err, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        try:
            return ExitCode(code)
        except ValueError:
            pass
    return ExitCode.FAILURE


class PollinateError(Exception):
    """Base class of every error pollinate raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(PollinateError):
    """A setting is missing, of the wrong type or out of range."""

    exit_code = ExitCode.CONFIG


class DataError(PollinateError):
    """Data is missing, empty, corrupt or in a format pollinate cannot read."""

    exit_code = ExitCode.DATA


class PrivacyBudgetError(PollinateError):
    """Training would spend more privacy than the configured budget allows."""

    exit_code = ExitCode.BUDGET


class PrivacyLedgerError(PollinateError):
    """A device's privacy ledger is missing or corrupt: its spent epsilon is unknown."""

    exit_code = ExitCode.LEDGER


class CheckpointError(PollinateError):
    """A run directory or checkpoint is missing, incomplete or inconsistent."""

    exit_code = ExitCode.CHECKPOINT


class ExportError(PollinateError):
    """An exported artifact failed validation against the torch model (or could not be made)."""

    exit_code = ExitCode.EXPORT


class RepositoryError(PollinateError):
    """A serving model repository (or one model in it) is missing or malformed."""

    exit_code = ExitCode.REPOSITORY


class RegistryError(PollinateError):
    """The model registry (MLflow) cannot be reached, or refuses a change (a promotion of a
    version whose export validation failed, a rollback with nothing to roll back to)."""

    exit_code = ExitCode.REGISTRY
