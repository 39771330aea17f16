"""What the commands (`sample`, `calibrate`, `evaluate`) share: their options, the inputs they read
before they generate anything, the settings that define a sampling run, and the generation loop.

- Options: each command is a jsonargparse parser, configured like `fit`: `--config FILE.yaml`
  (a bare name is looked up in the bundled configs), `--print_config`, and every option on the
  command line as well, in nested groups (`--sampler.steps`, `--estimator.M`, `--guidance.lam`).
  The spellings of earlier versions (`--steps`, `--drop-fraction`, `--no-clip`) still work
  (`OLD_SPELLINGS`). The resolved config is what a run directory records (`config_yaml`).
- Inputs: the checkpoint (checked to be a `DiffusionModule`'s), the data module of the run that
  wrote it, BayesDiff's Laplace posterior (stored in the checkpoint, or fitted once and cached next
  to it).
- Settings: the JSON-able dict a sample set is defined by (its run.json), every option checked.

Problems are raised as `InputError`, a message naming what is wrong; the commands turn it into an
error exit before they create their output directory. Nothing here writes before the commands
start generating, except `load_or_fit_laplace` (the Laplace cache next to the checkpoint).
"""

import argparse
import hashlib
import sys
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace

from uncdiff.core.samplers import MAX_SEED, make_sampler
from uncdiff.io.files import InputError, load_torch, save_atomic, write_atomic
from uncdiff.io.sample_store import SampleStore, settings_differences
from uncdiff.lightning.cli import resolve_config_args
from uncdiff.lightning.module import DiffusionModule
from uncdiff.uncertainty.bayesdiff import MOMENT_ESTIMATORS, OLD_MOMENT_NAMES, LastLayerLaplace
from uncdiff.uncertainty.estimators import SCORES, VARIANTS
from uncdiff.uncertainty.sampling import build_hook, make_estimator

DATASETS = ("digits", "cifar10")
ESTIMATOR_CHOICES = ("none", "aleatoric", "mc_dropout", "bayesdiff")
GUIDANCE_CHOICES = ("none", "gradient", "posterior")
DEFAULT_DROP_FRACTION = 1 / 6  # docs/algorithms.md §3: keep 50k of 60k

# ------------------------------------------------------------------------------------- options

# Earlier spellings -> today's option; a value after "=" (or the next word) is kept. Flags map to a
# whole "--option=value".
OLD_SPELLINGS = {
    "--data": "--data.name", "--data-root": "--data.root", "--laplace-images": "--bayesdiff.laplace_images",
    "--accelerator": "--fabric.accelerator", "--devices": "--fabric.devices", "--num-nodes": "--fabric.num_nodes",
    "--strategy": "--fabric.strategy", "--no-progress": "--progress=false",
    "--batch-size": "--batch_size", "--sampler": "--sampler.name", "--steps": "--sampler.steps",
    "--eta": "--sampler.eta", "--spacing": "--sampler.spacing", "--variance": "--sampler.variance",
    "--clip": "--sampler.clip=true", "--no-clip": "--sampler.clip=false",
    "--estimator": "--estimator.name", "--M": "--estimator.M", "--variant": "--estimator.variant",
    "--window": "--estimator.window", "--dropout": "--estimator.dropout",
    "--bayesdiff-draws": "--bayesdiff.draws", "--bayesdiff-skip": "--bayesdiff.skip",
    "--bayesdiff-moments": "--bayesdiff.moments", "--drop-fraction": "--filtering.drop_fraction",
    "--guidance": "--guidance.rule", "--guidance-sign": "--guidance.sign", "--guidance-lam": "--guidance.lam",
    "--guidance-quantile": "--guidance.quantile", "--guidance-table": "--guidance.table",
    "--guidance-window": "--guidance.window",
    "--filtering-estimators": "--filtering.estimators", "--subset-seeds": "--filtering.subset_seeds",
    "--prc-real": "--filtering.prc_real", "--seed-groups": "--guidance.seed_groups",
    "--ause-images": "--ause.images", "--ause-fractions": "--ause.fractions", "--save-maps": "--save_maps=true",
    "--extractor": "--fid.extractor", "--inception-weights": "--fid.inception_weights", "--fid-cache": "--fid.cache",
    "--wandb": "--wandb.enabled=true", "--wandb-project": "--wandb.project",
}

# jsonargparse renamed dump's skip_none to skip_unset (4.49); the oldest version pyproject allows has
# only skip_none. A run records every option, the unset (None) ones included.
_KEEP_UNSET = ({"skip_unset": False} if "skip_unset" in inspect.signature(ArgumentParser.dump).parameters
               else {"skip_none": False})


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the command's description (its docstring) kept as written."""


