"""The output directory of a sampling run: what `train.py sample` writes and how it resumes.

    run.json                     the settings that define the run, and what ran it (informational)
    samples/<seed>.png           the image (8-bit; grey or RGB)
    samples/<seed>_map.npy       its uncertainty map, float32 [C, H, W] (the estimator's, see SampleResult)
    samples/<seed>_map.png       heatmap of the map summed over channels, scaled to the map's own maximum
    samples/<seed>_lower.npy     with calibrated intervals (`restore --intervals`): each pixel's interval
    samples/<seed>_upper.npy     [lower, upper] and its width upper - lower, float32 [C, H, W] on the
    samples/<seed>_width.npy     image's [-1, 1] scale (docs/algorithms.md §8)
    records/chunk-<k>.json       written after chunk k's files: its seeds, scores, network evaluations, seconds
    manifest.csv                 one row per sample (seed, files, score, kept), written when all chunks are done
    .lock                        held by the run writing the directory (uncdiff.io.lock)
    grid.png, dropped.png        the first 64 samples, and the dropped ones (highest score first),
                                 each as image | heatmap pairs

The seeds are cut into fixed chunks of `batch_size` consecutive seeds, and a chunk is always
generated as one batch: its results do not depend on how many processes share the work or on
interruptions. Every file is written
under a temporary name and renamed, the chunk's record last: a chunk is finished exactly when its
record exists, and a re-run generates only the chunks without one. A sample whose score is not a
finite number (a model with NaN weights, an overflow) is never kept: the manifest marks it dropped
and the summary counts it.
"""

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from uncdiff.core.filtering import keep_best
from uncdiff.io.files import InputError, remove_temporary_files, write_atomic
from uncdiff.io.lock import LOCK_NAME, lock_and_check
from uncdiff.io.images import from_uint8, to_uint8

GRID_SAMPLES = 64
INTERVAL_MAPS = ("lower", "upper", "width")  # written when the settings hold `intervals`


@dataclass
class Chunk:
    index: int
    seeds: list[int]


def flatten(settings: dict, prefix: str = "") -> dict:
    """`{'a': {'b': 1}}` -> `{'a.b': 1}`, for naming the settings that differ."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_differences(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '(not set)')!r} there, {b.get(k, '(not set)')!r} here"
            for k in sorted(set(a) | set(b)) if a.get(k, "(not set)") != b.get(k, "(not set)")]


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 `[H, W]` or `[H, W, 3]` -> PNG file contents."""
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(values: torch.Tensor) -> bytes:
    """`values` as a float32 .npy file."""
    from io import BytesIO

    buffer = BytesIO()
    np.save(buffer, values.float().numpy())
    return buffer.getvalue()


def heatmap(map_: torch.Tensor) -> np.ndarray:
    """`[C, H, W]` uncertainty -> uint8 RGB `[H, W, 3]`: the channel sum scaled to its own maximum, magma."""
    from matplotlib import colormaps

    u = map_.double().sum(0).clamp(min=0)
    u = u / u.max() if u.max() > 0 else u
    return (colormaps["magma"](u.numpy())[..., :3] * 255).round().astype(np.uint8)


