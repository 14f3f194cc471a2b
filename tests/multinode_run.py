"""Run the pipeline on a simulated two-node cluster and print its metrics as JSON.

``ray.cluster_utils.Cluster`` starts a head and a worker node (1 CPU each) on this machine;
shard actors and train workers then need both nodes. The data is a user's: digits written as
Parquet files, read through Ray Data, so the unlabeled pool and test set stay in the object
store and each shard actor fetches its own rows; the driver is made unable to fetch any
(``RemoteRows.fetch`` raises here). tests/test_cluster.py runs this in a process of its own,
because a process joins one Ray cluster at a time.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import ray
from ray.cluster_utils import Cluster

from raysl import pipeline
from raysl.config import Config, apply_overrides
from raysl.distributed.pool import RemoteRows
from raysl.distributed.session import runtime_env


def write_digits(folder: Path) -> None:
    """digits as 3 Parquet files: 64 pixel columns and ``y``."""
    from sklearn.datasets import load_digits

    d = load_digits(as_frame=True)
    df = d.data.assign(y=d.target)
    folder.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(np.arange(len(df)), 3)):
        df.iloc[part].to_parquet(folder / f"part-{k}.parquet", index=False)


def _no_fetch_on_the_driver(self: RemoteRows) -> np.ndarray:
    raise AssertionError("the driver fetched rows it should have left in the object store")


def main(out: str) -> None:
    progress = logging.getLogger("raysl")  # to stderr: stdout ends with the metrics' JSON
    progress.addHandler(logging.StreamHandler(sys.stderr))
    progress.setLevel(logging.INFO)
    progress.propagate = False
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING",
             runtime_env=runtime_env(address=cluster.address))  # as raysl joins a cluster
    try:
        data = Path(out).parent / "digits-parquet"
        write_digits(data)
        RemoteRows.fetch = _no_fetch_on_the_driver  # type: ignore[method-assign]
        cfg = apply_overrides(Config(), {"data.dataset": str(data),
            "train.epochs": 2, "train.min_steps": 0, "train.num_workers": 2,
            "train.cpus_per_worker": 1,
            "backend.actor_cpus": 1, "data.n_shards": 2, "backend.gmm.max_iter": 5,
            # per class: the kept labels follow the labeled prior, so the guard (which stops
            # this 5-round gmm's lopsided threshold selection) lets them into the joint job,
            # planned by the radix select over both nodes' shards
            "select.criterion": "per_class",
            # the ranks and shard actors keep their rows in file-backed arrays, as a pool too
            # large for their memory would (on this small data `auto` keeps them on the heap)
            "train.share_storage": "disk", "backend.shard_storage": "disk"})
        metrics = pipeline.run(cfg, out)
        metrics["cluster_nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        print(json.dumps(metrics))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