def new_parser(prog: str, description: str) -> ArgumentParser:
    """A command's parser, with `--config FILE.yaml` and (from jsonargparse) `--print_config`."""
    parser = ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML file of this command's options (`--print_config` writes one; a bare name is "
                             "looked up in the bundled configs); options after it override it")
    return parser


def modern_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with the earlier spellings (`OLD_SPELLINGS`) replaced by today's options."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        new = OLD_SPELLINGS.get(name)
        if new is None:
            out.append(arg)
        elif "=" in new:  # a flag
            out.append(new)
        else:
            out.append(new + eq + value)
    return out


def parse_options(parser: ArgumentParser, argv: Sequence[str]) -> Namespace:
    """Parse a command line (`--print_config` prints and exits; a bad option exits with a message)."""
    return parser.parse_args(resolve_config_args(modern_argv(argv)))


def config_yaml(parser: ArgumentParser, options: Namespace) -> str:
    """The full resolved config of a run, as `--print_config` prints it: `--config` it again."""
    return parser.dump(options, **_KEEP_UNSET)


def record_config(folder: Path, text: str) -> Path:
    """Write a run's config as `<folder>/config.yaml`. A resumed run (its settings are checked to be
    the same) whose config differs elsewhere (processes, progress bar) records its own as
    `config-<time>.yaml` beside it: nothing is overwritten."""
    path = folder / "config.yaml"
    if path.is_file() and path.read_text() != text:
        stamp, k = time.strftime("%Y%m%d-%H%M%S"), 0
        path = folder / f"config-{stamp}.yaml"
        while path.exists():
            k += 1
            path = folder / f"config-{stamp}-{k}.yaml"
    if not path.is_file():
        write_atomic(path, text.encode())
    return path


def add_model_arguments(parser: ArgumentParser, out_help: str) -> None:
    """The checkpoint, the output, the training data and the processes: every command."""
    parser.add_argument("--checkpoint", type=str, required=True, help="a checkpoint written by `fit`")
    parser.add_argument("--out", type=str, required=True, help=out_help)
    g = parser.add_argument_group("training data (BayesDiff's Laplace fit, evaluate's real images)")
    g.add_argument("--data.name", type=Optional[Literal[DATASETS]], default=None,
                   help="the training data, instead of the run's config")
    g.add_argument("--data.root", type=str, default="data", help="where CIFAR-10 lies (with --data.name cifar10)")
    g.add_argument("--data.run_config", type=Optional[str], default=None,
                   help="the training run's config (default: the newest config-*.yaml in the checkpoint's run "
                        "directory)")
    add_fabric_arguments(parser)


def print_run_summary(summary: dict, root: Path, noun: str, files: str) -> None:
    """One line on what a finished `generate_run` wrote and what it cost."""
    kept = f", {summary['dropped']} marked dropped (dropped.png)" if summary["dropped"] else ""
    print(f"wrote {summary['samples']} {noun} to {root} ({files}{kept}); "
          f"{summary['nfe_per_image']:.0f} network evaluations and {summary['seconds_per_image']:.3g} s per image")


def add_fabric_arguments(parser: ArgumentParser) -> None:
    """The processes a command runs on (Lightning Fabric) and its progress bar."""
    g = parser.add_argument_group("processes (Lightning Fabric)")
    g.add_argument("--fabric.accelerator", type=str, default="auto", help="auto | cpu | gpu | cuda | mps")
    g.add_argument("--fabric.devices", type=Union[int, str], default="auto",
                   help="devices per node, or 'auto' (all GPUs)")
    g.add_argument("--fabric.num_nodes", type=int, default=1, help="nodes")
    g.add_argument("--fabric.strategy", type=str, default="auto", help="auto | ddp | ddp_spawn ...")
    g.add_argument("--progress", type=bool, default=True, help="show a progress bar")


