"""Bad input, table-driven: every case ends with exit code 2 and one line on stderr naming the
file or key, what was found and what is allowed, before Ray starts, with nothing written to
--out."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from raysl.cli import main


def _npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def _good_x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)


def _good_y() -> np.ndarray:
    return np.repeat(np.arange(3), 20)


def strings_x(d: Path) -> list[str]:
    x = np.array([["a", "b"]] * 60)
    return ["--set", f"data.dataset={_npz(d / 'd.npz', x=x, y=_good_y())}"]


def object_x(d: Path) -> list[str]:
    x = np.empty(60, dtype=object)
    x[:] = [[1.0, 2.0]] * 60
    return ["--set", f"data.dataset={_npz(d / 'd.npz', x=x, y=_good_y())}"]


def text_named_npz(d: Path) -> list[str]:
    (d / "d.npz").write_text("x,y\n1,2\n")
    return ["--set", f"data.dataset={d / 'd.npz'}"]


def garbage_parquet(d: Path) -> list[str]:
    (d / "d.parquet").write_bytes(b"not parquet at all")
    return ["--set", f"data.dataset={d / 'd.parquet'}"]


def string_feature_parquet(d: Path) -> list[str]:
    import pandas as pd

    df = pd.DataFrame(_good_x(), columns=list("abcd")).assign(name="x", y=_good_y())
    df.to_parquet(d / "d.parquet")
    return ["--set", f"data.dataset={d / 'd.parquet'}"]


def float_labels(d: Path) -> list[str]:
    y = _good_y().astype(float) + 0.5
    return ["--set", f"data.dataset={_npz(d / 'd.npz', x=_good_x(), y=y)}"]


def csv_without_features(d: Path) -> list[str]:
    (d / "d.csv").write_text("y\ncat\ndog\n")
    return ["--set", f"data.dataset={d / 'd.csv'}"]


def csv_without_label(d: Path) -> list[str]:
    (d / "d.csv").write_text("a,b\n1,2\n3,4\n")
    return ["--set", f"data.dataset={d / 'd.csv'}"]


def empty_folder(d: Path) -> list[str]:
    (d / "empty").mkdir()
    return ["--set", f"data.dataset={d / 'empty'}"]


def empty_class_folder(d: Path) -> list[str]:
    from PIL import Image

    for folder in ("cat", "dog"):
        (d / "imgs" / folder).mkdir(parents=True)
    Image.new("L", (4, 4)).save(d / "imgs" / "dog" / "1.png")
    return ["--set", f"data.dataset={d / 'imgs'}"]


def missing_path(d: Path) -> list[str]:
    return ["--set", f"data.dataset={d / 'nope.csv'}"]


def yaml_syntax(d: Path) -> list[str]:
    (d / "c.yaml").write_text("select:\n  threshold: [0.9\n")
    return ["--config", str(d / "c.yaml")]


def yaml_python_tag(d: Path) -> list[str]:
    (d / "c.yaml").write_text("select: !!python/object/apply:os.system ['echo hi']\n")
    return ["--config", str(d / "c.yaml")]


def out_is_a_file(d: Path) -> list[str]:
    (d / "f").write_text("")
    return ["--out", str(d / "f")]


def out_below_a_file(d: Path) -> list[str]:
    (d / "f").write_text("")
    return ["--out", str(d / "f" / "run")]


def out_read_only(d: Path) -> list[str]:
    if os.geteuid() == 0:  # root writes through chmod: take a filesystem nobody can write
        return ["--out", "/proc/raysl-ro/run"]
    (d / "ro").mkdir()
    (d / "ro").chmod(0o500)
    return ["--out", str(d / "ro" / "run")]


def linear_on_images(d: Path) -> list[str]:
    return ["--set", "train.hidden=0"]  # the default data: digits, 8x8 images


CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("x of strings", strings_x, r"x has dtype <U1; features must be numbers"),
    ("x of Python objects", object_x, r"array 'x' holds Python objects \(pickled\)"),
    ("a text file named .npz", text_named_npz, r"d\.npz': not a readable \.npz file"),
    ("garbage .parquet", garbage_parquet, r"d\.parquet': not a readable Parquet file"),
    ("string feature column", string_feature_parquet,
     r"feature columns must be numeric; 'name' is (large_)?string"),
    ("float labels", float_labels, r"non-integer numbers \(e\.g\. 0\.5\)"),
    ("CSV without a numeric feature column", csv_without_features,
     r"d\.csv': no numeric feature column besides the label 'y'; found \['y'\]"),
    ("CSV without the label column", csv_without_label,
     r"d\.csv': no label column 'y' \(set data\.label_column\); found \['a', 'b'\]"),
    ("empty folder", empty_folder, r"/empty': an empty folder"),
    ("empty class folder", empty_class_folder,
     r"imgs': class folder '.*/imgs/cat' holds no images"),
    ("path that doesn't exist", missing_path, r"nope\.csv': no such file or folder"),
    ("a linear classifier on images", linear_on_images,
     r"train\.hidden=0: a linear classifier takes vectors, and 'digits' holds images"),
    ("YAML syntax error", yaml_syntax, r"c\.yaml': not valid YAML at line \d+"),
    ("YAML python tag", yaml_python_tag, r"c\.yaml': not valid YAML .*python/object"),
    ("--out is a file", out_is_a_file, r"--out '.*/f': '.*/f' is a file, not a directory"),
    ("--out below a file", out_below_a_file, r"--out '.*/f/run': '.*/f' is a file"),
    ("--out read-only", out_read_only, r"--out '.*/run': not a writable directory"),
]


@pytest.mark.parametrize(("case", "make", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(case: str, make: Callable[[Path], list[str]],
                                         needle: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    import raysl.distributed.session as session

    monkeypatch.setattr(session, "ensure_ray", _no_ray)
    work = tmp_path / "in"
    work.mkdir()
    args = make(work)
    out_given = "--out" in args
    argv = ["run", *args] if out_given else ["run", "--out", str(tmp_path / "out"), *args]
    before = sorted(p.name for p in work.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("raysl: error: ")
    assert re.search(needle, err), err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in work.rglob("*")) == before  # nothing written anywhere


def _no_ray(*_: object, **__: object) -> bool:
    raise AssertionError("Ray was about to start")


@pytest.mark.ray  # a numeric .parquet is read through Ray Data (raysl.readers)
def test_a_saved_pandas_index_is_not_a_feature(tmp_path: Path, ray_session: None) -> None:
    import pandas as pd

    from raysl.config import DataConfig
    from raysl.data import load_dataset

    df = pd.DataFrame(_good_x(), columns=list("abcd"), index=np.arange(100, 160)).assign(
        y=_good_y())
    df.to_parquet(tmp_path / "d.parquet")  # pandas stores the index as a column
    ds = load_dataset(DataConfig(dataset=str(tmp_path / "d.parquet")))
    assert ds.x.shape == (60, 4)
    np.testing.assert_allclose(ds.x, df[list("abcd")].to_numpy(np.float32))
