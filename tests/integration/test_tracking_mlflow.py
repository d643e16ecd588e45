"""MLflow tracking and the model registry against a real ``mlflow server`` on loopback.

One server for the module (SQLite backend, local artifacts); one small tracked simulation and
one export of it, shared by the tests that read what they logged and registered.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pollinate.cli.main import app
from pollinate.errors import ExitCode, ExportError
from pollinate.rundir.model_registry import lineage_of, register_bundle
from pollinate.rundir.tracking import DEFAULT_STORE, TRACKING_ENV, TRACKING_FILE
from tests.support.mlflow_server import MlflowServer, start_mlflow
from tests.support.processes import POLLINATE, free_port, wait_until
from tests.support.simulation import simulate, simulate_command, simulate_env

pytest.importorskip("mlflow")

# reproducible-noise (test-only, NOT PRIVATE): the untracked run must equal the tracked one
RUN = ("--preset", "quick", "--num-clients", "20", "--rounds", "2",
       "--set", "reproducible-noise=true")  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    mlflow = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    try:
        yield mlflow
    finally:
        mlflow.stop()


@pytest.fixture(scope="module")
def tracked_run(server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tracked")
    run_dir = tmp / "run"
    proc = simulate(
        tmp, *RUN, "--run-dir", str(run_dir), "--tracking-uri", server.uri,
        "--set", f"export-dir={tmp / 'end-bundle'}", "--set", "export-formats=onnx",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tracking:" not in proc.stderr, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def exported(server: MlflowServer, tracked_run: Path) -> Path:
    """The tracked run exported (ONNX FP32 only) and registered through `pollinate export`."""
    proc = subprocess.run(
        [*POLLINATE, "export", str(tracked_run), "--format", "onnx", "--precision", "fp32",
         "--tracking-uri", server.uri],
        capture_output=True, text=True, timeout=300, env=simulate_env(tracked_run.parent),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered cnn version" in proc.stdout, proc.stdout[-2000:]
    return tracked_run.parent / "run" / "bundle.tar.gz"


def _client(server: MlflowServer) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def _mlflow_run_id(run_dir: Path) -> str:
    return str(json.loads((run_dir / TRACKING_FILE).read_text())["run_id"])


def _registry(*args: str, server: MlflowServer) -> Any:
    return CliRunner().invoke(app, ["registry", *args, "--tracking-uri", server.uri])


def test_a_tracked_simulation_logs_params_round_metrics_and_files(
    server: MlflowServer, tracked_run: Path
) -> None:
    client = _client(server)
    run = client.get_run(_mlflow_run_id(tracked_run))
    assert run.info.status == "FINISHED"
    assert run.data.params["num-server-rounds"] == "2"
    assert run.data.params["tracking-uri"] == server.uri
    assert run.data.tags["pollinate.run"] == "run"
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    for name, key in (("accuracy", "accuracy"), ("max_epsilon", "max_epsilon"),
                      ("sampled", "sampled"), ("replied", "replied")):  # fmt: skip
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name
        by_step = {m.step: m.value for m in history}
        assert by_step == pytest.approx({r["server_round"]: r[key] for r in metrics[1:]}), name
    files = {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    assert {"run/summary.md", "run/privacy.json", "run/metrics.json", "run/plots"} <= files
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "run/plots")}
    assert "run/plots/accuracy.png" in plots
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert model == {"model/model.safetensors"}


def test_an_unreachable_tracking_uri_is_one_warning_and_the_same_run(
    tracked_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    dead = f"http://127.0.0.1:{free_port()}"
    proc = simulate(tmp_path, *RUN, "--run-dir", str(run_dir), "--tracking-uri", dead)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "tracking:" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert not (run_dir / TRACKING_FILE).exists()

    def rows(folder: Path) -> list[dict[str, Any]]:
        found = json.loads((folder / "metrics.json").read_text())
        clocks = ("seconds", "elapsed_s")  # wall-clock times differ from run to run
        return [{k: v for k, v in r.items() if k not in clocks} for r in found]

    assert rows(run_dir) == rows(tracked_run)


def test_export_registers_a_candidate_version_with_its_lineage(
    server: MlflowServer, tracked_run: Path, exported: Path
) -> None:
    client = _client(server)
    version = client.get_model_version_by_alias("cnn", "candidate")
    tags = version.tags
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    assert tags["pollinate.run"] == "run"
    assert tags["mlflow.run_id"] == _mlflow_run_id(tracked_run) == version.run_id
    assert tags["pollinate.round"] == "2"
    assert float(tags["pollinate.epsilon"]) == pytest.approx(metrics[-1]["max_epsilon"])
    assert float(tags["pollinate.accuracy"]) == pytest.approx(metrics[-1]["accuracy"])
    manifest = json.loads((tracked_run / "bundle" / "manifest.json").read_text())
    assert manifest["model"]["source_round"] == 2

    assert tags["pollinate.sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()
    assert version.version == "2"  # 1: the run's own end-of-run export
    assert tags["pollinate.validation"] == "passed"


def test_the_end_of_run_export_is_registered_too(
    server: MlflowServer, tracked_run: Path, exported: Path
) -> None:
    client = _client(server)
    first = client.get_model_version("cnn", "1")  # registered before `pollinate export` ran
    assert first.tags["pollinate.validation"] == "passed"
    assert first.tags["mlflow.run_id"] == _mlflow_run_id(tracked_run)
    archive = tracked_run.parent / "end-bundle.tar.gz"

    assert first.tags["pollinate.sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert client.get_model_version_by_alias("cnn", "candidate").version == "2"  # the newest


def test_promote_and_rollback_move_the_aliases(
    server: MlflowServer, tracked_run: Path, exported: Path
) -> None:
    client = _client(server)
    first = client.get_model_version_by_alias("cnn", "candidate").version
    assert _registry("promote", "cnn", server=server).exit_code == 0  # candidate -> staging
    assert client.get_model_version_by_alias("cnn", "staging").version == first
    result = _registry("promote", "cnn", "--to", "production", server=server)
    assert result.exit_code == 0, result.output
    lineage = lineage_of(tracked_run, exported, server_round=2, accuracy=0.5)
    second = register_bundle(server.uri, tracked_run, "cnn", [exported], lineage)
    assert client.get_model_version_by_alias("cnn", "candidate").version == second != first
    result = _registry("promote", "cnn", second, "--to", "production", server=server)
    assert result.exit_code == 0, result.output
    assert client.get_model_version_by_alias("cnn", "production").version == second
    result = _registry("rollback", "cnn", server=server)
    assert result.exit_code == 0, result.output
    assert client.get_model_version_by_alias("cnn", "production").version == first
    listing = _registry("list", "cnn", server=server)
    assert listing.exit_code == 0 and "production" in listing.output, listing.output


def test_a_version_that_failed_export_validation_is_registered_but_never_promoted(
    server: MlflowServer, tracked_run: Path, exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(name: str, *_args: Any, **_kwargs: Any) -> None:
        raise ExportError(f"{name}: accuracy dropped by 3 points (at most 1 allowed)")

    monkeypatch.setattr("pollinate.export.pipeline.check_tolerances", fail)
    out = tracked_run.parent / "failed-bundle"
    argv = ["export", str(tracked_run), "--out", str(out), "--format", "onnx",
            "--precision", "fp32", "--tracking-uri", server.uri]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == ExitCode.EXPORT, result.output
    client = _client(server)
    versions = client.search_model_versions("name = 'cnn'")
    failed = max(versions, key=lambda v: int(v.version))
    assert failed.tags["pollinate.validation"] == "failed"
    assert "accuracy dropped" in failed.tags["pollinate.validation_error"]
    result = _registry("promote", "cnn", str(failed.version), "--to", "production", server=server)
    assert result.exit_code == ExitCode.REGISTRY, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "failed its export validation" in lines[0], result.output
    staged = client.get_model_version_by_alias("cnn", "production").version
    assert staged != failed.version


def test_sync_writes_production_and_a_newer_staging_into_a_serving_repository(
    server: MlflowServer, tracked_run: Path, exported: Path
) -> None:
    from pollinate.serving.repository import scan_model

    client = _client(server)
    production = int(client.get_model_version_by_alias("cnn", "production").version)
    newest_passed = max(
        int(v.version)
        for v in client.search_model_versions("name = 'cnn'")
        if v.tags.get("pollinate.validation") == "passed"
    )
    assert newest_passed > production  # the promote test rolled production back
    assert _registry("promote", "cnn", str(newest_passed), server=server).exit_code == 0
    repo = tracked_run.parent / "models"
    result = _registry("sync", "cnn", "--repository", str(repo), server=server)
    assert result.exit_code == 0, result.output
    spec, versions = scan_model(repo / "cnn")
    assert spec.name == "cnn"
    assert sorted(versions) == [production, newest_passed]  # current, and the canary
    again = _registry("sync", "cnn", "--repository", str(repo), server=server)
    assert again.exit_code == 0 and "version" not in again.output, again.output


def test_serve_follows_the_registry_aliases(
    server: MlflowServer, tracked_run: Path, exported: Path
) -> None:
    """`pollinate serve --registry cnn`: the registry's production and (newer) staging
    versions are written into a repository that did not exist, and production serves."""
    import urllib.request

    from tests.support.serving import serve

    client = _client(server)
    aliases = {a: int(client.get_model_version_by_alias("cnn", a).version)
               for a in ("production", "staging")}  # fmt: skip
    repo = tracked_run.parent / "followed"
    with serve(repo, tracked_run.parent, "--registry", "cnn", "--tracking-uri", server.uri,
               "--log-format", "text") as running:  # fmt: skip
        with urllib.request.urlopen(
            f"http://{running.http_url}/v2/models/cnn", timeout=30
        ) as reply:
            metadata = json.loads(reply.read())
        # production is the current version; the newer staging one comes after the start,
        # so the server's roll-out takes it as a canary
        assert metadata["versions"] == [str(aliases["production"])], metadata
        staging = repo / "cnn" / str(aliases["staging"]) / "model.onnx"
        wait_until("the staging version", staging.is_file, 60)


def _served_version(url: str) -> str:
    """The version that answers one unversioned KServe v2 REST request (a fresh connection)."""
    import urllib.request

    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                        "data": [0.0] * 784}]}  # fmt: skip
    request = urllib.request.Request(
        f"http://{url}/v2/models/cnn/infer", data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as reply:
        return str(json.loads(reply.read())["model_version"])


def test_a_registry_rollback_reaches_the_running_server(
    server: MlflowServer, tracked_run: Path, exported: Path
) -> None:
    """`pollinate registry rollback` (a real process) while `pollinate serve --registry` runs:
    the server swaps to the production version it is told, with no canary and no restart."""
    from tests.support.serving import serve

    client = _client(server)
    before = client.get_model_version_by_alias("cnn", "production").version
    newer = client.get_model_version_by_alias("cnn", "staging").version  # the sync test's
    assert int(newer) > int(before)
    assert _registry("promote", "cnn", newer, "--to", "production", server=server).exit_code == 0
    repo = tracked_run.parent / "rolled-back"
    env = {"MLFLOW_TRACKING_URI": server.uri}
    with serve(repo, tracked_run.parent, "--registry", "cnn", "--registry-interval", "1",
               "--poll-interval", "0.2", "--log-format", "text", env=env) as running:  # fmt: skip
        assert {_served_version(running.http_url) for _ in range(10)} == {newer}
        rollback = subprocess.run(
            [*POLLINATE, "registry", "rollback", "cnn"], capture_output=True, text=True,
            timeout=120, env={**os.environ, **env},
        )  # fmt: skip
        assert rollback.returncode == 0, rollback.stderr[-2000:]
        assert f"production -> version {before}" in rollback.stdout, rollback.stdout
        wait_until("the rolled-back version", lambda: _served_version(running.http_url) == before,
                   60)  # fmt: skip
        time.sleep(2.0)  # registry looks and repository scans: no canary of the newer one
        assert {_served_version(running.http_url) for _ in range(20)} == {before}
        log = running.log.read_text()
        assert f"cnn version {before} is now current, following the registry" in log, log[-3000:]
        assert "canary" not in log, log[-3000:]


def test_a_resumed_run_logs_into_the_same_mlflow_run(
    server: MlflowServer, tracked_run: Path
) -> None:
    # last in this module: the tests above read rounds 1..2 of this MLflow run
    before = _mlflow_run_id(tracked_run)
    tmp = tracked_run.parent
    proc = simulate(tmp, "--resume", str(tracked_run), "--rounds", "3",
                    "--tracking-uri", server.uri, "--set", "export-dir=")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tracking:" not in proc.stderr, proc.stderr[-3000:]
    assert _mlflow_run_id(tracked_run) == before
    history = _client(server).get_metric_history(before, "accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]


def _untracked_env(tmp: Path) -> dict[str, str]:
    """A simulation's environment with tracking at its default (the suite turns it off)."""
    drop = (TRACKING_ENV, "MLFLOW_TRACKING_URI")
    return {k: v for k, v in simulate_env(tmp).items() if k not in drop}


