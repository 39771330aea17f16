"""The README's interval commands, checked on held-out images (docs/inpaint_report/README.md):

    python docs/inpaint_report/restore_check.py export RUN_CONFIG FIRST OUT   # validation images FIRST.. as PNGs
    python docs/inpaint_report/restore_check.py coverage RUN_CONFIG FIRST RESTORED   # after restore --intervals

`export` writes the validation images from index FIRST on (those calibrate_intervals --n FIRST did
not see) as condition PNGs (`OUT/conditions`) and their validation masks (`OUT/masks`, white =
generate). `coverage` reads restore's interval maps of them and prints, over their generated pixels,
the mean fraction of true values outside [lower, upper] (what the calibration file bounds by alpha)
and the mean interval length on the [0, 1] scale.
"""

import csv
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uncdiff.io.images import to_uint8
from uncdiff.lightning.loading import datamodule_from_config


def validation_pairs(run_config: str, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x0, mask)` of the validation images from index `first` on, as the run's validation builds them."""
    data = datamodule_from_config(run_config)
    data.prepare_data()
    data.setup("fit")
    x0, _, mask = data.held_out(len(data.val_set))
    return x0[first:], mask[first:]


def export(run_config: str, first: int, out: str) -> None:
    x0, mask = validation_pairs(run_config, first)
    for folder in ("conditions", "masks"):
        (Path(out) / folder).mkdir(parents=True, exist_ok=False)
    for i, (image, m) in enumerate(zip(to_uint8(x0), mask)):
        Image.fromarray(image[0].numpy()).save(Path(out) / "conditions" / f"{first + i:04d}.png")
        Image.fromarray((m[0].numpy() * 255).astype(np.uint8)).save(Path(out) / "masks" / f"{first + i:04d}.png")
    print(f"wrote {len(x0)} condition images and masks (validation images {first}..{first + len(x0) - 1}) to {out}")


def coverage(run_config: str, first: int, restored: str) -> None:
    x0, mask = validation_pairs(run_config, first)
    rows = list(csv.DictReader(open(Path(restored) / "manifest.csv")))
    losses, widths = [], []
    for i, row in enumerate(rows):
        lower, upper = (torch.from_numpy(np.load(Path(restored) / row[key])) for key in ("lower", "upper"))
        region = mask[i].expand_as(lower) > 0.5
        truth = x0[i]
        outside = (truth < lower) | (truth > upper)
        losses.append(float(outside[region].double().mean()))
        widths.append(float(((upper - lower) / 2)[region].double().mean()))
    losses, widths = np.array(losses), np.array(widths)
    print(f"{len(rows)} held-out images: mean fraction of generated pixels outside their interval "
          f"{losses.mean():.4f} (std {losses.std(ddof=1):.4f} over images), mean interval length on the [0, 1] "
          f"scale {widths.mean():.4f}")


if __name__ == "__main__":
    {"export": export, "coverage": coverage}[sys.argv[1]](sys.argv[2], int(sys.argv[3]), sys.argv[4])
