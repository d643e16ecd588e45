"""The layout holds: import contracts kept (and able to break), no module over 400 lines,
tests independent of benchmarks/, and every package named on the architecture page."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pollinate"
MAX_LINES = 400
GENERATED = {
    "pollinate/serving/proto/kserve_v2_pb2.py",
    "pollinate/serving/proto/kserve_v2_pb2_grpc.py",
}


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(script), "--no-cache", str(cwd / "pyproject.toml")],
        cwd=cwd,
        env={"PATH": str(script.parent), "PYTHONPATH": str(cwd)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_contracts_hold() -> None:
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("errors.py", "from pollinate.cli import main"),  # upward: a lower layer imports cli
        ("clientapp/policy.py", "from pollinate.serverapp import strategy"),  # sideways up
        ("edge_runtime/errors.py", "import pollinate.errors"),  # the runtime imports nothing
    ],
)
def test_an_upward_import_breaks_the_contracts(tmp_path: Path, module: str, line: str) -> None:
    """The check can fail: the same contracts on a copy of the package with one bad import."""
    shutil.copytree(PACKAGE, tmp_path / "pollinate", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "pollinate" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert "BROKEN" in proc.stdout, proc.stdout


def test_a_cycle_between_sibling_modules_breaks_the_contracts(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "pollinate", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    # serving.config is imported by serving.server; a lazy import back closes a cycle
    target = tmp_path / "pollinate" / "serving" / "config.py"
    target.write_text(
        target.read_text()
        + "\n\ndef _late() -> None:\n    import pollinate.serving.server  # noqa\n"
    )
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0 and "No import cycles" in proc.stdout, proc.stdout


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
        and str(p.relative_to(ROOT)) not in GENERATED
    }
    assert long == {}, f"split these by responsibility: {long}"


def test_tests_import_nothing_from_benchmarks() -> None:
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "benchmarks"
            ]
    assert offenders == []


def test_the_architecture_page_names_every_package() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    packages = sorted(
        p.parent.name for p in PACKAGE.glob("*/__init__.py") if p.parent.name != "proto"
    )
    assert len(packages) >= 10
    missing = [name for name in packages if f"{name}/" not in page]
    assert missing == [], f"docs/architecture.md does not place {missing}"
