"""``raysl tune``: the space parser and the report without Ray; then real (tiny) searches on the
session's Ray: backend fits are shared, the best config replays, a killed search resumes."""

from __future__ import annotations

import csv
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raysl import pipeline
from raysl.backends import BACKENDS
from raysl.cli import main
from raysl.config import Config, apply_overrides, dump_yaml, load_config
from raysl.errors import ConfigError
from raysl.tuning import (
    ReportInputs,
    TrialRecord,
    best,
    default_space,
    load_space,
    parse_space,
    prefit_overrides,
    rank,
    write_report,
)

# -- the space file (no Ray) ----------------------------------------------------------------

EXAMPLE = {
    "search": "random",
    "num_samples": 3,
    "asha": {"grace_period": 2},
    "max_concurrent_trials": 2,
    "space": {
        "select.threshold": {"grid": [0.8, 0.9, 0.95]},
        "backend.name": {"grid": ["gmm", "self"]},
        "train.lambda_u": {"uniform": [0.5, 2.0]},
        "train.lr": {"loguniform": ["1e-3", 0.1]},
        "train.hidden": {"randint": [16, 65]},
        "backend.gmm.pca_dim": {"choice": [8, 16]},
        "train.epochs": 3,
    },
}


def test_space_file_parses_to_typed_params() -> None:
    spec = parse_space(EXAMPLE, Config(), tuple(BACKENDS))
    p = {x.key: x for x in spec.params}
    assert spec.search == "random" and spec.num_samples == 3 and spec.asha == {"grace_period": 2}
    assert p["select.threshold"].kind == "grid"
    assert p["select.threshold"].values == (0.8, 0.9, 0.95)
    assert p["train.lambda_u"].values == (0.5, 2.0)
    assert p["train.lr"].values == (1e-3, 0.1)  # YAML's '1e-3' string read as a float
    assert p["train.hidden"].values == (16, 65)
    assert p["train.epochs"].kind == "fixed" and p["train.epochs"].values == (3,)
    assert spec.n_grid == 6


def test_default_space_uses_the_backend_registry() -> None:
    spec = load_space(None, Config(), tuple(BACKENDS))
    p = {x.key: x for x in spec.params}
    assert p["backend.name"].values == tuple(BACKENDS)  # vae/gan appear once registered
    assert spec.search == "grid" and spec.metric == "val_accuracy"
    assert default_space(["a"])["space"]["backend.name"] == {"grid": ["a"]}


def test_space_given_as_a_dict_or_its_shorthand() -> None:
    as_file = load_space(JOB_CONFIGS / "tune-space-grid.yaml", Config(), tuple(BACKENDS))
    as_dict = load_space(yaml.safe_load((JOB_CONFIGS / "tune-space-grid.yaml").read_text()),
                         Config(), tuple(BACKENDS))
    assert as_dict == as_file
    # config keys alone are the space of a grid search; a bare list is a grid
    short = load_space({"select.threshold": [0.8, 0.9], "train.epochs": 3}, Config())
    full = load_space({"space": {"select.threshold": {"grid": [0.8, 0.9]}, "train.epochs": 3}},
                      Config())
    assert short.params == full.params and short.search == "grid" and short.n_grid == 2
    with pytest.raises(ConfigError, match="config keys go under 'space:'"):
        load_space({"search": "grid", "select.threshold": [0.8]}, Config())


