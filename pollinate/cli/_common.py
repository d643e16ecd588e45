"""What every ``pollinate`` command shares: the one map from errors to exit codes, the
command groups that apply it, logging set-up and ``--set KEY=VALUE`` parsing.

Commands raise; they do not print errors or pick exit codes themselves. Every command is
registered through a :class:`CommandGroup`, whose ``command()`` wraps it in
:func:`reports_errors`: a :class:`~pollinate.errors.PollinateError` or an edge runtime error
ends the command with one plain line on stderr and the code of
:data:`pollinate.errors.EXIT_MEANINGS`; Ctrl-C ends it with 130; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from pollinate.cli.console import log_handler, print_error
from pollinate.edge_runtime.errors import BundleError, InputError, RuntimeMissingError
from pollinate.errors import ConfigError, ExitCode, PollinateError, exit_code_of

__all__ = [
    "CommandGroup",
    "fail",
    "parse_sets",
    "reports_errors",
    "setup_logging",
    "user_code_on_path",
]

F = TypeVar("F", bound=Callable[..., Any])

#: the errors a user can cause: one line and their own exit code, never a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    PollinateError,
    BundleError,
    InputError,
    RuntimeMissingError,
)


def fail(err: BaseException) -> typer.Exit:
    """Print ``err`` as one line on stderr; the :class:`typer.Exit` to raise with its code."""
    # One line off a terminal; brackets are text ('pip install "pollinate[serve]"'), not markup.
    print_error(str(err))
    return typer.Exit(code=int(exit_code_of(err)))


def reports_errors(fn: F) -> F:
    """Wrap a command so the errors a user can cause end it with their registered exit code."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            raise fail(err) from None
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(code=int(ExitCode.INTERRUPTED)) from None

    return command  # type: ignore[return-value]


class CommandGroup(typer.Typer):
    """A Typer app whose commands all report errors through :func:`reports_errors`."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("no_args_is_help", True)
        kwargs.setdefault("add_completion", False)
        kwargs.setdefault("pretty_exceptions_enable", False)
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:
        register = super().command(*args, **kwargs)

        def decorator(fn: F) -> F:
            register(reports_errors(fn))
            return fn

        return decorator


def user_code_on_path(folder: Path | None = None) -> None:
    """Put ``folder`` (the working directory by default) first on the Python path of this
    process and of those it starts (Ray's workers, ClientApps), as ``python -m`` does for
    itself: a model given as ``mymodels:Net`` is found in the folder the command runs from."""
    cwd = str(Path(folder).resolve()) if folder is not None else os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *paths])


def setup_logging(verbose: bool) -> None:
    """Route the package logger to stderr (warnings, or info with ``--verbose``); quiet
    Flower's and Ray's own loggers unless verbose."""
    pkg = logging.getLogger("pollinate")
    pkg.handlers[:] = [log_handler()]
    pkg.setLevel(logging.INFO if verbose else logging.WARNING)
    pkg.propagate = False
    for noisy in ("flwr", "ray"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as a dict (values stay text; the settings parse them)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(
                f"--set expects KEY=VALUE, got {pair!r}; e.g. --set learning-rate=0.05"
            )
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out
