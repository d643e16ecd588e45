"""Dockerfile.edge, deploy/docker-compose.yml and deploy/k8s: lint, structure, and the CLI
they run, checked without a container engine.

Every ``pollinate ...`` command line in these files is run against the real CLI (``--help``
of its subcommand must list every flag used), and the image's entrypoint is run outside a
container with bad input, and ``pollinate edge status --check`` (its HEALTHCHECK) against
real daemon state.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from pollinate.errors import ConfigError
from tests.support.deploy import (
    BIN,
    CLI_ENV,
    check_cli_accepts,
    expand,
    flag,
    hadolint_findings,
    one,
    read_dockerfile,
)

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile.edge"
COMPOSE = REPO / "deploy" / "docker-compose.yml"
K8S = REPO / "deploy" / "k8s"


def _dockerfile() -> dict[str, Any]:
    return read_dockerfile(DOCKERFILE)


@cache
def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


@cache
def _k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    return docs


def _k8s(kind: str) -> list[dict[str, Any]]:
    return [d for d in _k8s_docs() if d["kind"] == kind]


def _edges() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return {n: s for n, s in services.items() if n.startswith("edge-")}


def _pollinate_command_lines() -> list[tuple[str, list[str]]]:
    """Every ``pollinate ...`` argv that the image, compose and k8s files run."""
    image = _dockerfile()
    lines = [
        ("Dockerfile ENTRYPOINT + CMD", image["entrypoint"] + image["cmd"]),
        ("Dockerfile HEALTHCHECK", image["healthcheck"]),
    ]
    for name, svc in _compose()["services"].items():
        entrypoint = svc.get("entrypoint", image["entrypoint"])
        lines.append((f"compose {name}", [*entrypoint, *svc.get("command", image["cmd"])]))
        test = svc.get("healthcheck", {}).get("test", [])
        if test[:1] == ["CMD"]:
            lines.append((f"compose {name} healthcheck", test[1:]))
    for doc in _k8s_docs():
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            where = f"k8s {doc['kind']}/{doc['metadata']['name']}/{container['name']}"
            command = container.get("command", image["entrypoint"])
            lines.append((where, [*command, *container.get("args", [])]))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                exec_ = container.get(probe, {}).get("exec")
                if exec_:
                    lines.append((f"{where} {probe}", exec_["command"]))
    return [(where, [str(a) for a in argv]) for where, argv in lines if argv[:1] == ["pollinate"]]


# ---------------------------------------------------------------- the Dockerfile


def test_hadolint_finds_nothing() -> None:
    assert hadolint_findings(DOCKERFILE) == ""


def test_image_is_multi_stage_and_ships_only_the_venv() -> None:
    image = _dockerfile()
    assert len(image["stages"]) >= 2, "build the venv in a builder stage"
    base = expand(image["stages"][-1][0][1], image["args"])
    assert base.startswith("python:3.11-slim"), base
    copies_from_builder = [rest for kw, rest in image["final"] if kw == "COPY" and "--from" in rest]
    assert copies_from_builder == ["--from=builder /opt/pollinate /opt/pollinate"]
    env = " ".join(rest for kw, rest in image["final"] if kw == "ENV")
    assert "PATH=/opt/pollinate/bin:" in env


def test_final_stage_runs_as_a_fixed_non_root_uid_that_k8s_expects() -> None:
    image = _dockerfile()
    user = expand(one(image["final"], "USER"), image["args"])
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"USER {user}: use a numeric UID so runAsNonRoot can verify it"
    assert int(uid) >= 1000
    assert gid.isdigit()
    [statefulset] = _k8s("StatefulSet")
    security = statefulset["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))


def test_entrypoint_healthcheck_and_volumes() -> None:
    image = _dockerfile()
    assert image["entrypoint"] == ["pollinate", "edge", "run"]
    assert image["healthcheck"] == [
        "pollinate", "edge", "status", "--state-dir", "/state", "--check",
    ]  # fmt: skip
    # the health check reads /state: the daemon's default --state-dir must be it
    assert flag(image["cmd"], "--state-dir") == "/state"
    volumes = json.loads(one(image["final"], "VOLUME"))
    assert set(volumes) == {"/state", "/data"}


def test_torch_is_the_pyproject_pin_from_the_cpu_index() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    pins = [d for d in pyproject["project"]["dependencies"] if re.match(r"torch\s*==", d)]
    assert len(pins) == 1, pins
    pinned = pins[0].split("==", 1)[1].strip()
    image = _dockerfile()
    assert image["args"]["TORCH_VERSION"] == pinned
    assert image["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    builder_runs = [expand(rest, image["args"]) for kw, rest in image["stages"][0] if kw == "RUN"]
    torch_first = next(r for r in builder_runs if "torch==" in r)
    assert f'--index-url "https://download.pytorch.org/whl/cpu" "torch=={pinned}"' in torch_first


def test_dockerignore_allows_exactly_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "start from an allow-list: nothing but what is copied"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied: set[str] = set()
    for keyword, rest in _dockerfile()["final"] + _dockerfile()["stages"][0]:
        if keyword == "COPY" and "--from" not in rest:
            copied.update(src.rstrip("/") for src in rest.split()[:-1])
    assert copied == allowed
    for path in copied:
        assert (REPO / path).exists(), path


# ---------------------------------------------------------------- compose and k8s


def test_compose_is_a_local_federation_of_three_edges() -> None:
    services = _compose()["services"]
    superlink = services["superlink"]
    argv = [*superlink["entrypoint"], *superlink["command"]]
    assert argv[:3] == ["pollinate", "server", "start"]
    assert flag(argv, "--host") == "0.0.0.0"
    assert flag(argv, "--address") == "superlink:9093"
    trusted = {argv[i + 1] for i, tok in enumerate(argv) if tok == "--trust"}
    edges = _edges()
    assert len(edges) == 3
    partitions, keys, volumes = set(), set(), set()
    for name, svc in edges.items():
        cmd = svc["command"]
        assert flag(cmd, "--superlink") == "superlink:9093"
        assert flag(cmd, "--num-partitions") == str(len(edges))
        partitions.add(flag(cmd, "--partition-id"))
        keys.add(flag(cmd, "--key"))
        assert f"{flag(cmd, '--key')}.pub" in trusted, f"{name}'s key is not trusted"
        state = [v for v in svc["volumes"] if v.endswith(":/state")]
        assert len(state) == 1 and flag(cmd, "--state-dir") == "/state"
        volumes.add(state[0])
        assert svc["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert partitions == {str(i) for i in range(len(edges))}
    assert len(keys) == len(volumes) == len(edges), "each edge needs its own key and state"
    for name, svc in services.items():
        assert svc["restart"] in ("unless-stopped", "always", "on-failure"), name
        assert svc["healthcheck"]["test"][0] == "CMD", name


def test_compose_certificate_paths_are_what_pollinate_certs_makes(tmp_path: Path) -> None:
    """`pollinate certs deploy/certs --nodes 3 --host superlink` makes every file used."""
    proc = subprocess.run(
        [str(BIN / "pollinate"), "certs", str(tmp_path / "certs"), "--nodes", "3",
         "--host", "superlink"],
        capture_output=True, text=True, timeout=60, env=CLI_ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    mounts = {}
    for svc in _compose()["services"].values():
        for volume in svc["volumes"]:
            source, target, *_ = volume.split(":")
            mounts[target] = source
    assert mounts["/certs"] == "./certs"
    used = [tok for _, argv in _pollinate_command_lines() if argv for tok in argv]
    used += ["/certs/ca.crt", "/certs/server.pem", "/certs/server.key"]  # --certs /certs
    for path in {tok for tok in used if tok.startswith("/certs/")}:
        assert (tmp_path / "certs" / path.removeprefix("/certs/")).is_file() or (
            path == "/certs/node.key"  # the image's default CMD: a device mounts its own key
        ), f"{path} is not made by pollinate certs"


def test_k8s_superlink() -> None:
    kinds = {d["kind"] for d in _k8s_docs()}
    assert {"Namespace", "Service", "StatefulSet"} <= kinds
    [statefulset] = _k8s("StatefulSet")
    spec = statefulset["spec"]
    assert spec["replicas"] == 1
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    argv = [*container["command"], *container["args"]]
    assert argv[:3] == ["pollinate", "server", "start"]
    port = int(flag(argv, "--port"))
    [service] = _k8s("Service")
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    assert service["spec"]["selector"].items() <= pod_labels(statefulset).items()
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    assert mounts[flag(argv, "--state-dir")] in claims, "the state dir must be on a PVC"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "secret" in volumes[mounts[flag(argv, "--certs")]], "certs come from a Secret"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"]["port"] in (port, "grpc")
    assert {"requests", "limits"} <= container["resources"].keys()
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert "/tmp" in mounts, "a read-only root filesystem needs a writable /tmp"


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def test_no_key_material_is_committed() -> None:
    local_certs = REPO / "deploy" / "certs"  # made by `pollinate certs`, never committed
    for path in [*REPO.joinpath("deploy").rglob("*"), DOCKERFILE]:
        if path.is_file() and local_certs not in path.parents:
            text = path.read_text(encoding="utf-8", errors="replace")
            assert "PRIVATE KEY-----" not in text, path


def test_every_pollinate_command_line_is_accepted_by_the_cli() -> None:
    lines = _pollinate_command_lines()
    wheres = " ".join(where for where, _ in lines)
    assert "compose superlink" in wheres and "k8s StatefulSet" in wheres and "edge-2" in wheres
    for where, argv in lines:
        check_cli_accepts(where, argv)


# ---------------------------------------------------------------- the entrypoint, outside


def _run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run an argv as the image does: ``pollinate`` found on PATH in the venv's bin."""
    exe = shutil.which(argv[0], path=str(BIN))
    assert exe is not None, f"{argv[0]} is not installed next to {sys.executable}"
    return subprocess.run(
        [exe, *argv[1:]], capture_output=True, text=True, timeout=60, env=CLI_ENV, cwd=cwd
    )


