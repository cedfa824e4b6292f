"""SMS on the effect test's toy: the soup against the best ingredient, chosen fairly.

Picking the best of m ingredients by its accuracy on the 797 held-out digits and reporting
that same accuracy favours it (a maximum of noisy values). Here the best ingredient is chosen
on one half of the held-out digits and scored on the other, both ways round ("AB", "BA"),
with the soup scored on the same half. Same training as ``tests/test_effect.py`` (whose
functions it imports). One JSON line per (outer seed, phase). Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python plugins/sparse-model-soups/experiments/soup_vs_selected_best.py 0 1 2 3 4 5 6 7 8 9
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import test_effect as T  # noqa: E402


def acc(net, rows):
    net.eval()
    with torch.no_grad():
        return (net(T.X[rows]).argmax(1) == T.Y[rows]).float().mean().item()


def run(seed):
    torch.set_num_threads(1)
    A, B = T.VAL[: len(T.VAL) // 2], T.VAL[len(T.VAL) // 2 :]
    out = []
    for phase, ings, soup in T.sms_phases(seed):
        rec = {"seed": seed, "phase": phase}
        for sel, ev, tag in ((A, B, "AB"), (B, A, "BA")):
            i = max(range(len(ings)), key=lambda j: acc(ings[j], sel))
            rec[f"best_{tag}"] = acc(ings[i], ev)
            rec[f"soup_{tag}"] = acc(soup, ev)
            rec[f"mean_{tag}"] = sum(acc(n, ev) for n in ings) / len(ings)
        rec["soup_all"] = acc(soup, T.VAL)
        rec["best_all"] = max(acc(n, T.VAL) for n in ings)
        out.append(rec)
    return out


if __name__ == "__main__":
    for s in map(int, sys.argv[1:]):
        for r in run(s):
            print(json.dumps(r), flush=True)
