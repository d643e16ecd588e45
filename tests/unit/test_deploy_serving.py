"""The serving tier's deployment: Dockerfile.serve(-gpu), every manifest in deploy/k8s, the
laptop stack (deploy/compose.laptop.yml, Prometheus, Grafana), checked without a container
engine or a cluster.

* Both Dockerfiles pass hadolint; the requirement list their builder derives from
  pyproject.toml is computed by running that very snippet.
* A real ``pollinate serve`` runs the Kubernetes Deployment's command where only the image's
  packages can be imported (everything else installed here raises ImportError, torch and flwr
  included): its probes, the image's HEALTHCHECK and ``/metrics`` are asked over HTTP.
* Every manifest validates against the Kubernetes schemas (kubernetes-validate), and the
  kustomizations render (``kubectl kustomize``, when kubectl is installed).
* Every PromQL query (adapter rules, dashboard) names only series and labels that the serving
  tier and the federation exporter export, taken from their own registries.
* Every ``pollinate`` command line is accepted by the CLI, and every ``pollinate serve`` one
  makes valid settings.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support import REPO
from tests.support.deploy import (
    CLI_ENV,
    check_cli_accepts,
    cli_help,
    expand,
    flag,
    hadolint_findings,
    one,
    read_dockerfile,
)

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DOCKERFILES = {"cpu": REPO / "Dockerfile.serve", "gpu": REPO / "Dockerfile.serve-gpu"}
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
LAPTOP = DEPLOY / "compose.laptop.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pollinate.json"
# The oldest release with everything the manifests use on by default, and the newest schema.
K8S_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
# Labels Prometheus adds to every series it scrapes (job/instance; kubernetes-pods: the rest).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
PROBE_PATHS = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}


# ---------------------------------------------------------------- reading the files


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


@cache
def _manifests() -> dict[Path, list[dict[str, Any]]]:
    """Every Kubernetes manifest under deploy/k8s (kustomization files aside), by file."""
    return {p: _yaml_docs(p) for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml"}


def _k8s(kind: str, name: str) -> dict[str, Any]:
    [doc] = [
        d
        for docs in _manifests().values()
        for d in docs
        if d["kind"] == kind and d["metadata"]["name"] == name
    ]
    return doc


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    return containers[0]


def _argv(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in [*container["command"], *container["args"]]]


def _env(image: dict[str, Any]) -> dict[str, str]:
    """The final stage's ENV (KEY=VALUE form)."""
    env: dict[str, str] = {}
    for keyword, rest in image["final"]:
        if keyword == "ENV":
            env.update(item.partition("=")[::2] for item in shlex.split(rest))
    return env


def _user(image: dict[str, Any]) -> str:
    return expand(one(image["final"], "USER"), image["args"])


