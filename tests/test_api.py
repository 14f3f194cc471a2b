"""The Python front door: raysl.run / Result / load_model / make_config, the README's
example, and an import without side effects."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import raysl
from raysl.config import Config

ROOT = Path(__file__).resolve().parents[1]
FAST = {"ray__enabled": False, "train__epochs": 2, "train__min_steps": 60,
        "backend__gmm__max_iter": 5}


def test_import_has_no_side_effects_and_is_cheap() -> None:
    code = (
        "import os, sys, logging\n"
        "import raysl\n"
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'heavy import'\n"
        # Ray, torch and scikit-learn set variables of their own at import (RAY_CLIENT_MODE,
        # KMP_*, TORCHINDUCTOR_CACHE_DIR): import them first, then hold raysl to nothing more
        "import ray, ray.train, ray.train.torch, ray.tune, torch, sklearn.base, pandas\n"
        "import matplotlib\n"
        "before = dict(os.environ)\n"
        "import raysl.api, raysl.pipeline, raysl.estimator, raysl.distributed.session\n"
        "import raysl.distributed.trainer, raysl.distributed.actors, raysl.tuning\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
        "assert logging.getLogger('raysl').handlers == [], 'a library installs no handler'\n"
        "import matplotlib\n"
        "assert matplotlib.get_backend() == matplotlib.rcParams['backend']\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RAY_")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_public_api_is_what_all_names() -> None:
    for name in raysl.__all__:
        assert getattr(raysl, name) is not None, name
    assert {"run", "tune", "load_model", "Result", "PseudoLabelClassifier"} <= set(raysl.__all__)
    with pytest.raises(AttributeError):
        _ = raysl.pipeline_run  # type: ignore[attr-defined]


def test_config_as_object_dict_yaml_or_overrides_is_the_same(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"select": {"threshold": 0.9}, "train.epochs": 3}))
    want = raysl.make_config(Config(), select__threshold=0.9, train__epochs=3)
    assert raysl.make_config({"select.threshold": 0.9, "train.epochs": 3}) == want
    assert raysl.make_config({"select": {"threshold": 0.9}, "train": {"epochs": 3}}) == want
    assert raysl.make_config(p) == want
    assert raysl.make_config(str(p)) == want
    with pytest.raises(raysl.ConfigError, match=r"select\.nope"):
        raysl.make_config(select__nope=1)
    with pytest.raises(raysl.ConfigError, match="expected a Config"):
        raysl.make_config(42)  # type: ignore[arg-type]


def test_run_on_arrays_with_string_labels(tmp_path: Path) -> None:
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    names = np.array(["barolo", "grignolino", "barbera"], dtype=object)[y]
    names[np.random.default_rng(0).random(len(y)) < 0.5] = None  # unlabeled
    r = raysl.run(data=(x, names), out=tmp_path / "out", **FAST)
    assert r.out == tmp_path / "out" and (r.out / "metrics.json").is_file()
    assert list(r.classes) == ["barbera", "barolo", "grignolino"]
    pl = r.pseudo_labels
    assert len(pl) == r.metrics["data"]["n_unlabeled"]
    assert set(pl["label"]) <= set(r.classes)
    pred = r.predict(x)
    assert set(pred) <= set(r.classes)
    labeled = names != None  # noqa: E711  (elementwise)
    assert (pred[labeled] == names[labeled]).mean() > 0.8
    # the model file holds the same model
    again = raysl.load_model(r.out / "model.pt")
    np.testing.assert_allclose(r.predict_proba(x[:7]),
                               __import__("raysl.train").train.predict_proba(
                                   again, x[:7].astype(np.float32)), atol=1e-6)


def test_run_on_a_dataframe_and_a_bad_one(tmp_path: Path) -> None:
    import pandas as pd
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    df = pd.DataFrame(x, columns=["a", "b", "c", "d"]).assign(y=y)
    r = raysl.run(data=df, out=tmp_path / "df", **FAST, data__labels_per_class=3)
    assert r.metrics["data"]["n_labeled"] == 9
    with pytest.raises(raysl.DataError, match="no label column 'y'"):
        raysl.run(data=df.drop(columns="y"), out=tmp_path / "x", **FAST)
    with pytest.raises(raysl.DataError, match=r"\['name'\]"):
        raysl.run(data=df.assign(name="x"), out=tmp_path / "x", **FAST)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's From Python section holds one example"
    return blocks[0]


def test_readme_from_python_example_runs(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # its outputs go to runs/ under here
    code = _readme_example()
    scope: dict[str, object] = {}
    exec(compile(code, "README.md:From Python", "exec"), scope)
    result, clf = scope["result"], scope["clf"]
    assert (tmp_path / "runs/from-python/model.pt").is_file()
    assert result.metrics["final"]["model"] in ("joint", "baseline")  # type: ignore[attr-defined]
    assert "zero" in list(clf.classes_)  # type: ignore[attr-defined]


def test_readme_layout_matches_the_tree() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed = {line.split()[0] for line in block.splitlines() if line and not line[0].isspace()}
    for entry in listed:
        assert (ROOT / entry).exists(), f"README Layout lists {entry}, which does not exist"
    pkg = ROOT / "raysl"
    actual = {f"raysl/{p.name}" for p in pkg.glob("*.py") if p.name != "__init__.py"}
    actual |= {f"raysl/{p.name}/" for p in pkg.iterdir()
               if p.is_dir() and (p / "__init__.py").is_file()}
    missing = actual - {e.rstrip("/") + ("/" if (ROOT / e).is_dir() else "") for e in listed}
    assert not missing, f"README Layout misses {sorted(missing)}"


def test_all_and_the_lazy_exports_agree() -> None:
    assert set(raysl.__all__) == {*raysl._EXPORTS, "__version__"}


@pytest.mark.parametrize("per_class", [1, 2])
def test_one_or_two_labels_per_class_run_and_say_what_was_measured(
        per_class: int, tmp_path: Path) -> None:
    from sklearn.datasets import load_wine

    from raysl.pipeline import summary

    x, y = load_wine(return_X_y=True)
    rng = np.random.default_rng(0)
    partial = np.full(len(y), -1)
    for c in range(3):
        partial[rng.choice(np.where(y == c)[0], per_class, replace=False)] = c
    r = raysl.run(data=(x, partial), out=tmp_path, **FAST)
    d = r.metrics["data"]
    assert (d["n_labeled"], d["n_val"], d["n_test"], d["n_hidden_labels"]) == (
        3 * per_class, 0, 0, 0)
    assert (r.predict(x) == y).mean() > 0.5  # the unlabeled rows helped a 3-6 label model
    text = summary(r.metrics, tmp_path)
    assert "precision" not in text and "argmax accuracy" not in text  # no hidden labels
    assert "no test rows were held out" in text
    assert "no validation rows to compare on" in r.metrics["final"]["reason"]


def test_summary_says_on_how_many_rows_each_figure_stands(tmp_path: Path) -> None:
    from raysl.pipeline import summary

    r = raysl.run(data="digits", out=tmp_path, **FAST)
    text = summary(r.metrics, tmp_path)
    d = r.metrics["data"]
    assert f"({d['n_test']} rows)" in text and f"({d['n_val']} rows)" in text
    assert f"({d['n_hidden_labels']} hidden labels)" in text
