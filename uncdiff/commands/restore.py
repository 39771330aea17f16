"""`uncdiff restore` (= `python train.py restore`): restore a folder of condition images with an
image-to-image checkpoint (docs/image_to_image.md), with uncertainty maps, scores and filtering, on every
process of the machine or cluster, resumable.

    uncdiff restore --checkpoint runs/inpaint_quickstart/checkpoints/last.ckpt --out restored/digits \\
        --conditions my_digits/ --masks my_masks/ --sampler.steps 50 --estimator.name aleatoric

The images of `--conditions` (sorted by file name; 8-bit grey for a 1-channel model, RGB for a
3-channel one, of the model's size) are restored one output each: image i (from 0) with seed
`--seed + i`. Inpainting and uncropping need `--masks`: one mask per condition image under the same
file name, white (255) where the model generates and black (0) where the condition's pixels are
kept; the pixels to generate are replaced by noise from the sample's seed, as in training, and the
maps and scores count only them. `--estimator.name bayesdiff` uses the checkpoint's Laplace posterior, or
fits one on the first `--bayesdiff.laplace_images` (default 1000) training pairs of the run (its saved
config, or `--data.run_config`; the pairs its first training epoch builds) and caches it beside the
checkpoint as `sample` does. The output directory is `sample`'s (`uncdiff.io.sample_store`:
samples/<seed>.png, maps, scores, manifest.csv, grids, run.json, config.yaml) plus inputs.csv, which
names each output's condition and mask files. The seeds are cut into chunks of `--batch_size`
(one batch each, so outputs don't depend on the processes or on interruptions); a re-run of the
same command on the same files resumes, a different one is refused. Every input is checked before
the output directory is created.

With `--intervals FILE` (a calibration file of `calibrate_intervals`, docs/algorithms.md §8) each
output also gets its calibrated interval maps, samples/<seed>_lower.npy, _upper.npy and _width.npy
(float32 on the [-1, 1] scale; zero width at the known pixels), with the file's guarantee: a new
image's expected fraction of generated pixels outside [lower, upper] is <= its alpha, with
probability >= 1 - delta over the calibration set. A file made for another checkpoint, task,
heuristic, estimator or sampler is refused before any sampling; for the `samples` heuristic each
image costs K more restorations, with seeds `seed + k 2^28` (never an output's).
"""

import hashlib
import sys
from pathlib import Path
from typing import Optional

import torch
from jsonargparse import ArgumentParser, Namespace

from uncdiff.commands.options import (add_estimator_arguments, add_fabric_arguments, add_guidance_arguments,
                                      add_sampler_arguments, config_yaml, new_parser, parse_options, record_config)
from uncdiff.commands.runtime import (ModelInputs, attach_laplace, generate_run, make_fabric, prepare_model,
                                      print_run_summary, run_info)
from uncdiff.commands.settings import build_settings
from uncdiff.evaluation.intervals import restore_with_heuristic
from uncdiff.io.image_to_image import read_conditions, read_masks
from uncdiff.io.interval_calibration import check_calibration, read_calibration
from uncdiff.io.files import InputError, write_atomic
from uncdiff.io.sample_store import SampleStore
from uncdiff.io.space import check_free_space, sample_store_files
from uncdiff.lightning.image_to_image import ImageToImageModule
from uncdiff.lightning.loading import file_sha256
from uncdiff.uncertainty.intervals import SPREAD_SEED_STRIDE, interval_maps
from uncdiff.uncertainty.spec import LAPLACE_ESTIMATORS


def build_parser() -> ArgumentParser:
    parser = new_parser("uncdiff restore", __doc__)
    parser.add_argument("--checkpoint", type=str, required=True, help="an image-to-image checkpoint written by `fit`")
    parser.add_argument("--out", type=str, required=True, help="output directory (created; a re-run of the same "
                                                               "command resumes)")
    g = parser.add_argument_group("inputs")
    g.add_argument("--conditions", type=str, required=True, help="folder of condition images (sorted by name)")
    g.add_argument("--masks", type=Optional[str], default=None,
                   help="folder of masks, one per condition image under its file name (inpaint and uncrop only)")
    g.add_argument("--data.run_config", type=Optional[str], default=None,
                   help="the training run's config, whose training pairs BayesDiff's Laplace fit runs on (default: "
                        "the newest config-*.yaml in the checkpoint's run directory)")
    g.add_argument("--intervals", type=Optional[str], default=None,
                   help="a calibration file of `calibrate_intervals`: write each output's calibrated interval maps")
    add_fabric_arguments(parser)
    add_sampler_arguments(parser, n=None, n_help="restore the first n condition images (null: all of them); image i "
                                                 "gets seed seed+i")
    add_estimator_arguments(parser)
    add_guidance_arguments(parser)
    return parser


