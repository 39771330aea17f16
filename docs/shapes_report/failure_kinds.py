"""What the invalid samples of an `evaluate --experiments detection` report are, and how each
estimator's score sits on them: for every sample set, the checker's rule counts, and the median score
of the valid samples and of the invalid ones (by rule), as `count / median`. Reads <report>/sets/*/manifest.csv and the
images; prints a markdown table.

    python docs/shapes_report/failure_kinds.py eval/shapes > failure_kinds.md
"""

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from uncdiff.data.shapes import check

ESTIMATORS = ("aleatoric", "mc_dropout", "bayesdiff", "x0_trajectory", "generative")


def kinds(folder: Path) -> dict[str, list[float]]:
    """The checker's rule ('valid' for none) -> the scores of the set's samples that break it."""
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = defaultdict(list)
    for row in rows:
        out[check(np.array(Image.open(folder / row["image"]))).rule or "valid"].append(float(row["score"]))
    return out


def main(root: str) -> None:
    sets = [name for name in ESTIMATORS if (Path(root) / "sets" / name).is_dir()]
    table = {name: kinds(Path(root) / "sets" / name) for name in sets}
    rules = sorted({rule for t in table.values() for rule in t}, key=lambda r: (r != "valid", r))
    print("| set | " + " | ".join(rules) + " |")
    print("|---|" + "---|" * len(rules))
    for name in sets:
        cells = [f"{len(table[name][r])} / {statistics.median(table[name][r]):.3g}" if table[name][r] else "0"
                 for r in rules]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