def add_sampler_arguments(parser: ArgumentParser, n: Optional[int] = 64, steps: Optional[int] = None,
                          n_help: str = "number of samples, seeds seed..seed+n-1") -> None:
    """Seeds, batch and sampler: every command (`n` None: `--n` may be null, as `n_help` says)."""
    g = parser.add_argument_group("samples")
    g.add_argument("--n", type=int if n is not None else Optional[int], default=n, help=n_help)
    g.add_argument("--seed", type=int, default=0, help="seed of the first sample")
    g.add_argument("--batch_size", type=int, default=256,
                   help="samples per batch; also the unit of work and of resuming, so part of the run's settings")
    g = parser.add_argument_group("sampler (docs/algorithms.md §2)")
    g.add_argument("--sampler.name", type=Optional[Literal["ddim", "ddpm"]], default=None,
                   help="default: the checkpoint's")
    g.add_argument("--sampler.steps", type=Optional[int], default=steps,
                   help="sampler steps (null: the checkpoint's sample_steps)")
    g.add_argument("--sampler.eta", type=Optional[float], default=None, help="DDIM eta (null: 0)")
    g.add_argument("--sampler.spacing", type=Optional[Literal["uniform", "quadratic", "leading", "trailing", "linspace"]],
                   default=None, help="DDIM timestep spacing; leading/trailing/linspace are diffusers' (null: uniform, "
                   "or a diffusers model's timestep_spacing)")
    g.add_argument("--sampler.clipped_eps", type=Optional[Literal["rederive", "keep"]], default=None,
                   help="DDIM with x0 clipping: eps re-derived from the clipped x0, or the network's kept "
                   "(diffusers' default) (null: rederive, not recorded)")
    g.add_argument("--sampler.variance", type=Optional[Literal["beta_tilde", "beta"]], default=None,
                   help="DDPM variance (null: beta_tilde, or a diffusers model's variance_type)")
    g.add_argument("--sampler.clip", type=Optional[bool], default=None,
                   help="clip x0 to [-1, 1] (null: on, or a diffusers model's clip_sample and range; off for "
                   "BayesDiff, which needs affine steps)")


def add_estimator_arguments(parser: ArgumentParser, choose: bool = True) -> None:
    """Estimator, BayesDiff and filtering options; `choose` adds --estimator.name (evaluate runs them all)."""
    g = parser.add_argument_group("uncertainty (docs/algorithms.md §3, §5)")
    if choose:
        g.add_argument("--estimator.name", type=str, default="aleatoric", help=" | ".join(ESTIMATOR_CHOICES))
    g.add_argument("--estimator.M", type=Optional[int], default=None,
                   help="perturbations (aleatoric, guided) or dropout passes (mc_dropout) (null: 5)")
    g.add_argument("--estimator.variant", type=Literal[VARIANTS], default="centered", help="aleatoric map (§3)")
    g.add_argument("--estimator.window", type=float, nargs=2, default=[0.0, 1.0], metavar=("START", "STOP"),
                   help="steps whose maps are summed into the score, as fractions of the steps")
    g.add_argument("--estimator.score", type=Literal[SCORES], default="sum",
                   help="score variant (§3): sum of the per-step totals, or each step's total divided by "
                        "(step_normalized) or standardized with (standardized) the reference statistics")
    g.add_argument("--estimator.score_reference", type=Optional[str], default=None,
                   help="the score reference file `calibrate` writes (<table>.reference.pt), for the "
                        "step_normalized and standardized scores")
    g.add_argument("--estimator.dropout", type=Optional[float], default=None,
                   help="MC-Dropout rate (null: the model's own)")
    add_bayesdiff_arguments(parser)
    g = parser.add_argument_group("filtering")
    g.add_argument("--filtering.drop_fraction", type=Optional[float], default=None,
                   help="mark the fraction with the highest scores as dropped (null: 1/6)")


def add_bayesdiff_arguments(parser: ArgumentParser) -> None:
    """BayesDiff's options: the propagation's draws, skip and moments, and the Laplace fit's images."""
    g = parser.add_argument_group("BayesDiff (docs/algorithms.md §5b)")
    g.add_argument("--bayesdiff.draws", type=int, default=10, help="draws S per UQ step")
    g.add_argument("--bayesdiff.skip", type=int, default=5, help="UQ every k-th step")
    g.add_argument("--bayesdiff.moments", type=Literal[(*MOMENT_ESTIMATORS, *OLD_MOMENT_NAMES)],
                   default=MOMENT_ESTIMATORS[0],
                   help="how Cov(x_t, eps) is estimated: regression, or the paper's Monte Carlo form (paper; "
                        "formerly spec)")
    g.add_argument("--bayesdiff.laplace_images", type=Optional[int], default=None,
                   help="fit the Laplace posterior on this many training images (null: the checkpoint's own "
                        "posterior if it holds one, else 1000), cached as <checkpoint>.laplace-N.pt; an "
                        "image-to-image model fits on training pairs (docs/palette.md)")


