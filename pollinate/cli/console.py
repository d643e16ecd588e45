"""How the ``pollinate`` command prints: the one place that decides it.

On a terminal the output is rich: colours, markup, wrapped at the terminal's width. Anywhere
else (a pipe, a file, ``2>&1 | tee``, a CI log, a log collector) and on ``TERM=dumb`` it is
plain: one logical message is one line whatever the path length or ``COLUMNS``, with no
colours and no markup left in it (a hint may follow on its own line). ``NO_COLOR`` turns the
colours off on a terminal too. Only a real terminal counts: ``FORCE_COLOR`` or
``TTY_COMPATIBLE`` do not make a pipe wrap.

Every CLI module builds its consoles with :func:`make_console` and prints its errors with
:func:`print_error`; ``pollinate.cli.main.main`` prints click's usage errors with
:func:`print_click_error` and the CLI's logging goes through :func:`log_handler`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

__all__ = [
    "PlainFormatter",
    "is_plain",
    "log_handler",
    "make_console",
    "one_line",
    "print_click_error",
    "print_error",
]

_DUMB_TERMS = ("dumb", "unknown")  # what rich itself treats as a dumb terminal
_NEWLINES = re.compile(r"\s*[\r\n]+\s*")
_SENTENCES = re.compile(r"(?<=[.?!])\s+")


def is_plain(stream: Any = None) -> bool:
    """True when ``stream`` (default: stderr) is not a terminal, or the terminal is dumb."""
    stream = sys.stderr if stream is None else stream
    if os.environ.get("TERM", "").lower() in _DUMB_TERMS:
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return not (callable(isatty) and isatty())
    except (ValueError, OSError):  # a closed stream (end of a pytest run, a closed pipe)
        return True


def one_line(text: str) -> str:
    """``text`` with its line breaks (and the spaces around them) turned into one space."""
    return _NEWLINES.sub(" ", text.strip())


def make_console(
    *, stderr: bool = False, soft_wrap: bool = False, min_width: int | None = None
) -> Console:
    """A rich console for stdout (or stderr) that follows the rule of this module.

    ``soft_wrap``: never wrap text, even on a terminal (command lines to copy, paths).
    ``min_width``: lay tables out at least this wide (the summary and export tables).
    Off a terminal the console never wraps text and writes no colour or style codes; markup
    in what callers print is still read (so ``[bold]`` never shows), never written.
    """
    stream = sys.stderr if stderr else sys.stdout
    width = None
    if min_width is not None:
        width = max(Console(stderr=stderr).width, min_width)
    if is_plain(stream):
        return Console(
            stderr=stderr, width=width, soft_wrap=True, color_system=None, no_color=True,
            force_terminal=False, force_interactive=False, highlight=False, emoji=False,
        )  # fmt: skip
    return Console(stderr=stderr, width=width, soft_wrap=soft_wrap)


def print_error(message: str, *, hint: str | None = None) -> None:
    """``error: MESSAGE`` on stderr (red on a terminal), then ``hint`` on a line of its own.

    The message is text: brackets in it are printed, not read as markup.
    """
    if is_plain(sys.stderr):
        lines = [f"error: {one_line(message)}"]
        if hint:
            lines.append(one_line(hint))
        sys.stderr.write("".join(f"{line}\n" for line in lines))
        sys.stderr.flush()
        return
    console = Console(stderr=True)
    console.print(f"[bold red]error:[/] {escape(message)}")
    if hint:
        console.print(escape(hint), style="dim")


def print_click_error(err: Any) -> None:
    """A click usage error (bad option, missing argument, unknown command) as one error line
    and a hint line: the usage and where the help is. For ``pollinate.cli.main.main`` off a
    terminal, where Typer's own panel would wrap the message at 80 columns."""
    ctx = getattr(err, "ctx", None)
    hint = None
    if ctx is not None:
        hint = " ".join(ctx.get_usage().split())
        if ctx.command.get_help_option(ctx) is not None:
            hint += f"; try '{ctx.command_path} {ctx.help_option_names[0]}' for help"
    # Typer and click (>= 8.4) each add "Did you mean ...?" to an unknown command: say it once.
    sentences = _SENTENCES.split(one_line(err.format_message()))
    message = " ".join(s for i, s in enumerate(sentences) if i == 0 or s != sentences[i - 1])
    print_error(message, hint=hint)


class PlainFormatter(logging.Formatter):
    """``warning: message`` (the level in lower case, like ``error:``), one line a record."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {one_line(record.getMessage())}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


def log_handler() -> logging.Handler:
    """The handler the CLI's logs go to: rich on a terminal, plain lines on stderr elsewhere."""
    if is_plain(sys.stderr):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PlainFormatter())
        return handler
    from rich.logging import RichHandler

    return RichHandler(console=make_console(stderr=True), show_path=False, rich_tracebacks=False)