@cache
def _compose(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def _laptop_services() -> dict[str, dict[str, Any]]:
    """docker-compose.yml with compose.laptop.yml on top (a service's keys replaced)."""
    base = _compose(DEPLOY / "docker-compose.yml")["services"]
    top = _compose(LAPTOP)["services"]
    return {name: {**base.get(name, {}), **top.get(name, {})} for name in {*base, *top}}


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomizations are not rendered")
    return kubectl


@cache
def _render(folder: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kubectl kustomize {folder}: {proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


# ---------------------------------------------------------------- what the image installs


@cache
def _image_requirements(variant: str) -> tuple[str, ...]:
    """requirements.txt of the image: the builder's own snippet run on pyproject.toml."""
    image = read_dockerfile(DOCKERFILES[variant])
    [run] = [
        expand(rest, image["args"])
        for kw, rest in image["stages"][0]
        if kw == "RUN" and "/tmp/requirements.txt" in rest
    ]
    tokens = shlex.split(run)
    start = tokens.index("-c")
    code, args = tokens[start + 1], tokens[start + 2 : tokens.index(">")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(line for line in proc.stdout.splitlines() if line)


def _name(requirement: str) -> str:
    return canonicalize_name(Requirement(requirement).name)


def _closure(requirements: tuple[str, ...]) -> set[str]:
    """The installed distributions ``requirements`` pull in (canonical names), checking that
    what is installed here satisfies each pin the image installs."""
    found: set[str] = set()
    todo = [(Requirement(r), True) for r in requirements]
    while todo:
        req, pinned = todo.pop()
        name = canonicalize_name(req.name)
        dist = importlib.metadata.distribution(name)
        if pinned:
            assert req.specifier.contains(dist.version, prereleases=True), (
                f"{name} {dist.version} is installed, the image installs {req}"
            )
        if name in found:
            continue
        found.add(name)
        for raw in dist.requires or []:
            sub = Requirement(raw)
            extras = {"", *req.extras}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append((sub, False))
    return found


def _not_in_image(requirements: tuple[str, ...]) -> set[str]:
    """Top-level modules of installed distributions that the image does not install."""
    keep = _closure(requirements) | {"pollinate"}
    return {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if not any(canonicalize_name(d) in keep for d in dists)
        and module not in sys.stdlib_module_names
    }


# ---------------------------------------------------------------- the metrics really exported


@cache
def _exported() -> dict[str, set[str]]:
    """Series name -> label names, from the serving tier's registry (every family given a
    child the way the server's recorder does) and the federation exporter over a real run."""
    import tempfile

    from pollinate.ops.fed_metrics import FederationCollector
    from pollinate.rundir.records import RoundRecord
    from pollinate.serving.metrics import ServingMetrics
    from pollinate.serving.recorder import MetricsRecorder

    metrics = ServingMetrics()
    recorder = MetricsRecorder(metrics)
    recorder.version("m", 1)
    recorder.failed("m", 1, "http", "overloaded")
    recorder.role("m", 1, "current")
    recorder.rollout("m", "promoted")
    metrics.triggers.labels("m").inc()
    families = list(metrics.registry.collect())
    with tempfile.TemporaryDirectory() as tmp:
        state, run = Path(tmp), Path(tmp) / "run"
        run.mkdir()
        record = RoundRecord(
            server_round=1, accuracy=0.9, loss=0.3, sampled=2, replied=2, max_epsilon=1.0,
            client_level_epsilon=2.0, seconds=3.0, metrics={"macro_f1": 0.8},
        )  # fmt: skip
        (run / "metrics.json").write_text(json.dumps([record.to_dict()]))
        (run / "run.json").write_text(json.dumps({"settings": {"num-server-rounds": 3}}))
        (state / "runs.json").write_text(
            json.dumps({"7": {"run_dir": str(run), "started": "2026-01-01T00:00:00Z"}})
        )
        families += list(FederationCollector(state).collect())
    series: dict[str, set[str]] = {}
    for family in families:
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


_PROMQL_WORDS = {
    # functions, aggregations, keywords (the subset these files may use)
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "rate", "irate",
    "increase", "delta", "histogram_quantile", "clamp_min", "clamp_max", "abs", "absent",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "last_over_time",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "vector", "scalar", "time", "round",
}  # fmt: skip
_MATCHER = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def _promql_problems(expr: str, extra_series: dict[str, set[str]] | None = None) -> list[str]:
    """What in ``expr`` is not a real series, label, function or keyword ([] when sound)."""
    known = {**_exported(), **(extra_series or {})}
    problems: list[str] = []
    used: set[str] = set()
    for metric, body in _MATCHER.findall(expr):
        labels = re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"", body)
        if metric:
            used.add(metric)
            for label in labels:
                if metric in known and label not in known[metric] | TARGET_LABELS:
                    problems.append(f"{metric} has no label {label!r}")
    rest = re.sub(r"\"(?:[^\"\\]|\\.)*\"", " ", expr)
    rest = _MATCHER.sub(lambda m: f" {m[1] or ''} ", rest)
    grouping = {g.strip() for group in _GROUPING.findall(rest) for g in group.split(",")}
    rest = _GROUPING.sub(" ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    for word in re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*", rest):
        if word in _PROMQL_WORDS:
            continue
        used.add(word)
        if word not in known:
            problems.append(f"{word} is not an exported series")
    if not used:
        problems.append("names no series")
    labels_in_scope = set().union(*(known.get(m, set()) for m in used)) | TARGET_LABELS
    problems += [f"groups by {g!r}, which no series used has" for g in grouping - labels_in_scope]
    return problems


def _adapter_rules() -> list[dict[str, Any]]:
    config = _k8s("ConfigMap", "pollinate-adapter-rules")["data"]["config.yaml"]
    rules: list[dict[str, Any]] = yaml.safe_load(config)["rules"]
    return rules


def _series_of(query: str) -> str:
    [metric] = re.findall(r"^([A-Za-z_:][\w:]*)\{", query)
    return str(metric)


def _adapter_query(rule: dict[str, Any]) -> str:
    """The rule's metricsQuery as the adapter sends it for one pod."""
    query: str = rule["metricsQuery"]
    return (
        query.replace("<<.Series>>", _series_of(rule["seriesQuery"]))
        .replace("<<.LabelMatchers>>", 'namespace="pollinate",pod=~"serving-.*"')
        .replace("<<.GroupBy>>", "pod")
    )


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


# ---------------------------------------------------------------- the Dockerfiles


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(variant: str) -> None:
    assert hadolint_findings(DOCKERFILES[variant]) == ""


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_image_is_multi_stage_non_root_and_runs_pollinate_serve(variant: str) -> None:
    image = read_dockerfile(DOCKERFILES[variant])
    assert len(image["stages"]) == 2 and image["stages"][0][0][1].endswith(" AS builder")
    copies = [rest for kw, rest in image["final"] if kw == "COPY"]
    assert copies == ["--from=builder /opt/pollinate /opt/pollinate"], "only the venv ships"
    assert "PATH=/opt/pollinate/bin:$PATH" in one(image["final"], "ENV")
    # the same fixed UID as the edge image, and what the Deployment's securityContext says
    assert _user(image) == _user(read_dockerfile(REPO / "Dockerfile.edge")) == "10001:10001"
    pod = _k8s("Deployment", "serving")["spec"]["template"]["spec"]["securityContext"]
    assert f"{pod['runAsUser']}:{pod['runAsGroup']}" == _user(image)
    assert image["entrypoint"] == ["pollinate", "serve"]
    cmd = image["cmd"]
    assert json.loads(one(image["final"], "VOLUME")) == [flag(cmd, "--repository")]
    ports = [flag(cmd, f"--{p}-port") for p in ("http", "grpc", "metrics")]
    assert one(image["final"], "EXPOSE").split() == ports
    assert flag(cmd, "--host") == "0.0.0.0"
    # the HEALTHCHECK asks the REST port's readiness endpoint
    url = _env(image)["POLLINATE_HEALTH_URL"]
    assert url == f"http://127.0.0.1:{flag(cmd, '--http-port')}/v2/health/ready"
    assert image["healthcheck"][:2] == ["python", "-c"]
    assert "POLLINATE_HEALTH_URL" in image["healthcheck"][2]


def test_gpu_image_is_the_cpu_image_on_cuda() -> None:
    cpu, gpu = (read_dockerfile(DOCKERFILES[v]) for v in ("cpu", "gpu"))
    assert [flag(cpu["cmd"], "--device"), flag(gpu["cmd"], "--device")] == ["cpu", "cuda"]
    strip = [i for i, tok in enumerate(cpu["cmd"]) if tok == "--device"]
    assert [t for i, t in enumerate(cpu["cmd"]) if i not in strip and i - 1 not in strip] == [
        t for i, t in enumerate(gpu["cmd"]) if i not in strip and i - 1 not in strip
    ]
    assert cpu["healthcheck"] == gpu["healthcheck"] and cpu["entrypoint"] == gpu["entrypoint"]
    assert _env(cpu) == _env(gpu)
    # one requirement snippet for both: only the onnxruntime requirement differs
    runs = [[r for kw, r in image["stages"][0] if kw == "RUN"][-1] for image in (cpu, gpu)]
    assert runs[0].replace("python -m venv", "python3 -m venv") == runs[1]
    cpu_base = expand(cpu["stages"][1][0][1], cpu["args"])
    assert cpu_base == expand(cpu["stages"][0][0][1].removesuffix(" AS builder"), cpu["args"])
    assert cpu_base.startswith("python:3.11-slim")
    # runtime: NVIDIA's CUDA + cuDNN runtime image, on the builder's Ubuntu release
    gpu_base = expand(gpu["stages"][1][0][1], gpu["args"])
    builder = expand(gpu["stages"][0][0][1].removesuffix(" AS builder"), gpu["args"])
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu(\d+\.\d+)", gpu_base)
    assert match, gpu_base
    assert builder == f"ubuntu:{match[2]}"
    # onnxruntime-gpu on PyPI is built for CUDA 13 from 1.24 on (pip's metadata: nvidia-*-cu13)
    assert int(match[1]) == 13


def test_images_install_the_serve_extra_and_no_torch() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    serve = pyproject["optional-dependencies"]["serve"]
    cpu, gpu = _image_requirements("cpu"), _image_requirements("gpu")
    base = [r for r in pyproject["dependencies"] if _name(r) in {"numpy", "typer", "rich"}]
    assert list(cpu) == [*base, *serve]
    [ort] = [r for r in serve if _name(r) == "onnxruntime"]
    [ort_gpu] = [r for r in gpu if _name(r) == "onnxruntime-gpu"]
    assert list(gpu) == [ort_gpu if r == ort else r for r in cpu]
    # the GPU build lags the CPU one by at most a minor release
    cpu_v, gpu_v = (Version(next(iter(Requirement(r).specifier)).version) for r in (ort, ort_gpu))
    assert gpu_v.major == cpu_v.major and cpu_v.minor - 1 <= gpu_v.minor <= cpu_v.minor
    closure = _closure(cpu)
    assert not {"torch", "flwr", "opacus", "onnx", "scikit-learn"} & closure
    assert {"onnxruntime", "uvicorn", "grpcio", "prometheus-client", "typer"} <= closure


# ---------------------------------------------------------------- a real `pollinate serve`

_CHILD = r"""
import atexit, importlib.abc, json, runpy, sys

blocked_file, modules_file, *argv = sys.argv[1:]
BLOCKED = frozenset(json.load(open(blocked_file)))
PRELOADED = set(sys.modules)


class NotInTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInTheImage())


def dump():
    imported = {m.partition(".")[0] for m in set(sys.modules) - PRELOADED}
    with open(modules_file, "w") as f:
        json.dump(sorted(imported), f)


atexit.register(dump)
sys.argv = ["pollinate", *argv]
runpy.run_module("pollinate", run_name="__main__", alter_sys=True)
"""


def _tiny_repository(root: Path) -> Path:
    """``root/repo``: model ``tiny`` version 1, ``logits = input @ W`` (4 -> 3), ONNX."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    version = root / "repo" / "tiny" / "1"
    version.mkdir(parents=True)
    weights = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[weights],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, version / "model.onnx")
    (version.parent / "config.pbtxt").write_text(
        'name: "tiny" platform: "onnxruntime_onnx" max_batch_size: 8\n'
        'input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "logits" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
    )
    return root / "repo"


def _local(argv: list[str], repo: Path, port_file: Path) -> list[str]:
    """A serve command line moved to this machine: the repository, loopback, free ports."""
    values = {"--repository": str(repo), "--host": "127.0.0.1"}
    values |= {f"--{p}-port": "0" for p in ("http", "grpc", "metrics")}
    out = [values.get(argv[i - 1], tok) if i else tok for i, tok in enumerate(argv)]
    return [*out[1:], "--port-file", str(port_file)]


def _get(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _infer(values: list[float], name: str = "input") -> bytes:
    tensor = {"name": name, "datatype": "FP32", "shape": [1, len(values)], "data": values}
    return json.dumps({"inputs": [tensor]}).encode()


def _healthcheck(image: dict[str, Any], url: str) -> int:
    """The image's HEALTHCHECK command, run here against ``url``; its exit status."""
    [python, *args] = image["healthcheck"]
    assert python == "python"
    env = {**CLI_ENV, "POLLINATE_HEALTH_URL": url}
    return subprocess.run([sys.executable, *args], env=env, timeout=30).returncode


@dataclass
class Served:
    """What a real server running the Deployment's command answered, then imported."""

    argv: list[str]
    blocked: set[str]
    probes: dict[str, int]
    healthcheck: int
    inference: tuple[int, dict[str, Any]]
    invalid: int
    metrics: dict[str, set[str]]
    returncode: int
    imported: set[str]
    log: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    from prometheus_client.parser import text_string_to_metric_families

    tmp = tmp_path_factory.mktemp("serve")
    container = _container(_k8s("Deployment", "serving"))
    argv = _local(_argv(container), _tiny_repository(tmp), tmp / "ports.json")
    blocked = _not_in_image(_image_requirements("cpu"))
    (tmp / "blocked.json").write_text(json.dumps(sorted(blocked)))
    log = tmp / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp / "blocked.json"), str(tmp / "imported.json"),
             *argv],
            stdout=sink, stderr=subprocess.STDOUT, cwd=tmp, env={**CLI_ENV, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp / "ports.json").exists():
            assert proc.poll() is None, f"pollinate serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"pollinate serve never started:\n{log.read_text()}"
            time.sleep(0.05)
        ports = json.loads((tmp / "ports.json").read_text())
        rest = f"http://127.0.0.1:{ports['http']}"
        probes = {
            path: _get(rest + path)[0]
            for path in {
                container[probe]["httpGet"]["path"]
                for probe in ("startupProbe", "readinessProbe", "livenessProbe")
            }
        }
        image = read_dockerfile(DOCKERFILES["cpu"])
        health = _env(image)["POLLINATE_HEALTH_URL"].replace(
            f"127.0.0.1:{flag(image['cmd'], '--http-port')}", f"127.0.0.1:{ports['http']}"
        )
        status, body = _get(f"{rest}/v2/models/tiny/infer", _infer([1, 2, 3, 4]))
        invalid = _get(f"{rest}/v2/models/tiny/infer", _infer([1, 2, 3, 4], name="x"))[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics") as answer:
            text = answer.read().decode()
        metrics: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                metrics.setdefault(sample.name, set()).update(sample.labels)
        healthcheck = _healthcheck(image, health)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    imported_file = tmp / "imported.json"
    imported = set(json.loads(imported_file.read_text())) if imported_file.exists() else set()
    return Served(
        argv, blocked, probes, healthcheck, (status, json.loads(body)), invalid, metrics,
        proc.returncode, imported, log.read_text(),
    )  # fmt: skip


def test_deployment_command_serves_with_only_the_image_packages(served: Served) -> None:
    # torch and flwr are installed here, and made unimportable for the server
    assert {"torch", "flwr", "opacus", "sklearn"} <= served.blocked
    status, answer = served.inference
    assert status == 200, (served.argv, answer, served.log)
    assert answer["outputs"][0]["data"] == [60.0, 70.0, 80.0]  # [1, 2, 3, 4] @ arange(12)
    assert served.invalid == 400
    assert served.returncode == 0, served.log  # SIGTERM: drained and stopped
    assert "onnxruntime" in served.imported and "uvicorn" in served.imported
    assert not served.imported & served.blocked
    assert not {"torch", "flwr"} & served.imported


def test_probes_and_healthcheck_answer_on_a_ready_server(served: Served) -> None:
    assert served.probes == {"/v2/health/ready": 200, "/v2/health/live": 200}
    assert served.healthcheck == 0


def test_healthcheck_fails_when_not_ready_or_down() -> None:
    image = read_dockerfile(DOCKERFILES["cpu"])

    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503 if self.path == "/v2/health/ready" else 200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/v2/health/ready"
    try:
        assert _healthcheck(image, url) != 0
        assert _healthcheck(image, url.replace("/ready", "/live")) == 0  # the check can pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert _healthcheck(image, url) != 0  # nothing listens


def test_the_registries_give_what_the_live_server_exports(served: Served) -> None:
    """The series the tests check queries against are what a real server serves."""
    exported = _exported()
    for name, labels in served.metrics.items():
        assert name in exported and labels <= exported[name], name
    for rule in _adapter_rules():
        assert _series_of(rule["seriesQuery"]) in served.metrics
    assert {"model", "version", "reason"} <= served.metrics[
        "pollinate_serving_request_failures_total"
    ]


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(version: str) -> None:
    kinds = set()
    for path, docs in _manifests().items():
        for doc in docs:
            where = f"{path.relative_to(REPO)}: {doc.get('kind')}/{doc['metadata']['name']}"
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{where} (Kubernetes {version}): {err.message}")
            kinds.add(doc["kind"])
    assert {
        "Namespace", "StatefulSet", "Service", "Deployment", "PersistentVolumeClaim",
        "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap",
    } <= kinds  # fmt: skip


def test_schema_validation_can_fail() -> None:
    hpa = json.loads(json.dumps(_k8s("HorizontalPodAutoscaler", "serving")))
    hpa["spec"]["maxReplicas"] = "10"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)


def test_kustomizations_include_every_manifest() -> None:
    listed: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text(encoding="utf-8"))["resources"]:
            path = (kustomization.parent / resource).resolve()
            assert path.exists(), f"{kustomization}: {resource} does not exist"
            listed.add(path)
    assert set(_manifests()) <= listed
    top = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert {"namespace.yaml", "superlink.yaml", "serving"} <= set(top["resources"])


