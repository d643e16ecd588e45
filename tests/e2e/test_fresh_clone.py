"""The README's test command passes from a fresh clone in a deep folder, as a new user's would.

A ``git clone`` of the committed tree goes into a folder whose path is over 150 characters
(with spaces), and the suite's CLI-error tests run there, with their temporary files below it
too, so every path in the messages they check is long. Only committed files are cloned: this
checks the committed tree, not the working tree's uncommitted changes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The CLI-error cases that print paths (and the one-line checks, where the tree has them):
# about 15 CLI runs, 40 s on two cores.
SUBSET = (
    "resume-without or resume-corrupt or run-dir-holds or run-dir-is or report-missing "
    "or report-corrupt or unknown-option or not-an-integer or one_line"
)


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed: no clone to test")
    return subprocess.run([git, *args], capture_output=True, text=True, timeout=60, check=False)


def test_cli_error_tests_pass_from_a_fresh_clone_in_a_deep_folder(
    tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    top = _git("-C", str(REPO), "rev-parse", "--show-toplevel")
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO:
        pytest.skip(f"{REPO} is not a git checkout: nothing to clone")
    if _git("-C", str(REPO), "cat-file", "-e", "HEAD:tests/e2e/test_cli_errors.py").returncode:
        pytest.skip("the CLI-error tests are not committed yet: a clone would not have them")
    deep = tmp_path / "a new user's folder"
    while len(str(deep)) < 160:
        deep = deep / f"projects and clones {len(deep.parts):02d}"
    clone = _git("clone", "--quiet", str(REPO), str(deep / "pollinate"))
    assert clone.returncode == 0, clone.stderr
    root = deep / "pollinate"
    assert len(str(root)) >= 150

    env = {**e2e_env, "PYTHONPATH": str(root)}
    env.pop("COLUMNS", None)  # the clone's own tests choose their widths
    where = subprocess.run(
        [sys.executable, "-c", "import pollinate; print(pollinate.__file__)"],
        capture_output=True, text=True, cwd=root, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve().is_relative_to(root), where.stdout

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/e2e/test_cli_errors.py", "-q", "-x",
         "-p", "no:cacheprovider", "-k", SUBSET, f"--basetemp={root / '.pytest-tmp'}"],
        capture_output=True, text=True, cwd=root, env=env, timeout=300, check=False,
    )  # fmt: skip
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed is not None and int(passed.group(1)) >= 8, tail