def images_sha256(pixels: torch.Tensor) -> str:
    """SHA-256 of uint8 images: a resumed run must restore the very same inputs."""
    return hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()


class FolderRestorer:
    """What `generate_run` samples from: `sample(seeds, batch_size, **options)` restores the condition
    images of those seeds (seed `first + i` is image i) with `module`."""

    def __init__(self, module: ImageToImageModule, pixels: torch.Tensor, masks: Optional[torch.Tensor],
                 first: int):
        self.module, self.pixels, self.masks, self.first = module, pixels, masks, first

    def inputs(self, seeds) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The conditions and masks of the images of `seeds`."""
        index = [s - self.first for s in seeds]
        mask = None if self.masks is None else self.masks[index]
        return self.module.conditions_from_pixels(self.pixels[index], mask, seeds), mask

    def sample(self, seeds, batch_size: int, **options):
        condition, mask = self.inputs(seeds)
        return self.module.sample(condition, mask, seeds=seeds, batch_size=batch_size, **options)


class WithIntervals:
    """A chunk's SampleResult with its interval maps (`intervals`, what `generate_run` writes) and the
    cost of the heuristic's extra restorations in `nfe`."""

    def __init__(self, result, intervals: dict, nfe: int):
        self.result, self.intervals, self.nfe = result, intervals, nfe

    def __getattr__(self, name: str):
        return getattr(self.result, name)


class IntervalRestorer(FolderRestorer):
    """`FolderRestorer` that also builds each output's calibrated intervals (`--intervals`): the
    heuristic of the calibration file around the output, times its lambda_hat."""

    def __init__(self, module: ImageToImageModule, pixels: torch.Tensor, masks: Optional[torch.Tensor], first: int,
                 intervals: dict):
        super().__init__(module, pixels, masks, first)
        self.heuristic, self.lam = intervals["heuristic"], intervals["lambda_hat"]

    def sample(self, seeds, batch_size: int, **options):
        condition, mask = self.inputs(seeds)

        def run(c, m, s, estimator):
            return self.module.sample(c, m, seeds=s, batch_size=batch_size, **{**options, "estimator": estimator})

        result, h = restore_with_heuristic(run, condition, mask, seeds, self.heuristic, options["estimator"])
        return WithIntervals(result, interval_maps(h.output, h.lower, h.upper, self.lam), round(h.nfe * len(seeds)))


def read_inputs(args: Namespace, module: ImageToImageModule) -> tuple[list[Path], torch.Tensor,
                                                                              Optional[torch.Tensor]]:
    """The condition files, their uint8 images `[N, C, H, W]` and masks `[N, 1, H, W]` (or None), checked
    against the model; the first `--n` of them when `--n` is given."""
    channels, size = module.image_shape[0], module.image_shape[-1]
    files, pixels = read_conditions(args.conditions, channels, size)
    if module.task.masked and args.masks is None:
        raise InputError(f"this {module.task.name} model needs --masks: a folder with one mask per condition image "
                         f"(white = generate, black = known)")
    if not module.task.masked and args.masks is not None:
        raise InputError(f"this {module.task.name} model takes no mask (only inpaint and uncrop do): drop --masks")
    masks = None if args.masks is None else read_masks(args.masks, files, size)
    if args.n is not None:
        if not 1 <= args.n <= len(files):
            raise InputError(f"--n must lie in [1, {len(files)}] (the images in --conditions), got {args.n}")
        files, pixels = files[:args.n], pixels[:args.n]
        masks = None if masks is None else masks[:args.n]
    return files, pixels, masks


def restore_settings(args: Namespace, inputs: ModelInputs, files: list[Path], pixels: torch.Tensor,
                     masks: Optional[torch.Tensor]) -> dict:
    """`sample`'s settings of this run (`build_settings`, every option checked; BayesDiff's Laplace source
    among them) and the inputs: the task and the condition and mask files with digests of their pixels
    (compared on resume)."""
    module = inputs.module
    if args.estimator.score != "sum":
        raise InputError("--estimator.score: an image-to-image score is the sum of the map over the generated pixels "
                         "(sum)")
    if args.guidance_table is not None:
        raise InputError("--guidance_table: threshold tables are calibrated on unconditional models; use the "
                         "per-image --guidance.quantile")
    args = args.clone()
    args.n = len(files)  # build_settings reads the seed count from --n
    settings = build_settings(args, module, inputs.sha256, laplace=inputs.laplace)
    settings["task"] = module.task.name
    settings["conditions"] = {"folder": str(Path(args.conditions).resolve()), "files": [p.name for p in files],
                              "pixels_sha256": images_sha256(pixels)}
    if masks is not None:
        settings["masks"] = {"folder": str(Path(args.masks).resolve()),
                             "pixels_sha256": images_sha256(masks.to(torch.uint8))}
    if args.intervals is not None:
        settings["intervals"] = intervals_settings(args.intervals, settings)
    return settings


