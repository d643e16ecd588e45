"""Turning what a caller passes to ``predict`` into the model's input batch.

Two kinds of input are accepted:

* **raw** samples in ``Preprocessing.raw_dtype`` (uint8 pixels): ``x * scale``, then
  ``(x - mean) / std`` per channel. Images may come as ``H x W`` (one channel),
  ``H x W x C`` (as PIL and OpenCV give them) or already in the model's layout, one or a batch;
* **float** arrays in exactly the model's input shape (one sample, or a batch), taken as
  already preprocessed.

Anything else is an :class:`InputError` that says what was expected and what was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pollinate.edge_runtime.errors import BundleError, InputError
from pollinate.edge_runtime.manifest import Preprocessing, TensorSpec

__all__ = ["InputAdapter"]

Shape = tuple[int, ...]


def _matches(shape: Shape, spec: Shape) -> bool:
    """``shape`` fits ``spec``, where -1 in ``spec`` matches any size."""
    return len(shape) == len(spec) and all(
        s == d or d < 0 for s, d in zip(shape, spec, strict=True)
    )


def _fmt(shape: Shape) -> str:
    return "[" + ", ".join("N" if d == -2 else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class InputAdapter:
    """Checks and converts inputs for one model input.

    ``model_dtype`` is the float dtype the backend takes (float32, or float16 for an fp16
    model whose input is fp16).
    """

    spec: TensorSpec
    preprocessing: Preprocessing
    model_dtype: np.dtype[Any]

    def __post_init__(self) -> None:
        if len(self.spec.shape) < 2:
            raise BundleError(
                f"manifest.json: input {self.spec.name!r} has shape {self.spec.shape}; "
                "expected a batch dimension followed by the sample's dimensions"
            )
        channels = self._channels()
        for name in ("mean", "std"):
            values = getattr(self.preprocessing, name)
            if len(values) not in (1, channels):
                raise BundleError(
                    f"manifest.json: preprocessing.{name} has {len(values)} values for an input "
                    f"with {channels} channels (expected 1 or {channels})"
                )
        if any(v == 0 for v in self.preprocessing.std):
            raise BundleError("manifest.json: preprocessing.std contains 0")

    # ------------------------------------------------------------------ layout helpers
    @property
    def sample_shape(self) -> Shape:
        """The input shape without the batch dimension."""
        return tuple(int(d) for d in self.spec.shape[1:])

    def _layout(self) -> str:
        return self.preprocessing.layout.upper()

    def _channel_axis(self) -> int | None:
        """Channel axis of a batch, or None when the input has no channel dimension."""
        if len(self.sample_shape) == 3 and self._layout() == "NCHW":
            return 1
        if len(self.sample_shape) == 3 and self._layout() == "NHWC":
            return 3
        return None

    def _channels(self) -> int:
        axis = self._channel_axis()
        return self.sample_shape[axis - 1] if axis is not None else 1

    def _raw_dtype(self) -> np.dtype[Any] | None:
        try:
            return np.dtype(self.preprocessing.raw_dtype)
        except TypeError:
            return None

    def _raw_forms(self) -> list[tuple[Shape, str]]:
        """Extra raw shapes accepted (besides the model layout): (shape, kind)."""
        sample = self.sample_shape
        forms: list[tuple[Shape, str]] = []
        if len(sample) == 3 and self._layout() == "NCHW":
            c, h, w = sample
            if c == 1:
                forms.append(((h, w), "hw"))
            forms.append(((h, w, c), "hwc"))
        elif len(sample) == 3 and self._layout() == "NHWC":
            h, w, c = sample
            if c == 1:
                forms.append(((h, w), "hw"))
        return forms

    # ------------------------------------------------------------------ messages
    def expected(self) -> str:
        """The accepted inputs, in words."""
        sample = self.sample_shape
        text = (
            f"input {self.spec.name!r} {self.spec.dtype} {list(self.spec.shape)} (-1 is the "
            f"batch): one sample {list(sample)} or a batch {_fmt((-2, *sample))}, float values "
            "already preprocessed"
        )
        raw = self._raw_dtype()
        if raw is not None:
            shapes = [sample] + [shape for shape, _ in self._raw_forms()]
            listed = " or ".join(f"{_fmt(s)} / {_fmt((-2, *s))}" for s in shapes)
            text += f"; or raw {raw} {listed}"
        return text

    def _error(self, x: np.ndarray[Any, Any] | None, why: str) -> InputError:
        given = "" if x is None else f"; got {x.dtype} {list(x.shape)}"
        return InputError(f"{why}: expected {self.expected()}{given}")

    # ------------------------------------------------------------------ conversion
    def prepare(self, data: object) -> tuple[np.ndarray[Any, Any], bool]:
        """Return ``(batch in the model's layout and dtype, was_single_sample)``."""
        try:
            x = np.asarray(data)
        except (ValueError, TypeError) as err:
            raise self._error(None, f"input is not an array ({err})") from err
        raw = self._raw_dtype()
        if raw is not None and x.dtype == raw:
            batch, single = self._shape_raw(x)
            return self._normalize(batch), single
        if x.dtype.kind != "f":
            hint = ""
            if x.dtype.kind in "iub" and raw is not None:
                hint = f" (pixels? convert with x.astype(np.{raw}))"
            raise self._error(x, f"unsupported input dtype {x.dtype}{hint}")
        batch, single = self._shape_model(x)
        if not np.isfinite(batch).all():
            raise self._error(x, "input contains NaN or infinity")
        return batch.astype(self.model_dtype, copy=False), single

    def _shape_model(self, x: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], bool]:
        sample = self.sample_shape
        if _matches(x.shape, sample):
            return x[np.newaxis], True
        if x.ndim == len(sample) + 1 and _matches(x.shape[1:], sample):
            return x, False
        raise self._error(x, "input shape does not fit the model")

    def _shape_raw(self, x: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], bool]:
        try:
            return self._shape_model(x)
        except InputError:
            pass
        for shape, kind in self._raw_forms():
            if _matches(x.shape, shape):
                batch, single = x[np.newaxis], True
            elif x.ndim == len(shape) + 1 and _matches(x.shape[1:], shape):
                batch, single = x, False
            else:
                continue
            if kind == "hw":
                return np.expand_dims(batch, 1 if self._layout() == "NCHW" else 3), single
            return batch.transpose(0, 3, 1, 2), single  # N x H x W x C -> NCHW
        raise self._error(x, "input shape does not fit the model")

    def _normalize(self, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        pre = self.preprocessing
        out = batch.astype(np.float32) * np.float32(pre.scale)
        mean = np.asarray(pre.mean, dtype=np.float32)
        std = np.asarray(pre.std, dtype=np.float32)
        axis = self._channel_axis()
        if axis is not None and mean.size > 1:
            mean = mean.reshape([-1 if i == axis else 1 for i in range(batch.ndim)])
        if axis is not None and std.size > 1:
            std = std.reshape([-1 if i == axis else 1 for i in range(batch.ndim)])
        out = (out - mean) / std
        return out.astype(self.model_dtype, copy=False)
