"""The learning task: what a model's outputs mean, what it trains on, what it reports.

Three kinds (:class:`TaskKind`), chosen by the run config's ``task`` or detected from the
labels when it is ``auto`` (:func:`detect_task`):

* ``classification``: one output per class, cross-entropy; accuracy and macro F1.
* ``binary``: one output (a logit), binary cross-entropy; accuracy at 0.5 and ROC AUC.
* ``regression``: one output, squared error; MSE, MAE, RMSE and MAPE.

A user may replace the loss (``loss = "pkg.module:fn"``: ``fn(outputs, targets)`` returns one
loss per sample, and must be written with torch operations ``torch.func`` can transform for
the fast engine) and add metrics (``metrics = "pkg.module:fn"``: ``fn(outputs, targets)`` on
numpy arrays returns a mapping of names to numbers, computed in central evaluation).

Everything here is per sample or per dataset; training code calls :meth:`Task.sample_losses`
under ``vmap`` (one sample at a time) and on whole batches alike.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: a device's daemon reads the task
    import torch  # kinds without loading it

from pollinate._imports import import_object
from pollinate.errors import ConfigError, DataError

__all__ = [
    "CLASSIFICATION",
    "Task",
    "TaskKind",
    "check_loss_hook",
    "detect_task",
    "task_targets",
]

#: at most this many distinct whole-number labels are read as classes by ``task = auto``
_MAX_AUTO_CLASSES = 100


class TaskKind(StrEnum):
    """What the model predicts; ``auto`` detects it from the labels."""

    AUTO = "auto"
    CLASSIFICATION = "classification"
    BINARY = "binary"
    REGRESSION = "regression"


LossHook = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
MetricsHook = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


@dataclass(frozen=True)
class Task:
    """A resolved task (never ``auto``), hashable, sent to clients as plain values.

    Attributes:
        kind: Classification, binary or regression.
        num_classes: Classes of a classification task (binary: 2; regression: 0).
        loss: Import path of the user's loss hook, or "" for the task's own loss.
        metrics: Import path of the user's metrics hook, or "" for none.
    """

    kind: TaskKind = TaskKind.CLASSIFICATION
    num_classes: int = 10
    loss: str = ""
    metrics: str = ""

    def __post_init__(self) -> None:
        """Reject ``auto`` and class counts that do not fit the kind."""
        if self.kind == TaskKind.AUTO:
            raise ConfigError("a resolved task cannot be 'auto'; detect it from the labels")
        if self.kind == TaskKind.CLASSIFICATION and self.num_classes < 2:
            raise ConfigError(
                f"a classification task needs at least 2 classes, got {self.num_classes}"
            )

    # ------------------------------------------------------------------ shape
    @property
    def num_outputs(self) -> int:
        """The model's output width: one per class, or one for binary and regression."""
        return self.num_classes if self.kind == TaskKind.CLASSIFICATION else 1

    @property
    def target_dtype(self) -> np.dtype[Any]:
        """int64 class numbers, or float32 targets (binary: 0.0 / 1.0)."""
        if self.kind == TaskKind.CLASSIFICATION:
            return np.dtype(np.int64)
        return np.dtype(np.float32)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The task's own metrics, in the order reports show them."""
        if self.kind == TaskKind.CLASSIFICATION:
            return ("accuracy", "macro_f1")
        if self.kind == TaskKind.BINARY:
            return ("accuracy", "auc")
        return ("mae", "rmse", "mape")

    @property
    def headline(self) -> str:
        """The one metric a progress line or a plot shows."""
        return "rmse" if self.kind == TaskKind.REGRESSION else "accuracy"

    def describe(self) -> str:
        """One line for humans: ``classification (10 classes)``, ``regression``, ..."""
        text = self.kind.value
        if self.kind == TaskKind.CLASSIFICATION:
            text += f" ({self.num_classes} classes)"
        if self.loss:
            text += f", loss {self.loss}"
        return text

    # ------------------------------------------------------------------ training
    def sample_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One loss per sample, shape ``(N,)`` (works under ``vmap`` with ``N = 1``)."""
        if self.loss:
            return _loss_hook(self.loss)(outputs, targets)
        import torch.nn.functional as F  # noqa: N812 - torch's own spelling

        if self.kind == TaskKind.CLASSIFICATION:
            return F.cross_entropy(outputs, targets, reduction="none")
        values = outputs.squeeze(-1)
        if self.kind == TaskKind.BINARY:
            return F.binary_cross_entropy_with_logits(values, targets, reduction="none")
        return (values - targets).square()

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Whether each prediction is right (classification and binary); all False for
        regression, which has no accuracy."""
        if self.kind == TaskKind.CLASSIFICATION:
            return outputs.argmax(-1) == targets
        if self.kind == TaskKind.BINARY:
            return (outputs.squeeze(-1) > 0) == (targets > 0.5)
        import torch

        return torch.zeros(targets.shape, dtype=torch.bool)

    @property
    def has_accuracy(self) -> bool:
        """Whether :meth:`correct` means anything (not for regression)."""
        return self.kind != TaskKind.REGRESSION

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """The task's metrics (and the user's, if any) of ``outputs`` against ``targets``."""
        out = np.asarray(outputs, dtype=np.float64)
        y = np.asarray(targets)
        metrics: dict[str, float] = {}
        if self.kind == TaskKind.CLASSIFICATION:
            pred = out.argmax(axis=1)
            metrics["accuracy"] = float((pred == y).mean()) if len(y) else 0.0
            metrics["macro_f1"] = _macro_f1(y, pred, self.num_classes)
        elif self.kind == TaskKind.BINARY:
            from sklearn.metrics import roc_auc_score

            scores = out.reshape(len(y))
            truth = y > 0.5
            metrics["accuracy"] = float(((scores > 0) == truth).mean()) if len(y) else 0.0
            both = 0 < int(truth.sum()) < len(truth)
            metrics["auc"] = float(roc_auc_score(truth, scores)) if both else math.nan
        else:
            err = out.reshape(len(y)) - y.astype(np.float64)
            metrics["mse"] = float(np.mean(err**2)) if len(y) else math.nan
            metrics["mae"] = float(np.mean(np.abs(err))) if len(y) else math.nan
            metrics["rmse"] = math.sqrt(metrics["mse"])
            metrics["mape"] = _mape(err, y.astype(np.float64))
        if self.metrics:
            metrics.update(_user_metrics(self.metrics, outputs, targets))
        return metrics

    # ------------------------------------------------------------------ wire form
    def to_config(self) -> dict[str, str | int]:
        """The task as run-config values (``task``, ``num-classes``, ``loss``, ``metrics``)."""
        return {
            "task": self.kind.value, "num-classes": self.num_classes,
            "loss": self.loss, "metrics": self.metrics,
        }  # fmt: skip


