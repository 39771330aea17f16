"""`python train.py fit --config configs/cifar.yaml`: LightningCLI with uncdiff's run layout.

A run lives in `trainer.default_root_dir` (the configs set it): checkpoints in `checkpoints/`,
W&B files in `wandb/`, sample grids in `samples/`, and each invocation's full config as
`config-<time>.yaml`. A new `fit` into a directory that already holds checkpoints is refused
(resume with `--ckpt_path last` or pick another directory), so nothing is overwritten. `fit` locks
the run directory for its whole run (`uncdiff.io.lock`): a second `fit` into it is refused. Resuming
with `--ckpt_path last` needs a `last.ckpt` (never a silent restart from step 0), and clears the
temporary files of checkpoint writes a kill interrupted. The model's image size, channels and task
are the data's (`LINKED`).
"""

import re
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Optional, Sequence

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from uncdiff.io.files import InputError, load_torch, remove_temporary_files
from uncdiff.io.lock import lock_folder
from uncdiff.io.space import check_free_space, run_directory_files
from uncdiff.lightning.wandb_logger import WANDB_RUN_ID_KEY

CONFIG_DIR = Path(str(files("uncdiff.configs")))  # configs/, installed as package data
# --ckpt_path values Lightning resolves itself rather than as a file path
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
# The model options that are the data's, linked when the classes are built (`add_arguments_to_parser`):
# name -> (the data module's attribute, its value for the model, where it comes from)
LINKED = {
    "image_size": ("image_shape", lambda shape: shape[-1], "data.init_args.image_size (image-to-image data: "
                                                          "data.init_args.data.init_args.image_size)"),
    "in_channels": ("image_shape", lambda shape: shape[0], "the data module's images"),
    "task": ("task", lambda task: task.name, "data.init_args.task"),
}


