"""``pollinate edge ...``: a device's side. ``predict`` and ``bench`` run an exported bundle
(no torch needed); ``run`` is the device's federated-learning daemon and ``rollback`` puts
its previous bundle back (``status``: :mod:`pollinate.cli.edge_status`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from pollinate.cli._common import CommandGroup
from pollinate.cli.console import make_console
from pollinate.errors import PollinateError

__all__ = ["edge_app"]

edge_app = CommandGroup(
    help="A device's side: run exported bundles (predict, bench; no torch needed) and the "
    "federated-learning daemon (run, status, rollback).",
)


def _load_input(path: Path) -> Any:
    import numpy as np

    from pollinate.edge_runtime import InputError

    if not path.exists():
        raise InputError(f"input {path} does not exist; pass a .npy file or an image")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:
            raise InputError(f"input {path} is not a readable .npy array ({err})") from err
    try:
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except OSError as err:
        raise InputError(f"input {path} is neither a .npy array nor an image ({err})") from err


@edge_app.command("predict")
def edge_predict(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder or .tar.gz.")],
    input_: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT", help="A .npy array (one sample or a batch) or an image file."
        ),
    ],
    backend: Annotated[str, typer.Option(help="auto, onnxruntime, openvino or litert.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, fp16 or int8.")] = "auto",
    public_key: Annotated[
        Path | None, typer.Option(help="Require a valid ed25519 signature.")
    ] = None,
) -> None:
    """Predict labels for an input with a bundle.

    Examples:

      pollinate edge predict bundles/demo digit.png

      pollinate edge predict bundles/demo.tar.gz batch.npy --backend openvino
    """
    import numpy as np

    from pollinate.edge_runtime import InputError, load_bundle

    try:
        model = load_bundle(bundle, backend=backend, precision=precision, public_key=public_key)  # type: ignore[arg-type]
        x = _load_input(input_)
        logits = model.predict(x)
        rows = np.atleast_2d(logits)
        decided = rows[:, 0].tolist() if model.task == "regression" else model.labels_for(rows)
    except ValueError as err:  # an InputError keeps its own code (2); any other: 1
        raise err if isinstance(err, InputError) else PollinateError(str(err)) from None
    out = {
        "bundle": str(bundle),
        "backend": model.backend,
        "artifact": model.artifact.file,
        "values" if model.task == "regression" else "labels": decided,
        "logits": [[round(float(v), 5) for v in row] for row in rows],
    }
    print(json.dumps(out))


@edge_app.command("bench")
def edge_bench(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder or .tar.gz.")],
    backend: Annotated[str, typer.Option(help="auto, onnxruntime, openvino or litert.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, fp16 or int8.")] = "auto",
    repeats: Annotated[int, typer.Option(help="Timed single-sample predictions.")] = 500,
    batch: Annotated[int, typer.Option(help="Batch size for the throughput figure.")] = 64,
) -> None:
    """Latency (p50/p95, one sample, one thread), throughput, memory and cold start.

    Example:

      pollinate edge bench bundles/demo --precision int8
    """
    import resource

    import numpy as np

    from pollinate.edge_runtime import InputError, load_bundle

    try:
        model = load_bundle(bundle, backend=backend, precision=precision)  # type: ignore[arg-type]
    except ValueError as err:  # an InputError keeps its own code (2); any other: 1
        raise err if isinstance(err, InputError) else PollinateError(str(err)) from None
    shape = [d if d > 0 else 1 for d in model.manifest.inputs[0].shape]
    rng = np.random.default_rng(0)
    one = rng.random(shape, dtype=np.float32)
    many = rng.random([batch, *shape[1:]], dtype=np.float32)
    for _ in range(20):
        model.predict(one)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(one)
        times.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        model.predict(many)
    throughput = rounds * batch / (time.perf_counter() - start)
    cold = _cold_start(bundle, backend, precision)
    result = {
        "bundle": str(bundle), "backend": model.backend, "artifact": model.artifact.file,
        "p50_ms": round(float(np.percentile(times, 50)), 4),
        "p95_ms": round(float(np.percentile(times, 95)), 4),
        "throughput_per_s": round(throughput, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cold_start_s": round(cold, 3),
    }  # fmt: skip
    print(json.dumps(result))


def _cold_start(bundle: Path, backend: str, precision: str) -> float:
    """Seconds from a new Python process to its first prediction."""
    code = (
        "import numpy as np\n"
        "from pollinate.edge_runtime import load_bundle\n"
        f"m = load_bundle({str(bundle)!r}, backend={backend!r}, precision={precision!r})\n"
        "s = [d if d > 0 else 1 for d in m.manifest.inputs[0].shape]\n"
        "m.predict(np.zeros(s, dtype=np.float32))\n"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


@edge_app.command("run")
def run_command(
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the federation's SuperLink.")],
    root_certificates: Annotated[Path, typer.Option(help="The federation's CA certificate.")],
    key: Annotated[Path, typer.Option(help="This device's private key (OpenSSH, from certs).")],
    state_dir: Annotated[
        Path, typer.Option(help="Where the device keeps its accountant, logs and status.")
    ],
    data: Annotated[
        Path | None, typer.Option(help="This device's data: .npz, .csv or an image folder.")
    ] = None,
    partition_id: Annotated[
        int | None, typer.Option(help="Demo: train on this slice of the built-in data.")
    ] = None,
    num_partitions: Annotated[int | None, typer.Option(help="Demo: slices in all.")] = None,
    epsilon_budget: Annotated[
        float | None, typer.Option(help="This device's own epsilon budget (the stricter wins).")
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads training may use.")] = 1,
    executor: Annotated[
        str,
        typer.Option(
            help="warm: each task runs in a fork of one process that loaded torch and the app "
            "once; cold: a fresh process per message (Flower's)."
        ),
    ] = "warm",
    poll_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between asks for work while a run is active (Flower's 3 s when "
            "idle); shorter starts rounds sooner and costs the SuperLink more requests."
        ),
    ] = 0.5,
    zygote: Annotated[
        Path | None,
        typer.Option(
            help="Fork the warm executor from this host's zygote (`pollinate edge zygote "
            "SOCKET`): many devices on one machine share its memory."
        ),
    ] = None,
    emulate_latency: Annotated[
        str,
        typer.Option(
            help="For straggler tests: answer each train message as late as this latency "
            "model says, e.g. median=2,sigma=0.5,slow-fraction=0.2,slow-factor=10,dropout=0,"
            "seed=1 (the simulation's model; drawn by --partition-id and message count)."
        ),
    ] = "",
    window: Annotated[
        str | None, typer.Option(help="Train only between HH:MM-HH:MM (local time).")
    ] = None,
    bundle_public_key: Annotated[
        Path | None,
        typer.Option(help="The exporter's ed25519 public key: delivered bundles must be signed."),
    ] = None,
    serve_port: Annotated[
        int | None, typer.Option(help="Answer local inference requests on this port.")
    ] = None,
    serve_host: Annotated[str, typer.Option(help="Address for --serve-port.")] = "127.0.0.1",
    dp: Annotated[
        str,
        typer.Option(
            help="This device's DP policy: sample (train only with DP-SGD) or none (allow "
            "training without DP)."
        ),
    ] = "sample",
    min_noise_multiplier: Annotated[
        float,
        typer.Option(help="Refuse tasks with a DP noise multiplier below this (0 = any > 0)."),
    ] = 0.0,
    max_grad_norm: Annotated[
        float | None, typer.Option(help="Refuse tasks with a larger DP-SGD clipping norm.")
    ] = None,
    max_local_epochs: Annotated[
        int | None, typer.Option(help="Refuse tasks with more local epochs per round.")
    ] = None,
    start_new_ledger: Annotated[
        bool,
        typer.Option(
            "--start-new-ledger",
            help="Only when this device's privacy ledger is missing or corrupt: start a new, "
            "empty one (the lost epsilon history is forgotten; the old file is kept aside).",
        ),
    ] = False,
    allow_import: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-import",
            help="An import path (package.module:Name) of a model or data loader this device "
            "may import when a task asks for it; repeat for more. Built-in models and data are "
            "always allowed; any other import path is refused (importing it runs its code).",
        ),
    ] = None,
) -> None:
    """Run this device's federated-learning daemon: a supervised Flower SuperNode.

    It connects to the SuperLink over TLS with this device's key, trains the pollinate
    ClientApp on this device's data when the server asks, keeps its privacy accountant in
    --state-dir (a restart never resets epsilon), restarts the SuperNode with back-off when
    it exits, and stops cleanly on SIGTERM. Its privacy policy (--dp, --min-noise-multiplier,
    --max-grad-norm, --max-local-epochs, --epsilon-budget) is its own: a task asking for weaker
    privacy is refused and counted, and so is an import path (model, data) it did not allow.
    A missing or corrupt ledger stops it (exit 11) until --start-new-ledger; a spent budget
    stops it (exit 4). Logs are JSON lines on stderr.
    Model bundles the server delivers are verified and installed into --state-dir/bundles (the
    previous one kept for `pollinate edge rollback`); --serve-port answers POST /v1/predict
    from the installed one.

    Examples:

      pollinate edge run --superlink 10.0.0.5:9093 --root-certificates ca.crt \\
        --key node-0 --state-dir state --data my-data.npz \\
        --epsilon-budget 8 --min-noise-multiplier 0.8 --max-local-epochs 2

      pollinate edge run --superlink 127.0.0.1:9093 --root-certificates certs/ca.crt \\
        --key certs/nodes/node-1 --state-dir dev1 --partition-id 1 --num-partitions 5 \\
        --window 22:00-06:00 --bundle-public-key export.pub --serve-port 8765

      curl -d '{"inputs": [[0.0, ...]]}' http://127.0.0.1:8765/v1/predict
    """
    from pollinate.device.daemon import DaemonSettings, EdgeDaemon, parse_window
    from pollinate.log import log_to_stderr

    log_to_stderr()
    settings = DaemonSettings(
        superlink=superlink, root_certificates=root_certificates, key=key,
        state_dir=state_dir, data=data, partition_id=partition_id,
        num_partitions=num_partitions, epsilon_budget=epsilon_budget, threads=threads,
        window=parse_window(window) if window else None,
        bundle_public_key=bundle_public_key, serve_port=serve_port, serve_host=serve_host,
        dp=dp, min_noise_multiplier=min_noise_multiplier, max_grad_norm=max_grad_norm,
        max_local_epochs=max_local_epochs, start_new_ledger=start_new_ledger,
        allowed_imports=tuple(allow_import or ()), executor=executor,
        poll_interval=poll_interval, zygote=zygote, emulate_latency=emulate_latency,
    )  # fmt: skip
    code = EdgeDaemon(settings).run()
    raise typer.Exit(code=code)


@edge_app.command("zygote")
def zygote_command(
    socket_path: Annotated[
        Path,
        typer.Argument(
            metavar="SOCKET", help="The Unix socket daemons attach to (private to this user)."
        ),
    ],
) -> None:
    """One warm process for every device on this host: it imports torch, Opacus, Flower and
    the ClientApp once, and each `pollinate edge run --zygote SOCKET` gets its warm executor
    forked from it (pages shared copy-on-write) instead of a process that imports them all.
    For many devices on one machine (an emulated fleet, a gateway); a device alone on its
    machine needs none. Runs until SIGTERM or Ctrl-C.

    Example:

      pollinate edge zygote /tmp/fleet/zygote.sock &
      pollinate edge run --superlink 10.0.0.5:9093 --root-certificates ca.crt \\
        --key device.key --state-dir state --data mine.npz --zygote /tmp/fleet/zygote.sock
    """
    from pollinate.device.zygote import serve

    serve(socket_path)


@edge_app.command("rollback")
def rollback_command(
    state_dir: Annotated[Path, typer.Option(help="The daemon's --state-dir.")],
) -> None:
    """Put the previously installed bundle back in service (local inference follows at once).

    Example:

      pollinate edge rollback --state-dir state
    """
    from pollinate.device.bundles import BundleStore

    name = BundleStore(state_dir).rollback()
    make_console().print(f"bundle {name} is in service again")
