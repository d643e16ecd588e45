"""No CLI path ends in a traceback for input a user could mistype.

Each case runs the real ``pollinate`` command in its own process, as a user would, and checks
the documented exit code (``pollinate exit-codes``), one error line naming the problem, no
traceback, and that it failed before any simulation started (no Ray, no run directory).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import pollinate
from pollinate import errors
from pollinate.errors import EXIT_MEANINGS as EXIT_CODES

# Printed by the CLI right before it hands over to Flower's simulation engine.
SIMULATION_BANNER = re.compile(r"\d+ clients, \d+ rounds, strategy")
# A case that starts Ray takes 20 s or more; a rejected input takes 1-2 s.
FAST_S = 20.0


def _run(
    env: dict[str, str], cwd: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pollinate", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=120,
    )  # fmt: skip
    return proc, time.monotonic() - start


def _flat(text: str) -> str:
    """Text with rich's line wrapping and box drawing undone, lower-cased."""
    return " ".join(text.replace("│", " ").split()).lower()


def _inputs(root: Path) -> None:
    """Write the mistyped or broken inputs the cases point at."""
    np.savez(root / "no-arrays.npz")
    (root / "zero-bytes.npz").write_bytes(b"")
    (root / "random-bytes.npz").write_bytes(np.random.default_rng(0).bytes(512))
    good = root / "good.npz"
    np.savez(good, x=np.zeros((20, 4), np.float32), y=np.zeros(20, np.int64))
    data = good.read_bytes()
    (root / "truncated.npz").write_bytes(data[: len(data) // 2])
    (root / "no-label.csv").write_text("a,b\n1,2\n3,4\n")
    (root / "notes.txt").write_text("not data\n")
    (root / "empty-folder").mkdir()
    (root / "no-run-json").mkdir()
    (root / "bad-run-json").mkdir()
    (root / "bad-run-json" / "run.json").write_text("{not json")
    (root / "finished-run").mkdir()
    (root / "finished-run" / "LATEST").write_text("checkpoints/round-0001\n")
    (root / "a-file").write_text("")
    (root / "report-bad-json").mkdir()
    (root / "report-bad-json" / "metrics.json").write_text("not json")
    (root / "report-bad-records").mkdir()
    (root / "report-bad-records" / "metrics.json").write_text("[1, 2]")
    (root / "report-bad-run-json").mkdir()
    (root / "report-bad-run-json" / "metrics.json").write_text("[]")
    (root / "report-bad-run-json" / "run.json").write_text("[1]")
    (root / "report-bad-privacy").mkdir()
    (root / "report-bad-privacy" / "metrics.json").write_text("[]")
    (root / "report-bad-privacy" / "privacy.json").write_text('{"ledger": {}}')
    (root / "report-bad-privacy" / "run.json").write_text('{"settings": {}}')


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    code: int
    words: tuple[str, ...]

    def argv(self, root: Path) -> list[str]:
        return [a.format(tmp=root) for a in self.args]


def _sim(*args: str, code: int, words: tuple[str, ...]) -> Case:
    return Case(("simulate", *args), code, words)


CASES: dict[str, Case] = {
    # ----------------------------------------------------------------- data (3)
    "missing-data": _sim(
        "--data", "/nonexistent/file.npz", code=3,
        words=("/nonexistent/file.npz", "does not exist"),
    ),
    "npz-without-arrays": _sim(
        "--data", "{tmp}/no-arrays.npz", code=3, words=("no-arrays.npz", "no array 'x'"),
    ),
    "empty-npz": _sim("--data", "{tmp}/zero-bytes.npz", code=3, words=("zero-bytes.npz", "empty")),
    "corrupt-npz": _sim(
        "--data", "{tmp}/random-bytes.npz", code=3,
        words=("random-bytes.npz", "not an .npz archive"),
    ),
    "truncated-npz": _sim(
        "--data", "{tmp}/truncated.npz", code=3, words=("truncated.npz", "not a readable .npz"),
    ),
    "csv-without-label": _sim(
        "--data", "{tmp}/no-label.csv", code=3, words=("no-label.csv", "no 'label'"),
    ),
    "unsupported-format": _sim(
        "--data", "{tmp}/notes.txt", code=3, words=("notes.txt", "unsupported format"),
    ),
    "empty-image-folder": _sim(
        "--data", "{tmp}/empty-folder", code=3, words=("empty-folder", "is empty"),
    ),
    # ----------------------------------------------------------------- settings (2)
    "negative-epsilon-budget": _sim(
        "--epsilon-budget", "-1", code=2, words=("epsilon-budget", "negative"),
    ),
    "negative-target-epsilon": _sim(
        "--target-epsilon", "-3", code=2, words=("target-epsilon", "negative"),
    ),
    "unknown-model": _sim("--model", "vgg", code=2, words=("model", "'vgg'", "cnn")),
    "unknown-strategy": _sim(
        "--strategy", "fedsgd", code=2, words=("strategy", "'fedsgd'", "fedavg"),
    ),
    "unknown-partitioner": _sim(
        "--partitioner", "random", code=2, words=("partitioner", "'random'", "dirichlet"),
    ),
    "unknown-dp": _sim("--dp", "laplace", code=2, words=("'dp'", "'laplace'", "sample")),
    "zero-rounds": _sim("--rounds", "0", code=2, words=("num-server-rounds", "positive")),
    "zero-clients": _sim("--num-clients", "0", code=2, words=("--num-clients", "at least 1")),
    "unknown-engine": _sim("--engine", "warp", code=2, words=("--engine", "'warp'", "fast, ray")),
    "more-clients-than-samples": _sim(
        "--num-clients", "5000", code=2, words=("num_partitions", "resample"),
    ),
    "negative-samples-per-client": _sim(
        "--set", "samples-per-client=-4", code=2, words=("samples-per-client", ">= 0"),
    ),
    "fraction-above-one": _sim("--fraction", "2", code=2, words=("fraction-train", "(0, 1]")),
    "nan-noise": _sim("--noise", "nan", code=2, words=("noise-multiplier", "finite")),
    "set-not-a-number": _sim(
        "--set", "learning-rate=fast", code=2, words=("learning-rate", "number", "'fast'"),
    ),
    "set-unknown-key": _sim(
        "--set", "nonsense-key=1", code=2, words=("unknown setting", "nonsense-key"),
    ),
    # brackets in a message are text, not rich markup (it used to print 'num-rounds')
    "set-key-with-brackets": _sim(
        "--set", "num-rounds[x]=1", code=2, words=("unknown setting", "'num-rounds[x]'"),
    ),
    "set-without-equals": _sim(
        "--set", "missing-equals", code=2, words=("key=value", "missing-equals"),
    ),
    "unknown-preset": _sim("--preset", "nope", code=2, words=("unknown preset", "'nope'", "demo")),
    # ---------------------------------------------------------- Typer usage errors (2)
    "not-an-integer": _sim("--rounds", "abc", code=2, words=("--rounds", "not a valid integer")),
    "unknown-option": _sim("--epochs", "3", code=2, words=("no such option", "--epochs")),
    "unknown-command": Case(("simulat",), 2, ("no such command", "simulat")),
    "report-without-dir": Case(("report",), 2, ("missing argument", "run_dir")),
    # ----------------------------------------------------------- run directory (5)
    "resume-missing-dir": _sim(
        "--resume", "/nonexistent", code=5, words=("/nonexistent", "no run.json"),
    ),
    "resume-without-run-json": _sim(
        "--resume", "{tmp}/no-run-json", code=5, words=("no-run-json", "no run.json"),
    ),
    "resume-corrupt-run-json": _sim(
        "--resume", "{tmp}/bad-run-json", code=5, words=("run.json", "corrupt"),
    ),
    "run-dir-holds-a-run": _sim(
        "--run-dir", "{tmp}/finished-run", code=5,
        words=("finished-run", "already holds a run", "--resume"),
    ),
    "run-dir-is-a-file": _sim(
        "--run-dir", "{tmp}/a-file", code=5, words=("a-file", "is a file", "--run-dir"),
    ),
    "run-dir-below-a-file": _sim(
        "--run-dir", "{tmp}/a-file/run", code=5, words=("a-file", "is a file", "--run-dir"),
    ),
    "report-missing-dir": Case(
        ("report", "/nonexistent"), 5, ("/nonexistent", "no metrics.json"),
    ),
    "report-corrupt-metrics": Case(
        ("report", "{tmp}/report-bad-json"), 5, ("report-bad-json", "cannot read"),
    ),
    "report-malformed-records": Case(
        ("report", "{tmp}/report-bad-records"), 5, ("report-bad-records", "malformed"),
    ),
    "report-malformed-run-json": Case(
        ("report", "{tmp}/report-bad-run-json"), 5, ("report-bad-run-json", "malformed"),
    ),
    "report-privacy-without-summary": Case(
        ("report", "{tmp}/report-bad-privacy"), 5, ("report-bad-privacy", "malformed"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_mistyped_input_fails_fast_with_one_clear_message(
    name: str, tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    case = CASES[name]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _inputs(inputs)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = sorted(p.name for p in inputs.rglob("*"))

    proc, seconds = _run(e2e_env, cwd, *case.argv(inputs))

    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    assert "allow_pickle" not in out  # never advise unpickling a file from elsewhere
    assert proc.returncode == case.code, out[-3000:]
    assert proc.returncode in EXIT_CODES
    stderr = _flat(proc.stderr)
    for word in case.words:
        assert word.lower() in stderr, f"{word!r} not in: {proc.stderr}"
    if case.code != 2 or "error:" in stderr:
        # pollinate's own errors: exactly one red line, nothing on stdout.
        assert len(re.findall(r"^error:", proc.stderr, re.MULTILINE)) == 1, proc.stderr
        assert proc.stdout.strip() == "", proc.stdout
    # It failed before the simulation: no banner, no Ray start-up, nothing written.
    assert not SIMULATION_BANNER.search(stderr), proc.stderr
    assert seconds < FAST_S, f"took {seconds:.1f}s: did it start a simulation?"
    assert list(cwd.iterdir()) == [], "a failed command wrote into the working directory"
    assert sorted(p.name for p in inputs.rglob("*")) == before


def test_every_error_class_has_a_documented_exit_code() -> None:
    def subclasses(cls: type[errors.PollinateError]) -> list[type[errors.PollinateError]]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    found = subclasses(errors.PollinateError)
    assert {errors.ConfigError, errors.DataError, errors.CheckpointError} <= set(found)
    for cls in found:
        assert cls.exit_code in EXIT_CODES, f"{cls.__name__}.exit_code {cls.exit_code}"
        assert cls.exit_code != 0, cls.__name__
    assert errors.ConfigError.exit_code == 2
    assert errors.DataError.exit_code == 3
    assert errors.PrivacyBudgetError.exit_code == 4
    assert errors.CheckpointError.exit_code == 5


def test_help_lists_the_commands(tmp_path: Path, e2e_env: dict[str, str]) -> None:
    proc, _ = _run(e2e_env, tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("simulate", "report", "exit-codes", "version"):
        assert command in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_no_arguments_prints_help(tmp_path: Path, e2e_env: dict[str, str]) -> None:
    proc, _ = _run(e2e_env, tmp_path)
    assert proc.returncode in (0, 2)  # click >= 8.2 exits 2 after the help
    assert "simulate" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_simulate_help_has_examples_and_the_flags(tmp_path: Path, e2e_env: dict[str, str]) -> None:
    proc, _ = _run(e2e_env, tmp_path, "simulate", "--help")
    assert proc.returncode == 0, proc.stderr
    text = _flat(proc.stdout)
    assert "examples" in text
    assert "pollinate simulate --preset demo" in text
    for flag in ("--preset", "--num-clients", "--rounds", "--data", "--target-epsilon",
                 "--epsilon-budget", "--resume", "--run-dir", "--set"):  # fmt: skip
        assert flag in text, flag


def test_exit_codes_lists_every_documented_code(tmp_path: Path, e2e_env: dict[str, str]) -> None:
    proc, _ = _run(e2e_env, tmp_path, "exit-codes")
    assert proc.returncode == 0, proc.stderr
    text = _flat(proc.stdout)
    for code, meaning in EXIT_CODES.items():
        assert f"{code} {meaning}".lower() in text, code


def test_version_prints_the_package_version(tmp_path: Path, e2e_env: dict[str, str]) -> None:
    proc, _ = _run(e2e_env, tmp_path, "version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == pollinate.__version__


def test_a_good_report_still_works(tmp_path: Path, e2e_env: dict[str, str]) -> None:
    """The widened error handling of `report` leaves a well-formed run directory readable."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"server_round": 0, "accuracy": 0.1, "loss": 2.3}
    (run_dir / "metrics.json").write_text(json.dumps([record]))
    (run_dir / "run.json").write_text(json.dumps({"settings": {"dp": "none"}, "population": 2}))
    proc, _ = _run(e2e_env, tmp_path, "report", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "summary.md").exists()
    assert "Traceback" not in proc.stdout + proc.stderr


# ------------------------------------------- one message, one line, whatever the path or width
def _long_path(root: Path) -> Path:
    """A path of over 200 characters below ``root``, with spaces where rich would wrap."""
    path = root / "a folder with spaces in its name"
    while len(str(path)) <= 220:
        path = path / f"deeper-{len(path.parts):02d}-{'x' * 40}"
    return path


# args ({long}: the long path), exit code, words that must be on the error line with the path
ONE_LINE_CASES: dict[str, tuple[tuple[str, ...], int, tuple[str, ...]]] = {
    "report": (
        ("report", "{long}"), 5, ("has no metrics.json", "is it a pollinate run directory?"),
    ),
    "simulate-resume": (
        ("simulate", "--resume", "{long}"), 5,
        ("is not a pollinate run directory (no run.json)", "`pollinate simulate` wrote"),
    ),
    "edge-status": (
        ("edge", "status", "--state-dir", "{long}"), 2,
        ("holds no daemon state", "is it the --state-dir?"),
    ),
    "export": (("export", "{long}"), 5, ("is not a pollinate run directory", "pollinate simulate")),
    "server-nodes": (
        ("server", "nodes", "--state-dir", "{long}"), 10,
        ("is not the state directory of a federation", "--state-dir it uses"),
    ),
    # click's own usage error, and its hint on the next line
    "typer-bad-value": (
        ("simulate", "--rounds", "{long}"), 2,
        ("invalid value for '--rounds'", "not a valid integer"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ONE_LINE_CASES))
def test_an_error_is_one_line_for_any_path_length_and_width(
    name: str, tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    """In a pipe, with a 200+ character path and COLUMNS=40, the whole message is one line."""
    args, code, words = ONE_LINE_CASES[name]
    long = _long_path(tmp_path)
    assert len(str(long)) > 200
    env = {**e2e_env, "COLUMNS": "40"}

    proc, _ = _run(env, tmp_path, *(a.format(long=long) for a in args))

    assert proc.returncode == code, proc.stderr
    assert "\x1b[" not in proc.stderr, "colour codes in a pipe"
    assert proc.stdout == "", proc.stdout
    first, *rest = proc.stderr.splitlines()
    assert first.startswith("error: "), proc.stderr
    assert str(long) in first, f"the path is cut:\n{proc.stderr}"
    for word in words:
        assert word.lower() in first.lower(), f"{word!r} is not on the error line:\n{proc.stderr}"
    if name.startswith("typer-"):  # click's usage error: one hint line, whole, after it
        assert len(rest) == 1, proc.stderr
        assert rest[0].startswith("Usage: ") and rest[0].endswith("--help' for help"), rest[0]
    else:
        assert rest == [], f"more than the one error line:\n{proc.stderr}"


def _on_a_terminal(env: dict[str, str], cwd: Path, *args: str) -> str:
    """The command's stderr when it is a terminal (a pseudo-terminal), line ends as written."""
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    try:
        subprocess.run(
            [sys.executable, "-m", "pollinate", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
            env=env, cwd=cwd, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_on_a_terminal_errors_stay_rich_and_no_color_and_dumb_are_honoured(
    tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    long = _long_path(tmp_path)
    env = {**e2e_env, "COLUMNS": "40", "TERM": "xterm-256color"}
    for unset in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE"):
        env.pop(unset, None)
    colour = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-8]|9[0-7])[;m]")  # a foreground colour

    rich = _on_a_terminal(env, tmp_path, "report", str(long))
    assert colour.search(rich), repr(rich)  # red "error:", as before
    assert all(len(line) <= 40 for line in re.sub(r"\x1b\[[0-9;]*m", "", rich).splitlines())
    assert "has no metrics.json" in _flat(re.sub(r"\x1b\[[0-9;]*m", "", rich))

    no_color = _on_a_terminal({**env, "NO_COLOR": "1"}, tmp_path, "report", str(long))
    assert "error:" in no_color and not colour.search(no_color), repr(no_color)

    dumb = _on_a_terminal({**env, "TERM": "dumb"}, tmp_path, "report", str(long))
    assert "\x1b[" not in dumb, repr(dumb)
    assert dumb.splitlines() == [
        f"error: {long} has no metrics.json; is it a pollinate run directory?"
    ]
