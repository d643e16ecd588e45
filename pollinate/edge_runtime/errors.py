"""Errors of the edge runtime (self-contained: the runtime imports nothing else of pollinate)."""

from __future__ import annotations

__all__ = ["BundleError", "InputError", "RuntimeMissingError"]


class BundleError(Exception):
    """A bundle is missing, malformed, tampered with or unsigned when a signature is required."""

    exit_code = 7


class InputError(ValueError):
    """An input does not match the model's input spec (shape, dtype, value range)."""

    exit_code = 2


class RuntimeMissingError(ImportError):
    """The inference runtime a bundle artifact needs is not installed."""

    exit_code = 8
