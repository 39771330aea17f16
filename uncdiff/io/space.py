"""Free space before work: every command that writes samples, maps, tables, reports or checkpoints
estimates the bytes it will write and compares them with what the output folder's filesystem has
free (`check_free_space`), before any sampling or training, so that a run too big for its disk is
refused at once instead of failing hours later.

One function per kind of output, each listing the sizes of the files it will write. Each size is
an upper bound, not a guess: images and maps are counted uncompressed (PNG and `.npy` never take
much more than their raw pixels; a PNG of natural images usually takes less), text files at their
longest values. `check_free_space` rounds every file up to the filesystem's block, which is what a
small file really takes (an 8x8 sample's PNG is a few hundred bytes and takes a 4 KiB block).

What can't be known beforehand is left out: the FID statistics in `--fid.cache` (another folder),
W&B's files, `fit`'s sample grids, and kept checkpoints whose number depends on the epochs' length
(`save_top_k: -1` with `every_n_epochs`: counted once).
"""

import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import torch

from uncdiff.io.lock import is_first_process
from uncdiff.io.sample_store import GRID_SAMPLES, SampleStore

# the longest a number takes in the project's JSON and CSV files: repr of a float64 with sign and exponent
NUMBER_CHARS = 25
# FID features of one image, at most: Inception's 2048 float32 values (the digits classifier's are fewer)
FEATURE_BYTES = 2048 * 4
# a report's markdown, tables and plots (fixed-size matplotlib figures at 100 dpi, a few at most per experiment)
REPORT_BYTES = 16 * 2**20
# a file that records settings or a config (run.json, config.yaml, summary.json), beyond its settings' JSON
RECORD_BYTES = 4 * 2**10
# what torch.save adds per tensor (its zip entry's headers, 64-byte alignment, its name in the pickle) and
# per file (the hyperparameters, Lightning's loop and callback states)
TENSOR_OVERHEAD, CHECKPOINT_OVERHEAD = 256, 256 * 2**10


class NotEnoughSpace(OSError):
    """A run would write more than its output folder's filesystem has free."""


def block_size(folder: str | Path) -> int:
    """The filesystem's allocation unit at `folder` (or its nearest existing parent)."""
    return os.statvfs(existing_parent(folder)).f_frsize or 4096


def existing_parent(folder: str | Path) -> Path:
    """`folder`, or its nearest parent that exists (a run creates its folder only once it starts)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def on_disk(sizes: Iterable[int], block: int) -> int:
    """What files of these sizes (bytes) take on a filesystem of `block`-byte blocks."""
    return sum(-(-size // block) * block for size in sizes)


def png_bytes(height: int, width: int, channels: int) -> int:
    """An upper bound of a PNG's size: its raw pixels and a filter byte per row, what deflate adds to
    data it can't compress (about 0.03 %, zlib's `deflateBound`), 12 bytes a chunk of at most 64 KiB,
    and the header: raw / 256 + 1 KiB covers these with room to spare."""
    raw = height * (1 + width * channels)
    return raw + raw // 256 + 1024


def check_free_space(folder: str | Path, sizes: Iterable[int], option: str = "--out") -> None:
    """Refuse (NotEnoughSpace) a run that would write files of `sizes` (bytes) into `folder` (a file
    or folder to be made there) when its filesystem has less free, naming the estimate, the free space
    and the folder. Under a multi-process launch only the first process checks (as only it locks): a
    rank that alone saw a little less free space would otherwise stop and leave the others waiting."""
    if not is_first_process():
        return
    where = existing_parent(folder)
    needed = on_disk(sizes, block_size(where))
    free = shutil.disk_usage(where).free
    if needed > free:
        raise NotEnoughSpace(f"{option} {folder}: this run writes about {human(needed)} and {where}'s filesystem has "
                             f"{human(free)} free; free some space, or choose another {option} on a larger disk")


def human(size: int) -> str:
    """`size` bytes in words: bytes below 1 KiB, else KiB, MiB or GiB with one decimal."""
    if size < 1024:
        return f"{size} bytes"
    exponent = min(3, (int(size).bit_length() - 1) // 10)
    return f"{size / 1024 ** exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def record_bytes(settings: dict) -> int:
    """run.json and the like: the settings' JSON, indented, and what ran the run."""
    return len(json.dumps(settings, indent=2)) + RECORD_BYTES


