"""User data through Ray Data (raysl.readers), on small real files: scikit-learn's digits as PNGs
in a class-folder tree (with an unlabeled/ folder) and in a manifest, wine as a CSV with the
cultivars' names and some empty labels, and as a folder of Parquet files. Bad input that only
decoding shows (mixed sizes, broken images) is here; what the listing and headers show is
checked before Ray starts (also rows of tests/test_bad_input.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raysl.config import DataConfig
from raysl.data import Dataset, load_dataset
from raysl.errors import DataError

NAMES = ["zero", "one", "two"]  # digits 0, 1, 2 in folders named so
CULTIVARS = np.array(["barolo", "grignolino", "barbera"], dtype=object)  # wine's 3 classes


def needs_ray(f: Callable[..., Any]) -> Callable[..., Any]:
    """The test reads through Ray Data: in the session's one Ray (tests/conftest.py)."""
    return pytest.mark.ray(pytest.mark.usefixtures("ray_session")(f))


def _u8(img: np.ndarray) -> np.ndarray:
    """A digits image (8x8, values 0..16) as the uint8 pixels its PNG holds."""
    return np.round(img * 255 / 16).astype(np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple]]:
    """ROOT/<name>/*.png: 8 labeled digits per class; ROOT/unlabeled/** 10 more, some in a
    subfolder; a README and a stray .txt that are not images. Returns the root and, per image
    path, (uint8 pixels (8, 8), label name or "")."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path_factory.mktemp("tree")
    want: dict[str, tuple] = {}
    for c, name in enumerate(NAMES):
        rows = np.where(d.target == c)[0]
        (root / name).mkdir()
        for i in rows[:8]:
            p = root / name / f"{i:04d}.png"
            Image.fromarray(_u8(d.images[i])).save(p)
            want[str(p)] = (_u8(d.images[i]), name)
        for j, i in enumerate(rows[8:11]):
            folder = root / "unlabeled" / ("batch" if j else "")
            folder.mkdir(parents=True, exist_ok=True)
            p = folder / f"{i:04d}.png"
            Image.fromarray(_u8(d.images[i])).save(p)
            want[str(p)] = (_u8(d.images[i]), "")
    (root / "README.txt").write_text("digits 0-2\n")
    (root / "one" / "notes.txt").write_text("not an image\n")
    return root, want


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """wine.csv: the 13 features and ``y`` = the cultivar's name, every 4th row empty; the
    same rows in parts/part-{0,1,2}.parquet (empty labels as nulls) with a _SUCCESS file."""
    from sklearn.datasets import load_wine

    w = load_wine(as_frame=True)
    df = w.data.copy()
    y = CULTIVARS[w.target.to_numpy()]
    y[::4] = ""
    df["y"] = y
    d = tmp_path_factory.mktemp("wine")
    df.to_csv(d / "wine.csv", index=False)
    (d / "parts").mkdir()
    for k, (a, b) in enumerate([(0, 50), (50, 120), (120, len(df))]):
        part = df.iloc[a:b].copy()
        part["y"] = part["y"].replace("", None)
        part.to_parquet(d / "parts" / f"part-{k}.parquet", index=False)
    (d / "parts" / "_SUCCESS").write_text("")
    return d, df


def _names(ds: Dataset) -> list[str]:
    """Each row's label as the user wrote it ("" for unlabeled)."""
    assert ds.classes is not None
    return ["" if c < 0 else str(ds.classes[c]) for c in ds.y]


# -- images --------------------------------------------------------------------------------


@needs_ray
def test_image_tree_rows_labels_and_pixels(tree: tuple[Path, dict[str, tuple]]) -> None:
    root, want = tree
    ds = load_dataset(DataConfig(dataset=str(root)))
    paths = sorted(want)  # row order: the images' sorted paths
    assert ds.x.shape == (len(paths), 1, 8, 8) and ds.x.dtype == np.float32
    assert list(ds.classes) == sorted(NAMES)
    assert _names(ds) == [want[p][1] for p in paths]
    assert (ds.y == -1).sum() == 9
    for k, p in enumerate(paths):
        np.testing.assert_array_equal(ds.x[k, 0], want[p][0] / np.float32(255.0))