def test_kustomize_renders_each_stack() -> None:
    main = _render(".")
    assert {(d["kind"], d["metadata"]["name"]) for d in main} >= {
        ("StatefulSet", "superlink"), ("Deployment", "serving"), ("Service", "serving"),
        ("HorizontalPodAutoscaler", "serving"), ("PodDisruptionBudget", "serving"),
        ("PersistentVolumeClaim", "model-repository"),
    }  # fmt: skip
    assert all(d["metadata"].get("namespace", "pollinate") == "pollinate" for d in main)
    [rules] = _render("prometheus-adapter")
    assert rules["metadata"] == _k8s("ConfigMap", "pollinate-adapter-rules")["metadata"]
    [gpu] = [d for d in _render("serving-gpu") if d["kind"] == "Deployment"]
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(gpu, version, strict=True)
    container = _container(gpu)
    assert container["image"] == "pollinate-serve-gpu:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    cpu = _container(_k8s("Deployment", "serving"))
    assert container["resources"]["requests"] == cpu["resources"]["requests"]
    argv = _argv(container)
    assert flag(argv, "--device") == "cuda"
    for name in ("--repository", "--host", "--http-port", "--grpc-port", "--metrics-port"):
        assert flag(argv, name) == flag(_argv(cpu), name)
    check_cli_accepts("k8s serving-gpu", argv)