def add_guidance_arguments(parser: ArgumentParser, choose: bool = True) -> None:
    """Guidance options; `choose` adds --guidance.rule and --guidance.sign (evaluate runs them all)."""
    g = parser.add_argument_group("guidance (docs/algorithms.md §4; uses the aleatoric estimator)")
    if choose:
        g.add_argument("--guidance.rule", type=Literal[GUIDANCE_CHOICES], default="none", help="update rule")
        g.add_argument("--guidance.sign", type=int, default=1, help="gradient rule: +1 or -1")
    g.add_argument("--guidance.lam", type=float, default=1.0, help="gradient rule: step size lambda")
    g.add_argument("--guidance.grad_wrt", type=Literal["eps", "x_t"], default="eps",
                   help="gradient rule: differentiate U with respect to eps_bar, or x_t (the released code)")
    g.add_argument("--guidance.reduce", type=Literal["sum", "mean"], default="sum",
                   help="gradient rule: U summed over pixels per image, or also averaged over the batch (the "
                        "released code)")
    g.add_argument("--guidance.prior_precision", type=Union[float, Literal["abar_inverse"]], default=1.0,
                   help="posterior rule: precision of the N(0, 1/p) prior on eps; abar_inverse = the paper's 1/abar[t]")
    g.add_argument("--guidance.quantile", type=float, default=0.95, help="per-image percentile threshold q")
    g.add_argument("--guidance.table", type=Optional[str], default=None,
                   help="threshold table file from `calibrate` (threshold 'table' instead of the per-image "
                        "percentile)")
    g.add_argument("--guidance.window", type=float, nargs=2, default=[0.0, 0.15], metavar=("START", "STOP"),
                   help="guided steps, as fractions of the steps (default: the first 3 of 20)")


# ------------------------------------------------------------------------------------- inputs

def file_sha256(path: Path) -> str:
    """SHA-256 of a file; of a folder (a diffusers model), of its files' relative names and contents."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        if Path(path).is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def load_module(path: str | Path) -> DiffusionModule:
    """The `DiffusionModule` of a checkpoint written by `train.py fit`, or of a diffusers pipeline or
    UNet2DModel folder (docs/diffusers.md), on the CPU, in eval mode."""
    path = Path(path)
    if path.is_dir():
        return DiffusionModule.from_diffusers(path)
    checkpoint = load_torch(path, "checkpoint", mmap=True)
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(checkpoint):
        raise InputError(f"{path} is not a checkpoint written by `train.py fit` (it has no state_dict and "
                         f"hyper_parameters)")
    if "task" in checkpoint["hyper_parameters"]:  # a ConditionalDiffusionModule's (docs/palette.md)
        raise InputError(f"{path} is an image-to-image model (task {checkpoint['hyper_parameters']['task']!r}): it "
                         f"restores condition images and can't sample from noise alone: use `train.py restore` and "
                         f"`train.py evaluate_i2i` (docs/palette.md)")
    if not any(k.startswith("ema.ema_model.") for k in checkpoint["state_dict"]):
        raise InputError(f"{path} is not a uncdiff DiffusionModule checkpoint (no EMA weights 'ema.ema_model.*' "
                         f"in its state_dict)")
    try:
        module = DiffusionModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"{path} is incompatible with this uncdiff DiffusionModule "
                         f"({type(error).__name__}: {str(error)[:500]})") from None
    return module.eval()


# ------------------------------------------------------------------------------------------- data

def find_run_config(checkpoint: Path) -> Optional[Path]:
    """The newest `config-*.yaml` the CLI saved in the run directory of `checkpoint`
    (`<run>/checkpoints/x.ckpt` or `<run>/x.ckpt`), or None."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        configs = sorted(folder.glob("config-*.yaml"))
        if configs:
            return configs[-1]
    return None


def datamodule_from_config(config: Path):
    """The data module of a saved CLI config (`data: {class_path, init_args}`)."""
    try:
        from uncdiff.lightning.data import CIFAR10DataModule, DigitsDataModule

        data = yaml.safe_load(config.read_text())["data"]
        known = {f"{c.__module__}.{c.__name__}": c for c in (DigitsDataModule, CIFAR10DataModule)}
        if data["class_path"] not in known:  # never import a name read from a file
            raise ValueError(f"data.class_path {data['class_path']!r} is not one of uncdiff's data modules "
                             f"({', '.join(known)})")
        cls = known[data["class_path"]]
        return cls(**(data.get("init_args") or {}))
    except Exception as error:
        raise InputError(f"cannot build the data module of {config} ({type(error).__name__}: {error}); "
                         f"pass --data.name {'|'.join(DATASETS)} instead") from None