@needs_ray
def test_folder_names_stay_strings_and_rgb_is_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = {}
    for folder in ("7", "12", "unlabeled"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            a = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)  # h=6, w=5, RGB
            Image.fromarray(a).save(tmp_path / folder / f"{i}.png")
            pixels[str(tmp_path / folder / f"{i}.png")] = a
    ds = load_dataset(DataConfig(dataset=str(tmp_path)))
    assert list(ds.classes) == ["12", "7"]  # the folder names, not numbers
    assert ds.x.shape == (6, 3, 6, 5)
    for k, p in enumerate(sorted(pixels)):
        np.testing.assert_array_equal(ds.x[k], pixels[p].transpose(2, 0, 1) / np.float32(255))
    small = load_dataset(DataConfig(dataset=str(tmp_path), image_size=4))
    assert small.x.shape == (6, 3, 4, 4)


@needs_ray
def test_manifest_rows_follow_the_manifest(tree: tuple[Path, dict[str, tuple]],
                                           tmp_path: Path) -> None:
    root, want = tree
    paths = sorted(want)[::-1][:12]  # any order; the manifest's is the rows'
    rel = [str(Path(p).relative_to(root)) for p in paths]
    rel[0] = paths[0]  # an absolute path too
    labels = [want[p][1] for p in paths]
    labels[1] = ""  # an empty label: unlabeled, whatever the folder
    (root / "lists").mkdir(exist_ok=True)
    manifest = root / "lists" / "m.csv"
    pd.DataFrame({"path": ["../" + r if not r.startswith("/") else r for r in rel],
                  "label": labels}).to_csv(manifest, index=False)
    ds = load_dataset(DataConfig(dataset=str(manifest)))
    assert _names(ds) == labels
    for k, p in enumerate(paths):
        np.testing.assert_array_equal(ds.x[k, 0], want[p][0] / np.float32(255.0))


@needs_ray
def test_mixed_image_sizes_name_two_files(tmp_path: Path) -> None:
    for folder, size in (("a", (8, 8)), ("b", (9, 7))):
        (tmp_path / folder).mkdir()
        Image.new("L", size).save(tmp_path / folder / "x.png")
    with pytest.raises(DataError, match=r"images of different sizes: .*/a/x\.png is 8x8 and "
                       r".*/b/x\.png is 7x9 \(height x width\); set data\.image_size"):
        load_dataset(DataConfig(dataset=str(tmp_path)))
    ds = load_dataset(DataConfig(dataset=str(tmp_path), image_size=8))
    assert ds.x.shape == (2, 1, 8, 8)