def pair_grid(images: list[np.ndarray], maps: list[Optional[np.ndarray]], per_row: int = 8) -> np.ndarray:
    """Cells of `image | heatmap` (image alone when there is no map), `per_row` cells a row, 1-pixel
    gaps, upscaled so that a cell is at least 32 pixels high. uint8 RGB."""
    h, w = images[0].shape[:2]
    scale = max(1, -(-32 // h))
    rgb = lambda a: np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a
    cells = [np.concatenate([rgb(i), np.full((h, 1, 3), 255, np.uint8), m], axis=1) if m is not None else rgb(i)
             for i, m in zip(images, maps)]
    cw = cells[0].shape[1]
    rows = -(-len(cells) // per_row)
    grid = np.full((rows * (h + 2), min(len(cells), per_row) * (cw + 2), 3), 255, np.uint8)
    for n, cell in enumerate(cells):
        r, c = divmod(n, per_row)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (cw + 2) + 1:c * (cw + 2) + 1 + cw] = cell
    return grid.repeat(scale, 0).repeat(scale, 1)


def check_output_dir(root: Path, settings: dict) -> str:
    """'new' (nothing there, or an empty directory) or 'resume' (its run.json holds these very
    settings); an InputError for a directory of another run, or one that holds something else."""
    if not root.exists():
        return "new"
    if not root.is_dir():
        raise InputError(f"output path {root} exists and is not a directory")
    run = root / "run.json"
    if not run.is_file():
        if any(p.name != LOCK_NAME for p in root.iterdir()):
            raise InputError(f"output directory {root} is not empty and holds no run.json: it is not a uncdiff "
                             f"output directory; choose another --out")
        return "new"
    try:
        old = json.loads(run.read_text())["settings"]
        if not isinstance(old, dict):
            raise ValueError("its settings are not a mapping")
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{run} is not a run.json uncdiff wrote ({type(error).__name__}: {error}); choose another "
                         f"--out") from None
    diff = settings_differences(old, settings)
    if diff:
        raise InputError(f"output directory {root} holds another run (its run.json differs in {len(diff)} "
                         f"setting(s): " + "; ".join(diff) + "). Repeat that run's exact command to resume it, "
                         f"or choose another --out.")
    return "resume"


def create_output_dir(root: Path, settings: dict, info: dict) -> None:
    """Make `root` and write its run.json: `settings` (compared on resume) and `info` (what ran it)."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "run.json").is_file():
        write_atomic(root / "run.json", json.dumps({"settings": settings, **info}, indent=2).encode())


class SampleStore:
    """One run's output directory (layout in the module docstring). `settings` is a JSON-able dict
    with at least `seeds: {start, count}`, `batch_size`, `save_maps` and `drop_fraction`."""

    def __init__(self, root: str | Path, settings: dict):
        self.root, self.settings = Path(root), settings
        start, count = settings["seeds"]["start"], settings["seeds"]["count"]
        bs = settings["batch_size"]
        seeds = list(range(start, start + count))
        self.chunks = [Chunk(k, seeds[i:i + bs]) for k, i in enumerate(range(0, count, bs))]

    # ------------------------------------------------------------------------------ checking

    def check(self, lock: bool = True) -> str:
        """Lock the directory for this run (`lock_folder`; not for a set inside a locked folder), then
        `check_output_dir`; a resumed run's temporary files of writes a kill interrupted are removed.
        The lock is held as long as the store (the run) lives."""
        if lock:
            self.lock, state = lock_and_check(self.root, lambda: check_output_dir(self.root, self.settings))
        else:
            self.lock, state = None, check_output_dir(self.root, self.settings)
        if state == "resume":
            for folder in (self.root, self.root / "samples", self.root / "records"):
                remove_temporary_files(folder)
        return state

    def create(self, info: dict) -> None:
        """Make the directories and write run.json (kept as it is when resuming)."""
        create_output_dir(self.root, self.settings, info)
        (self.root / "samples").mkdir(exist_ok=True)
        (self.root / "records").mkdir(exist_ok=True)

    # ------------------------------------------------------------------------------ progress

    def record_path(self, chunk: Chunk) -> Path:
        return self.root / "records" / f"chunk-{chunk.index:06d}.json"

    def missing(self) -> list[Chunk]:
        return [c for c in self.chunks if not self.record_path(c).is_file()]

    def done_samples(self) -> int:
        return sum(len(c.seeds) for c in self.chunks if self.record_path(c).is_file())

    # ------------------------------------------------------------------------------ writing

    def files(self, seed: int) -> dict:
        has_maps = self.settings["save_maps"] and self.settings["estimator"]["name"] != "none"
        files = {"image": f"samples/{seed:06d}.png",
                 "map": f"samples/{seed:06d}_map.npy" if has_maps else "",
                 "heatmap": f"samples/{seed:06d}_map.png" if has_maps else ""}
        if self.settings.get("intervals"):
            files.update({key: f"samples/{seed:06d}_{key}.npy" for key in INTERVAL_MAPS})
        return files

    def write_chunk(self, chunk: Chunk, images: torch.Tensor, maps: Optional[torch.Tensor],
                    scores: Optional[torch.Tensor], nfe: int, seconds: float, extras: Optional[dict] = None,
                    intervals: Optional[dict] = None) -> None:
        """Chunk `chunk`'s files: `images [B, C, H, W]` in [-1, 1], `maps [B, C, H, W]`, `scores [B]`,
        the `intervals` maps (`{'lower', 'upper', 'width'}`, each `[B, C, H, W]`) when the run has them;
        the record (seeds, scores, nfe, seconds, and the JSON-able `extras`, e.g. per-sample values
        that `record_values` reads back) last."""
        pixels = to_uint8(images.float()).permute(0, 2, 3, 1).numpy()
        for b, seed in enumerate(chunk.seeds):
            files = self.files(seed)
            image = pixels[b, ..., 0] if pixels.shape[-1] == 1 else pixels[b]
            write_atomic(self.root / files["image"], png_bytes(image))
            if files["map"]:
                from io import BytesIO

                buffer = BytesIO()
                np.save(buffer, maps[b].float().numpy())
                write_atomic(self.root / files["map"], buffer.getvalue())
                write_atomic(self.root / files["heatmap"], png_bytes(heatmap(maps[b])))
            for key in INTERVAL_MAPS if "width" in files else ():
                write_atomic(self.root / files[key], npy_bytes(intervals[key][b]))
        record = {"chunk": chunk.index, "seeds": chunk.seeds,
                  "scores": None if scores is None else [float(s) for s in scores],
                  "nfe": int(nfe), "seconds": float(seconds), **(extras or {})}
        write_atomic(self.record_path(chunk), json.dumps(record).encode())

    def read_record(self, chunk: Chunk) -> dict:
        """Chunk `chunk`'s record, checked to be this chunk's (its seeds, one score each); an InputError
        naming the file otherwise (an edited or foreign file: deleting it makes a re-run redo the chunk)."""
        path = self.record_path(chunk)
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            if record.get("seeds") != chunk.seeds:
                raise ValueError(f"its seeds are not the chunk's {chunk.seeds[0]}..{chunk.seeds[-1]}")
            scores = record.get("scores")
            if scores is not None and (not isinstance(scores, list) or len(scores) != len(chunk.seeds)):
                raise ValueError(f"it does not hold one score per seed")
        except (OSError, ValueError) as error:
            raise InputError(f"{path} is not the record of chunk {chunk.index} ({type(error).__name__}: {error}); "
                             f"delete it and repeat the command to generate that chunk again") from None
        return record

    def records(self) -> list[dict]:
        return [self.read_record(c) for c in self.chunks]

    def finish(self) -> dict:
        """All chunks done: write manifest.csv (filtering by `drop_fraction`), grid.png, dropped.png.
        Returns the run's summary (also written as summary.json)."""
        records = self.records()
        seeds = [s for r in records for s in r["seeds"]]
        has_scores = records[0]["scores"] is not None
        scores = torch.tensor([s for r in records for s in r["scores"]], dtype=torch.float64) if has_scores else None
        p = self.settings["drop_fraction"]
        kept = keep_best(scores, p) if (has_scores and p) else torch.ones(len(seeds), dtype=torch.bool)
        non_finite = ~torch.isfinite(scores) if has_scores else torch.zeros(len(seeds), dtype=torch.bool)
        kept &= ~non_finite  # a NaN score says nothing about the sample: never keep it

        extra = list(INTERVAL_MAPS) if self.settings.get("intervals") else []
        lines = [["index", "seed", "image", "map", "heatmap", *extra, "score", "kept"]]
        for i, seed in enumerate(seeds):
            f = self.files(seed)
            lines.append([i, seed, f["image"], f["map"], f["heatmap"], *(f[key] for key in extra),
                          repr(float(scores[i])) if has_scores else "", int(kept[i])])
        write_atomic(self.root / "manifest.csv", "".join(",".join(map(str, row)) + "\n" for row in lines).encode())

        self.write_grid("grid.png", seeds[:GRID_SAMPLES])
        dropped = [seeds[i] for i in torch.argsort(scores, descending=True, stable=True).tolist() if not kept[i]] \
            if has_scores else []
        if dropped:
            self.write_grid("dropped.png", dropped[:GRID_SAMPLES])
        summary = {"samples": len(seeds), "kept": int(kept.sum()), "dropped": len(seeds) - int(kept.sum()),
                   "nfe_per_image": sum(r["nfe"] for r in records) / len(seeds),
                   "seconds_per_image": sum(r["seconds"] for r in records) / len(seeds)}
        if non_finite.any():
            summary["non_finite_scores"] = int(non_finite.sum())
            print(f"warning: {summary['non_finite_scores']} of {len(seeds)} samples in {self.root} have a score that is "
                  f"not a finite number (NaN or inf): the model or its options are broken; those samples are marked "
                  f"dropped, never kept (manifest.csv)", file=sys.stderr, flush=True)
        write_atomic(self.root / "summary.json", json.dumps(summary, indent=2).encode())
        return summary

    def write_grid(self, name: str, seeds: list[int]) -> None:
        images, maps = [], []
        for seed in seeds:
            f = self.files(seed)
            images.append(np.asarray(Image.open(self.root / f["image"])))
            maps.append(np.asarray(Image.open(self.root / f["heatmap"])) if f["heatmap"] else None)
        write_atomic(self.root / name, png_bytes(pair_grid(images, maps)))

    # ------------------------------------------------------------------------------ reading

    def manifest(self) -> list[dict]:
        with open(self.root / "manifest.csv", newline="") as f:
            return list(csv.DictReader(f))

    def load_images(self) -> torch.Tensor:
        """All samples, in seed order, as float `[N, C, H, W]` in [-1, 1] (from the PNGs)."""
        pixels = [np.asarray(Image.open(self.root / self.files(s)["image"])) for c in self.chunks for s in c.seeds]
        x = torch.from_numpy(np.stack(pixels))
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return from_uint8(x)

    def record_values(self, key: str) -> Optional[list]:
        """The per-sample list `key` of every chunk's record (from `write_chunk`'s `extras`), in seed
        order; None when a record lacks it (a run written before it was recorded)."""
        records = self.records()
        if any(r.get(key) is None for r in records):
            return None
        return [v for r in records for v in r[key]]

    def load_scores(self) -> Optional[torch.Tensor]:
        records = self.records()
        if records[0]["scores"] is None:
            return None
        return torch.tensor([s for r in records for s in r["scores"]], dtype=torch.float64)