def sample_store_files(store: SampleStore, image_shape: Sequence[int]) -> list[int]:
    """What `store` (a `sample`, `restore` or evaluate set folder) still has to write for its chunks
    without a record (all of them in a new folder), images of `image_shape [C, H, W]`, and the files
    written at the end: every sample's PNG, its map (`.npy`, float32) and heatmap PNG when maps are
    saved, restore's interval maps, each chunk's record, manifest.csv, grid.png and dropped.png,
    run.json, config.yaml, summary.json, and restore's inputs.csv."""
    c, h, w = image_shape
    settings, missing = store.settings, store.missing()
    files = store.files(settings["seeds"]["start"])
    per_sample = [png_bytes(h, w, c)]
    if files["map"]:
        per_sample += [128 + 4 * c * h * w, png_bytes(h, w, 3)]
    if settings.get("intervals"):  # restore --intervals: lower, upper and width maps (.npy, float32)
        per_sample += [128 + 4 * c * h * w] * 3
    # a chunk's record: per sample its seed, score and |x_T|^2, and a total and step index per step
    steps = settings["sampler"]["steps"]
    records = [256 + len(chunk.seeds) * (3 + 2 * steps) * (NUMBER_CHARS + 2) for chunk in missing]
    paths = sum(len(path) for path in files.values()) + 12
    count = settings["seeds"]["count"]
    manifest = 64 + count * (3 * NUMBER_CHARS + paths)
    # grids: up to 64 cells of image | heatmap, 8 a row, 1-pixel gaps, upscaled to >= 32 pixels
    scale, cell = max(1, -(-32 // h)), (2 * w + 1 if files["map"] else w) + 2
    rows = -(-min(count, GRID_SAMPLES) // 8)
    grid = png_bytes(rows * (h + 2) * scale, min(count, 8) * cell * scale, 3)
    grids = [grid, grid] if settings["estimator"]["name"] != "none" else [grid]  # dropped.png needs scores
    text = [record_bytes(settings)] * 3
    if "conditions" in settings:  # restore's inputs.csv: a row of paths per image
        folders = len(settings["conditions"]["folder"]) + len((settings.get("masks") or {}).get("folder", ""))
        text.append(count * (NUMBER_CHARS + paths + folders) + sum(2 * len(n) for n in settings["conditions"]["files"]))
    return per_sample * sum(len(chunk.seeds) for chunk in missing) + records + [manifest, *grids, *text]


def evaluation_files(stores: dict[str, SampleStore], image_shape: Sequence[int], real_images: int) -> list[int]:
    """`evaluate`'s <out>: its sample sets (`sample_store_files`), each set's cached FID features and
    those of the real images of precision / recall, run.json, config.yaml and the report."""
    sets = [size for store in stores.values() for size in sample_store_files(store, image_shape)]
    features = [FEATURE_BYTES * store.settings["seeds"]["count"] for store in stores.values()]
    return [*sets, *features, FEATURE_BYTES * real_images, REPORT_BYTES, RECORD_BYTES, RECORD_BYTES]


def image_to_image_report_files(examples: int, maps: int) -> list[int]:
    """`evaluate_image_to_image`'s <out>: the report and its tables, config.yaml, study.json, and the
    panels figure (`examples` rows of 150-pixel cells: condition, output, truth, error and `maps` maps;
    RGBA)."""
    panels = png_bytes(150 * examples + 50, 150 * (4 + maps), 4) if examples else 0
    return [REPORT_BYTES, RECORD_BYTES, RECORD_BYTES, panels]


def threshold_table_files(settings: dict, image_shape: Sequence[int]) -> list[int]:
    """`calibrate`'s three files: the table `[steps, C, H, W]` and the reference's per-step mean and
    standard deviation (float64 at most), each with its `settings`, and the config."""
    steps = settings["sampler"]["steps"]
    table = 8 * steps * math.prod(image_shape)
    return [table + record_bytes(settings), 2 * 8 * steps + record_bytes(settings), RECORD_BYTES]


def interval_calibration_files(record: dict) -> list[int]:
    """`calibrate_intervals`' two files: the calibration file (its record, the fit's few numbers and the
    run's info) and the config."""
    return [record_bytes(record) + RECORD_BYTES, RECORD_BYTES]


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """A Lightning checkpoint of `module` trained with Adam: its state dict (the weights, the EMA copy,
    buffers) and Adam's two moments of every trainable parameter, with torch.save's overheads."""
    tensors = list(module.state_dict().values())
    trained = [p for p in module.parameters() if p.requires_grad]
    size = lambda t: t.numel() * t.element_size() + TENSOR_OVERHEAD
    return sum(map(size, tensors)) + 2 * sum(map(size, trained)) + CHECKPOINT_OVERHEAD


def kept_checkpoints(callbacks: Iterable, max_steps: int) -> int:
    """How many checkpoints `ModelCheckpoint` callbacks keep at the end of a run of `max_steps` steps
    (-1: unknown): `last.ckpt` and the `save_top_k` best of each, and for `save_top_k: -1` (every one
    kept) one per `every_n_train_steps` when both are known, otherwise one (a lower bound)."""
    count = 0
    for callback in callbacks:
        count += 1 if getattr(callback, "save_last", False) else 0
        top_k = getattr(callback, "save_top_k", 0)
        if top_k >= 0:
            count += top_k
            continue
        every = getattr(callback, "_every_n_train_steps", 0)  # ModelCheckpoint keeps it private
        count += max(1, max_steps // every) if every and max_steps > 0 else 1
    return count


def run_directory_files(module: torch.nn.Module, callbacks: Iterable, max_steps: int,
                        existing: Iterable[Path] = ()) -> list[int]:
    """What `fit` adds to its run directory: the checkpoints it keeps (`kept_checkpoints`) and the one
    being written (a temporary file until it replaces the old one), less as many as are already there
    (`existing`, a resumed run's); never less than the one being written."""
    kept = kept_checkpoints(callbacks, max_steps) + 1 - len(list(existing))
    return [checkpoint_bytes(module)] * max(1, kept)
