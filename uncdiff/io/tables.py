"""The files `calibrate` writes and sampling reads: guidance's threshold table (docs/algorithms.md §4) and the
score variants' reference statistics (docs/algorithms.md §3), each with the settings it was made with.

Loading checks a file before any sampling and hands back values (a tensor, a dict of tensors) that the
run spec takes (`GuidanceSpec.table`, `EstimatorSpec.reference`); the math never opens a file. Both
files record `format` (`SETTINGS_FORMAT`, the names of their settings): a file of another format is
refused by name, never read with the wrong names.
"""

from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from uncdiff.io.files import load_torch, save_atomic

TABLE_KIND = "uncdiff threshold table"
REFERENCE_KIND = "uncdiff score reference"
SETTINGS_FORMAT = 2  # the settings as `uncdiff.uncertainty.spec` names them (format 1: older names for M)


def save_threshold_table(path, table: torch.Tensor, settings: Mapping) -> None:
    """Save a threshold table `[steps, C, H, W]` with the settings it was made with (plain values)."""
    save_atomic({"kind": TABLE_KIND, "format": SETTINGS_FORMAT, "table": table.detach().cpu(),
                 "settings": dict(settings)}, path)


def save_score_reference(path, reference: Mapping, settings: Mapping) -> None:
    """Save reference statistics `{'mean': [n], 'std': [n]}` with the settings they were made with."""
    save_atomic({"kind": REFERENCE_KIND, "format": SETTINGS_FORMAT,
                 "mean": torch.as_tensor(reference["mean"]).double().cpu(),
                 "std": torch.as_tensor(reference["std"]).double().cpu(), "settings": dict(settings)}, path)


def _load(path, kind: str, what: str) -> dict:
    """The dict saved at `path` as `kind`, of this version's format; a ValueError naming the file otherwise."""
    if not Path(path).is_file():
        raise ValueError(f"no {what} file at {str(path)!r} (`train.py calibrate` writes one)")
    try:
        state = load_torch(path, what)
    except ValueError as error:
        raise ValueError(f"{str(path)!r} is not a {what} file from calibrate ({error})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} is not a {what} file from calibrate")
    first_table = kind == TABLE_KIND and "kind" not in state and "table" in state  # format 1 tables had no kind
    if state.get("kind") != kind and not first_table:
        raise ValueError(f"{str(path)!r} is not a {what} file from calibrate")
    if state.get("format") != SETTINGS_FORMAT:
        raise ValueError(f"{str(path)!r} is a {what} of an earlier uncdiff (settings format {state.get('format', 1)}, "
                         f"this version reads {SETTINGS_FORMAT}, whose names differ): calibrate it again")
    return state


def check_thresholds(values: torch.Tensor, path, what: str) -> None:
    """Statistics of uncertainty maps are finite and >= 0: a NaN threshold would switch guidance off
    without a word (every comparison with NaN is false), a negative one guide every pixel."""
    if not torch.isfinite(values).all():
        raise ValueError(f"{str(path)!r}: {int((~torch.isfinite(values)).sum())} of its {what} are NaN or inf; "
                         f"calibrate it again")
    if (values < 0).any():
        raise ValueError(f"{str(path)!r}: {int((values < 0).sum())} of its {what} are negative (uncertainty is >= 0); "
                         f"calibrate it again")


def load_threshold_table(path, steps: Optional[int] = None,
                         image_shape: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, dict]:
    """`(table [steps, C, H, W], settings)` saved by `save_threshold_table` at `path`, checked against the
    run's step count and image shape where they are given; a ValueError naming the file otherwise."""
    state = _load(path, TABLE_KIND, "threshold table")
    table, settings = state.get("table"), dict(state.get("settings") or {})
    if not isinstance(table, torch.Tensor) or table.dim() != 4:
        raise ValueError(f"{str(path)!r} holds no [steps, C, H, W] threshold table")
    check_thresholds(table, path, "thresholds")
    need = (table.shape[0] if steps is None else steps, *(table.shape[1:] if image_shape is None else image_shape))
    if tuple(table.shape) != tuple(need):
        raise ValueError(f"threshold table {path} has shape {tuple(table.shape)}; this run needs {tuple(need)} "
                         f"(steps, C, H, W): calibrate it with this model and step count")
    return table, settings


def load_score_reference(path, steps: Optional[int] = None) -> tuple[dict, dict]:
    """`({'mean': [n], 'std': [n]}, settings)` saved by `save_score_reference` at `path` (`steps` long when
    given); a ValueError naming the file otherwise."""
    state = _load(path, REFERENCE_KIND, "score reference")
    mean, std = state.get("mean"), state.get("std")
    if not (isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor) and mean.dim() == std.dim() == 1
            and len(mean) == len(std)):
        raise ValueError(f"{str(path)!r} holds no per-step 'mean' and 'std' [steps]")
    check_thresholds(mean, path, "per-step means")
    check_thresholds(std, path, "per-step standard deviations")
    reference = {"mean": mean, "std": std}  # EstimatorSpec checks them for its score variant
    if steps is not None and len(reference["mean"]) != steps:
        raise ValueError(f"score reference {path} was calibrated for {len(reference['mean'])} sampler steps; this "
                         f"run has {steps}")
    return reference, dict(state.get("settings") or {})
