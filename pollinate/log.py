"""The package logger. No handlers are attached here; the CLI configures output."""

from __future__ import annotations

import logging

logger = logging.getLogger("pollinate")
