"""What the commands read before they generate anything: a `fit` checkpoint as its module (either
kind: `DiffusionModule` or the image-to-image `ImageToImageModule`), the data module of the
run that wrote it (rebuilt from its saved config), and BayesDiff's Laplace posterior (stored in the
checkpoint, or fitted once and cached next to it).

A class path read from a file is never imported: a saved config may only name uncdiff's own data
modules (`DATA_MODULES`). Problems are raised as `InputError`, a message naming what is wrong and how
to fix it; nothing here writes, except `load_or_fit_laplace` (the Laplace cache beside the checkpoint).
"""

import hashlib
from pathlib import Path
from typing import Optional

import yaml

from uncdiff.io.files import InputError, load_torch, save_atomic
from uncdiff.lightning.data import CIFAR10DataModule, DigitsDataModule, ShapesDataModule
from uncdiff.lightning.module import DiffusionModule
from uncdiff.lightning.image_to_image import ImageToImageModule
from uncdiff.lightning.image_to_image_data import ImageToImageDataModule
from uncdiff.uncertainty.bayesdiff import LastLayerLaplace

DATASETS = ("digits", "cifar10", "shapes")  # --data.name: the training data, when no run config says it
# the only classes a saved config may name (image-to-image: the outer one, wrapping one of the others)
IMAGE_DATA_MODULES = {f"{c.__module__}.{c.__name__}": c for c in (DigitsDataModule, CIFAR10DataModule,
                                                                       ShapesDataModule)}
DATA_MODULES = {**IMAGE_DATA_MODULES,
                f"{ImageToImageDataModule.__module__}.{ImageToImageDataModule.__name__}": ImageToImageDataModule}


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


# ------------------------------------------------------------------------------------ checkpoints

def load_module(path: str | Path, image_to_image: bool = False) -> DiffusionModule:
    """The module of a checkpoint written by `fit`, on the CPU, in eval mode: a `DiffusionModule`, or
    with `image_to_image` a `ImageToImageModule` (docs/image_to_image.md). An unconditional model may
    also be a diffusers pipeline or UNet2DModel folder (docs/diffusers.md). A checkpoint of the other
    kind, or not of `fit`, is an `InputError` saying which command takes it."""
    path = Path(path)
    if path.is_dir():
        if image_to_image:
            raise InputError(f"{path} is a folder (a diffusers model?): image-to-image sampling needs a checkpoint "
                             f"of an image-to-image model trained with `fit`")
        return DiffusionModule.from_diffusers(path)
    checkpoint = load_torch(path, "checkpoint", mmap=True)
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(checkpoint):
        raise InputError(f"{path} is not a checkpoint written by `fit` (it has no state_dict and hyper_parameters)")
    task = checkpoint["hyper_parameters"].get("task")
    if image_to_image and task is None:
        raise InputError(f"{path} is an unconditional model: it generates from noise and takes no condition images "
                         f"(sample it with `sample`)")
    if not image_to_image and task is not None:
        raise InputError(f"{path} is an image-to-image model (task {task!r}): it restores condition images and "
                         f"can't sample from noise alone: use `restore` and `evaluate_image_to_image` (docs/image_to_image.md)")
    cls = ImageToImageModule if image_to_image else DiffusionModule
    if not any(k.startswith("ema.ema_model.") for k in checkpoint["state_dict"]):
        raise InputError(f"{path} is not a uncdiff {cls.__name__} checkpoint (no EMA weights 'ema.ema_model.*' in its "
                         f"state_dict)")
    try:
        module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"{path} is incompatible with this uncdiff {cls.__name__} "
                         f"({type(error).__name__}: {str(error)[:500]})") from None
    return module.eval()


# ------------------------------------------------------------------------------ saved run configs

def find_run_config(checkpoint: Path) -> Optional[Path]:
    """The newest `config-*.yaml` the CLI saved in the run directory of `checkpoint`
    (`<run>/checkpoints/x.ckpt` or `<run>/x.ckpt`), or None."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        configs = sorted(folder.glob("config-*.yaml"))
        if configs:
            return configs[-1]
    return None


def _build(entry, known: dict, where: str):
    """The data module of a config entry `{class_path, init_args}`, `class_path` one of `known`."""
    if not isinstance(entry, dict) or entry.get("class_path") not in known:
        name = entry.get("class_path") if isinstance(entry, dict) else entry
        raise ValueError(f"{where}.class_path {name!r} is not one of uncdiff's data modules ({', '.join(known)})")
    options = dict(entry.get("init_args") or {})
    cls = known[entry["class_path"]]
    if cls is ImageToImageDataModule:  # wraps an image data module, itself an entry
        options["data"] = _build(options.get("data"), IMAGE_DATA_MODULES, f"{where}.init_args.data")
    return cls(**options)


def datamodule_from_config(config: Path):
    """The data module of a saved `fit` config (its `data: {class_path, init_args}`), built only from
    uncdiff's own classes (`DATA_MODULES`): an image data module, or an image-to-image one around one."""
    try:
        return _build(yaml.safe_load(Path(config).read_text()).get("data"), DATA_MODULES, "data")
    except Exception as error:
        raise InputError(f"cannot build the data module of {config} ({type(error).__name__}: {error})") from None


