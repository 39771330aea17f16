"""`uncdiff export` (= `python train.py export`): a trained model as a diffusers pipeline folder.

    uncdiff export --checkpoint runs/digits-unet2d/checkpoints/last.ckpt --out models/digits-ddpm

writes a `DDPMPipeline` folder that `diffusers.DDPMPipeline.from_pretrained` loads and samples:
`model_index.json`, `unet/` (the UNet2DModel config and the EMA weights, the ones `sample` uses, as
safetensors) and `scheduler/` (a `DDPMScheduler` config of the model's noise schedule: the
pretrained folder's scheduler config for a fine-tuned model, else the diffusers schedule with the
same betas, x0 clipped to [-1, 1] and variance fixed_small, uncdiff's sampler defaults).

Only models whose network is a diffusers `UNet2DModel` export (`model.diffusers_unet` or
`model.pretrained` in the `fit` config, or a pipeline folder): uncdiff's own U-Net has its own
layer layout, which `UNet2DModel` can't hold. A BayesDiff posterior stored in the checkpoint is not
part of a pipeline and is left out. The folder is written beside `--out` and renamed into place;
an existing `--out` is never overwritten.
"""

import sys
from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentParser

from uncdiff.commands.options import new_parser, parse_options
from uncdiff.io.diffusers_pipeline import DiffusersEps, ddpm_scheduler_config, save_pipeline
from uncdiff.io.files import InputError
from uncdiff.lightning.loading import load_module


def build_parser() -> ArgumentParser:
    parser = new_parser("uncdiff export", __doc__)
    parser.add_argument("--checkpoint", type=str, required=True,
                        help="a checkpoint written by `fit` (or a diffusers model folder)")
    parser.add_argument("--out", type=str, required=True, help="the pipeline folder to write (never overwritten)")
    return parser


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the model of `checkpoint` as a `DDPMPipeline` folder `out`; InputError for a model that
    can't be exported or an `out` that exists, before anything is written."""
    out = Path(out)
    if out.exists():
        raise InputError(f"--out: {out} exists; export never writes over it (delete it or choose another --out)")
    module = load_module(checkpoint)
    net = module.ema.ema_model
    if not isinstance(net, DiffusersEps):
        raise InputError(f"{checkpoint}: its network is uncdiff's own U-Net ({type(net).__name__}), whose layer "
                         f"layout has no diffusers UNet2DModel counterpart, so it can't be exported as a pipeline; "
                         f"models trained with model.diffusers_unet or model.pretrained export "
                         f"(docs/diffusers.md)")
    scheduler_config = ddpm_scheduler_config(module.schedule, module.hparams.get("diffusers_scheduler"))
    return save_pipeline(net, scheduler_config, out)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_options(build_parser(), argv)
    try:
        out = export(args.checkpoint, args.out)
    except InputError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {out}: a DDPMPipeline (unet/ with the EMA weights as safetensors, scheduler/ with the noise "
          f"schedule); load it with diffusers.DDPMPipeline.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
