"""``load_bundle`` and :class:`EdgeModel`: a verified bundle opened with one runtime."""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from pollinate.edge_runtime._backends import Backend, open_backend
from pollinate.edge_runtime._bundle import open_bundle, select_artifact, verify_bundle_dir
from pollinate.edge_runtime._preprocess import InputAdapter
from pollinate.edge_runtime.errors import BundleError, InputError
from pollinate.edge_runtime.manifest import Artifact, Manifest, TensorSpec, predicted_bins

__all__ = ["BackendName", "EdgeModel", "PrecisionName", "load_bundle"]

BackendName = Literal["auto", "onnxruntime", "openvino", "litert"]
PrecisionName = Literal["auto", "fp32", "fp16", "int8"]


class EdgeModel:
    """A verified bundle artifact, ready to predict.

    Attributes: ``manifest`` (the bundle's :class:`Manifest`), ``artifact`` (the
    :class:`Artifact` being run), ``backend`` (its runtime: 'onnxruntime', 'openvino' or
    'litert'), ``path`` (the bundle directory; a private temporary copy for an archive,
    removed by :meth:`close` or when the model is garbage collected).
    """

    def __init__(
        self,
        manifest: Manifest,
        artifact: Artifact,
        session: Backend,
        path: Path,
        *,
        temp_dir: Path | None = None,
    ) -> None:
        self.manifest = manifest
        self.artifact = artifact
        self.backend: str = artifact.runtime
        self.path = path
        self._session = session
        self._adapter = InputAdapter(
            manifest.inputs[0], manifest.preprocessing, session.input_dtype
        )
        self._cleanup = (
            weakref.finalize(self, shutil.rmtree, temp_dir, ignore_errors=True)
            if temp_dir is not None
            else None
        )

    # ------------------------------------------------------------------ specs
    @property
    def input_spec(self) -> TensorSpec:
        """The model input (shape with -1 for the batch)."""
        return self.manifest.inputs[0]

    @property
    def output_spec(self) -> TensorSpec:
        """The model output whose values :meth:`predict` returns (the logits)."""
        return self.manifest.outputs[0]

    @property
    def labels(self) -> list[str]:
        """Class names, index -> label (none for regression)."""
        return list(self.manifest.labels)

    @property
    def task(self) -> str:
        """``classification`` (one logit per class), ``binary`` (the logit of class 1) or
        ``regression`` (the predicted value)."""
        return self.manifest.task

    # ------------------------------------------------------------------ inference
    def predict(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Logits (float32) for one sample or a batch.

        ``x`` is one sample (the input shape without the batch, or a raw ``H x W`` /
        ``H x W x C`` uint8 image) or a batch of them. Raw uint8 input is preprocessed as the
        manifest says; float input of the model's shape is taken as already preprocessed.
        One sample gives one row of logits (no batch dimension); a batch gives ``[N, classes]``.
        Raises :class:`InputError` for a shape or dtype the model cannot take.
        """
        batch, single = self._adapter.prepare(x)
        logits = self._run(batch)
        return logits[0] if single else logits

    def predict_labels(self, x: np.ndarray[Any, Any]) -> list[str]:
        """The predicted label of each sample (a list of one for a single sample).

        Raises ``ValueError`` for a regression model, which predicts values (:meth:`predict`).
        """
        return self.labels_for(np.atleast_2d(self.predict(x)))

    def labels_for(self, outputs: np.ndarray[Any, Any]) -> list[str]:
        """The label of each row of ``outputs`` (a batch from :meth:`predict`): the arg-max
        class, or for a binary model class 1 where the logit is above 0."""
        if self.task == "regression":
            raise ValueError("a regression model predicts values, not labels; use predict()")
        indices = predicted_bins(outputs, self.task, None)  # the drift monitor's decisions
        labels = self.manifest.labels
        return [labels[i] if i < len(labels) else str(i) for i in indices.tolist()]

    def _run(self, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        n = batch.shape[0]
        fixed = int(self.input_spec.shape[0])
        if n == 0:
            tail = [int(d) for d in self.output_spec.shape[1:]]
            if any(d < 0 for d in tail):
                raise InputError("an empty batch cannot be run: the output shape is dynamic")
            return np.zeros((0, *tail), dtype=np.float32)
        if fixed > 0 and n != fixed:  # a static batch: run it in chunks, pad the last one
            parts = []
            for start in range(0, n, fixed):
                chunk = batch[start : start + fixed]
                pad = fixed - chunk.shape[0]
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
                parts.append(self._session.run(chunk)[: fixed - pad])
            out = np.concatenate(parts)
        else:
            out = self._session.run(batch)
        if out.ndim == 0 or out.shape[0] != n:
            raise BundleError(
                f"{self.artifact.file} returned shape {list(out.shape)} for a batch of {n}; "
                f"{self.output_spec.name!r} should be {list(self.output_spec.shape)}"
            )
        return out.astype(np.float32, copy=False) if out.dtype.kind == "f" else out

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free the runtime and remove the temporary copy of an archived bundle."""
        self._session.close()
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> EdgeModel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        model = self.manifest.model
        return (
            f"EdgeModel({model.name!r} {model.version}, {self.backend} "
            f"{self.artifact.precision}, file={self.artifact.file!r})"
        )


def load_bundle(
    path: str | Path,
    *,
    backend: BackendName = "auto",
    precision: PrecisionName = "auto",
    public_key: str | Path | None = None,
    threads: int = 1,
    artifact: str | None = None,
) -> EdgeModel:
    """Verify a bundle (directory or ``.tar.gz``) and open one of its artifacts.

    Every file the manifest lists is checked by sha256 and unlisted files are refused; with
    ``public_key`` (a PEM file path or PEM text) ``manifest.sig`` must exist and verify.
    ``backend="auto"`` takes the first installed runtime among the bundle's artifacts
    (onnxruntime > openvino > litert); ``precision="auto"`` takes int8, else fp16, else fp32.
    ``artifact`` names one artifact file of the manifest instead (``backend`` and
    ``precision`` are then not used), e.g. when a bundle has two INT8 ONNX files.

    Raises :class:`BundleError` (missing, tampered, truncated, unsigned or unsuitable bundle),
    :class:`RuntimeMissingError` (the runtime is not installed; the message has the pip
    command), ``ValueError`` (an unknown backend or precision, threads < 1).

    Example::

        model = load_bundle("bundles/mnist-3.tar.gz", public_key="keys/export.pub")
        model.predict_labels(image_uint8_28x28)   # ['7']
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer of at least 1, got {threads!r}")
    with open_bundle(path) as (root, temp_dir):
        verified = verify_bundle_dir(root, public_key=public_key)
        if artifact is None:
            chosen = select_artifact(verified.manifest, backend, precision)
        else:
            named = [a for a in verified.manifest.artifacts if a.file == artifact]
            if not named:
                have = ", ".join(a.file for a in verified.manifest.artifacts)
                raise BundleError(f"the bundle has no artifact {artifact!r}; it has: {have}")
            chosen = named[0]
        session = open_backend(
            chosen.runtime,
            root.joinpath(*chosen.file.split("/")),
            threads=threads,
            output_name=verified.manifest.outputs[0].name,
        )
        return EdgeModel(verified.manifest, chosen, session, root, temp_dir=temp_dir)
