"""``pollinate export`` and ``pollinate edge ...``: bundles out of runs, and running them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pollinate.cli.console import is_plain, make_console, print_error
from pollinate.errors import PollinateError

__all__ = ["edge_app", "export_command", "keygen_command"]

edge_app = typer.Typer(
    help="Run exported bundles on a device: predict and benchmark (no torch needed).",
    no_args_is_help=True,
)


def _fail(message: str, code: int) -> typer.Exit:
    print_error(message)  # one line off a terminal; brackets are text, not markup
    return typer.Exit(code=code)


def export_command(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory written by `pollinate simulate`.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Bundle folder to create, a .tar.gz beside it [RUN_DIR/bundle].",
            show_default=False,
        ),
    ] = None,
    format_: Annotated[
        list[str] | None,
        typer.Option(
            "--format", help="onnx, openvino, tflite (repeatable; default: onnx, openvino)."
        ),
    ] = None,
    precision: Annotated[
        list[str] | None, typer.Option(help="fp32, fp16, int8 (repeatable; default: fp32, int8).")
    ] = None,
    calibration_samples: Annotated[int, typer.Option(help="Calibration samples for INT8.")] = 300,
    prune: Annotated[
        float, typer.Option(help="Also write a channel-pruned INT8 ONNX (0.75 = keep 25%).")
    ] = 0.0,
    sign_key: Annotated[
        Path | None, typer.Option(help="PEM ed25519 private key: sign the manifest.")
    ] = None,
    triton_repo: Annotated[
        Path | None, typer.Option(help="Also write a Triton model repository entry here.")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Model name in the manifest (default: the model).")
    ] = None,
) -> None:
    """Export the newest checkpoint of a run as a validated bundle.

    Every artifact is run on the test split against the torch model before it is written:
    FP32 must match within 1e-4, INT8 and FP16 may lose at most 1 point of accuracy.

    Examples:

      pollinate export runs/demo                    # -> runs/demo/bundle (+ .tar.gz)

      pollinate export runs/demo --out bundles/demo

      pollinate export runs/demo --format onnx --precision fp32 --triton-repo models

      pollinate export runs/demo --out bundles/demo-onnx --format onnx --precision int8

      pollinate export runs/demo --out bundles/demo-small --format onnx --prune 0.75
    """
    from pollinate.export.pipeline import ExportOptions, Format, Precision, export_run

    console = make_console(stderr=True)
    try:
        formats = tuple(_parse(Format, format_ or ["onnx", "openvino"], "--format"))
        precisions = tuple(_parse(Precision, precision or ["fp32", "int8"], "--precision"))
        out = out if out is not None else run_dir / "bundle"
        options = ExportOptions(
            out=out, formats=formats, precisions=precisions,
            calibration_samples=calibration_samples, prune=prune, sign_key=sign_key,
            triton_repo=triton_repo, name=name,
        )  # fmt: skip
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        # A spinner is for a terminal: in a pipe or a log it would leave a stray last frame.
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console, disable=is_plain(sys.stderr)) as progress:  # fmt: skip
            task = progress.add_task("export", total=None)
            result = export_run(
                run_dir, options, on_step=lambda msg: progress.update(task, description=msg)
            )
    except PollinateError as err:
        raise _fail(str(err), err.exit_code) from None
    table = Table(title=f"bundle {result.bundle} (torch accuracy {result.torch_accuracy:.4f})")
    for col in (
        "artifact",
        "runtime",
        "precision",
        "size",
        "accuracy",
        "agreement",
        "max |err|",
        "p50 ms",
    ):
        table.add_column(col, justify="right" if col not in ("artifact", "runtime") else "left")
    for row in result.rows:
        table.add_row(
            row.file, row.runtime, row.precision, f"{row.size_bytes / 1024:.1f} KiB",
            f"{row.accuracy:.4f}", f"{row.agreement:.4f}", f"{row.max_abs_error:.2e}",
            f"{row.p50_ms:.3f}",
        )  # fmt: skip
    make_console(min_width=120).print(table)
    if result.triton_version is not None:
        console.print(f"published version {result.triton_version} to {triton_repo}")
    if result.archive is not None:
        make_console().print(f"archive: {result.archive}")


def _parse(enum_type: Any, values: list[str], flag: str) -> list[Any]:
    from pollinate.errors import ConfigError

    out = []
    for value in values:
        try:
            out.append(enum_type(value))
        except ValueError:
            choices = ", ".join(m.value for m in enum_type)
            raise ConfigError(f"{flag}: unknown value {value!r}; choose from {choices}") from None
    return out


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


def _edge_errors(err: Exception) -> typer.Exit:
    code = int(getattr(err, "exit_code", 1))
    return _fail(str(err), code)


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

    from pollinate.edge_runtime import BundleError, InputError, RuntimeMissingError, load_bundle

    try:
        model = load_bundle(bundle, backend=backend, precision=precision, public_key=public_key)  # type: ignore[arg-type]
        x = _load_input(input_)
        logits = model.predict(x)
        labels = model.predict_labels(x)
    except (BundleError, InputError, RuntimeMissingError, ValueError) as err:
        raise _edge_errors(err) from None
    out = {
        "bundle": str(bundle),
        "backend": model.backend,
        "artifact": model.artifact.file,
        "labels": labels,
        "logits": [[round(float(v), 5) for v in row] for row in np.atleast_2d(logits)],
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

    from pollinate.edge_runtime import BundleError, InputError, RuntimeMissingError, load_bundle

    try:
        model = load_bundle(bundle, backend=backend, precision=precision)  # type: ignore[arg-type]
    except (BundleError, InputError, RuntimeMissingError, ValueError) as err:
        raise _edge_errors(err) from None
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


def keygen_command(
    private: Annotated[
        Path, typer.Argument(help="Where to write the PEM private key (mode 0600).")
    ],
    public: Annotated[Path, typer.Argument(help="Where to write the PEM public key.")],
) -> None:
    """Make an ed25519 key pair for signing bundles (existing files are never overwritten).

    Example:

      pollinate keygen sign.pem sign.pub && pollinate export runs/demo --out b --sign-key sign.pem
    """
    from pollinate.export._bundle import generate_signing_key

    try:
        generate_signing_key(private, public)
    except FileExistsError as err:
        raise _fail(f"{err}; choose new file names or delete the old key on purpose", 2) from None
    except OSError as err:
        raise _fail(f"cannot write the key pair: {err}", 1) from None
    make_console().print(f"private key: {private}\npublic key:  {public}")