def test_serving_deployment() -> None:
    deployment = _k8s("Deployment", "serving")
    spec = deployment["spec"]
    assert "replicas" not in spec, "the HPA owns the replica count"
    pod = spec["template"]["spec"]
    container = _container(deployment)
    argv = _argv(container)
    image = read_dockerfile(DOCKERFILES["cpu"])
    assert container["image"].partition(":")[0] == "pollinate-serve"
    assert container["command"] == image["entrypoint"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {p: int(flag(argv, f"--{p}-port")) for p in ("http", "grpc", "metrics")}
    for probe, path in PROBE_PATHS.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    assert {"requests", "limits"} <= container["resources"].keys()
    for key in ("cpu", "memory"):
        assert key in container["resources"]["requests"] and key in container["resources"]["limits"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    models = mounts[flag(argv, "--repository")]
    assert models["readOnly"] is True
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    assert _k8s("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "a read-only root needs a writable /tmp"
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == flag(argv, "--metrics-port")


def test_serving_ports_are_the_cli_defaults_and_the_service_exposes_them() -> None:
    help_text = " ".join(cli_help(("serve",)).split())
    argv = _argv(_container(_k8s("Deployment", "serving")))
    for name in ("http", "grpc", "metrics"):
        match = re.search(rf"--{name}-port\s+INTEGER\s+[^[]*\[(\d+)\]", help_text)
        assert match, f"`pollinate serve --help` shows no default for --{name}-port"
        assert flag(argv, f"--{name}-port") == match[1]
    service = _k8s("Service", "serving")
    deployment = _k8s("Deployment", "serving")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in _container(deployment)["ports"]}
    exposed = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert exposed == {name: (port, name) for name, port in container_ports.items()}


def test_disruption_budget_and_autoscaler() -> None:
    deployment = _k8s("Deployment", "serving")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = _k8s("PodDisruptionBudget", "serving")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _k8s("HorizontalPodAutoscaler", "serving")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"], "kind": "Deployment", "name": "serving",
    }  # fmt: skip
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert 2 <= low < high
    # at the HPA's minimum a drain can still evict a pod, and one keeps serving
    assert 1 <= pdb["spec"]["minAvailable"] < low
    metrics = hpa["spec"]["metrics"]
    assert {m["type"] for m in metrics} == {"Pods"}
    names = {m["pods"]["metric"]["name"] for m in metrics}
    assert names == {rule["name"]["as"] for rule in _adapter_rules()}
    assert {"pollinate_serving_queue_depth", "pollinate_serving_request_latency_p95_seconds"} <= (
        names
    )
    for m in metrics:
        assert m["pods"]["target"]["type"] == "AverageValue"


def test_adapter_rules_query_real_series_per_pod() -> None:
    for rule in _adapter_rules():
        series = _series_of(rule["seriesQuery"])
        assert series in _exported(), f"{series} is not exported"
        assert re.fullmatch(rule["name"]["matches"], series), rule["name"]
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"}, "pod": {"resource": "pod"},
        }  # fmt: skip
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert "<<.GroupBy>>" in rule["metricsQuery"]
        assert _promql_problems(_adapter_query(rule)) == [], rule["metricsQuery"]


