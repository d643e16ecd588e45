"""Readers for data kept in local files: ``.npz``, ``.csv`` and folders of images."""

from __future__ import annotations

import csv
import os
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pollinate.data._types import ArrayDataset
from pollinate.errors import DataError
from pollinate.log import logger
from pollinate.tasks import TaskKind, detect_task, task_targets

SUPPORTED_FORMATS = (
    "a .npz file with arrays 'x' and 'y', a .csv file with a header row and a 'label' "
    "(or 'y') column, or a folder with one sub-folder of images per class"
)

_LABEL_COLUMNS = ("label", "y")


class RawData(NamedTuple):
    """Everything read from one source, before any split."""

    x: np.ndarray
    y: np.ndarray
    labels: tuple[str, ...]


def load_local_data(
    path: str | os.PathLike[str], *, task: TaskKind | str = TaskKind.CLASSIFICATION
) -> ArrayDataset:
    """Read a device's own data from ``path``, without splitting it.

    The targets become those of ``task`` (the run's task, which the server sends: a device's
    few labels alone cannot tell a binary task from a classification one).

    Args:
        path: A ``.npz`` file with arrays ``x`` and ``y``, a ``.csv`` file with a header row
            and a ``label`` (or ``y``) column, or a folder holding one sub-folder of images
            per class.

    Returns:
        All samples of the source as an :class:`ArrayDataset`.

    Raises:
        DataError: The path is missing, empty, corrupt or in an unsupported format.
    """
    raw = read_source(Path(path))
    kind = detect_task(task, raw.y, str(path))  # as given, or read from the labels for auto
    return ArrayDataset(x=raw.x, y=task_targets(kind, raw.y, str(path)))


def read_source(path: Path, *, extra_hint: str = "") -> RawData:
    """Read ``path`` in whichever supported format it has.

    Args:
        path: The file or folder to read.
        extra_hint: Appended to the "does not exist" / "unknown format" messages (e.g. the
            list of built-in datasets).

    Raises:
        DataError: See :func:`load_local_data`.
    """
    if not path.exists():
        raise DataError(f"Data path {path} does not exist. Give {SUPPORTED_FORMATS}{extra_hint}.")
    if path.is_dir():
        return _read_image_folder(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise DataError(
            f"Data file {path} has an unsupported format {path.suffix or '(no extension)'!r}. "
            f"Give {SUPPORTED_FORMATS}{extra_hint}."
        )
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"Cannot read data file {path}: {exc}. Check its permissions.") from exc
    if size == 0:
        raise DataError(f"Data file {path} is empty. Write the samples into it and try again.")
    if suffix == ".npz":
        return _read_npz(path)
    return _read_csv(path)


# ------------------------------------------------------------------------------------ npz


def _read_npz(path: Path) -> RawData:
    try:
        # Open the file here: np.load leaks its own handle when the archive is corrupt.
        with path.open("rb") as handle:
            head = handle.read(6)
            if head and not head.startswith((b"PK", b"\x93NUMPY")):
                # numpy's own message for this case suggests allow_pickle, which would be
                # dangerous advice for a file from elsewhere: say what is wrong instead.
                raise DataError(
                    f"Data file {path} is not an .npz archive (no zip header); re-create it "
                    "with numpy.savez(path, x=samples, y=labels)."
                )
            handle.seek(0)
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(
                    f"Data file {path} holds a single array, not an .npz archive; save it "
                    "with numpy.savez(path, x=samples, y=labels)."
                )
            with loaded as archive:
                missing = [key for key in ("x", "y") if key not in archive.files]
                if missing:
                    raise DataError(
                        f"Data file {path} has no array {' or '.join(map(repr, missing))} "
                        f"(found: {', '.join(archive.files) or 'none'}); save it with "
                        "numpy.savez(path, x=samples, y=labels)."
                    )
                x = archive["x"]
                y = archive["y"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"Data file {path} is not a readable .npz archive ({type(exc).__name__}: {exc}); "
            "re-create it with numpy.savez(path, x=samples, y=labels)."
        ) from exc
    x = _features_from_npz(x, path)
    y = _labels_from_array(y, path)
    x, y = _check_samples(x, y, path)
    return RawData(x=x, y=y, labels=_numbered_labels(y))


def _features_from_npz(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, np.newaxis, :, :]
    elif x.ndim not in (2, 4):
        raise DataError(
            f"Array 'x' in {path} has shape {x.shape}; expected (N, F), (N, H, W) or (N, C, H, W)."
        )
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if x.dtype.kind in "fiub":
        return x.astype(np.float32)
    raise DataError(
        f"Array 'x' in {path} has dtype {x.dtype}; expected numbers (uint8 pixels 0..255 or "
        "floats)."
    )


# ------------------------------------------------------------------------------------ csv


