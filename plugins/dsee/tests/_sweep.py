"""More seeds and sparsities for the card's "Measured effect" (not a test).

Runs ``test_effect.run`` (dense DSEE, DSEE pruned after adaptation, prune-first then adapt)
for a range of seeds at one sparsity and prints one JSON line per seed, then the mean
differences. The card's session-10 rows are::

    OMP_NUM_THREADS=1 .venv/bin/python plugins/dsee/tests/_sweep.py 0.5 5 24
    OMP_NUM_THREADS=1 .venv/bin/python plugins/dsee/tests/_sweep.py 0.8 0 19
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from test_effect import run  # this script's folder is on sys.path


def main(sparsity: float, first: int, last: int) -> None:
    torch.set_num_threads(1)
    rows = []
    for seed in range(first, last + 1):
        rows.append({"seed": seed, "sparsity": sparsity, **run(seed, sparsity=sparsity)})
        print(json.dumps(rows[-1]), flush=True)
    for other in ("prune-first", "dense"):
        d = [r["dsee"] - r[other] for r in rows]
        print(
            f"dsee − {other}: {statistics.mean(d):+.4f} ± {statistics.stdev(d):.4f}, "
            f"ahead {sum(x > 0 for x in d)} / tied {sum(x == 0 for x in d)} / behind {sum(x < 0 for x in d)}"
        )


if __name__ == "__main__":
    main(float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
