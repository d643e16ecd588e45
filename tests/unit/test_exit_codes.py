"""One exit-code registry: every command, fed a bad input, ends with the code the table gives
its kind of error (one line, no traceback), and every command of the CLI is covered here.

The commands run in-process through Typer's runner (each case takes milliseconds); the
subprocess path (`main()`, one-line output in a pipe) is covered by tests/e2e/test_cli_errors.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from pollinate.cli.main import app
from pollinate.edge_runtime.errors import BundleError, InputError, RuntimeMissingError
from pollinate.errors import EXIT_MEANINGS, ExitCode, PollinateError, exit_code_of

E = ExitCode

# (command path, args after it; {tmp}: a fresh folder; {file}: a file in it), expected code
CASES: list[tuple[str, tuple[str, ...], ExitCode]] = [
    ("simulate", ("--preset", "nope"), E.CONFIG),
    ("simulate", ("--resume", "{tmp}/missing"), E.CHECKPOINT),
    ("simulate", ("--data", "{tmp}/missing.npz", "-n", "2", "--run-dir", "{tmp}/r"), E.DATA),
    ("simulate", ("--rounds", "many"), E.CONFIG),  # click's own usage error
    ("simulate", ("--model", "nosuchmodule_xyz:Net", "--run-dir", "{tmp}/r"), E.CONFIG),
    ("simulate", ("--app", "{tmp}"), E.CONFIG),  # no pyproject.toml there
    ("new", ("9lives", "--dir", "{tmp}/a"), E.CONFIG),
    ("new", ("my-app", "--dir", "{tmp}"), E.CONFIG),  # the folder exists
    ("report", ("{tmp}/missing",), E.CHECKPOINT),
    ("export", ("{tmp}/missing",), E.CHECKPOINT),
    ("export", ("{tmp}", "--format", "bogus"), E.CONFIG),
    ("keygen", ("{file}", "{tmp}/key.pub"), E.CONFIG),
    ("certs", ("{file}",), E.CONFIG),
    ("serve", ("--repository", "{tmp}/missing"), E.REPOSITORY),
    ("serve", ("--repository", "{tmp}", "--registry", "cnn", "--tracking-uri", ""), E.CONFIG),
    ("serve ab status", ("--state-dir", "{tmp}/missing"), E.CONFIG),
    ("serve ab status", ("--state-dir", "{tmp}"), E.CONFIG),  # no experiment saved there
    ("registry list", ("cnn", "--tracking-uri", ""), E.CONFIG),  # no tracking URI
    ("registry promote", ("cnn", "--to", "prod", "--tracking-uri", "http://127.0.0.1:1"), E.CONFIG),
    ("registry rollback", ("cnn", "--tracking-uri", "http://127.0.0.1:1"), E.REGISTRY),
    ("registry sync", ("cnn", "--repository", "{tmp}/m", "--tracking-uri", ""), E.CONFIG),
    ("edge predict", ("{tmp}/missing", "{file}"), E.BUNDLE),
    ("edge predict", ("{tmp}", "{file}"), E.BUNDLE),  # the edge bundle case: exit 7, not 1
    ("edge bench", ("{tmp}/missing",), E.BUNDLE),
    ("edge rollback", ("--state-dir", "{tmp}"), E.BUNDLE),
    ("edge status", ("--state-dir", "{tmp}/missing"), E.CONFIG),
    ("edge status", ("--state-dir", "{tmp}", "--check"), E.FAILURE),  # a probe: unhealthy
    ("edge zygote", ("{tmp}/missing/z.sock",), E.CONFIG),
    (
        "edge run",
        (
            "--superlink",
            "127.0.0.1:1",
            "--root-certificates",
            "{file}",
            "--key",
            "{file}",
            "--state-dir",
            "{tmp}/s",
            "--partition-id",
            "0",
            "--num-partitions",
            "2",
            "--zygote",
            "{tmp}/no-zygote.sock",
        ),
        E.CONFIG,
    ),
    (
        "edge run",
        (
            "--superlink",
            "127.0.0.1:1",
            "--root-certificates",
            "{file}",
            "--key",
            "{file}",
            "--state-dir",
            "{tmp}/s",
            "--partition-id",
            "0",
            "--num-partitions",
            "2",
            "--poll-interval",
            "0",
        ),
        E.CONFIG,
    ),
    (
        "edge run",
        (
            "--superlink",
            "127.0.0.1:1",
            "--root-certificates",
            "{file}",
            "--key",
            "{file}",
            "--state-dir",
            "{tmp}/s",
            "--partition-id",
            "0",
            "--num-partitions",
            "2",
            "--emulate-latency",
            "median=2,slow=0.1",
        ),
        E.CONFIG,
    ),
    (
        "edge run",
        (
            "--superlink",
            "127.0.0.1:1",
            "--root-certificates",
            "{tmp}/no.crt",
            "--key",
            "{file}",
            "--state-dir",
            "{tmp}/s",
        ),
        E.CONFIG,
    ),
    (
        "edge run",
        (
            "--superlink",
            "127.0.0.1:1",
            "--root-certificates",
            "{file}",
            "--key",
            "{file}",
            "--state-dir",
            "{tmp}/lost",
            "--partition-id",
            "0",
            "--num-partitions",
            "2",
        ),
        E.LEDGER,
    ),
    ("server start", ("--certs", "{tmp}/missing", "--state-dir", "{tmp}/st"), E.CONFIG),
    ("server trust", ("--state-dir", "{tmp}", "{tmp}/missing.pub"), E.CONFIG),
    ("server nodes", ("--state-dir", "{tmp}/missing"), E.SUPERLINK),
    ("server run", ("--state-dir", "{tmp}/missing"), E.SUPERLINK),
    ("server status", ("--state-dir", "{tmp}/missing"), E.CONFIG),
    ("server stop", ("1", "--state-dir", "{tmp}/missing"), E.SUPERLINK),
    ("server logs", ("--state-dir", "{tmp}/missing"), E.CONFIG),
    ("server resume", ("1", "--state-dir", "{tmp}/missing"), E.CONFIG),
    ("server pull", ("1", "--state-dir", "{tmp}/missing"), E.CONFIG),
]
# commands that cannot fail on input
NO_INPUT = {"exit-codes", "version"}


@pytest.fixture(autouse=True)
def _package_logger_untouched() -> Iterator[None]:
    """Commands run in-process set up logging (``edge run``, ``serve``); later tests must
    find the package logger as an import leaves it."""
    logger = logging.getLogger("pollinate")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    levels = {name: logging.getLogger(name).level for name in ("flwr", "ray")}
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _leaf_commands(group: click.Group, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            if cmd.invoke_without_command:  # a command with subcommands (`serve`)
                out.add(path)
            out |= _leaf_commands(cmd, path + " ")
        else:
            out.add(path)
    return out


def test_every_command_is_checked_here() -> None:
    commands = _leaf_commands(typer.main.get_group(app))
    assert {"simulate", "edge predict", "server pull"} <= commands  # the walk found them
    assert commands - NO_INPUT == {path for path, _, _ in CASES}


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    CASES,
    ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)],
)
def test_a_bad_input_ends_with_the_code_of_the_table(
    command: str,
    args: tuple[str, ...],
    expected: ExitCode,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / ".flwr"))
    a_file = tmp_path / "a-file"
    a_file.write_text("not a key, a bundle or a folder\n")
    lost = tmp_path / "lost"  # a device that has an identity but lost its ledger
    lost.mkdir()
    (lost / "device-id").write_text("d0\n")
    argv = [*command.split(), *(a.format(tmp=tmp_path, file=a_file) for a in args)]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == expected, (argv, result.output, result.exception)
    assert expected in EXIT_MEANINGS
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"a traceback, not a message: {result.exception!r}"
    )
    assert "Traceback" not in result.output
    if expected != ExitCode.FAILURE:
        assert result.output.strip(), "a failure must say what is wrong"
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    new = [p for p in written if p not in before and not str(p).startswith(".flwr")]
    assert new == [] or expected == ExitCode.LEDGER, f"a failed command wrote {new}"


def test_the_edge_runtimes_own_errors_carry_the_registrys_codes() -> None:
    """The edge runtime imports nothing of pollinate, so its errors repeat the numbers."""
    assert BundleError.exit_code == ExitCode.BUNDLE
    assert InputError.exit_code == ExitCode.CONFIG
    assert RuntimeMissingError.exit_code == ExitCode.RUNTIME_MISSING
    assert exit_code_of(BundleError("x")) is ExitCode.BUNDLE
    assert exit_code_of(RuntimeMissingError("x")) is ExitCode.RUNTIME_MISSING


def test_every_error_class_has_a_registered_nonzero_code() -> None:
    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    import pollinate.ops.superlink  # noqa: F401 (SuperLinkError)

    for cls in subclasses(PollinateError):
        assert isinstance(cls.exit_code, ExitCode), cls.__name__
        assert cls.exit_code != ExitCode.OK and cls.exit_code in EXIT_MEANINGS, cls.__name__
    assert exit_code_of(ValueError("a bug")) is ExitCode.FAILURE
    assert exit_code_of(KeyboardInterrupt()) is ExitCode.INTERRUPTED


def test_exit_codes_prints_the_whole_table() -> None:
    result = CliRunner().invoke(app, ["exit-codes"])
    assert result.exit_code == 0
    lines = [line.split(None, 1) for line in result.output.strip().splitlines()]
    assert [(int(c), m) for c, m in lines] == [(int(c), m) for c, m in EXIT_MEANINGS.items()]
