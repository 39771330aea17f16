"""How a command runs: the checked model inputs (`prepare_model`), Lightning Fabric, BayesDiff's
posterior on every process, the generation loop over a `SampleStore`'s missing chunks, and what a
run records of itself (the command as typed) and prints at the end.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from jsonargparse import Namespace

from uncdiff.commands.settings import sample_kwargs
from uncdiff.io.files import InputError
from uncdiff.io.sample_store import SampleStore
from uncdiff.lightning.loading import (file_sha256, image_to_image_data, laplace_cached, laplace_source, load_module,
                                       load_or_fit_laplace, training_data)


@dataclass
class ModelInputs:
    """The checked checkpoint, and the data to fit a Laplace posterior on when one is needed."""

    module: Any
    checkpoint: Path
    sha256: str
    laplace: Optional[dict] = None
    datamodule: Any = None


def prepare_model(args: Namespace, needs_laplace: bool, needs_data: bool = False,
                  image_to_image: bool = False) -> ModelInputs:
    """Load and check the checkpoint (an image-to-image one with `image_to_image`); when BayesDiff runs,
    decide its Laplace posterior and make sure either its cache or the training data is there; the
    training data also when `needs_data`. Writes nothing."""
    checkpoint = Path(args.checkpoint)
    module = load_module(checkpoint, image_to_image)
    sha = file_sha256(checkpoint)
    laplace = laplace_source(module, args.bayesdiff.laplace_images) if needs_laplace else None
    data = None
    fit = laplace is not None and laplace["source"] == "fit" and not laplace_cached(checkpoint, sha, laplace)
    if image_to_image and (needs_data or fit):
        try:
            data, _ = image_to_image_data(module, checkpoint, args.data.run_config)
        except InputError as error:
            raise InputError(f"BayesDiff fits its Laplace posterior on the run's training pairs: {error}"
                             if fit else str(error)) from None
    elif needs_data or fit:
        data = training_data(module, checkpoint, args.data.name, args.data.root, args.data.run_config)
    return ModelInputs(module, checkpoint, sha, laplace, data)


def attach_laplace(fabric, inputs: ModelInputs) -> None:
    """Rank 0 loads or fits (and caches) the Laplace posterior, then the others read the cache."""
    if inputs.laplace is None:
        return
    if fabric.is_global_zero:
        load_or_fit_laplace(inputs.module, inputs.checkpoint, inputs.sha256, inputs.laplace, inputs.datamodule)
    fabric.barrier()
    if not fabric.is_global_zero:
        load_or_fit_laplace(inputs.module, inputs.checkpoint, inputs.sha256, inputs.laplace, is_writer=False)


def make_fabric(options: Namespace):
    """Lightning Fabric from the `fabric` options; an InputError naming them when Fabric refuses them."""
    from lightning.fabric import Fabric
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    devices = int(options.devices) if str(options.devices).isdigit() else options.devices
    try:
        return Fabric(accelerator=options.accelerator, devices=devices, num_nodes=options.num_nodes,
                      strategy=options.strategy)
    except (ValueError, MisconfigurationException) as error:
        raise InputError(f"--fabric.*: {error}") from None


def typed_command(command: list[str]) -> list[str]:
    """The command line as the user typed it: the program as it was started (`uncdiff`, `python
    train.py`, `python -m uncdiff`), then `command` (the command's name and its arguments)."""
    started = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("uncdiff")
    if started.name == "__main__.py":  # python -m <package>
        return ["python", "-m", started.parent.name, *command]
    program = started.name
    return ["python", program, *command] if program.endswith(".py") else [program, *command]


def run_info(command: list[str], checkpoint: Path) -> dict:
    """What ran the run, for the record (not compared on resume): `command` is the command's name and
    its arguments."""
    return {"checkpoint": str(checkpoint.resolve()), "command": typed_command(command),
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def print_run_summary(summary: dict, root: Path, noun: str, files: str) -> None:
    """One line on what a finished `generate_run` wrote and what it cost."""
    kept = f", {summary['dropped']} marked dropped (dropped.png)" if summary["dropped"] else ""
    print(f"wrote {summary['samples']} {noun} to {root} ({files}{kept}); "
          f"{summary['nfe_per_image']:.0f} network evaluations and {summary['seconds_per_image']:.3g} s per image")


def per_sample_values(result) -> dict:
    """What a chunk's record keeps per sample beyond its score, for the per-sample study
    (docs/algorithms.md §6b): `|x_T|^2`, and the per-step totals of `U_t` with their step indices."""
    values = {"noise_norm": [float(v) for v in result.noise_norms]}
    if result.step_totals is not None:
        values.update(step_totals=[[float(v) for v in row] for row in result.step_totals],
                      total_steps=[list(result.total_steps)] * len(result.step_totals))
    return values


def generate_run(fabric, module, store: SampleStore, info: dict, progress: bool = True, desc: str = "sampling",
                 warm_up: bool = False) -> Optional[dict]:
    """Generate the missing chunks of `store` on all processes; rank 0 then writes the manifest and
    grids and returns the run's summary (the other ranks return None). `warm_up` first samples one
    image untimed (lazy initialisation), so that seconds per image compare across runs."""
    from tqdm.auto import tqdm

    rank, world = fabric.global_rank, fabric.world_size
    if fabric.is_global_zero:
        store.create(info)
    fabric.barrier()
    todo = store.missing()
    fabric.barrier()  # every rank has listed the work before anyone writes
    total = store.settings["seeds"]["count"]
    left = sum(len(c.seeds) for c in todo)
    if fabric.is_global_zero:
        print(f"{desc}: {total} samples in {store.root}: {total - left} already written, {left} to generate "
              f"on {world} process(es)", flush=True)
    bar = tqdm(total=total, initial=total - left, desc=desc, unit="img", disable=not (progress and rank == 0))
    kwargs = sample_kwargs(store.settings)
    mine = todo[rank::world]
    if mine and warm_up:
        module.sample(seeds=mine[0].seeds[:1], **kwargs)
    for chunk in mine:
        start = time.perf_counter()
        result = module.sample(seeds=chunk.seeds, batch_size=len(chunk.seeds), **kwargs)
        store.write_chunk(chunk, result.images, result.maps, result.scores, result.nfe, time.perf_counter() - start,
                          per_sample_values(result), intervals=getattr(result, "intervals", None))
        bar.update(store.done_samples() - bar.n)  # all ranks' finished chunks, as seen on disk
    fabric.barrier()
    bar.update(total - bar.n)
    bar.close()
    return store.finish() if fabric.is_global_zero else None