def test_promql_check_can_fail() -> None:
    assert _promql_problems("sum(rate(pollinate_serving_requests_total[1m]))") == []
    assert _promql_problems("rate(pollinate_serving_request_total[1m])") != []
    assert _promql_problems('pollinate_serving_requests_total{reson="x"}') != []
    assert _promql_problems("sum by (run_id) (pollinate_serving_requests_total)") != []
    assert _promql_problems("pollinate_federation_max_epsilon") == []


# ---------------------------------------------------------------- command lines


def _serve_command_lines() -> list[tuple[str, list[str]]]:
    lines = []
    for variant, path in DOCKERFILES.items():
        image = read_dockerfile(path)
        lines.append((f"Dockerfile.serve {variant}", image["entrypoint"] + image["cmd"]))
    lines.append(("k8s Deployment/serving", _argv(_container(_k8s("Deployment", "serving")))))
    entrypoint = read_dockerfile(DOCKERFILES["cpu"])["entrypoint"]
    serving = _compose(LAPTOP)["services"]["serving"]
    lines.append(("compose.laptop serving", [*entrypoint, *map(str, serving["command"])]))
    return lines


def test_every_new_pollinate_command_line_is_accepted_by_the_cli() -> None:
    superlink = _laptop_services()["superlink"]
    lines = [
        *_serve_command_lines(),
        ("compose.laptop superlink", [*superlink["entrypoint"], *map(str, superlink["command"])]),
    ]
    for where, argv in lines:
        check_cli_accepts(where, argv)


