"""Condition images and masks of image-to-image sampling, read from folders (docs/image_to_image.md).

A folder's images are read in sorted file-name order; a mask folder holds one mask per condition
image, under the same name. Nothing is converted silently: a condition image must already have the
model's size and channel count (8-bit grey `L` for 1 channel, `RGB` for 3), and a mask must be an
8-bit grey or 1-bit image of the same size holding only black (0: known) and white (255: generate).
Every problem is an `InputError` naming the file.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from uncdiff.io.files import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MODES = {1: "L", 3: "RGB"}


def image_files(folder: str | Path, what: str) -> list[Path]:
    """The image files of `folder` (by suffix), sorted by name; an error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{what} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:  # a bomb: too many pixels
        raise InputError(f"{path} is not a readable image ({error})") from None


def read_conditions(folder: str | Path, channels: int, size: int) -> tuple[list[Path], torch.Tensor]:
    """The files of `folder` and their images as uint8 `[N, channels, size, size]`."""
    if channels not in MODES:
        raise InputError(f"condition images of {channels} channels are not supported (1 or 3)")
    files, images = image_files(folder, "--conditions"), []
    for path in files:
        image = _open(path)
        if image.mode != MODES[channels]:
            raise InputError(f"{path} is a {image.mode} image; this model takes {MODES[channels]} images "
                             f"({channels} channel{'s' if channels > 1 else ''}) of {size}x{size}")
        if image.size != (size, size):
            raise InputError(f"{path} is {image.size[0]}x{image.size[1]}; this model takes {size}x{size} images")
        array = np.array(image)  # a writable copy
        images.append(torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()))
    return files, torch.stack(images)


def read_masks(folder: str | Path, names: list[Path], size: int) -> torch.Tensor:
    """The mask of each condition file in `names` (same file name in `folder`) as float `[N, 1, H, W]`,
    1 = generate; an error for a missing, extra or ill-formed mask."""
    files = {p.name: p for p in image_files(folder, "--masks")}
    wanted = [p.name for p in names]
    missing, extra = [n for n in wanted if n not in files], sorted(set(files) - set(wanted))
    if missing or extra:
        raise InputError(f"--masks {folder} must hold one mask per condition image, under the same file name: "
                         + "; ".join(part for part in (f"missing {missing[:5]}" if missing else "",
                                                       f"not a condition image's {extra[:5]}" if extra else "")
                                     if part))
    masks = []
    for name in wanted:
        image = _open(files[name])
        if image.mode not in ("L", "1"):
            raise InputError(f"{files[name]} is a {image.mode} image; a mask is a grey (L) or 1-bit image")
        if image.size != (size, size):
            raise InputError(f"{files[name]} is {image.size[0]}x{image.size[1]}; the condition images are "
                             f"{size}x{size}")
        array = np.asarray(image.convert("L"))
        if not np.isin(array, (0, 255)).all():
            raise InputError(f"{files[name]} holds values other than 0 (known) and 255 (generate)")
        masks.append(torch.from_numpy(array == 255).float()[None])
    return torch.stack(masks)
