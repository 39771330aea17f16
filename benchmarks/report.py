"""What every benchmark's results file says about itself, and how it summarises repeated rounds.

A results file starts with the command, the commit, the date and the machine (`header`), so a figure
can be traced to what produced it. Timings are repeated in rounds that alternate the methods, and
summarised as the median with the spread (`summary`): on shared machines a single round can be
several times slower than the next, and a best-of-N hides how often that happens.
"""

import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and torch's thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({torch.cuda.device_count()} visible), CUDA {torch.version.cuda}"
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} CPU, {torch.get_num_threads()} torch threads"


def commit() -> str:
    """The checked-out commit, with '+changes' when the tree differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def header(device: torch.device) -> list[str]:
    """The lines that open a results file: command, commit, date, machine, versions."""
    return [f"command: python {' '.join(sys.argv)}",
            f"commit: {commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"machine: {machine(device)}; torch {torch.__version__}, Python {platform.python_version()}"]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile) of `values` (at least 2)."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def summary(values: list[float], digits: int = 3) -> str:
    """'median [q1, q3] (min-max, n rounds)'."""
    q1, median, q3 = quartiles(values)
    f = f".{digits}f"
    return (f"{median:{f}} [IQR {q1:{f}}, {q3:{f}}] (range {min(values):{f}}-{max(values):{f}}, "
            f"{len(values)} rounds)")


def write(lines: list[str], out: str | None) -> None:
    """Print `lines`, and write them to `out` when given."""
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
