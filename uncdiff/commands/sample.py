"""`uncdiff sample` (= `python train.py sample`): N samples from a `fit` checkpoint, with uncertainty
maps, scores and filtering, on every process of the machine or cluster, resumable.

    uncdiff sample --checkpoint runs/quickstart/checkpoints/last.ckpt --out samples/quick \\
        --n 1000 --sampler.steps 20 --estimator.name aleatoric --filtering.drop_fraction 0.1667
    uncdiff sample --config my-sampling.yaml       # written by --print_config, then edited

Lightning Fabric runs one process per device (all GPUs by default; torchrun and SLURM work the
same way). The seeds are cut into chunks of `--batch_size` (see `uncdiff.io.sample_store`); the
chunks still missing are dealt round-robin to the processes, each writes its own samples' files,
and rank 0 writes the manifest and grids at the end. Every input is checked before the output
directory is created; it records the run's full config as config.yaml. A re-run of the same
command resumes, a different one is refused.
"""

import sys
from typing import Optional

from jsonargparse import ArgumentParser, Namespace

from uncdiff.commands.options import (add_estimator_arguments, add_guidance_arguments, add_model_arguments,
                                      add_sampler_arguments, config_yaml, new_parser, parse_options, record_config)
from uncdiff.commands.runtime import (ModelInputs, attach_laplace, generate_run, make_fabric, prepare_model,
                                      print_run_summary, run_info)
from uncdiff.commands.settings import build_settings
from uncdiff.io.files import InputError
from uncdiff.io.sample_store import SampleStore
from uncdiff.io.space import check_free_space, sample_store_files
from uncdiff.uncertainty.spec import LAPLACE_ESTIMATORS


def build_parser() -> ArgumentParser:
    parser = new_parser("uncdiff sample", __doc__)
    add_model_arguments(parser, "output directory (created; a re-run of the same command resumes)")
    add_sampler_arguments(parser)
    add_estimator_arguments(parser)
    add_guidance_arguments(parser)
    return parser


def _run(fabric, args: Namespace, inputs: ModelInputs, store: SampleStore, info: dict, config: str) -> None:
    inputs.module.to(fabric.device)
    attach_laplace(fabric, inputs)
    if fabric.is_global_zero:
        store.create(info)
        record_config(store.root, config)
    summary = generate_run(fabric, inputs.module, store, info, progress=args.progress)
    if summary is not None:
        print_run_summary(summary, store.root, "samples", "manifest.csv, grid.png")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_options(parser, argv)
    try:
        inputs = prepare_model(args, needs_laplace=args.estimator.name in LAPLACE_ESTIMATORS)
        settings = build_settings(args, inputs.module, inputs.sha256, inputs.laplace)
        store = SampleStore(args.out, settings)
        check_free_space(args.out, sample_store_files(store, inputs.module.image_shape))
        store.check()
    except InputError as error:
        sys.exit(f"error: {error}")
    make_fabric(args.fabric).launch(_run, args, inputs, store, run_info(["sample", *argv], inputs.checkpoint),
                                    config_yaml(parser, args))


if __name__ == "__main__":
    main()