#: the task of the built-in data sets (10 classes), the default of training settings
CLASSIFICATION = Task()


def _mape(err: np.ndarray, y: np.ndarray) -> float:
    """Mean absolute percentage error over the samples whose target is not 0 (in percent)."""
    nonzero = y != 0
    if not nonzero.any():
        return math.nan
    return float(100.0 * np.mean(np.abs(err[nonzero]) / np.abs(y[nonzero])))


@functools.cache
def _loss_hook(spec: str) -> LossHook:
    obj = import_object(spec, "loss")
    if not callable(obj):
        raise ConfigError(f"loss {spec!r} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]


def _user_metrics(spec: str, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    fn = import_object(spec, "metrics")
    if not callable(fn):
        raise ConfigError(f"metrics {spec!r} is a {type(fn).__name__}, not a function")
    try:
        result = fn(np.asarray(outputs), np.asarray(targets))
    except Exception as err:
        raise ConfigError(f"metrics {spec!r} failed: {type(err).__name__}: {err}") from None
    if not isinstance(result, Mapping):
        raise ConfigError(
            f"metrics {spec!r} returned a {type(result).__name__}; return a mapping of metric "
            "names to numbers, e.g. {'median_error': 0.3}"
        )
    out: dict[str, float] = {}
    for name, value in result.items():
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"metrics {spec!r}: {name!r} is {value!r}, not a number") from None
    return out


def check_loss_hook(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """ConfigError unless the task's loss gives one finite number per sample on a probe."""
    import torch

    try:
        losses = task.sample_losses(outputs, targets)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(
            f"loss {task.loss or task.kind.value!r} fails on outputs of shape "
            f"{tuple(outputs.shape)}: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (len(targets),):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ConfigError(
            f"loss {task.loss!r} returned {shape} for a batch of {len(targets)}; it must "
            f"return one loss per sample, shape ({len(targets)},) (reduction='none')"
        )


# ---------------------------------------------------------------------- detection


def detect_task(requested: TaskKind | str, y: np.ndarray, source: str) -> TaskKind:
    """The task ``requested``, or with ``auto`` the one the labels ``y`` describe.

    ``auto`` reads whole-number labels 0/1 as binary, 0..K-1 (every class present, K <= 100)
    as classification, and anything else given as floats (fractions, or whole numbers that
    are not class numbers, such as a count or a price) as regression. Whole-number labels of
    an integer type that are not 0..K-1 stay classification, which the data checks refuse
    with the fix.
    """
    kind = TaskKind(requested)
    y = np.asarray(y)
    if kind != TaskKind.AUTO:
        return kind
    if y.dtype.kind == "f" and not _whole(y):
        return TaskKind.REGRESSION
    values = np.unique(y)
    if len(values) == 2 and set(values.tolist()) == {0, 1}:
        return TaskKind.BINARY
    is_classes = len(values) <= _MAX_AUTO_CLASSES and np.array_equal(values, np.arange(len(values)))
    if not is_classes and y.dtype.kind == "f":
        return TaskKind.REGRESSION
    return TaskKind.CLASSIFICATION


def _whole(y: np.ndarray) -> bool:
    return bool(np.all(y == np.round(y)))


def task_targets(kind: TaskKind, y: np.ndarray, source: str) -> np.ndarray:
    """``y`` as the targets of ``kind`` (int64 classes or float32 values); DataError saying
    what is wrong with them for that task, and how to fix it."""
    y = np.asarray(y)
    if y.dtype.kind not in "biuf":
        raise DataError(f"Dataset {source}: targets have dtype {y.dtype}; they must be numbers")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        bad = int(np.flatnonzero(~np.isfinite(y))[0])
        raise DataError(
            f"Dataset {source}: target {bad} is {y[bad]}; remove or impute the samples with "
            "NaN or infinite targets"
        )
    if kind == TaskKind.REGRESSION:
        return y.astype(np.float32)
    if y.dtype.kind == "f" and not _whole(y):
        raise DataError(
            f"Dataset {source}: targets include fractions such as {_first_fraction(y)}, a "
            f"regression target given to a {kind.value} task; set task = 'regression' "
            "(--task regression), or bin the target into classes 0..K-1"
        )
    if y.size and int(y.min()) < 0:
        raise DataError(
            f"Dataset {source}: labels include negative values ({int(y.min())}); labels of a "
            f"{kind.value} task are class numbers 0, 1, ..."
        )
    if kind == TaskKind.BINARY:
        values = set(np.unique(y).tolist())
        if not values <= {0, 1}:
            raise DataError(
                f"Dataset {source}: a binary task needs labels 0 and 1, got "
                f"{len(values)} distinct values ({', '.join(map(str, sorted(values)[:5]))}"
                f"{', ...' if len(values) > 5 else ''}); use task = 'classification' for more "
                "than two classes"
            )
        return y.astype(np.float32)
    return y.astype(np.int64)


def _first_fraction(y: np.ndarray) -> str:
    return repr(float(y[np.flatnonzero(y != np.round(y))[0]]))


def _macro_f1(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Mean over classes 0..K-1 of F1 = 2 TP / (2 TP + FP + FN), 0 for a class that is
    neither predicted nor present (scikit-learn's ``f1_score(average="macro",
    zero_division=0)``, without importing scikit-learn on the evaluation path)."""
    k = max(1, num_classes)
    confusion = np.bincount(
        np.asarray(truth, dtype=np.int64) * k + np.asarray(pred, dtype=np.int64), minlength=k * k
    ).reshape(k, k)
    tp = np.diag(confusion).astype(np.float64)
    denominator = confusion.sum(0) + confusion.sum(1)  # (TP + FP) + (TP + FN)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(k), where=denominator > 0)
    return float(f1.mean())