def make_datamodule(module: DiffusionModule, checkpoint: Path, data: Optional[str] = None,
                    data_root: str = "data", config: Optional[str] = None):
    """The training data of the checkpoint's run: `--data.name` if given, else `--data.run_config`,
    else the run's own saved config. Raises InputError when none of them is there."""
    if data is not None:
        if data not in DATASETS:
            raise InputError(f"--data.name must be one of {DATASETS}, got {data!r}")
        from uncdiff.lightning.data import CIFAR10DataModule, DigitsDataModule

        if data == "digits":
            dm = DigitsDataModule(image_size=module.hparams.image_size)
        else:
            dm = CIFAR10DataModule(root=data_root, download=False, num_workers=0)
    else:
        path = Path(config) if config is not None else find_run_config(checkpoint)
        if path is None or not path.is_file():
            raise InputError(f"no training config found next to {checkpoint} (config-*.yaml in its run directory)"
                             f"{'' if config is None else f' or at --data.run_config {config}'}: pass --data.name "
                             f"{'|'.join(DATASETS)} (and --data.root) to say which data the model was trained on")
        dm = datamodule_from_config(path)
    check_data_matches(dm, module)
    return dm


def check_data_matches(dm, module: DiffusionModule) -> None:
    from uncdiff.lightning.data import CIFAR10DataModule, DigitsDataModule

    channels, size = module.hparams.in_channels, module.hparams.image_size
    if isinstance(dm, DigitsDataModule):
        shape = (1, dm.image_size)
    elif isinstance(dm, CIFAR10DataModule):
        shape = (3, 32)
    else:
        raise InputError(f"unsupported data module {type(dm).__name__}: use --data.name {'|'.join(DATASETS)}")
    if shape != (channels, size):
        raise InputError(f"the data ({type(dm).__name__}: {shape[0]} channels, {shape[1]}x{shape[1]}) does not "
                         f"match the checkpoint's model ({channels} channels, {size}x{size})")


def image_to_image_data(module, checkpoint: Path, run_config: Optional[str] = None) -> tuple[Any, Path]:
    """`(ImageToImageDataModule, config path)` of an image-to-image checkpoint's run, from `run_config` or
    the run's own saved config, checked to build the model's task. Loads no data yet."""
    from uncdiff.lightning.palette_data import image_to_image_data_from_config

    config = Path(run_config) if run_config else find_run_config(checkpoint)
    if config is None or not config.is_file():
        raise InputError(f"no training config found next to {checkpoint} (config-*.yaml in its run directory)"
                         f"{'' if run_config is None else f' or at {run_config}'}: pass --data.run_config")
    try:
        data = image_to_image_data_from_config(yaml.safe_load(config.read_text()))
    except Exception as error:
        raise InputError(f"cannot build the image-to-image data of {config} ({type(error).__name__}: "
                         f"{error})") from None
    if data.task.name != module.task.name:
        raise InputError(f"{config} builds {data.task.name!r} pairs; the checkpoint is a {module.task.name!r} model")
    return data, config


# ------------------------------------------------------------------------------------ BayesDiff

def laplace_cache_path(checkpoint: Path, num_images: int) -> Path:
    return checkpoint.with_name(f"{checkpoint.name}.laplace-{num_images}.pt")


def laplace_source(module: DiffusionModule, checkpoint: Path, num_images: Optional[int]) -> dict:
    """Which Laplace posterior a BayesDiff run uses (part of its settings): the checkpoint's own
    when it holds one and no `num_images` is asked for, else one fitted on `num_images` (default
    1000) training images, cached at `laplace_cache_path`."""
    if num_images is None and module.laplace is not None:
        return {"source": "checkpoint", "num_images": int(module.laplace.num_images)}
    num_images = 1000 if num_images is None else num_images
    if num_images < 1:
        raise InputError(f"--bayesdiff.laplace_images must be >= 1, got {num_images}")
    return {"source": "fit", "num_images": int(num_images)}


def load_or_fit_laplace(module: DiffusionModule, checkpoint: Path, checkpoint_sha256: str, source: dict,
                        datamodule=None, is_writer: bool = True) -> None:
    """Give `module` the Laplace posterior `source` names. A fitted one is read from its cache when
    that was made from this very checkpoint; otherwise the writer fits it on the first
    `num_images` training images (docs/algorithms.md §5b), or for an image-to-image model (`datamodule` an
    `ImageToImageDataModule`) on the first `num_images` training pairs, and saves it (write then rename)."""
    if source["source"] == "checkpoint":
        return
    path = laplace_cache_path(checkpoint, source["num_images"])
    if path.is_file():
        cached = load_torch(path, "Laplace cache")
        if cached.get("checkpoint_sha256") == checkpoint_sha256:
            module.laplace = LastLayerLaplace.from_state_dict(cached["laplace"])
            return
    if not is_writer:
        raise RuntimeError(f"{path} is missing or stale after the writer fitted it")
    from uncdiff.evaluation.fid import datamodule_images
    from uncdiff.lightning.palette_data import ImageToImageDataModule

    if isinstance(datamodule, ImageToImageDataModule):  # the first training pairs its task builds (docs/palette.md)
        x0, condition, _ = datamodule.training_pairs(source["num_images"])
        module.fit_laplace(x0, num_images=source["num_images"], conditions=condition)
    else:
        module.fit_laplace(datamodule_images(datamodule, "train", batch_size=64)(), num_images=source["num_images"])
    save_atomic({"checkpoint_sha256": checkpoint_sha256, "laplace": module.laplace.state_dict()}, path)


