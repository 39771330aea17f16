"""docs/digits_report/verdicts.md quotes figures its own script derives from the committed CSVs (the
floor at each set size, the minimum detectable effect of each verdict). The script is the page's
fenced python block; every figure it prints must stand in the page, so a regenerated report that
moves a CSV value fails here until the page is updated."""

import re
import subprocess
import sys
from pathlib import Path

from test_doc_numbers import figures, found_in, normalise

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "digits_report" / "verdicts.md"


def script(page: str) -> str:
    """The page's one fenced python block."""
    blocks = re.findall(r"^```python\n(.*?)^```", page, flags=re.S | re.M)
    assert len(blocks) == 1, f"{PAGE.name} should hold one python block, found {len(blocks)}"
    return blocks[0]


def test_every_figure_the_script_prints_is_on_the_page():
    page = PAGE.read_text()
    out = subprocess.run([sys.executable, "-c", script(page)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    # The simulation's rates are quoted rounded to percent in prose; its lines are checked by eye.
    printed = [f for line in out.splitlines() if "called" not in line for f in figures(line)]
    assert len(printed) > 100, out
    text = normalise(page)
    missing = sorted({f for f in printed if not found_in(f, text)})
    assert not missing, f"printed by the script but not on {PAGE.name}: {missing}"