def _assert_clear_config_error(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    assert proc.returncode == ConfigError.exit_code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert expected in " ".join(proc.stderr.split()), proc.stderr


def test_image_command_without_its_mounts_fails_clearly(tmp_path: Path) -> None:
    image = _dockerfile()
    ca = flag(image["cmd"], "--root-certificates")
    if Path(ca).exists():
        pytest.skip(f"{ca} exists on this machine")
    proc = _run_cli(image["entrypoint"] + image["cmd"], tmp_path)
    _assert_clear_config_error(proc, f"--root-certificates {ca} does not exist")


def test_compose_edge_command_with_a_missing_key_fails_clearly(tmp_path: Path) -> None:
    """edge-0's command, with /certs and /state mapped to a temp folder that has no key."""
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_text("not checked before the key\n")
    argv = [*_dockerfile()["entrypoint"], *_edges()["edge-0"]["command"]]
    mapped = [
        tok.replace("/certs", str(certs), 1).replace("/state", str(tmp_path / "state"), 1)
        if tok.startswith(("/certs", "/state"))
        else tok
        for tok in argv
    ]
    proc = _run_cli(mapped, tmp_path)
    _assert_clear_config_error(proc, f"--key {certs / 'nodes' / 'node-0'} does not exist")
    assert not (tmp_path / "state").exists(), "a refused start must not create state"


def _check(state_dir: Path) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, run against ``state_dir`` instead of /state."""
    argv = [str(state_dir) if tok == "/state" else tok for tok in _dockerfile()["healthcheck"]]
    return _run_cli(argv, state_dir)


def _write_daemon_json(state_dir: Path, **status: Any) -> None:
    (state_dir / "daemon.json").write_text(json.dumps(status), encoding="utf-8")


def test_health_check_without_daemon_state_fails(tmp_path: Path) -> None:
    proc = _check(tmp_path)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "daemon.json is missing" in proc.stderr


@pytest.mark.parametrize("state", ["running", "waiting for the training window"])
def test_health_check_passes_for_a_live_daemon(tmp_path: Path, state: str) -> None:
    _write_daemon_json(tmp_path, pid=os.getpid(), state=state)
    proc = _check(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_health_check_fails_for_a_dead_daemon(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_daemon_json(tmp_path, pid=gone.pid, state="running")
    proc = _check(tmp_path)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"pid {gone.pid}) is not alive" in proc.stderr


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"state": "restarting", "pid": os.getpid()}, "the daemon is 'restarting'"),
        ({"state": "stopped", "pid": os.getpid()}, "the daemon is 'stopped'"),
        ({"state": "running"}, "records no daemon pid"),
    ],
)
def test_health_check_fails_when_not_training(
    tmp_path: Path, status: dict[str, Any], expected: str
) -> None:
    _write_daemon_json(tmp_path, **status)
    proc = _check(tmp_path)
    assert proc.returncode == 1
    assert expected in proc.stderr


def test_health_check_follows_the_real_daemon(tmp_path: Path) -> None:
    """The daemon's own status file: healthy while it waits for its window, not once stopped."""
    from pollinate.device.daemon import DaemonSettings, EdgeDaemon

    for name in ("ca.crt", "node-0"):
        (tmp_path / name).write_text("unused: no SuperNode starts outside the window\n")
    now = dt.datetime.now()
    window = ((now + dt.timedelta(hours=2)).time(), (now + dt.timedelta(hours=3)).time())
    state = tmp_path / "state"
    daemon = EdgeDaemon(
        DaemonSettings(
            superlink="superlink:9093", root_certificates=tmp_path / "ca.crt",
            key=tmp_path / "node-0", state_dir=state, partition_id=0, num_partitions=3,
            window=window,
        )
    )  # fmt: skip
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while json.loads(_read(state / "daemon.json") or "{}").get("state") != (
            "waiting for the training window"
        ):
            assert time.monotonic() < deadline, "the daemon never reported its window"
            time.sleep(0.05)
        proc = _check(state)
        assert proc.returncode == 0, proc.stderr
    finally:
        daemon.stop.set()
        thread.join(timeout=10)
    proc = _check(state)
    assert proc.returncode == 1
    assert "the daemon is 'stopped'" in proc.stderr


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