@needs_ray
@pytest.mark.parametrize("broken", ["garbage", "truncated"])
def test_an_image_that_fails_to_decode_is_named(broken: str, tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((16, 16), 200, np.uint8)).save(tmp_path / folder / "ok.png")
    good = (tmp_path / "a" / "ok.png").read_bytes()
    bad = b"not an image" if broken == "garbage" else good[: len(good) // 2]
    (tmp_path / "b" / "z.png").write_bytes(bad)
    with pytest.raises(DataError, match=r"/b/z\.png: not a readable image"):
        load_dataset(DataConfig(dataset=str(tmp_path)))


# -- tables --------------------------------------------------------------------------------


@needs_ray
def test_wine_csv_with_names_and_empty_labels(wine: tuple[Path, pd.DataFrame]) -> None:
    d, df = wine
    ds = load_dataset(DataConfig(dataset=str(d / "wine.csv")))
    np.testing.assert_array_equal(ds.x, df.drop(columns="y").to_numpy(np.float32))
    assert list(ds.classes) == sorted(CULTIVARS)
    assert _names(ds) == df["y"].tolist()
    assert (ds.y == -1).sum() == 45


@needs_ray
def test_csv_parquet_folder_and_glob_give_the_same_arrays(wine: tuple[Path, pd.DataFrame]
                                                          ) -> None:
    d, _ = wine
    read = [load_dataset(DataConfig(dataset=s)) for s in
            (str(d / "wine.csv"), str(d / "parts"), str(d / "parts" / "part-*.parquet"))]
    for other in read[1:]:
        np.testing.assert_array_equal(other.x, read[0].x)
        np.testing.assert_array_equal(other.y, read[0].y)
        np.testing.assert_array_equal(other.classes, read[0].classes)


@needs_ray
def test_the_object_store_split_fails_and_maps_labels_as_the_collected_one(
        tmp_path: Path) -> None:
    """The split made by the blocks' tasks (which send the driver label counts, not labels)
    gives what collecting gives: integer labels with gaps and nulls, NaN rows named by their
    position across files. (A class too small fails in raysl.data.class_allocation, which
    both paths call.)"""
    from raysl.data import make_split
    from raysl.readers import plan

    rng = np.random.default_rng(0)
    d = tmp_path / "parts"
    d.mkdir()
    y = np.array([3, 7, 7, 3, -1, 9] * 20, dtype=np.float64)
    y[::7] = np.nan  # nulls: unlabeled
    x = rng.standard_normal((len(y), 4))
    for k, (a, b) in enumerate([(0, 45), (45, 46), (46, len(y))]):
        pd.DataFrame({"a": x[a:b, 0], "b": x[a:b, 1], "y": y[a:b]}).to_parquet(
            d / f"part-{k}.parquet")
    cfg = DataConfig(dataset=str(d), labels_per_class=3, val_per_class=2, n_shards=3)
    p = plan(cfg)
    assert p is not None
    remote, mem = p.split(str(d), cfg), make_split(p.read(str(d)), cfg)
    assert remote.n_classes == mem.n_classes == 3
    for f in ("y_l", "y_val", "y_u", "y_test", "idx_l", "idx_u", "classes"):
        np.testing.assert_array_equal(getattr(remote, f), getattr(mem, f), err_msg=f)
    x[[44, 46, 100]] = np.nan  # rows 44 and 46: either side of the one-row file
    for k, (a, b) in enumerate([(0, 45), (45, 46), (46, len(y))]):
        pd.DataFrame({"a": x[a:b, 0], "b": x[a:b, 1], "y": y[a:b]}).to_parquet(
            d / f"part-{k}.parquet")
    for make in (lambda: p.split(str(d), cfg), lambda: load_dataset(cfg)):
        with pytest.raises(DataError, match=r"NaN/inf values in 3 rows \(first: \[44, 46, 100\]\)"):
            make()


@needs_ray
@pytest.mark.parametrize("which", ["images", "parquet"])
def test_a_split_left_in_the_object_store_has_the_collected_rows(
        which: str, tree: tuple[Path, dict[str, tuple]], wine: tuple[Path, pd.DataFrame],
        tmp_path: Path) -> None:
    """Issue 13, item 3: the pool and test set left in Ray's object store (what a run on Ray
    does with a user's files) hold the rows, shards and standardization of the split made
    from the collected data, bit for bit; only the labeled and validation rows are arrays."""
    import shutil

    from raysl.data import make_split, materialize, shard
    from raysl.distributed.pool import RemoteRows
    from raysl.preprocess import standardize_split
    from raysl.readers import plan

    spec = str(wine[0] / "parts")
    if which == "images":  # the tree as it was made (the manifest test adds a folder to it)
        spec = str(shutil.copytree(tree[0], tmp_path / "tree",
                                   ignore=shutil.ignore_patterns("lists")))
    cfg = DataConfig(dataset=spec, n_shards=2)
    p = plan(cfg)
    assert p is not None
    remote, mem = p.split(spec, cfg), make_split(p.read(spec), cfg)
    assert isinstance(remote.x_u, RemoteRows) and isinstance(remote.x_test, RemoteRows)
    for f in ("x_l", "y_l", "x_val", "y_val", "y_u", "y_test", "idx_l", "idx_u", "classes"):
        np.testing.assert_array_equal(getattr(remote, f), getattr(mem, f), err_msg=f)
    remote, mem = standardize_split(remote, 2), standardize_split(mem, 2)
    if which == "parquet":  # the same transform from the shards' moments
        assert remote.standardizer is not None and mem.standardizer is not None
        np.testing.assert_array_equal(remote.standardizer.scale, mem.standardizer.scale)
    np.testing.assert_array_equal(materialize(remote.x_test), mem.x_test)
    if which == "images":  # the store holds the pixels as read, made float where they're used
        import ray

        assert ray.get(remote.x_u.parts[0][0])["x"].dtype == np.uint8
    for a, b in zip(shard(remote.x_u, 2), shard(mem.x_u, 2), strict=True):
        np.testing.assert_array_equal(materialize(a), b)
    keep = np.arange(len(mem.x_u)) % 3 != 1  # a selection's mask
    np.testing.assert_array_equal(materialize(remote.x_u[keep]), mem.x_u[keep])
    # what the moments and prediction tasks read: the same rows, a block at a time, and the
    # same moments' bits as the in-memory rows taken in blocks of that size
    import raysl.preprocess as pre
    from raysl.preprocess import Moments

    for rows, want in ((remote.x_test, mem.x_test), (remote.x_u[keep], mem.x_u[keep])):
        got = list(rows.blocks(7))
        assert [len(b) for b in got[:-1]] == [7] * (len(got) - 1) and 0 < len(got[-1]) <= 7
        np.testing.assert_array_equal(np.concatenate(got), want)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pre, "MOMENT_ROWS", 7)
        for a, b in zip(shard(remote.x_u, 2), shard(mem.x_u, 2), strict=True):
            m_remote = Moments.of_blocks(a.blocks(7), int(np.prod(a.row_shape)))
            m_mem = Moments.of(b)
            np.testing.assert_array_equal(m_remote.mean, m_mem.mean)
            np.testing.assert_array_equal(m_remote.m2, m_mem.m2)
    # what a Ray Train rank reads of them: its share, through a Ray Dataset
    from raysl.data import rank_share
    from raysl.distributed.pool import share_from_batches

    for rows, want in ((remote.x_u, mem.x_u), (remote.x_u[keep], mem.x_u[keep])):
        for r, ds in enumerate(rows.rank_datasets(2)):
            share = rank_share(len(want), r, 2)
            for on_disk in (False, True):  # train.share_storage: the heap or a mapped file
                got = share_from_batches(ds.iter_batches(batch_size=None), len(share),
                                         rows.row_shape, on_disk=on_disk)["x"]
                np.testing.assert_array_equal(got, want[share])
    with pytest.raises(RuntimeError, match="read 0 of 3 rows"):  # a short read is an error
        share_from_batches(iter([]), 3, remote.x_u.row_shape)


