"""The error types of writing bundles and keys (all :class:`~pollinate.errors.ExportError`).

Each also derives from the built-in exception a caller would expect (``FileExistsError``,
``FileNotFoundError``, ``ValueError``), so ``except OSError`` and the like keep working, while
the CLI prints any of them as one line with the export exit code.
"""

from __future__ import annotations

from pollinate.errors import ExportError

__all__ = ["DestinationExistsError", "SigningKeyError", "SourceMissingError"]


class DestinationExistsError(ExportError, FileExistsError):
    """A bundle directory or key file would overwrite something that exists."""


class SourceMissingError(ExportError, FileNotFoundError):
    """A file to put into the bundle does not exist."""


class SigningKeyError(ExportError, ValueError):
    """A signing key cannot be read, is encrypted, or is not Ed25519."""