@pytest.mark.parametrize(("space", "needle"), [
    ({"select.treshold": {"grid": [0.9]}}, "unknown config key 'select.treshold'; valid keys:"),
    ({"select.threshold": {"grid": [0.9, 1.5]}}, "select.threshold=1.5: must be in [0.0, 1.0]"),
    ({"backend.name": {"grid": ["gmm", "magic"]}}, "backend.name='magic': unknown backend"),
    ({"train.lambda_u": {"uniform": [2.0, 0.5]}}, "train.lambda_u: uniform needs low < high"),
    ({"train.lambda_u": {"uniform": [-1.0, 0.5]}}, "train.lambda_u=-1.0: must be in [0.0, inf]"),
    ({"train.lr": {"loguniform": [0, 0.1]}}, "train.lr: loguniform needs low > 0"),
    ({"train.hidden": {"uniform": [8, 64]}}, "train.hidden: uniform needs a float key"),
    ({"train.epochs": {"randint": [0, 3]}}, "train.epochs=0: must be in [1, inf]"),
    ({"train.lambda_u": {"normal": [0, 1]}}, "train.lambda_u: expected one of {grid, choice"),
    ({"select.threshold": {"grid": []}}, "select.threshold: grid needs a non-empty list"),
    ({"select.threshold": {"grid": [0.9, 0.9]}}, "select.threshold: grid lists a value twice"),
    ({"data": {"grid": [1]}}, "data is a section"),
])
def test_bad_space_names_the_key(space: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_space({"space": space}, Config(), tuple(BACKENDS))
    assert needle in str(e.value)


@pytest.mark.parametrize(("raw", "needle"), [
    ({"metric": "test_accuracy"}, "never on test"),
    ({"search": "bayes"}, "search='bayes': must be one of grid, random, optuna"),
    ({"num_samples": 0}, "num_samples=0"),
    ({"asha": {"grace": 1}}, "asha: unknown key(s) grace"),
    ({"spaces": {}}, "unknown top-level key(s) spaces"),
])
def test_bad_search_settings_are_refused(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_space({"space": {"select.threshold": 0.9}, **raw}, Config(), tuple(BACKENDS))
    assert needle in str(e.value)


JOB_CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


@pytest.mark.parametrize("path", sorted(JOB_CONFIGS.glob("tune-space-*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_space_files_parse(path: Path) -> None:
    spec = load_space(path, load_config(JOB_CONFIGS / "tune-digits.yaml"), tuple(BACKENDS))
    assert spec.metric == "val_accuracy" and spec.params


def test_prefit_lists_each_upstream_setting_once() -> None:
    spec = parse_space(EXAMPLE, Config(), tuple(BACKENDS))
    pre = prefit_overrides(spec, Config())
    # thresholds never need a fit; ranges can't be listed; grid × choice × fixed can; a
    # backend.gmm value changes no `self` fit, so self is listed once
    assert pre == [{"backend.name": "gmm", "backend.gmm.pca_dim": 8, "train.epochs": 3},
                   {"backend.name": "gmm", "backend.gmm.pca_dim": 16, "train.epochs": 3},
                   {"backend.name": "self", "backend.gmm.pca_dim": 8, "train.epochs": 3}]
    only_thresholds = parse_space({"space": {"select.threshold": {"grid": [0.5, 0.9]}}},
                                  Config())
    assert prefit_overrides(only_thresholds, Config()) == [{}]


def _prefit(space: dict, base: Config | None = None) -> list[dict]:
    base = base or Config()
    return prefit_overrides(parse_space({"space": space}, base, tuple(BACKENDS)), base)


def test_prefit_plans_only_keys_that_change_a_baseline_or_backend_fit() -> None:
    # keys of the joint stage only: the trials share one baseline and one backend fit
    assert _prefit({"train.fixmatch_threshold": {"grid": [0.9, 0.95]},
                    "train.lambda_u": {"grid": [0.5, 1.0]},
                    "train.offline": {"choice": ["warm", "targets"]},
                    "select.threshold": {"grid": [0.8, 0.9]}, "backend.name": "gmm"}) \
        == [{"backend.name": "gmm"}]
    # resource keys change no fit
    assert _prefit({"train.cpus_per_worker": {"grid": [0.4, 0.5]},
                    "train.checkpoint_every": {"grid": [1, 2]}}) == [{}]
    # the learning rate changes the baseline (one prefit each) ...
    assert _prefit({"train.lr": {"grid": [0.03, 0.01]}, "backend.name": "gmm"}) \
        == [{"train.lr": 0.03, "backend.name": "gmm"}, {"train.lr": 0.01, "backend.name": "gmm"}]
    # ... backend.gmm.* the gmm fit, also when backend.name=auto (which fits gmm), not `self`
    gmm = {"backend.gmm.pca_dim": {"grid": [8, 16]}}
    assert len(_prefit(gmm)) == 2  # Config(): backend.name=auto
    assert _prefit(gmm, apply_overrides(Config(), {"backend.name": "self"})) == [{}]


def test_cli_tune_fails_fast_on_a_bad_space(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import raysl.distributed.session as session

    def no_ray(*_: object, **__: object) -> bool:
        raise AssertionError("Ray was about to start")

    monkeypatch.setattr(session, "ensure_ray", no_ray)
    space = tmp_path / "space.yaml"
    space.write_text("space:\n  select.threshold: {grid: [0.9, 2]}\n")
    assert main(["tune", "--space", str(space), "--out", str(tmp_path / "o")]) == 2
    assert "select.threshold=2.0: must be in [0.0, 1.0]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written, no search started


def test_a_different_search_in_the_same_out_is_refused(tmp_path: Path) -> None:
    from raysl.tuning.search import _check_same_search

    spec = parse_space({"space": {"select.threshold": {"grid": [0.8, 0.9]}}}, Config())
    assert _check_same_search(tmp_path / "search.json", spec, Config()) is False
    assert _check_same_search(tmp_path / "search.json", spec, Config()) is True
    # where Ray runs is not part of the search; what it computes is
    moved = apply_overrides(Config(), {"ray.num_cpus": 2})
    assert _check_same_search(tmp_path / "search.json", spec, moved) is True
    with pytest.raises(ConfigError, match="holds a different search"):
        _check_same_search(tmp_path / "search.json", spec,
                           apply_overrides(Config(), {"train.epochs": 3}))


RESOURCES = {"train.cpus_per_worker": 0.25, "train.checkpoint_every": 3, "train.use_gpu": True,
             "backend.actor_cpus": 0.2, "data.root": "/elsewhere", "ray.num_cpus": 2}


def test_resource_keys_neither_block_a_resume_nor_refit(tmp_path: Path) -> None:
    from raysl.tuning.search import _check_same_search, shared_dir

    spec = parse_space({"space": {"select.threshold": {"grid": [0.8, 0.9]}}}, Config())
    assert _check_same_search(tmp_path / "search.json", spec, Config()) is False
    # how fast and where (raysl.stages.RESOURCE_KEYS) may change between a run and its resume
    moved = apply_overrides(Config(), RESOURCES)
    assert _check_same_search(tmp_path / "search.json", spec, moved) is True
    # ... and key no fit: the same baseline dir
    root = tmp_path / "out"
    assert shared_dir(root, moved) == shared_dir(root, Config())
    # the baseline dir is keyed by what the baseline depends on, nothing else
    for key, value in {"train.lambda_u": 0.5, "train.fixmatch_threshold": 0.9,
                       "select.threshold": 0.5, "backend.name": "gmm",
                       "backend.gmm.pca_dim": 8}.items():
        assert shared_dir(root, apply_overrides(Config(), {key: value})) \
            == shared_dir(root, Config()), key
    for key, value in {"train.lr": 0.01, "train.epochs": 3, "data.seed": 1}.items():
        assert shared_dir(root, apply_overrides(Config(), {key: value})) \
            != shared_dir(root, Config()), key


def test_tune_console_setting_is_scoped(monkeypatch: pytest.MonkeyPatch) -> None:
    from raysl.tuning.search import quiet_tune_console

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    with quiet_tune_console():
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # while Tuner.fit() runs
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")  # the user's choice stands
    with quiet_tune_console():
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"


def test_trial_log_gets_raysl_records_only_while_the_trial_runs(tmp_path: Path) -> None:
    from raysl.tuning.search import trial_log

    log = logging.getLogger("raysl")
    level, handlers = log.level, list(log.handlers)
    with trial_log(tmp_path / "t" / "log.txt"):
        log.info("[joint] training: inside")
        logging.getLogger("raysl.something").warning("a child's warning")
    log.warning("after the trial")
    text = (tmp_path / "t" / "log.txt").read_text()
    assert "[joint] training: inside" in text and "a child's warning" in text
    assert "after the trial" not in text
    assert log.level == level and log.handlers == handlers


# -- ranking and the report (no Ray) --------------------------------------------------------

def _rec(tid: str, val: float, test: float, backend: str = "gmm", t: float = 0.9,
         status: str = "done") -> TrialRecord:
    m = {"val_accuracy": val, "test_accuracy": test, "precision": 0.9, "coverage": t / 2,
         "n_selected": 10, "epochs": 2, "seconds": 3.0, "backend": backend, "threshold": t,
         "final": status == "done"}
    return TrialRecord(tid, {"backend.name": backend, "select.threshold": t}, status, m)


def test_best_is_chosen_on_validation_never_test() -> None:
    recs = [_rec("a", 0.80, 0.99), _rec("b", 0.90, 0.70), _rec("c", 0.90, 0.95),
            _rec("d", 0.99, 0.99, status="stopped early")]
    assert best(recs).trial_id == "b"  # highest val; the tie with c goes to trial order
    assert [r.trial_id for r in rank(recs)] == ["b", "c", "a", "d"]
    assert best([_rec("d", 0.9, 0.9, status="stopped early")]) is None


def test_report_writes_table_plots_best_and_links(tmp_path: Path) -> None:
    recs = [_rec(f"t{i}", 0.5 + i / 20, 0.5, b, t)
            for i, (b, t) in enumerate((b, t) for b in ("gmm", "self") for t in (0.8, 0.95))]
    recs.append(TrialRecord("t9", {"backend.name": "gmm", "select.threshold": 0.5}, "error",
                            {}, "RuntimeError: boom\ntraceback"))
    spec = parse_space(default_space(["gmm", "self"]), Config())
    best_cfg = apply_overrides(Config(), recs[3].config)
    table = write_report(tmp_path, recs, ReportInputs(spec, Config(), best_cfg, "/x/shared/k",
                                                      12.0, n_val=50, n_test=359))
    assert table.splitlines()[2].startswith("*  t3")  # the best first, marked
    for f in ("trials.csv", "trials.md", "best.yaml", "report.md",
              "plots/accuracy_vs_threshold.png", "plots/precision_coverage_vs_threshold.png"):
        assert (tmp_path / f).is_file() and (tmp_path / f).stat().st_size > 0, f
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert len(rows) == 5 and rows[0]["trial_id"] == "t3" and rows[-1]["status"] == "error"
    assert math.isclose(float(rows[0]["val_accuracy"]), 0.65)
    report = (tmp_path / "report.md").read_text()
    for link in ("(best.yaml)", "(trials.csv)", "(plots/accuracy_vs_threshold.png)",
                 "(plots/precision_coverage_vs_threshold.png)", "--out /x/shared/k"):
        assert link in report
    assert load_config(tmp_path / "best.yaml") == best_cfg
    assert not list(tmp_path.rglob("*.tmp"))


def test_report_plots_leave_matplotlib_state_alone(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import matplotlib

    backend = matplotlib.rcParams._get_backend_or_none()

    def no_switch(*args: object, **kwargs: object) -> None:
        raise AssertionError("matplotlib.use called by a library function")

    monkeypatch.setattr(matplotlib, "use", no_switch)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # importing pyplot fails
    recs = [_rec("t0", 0.8, 0.7, "gmm", 0.8), _rec("t1", 0.9, 0.8, "self", 0.95)]
    spec = parse_space(default_space(["gmm", "self"]), Config())
    write_report(tmp_path, recs, ReportInputs(spec, Config(), None, "", 1.0))
    assert (tmp_path / "plots" / "accuracy_vs_threshold.png").stat().st_size > 0
    assert (tmp_path / "plots" / "precision_coverage_vs_threshold.png").stat().st_size > 0
    assert matplotlib.rcParams._get_backend_or_none() == backend


# -- real searches on Ray -------------------------------------------------------------------

def _tiny(extra: dict | None = None) -> Config:
    return apply_overrides(Config(), {
        "train.epochs": 2, "train.min_steps": 0, "train.num_workers": 1,
        "train.cpus_per_worker": 0.45,
        "backend.gmm.max_iter": 5, **(extra or {})})


def _space(tmp: Path, thresholds: list[float], backends: list[str], concurrency: int) -> Path:
    p = tmp / "space.yaml"
    p.write_text(yaml.safe_dump({
        "search": "grid", "max_concurrent_trials": concurrency,
        "space": {"select.threshold": {"grid": thresholds}, "backend.name": {"grid": backends}},
    }))
    return p


class _Lines(logging.Handler):
    """The "raysl" logger's messages (INFO and up) while the block runs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> list[str]:
        log = logging.getLogger("raysl")
        self._level = log.level
        log.setLevel(logging.INFO)
        log.addHandler(self)
        return self.lines

    def __exit__(self, *exc: object) -> None:
        log = logging.getLogger("raysl")
        log.removeHandler(self)
        log.setLevel(self._level)


def _no_fetch_on_the_driver(self: object) -> None:
    raise AssertionError("the driver fetched rows it should have left in the object store")


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    """A search over a user's files (digits as Parquet, read through Ray Data): the driver
    leaves the pool and test set in the object store (it is made unable to fetch them) and
    the trials use its splits."""
    from multinode_run import write_digits

    from raysl.distributed.pool import RemoteRows
    from raysl.tuning import tune

    tmp = tmp_path_factory.mktemp("tune")
    write_digits(tmp / "digits")
    with _Lines() as lines, pytest.MonkeyPatch.context() as mp:
        mp.setattr(RemoteRows, "fetch", _no_fetch_on_the_driver)
        # trials in their own processes (num_workers=0): Train inside Tune is the resume test's
        # (select.guard off: with 2 epochs and 5 EM rounds on these unscaled pixels it drops
        # the gmm's labels, and this search is about thresholds reaching the selection)
        outcome = tune(_tiny({"train.num_workers": 0, "data.dataset": str(tmp / "digits"),
                              "select.guard": False}),
                       _space(tmp, [0.5, 0.95], ["gmm", "self"], 2), tmp / "out")
    return outcome, lines


@pytest.mark.ray
def test_thresholds_times_backends_cost_one_fit_per_backend(searched) -> None:
    outcome, lines = searched
    out = outcome.out
    assert len(outcome.records) == 4 and all(r.complete for r in outcome.records)
    # one fit per backend, by the driver, before the trials, into the one shared cache ...
    assert outcome.backend_fits == 2
    assert sorted(p.parent.name.split("-")[1]
                  for p in out.glob("shared/cache/labels-*/meta.npz")) == ["gmm", "self"]
    # (one baseline: its dir links both fits, every part, for replays)
    assert sorted(p.parent.name.split("-")[1]
                  for p in out.glob("shared/*/cache/labels-*/meta.npz")) == ["gmm", "self"]
    assert len(list(out.glob("shared/*/cache/labels-*/part-*.npz"))) == len(
        list(out.glob("shared/cache/labels-*/part-*.npz"))) > 0
    # ... and every trial read the cache instead of fitting, on the driver's split: its pool
    # in the object store, the data not read again by the trial
    assert all(r.metrics["backend_cached"] is True for r in outcome.records)
    assert {r.metrics["pool"] for r in outcome.records} == {"object store"}
    for log in out.glob("trials/*/log.txt"):
        assert "[data]" not in log.read_text(), log
    assert sum("[data]" in s and "left in the object store" in s for s in lines) == 1
    # thresholds do change what is selected from the same probabilities
    cov = {(r.config["backend.name"], r.config["select.threshold"]): r.metrics["coverage"]
           for r in outcome.records}
    assert cov[("gmm", 0.5)] > cov[("gmm", 0.95)]
    assert any("started" in s for s in lines) and any(" done (" in s for s in lines)
    assert outcome.table in "\n".join(lines)
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 4 and rows[0]["trial_id"] == outcome.best.trial_id
    for f in ("trials.md", "best.yaml", "report.md", "plots/accuracy_vs_threshold.png",
              "plots/precision_coverage_vs_threshold.png"):
        assert (out / f).is_file(), f


@pytest.mark.ray
def test_best_config_replays_to_the_same_result(searched) -> None:
    outcome, _ = searched
    top = outcome.best
    assert top is not None
    assert top.metrics["val_accuracy"] == max(r.metrics["val_accuracy"]
                                              for r in outcome.records)
    cfg = load_config(outcome.out / "best.yaml")
    assert cfg == outcome.best_config
    m = pipeline.run(cfg, outcome.replay_out)
    assert m["baseline"]["cached"] and m["pseudo_labels"]["cached"]  # the trial's own inputs
    assert m["joint"]["cached"] is False  # the joint model was trained again ...
    # ... to the same result (CPU training is deterministic)
    assert m["joint"]["val_accuracy"] == top.metrics["val_accuracy"]
    assert m["joint"]["test_accuracy"] == top.metrics["test_accuracy"]
    assert m["pseudo_labels"]["coverage"] == top.metrics["coverage"]


@pytest.mark.ray
def test_killed_search_resumes_when_run_again(ray_session, tmp_path: Path) -> None:
    import ray

    from raysl.tuning import tune

    out = tmp_path / "out"
    # the subprocess joins this session's Ray (no second Ray on 2 cores); concurrency 1 makes
    # the trial order deterministic: one finishes, the next is killed mid-training
    cfg = _tiny({"train.epochs": 6, "ray.address": ray.get_runtime_context().gcs_address})
    (tmp_path / "cfg.yaml").write_text(dump_yaml(cfg))
    space = _space(tmp_path, [0.5, 0.95], ["gmm"], 1)
    proc = subprocess.Popen([sys.executable, "-m", "raysl.cli", "tune", "--config",
                             str(tmp_path / "cfg.yaml"), "--space", str(space), "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def interrupted() -> bool:  # one trial done, another with >= 2 checkpoints, not done
        done = list(out.glob("trials/*/result.json"))
        return len(done) == 1 and any(
            len(list(d.glob("ray/*/checkpoint_*"))) >= 2 and not (d / "result.json").exists()
            for d in out.glob("trials/*"))

    deadline = time.time() + 240
    while not interrupted():
        assert proc.poll() is None, "the search ended before it could be interrupted"
        assert time.time() < deadline, "no trial finished within 240 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = next(out.glob("trials/*/result.json")).parent.name
    before = sorted(p.name for p in out.glob("trials/*"))
    assert not (out / "report.md").exists()

    outcome = tune(cfg, space, out)
    assert outcome.resumed  # Tuner.restore, not a new search
    assert sorted(r.trial_id for r in outcome.records) == sorted(
        p.name for p in out.glob("trials/*"))
    assert len(outcome.records) == 2 and all(r.complete for r in outcome.records)
    assert set(before) <= {r.trial_id for r in outcome.records}  # the same trials, continued
    # the finished trial was not trained again; the interrupted one continued from its
    # checkpoint instead of starting over
    logs = {r.trial_id: (out / "trials" / r.trial_id / "log.txt").read_text()
            for r in outcome.records}
    assert logs[finished].count("[joint] training") == 1
    other = next(r for r in outcome.records if r.trial_id != finished)
    assert other.metrics["resumed_from_epoch"] >= 0
    assert other.metrics["epochs"] == 6
    assert outcome.backend_fits == 0  # the gmm fit was cached by the killed run
    assert (out / "best.yaml").is_file() and not list(out.rglob("*.tmp"))


@pytest.mark.ray
def test_a_learning_rate_grid_shares_one_backend_fit(
        ray_session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from raysl.tuning import tune

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    # cheap: the search runs on Tune, train.num_workers=0 trains the baselines in Ray Train's
    # local mode and the trials in their own processes (local mode refuses Tune sessions;
    # this also tests that fallback); the space given as a dict
    space = {"search": "grid", "max_concurrent_trials": 2, "space": {
        "train.lr": {"grid": [0.03, 0.01]}, "backend.name": "gmm", "select.threshold": 0.9}}
    outcome = tune(_tiny({"train.num_workers": 0}), space, tmp_path / "out")
    out = outcome.out
    assert len(outcome.records) == 2 and all(r.complete for r in outcome.records)
    # the learning rate changes the baseline (two), not the gmm fit (one, shared)
    assert outcome.backend_fits == 1
    fits = list(out.glob("shared/cache/labels-gmm-*/meta.npz"))
    assert len(fits) == 1
    assert all(r.metrics["backend_cached"] is True for r in outcome.records)
    baselines = sorted(p.parent.parent for p in out.glob("shared/*/baseline/result.json"))
    assert len(baselines) == 2 and outcome.replay_out in baselines
    # each baseline dir links the fit, for a replay of best.yaml in it
    for d in baselines:
        (link,) = d.glob("cache/labels-gmm-*/meta.npz")
        assert link.parent.name == fits[0].parent.name
        for f in fits[0].parent.glob("*.npz"):  # meta.npz and every part
            assert (link.parent / f.name).read_bytes() == f.read_bytes()
    # each trial's log has its own progress, the pipeline's records included
    for r in outcome.records:
        text = (out / "trials" / r.trial_id / "log.txt").read_text()
        assert "attempt started" in text and "[joint] training" in text
    # Tune printed nothing; the setting that quiets it did not outlive the call
    assert "View detailed results" not in capsys.readouterr().out
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ


def test_restore_only_unpickles_a_tuner_this_search_wrote(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune's restore unpickles tune/tuner.pkl: an --out raysl did not create is refused
    before Ray starts."""
    import raysl.distributed.session as session
    from raysl.tuning import tune
    from raysl.tuning.search import _check_same_search

    def no_ray(*_: object, **__: object) -> bool:
        raise AssertionError("Ray was about to start")

    monkeypatch.setattr(session, "ensure_ray", no_ray)
    raw = {"space": {"select.threshold": {"grid": [0.8, 0.9]}}}
    cfg = apply_overrides(Config(), {"train.epochs": 1})
    _check_same_search(tmp_path / "search.json", parse_space(raw, cfg), cfg)  # same search
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "tuner.pkl").write_bytes(b"\x80\x04 not ours")  # someone else's
    with pytest.raises(ConfigError, match=r"was not written by a raysl search"):
        tune(cfg, raw, tmp_path)
    (tmp_path / "tuner.sha256").write_text("0" * 64 + "\n")  # a record that doesn't match
    with pytest.raises(ConfigError, match=r"refusing to restore"):
        tune(cfg, raw, tmp_path)