def intervals_settings(path: str, settings: dict) -> dict:
    """The calibration file `--intervals`, checked to be made for this run (`settings`: checkpoint, task,
    sampler, and the estimator for a map heuristic), as the run's `intervals` settings."""
    record = read_calibration(path)
    heuristic, estimator = record["heuristic"], settings["estimator"]
    if settings["guidance"] is not None:
        raise InputError("--intervals: guidance changes the outputs the intervals were calibrated around; drop "
                         "--guidance.rule")
    made_for = {"checkpoint_sha256": settings["checkpoint_sha256"], "task": settings["task"]}
    if heuristic["name"] in ("samples", "constant"):
        if estimator["name"] == "bayesdiff":
            raise InputError(f"--intervals {path} was calibrated around the plain sampler's outputs ({heuristic['name']} "
                             f"heuristic), BayesDiff's are its own: use --estimator.name aleatoric, mc_dropout or none")
    else:
        made_for.update(heuristic={"name": estimator["name"]}, estimator=estimator)
    made_for["sampler"] = settings["sampler"]
    check_calibration(record, path, made_for)
    seeds = settings["seeds"]
    if heuristic["name"] == "samples" and seeds["start"] + seeds["count"] > SPREAD_SEED_STRIDE:
        raise InputError("--seed: with the samples heuristic the outputs' seeds must lie below 2**28 (the spread "
                         "samples' seeds lie above)")
    return {"file": str(Path(path).resolve()), "sha256": file_sha256(Path(path)), "heuristic": heuristic,
            "lambda_hat": record["lambda_hat"], "alpha": record["alpha"], "delta": record["delta"]}


def write_inputs_table(store: SampleStore) -> None:
    """`inputs.csv`: each output's seed, file and its condition and mask files."""
    settings = store.settings
    start, names = settings["seeds"]["start"], settings["conditions"]["files"]
    masks = settings.get("masks")
    lines = ["seed,image,condition,mask\n"]
    for i, name in enumerate(names):
        condition = str(Path(settings["conditions"]["folder"]) / name)
        mask = str(Path(masks["folder"]) / name) if masks else ""
        lines.append(f"{start + i},{store.files(start + i)['image']},{condition},{mask}\n")
    write_atomic(store.root / "inputs.csv", "".join(lines).encode())


def _run(fabric, args: Namespace, inputs: ModelInputs, restorer: FolderRestorer, store: SampleStore,
         info: dict, config: str) -> None:
    inputs.module.to(fabric.device)
    attach_laplace(fabric, inputs)  # BayesDiff: rank 0 fits (or reads) the posterior, the others read its cache
    if fabric.is_global_zero:
        store.create(info)
        record_config(store.root, config)
    summary = generate_run(fabric, restorer, store, info, progress=args.progress, desc="restoring")
    if summary is not None:
        write_inputs_table(store)
        print_run_summary(summary, store.root, "restored images", "manifest.csv, inputs.csv, grid.png")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_options(parser, argv)
    try:
        inputs = prepare_model(args, needs_laplace=args.estimator.name in LAPLACE_ESTIMATORS, image_to_image=True)
        files, pixels, masks = read_inputs(args, inputs.module)
        settings = restore_settings(args, inputs, files, pixels, masks)
        store = SampleStore(args.out, settings)
        check_free_space(args.out, sample_store_files(store, inputs.module.image_shape))
        store.check()
    except InputError as error:
        sys.exit(f"error: {error}")
    info = run_info(["restore", *argv], inputs.checkpoint)
    start = settings["seeds"]["start"]
    restorer = FolderRestorer(inputs.module, pixels, masks, start) if args.intervals is None else \
        IntervalRestorer(inputs.module, pixels, masks, start, settings["intervals"])
    make_fabric(args.fabric).launch(_run, args, inputs, restorer, store, info, config_yaml(parser, args))


if __name__ == "__main__":
    main()