# ------------------------------------------------------------------------------------ settings

def _error(option: str, error: Exception) -> InputError:
    return InputError(f"{option}: {error}")


def sampler_settings(options: Namespace, module, estimator: str) -> dict:
    """The sampler of a run from the `sampler` options (the checkpoint's where unset)."""
    name = options.name or module.hparams.sampler
    s = {"name": name, "steps": module.hparams.sample_steps if options.steps is None else options.steps}
    own = module.sampler_options(name)  # a diffusers model's scheduler config; empty for ours
    clip = options.clip if options.clip is not None else estimator != "bayesdiff" and own.get("clip", True)
    if name == "ddim":
        if options.variance is not None:
            raise InputError("--sampler.variance applies to --sampler.name ddpm")
        s.update(eta=0.0 if options.eta is None else options.eta, spacing=options.spacing or own.get("spacing", "uniform"),
                 clip=clip)
        if options.clipped_eps is not None:
            s["clipped_eps"] = options.clipped_eps
    else:
        if options.eta is not None or options.spacing is not None:
            raise InputError("--sampler.eta and --sampler.spacing apply to --sampler.name ddim")
        if options.clipped_eps is not None:
            raise InputError("--sampler.clipped_eps applies to --sampler.name ddim")
        s.update(variance=options.variance or own.get("variance", "beta_tilde"), clip=clip)
    return s


def guidance_settings(guide: Namespace) -> dict:
    """The guidance options of a run from the `guidance` options with a rule (not 'none'): each rule
    records only its own options; a threshold table replaces the per-image quantile."""
    guidance = {"rule": guide.rule, "quantile": guide.quantile, "window": [float(v) for v in guide.window]}
    if guide.rule == "gradient":
        guidance.update(sign=guide.sign, lam=guide.lam, grad_wrt=guide.grad_wrt, reduce=guide.reduce)
    else:
        guidance["prior_precision"] = guide.prior_precision
    if guide.table:
        guidance.update(threshold="table", table=str(Path(guide.table).resolve()))
        del guidance["quantile"]
    return guidance


def estimator_settings(args: Namespace) -> tuple[str, dict, Optional[dict]]:
    """(estimator, its options, guidance options or None), named as the hooks' constructors name them."""
    est, m_option, guide = args.estimator.name, args.estimator.M, args.guidance
    if est not in ESTIMATOR_CHOICES:
        raise InputError(f"unknown estimator {est!r}; choose one of {', '.join(ESTIMATOR_CHOICES)}")
    m = 5 if m_option is None else m_option
    window = [float(v) for v in args.estimator.window]
    score = score_options(args)
    if score and (guide.rule != "none" or est not in ("aleatoric", "mc_dropout")):
        raise InputError(f"--estimator.score {score['score']} applies to the scores of the aleatoric (and MC-Dropout) "
                         f"estimator of an unguided run; this run is {'guided' if guide.rule != 'none' else est}")
    if guide.rule != "none":
        if est not in ("aleatoric", "none"):
            raise InputError(f"--guidance.rule uses the aleatoric estimator; got --estimator.name {est}")
        guidance = guidance_settings(guide)
        return "aleatoric", {"num_perturbations": m, "variant": args.estimator.variant,
                             "estimate_window": window}, guidance
    if est == "none":
        if m_option is not None:
            raise InputError("--estimator.M needs an estimator (--estimator.name aleatoric | mc_dropout)")
        return est, {}, None
    if est == "aleatoric":
        return est, {"num_perturbations": m, "variant": args.estimator.variant, "window": window, **score}, None
    if est == "mc_dropout":
        if score:
            raise InputError("--estimator.score_reference holds statistics of the aleatoric maps (from calibrate), "
                             "not of MC-Dropout's: score MC-Dropout with --estimator.score sum")
        return est, {"num_passes": m, "dropout": args.estimator.dropout, "window": window}, None
    if m_option is not None:
        raise InputError("BayesDiff's number of draws is --bayesdiff.draws, not --estimator.M")
    moments = args.bayesdiff.moments
    if moments in OLD_MOMENT_NAMES:
        print(f"note: --bayesdiff.moments {moments} is now called {OLD_MOMENT_NAMES[moments]}", file=sys.stderr)
        moments = OLD_MOMENT_NAMES[moments]
    return est, {"num_draws": args.bayesdiff.draws, "skip": args.bayesdiff.skip, "moments": moments}, None