def test_tracking_is_on_by_default_in_an_embedded_store(tmp_path: Path) -> None:
    """No tracking URI, no server: the run logs into ./mlflow.db of its working folder."""
    from mlflow.tracking import MlflowClient

    proc = subprocess.run(
        simulate_command(*RUN, "--run-dir", str(tmp_path / "run"), "--set", "export-dir="),
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=_untracked_env(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tracking:" not in proc.stderr and "INFO mlflow" not in proc.stderr, proc.stderr
    store = f"sqlite:///{tmp_path.resolve() / DEFAULT_STORE}"
    linked = json.loads((tmp_path / "run" / TRACKING_FILE).read_text())
    assert linked["tracking_uri"] == store
    client = MlflowClient(tracking_uri=store)
    history = client.get_metric_history(linked["run_id"], "accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    # a later `pollinate export`, from another folder and with no URI, registers the bundle in
    # the store the run was tracked into (it finds it through RUN_DIR/mlflow.json)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [*POLLINATE, "export", str(tmp_path / "run"), "--format", "onnx", "--precision", "fp32",
         "--out", str(elsewhere / "bundle.tar.gz")],
        capture_output=True, text=True, timeout=300, cwd=elsewhere,
        env=_untracked_env(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"registered cnn version 1 (candidate) at {store}" in proc.stdout, proc.stdout
    assert not (elsewhere / DEFAULT_STORE).exists()
    (version,) = client.search_model_versions("name='cnn'")
    assert version.run_id == linked["run_id"]


@pytest.mark.parametrize(
    ("uri", "env", "tracked"),
    [("", {}, True), ("off", {}, False), ("", {TRACKING_ENV: "off"}, False),
     ("OFF", {TRACKING_ENV: "off"}, False)],
)  # fmt: skip
def test_mlflow_is_imported_only_after_the_first_round_and_never_when_off(
    tmp_path: Path, uri: str, env: dict[str, str], tracked: bool
) -> None:
    code = (
        "import sys, pathlib\n"
        "from pollinate.rundir.records import RoundRecord\n"
        "from pollinate.rundir.tracking import open_tracker\n"
        "import pollinate.cli.main, pollinate.serverapp.federation\n"
        f"tracker = open_tracker(pathlib.Path('.'), {uri!r}, {{}})\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported before the first round'\n"
        "tracker.log_round(RoundRecord(1, 0.5, 1.0))\n"
        "tracker.finish(pathlib.Path('.'))\n"
        "print(type(tracker).__name__, 'mlflow' in sys.modules)\n"
    )
    proc = subprocess.run(
        [POLLINATE[0], "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**_untracked_env(tmp_path), **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = "MlflowTracker True" if tracked else "NullTracker False"
    assert proc.stdout.split("\n")[-2] == expected, proc.stdout
    assert (tmp_path / DEFAULT_STORE).exists() == tracked
