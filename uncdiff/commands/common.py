"""What `train.py sample` and `train.py evaluate` read before they generate anything: the checkpoint
(checked to be a `DiffusionModule`'s), the data module of the run that wrote it, and BayesDiff's
Laplace posterior (stored in the checkpoint, or fitted once and cached next to it).

Problems are raised as `InputError`, a message naming what is wrong; the commands turn it into an
error exit before they create their output directory. Nothing here writes, except
`load_or_fit_laplace` (the Laplace cache next to the checkpoint).
"""

import hashlib
import importlib
from pathlib import Path
from typing import Optional

import torch
import yaml

from uncdiff.io.files import InputError, load_torch, save_atomic
from uncdiff.uncertainty.bayesdiff import LastLayerLaplace
from uncdiff.lightning.module import DiffusionModule

DATASETS = ("digits", "cifar10")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_module(path: str | Path) -> DiffusionModule:
    """The `DiffusionModule` of a checkpoint written by `train.py fit`, on the CPU, in eval mode."""
    path = Path(path)
    checkpoint = load_torch(path, "checkpoint", mmap=True)
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(checkpoint):
        raise InputError(f"{path} is not a checkpoint written by `train.py fit` (it has no state_dict and "
                         f"hyper_parameters)")
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
        data = yaml.safe_load(config.read_text())["data"]
        module_name, class_name = data["class_path"].rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls(**(data.get("init_args") or {}))
    except Exception as error:
        raise InputError(f"cannot build the data module of {config} ({type(error).__name__}: {error}); "
                         f"pass --data {'|'.join(DATASETS)} instead") from None


def make_datamodule(module: DiffusionModule, checkpoint: Path, data: Optional[str] = None,
                    data_root: str = "data", config: Optional[str] = None):
    """The training data of the checkpoint's run: `--data` if given, else `--config`, else the run's
    own saved config. Raises InputError when none of them is there."""
    if data is not None:
        if data not in DATASETS:
            raise InputError(f"--data must be one of {DATASETS}, got {data!r}")
        from uncdiff.lightning.data import CIFAR10DataModule, DigitsDataModule

        if data == "digits":
            dm = DigitsDataModule(image_size=module.hparams.image_size)
        else:
            dm = CIFAR10DataModule(root=data_root, download=False, num_workers=0)
    else:
        path = Path(config) if config is not None else find_run_config(checkpoint)
        if path is None or not path.is_file():
            raise InputError(f"no training config found next to {checkpoint} (config-*.yaml in its run directory)"
                             f"{'' if config is None else f' or at --config {config}'}: pass --data "
                             f"{'|'.join(DATASETS)} (and --data-root) to say which data the model was trained on")
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
        raise InputError(f"unsupported data module {type(dm).__name__}: use --data {'|'.join(DATASETS)}")
    if shape != (channels, size):
        raise InputError(f"the data ({type(dm).__name__}: {shape[0]} channels, {shape[1]}x{shape[1]}) does not "
                         f"match the checkpoint's model ({channels} channels, {size}x{size})")


def dataset_key(dm) -> str:
    """The name of the exact real image set, the key of the FID statistics cache."""
    from uncdiff.lightning.data import DigitsDataModule

    return f"digits{dm.image_size}-train" if isinstance(dm, DigitsDataModule) else "cifar10-train"


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
        raise InputError(f"--laplace-images must be >= 1, got {num_images}")
    return {"source": "fit", "num_images": int(num_images)}


def load_or_fit_laplace(module: DiffusionModule, checkpoint: Path, checkpoint_sha256: str, source: dict,
                        datamodule=None, is_writer: bool = True) -> None:
    """Give `module` the Laplace posterior `source` names. A fitted one is read from its cache when
    that was made from this very checkpoint; otherwise the writer fits it on the first
    `num_images` training images (docs/algorithms.md §5b) and saves it (write then rename)."""
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

    module.fit_laplace(datamodule_images(datamodule, "train", batch_size=64)(), num_images=source["num_images"])
    save_atomic({"checkpoint_sha256": checkpoint_sha256, "laplace": module.laplace.state_dict()}, path)