_SETTINGS_CHILD = r"""
import contextlib, io, json, sys
import pollinate.serving.launch as launch
from pollinate.cli.main import app
from pollinate.serving.config import settings_to_json

seen = []
launch.run_server = lambda settings, **kwargs: seen.append(settings)
out = []
for argv in json.loads(sys.argv[1]):
    seen.clear()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = app(argv, standalone_mode=False)
    out.append({"code": code, "stderr": err.getvalue(),
                "settings": json.loads(settings_to_json(seen[0])) if seen else None})
print(json.dumps(out))
"""


def test_every_serve_command_line_makes_valid_settings() -> None:
    """Flag values too: each command line through the real CLI up to the server's start."""
    lines = _serve_command_lines()
    proc = subprocess.run(
        [sys.executable, "-c", _SETTINGS_CHILD, json.dumps([argv[1:] for _, argv in lines])],
        capture_output=True, text=True, timeout=60, env=CLI_ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for (where, argv), result in zip(lines, json.loads(proc.stdout), strict=True):
        assert result["code"] in (None, 0) and result["settings"], (where, result["stderr"])
        settings = result["settings"]
        assert settings["repository"] == flag(argv, "--repository"), where
        assert settings["device"] == flag(argv, "--device"), where
        assert settings["http_port"] == int(flag(argv, "--http-port")), where


# ---------------------------------------------------------------- the laptop stack


def test_laptop_stack_extends_the_local_federation() -> None:
    base = _compose(DEPLOY / "docker-compose.yml")["services"]
    laptop = _compose(LAPTOP)
    services = laptop["services"]
    assert set(services) == {"superlink", "serving", "mlflow", "prometheus", "grafana"}
    # the SuperLink: docker-compose.yml's own command plus the federation exporter
    command = [str(a) for a in services["superlink"]["command"]]
    assert command[: len(base["superlink"]["command"])] == base["superlink"]["command"]
    assert command[len(base["superlink"]["command"]) :] == [
        "--metrics-host", "0.0.0.0", "--metrics-port", flag(command, "--metrics-port"),
    ]  # fmt: skip
    serving = services["serving"]
    assert serving["build"]["dockerfile"] == DOCKERFILES["cpu"].name
    assert (DEPLOY / serving["build"]["context"] / serving["build"]["dockerfile"]).is_file()
    assert serving["image"].startswith("pollinate-serve:") and serving["read_only"] is True
    mlflow = services["mlflow"]
    assert mlflow["image"].startswith("ghcr.io/mlflow/mlflow:v")
    assert mlflow["command"][:2] == ["mlflow", "server"]
    assert flag(mlflow["command"], "--backend-store-uri").startswith("sqlite:////")
    declared = set(laptop["volumes"])
    for name, svc in services.items():
        if name == "superlink":
            continue
        assert svc["restart"] == "unless-stopped", name
        tag = svc["image"].rpartition(":")[2]
        assert tag and tag != "latest" and "/" not in tag, f"{name}: pin the image tag"
        assert "healthcheck" in svc or name == "serving", name  # serving: the image's
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} listens beyond this machine"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists() or source == "./models", f"{name}: {source}"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_prometheus_scrapes_the_serving_tier_and_the_federation_exporter() -> None:
    services = _laptop_services()
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    serving = [str(a) for a in services["serving"]["command"]]
    superlink = [str(a) for a in services["superlink"]["command"]]
    assert targets["pollinate-serving"] == [f"serving:{flag(serving, '--metrics-port')}"]
    assert targets["pollinate-federation"] == [f"superlink:{flag(superlink, '--metrics-port')}"]
    assert flag(superlink, "--metrics-host") == "0.0.0.0"
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    grafana = _laptop_services()["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "pollinate.yml").read_text())[
        "providers"
    ]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]


def test_dashboard_panels_query_real_metrics() -> None:
    exprs = _dashboard_exprs()
    for title, expr in exprs:
        assert _promql_problems(expr) == [], f"{title}: {expr}"
    by_title = {title.lower(): " ".join(e for t, e in exprs if t == title) for title, _ in exprs}

    def panel(word: str) -> str:
        found = [exprs for title, exprs in by_title.items() if word in title]
        assert found, f"no panel about {word}"
        return " ".join(found)

    assert "pollinate_federation_round" in panel("round")
    assert "pollinate_federation_max_epsilon" in panel("epsilon")
    assert "pollinate_serving_requests_total" in panel("requests")
    assert "histogram_quantile(0.95" in panel("p95")
    assert "pollinate_serving_request_duration_seconds_bucket" in panel("p95")
    assert "pollinate_serving_queue_duration_seconds_sum" in panel("queue depth")


def test_new_files_hold_no_key_material() -> None:
    for path in [*DOCKERFILES.values(), LAPTOP, *DEPLOY.joinpath("k8s").rglob("*")]:
        if path.is_file():
            assert "PRIVATE KEY-----" not in path.read_text(encoding="utf-8"), path
