"""Entry point for `ray job submit`: a Ray Tune search on the cluster the job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --config jobs/configs/tune-digits.yaml \
        --space jobs/configs/tune-space-optuna.yaml --out /shared/raysl/tune-digits

Inside a job RAY_ADDRESS is set, so raysl joins the cluster instead of starting a local Ray.
The job's working directory is a temporary upload: give --out an absolute path that every node
sees (trials read the shared backend caches from it). Submitting again with the same --out
resumes the search.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from raysl.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
