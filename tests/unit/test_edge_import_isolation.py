"""The edge runtime runs where torch and flwr cannot even be imported.

A fresh interpreter gets stub ``torch`` and ``flwr`` packages first on its path that raise
ImportError when imported; it then loads a real bundle and predicts. Afterwards neither
name may be in ``sys.modules``, nor any pollinate module outside the edge runtime, and
only the one runtime the bundle needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pollinate.export._bundle import generate_signing_key, write_bundle
from tests.support import REPO
from tests.support.bundles import make_sources, reference

CHILD = """
import json, sys
import numpy as np
import pollinate.edge_runtime as er

after_import = sorted(m for m in sys.modules if m.split(".")[0] in (
    "pollinate", "onnxruntime", "openvino", "cryptography", "torch", "flwr"))
kwargs = {"public_key": sys.argv[2]} if len(sys.argv) > 2 else {}
model = er.load_bundle(sys.argv[1], **kwargs)
x = np.linspace(-1, 1, 3 * 64, dtype=np.float32).reshape(3, 1, 8, 8)
print(json.dumps({
    "logits": model.predict(x).tolist(),
    "labels": model.predict_labels(np.zeros((8, 8), np.uint8)),
    "after_import": after_import,
    "modules": sorted(sys.modules),
}))
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A signed bundle with an onnxruntime and an OpenVINO artifact, plus stub packages."""
    base = tmp_path_factory.mktemp("isolation")
    manifest, files = make_sources(base / "src")
    generate_signing_key(base / "k.key", base / "k.pub")
    out = write_bundle(base / "tiny-1", manifest, files, private_key=base / "k.key")
    stubs = base / "stubs"
    for name in ("torch", "flwr"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(
            f'raise ImportError("blocked: the edge runtime must not import {name}")\n'
        )
    return {"tar": base / "tiny-1.tar.gz", "dir": out, "pub": base / "k.pub", "stubs": stubs}


def _run_child(bundle: dict[str, Path], *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    env["PYTHONPATH"] = os.pathsep.join([str(bundle["stubs"]), str(REPO)])
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        env=env,
        cwd=bundle["stubs"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_stubs_really_block(bundle: dict[str, Path]) -> None:
    env = dict(os.environ, PYTHONPATH=str(bundle["stubs"]))
    proc = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0 and "blocked" in proc.stderr


def test_edge_runtime_runs_without_torch_flwr_or_other_pollinate_modules(
    bundle: dict[str, Path],
) -> None:
    result = _run_child(bundle, str(bundle["tar"]))
    x = np.linspace(-1, 1, 3 * 64, dtype=np.float32).reshape(3, 1, 8, 8)
    np.testing.assert_allclose(np.array(result["logits"]), reference(x), atol=1e-5)
    assert isinstance(result["labels"], list) and len(result["labels"]) == 1
    modules = set(result["modules"])
    assert "torch" not in modules and "flwr" not in modules
    pollinate = {m for m in modules if m == "pollinate" or m.startswith("pollinate.")}
    outside = {
        m for m in pollinate if m not in ("pollinate", "pollinate.errors")
        and not m.startswith("pollinate.edge_runtime")
    }  # fmt: skip
    assert outside == set(), outside  # no pollinate.export, .server, .models, ...
    assert "onnxruntime" in modules  # the one runtime the chosen artifact needs ...
    assert not {m for m in modules if m.split(".")[0] in ("openvino", "cryptography")}
    # ... and importing the package alone loads no runtime at all
    assert not [m for m in result["after_import"] if not m.startswith("pollinate")]


def test_signature_check_imports_cryptography_only_then(bundle: dict[str, Path]) -> None:
    result = _run_child(bundle, str(bundle["dir"]), str(bundle["pub"]))
    modules = set(result["modules"])
    assert "cryptography" in modules
    assert "torch" not in modules and "flwr" not in modules


def test_the_device_daemon_and_its_ledger_load_without_torch() -> None:
    """The daemon is one of three processes a device keeps running: it must not pay for
    torch (about 180 MB), which only its ClientApp's executor needs."""
    code = (
        "import sys\n"
        "import pollinate.cli.edge, pollinate.device.daemon, pollinate.device.ledger\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'opacus')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
