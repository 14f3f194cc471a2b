"""idx files (the MNIST format): the reader, and mnist / fashion_mnist from idx files found
under data.root or Debian's dataset-fashion-mnist package (no Ray; synthetic files except one
test that needs the Debian package)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from raysl import data
from raysl.config import DataConfig
from raysl.data import DEBIAN_FASHION_MNIST, load_dataset, read_idx
from raysl.errors import DataError

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
          np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def _write_idx(path: Path, a: np.ndarray) -> Path:
    """Write ``a`` as an idx file at ``path``, gzip-compressed when the name ends in .gz."""
    raw = (bytes([0, 0, _CODES[a.dtype], a.ndim]) + np.asarray(a.shape, ">u4").tobytes()
           + a.astype(a.dtype.newbyteorder(">")).tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw, compresslevel=1) if path.suffix == ".gz" else raw)
    return path


def _names_file(p: Path) -> re.Pattern[str]:
    return re.compile(re.escape(str(p)))


# -- read_idx --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", list(_CODES))
def test_read_idx_round_trips(tmp_path: Path, dtype: np.dtype, suffix: str) -> None:
    rng = np.random.default_rng(0)
    for shape in [(7,), (3, 4, 5)]:
        a = (rng.standard_normal(shape) * 100).astype(dtype)  # negatives wrap for uint8: fine
        p = _write_idx(tmp_path / f"a{len(shape)}{suffix}", a)
        b = read_idx(p)
        assert b.shape == shape
        assert b.dtype == dtype and b.dtype.isnative
        np.testing.assert_array_equal(b, a)
        b[0] = 0  # a copy, not a read-only view of the file's bytes


def test_read_idx_detects_gzip_by_content_not_suffix(tmp_path: Path) -> None:
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    p = _write_idx(tmp_path / "a.gz", a).rename(tmp_path / "plain-name")
    np.testing.assert_array_equal(read_idx(p), a)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_a_truncated_idx_file_is_a_data_error_naming_it(tmp_path: Path, suffix: str) -> None:
    p = _write_idx(tmp_path / f"images{suffix}", np.zeros((4, 28, 28), np.uint8))
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DataError, match=_names_file(p)):
        read_idx(p)


def test_a_truncated_header_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "short"
    p.write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))  # 3 dims announced, 2 bytes of them given
    with pytest.raises(DataError, match=r"truncated idx file.*header"):
        read_idx(p)


@pytest.mark.parametrize("header", [b"\x01\x02\x08\x01", b"\x00\x00\x0a\x01", b"\x00"])
def test_a_bad_magic_number_is_a_data_error_naming_the_file(tmp_path: Path,
                                                            header: bytes) -> None:
    p = tmp_path / "not-idx"
    p.write_bytes(header + bytes(8))
    with pytest.raises(DataError, match=_names_file(p)) as e:
        read_idx(p)
    assert "not an idx file" in str(e.value)


def test_trailing_bytes_are_a_data_error(tmp_path: Path) -> None:
    p = _write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    p.write_bytes(p.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(p)


# -- fashion_mnist / mnist from idx files ----------------------------------------------------


def _write_official(folder: Path, suffix: str, n_train: int = 12, n_test: int = 5,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """The four official idx files with random uint8 images (28x28) and labels 0..9."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, a in arrays.items():
        _write_idx(folder / (stem + suffix), a)
    return arrays


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("layout", ["", "fashion_mnist", "FashionMNIST/raw"])
def test_fashion_mnist_loads_idx_files_in_each_layout(tmp_path: Path, layout: str,
                                                      suffix: str) -> None:
    a = _write_official(tmp_path / layout, suffix)
    ds = load_dataset(DataConfig(dataset="fashion_mnist", root=str(tmp_path)))
    assert ds.name == "fashion_mnist" and ds.n_classes == 10
    assert ds.x.shape == (12, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.y.shape == (12,) and ds.y.dtype == np.int64
    assert ds.x_test is not None and ds.y_test is not None
    assert ds.x_test.shape == (5, 1, 28, 28) and ds.y_test.dtype == np.int64
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    # the official test files are the test split, and values are exactly torchvision's x / 255
    want = (a["t10k-images-idx3-ubyte"][:, None] / 255.0).astype(np.float32)
    np.testing.assert_array_equal(ds.x_test, want)
    np.testing.assert_array_equal(ds.y_test, a["t10k-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y, a["train-labels-idx1-ubyte"])


def test_mnist_loads_from_torchvisions_raw_folder(tmp_path: Path) -> None:
    _write_official(tmp_path / "MNIST" / "raw", ".gz", n_train=8, n_test=3)
    ds = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))
    assert ds.name == "mnist" and ds.x.shape == (8, 1, 28, 28)
    assert ds.x_test is not None and ds.x_test.shape == (3, 1, 28, 28)


def test_data_root_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_official(tmp_path / "data" / "fashion_mnist", ".gz")
    ds = load_dataset(DataConfig(dataset="fashion_mnist", root="~/data"))
    assert ds.x.shape == (12, 1, 28, 28)


def test_the_datasets_own_folder_wins_over_loose_files_in_root(tmp_path: Path) -> None:
    _write_official(tmp_path, "", n_train=11)  # e.g. MNIST's files copied into root
    _write_official(tmp_path / "fashion_mnist", ".gz", n_train=9)
    incomplete = tmp_path / "FashionMNIST" / "raw"  # 3 of 4 files: skipped, not half-used
    _write_official(incomplete, "", n_train=7)
    (incomplete / "t10k-labels-idx1-ubyte").unlink()
    assert load_dataset(DataConfig(dataset="fashion_mnist", root=str(tmp_path))).x.shape[0] == 9
    (tmp_path / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert load_dataset(DataConfig(dataset="fashion_mnist", root=str(tmp_path))).x.shape[0] == 11


def test_mismatched_labels_are_a_data_error_naming_the_file(tmp_path: Path) -> None:
    _write_official(tmp_path, ".gz")
    labels = _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=_names_file(labels)):
        load_dataset(DataConfig(dataset="fashion_mnist", root=str(tmp_path)))


def test_without_idx_files_the_error_names_the_debian_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torchvision")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    with pytest.raises(DataError, match=r"not found under data\.root") as e:
        load_dataset(DataConfig(dataset="fashion_mnist", root=str(tmp_path)))
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "t10k-images-idx3-ubyte[.gz]" in str(e.value)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason=f"needs Debian's dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})")
def test_real_fashion_mnist_from_the_debian_package(tmp_path: Path) -> None:
    ds = load_dataset(DataConfig(dataset="fashion_mnist", root=str(tmp_path)))  # empty root
    assert ds.x_test is not None and ds.y_test is not None
    assert ds.x.shape == (60_000, 1, 28, 28) and ds.x_test.shape == (10_000, 1, 28, 28)
    assert len(ds.x) + len(ds.x_test) == 70_000
    assert ds.n_classes == 10
    # Fashion-MNIST is balanced: 6,000 train and 1,000 test images per class
    np.testing.assert_array_equal(np.bincount(ds.y), np.full(10, 6_000))
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 1_000))
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