def test_a_blocks_digest_is_of_its_rows_in_id_order_whatever_their_order() -> None:
    """The split's key hashes each block's rows in id order (a resumed run finds its caches):
    shuffled, strided or empty blocks give what hashing the id-ordered bytes gives."""
    import hashlib

    from raysl.distributed.pool import block_digest

    def reference(ids: np.ndarray, x: np.ndarray) -> str:
        o = np.argsort(ids, kind="stable")
        h = hashlib.sha256(np.ascontiguousarray(ids[o]).tobytes())
        h.update(np.ascontiguousarray(x[o]).tobytes())
        return h.hexdigest()

    rng = np.random.default_rng(0)
    ids = np.arange(40, dtype=np.int64) * 3 + (1 << 32)
    x = rng.integers(0, 256, (40, 6, 5)).astype(np.uint8)
    p = rng.permutation(40)
    for i, rows in ((ids, x), (ids[p], x[p]), (ids, x[:, :, ::2]), (ids[:0], x[:0])):
        assert block_digest(i, rows) == reference(i, rows)
    assert block_digest(ids[p], x[p]) == block_digest(ids, x)
    assert block_digest(ids, x[::-1]) != block_digest(ids, x)  # the rows are in it


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_parts_are_made_float_where_they_are_read_as_the_reader_makes_them(
        dtype: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts keep the reader's rows (uint8 pixels: a quarter of the store's bytes); assemble
    makes them float32 in blocks of rows, as the in-memory reader does (grey (h, w) images
    get their channel axis), whatever the keys' order or the rows kept."""
    import raysl.distributed.pool as pool

    monkeypatch.setattr(pool, "_FLOAT_ROWS", 3)  # several blocks, a ragged last one
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 256, (20, 4, 5)) if dtype == np.uint8
         else rng.random((20, 4, 5))).astype(dtype)
    keys = rng.permutation(20)
    parts = [{"key": keys[:7], "x": x[:7]}, {"key": keys[7:], "x": x[7:]}]
    want = pool._as_float(x)[np.argsort(keys)]  # (20, 1, 4, 5) in key order
    np.testing.assert_array_equal(pool.assemble(parts, (1, 4, 5)), want)
    keep = np.array([0, 5, 6, 19])
    np.testing.assert_array_equal(pool.assemble(parts, (1, 4, 5), keep), want[keep])