def score_options(args: Namespace) -> dict:
    """The estimator options of `--estimator.score` (none for the default `sum`, so the settings of
    runs that don't use a variant stay as they were): the variant and its reference file's absolute
    path, which must be given exactly for the normalised variants."""
    score, reference = args.estimator.score, args.estimator.score_reference
    if score == "sum":
        if reference is not None:
            raise InputError("--estimator.score_reference is used only by --estimator.score step_normalized | "
                             "standardized")
        return {}
    if reference is None:
        raise InputError(f"--estimator.score {score} needs the per-step reference statistics of unguided samples: "
                         f"pass --estimator.score_reference <table>.reference.pt (written by `calibrate`)")
    return {"score": score, "reference": str(Path(reference).resolve())}


def check_score_reference(path: str, sampler: dict, options: dict) -> None:
    """Refuse a score reference file of another step count, sampler, M or map variant than this
    run's (settings the file doesn't record are not checked)."""
    from uncdiff.uncertainty.score_reference import load_score_reference

    try:
        _, made = load_score_reference(path, sampler["steps"])
    except ValueError as error:
        raise InputError(f"--estimator.score_reference: {error}") from None
    run = {"sampler": sampler, "num_perturbations": options["num_perturbations"], "variant": options["variant"]}
    made = {key: value for key, value in made.items() if key in run}
    differ = settings_differences(made, {key: run[key] for key in made})
    if differ:
        raise InputError(f"--estimator.score_reference {path} was calibrated with other settings (the file's there, "
                         f"this run's here: {'; '.join(differ)}): calibrate it for this run, or match its options")


def estimator_hook(module, estimator: str, options: dict, guidance: Optional[dict]) -> Any:
    """The sampler hook `DiffusionModule.sample` builds for these settings (built here to check
    them before sampling, and for the AUSE experiment, which denoises outside `sample`)."""
    if estimator == "bayesdiff" and module.laplace is None:  # options checked before the Laplace fit
        return make_estimator("bayesdiff", net=module.ema.ema_model, laplace=None, **options)
    return build_hook(estimator, options, guidance, net=module.ema.ema_model, laplace=module.laplace,
                      image_shape=module.image_shape)


def threshold_table(path: str, module):
    """The `[steps, C, H, W]` threshold table saved at `path`, checked against the model's image shape
    (`build_settings` checks its step count against the run's)."""
    from uncdiff.uncertainty.guidance import table_from_file

    try:
        return table_from_file(path, image_shape=module.image_shape)
    except ValueError as error:
        raise InputError(f"--guidance.table: {error}") from None


def check_table_settings(path: str, sampler: dict, options: dict) -> None:
    """Refuse a threshold table calibrated with another sampler, M or map variant than this run's:
    its quantiles would describe other maps. Settings the file doesn't record are not checked."""
    from uncdiff.uncertainty.guidance import load_table

    run = {"sampler": sampler, "num_perturbations": options["num_perturbations"], "variant": options["variant"]}
    made = {key: value for key, value in load_table(path)[1].items() if key in run}
    differ = settings_differences(made, {key: run[key] for key in made})
    if differ:
        raise InputError(f"--guidance.table {path} was calibrated with other settings (the table's there, this "
                         f"run's here: {'; '.join(differ)}): calibrate a table for this run, or match its options")


def check_seeds(args: Namespace) -> None:
    if not 0 <= args.seed <= MAX_SEED - args.n:
        raise InputError(f"seeds must lie in [0, 2**32): --seed {args.seed} with --n {args.n} does not")
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {args.batch_size}")


