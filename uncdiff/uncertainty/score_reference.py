"""The per-step reference statistics of the normalised score variants (docs/algorithms.md §3,
`score: step_normalized | standardized`): at each sampler step, the mean and standard deviation
over unguided samples of the per-image total `sum over c, h, w of U_t`. `train.py calibrate`
computes them with its threshold table (`calibration.calibrate_table_and_reference`) and saves
them beside it; the estimators take the loaded `{'mean': [n], 'std': [n]}`."""

from pathlib import Path
from typing import Mapping, Optional

import torch

from uncdiff.io.files import load_torch, save_atomic
from uncdiff.uncertainty.estimators import check_score

KIND = "uncdiff score reference"


def reference_statistics(totals: torch.Tensor) -> dict:
    """`{'mean': [n], 'std': [n]}` (float64) of per-step totals `totals [N, n]` over the N samples;
    `std` is the unbiased standard deviation (N >= 2)."""
    if totals.dim() != 2 or totals.shape[0] < 2:
        raise ValueError(f"reference statistics need per-step totals [N >= 2, steps], got {tuple(totals.shape)}")
    totals = totals.double()
    return {"mean": totals.mean(0), "std": totals.std(0, correction=1)}


def save_score_reference(path, reference: Mapping, settings: Mapping) -> None:
    """Save reference statistics with the settings they were made with (plain Python values)."""
    save_atomic({"kind": KIND, "mean": torch.as_tensor(reference["mean"]).double().cpu(),
                 "std": torch.as_tensor(reference["std"]).double().cpu(), "settings": dict(settings)}, path)


def load_score_reference(path, steps: Optional[int] = None) -> tuple[dict, dict]:
    """`({'mean': [n], 'std': [n]}, settings)` saved by `save_score_reference` at `path`, checked
    (positive, finite, and `steps` long when given); a ValueError naming the file otherwise."""
    if not Path(path).is_file():
        raise ValueError(f"no score reference file at {str(path)!r} (`train.py calibrate` writes one as "
                         f"<table>.reference.pt)")
    try:
        state = load_torch(path, "score reference")
        if state.get("kind") != KIND:
            raise ValueError("not a score reference")
        reference, settings = {"mean": state["mean"], "std": state["std"]}, dict(state["settings"])
    except Exception as error:  # not a torch file, or another file's dict
        raise ValueError(f"{str(path)!r} is not a score reference file from calibrate "
                         f"({type(error).__name__}: {error})") from None
    try:
        for score in ("step_normalized", "standardized"):  # usable by both
            _, reference = check_score(score, reference)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if steps is not None and len(reference["mean"]) != steps:
        raise ValueError(f"score reference {path} was calibrated for {len(reference['mean'])} sampler steps; this "
                         f"run has {steps}")
    return reference, settings
