"""The in-memory containers every data source is turned into."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pollinate.errors import DataError
from pollinate.tasks import CLASSIFICATION, Task


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Samples and labels held as two NumPy arrays.

    Attributes:
        x: ``float32`` features, shape ``(N, C, H, W)`` for images (values in ``[0, 1]``) or
            ``(N, F)`` for tabular data.
        y: targets, shape ``(N,)``: ``int64`` class numbers ``0 .. num_classes - 1`` for
            classification, ``float32`` 0/1 for binary and values for regression.

    Equality and hashing are by identity (comparing arrays element-wise has no single truth
    value).
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        """Check that ``x`` and ``y`` describe the same samples."""
        if self.y.ndim != 1:
            raise DataError(f"Labels must be a 1-D array, got shape {self.y.shape}.")
        if self.x.ndim < 1 or self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"x has {self.x.shape[0] if self.x.ndim else 0} samples but y has "
                f"{self.y.shape[0]} labels; they must have the same length."
            )

    def __len__(self) -> int:
        """Return the number of samples."""
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """Return a new dataset holding copies of the samples at ``indices`` (in that order)."""
        idx = np.asarray(indices)
        if idx.size == 0:
            idx = idx.astype(np.intp)
        return ArrayDataset(x=self.x[idx], y=self.y[idx])


@dataclass(frozen=True)
class DatasetSplit:
    """A dataset divided into a training and a test part.

    Attributes:
        name: The built-in name or the path the data came from.
        train: The training samples.
        test: The held-out test samples.
        num_classes: Number of classes (labels are ``0 .. num_classes - 1``; binary: 2,
            regression: 0).
        input_shape: Shape of one sample, e.g. ``(1, 28, 28)``.
        labels: Class names, indexed by label (none for regression).
        task: What the targets are (given, or detected from them).
        partitions: With a per-partition loader, each client's indices into ``train`` (its
            share's train part); None when pollinate partitions ``train`` itself.
        partition_ids: The clients ``partitions`` (and ``train`` and ``test``) hold, when the
            server read a sample of the shares (more clients than ``SERVER_SHARES``); None
            when it read them all, in order.
    """

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    task: Task = CLASSIFICATION
    partitions: tuple[np.ndarray, ...] | None = None
    partition_ids: tuple[int, ...] | None = None

    @property
    def num_outputs(self) -> int:
        """The model's output width for this data's task."""
        return self.task.num_outputs