def build_settings(args: Namespace, module, checkpoint_sha256: str, laplace: Optional[dict],
                   save_maps: bool = True) -> dict:
    """The JSON-able settings that define a sampling run (its run.json), every option checked.
    Options that don't change what is written (processes, progress bar) are not part of them."""
    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    check_seeds(args)
    sampler = sampler_settings(args.sampler, module, args.estimator.name)
    try:
        build_sampler(module, sampler)
    except ValueError as error:
        raise _error("sampler", error) from None
    estimator, options, guidance = estimator_settings(args)
    try:
        estimator_hook(module, estimator, options, guidance)
    except ValueError as error:
        raise _error(f"estimator {estimator}" + (" (guided)" if guidance else ""), error) from None
    if estimator == "bayesdiff" and not (sampler["name"] == "ddim" and sampler["eta"] == 0 and not sampler["clip"]):
        raise InputError("--estimator.name bayesdiff propagates moments through deterministic DDIM steps: it needs "
                         "--sampler.name ddim, --sampler.eta 0 and --sampler.clip false")
    if "reference" in options:
        check_score_reference(options["reference"], sampler, options)
    if guidance is not None and "table" in guidance:
        steps = threshold_table(guidance["table"], module).shape[0]
        if steps != sampler["steps"]:
            raise InputError(f"--guidance.table was calibrated for {steps} steps; this run has {sampler['steps']}")
        check_table_settings(guidance["table"], sampler, options)
    p = args.filtering.drop_fraction
    if p is not None:
        if estimator == "none":
            raise InputError("--filtering.drop_fraction needs an estimator's scores; --estimator.name none gives none")
        if not 0.0 < p < 1.0:
            raise InputError(f"--filtering.drop_fraction must lie in (0, 1), got {p}")
    elif estimator != "none":
        p = DEFAULT_DROP_FRACTION
    settings = {"format": 1, "checkpoint_sha256": checkpoint_sha256,
                "seeds": {"start": args.seed, "count": args.n}, "batch_size": args.batch_size,
                "sampler": sampler, "estimator": estimator, "estimator_options": options, "guidance": guidance,
                "laplace": laplace, "drop_fraction": p, "save_maps": save_maps,
                "guidance_table_sha256": file_sha256(Path(guidance["table"])) if guidance and "table" in guidance
                else None}
    if "reference" in options:  # only then: the settings of runs without a score variant stay as they were
        settings["score_reference_sha256"] = file_sha256(Path(options["reference"]))
    return settings


def build_sampler(module, sampler: dict):
    """The sampler of a `sampler_settings` dict (name, steps and the sampler's own options)."""
    return make_sampler(module.schedule, sampler["name"], **{k: v for k, v in sampler.items() if k != "name"})


def sample_kwargs(settings: dict) -> dict:
    """`DiffusionModule.sample` arguments of a run (all but the seeds)."""
    sampler = dict(settings["sampler"])
    return {"sampler": sampler.pop("name"), "steps": sampler.pop("steps"), "estimator": settings["estimator"],
            "estimator_options": settings["estimator_options"], "guidance": settings["guidance"], **sampler}


# ---------------------------------------------------------------------------------- preparation

@dataclass
class ModelInputs:
    """The checked checkpoint, and the data to fit a Laplace posterior on when one is needed."""

    module: Any
    checkpoint: Path
    sha256: str
    laplace: Optional[dict] = None
    datamodule: Any = None


def prepare_model(args: Namespace, needs_laplace: bool, needs_data: bool = False) -> ModelInputs:
    """Load and check the checkpoint; when BayesDiff runs, decide its Laplace posterior and make sure
    either its cache or the training data is there. Writes nothing."""
    checkpoint = Path(args.checkpoint)
    module = load_module(checkpoint)
    sha = file_sha256(checkpoint)
    laplace = laplace_source(module, checkpoint, args.bayesdiff.laplace_images) if needs_laplace else None
    datamodule = None
    if needs_data or (laplace is not None and laplace["source"] == "fit"
                      and not laplace_cached(checkpoint, sha, laplace)):
        datamodule = make_datamodule(module, checkpoint, args.data.name, args.data.root, args.data.run_config)
    return ModelInputs(module, checkpoint, sha, laplace, datamodule)


def laplace_cached(checkpoint: Path, sha: str, laplace: dict) -> bool:
    path = laplace_cache_path(checkpoint, laplace["num_images"])
    return path.is_file() and load_torch(path, "Laplace cache").get("checkpoint_sha256") == sha


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
    """Lightning Fabric from the `fabric` options."""
    from lightning.fabric import Fabric

    devices = int(options.devices) if str(options.devices).isdigit() else options.devices
    return Fabric(accelerator=options.accelerator, devices=devices, num_nodes=options.num_nodes,
                  strategy=options.strategy)


def run_info(command: list[str], inputs: ModelInputs) -> dict:
    """What ran the run, for the record (not compared on resume)."""
    return {"checkpoint": str(inputs.checkpoint.resolve()), "command": ["train.py", *command],
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


# ------------------------------------------------------------------------------------ generation

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
                          per_sample_values(result))
        bar.update(store.done_samples() - bar.n)  # all ranks' finished chunks, as seen on disk
    fabric.barrier()
    bar.update(total - bar.n)
    bar.close()
    return store.finish() if fabric.is_global_zero else None