def resolve_config_args(argv: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """Let `--config cifar.yaml` name a file in configs/ when no such path exists here."""
    out, expect = [], False
    for arg in argv:
        if expect or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if arg.startswith("--config=") else arg
            if not Path(value).exists() and (config_dir / value).exists():
                value = str(config_dir / value)
            arg = f"--config={value}" if arg.startswith("--config=") else value
        expect = arg == "--config"
        out.append(arg)
    return out


class SaveRunConfig(SaveConfigCallback):
    """Writes this invocation's config next to the run (never over an earlier one) and logs it."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": self.config.as_dict()})


class UncdiffCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        kwargs.setdefault("save_config_kwargs", {"config_filename": f"config-{stamp}.yaml"})
        kwargs.setdefault("trainer_defaults", {  # checkpoints written atomically, loaded weights_only
            "use_distributed_sampler": False,
            "plugins": {"class_path": "uncdiff.lightning.checkpoint_io.SafeCheckpointIO"}})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        """The model's image size, channels and task are the data's (`LINKED`): each is stated once."""
        for name, (attribute, value, _) in LINKED.items():
            parser.link_arguments(f"data.{attribute}", f"model.init_args.{name}", compute_fn=value,
                                  apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        """jsonargparse would accept a linked model option and build the model with the data's value; refuse
        it instead, naming it (a second parse, without defaults, shows what the config and command gave)."""
        super().parse_arguments(parser, args)
        given = (parser.parse_object(args, defaults=False) if isinstance(args, (dict, Namespace))
                 else parser.parse_args(args, defaults=False))
        model = given.get(f"{given.subcommand}.model") if given.get("subcommand") else None
        for name, (_, _, where) in LINKED.items():
            if model is not None and model.get(f"init_args.{name}") is not None:
                raise InputError(f"model option {name}: the model's {name} is the data's, linked by the CLI: remove "
                                 f"it from the model's options; it comes from {where}")

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path FILE`'s hyperparameters over the config's, for the model class the config names.

        Lightning's own version takes the class from the checkpoint (`_class_path`, which our checkpoints
        don't carry: nothing is imported by a name read from a file) and else parses an image-to-image
        model's hyperparameters as a `DiffusionModule`'s. `ckpt_hparams` checks the file first.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        hparams = {k: v for k, v in ckpt_hparams(ckpt_path).items() if k not in LINKED}  # the data's
        if not hparams:
            return
        model = self.config[subcommand].model
        update = {subcommand: {"model": {"class_path": model.class_path, "init_args": hparams}}}
        try:
            self.config = self.parser.parse_object(update, self.config)
        except SystemExit:
            sys.stderr.write(f"error: --ckpt_path {ckpt_path}: its hyperparameters (above) don't fit the config's "
                             f"model {model.class_path}: give the config the run was trained with\n")
            raise

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:  # a constructor's check of its options (--model.lr 0, ...): the user's
            raise InputError(constructor_error(str(error))) from error

    def before_instantiate_classes(self) -> None:
        """Point the logger and checkpoints into the run directory unless set explicitly."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or "runs/default"
        config.trainer.default_root_dir = root
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if hasattr(logger, "init_args") and "save_dir" in logger.init_args and logger.init_args.save_dir in (None, "."):
                logger.init_args.save_dir = root
        for callback in config.trainer.callbacks or []:
            if callback.class_path.endswith("ModelCheckpoint") and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = str(Path(root) / "checkpoints")
        if self.subcommand == "fit":
            continue_wandb_run(config)

    def before_fit(self) -> None:
        """Check that the run directory's disk has room for the checkpoints (`run_directory_files`), lock
        it (`lock_folder`: one run writes into it at a time; after the model is built, so that a model that
        can't be built leaves no folder), then check what is in it."""
        if self.trainer.max_steps == 0:
            raise InputError("--trainer.max_steps 0 trains nothing and saves nothing: give a number of steps, or -1 "
                             "for --trainer.max_epochs alone")
        existing = [path for folder in checkpoint_dirs(self.trainer) for path in folder.glob("*.ckpt")]
        check_free_space(self.trainer.default_root_dir, run_directory_files(
            self.model, self.trainer.checkpoint_callbacks, self.trainer.max_steps, existing), "--trainer.default_root_dir")
        self.run_lock = lock_folder(self.trainer.default_root_dir, "--trainer.default_root_dir")
        ckpt_path = self.config.fit.get("ckpt_path")
        for folder in checkpoint_dirs(self.trainer):
            remove_temporary_files(folder)  # of writes a kill interrupted (the lock says no run is writing)
        refuse_to_overwrite(self.trainer.checkpoint_callbacks, ckpt_path)
        if ckpt_path == "last":
            require_last_checkpoint(checkpoint_dirs(self.trainer))


def ckpt_hparams(ckpt_path: Optional[str]) -> dict:
    """The model hyperparameters of the checkpoint file `ckpt_path`, without LightningCLI's private keys
    (`_class_path`, `_instantiator`: never trusted). Exits with a message naming `--ckpt_path` when the
    file doesn't load with weights_only=True, before Lightning reads it (its own error would suggest
    weights_only=False). Names Lightning resolves itself ('last', 'best', URLs) are left to it (empty
    result); SafeCheckpointIO loads those."""
    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_NAMES or "://" in ckpt_path:
        return {}
    try:
        checkpoint = load_torch(ckpt_path, "checkpoint", mmap=True)
    except InputError as error:
        raise SystemExit(f"error: --ckpt_path: {error}") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    return {k: v for k, v in hparams.items() if not k.startswith("_")} if isinstance(hparams, dict) else {}


def constructor_error(message: str) -> str:
    """jsonargparse's report of a constructor's ValueError (nested in "Does not validate against any of
    the Union subtypes ...") as one line: the option group and the constructor's own message."""
    group = re.search(r"Subtypes: \[<class '[\w.]*?(\w+)'>", message)
    reason = next((line.strip()[2:] for line in message.splitlines()
                   if line.strip().startswith("- ") and not line.strip().startswith("- Expected a")), message)
    name = group.group(1) if group else ""
    option = "--data" if "DataModule" in name else "--model" if "Module" in name else "options"
    return f"{option} ({name}): {reason}" if name else f"{option}: {reason}"


def checkpoint_dirs(trainer) -> list[Path]:
    """The folders the trainer's ModelCheckpoint callbacks write to, those that exist. A callback without
    a dirpath writes to `<default_root_dir>/checkpoints` when there is no logger (with one, to a
    version folder of the logger's: not looked for)."""
    folders = [Path(c.dirpath) if c.dirpath else None if trainer.loggers else Path(trainer.default_root_dir) /
               "checkpoints" for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    return [folder for folder in folders if folder is not None and folder.is_dir()]


def require_last_checkpoint(folders: list[Path]) -> None:
    """`--ckpt_path last` resumes from a `last*.ckpt`; without one Lightning would only warn and start
    over from step 0 in the same run directory. Refuse instead, listing what is there."""
    if any(any(folder.glob("last*.ckpt")) for folder in folders):
        return
    present = sorted(p.name for folder in folders for p in folder.iterdir() if p.suffix == ".ckpt")
    raise InputError(f"--ckpt_path last: no last.ckpt in {', '.join(map(str, folders)) or 'the run directory'} "
                     f"(a run killed before its first last.ckpt was written?); its checkpoints: "
                     f"{', '.join(present) or 'none'}. Resume from one with --ckpt_path <that file>, or start "
                     f"a new run in another --trainer.default_root_dir")


def resumed_checkpoint(config) -> Optional[Path]:
    """The file `fit --ckpt_path` resumes from: the newest `last*.ckpt` of the ModelCheckpoint folders for
    'last', the file itself for a path; None for no resume (and for 'best', 'hpc' and URLs)."""
    ckpt_path = config.get("ckpt_path")
    if ckpt_path == "last":
        folders = [Path(c.init_args.dirpath) for c in config.trainer.callbacks or []
                   if c.class_path.endswith("ModelCheckpoint") and c.init_args.get("dirpath")]
        found = [p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt")]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None
    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_NAMES or "://" in ckpt_path:
        return None
    return Path(ckpt_path) if Path(ckpt_path).is_file() else None


def continue_wandb_run(config) -> None:
    """A resumed fit logs to the W&B run that wrote its checkpoint (the id the module saved there, with
    Lightning's resume="allow"), so one run's charts go on from the step they stopped at instead of
    starting a second run. A logger given an id of its own keeps it."""
    loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
    wandb = [logger for logger in loggers
             if getattr(logger, "class_path", "").endswith("WandbLogger") and not logger.init_args.get("id")]
    path = resumed_checkpoint(config) if wandb else None
    if path is None:
        return
    try:
        checkpoint = load_torch(path, "checkpoint", mmap=True)
    except InputError:
        return  # the resume itself reports it
    run_id = checkpoint.get(WANDB_RUN_ID_KEY) if isinstance(checkpoint, dict) else None
    if isinstance(run_id, str):
        for logger in wandb:
            logger.init_args.id = run_id


def refuse_to_overwrite(checkpoint_callbacks, ckpt_path: Optional[str]) -> None:
    """A fresh fit must not write over an earlier run's checkpoints."""
    if ckpt_path is not None:
        return
    for callback in checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath).is_dir():
            existing = sorted(Path(callback.dirpath).glob("*.ckpt"))
            if existing:
                raise SystemExit(
                    f"error: {callback.dirpath} already holds checkpoints of an earlier run "
                    f"({existing[0].name}, ...). Resume it with --ckpt_path last, or start a new run "
                    f"in another directory with --trainer.default_root_dir.")


def main(argv: Optional[Sequence[str]] = None) -> None:
    from uncdiff.lightning.module import DiffusionModule
    from lightning.pytorch import LightningDataModule

    if argv is None:  # rewrite sys.argv itself: LightningCLI warns when given both
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    else:
        argv = resolve_config_args(argv)
    # subclass mode: `model: {class_path: uncdiff.lightning.image_to_image.ImageToImageModule, ...}` picks the
    # image-to-image model; a plain `model:` mapping is a DiffusionModule as before
    UncdiffCLI(DiffusionModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, args=argv)