@needs_ray
def test_a_gmm_fit_on_shards_in_the_object_store_equals_the_in_memory_fit(
        wine: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    """The shard actors fetch their own rows, here into file-backed arrays
    (``backend.shard_storage=disk``), and fit the same GMM as on the collected split.

    Then the joint job: the kept rows' labels and confidences stay in the object store and
    the rank reads them with its rows; the model is bit for bit the one trained from the same
    labels gathered on the driver (and FixMatch's online labels, measured against the pool's
    hidden labels read with the rows, score the same)."""
    import ray

    from raysl import pipeline
    from raysl.columns import PoolColumns, PoolSelection, merged
    from raysl.config import Config, apply_overrides
    from raysl.data import make_split
    from raysl.readers import plan

    spec = str(wine[0] / "parts")
    cfg = apply_overrides(Config(), {"data.dataset": spec, "backend.name": "gmm",
                                     "backend.gmm.max_iter": 5,
                                     "backend.shard_storage": "disk",
                                     # benchmark mode: the pool's rows keep hidden labels
                                     "data.labels_per_class": 5,
                                     "select.criterion": "per_class", "train.epochs": 2,
                                     # Ray Train's local mode: one rank reading its dataset,
                                     # without DDP's start-up (tests/test_ray.py has the
                                     # shares of 2 and 3 ranks)
                                     "train.min_steps": 0, "train.num_workers": 0})
    p = plan(cfg.data)
    assert p is not None
    splits = [pipeline.prepare(s, cfg) for s in (p.split(spec, cfg.data),
                                                 make_split(p.read(spec), cfg.data))]
    # on Ray actors, and (the in-memory split) in this process, as Ray and local fits are
    # equal (tests/test_ray.py)
    fits = [pipeline.pseudo_label(s, cfg, tmp_path / str(i), {}, use_ray=i == 0)
            for i, s in enumerate(splits)]
    # on Ray, the labels stay in the object store; gathered here for the comparison
    assert fits[0]["pool"].remote and not fits[1]["pool"].remote
    (labels0, conf0), (labels1, conf1) = (f["pool"].gather("label", "conf") for f in fits)
    np.testing.assert_array_equal(labels0, labels1)
    np.testing.assert_allclose(conf0, conf1, rtol=0, atol=1e-6)
    assert fits[0]["rounds"] == fits[1]["rounds"]
    actors = fits[0]["actors"]
    assert [a["on_disk"] for a in actors] == [True, True], actors
    assert sum(a["rows"] for a in actors) == len(splits[1].x_u)
    assert fits[1]["actors"] == []  # in this process: no actors

    sel, m = pipeline.selection(splits[0], cfg, fits[0])
    assert sel.pool.remote and 0 < m["n_selected"] < len(splits[0].x_u)
    here = PoolColumns(tuple((merged([ray.get(o) for o in part]),) for part in sel.pool.parts),
                       sel.pool.sizes)
    gathered = PoolSelection(here, sel.rule, sel.aligned)
    runs = [pipeline.joint(splits[0], cfg, tmp_path / name, s, verbose=False)
            for name, s in (("remote", sel), ("gathered", gathered))]
    assert [r["rank_rows"][0]["with_rows"] for r in runs] == [["w_p", "y_p", "y_u"], []]
    accs = [r["history"][-1]["pl_accuracy"] for r in runs]
    assert np.isfinite(accs[0]) and accs[0] == accs[1]
    assert [sum(r["x_p"] for r in run["rank_rows"]) for run in runs] == [m["n_selected"]] * 2
    a, b = (pipeline.load_state(tmp_path / name / "joint" / "model.pt")
            for name in ("remote", "gathered"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@needs_ray
def test_ids_are_stable_and_in_source_order(wine: tuple[Path, pd.DataFrame]) -> None:
    """The Ray Dataset the later streaming step keeps: id = file rank × 2^32 + row in file."""
    from raysl.readers import plan

    d, _ = wine
    p = plan(DataConfig(dataset=str(d / "parts")))
    assert p is not None
    ids = [sorted(r["id"] for r in p.dataset().select_columns(["id"]).take_all())
           for _ in range(2)]
    want = [k * 2**32 + r for k, n in enumerate([50, 70, 58]) for r in range(n)]
    assert ids[0] == ids[1] == want


@needs_ray
def test_label_and_feature_columns(wine: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    _, df = wine
    frame = df.rename(columns={"y": "cultivar"}).assign(note="tasted", code=0)
    frame["code"] = [("" if i % 5 == 0 else str(i % 3)) for i in range(len(frame))]
    frame.to_csv(tmp_path / "w.csv", index=False)
    ds = load_dataset(DataConfig(dataset=str(tmp_path / "w.csv"), label_column="cultivar",
                                 feature_columns=("ash", "alcohol")))
    np.testing.assert_array_equal(ds.x, df[["ash", "alcohol"]].to_numpy(np.float32))
    assert _names(ds) == df["y"].tolist()
    # integer labels in a CSV, some empty: numbers 0..2, so no class mapping is needed
    ints = load_dataset(DataConfig(dataset=str(tmp_path / "w.csv"), label_column="code",
                                   feature_columns=("ash",)))
    assert ints.classes is None and ints.n_classes == 3
    assert ints.y.tolist() == [-1 if i % 5 == 0 else i % 3 for i in range(len(frame))]


# -- bad input seen before Ray starts --------------------------------------------------------


def _first_image_broken(d: Path) -> str:
    (d / "a").mkdir()
    (d / "a" / "0.png").write_bytes(b"garbage")
    return str(d)


def _no_class_folders(d: Path) -> str:
    (d / "unlabeled").mkdir()
    Image.new("L", (4, 4)).save(d / "unlabeled" / "0.png")
    return str(d)


def _unknown_feature(d: Path) -> str:
    (d / "t.csv").write_text("a,y\n1,cat\n")
    return str(d / "t.csv")


def _string_feature(d: Path) -> str:
    (d / "t.csv").write_text("a,name,y\n1,x,cat\n")
    return str(d / "t.csv")


def _manifest_missing_image(d: Path) -> str:
    (d / "m.csv").write_text("path,label\nnope.png,cat\n")
    return str(d / "m.csv")


def _manifest_twice(d: Path) -> str:
    Image.new("L", (4, 4)).save(d / "0.png")
    (d / "m.csv").write_text("path,label\n0.png,cat\n./0.png,dog\n")
    return str(d / "m.csv")


def _npz_folder(d: Path) -> str:
    np.savez(d / "a.npz", x=np.zeros((2, 2)), y=np.zeros(2))
    return str(d)


def _glob_matches_nothing(d: Path) -> str:
    return str(d / "*.parquet")


BEFORE_RAY = [
    (_first_image_broken, DataConfig(), r"/a/0\.png: not a readable image"),
    (_no_class_folders, DataConfig(), r"no class folders: expected ROOT/<class>/"),
    (_unknown_feature, DataConfig(feature_columns=("b",)),
     r"t\.csv': data\.feature_columns \['b'\] not found; found \['a', 'y'\]"),
    (_string_feature, DataConfig(),
     r"feature columns must be numeric; 'name' is string \(choose the features with "
     r"data\.feature_columns\), or for text data: no text column 'text'"),
    (_manifest_missing_image, DataConfig(), r"1 listed images don't exist \(first: 'nope\.png'"),
    (_manifest_twice, DataConfig(), r"'\./0\.png' is listed twice \(rows 0 and 1\)"),
    (_npz_folder, DataConfig(), r"expected \.parquet files or \.csv files, found 1 other"),
    (_glob_matches_nothing, DataConfig(), r"the pattern matches no file"),
]


@pytest.mark.parametrize(("make", "cfg", "needle"), BEFORE_RAY,
                         ids=[m.__name__.strip("_") for m, _, _ in BEFORE_RAY])
def test_bad_input_fails_before_ray_starts(make: Callable[[Path], str], cfg: DataConfig,
                                           needle: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    import raysl.distributed.session as session

    def no_ray(*_: object) -> bool:
        raise AssertionError("Ray was about to start")

    monkeypatch.setattr(session, "ensure_ray", no_ray)
    with pytest.raises(DataError, match=needle):
        load_dataset(replace(cfg, dataset=make(tmp_path)))


# -- one Ray session per run ---------------------------------------------------------------


def test_a_run_starts_its_ray_at_ray_address_before_the_read(
        wine: tuple[Path, pd.DataFrame], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``raysl run`` on a user's file joins ``ray.address`` (cfg.ray) before the read, once the
    reader's plan has passed; named datasets, ``.npz`` files and ``ray.enabled=false`` start
    nothing here, and bad input fails before Ray."""
    import raysl.distributed.session as session
    from raysl import pipeline
    from raysl.config import Config, apply_overrides

    started: list[str] = []

    def ensure(cfg: Any) -> bool:
        started.append(cfg.address)
        return True

    monkeypatch.setattr(session, "ensure_ray", ensure)
    csv = str(wine[0] / "wine.csv")
    joined = apply_overrides(Config(), {"data.dataset": csv, "ray.address": "10.0.0.5:6379"})
    assert pipeline.start_ray_for_data(joined) and started == ["10.0.0.5:6379"]
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)), y=np.zeros(4))
    for overrides in ({"data.dataset": "digits"}, {"data.dataset": str(tmp_path / "d.npz")},
                      {"data.dataset": csv, "ray.enabled": False}):
        assert not pipeline.start_ray_for_data(apply_overrides(Config(), overrides))
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no label column 'y'"):
        pipeline.start_ray_for_data(apply_overrides(Config(), {
            "data.dataset": str(tmp_path / "t.csv")}))
    assert started == ["10.0.0.5:6379"]


def test_a_run_stops_the_ray_it_started_when_the_data_fails(
        wine: tuple[Path, pd.DataFrame], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from raysl import pipeline
    from raysl.config import Config, apply_overrides

    stopped: list[bool] = []
    monkeypatch.setattr(pipeline, "start_ray_for_data", lambda cfg: True)
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append(True))

    def bad(cfg: Any, dataset: Any = None) -> Any:
        raise DataError("found in the read")

    monkeypatch.setattr(pipeline, "check", bad)
    cfg = apply_overrides(Config(), {"data.dataset": str(wine[0] / "wine.csv")})
    with pytest.raises(DataError, match="found in the read"):
        pipeline.run(cfg, tmp_path / "out")
    assert stopped == [True] and not (tmp_path / "out").exists()


@pytest.mark.ray
@pytest.mark.parametrize("entry", ["cli", "api"])
def test_a_user_file_run_starts_one_ray_session(entry: str, wine: tuple[Path, pd.DataFrame],
                                                tmp_path: Path) -> None:
    """``raysl pseudo-label`` (or ``raysl.run``) on a CSV, in a fresh process: the read runs in
    the run's own Ray (one ``ray.init``), not in one started and stopped for it. About 30 s."""
    import os
    import subprocess
    import sys

    code = ("import sys, ray\n"
            "calls = []\n"
            "real = ray.init\n"
            "def init(*a, **k):\n"
            "    calls.append(k.get('address'))\n"
            "    return real(*a, **k)\n"
            "ray.init = init\n"
            + ("from raysl.cli import main\n"
               "rc = main(sys.argv[1:])\n" if entry == "cli" else
               "import raysl\n"
               "a = sys.argv[1:]\n"
               "kw = {k.replace('.', '__'): v for k, v in (x.split('=', 1) for x in a[4::2])}\n"
               "raysl.run(out=a[2], **kw)\n"
               "rc = 0\n")
            +
            "print('RAY_INIT', len(calls))\n"
            "sys.exit(rc)\n")
    args = ["pseudo-label", "--out", str(tmp_path / "out")] + [
        a for kv in (f"data.dataset={wine[0] / 'wine.csv'}", "backend.name=gmm",
                     "backend.gmm.max_iter=3", "train.epochs=1", "train.min_steps=5",
                     "train.num_workers=0", "ray.num_cpus=2") for a in ("--set", kv)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RAY_INIT 1" in r.stdout.splitlines()[-1], r.stdout[-2000:]
    assert list((tmp_path / "out" / "pseudo_labels.parquet").glob("part-*.parquet"))
    if entry == "api":  # the whole pipeline ran
        assert (tmp_path / "out" / "model.pt").is_file()


@needs_ray
def test_a_wide_parquet_file_is_read_in_batches_of_bounded_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Parquet file is read a batch of about ``BLOCK_BYTES`` (as float32) at a time, at
    least 1,024 rows, not pyarrow's 65,536 rows whatever their width; the batches hold the
    file's rows in order and number them as one read would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import raysl.readers.datasource as dsrc
    from raysl.readers.files import find
    from raysl.readers.rows import ROW_ID

    wide = pa.table({f"c{i}": np.arange(3000.0) + i for i in range(400)})  # 3,000 x 400
    pq.write_table(wide, tmp_path / "wide.parquet")
    src = find(str(tmp_path / "wide.parquet"))
    files = dsrc.NumberedFiles(list(src.files), src.fs, "parquet", wide.column_names)

    def batches(block_bytes: int) -> list[pa.Table]:
        monkeypatch.setattr(dsrc, "BLOCK_BYTES", block_bytes)
        with src.fs.open_input_file(src.files[0]) as f:
            return list(files._read_stream(f, src.files[0]))

    assert [t.num_rows for t in batches(4 * 400 * 1500)] == [1500, 1500]  # 1,500 rows' bytes
    assert [t.num_rows for t in batches(4 * 400 * 10)] == [1024, 1024, 952]  # the floor
    assert [t.num_rows for t in batches(64 << 20)] == [3000]  # the default: 41,943 rows
    got = batches(4 * 400 * 1500)
    np.testing.assert_array_equal(np.concatenate([t.column(ROW_ID).to_numpy() for t in got]),
                                  np.arange(3000))  # the first file: ids 0 * 2^32 + row
    np.testing.assert_array_equal(
        np.concatenate([t.column("c7").to_numpy() for t in got]), wide.column("c7").to_numpy())


def test_read_tasks_one_per_file_but_small_files_grouped() -> None:
    """How many Ray Data read tasks the tabular reader asks for (then fused with its map): one
    per large file, small files grouped to 16 MB a task, never fewer than two per CPU while
    there are files for them, never more than the files."""
    from raysl.readers.tabular import READ_TASK_BYTES, read_tasks

    assert read_tasks(10, 10 * 55e6, 2) == 10  # bench scale's 700,000 rows: a task per file
    assert read_tasks(600, 600 * 10e3, 2) == 4  # 6 MB in 600 files: two tasks per CPU
    assert read_tasks(600, 600 * 10e3, 64) == 128
    assert READ_TASK_BYTES == 16 << 20
    assert read_tasks(10_000, 10_000 * 1e6, 2) == 597  # 10 GB in 1 MB files: 16 MiB a task
    assert read_tasks(3, None, 2) == 3  # size unknown: a task per file
    assert read_tasks(1, 0, 8) == 1