def _read_csv(path: Path) -> RawData:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"Data file {path} is not a readable CSV file ({type(exc).__name__}: {exc}); "
            "save it as UTF-8 text with a header row."
        ) from exc
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(f"Data file {path} is empty. Write a header row and the samples.")
    header = [name.strip() for name in rows[0]]
    body = rows[1:]
    if not body:
        raise DataError(f"Data file {path} has a header row but no samples. Add data rows.")
    lowered = [name.lower() for name in header]
    label_col = next((lowered.index(n) for n in _LABEL_COLUMNS if n in lowered), None)
    if label_col is None:
        raise DataError(
            f"Data file {path} has no 'label' (or 'y') column (columns: {', '.join(header)}); "
            "name the column that holds the class labels 'label'."
        )
    if len(header) < 2:
        raise DataError(f"Data file {path} has only a label column; add feature columns.")
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(
                f"Data file {path} line {line} has {len(row)} fields but the header has "
                f"{len(header)}; every row needs one value per column."
            )
    table = np.asarray(body, dtype=str)
    try:
        values = table.astype(np.float64)
    except ValueError as exc:
        bad_row, bad_col = _first_bad_cell(table)
        raise DataError(
            f"Data file {path} line {bad_row + 2}, column {header[bad_col]!r} holds "
            f"{table[bad_row, bad_col]!r}, which is not a number; every value must be numeric."
        ) from exc
    y = _labels_from_array(values[:, label_col], path)
    x = np.delete(values, label_col, axis=1).astype(np.float32)
    x, y = _check_samples(x, y, path)
    return RawData(x=x, y=y, labels=_numbered_labels(y))


def _first_bad_cell(table: np.ndarray) -> tuple[int, int]:
    for (row, col), cell in np.ndenumerate(table):
        try:
            float(cell)
        except ValueError:
            return int(row), int(col)
    return 0, 0  # pragma: no cover - only called after a failed conversion


# ----------------------------------------------------------------------------- image folder


def _image_extensions() -> frozenset[str]:
    from PIL import Image

    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _read_image_folder(path: Path) -> RawData:
    from PIL import Image

    try:
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"Cannot list data folder {path}: {exc}. Check its permissions.") from exc
    class_dirs = [p for p in entries if p.is_dir()]
    if not class_dirs:
        what = "is empty" if not entries else "has no sub-folders"
        raise DataError(
            f"Data folder {path} {what}; put the images of each class in their own sub-folder "
            "(e.g. cat/1.png, dog/2.png)."
        )
    stray = [p.name for p in entries if not p.is_dir()]
    if stray:
        logger.warning("Ignoring %d files outside class sub-folders in %s", len(stray), path)
    extensions = _image_extensions()
    images: list[np.ndarray] = []
    targets: list[int] = []
    size: tuple[int, int] | None = None
    first: Path | None = None
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p
            for p in class_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
        )
        if not files:
            raise DataError(
                f"Class folder {class_dir} holds no image files; add images (PNG, JPEG, ...) "
                "or remove the folder."
            )
        for file in files:
            try:
                with Image.open(file) as img:
                    gray = img.convert("L")
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise DataError(
                    f"Image {file} cannot be read ({type(exc).__name__}: {exc}); replace or "
                    "remove it."
                ) from exc
            if size is None:
                size, first = gray.size, file
            elif gray.size != size:
                raise DataError(
                    f"Image {file} is {gray.size[0]}x{gray.size[1]} pixels but {first} is "
                    f"{size[0]}x{size[1]}; resize all images to the same size."
                )
            images.append(np.asarray(gray, dtype=np.uint8))
            targets.append(label)
    x = np.stack(images)[:, np.newaxis, :, :].astype(np.float32) / np.float32(255.0)
    y = np.asarray(targets, dtype=np.int64)
    return RawData(x=x, y=y, labels=tuple(p.name for p in class_dirs))


# ------------------------------------------------------------------------------- checks


def _labels_from_array(y: np.ndarray, path: Path | str) -> np.ndarray:
    """One numeric target per sample, as read: whole numbers stay integers, fractions floats
    (which task they fit is decided later, :func:`pollinate.tasks.task_targets`)."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"Labels in {path} have shape {y.shape}; expected one label per sample.")
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            bad = int(np.flatnonzero(~np.isfinite(y))[0])
            raise DataError(
                f"Labels in {path} include {y[bad]} (sample {bad}); remove or impute the "
                "samples with NaN or infinite targets."
            )
        return y.astype(np.float64)
    if y.dtype.kind not in "iu":
        raise DataError(
            f"Labels in {path} have dtype {y.dtype}; labels must be numbers (class numbers "
            "0, 1, 2, ... or regression targets)."
        )
    return y.astype(np.int64)


def _check_samples(x: np.ndarray, y: np.ndarray, path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"Data in {path} has {x.shape[0]} samples but {y.shape[0]} labels; give exactly one "
            "label per sample."
        )
    if x.shape[0] == 0:
        raise DataError(f"Data in {path} holds no samples. Add samples and try again.")
    if not np.all(np.isfinite(x)):
        raise DataError(
            f"Data in {path} contains NaN or infinite values; clean or impute them first."
        )
    return x, y


def _numbered_labels(y: np.ndarray) -> tuple[str, ...]:
    """Class names ``0 .. max``; none for targets that are not whole non-negative numbers."""
    if not len(y) or (y.dtype.kind == "f" and not np.all(y == np.round(y))) or y.min() < 0:
        return ()
    if int(y.max()) >= 100_000:
        return ()
    return tuple(str(i) for i in range(int(y.max()) + 1))
