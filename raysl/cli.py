"""``raysl``: the command line. Subcommands share ``--config``, ``--set`` and ``--out``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from raysl.config import Config, load_config, parse_set, valid_keys
from raysl.errors import RayslError

DEFAULT_OUT = "runs/default"

# `raysl bench NAME ...` -> the module's ``main(argv) -> int`` (imported only when run).
BENCHES: dict[str, str] = {
    "backends": "raysl.bench.backends",
    "accuracy": "raysl.bench.accuracy",
    "gmm-speed": "raysl.bench.gmm_speed",
    "ray-overhead": "raysl.bench.ray_overhead",
    "robustness": "raysl.bench.robustness",
    "scale": "raysl.bench.scale",
}


def _common(p: argparse.ArgumentParser, out: str = DEFAULT_OUT) -> None:
    p.add_argument("--config", help="YAML file of config keys (nested or dotted)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set select.threshold=0.9 (repeatable)")
    p.add_argument("--out", default=out,
                   help=f"output directory; running again with it resumes (default {out})")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="raysl", description="Semi-supervised learning with "
                                 "pseudo-labels on Ray.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "the whole pipeline: baseline, pseudo-labels, joint training, evaluation"),
        ("pseudo-label", "baseline + backend fit + selection (writes pseudo_labels.parquet)"),
        ("train", "joint training from the pseudo_labels.parquet in --out"),
    ):
        _common(sub.add_parser(name, help=text, description=text))
    tune = sub.add_parser("tune", help="Ray Tune search over config keys (see README)",
                          description="Ray Tune search over any config keys; running again "
                          "with the same --out resumes the search")
    _common(tune, out="runs/tune")
    tune.add_argument("--space", help="YAML file: the search space, by dotted config keys")
    bench = sub.add_parser("bench", help="benchmarks that print a table: "
                           + ", ".join(BENCHES))
    bench.add_argument("name", choices=sorted(BENCHES))
    bench.add_argument("args", nargs=argparse.REMAINDER,
                       help="the benchmark's own options (raysl bench NAME --help)")
    sub.add_parser("keys", help="list every config key with its default")
    return ap


def _config(args: argparse.Namespace) -> Config:
    """``--config`` (or, for ``raysl train``, the run's own ``--out/config.yaml``: the same
    data and upstream settings) then ``--set``."""
    path = args.config
    if path is None and args.command == "train":
        saved = Path(args.out) / "config.yaml"
        path = saved if saved.is_file() else None
    return load_config(path, parse_set(args.set))


@contextmanager
def _console_logging() -> Iterator[None]:
    """While the command runs, raysl's progress and summary (INFO) and warnings go to stdout;
    the logger is restored after (the library itself installs no handler)."""
    logger = logging.getLogger("raysl")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    before = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # Ray's root handlers would print every line twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with _console_logging():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "keys":
            from raysl.config import get

            cfg = Config()
            for k in valid_keys():
                print(f"{k} = {get(cfg, k)!r}")
            return 0
        if args.command == "bench":
            import importlib

            return int(importlib.import_module(BENCHES[args.name]).main(args.args))
        if args.command == "tune":
            from raysl.tuning import tune

            tune(_config(args), args.space, args.out)
            return 0
        from raysl import pipeline

        cfg = _config(args)
        stages = {"run": "all", "pseudo-label": "pseudo-label", "train": "train"}[args.command]
        pipeline.run(cfg, args.out, stages=stages)
    except RayslError as e:
        print(f"raysl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        again = f" with --out {out}" if out else ""
        print(f"raysl: interrupted. Finished stages are kept: run the same command again{again} "
              "to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
