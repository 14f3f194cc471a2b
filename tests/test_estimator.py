"""PseudoLabelClassifier: scikit-learn's own estimator checks, labels of any kind, unlabeled
rows used, and the estimator inside Pipeline and GridSearchCV."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits, load_wine, make_blobs
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from raysl import PseudoLabelClassifier


def _small(**kw: Any) -> PseudoLabelClassifier:
    """A short training budget: the checks fit dozens of times."""
    return PseudoLabelClassifier(**{"epochs": 2, "min_steps": 40, "hidden": 16, **kw})


# Every check scikit-learn runs on a classifier, except those listed here with the reason.
EXPECTED_FAILED_CHECKS = {
    "check_classifiers_classes": (
        "its last case uses the labels [-1, 1], but -1 marks an unlabeled row (scikit-learn's "
        "semi-supervised convention; sklearn exempts its own semi-supervised classifiers from "
        "the string labels by name instead). The string and object labels it also checks are "
        "tested in test_any_hashable_labels_come_back_as_given."),
}


@parametrize_with_checks([_small()], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_scikit_learn_estimator_checks(estimator: PseudoLabelClassifier, check: Any) -> None:
    check(estimator)


# (float labels are a regression target to scikit-learn, and object arrays of numbers are
# "unknown": check_classification_targets refuses both, as for every scikit-learn classifier)
@pytest.mark.parametrize(("labels", "as_object"), [
    (["one", "two", "three"], False), (["one", "two", "three"], True), ([10, 20, 30], False),
    ([-5, 0, 7], False)])
def test_any_hashable_labels_come_back_as_given(labels: list[Any], as_object: bool) -> None:
    x, y = make_blobs(n_samples=60, centers=3, cluster_std=0.3, random_state=0)
    names = np.take(np.array(labels, dtype=object if as_object else None), y)
    clf = _small().fit(x, names)
    assert set(clf.classes_) == set(labels)
    assert clf.predict_proba(x).shape == (60, 3)
    pred = clf.predict(x)
    assert set(pred) <= set(labels)
    assert (pred == names).mean() > 0.9


def _digits_few_labels(n_per_class: int = 10, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    test = rng.random(len(y)) < 0.25
    x_tr, y_tr = x[~test], y[~test].copy()
    keep = np.concatenate([rng.choice(np.where(y_tr == c)[0], n_per_class, replace=False)
                           for c in range(10)])
    partial = np.full(len(y_tr), -1)
    partial[keep] = y_tr[keep]
    return x_tr, partial, x[test], y[test]


def test_unlabeled_rows_become_training_signal_and_do_no_harm() -> None:
    x, y, x_test, y_test = _digits_few_labels()
    clf = PseudoLabelClassifier(epochs=5, min_steps=300, random_state=0).fit(x, y)
    m = clf.metrics_
    assert m["data"]["n_unlabeled"] == (y == -1).sum()
    # the guard let some pseudo-labels through, and the final model is no worse on validation
    assert m["pseudo_labels"]["n_selected"] > 0
    assert m["final"]["val_accuracy"] >= m["baseline"]["val_accuracy"]
    supervised = PseudoLabelClassifier(epochs=5, min_steps=300, random_state=0)
    supervised.fit(x[y >= 0], y[y >= 0])  # the same labels, no pool
    assert supervised.metrics_["final"]["model"] == "baseline"
    assert clf.score(x_test, y_test) >= supervised.score(x_test, y_test) - 0.02


def test_works_in_a_pipeline_and_grid_search() -> None:
    x, y = load_wine(return_X_y=True)
    pipe = Pipeline([("scale", StandardScaler()),
                     ("clf", _small(min_steps=100, backend="self"))])
    grid = GridSearchCV(pipe, {"clf__threshold": [0.8, 0.95]}, cv=2).fit(x, y)
    assert grid.best_params_["clf__threshold"] in (0.8, 0.95)
    assert grid.best_score_ > 0.8
    assert grid.score(x, y) > 0.8


def test_bad_parameters_raise_before_training() -> None:
    x, y = make_blobs(n_samples=30, centers=2, random_state=0)
    with pytest.raises(ValueError, match=r"backend\.name='nope'"):
        _small(backend="nope").fit(x, y)
    with pytest.raises(ValueError, match="validation_fraction"):
        _small(validation_fraction=1.5).fit(x, y)
    with pytest.raises(ValueError, match=r"select\.threshold"):
        _small(threshold=2.0).fit(x, y)


@pytest.mark.ray
def test_use_ray_runs_the_same_pipeline_on_ray(ray_session: None) -> None:
    import ray

    x, y, x_test, y_test = _digits_few_labels()
    # Ray Train's local mode (num_workers=0): the actors and Train API without DDP start-up
    clf = _small(use_ray=True, min_steps=100, backend="gmm",
                 config={"train.num_workers": 0}).fit(x, y)
    assert ray.is_initialized()  # the session fixture's Ray, not stopped by fit
    local = _small(min_steps=100, backend="gmm").fit(x, y)
    # the backend's pseudo-labels are the same on shard actors as in this process
    assert clf.metrics_["pseudo_labels"]["n_selected"] == local.metrics_["pseudo_labels"][
        "n_selected"]
    # and the same training loop: the same accuracy up to float noise (a 2-epoch model, 20
    # labels: the figure itself is not the point)
    on_ray, here = clf.score(x_test, y_test), local.score(x_test, y_test)
    assert abs(on_ray - here) <= 0.01 and on_ray > 0.7, (on_ray, here)
