"""`uncdiff <command>` (the console script), `python -m uncdiff <command>` and `python train.py <command>`:
one entry point for every command.

    uncdiff fit --config quickstart.yaml          # train (LightningCLI; also validate)
    uncdiff sample --checkpoint CKPT --out DIR    # samples, uncertainty maps, scores, filtering
    uncdiff calibrate --checkpoint CKPT --out tau.pt
    uncdiff evaluate --checkpoint CKPT --out DIR  # the paper's experiments, as a report
    uncdiff export --checkpoint CKPT --out DIR    # a diffusers DDPMPipeline folder
    uncdiff restore --checkpoint CKPT --conditions DIR [--masks DIR] --out DIR   # image-to-image outputs, maps
    uncdiff evaluate_i2i --checkpoint CKPT --out DIR   # image-to-image: uncertainty vs the real error, a report

`uncdiff <command> --help` lists a command's options; docs/cli.md describes them all.
"""

import importlib
import sys
from typing import Optional, Sequence

# commands of our own; every other first word goes to LightningCLI (fit, validate, ...)
COMMANDS = {"sample": "uncdiff.commands.sample", "calibrate": "uncdiff.commands.calibrate",
            "evaluate": "uncdiff.commands.evaluate", "export": "uncdiff.commands.export",
            "restore": "uncdiff.commands.restore", "evaluate_i2i": "uncdiff.commands.evaluate_i2i"}
SUMMARY = {
    "fit": "train a model (LightningCLI: --config quickstart.yaml, --trainer.*, --model.*, --data.*)",
    "validate": "validate a checkpoint (LightningCLI, as fit, with --ckpt_path)",
    "sample": "N samples from a checkpoint, with uncertainty maps, scores and filtering (resumable)",
    "calibrate": "the threshold table of guided sampling, from unguided samples",
    "evaluate": "the paper's experiments on a checkpoint (FID, precision / recall, AUSE, cost) as a report",
    "export": "a trained diffusers-UNet model as a diffusers DDPMPipeline folder (safetensors)",
    "restore": "image-to-image: restore a folder of condition images (and masks), with uncertainty maps (resumable)",
    "evaluate_i2i": "image-to-image: L1/PSNR, FID, diversity, and AUSE of the maps vs the real error, as a report",
}


def usage(prog: str) -> str:
    width = max(map(len, SUMMARY))
    lines = [f"usage: {prog} <command> [options]   ({prog} <command> --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUMMARY.items()]
    lines += ["", "Every command takes --config FILE.yaml and --print_config; see docs/cli.md."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the command `argv[0]` (default: the process's command line) with the rest of `argv`."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage("uncdiff"))
        if not args:
            sys.exit(2)
        return
    if args[0] in COMMANDS:
        importlib.import_module(COMMANDS[args[0]]).main(args[1:])
        return
    from uncdiff.lightning.cli import main as lightning_main

    # LightningCLI reads sys.argv itself when given no argv (and warns when given both)
    lightning_main(None if argv is None else args)


if __name__ == "__main__":
    main()
