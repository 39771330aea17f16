"""The calibration file of guaranteed intervals (docs/algorithms.md §8), which `calibrate_intervals`
writes and `restore --intervals` reads: JSON (never pickle), written atomically.

    {"kind": "uncdiff interval calibration", "format": 1, "alpha": 0.1, "delta": 0.1, "n": 179,
     "lambda_hat": 3.1, "risk": 0.07, "upper_bound": 0.099, "grid": {"zero": true, "min": 1e-05,
     "max": 100000.0, "points": 2001}, "heuristic": {"name": "samples", "K": 8, "spread": "std"},
     "estimator": {...}, "sampler": {...}, "task": "inpaint", "checkpoint_sha256": "...",
     "calibration_images": {...}, "run": {...}}

`lambda_hat` holds for the checkpoint (by digest), task, heuristic, estimator and sampler it was made
with; `check_calibration` refuses any other, naming what differs.
"""

import json
import math
from pathlib import Path

from uncdiff.io.files import InputError, write_atomic

KIND = "uncdiff interval calibration"
FORMAT = 1
REQUIRED = ("alpha", "delta", "n", "lambda_hat", "grid", "heuristic", "estimator", "sampler", "task",
            "checkpoint_sha256")


def write_calibration(path: str | Path, record: dict) -> None:
    """Write `record` (plain values, every key of REQUIRED) as the calibration file at `path`."""
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        raise ValueError(f"a calibration record needs {', '.join(missing)}")
    write_atomic(path, (json.dumps({"kind": KIND, "format": FORMAT, **record}, indent=2) + "\n").encode())


def read_calibration(path: str | Path, option: str = "--intervals") -> dict:
    """The calibration file at `path`, checked to be one (kind, format, every field, a finite lambda_hat
    >= 0, alpha and delta in (0, 1)); an InputError naming the option and the file otherwise."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{option}: no calibration file at {path} (`train.py calibrate_intervals` writes one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{option}: {path} is not a calibration file ({type(error).__name__}: {error})") from None
    if not isinstance(record, dict) or record.get("kind") != KIND:
        raise InputError(f"{option}: {path} is not an interval calibration file (`train.py calibrate_intervals` "
                         f"writes one)")
    if record.get("format") != FORMAT:
        raise InputError(f"{option}: {path} has format {record.get('format')!r}, this version reads {FORMAT}; "
                         f"calibrate again")
    missing = [key for key in REQUIRED if key not in record]
    lam = record.get("lambda_hat")
    levels_ok = all(isinstance(record.get(k), (int, float)) and 0 < record[k] < 1 for k in ("alpha", "delta"))
    if missing or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0 or not levels_ok:
        raise InputError(f"{option}: {path} is damaged (missing {missing or 'nothing'}, lambda_hat {lam!r}, alpha "
                         f"{record.get('alpha')!r}, delta {record.get('delta')!r}); calibrate again")
    return record


def check_calibration(record: dict, path: str | Path, made_for: dict, option: str = "--intervals") -> None:
    """Refuse a calibration made for another run: `made_for` holds this run's `checkpoint_sha256`,
    `task`, `heuristic`, `estimator` and `sampler`; the first that differs is named."""
    for key, what in (("checkpoint_sha256", "checkpoint"), ("task", "task"), ("heuristic", "heuristic"),
                      ("estimator", "estimator"), ("sampler", "sampler")):
        if key in made_for and record[key] != made_for[key]:
            raise InputError(f"{option} {path} was made for another {what} (the file's {record[key]!r}, this run's "
                             f"{made_for[key]!r}): calibrate_intervals for this run, or match its options")
