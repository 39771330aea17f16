"""`uncdiff <command>` (the console script), `python -m uncdiff <command>` and `python train.py <command>`:
one entry point for every command.

    uncdiff fit --config quickstart.yaml          # train (LightningCLI; also validate)
    uncdiff sample --checkpoint CKPT --out DIR    # samples, uncertainty maps, scores, filtering
    uncdiff calibrate --checkpoint CKPT --out tau.pt
    uncdiff evaluate --checkpoint CKPT --out DIR  # the paper's experiments, as a report
    uncdiff export --checkpoint CKPT --out DIR    # a diffusers DDPMPipeline folder
    uncdiff restore --checkpoint CKPT --conditions DIR [--masks DIR] --out DIR   # image-to-image outputs, maps
    uncdiff evaluate_image_to_image --checkpoint CKPT --out DIR   # image-to-image: uncertainty vs the real error, a report
    uncdiff calibrate_intervals --checkpoint CKPT --out FILE.json  # image-to-image: guaranteed intervals' lambda-hat

`uncdiff <command> --help` lists a command's options; docs/cli.md describes them all.

A user's mistake (a bad option or input file, a folder that can't be written, a full disk, an output
folder another run holds) ends in one line on stderr, `error: ...`, naming the option or file and
the fix: exit status 2 for a command that can't run as given, 1 for a run that failed. `--debug`
(anywhere on the command line) or `UNCDIFF_DEBUG=1` shows the traceback instead. Anything else is a
bug and keeps its traceback.
"""

import errno
import importlib
import os
import sys
import traceback
from typing import Optional, Sequence

# commands of our own; every other first word goes to LightningCLI (fit, validate, ...)
COMMANDS = {"sample": "uncdiff.commands.sample", "calibrate": "uncdiff.commands.calibrate",
            "evaluate": "uncdiff.commands.evaluate", "export": "uncdiff.commands.export",
            "restore": "uncdiff.commands.restore", "evaluate_image_to_image": "uncdiff.commands.evaluate_image_to_image",
            "calibrate_intervals": "uncdiff.commands.calibrate_intervals"}
SUMMARY = {
    "fit": "train a model (LightningCLI: --config quickstart.yaml, --trainer.*, --model.*, --data.*)",
    "validate": "validate a checkpoint (LightningCLI, as fit, with --ckpt_path)",
    "sample": "N samples from a checkpoint, with uncertainty maps, scores and filtering (resumable)",
    "calibrate": "the threshold table of guided sampling, from unguided samples",
    "evaluate": "the paper's experiments on a checkpoint (FID, precision / recall, AUSE, cost) as a report",
    "export": "a trained diffusers-UNet model as a diffusers DDPMPipeline folder (safetensors)",
    "restore": "image-to-image: restore a folder of condition images (and masks), with uncertainty maps (resumable)",
    "evaluate_image_to_image": "image-to-image: L1/PSNR, FID, diversity, AUSE of the maps vs the real error, and "
                               "guaranteed intervals, as a report",
    "calibrate_intervals": "image-to-image: lambda-hat of guaranteed per-pixel intervals, for restore --intervals",
}


def usage(prog: str) -> str:
    width = max(map(len, SUMMARY))
    lines = [f"usage: {prog} <command> [options]   ({prog} <command> --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUMMARY.items()]
    lines += ["", "Every command takes --config FILE.yaml and --print_config; see docs/cli.md."]
    return "\n".join(lines)


USAGE_STATUS, RUN_STATUS = 2, 1
# errnos of a path that names nothing usable: the command as given can't run
MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)


def user_error(error: BaseException) -> Optional[tuple[str, int]]:
    """`(one line, exit status)` for the errors a user causes and can fix; None for a bug."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from uncdiff.io.files import InputError
    from uncdiff.io.lock import OutputInUse

    if isinstance(error, (InputError, MisconfigurationException)):
        return one_line(error), USAGE_STATUS
    if isinstance(error, OutputInUse):
        return one_line(error), RUN_STATUS
    if isinstance(error, OSError) and error.errno is not None:
        name = f": {error.filename}" if error.filename else ""
        if error.errno == errno.ENOSPC:
            return (f"no space left on the device{name}: free some space and repeat the command (sample and restore "
                    f"go on where they stopped)"), RUN_STATUS
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"{error.strerror}{name}: choose a folder you can write (another --out)", RUN_STATUS
        if error.errno in MISSING:
            return f"{error.strerror}{name}", USAGE_STATUS
        return f"{error.strerror}{name}", RUN_STATUS
    if isinstance(error, OSError) and str(error):  # raised with a message of our own (no errno)
        return one_line(error), RUN_STATUS
    return None


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the command `argv[0]` (default: the process's command line) with the rest of `argv`; a
    user's error ends the process with one line and exit status 2 or 1 (module docstring)."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or os.environ.get("UNCDIFF_DEBUG", "") not in ("", "0")
    if "--debug" in args:
        args = [arg for arg in args if arg != "--debug"]
        if argv is None:
            sys.argv[1:] = args  # LightningCLI reads sys.argv itself
    try:
        run(args, from_sys_argv=argv is None)
    except SystemExit as exit_:
        if not isinstance(exit_.code, str):
            raise
        if debug and exit_.__context__ is not None:  # the error a command turned into its message
            traceback.print_exception(exit_.__context__)
        print(one_line(exit_.code), file=sys.stderr)  # a command's own `sys.exit("error: ...")`: a usage error
        sys.exit(USAGE_STATUS)
    except Exception as error:
        known = None if debug else user_error(error)
        if known is None:
            raise
        print(f"error: {known[0]}", file=sys.stderr)
        sys.exit(known[1])


def run(args: list[str], from_sys_argv: bool) -> None:
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
    lightning_main(None if from_sys_argv else args)


if __name__ == "__main__":
    main()