def _run_config(checkpoint: Path, run_config: Optional[str], fix: str) -> Path:
    path = Path(run_config) if run_config is not None else find_run_config(checkpoint)
    if path is None or not path.is_file():
        raise InputError(f"no training config found next to {checkpoint} (config-*.yaml in its run directory)"
                         f"{'' if run_config is None else f' or at --data.run_config {run_config}'}: {fix}")
    return path


def training_data(module: DiffusionModule, checkpoint: Path, name: Optional[str] = None, root: str = "data",
                  run_config: Optional[str] = None):
    """The training data of an unconditional checkpoint's run: `--data.name` if given, else
    `--data.run_config`, else the run's own saved config; checked to match the model."""
    hint = f"pass --data.name {'|'.join(DATASETS)} (and --data.root) to say which data the model was trained on"
    if name is not None:
        if name not in DATASETS:
            raise InputError(f"--data.name must be one of {DATASETS}, got {name!r}")
        data = DigitsDataModule(image_size=module.hparams.image_size) if name == "digits" else \
            ShapesDataModule() if name == "shapes" else CIFAR10DataModule(root=root, download=False, num_workers=0)
    else:
        config = _run_config(checkpoint, run_config, hint)
        try:
            data = datamodule_from_config(config)
        except InputError as error:
            raise InputError(f"{error}; {hint}") from None
    check_data_matches(data, module)
    return data


def check_data_matches(data, module: DiffusionModule) -> None:
    """Refuse data whose images aren't the model's (channels, size)."""
    channels, size = module.hparams.in_channels, module.hparams.image_size
    if isinstance(data, (DigitsDataModule, ShapesDataModule)):
        shape = (1, data.image_size)
    elif isinstance(data, CIFAR10DataModule):
        shape = (3, 32)
    else:
        raise InputError(f"unsupported data module {type(data).__name__}: use --data.name {'|'.join(DATASETS)}")
    if shape != (channels, size):
        raise InputError(f"the data ({type(data).__name__}: {shape[0]} channels, {shape[1]}x{shape[1]}) does not "
                         f"match the checkpoint's model ({channels} channels, {size}x{size})")


def image_to_image_data(module: ImageToImageModule, checkpoint: Path,
                        run_config: Optional[str] = None) -> tuple[ImageToImageDataModule, Path]:
    """`(ImageToImageDataModule, config path)` of an image-to-image checkpoint's run, from `run_config`
    or the run's own saved config, checked to build the model's task. Loads no data yet."""
    config = _run_config(checkpoint, run_config, "pass --data.run_config")
    data = datamodule_from_config(config)
    if not isinstance(data, ImageToImageDataModule):
        raise InputError(f"{config} builds a {type(data).__name__}, not an image-to-image data module: pass the "
                         f"image-to-image run's config as --data.run_config")
    if data.task.name != module.task.name:
        raise InputError(f"{config} builds {data.task.name!r} pairs; the checkpoint is a {module.task.name!r} model")
    return data, config


# -------------------------------------------------------------------------- BayesDiff's posterior

def laplace_cache_path(checkpoint: Path, num_images: int) -> Path:
    return checkpoint.with_name(f"{checkpoint.name}.laplace-{num_images}.pt")


def laplace_source(module: DiffusionModule, num_images: Optional[int]) -> dict:
    """Which Laplace posterior a BayesDiff run uses (part of its settings): the checkpoint's own
    when it holds one and no `num_images` is asked for, else one fitted on `num_images` (default
    1000) training images, cached at `laplace_cache_path`."""
    if num_images is None and module.laplace is not None:
        return {"source": "checkpoint", "num_images": int(module.laplace.num_images)}
    num_images = 1000 if num_images is None else num_images
    if num_images < 1:
        raise InputError(f"--bayesdiff.laplace_images must be >= 1, got {num_images}")
    return {"source": "fit", "num_images": int(num_images)}


def laplace_cached(checkpoint: Path, sha256: str, source: dict) -> bool:
    """Whether the fitted posterior `source` names is cached, from this very checkpoint."""
    path = laplace_cache_path(checkpoint, source["num_images"])
    return path.is_file() and load_torch(path, "Laplace cache").get("checkpoint_sha256") == sha256


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

    if isinstance(datamodule, ImageToImageDataModule):  # the first training pairs its task builds (docs/image_to_image.md)
        x0, condition, _ = datamodule.training_pairs(source["num_images"])
        module.fit_laplace(x0, num_images=source["num_images"], conditions=condition)
    else:
        module.fit_laplace(datamodule_images(datamodule, "train", batch_size=64)(), num_images=source["num_images"])
    save_atomic({"checkpoint_sha256": checkpoint_sha256, "laplace": module.laplace.state_dict()}, path)
