"""``pollinate export`` and ``pollinate keygen``: validated bundles out of a run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from pollinate.cli._common import user_code_on_path
from pollinate.cli.console import is_plain, make_console
from pollinate.errors import ConfigError, ExportError, PollinateError

__all__ = ["export_command", "keygen_command"]


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
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            envvar="MLFLOW_TRACKING_URI",
            help="Register the bundle in this MLflow registry as a 'candidate' version "
            "[$MLFLOW_TRACKING_URI, else the run's tracking-uri].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Export the newest checkpoint of a run as a validated bundle.

    Every artifact is run on the test split against the torch model before it is written:
    FP32 must match within 1e-4, INT8 and FP16 may lose at most 1 point of accuracy (of R²
    for a regression model).

    Examples:

      pollinate export runs/demo                    # -> runs/demo/bundle (+ .tar.gz)

      pollinate export runs/demo --out bundles/demo

      pollinate export runs/demo --format onnx --precision fp32 --triton-repo models

      pollinate export runs/demo --out bundles/demo-onnx --format onnx --precision int8

      pollinate export runs/demo --out bundles/demo-small --format onnx --prune 0.75

      pollinate export runs/demo --tracking-uri http://127.0.0.1:5000   # + a registry version
    """
    from pollinate.export.pipeline import ExportOptions, Format, Precision, export_run

    user_code_on_path()  # a run of a user's model (an import path) rebuilds it from here

    console = make_console(stderr=True)
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
        try:
            result = export_run(
                run_dir, options, on_step=lambda msg: progress.update(task, description=msg)
            )
        except ExportError as err:
            try:
                _register_failed(run_dir, tracking_uri, name, str(err))
            except PollinateError as problem:  # the export's own error is the one to report
                console.print(f"warning: the failed model is unregistered: {escape(str(problem))}")
            raise
    score = "R²" if result.task == "regression" else "accuracy"
    table = Table(title=f"bundle {result.bundle} (torch {score} {result.torch_accuracy:.4f})")
    for col in (
        "artifact",
        "runtime",
        "precision",
        "size",
        score,
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
        uri = _tracking_uri(run_dir, tracking_uri)
        if uri:
            from pollinate.rundir.model_registry import bundle_lineage, register_bundle

            model, lineage = bundle_lineage(run_dir, result.archive)
            version = register_bundle(uri, run_dir, model, [result.archive], lineage)
            make_console().print(f"registered {model} version {version} (candidate) at {uri}")


def _tracking_uri(run_dir: Path, given: str | None) -> str:
    """The registry to register in: the flag (or $MLFLOW_TRACKING_URI), else the run's own
    ``tracking-uri`` setting, else the store the run was tracked into (``mlflow.json``, which
    is how a run tracked by default into ``./mlflow.db`` is found from any folder)."""
    if given is None:
        try:
            settings = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["settings"]
            given = str(settings.get("tracking-uri", ""))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            given = ""
        if not given.strip():
            from pollinate.rundir.tracking import read_tracking_file

            given = read_tracking_file(run_dir).get("tracking_uri", "")
    return "" if given.strip().lower() == "off" else given


def _register_failed(run_dir: Path, given: str | None, name: str | None, reason: str) -> None:
    """Register the model whose export failed validation, tagged so it is never promoted."""
    uri = _tracking_uri(run_dir, given)
    if not uri:
        return
    from pollinate.export.pipeline import load_run
    from pollinate.rundir.model_registry import lineage_of, model_name, register_bundle

    run = load_run(run_dir)
    lineage = lineage_of(
        run_dir, None, server_round=run.server_round, accuracy=None,
        validation="failed", reason=reason,
    )  # fmt: skip
    model = model_name(name or run.settings.model)
    ckpt = run_dir / "checkpoints" / f"round-{run.server_round:04d}" / "model.safetensors"
    version = register_bundle(uri, run_dir, model, [ckpt] if ckpt.is_file() else [], lineage)
    make_console(stderr=True).print(f"registered {model} version {version} as failed at {uri}")


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
        raise ConfigError(
            f"{err}; choose new file names or delete the old key on purpose"
        ) from None
    except OSError as err:
        raise PollinateError(f"cannot write the key pair: {err}") from None
    make_console().print(f"private key: {private}\npublic key:  {public}")
