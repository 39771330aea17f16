"""diffusers models as uncdiff noise predictors, and uncdiff models as diffusers pipelines (docs/diffusers.md).

A diffusers pipeline folder (`model_index.json`, `unet/`, `scheduler/`) or a bare `UNet2DModel`
folder (`config.json` and its weights) becomes a `PretrainedDiffusion`: the UNet wrapped as the
`eps_model(x, t) -> eps` callable every sampler, estimator and guidance rule takes, the noise
schedule its scheduler config defines, and the sampler defaults that config implies. Every field
uncdiff cannot honour is refused here, naming the field and its value, before any sampling.

Configs are read as JSON; weights load through diffusers' `from_pretrained` (safetensors, or a
`.bin` with `torch.load(weights_only=True)`), so no file in the folder can run code. diffusers is
an optional extra: without it a folder is refused with the install command.

The other way: `build_unet` makes a fresh `UNet2DModel` from its config (a network `fit` trains),
`unet_config_of` gives a network's config back as plain values (what a checkpoint stores instead of a
pickled class), and `save_pipeline` writes a trained one as a `DDPMPipeline` folder.
"""

import inspect
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uncdiff.core.schedule import NoiseSchedule
from uncdiff.io.files import InputError

INSTALL = 'pip install -e ".[diffusers]"'
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
# DDPMScheduler's defaults: what a missing field means (diffusers fills them in the same way).
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                      "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True,
                      "clip_sample_range": 1.0, "prediction_type": "epsilon", "thresholding": False,
                      "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
                      "set_alpha_to_one": True}
MAX_LAYERS_PER_BLOCK = 64
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # our spacings of the same names
VARIANCES = {"fixed_small": "beta_tilde", "fixed_small_log": "beta_tilde", "fixed_large": "beta",
             "fixed_large_log": "beta"}


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether `path` is a folder that looks like a pipeline (`model_index.json`) or a bare model (`config.json`)."""
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "config.json").is_file())


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not a readable JSON {what} ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a {what} must be a JSON object, got {type(data).__name__}")
    return data


def refuse(where: Path, key: str, value: Any, why: str) -> InputError:
    return InputError(f"{where}: {key} = {value!r} is not supported: {why}")


def memory_bytes() -> int:
    """The machine's memory (RAM), the bound of what a config may ask to allocate."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_in_memory(where: Path, need: int, what: str) -> None:
    """Refuse a config whose `what` needs at least `need` bytes, more than the machine has: it would
    only fail after minutes of allocation (or be killed)."""
    have = memory_bytes()
    if need > have:
        raise InputError(f"{where}: {what} needs at least {need / 2**30:.1f} GiB of memory; this machine has "
                         f"{have / 2**30:.1f} GiB: make it smaller")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_unet_size(config: dict, size: int, channels: int, where: Path) -> None:
    """Check the sizes of a UNet2DModel config and refuse one whose weights, or one image's
    activations, can't fit in memory, before anything is built. The estimates are lower bounds: each
    of the `layers_per_block` ResNet blocks of a level of `c` channels holds two 3x3 convolutions
    (18 c^2 weights), down and up; one image holds at least a `c0 x size x size` map per block."""
    blocks = config.get("block_out_channels", (224, 448, 672, 896))  # UNet2DModel's default
    layers = config.get("layers_per_block", 2)
    if not (isinstance(blocks, (list, tuple)) and blocks and all(isinstance(c, int) and c >= 1 for c in blocks)):
        raise refuse(where, "block_out_channels", blocks, "it must be a list of channel counts >= 1")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= MAX_LAYERS_PER_BLOCK:
        raise refuse(where, "layers_per_block", layers, f"it must be an integer in [1, {MAX_LAYERS_PER_BLOCK}] (diffusers' "
                     f"UNets use 1 to 4; each block is Python modules that take long to build, whatever their size)")
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise refuse(where, "in_channels", channels, "it must be an integer >= 1")
    weights = 4 * 2 * layers * sum(18 * c * c for c in blocks)
    check_fits_in_memory(where, weights, f"a UNet2DModel with layers_per_block {layers} and block_out_channels "
                                         f"{list(blocks)} (float32 weights)")
    check_fits_in_memory(where, 4 * layers * blocks[0] * size * size, f"one {size}x{size} image through this UNet")


# ------------------------------------------------------------------------------------- schedule

def diffusers_betas(config: dict, where: Path | str = "scheduler config") -> torch.Tensor:
    """Betas `[T]` of a diffusers scheduler config, in float32 as diffusers computes them:
    `trained_betas`, or `beta_schedule` `linear` / `scaled_linear` (linear in sqrt(beta)) between
    `beta_start` and `beta_end`, or `squaredcos_cap_v2` (Nichol & Dhariwal's cosine, each beta
    capped at 0.999)."""
    c = {**SCHEDULER_DEFAULTS, **config}
    T = c["num_train_timesteps"]
    if not isinstance(T, int) or isinstance(T, bool) or T < 2:
        raise refuse(Path(where), "num_train_timesteps", T, "it must be an integer >= 2")
    check_fits_in_memory(Path(where), 8 * 8 * T, f"num_train_timesteps {T} (the schedule's float64 tables)")
    if c["trained_betas"] is not None:
        if not (isinstance(c["trained_betas"], (list, tuple)) and all(map(is_number, c["trained_betas"]))):
            raise refuse(Path(where), "trained_betas", type(c["trained_betas"]).__name__, "it must be a list of numbers")
        betas = torch.tensor(c["trained_betas"], dtype=torch.float32)
        if betas.shape != (T,):
            raise refuse(Path(where), "trained_betas", f"<{betas.numel()} values>", f"it must hold num_train_timesteps = {T}")
        return betas
    name, start, end = c["beta_schedule"], c["beta_start"], c["beta_end"]
    for key in ("beta_start", "beta_end"):
        if not is_number(c[key]):
            raise refuse(Path(where), key, c[key], "it must be a number")
    if name == "linear":
        return torch.linspace(start, end, T, dtype=torch.float32)
    if name == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
    if name == "squaredcos_cap_v2":
        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    raise refuse(Path(where), "beta_schedule", name, f"uncdiff knows {BETA_SCHEDULES} (or trained_betas)")


def check_scheduler_config(config: dict, where: Path) -> dict:
    """The scheduler config with defaults filled in, after refusing every field uncdiff can't honour."""
    c = {**SCHEDULER_DEFAULTS, **config}
    name = config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise refuse(where, "_class_name", name, f"uncdiff reads the configs of {SCHEDULERS}")
    if c["prediction_type"] != "epsilon":
        raise refuse(where, "prediction_type", c["prediction_type"],
                     "uncdiff's samplers and uncertainty estimators need a noise (epsilon) predictor")
    if c["thresholding"]:
        raise refuse(where, "thresholding", c["thresholding"], "dynamic thresholding is not implemented; "
                     "uncdiff clips x0 to [-clip_sample_range, clip_sample_range]")
    if c["rescale_betas_zero_snr"]:
        raise refuse(where, "rescale_betas_zero_snr", True, "a zero terminal SNR leaves x0 undefined for an "
                     "epsilon predictor at the first step")
    if not isinstance(c["timestep_spacing"], str) or c["timestep_spacing"] not in TIMESTEP_SPACINGS:
        raise refuse(where, "timestep_spacing", c["timestep_spacing"], f"uncdiff maps {TIMESTEP_SPACINGS}")
    if c["steps_offset"] != 0:
        raise refuse(where, "steps_offset", c["steps_offset"], "uncdiff's timesteps end at 0 (steps_offset 0)")
    if not c["set_alpha_to_one"]:
        raise refuse(where, "set_alpha_to_one", False, "uncdiff's last DDIM step always goes to the clean image "
                     "(alpha_bar = 1)")
    if not isinstance(c["variance_type"], str) or c["variance_type"] not in VARIANCES:
        raise refuse(where, "variance_type", c["variance_type"], f"uncdiff's DDPM variances are {tuple(VARIANCES)} "
                     "(a learned variance needs a network uncdiff does not run)")
    r = c["clip_sample_range"]
    if c["clip_sample"] and not (isinstance(r, (int, float)) and r > 0):
        raise refuse(where, "clip_sample_range", r, "it must be a number > 0")
    return c


def schedule_from_config(config: dict, where: Path | str = "scheduler config") -> tuple[NoiseSchedule, dict]:
    """The `NoiseSchedule` and the sampler defaults (`clip`, DDPM `variance`, DDIM `spacing`) of a
    diffusers scheduler config; refuses (InputError naming the field) what uncdiff can't honour."""
    where = Path(where)
    c = check_scheduler_config(config, where)
    # diffusers computes betas and their cumulative product in float32: that product is the schedule
    # the model was trained and is sampled with there, so it is ours too (to float64 at use).
    abar = torch.cumprod(1 - diffusers_betas(c, where), dim=0)
    name = "trained_betas" if c["trained_betas"] is not None else c["beta_schedule"]
    try:
        schedule = NoiseSchedule.from_alphas_cumprod(abar, f"diffusers:{name}")
    except ValueError as error:
        raise InputError(f"{where}: {error}") from None
    clip = (True if float(c["clip_sample_range"]) == 1.0 else float(c["clip_sample_range"])) if c["clip_sample"] else False
    return schedule, {"clip": clip, "variance": VARIANCES[c["variance_type"]], "spacing": c["timestep_spacing"]}


# ------------------------------------------------------------------------------------------ UNet

class DiffusersEps(nn.Module):
    """A diffusers `UNet2DModel` as uncdiff's network: `forward(x [B, C, H, W], t [B] long) -> eps`.

    For BayesDiff (docs/algorithms.md §5b) it exposes `head` (the UNet's final conv, `conv_out`)
    and `features(x, t)` (that conv's input), so that `net(x, t) == net.head(net.features(x, t))`.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def image_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def head(self) -> nn.Conv2d:
        return self.unet.conv_out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, return_dict=False)[0]

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen = []
        handle = self.unet.conv_out.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            self.unet(x, t, return_dict=False)
        finally:
            handle.remove()
        return seen[0]


def check_unet_config(config: dict, where: Path) -> tuple[int, int]:
    """(image_size, channels) of an unconditional `UNet2DModel` config; refuses anything else."""
    name = config.get("_class_name")
    if name != "UNet2DModel":
        why = ("a conditional UNet (text/class conditioning) needs inputs uncdiff's unconditional samplers don't "
               "give" if name and "Condition" in name else "uncdiff runs unconditional UNet2DModel networks")
        raise refuse(where, "_class_name", name, why)
    for key in ("class_embed_type", "num_class_embeds"):
        if config.get(key) is not None:
            raise refuse(where, key, config[key], "a class-conditional UNet needs class labels uncdiff's samplers "
                         "don't give")
    if config.get("time_embedding_type", "positional") != "positional":
        raise refuse(where, "time_embedding_type", config["time_embedding_type"],
                     "uncdiff runs DDPM UNets that take the training timestep (positional embedding)")
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise refuse(where, "sample_size", size, "uncdiff needs square images of a known size")
    channels = config.get("in_channels", 3)
    if config.get("out_channels", 3) != channels:
        raise refuse(where, "out_channels", config.get("out_channels", 3),
                     f"a noise predictor outputs as many channels as it takes (in_channels = {channels})")
    check_unet_size(config, size, channels, where)
    return size, channels


def import_unet_class(what: str = "loading a diffusers model folder"):
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise InputError(f"{what} needs the diffusers extra: {INSTALL}") from None
    return UNet2DModel


def load_unet(folder: Path) -> nn.Module:
    """The `UNet2DModel` of `folder` (config.json + weights), on the CPU, in eval mode."""
    config = read_json(folder / "config.json", "UNet config")
    check_unet_config(config, folder / "config.json")
    found = [name for name in WEIGHT_NAMES if (folder / name).is_file()]
    if not found:
        raise InputError(f"{folder} holds no weights ({' or '.join(WEIGHT_NAMES)}); sharded or variant "
                         "weights are not read")
    UNet2DModel = import_unet_class()
    try:
        # .bin files load with torch.load(weights_only=True) inside diffusers: tensors only, never code.
        unet = UNet2DModel.from_pretrained(folder, use_safetensors=found[0].endswith(".safetensors"),
                                           local_files_only=True, low_cpu_mem_usage=False)
    except Exception as error:
        raise InputError(f"cannot load the UNet in {folder} ({type(error).__name__}: {str(error)[:500]})") from None
    return unet.eval()


# --------------------------------------------------------------------------------------- folders

@dataclass
class PretrainedDiffusion:
    """What uncdiff needs of a diffusers model folder."""

    net: DiffusersEps  # eps_model(x [B, C, H, W], t [B]) -> eps [B, C, H, W]
    schedule: NoiseSchedule
    image_size: int
    in_channels: int
    dropout: float
    sampler_defaults: dict = field(default_factory=dict)  # clip, variance (DDPM), spacing (DDIM)
    scheduler_config: dict = field(default_factory=dict)  # as read ({} for a bare UNet: DDPMScheduler's defaults)
    source: dict = field(default_factory=dict)  # the folder and its configs' class names


def load_pretrained(path: str | Path) -> PretrainedDiffusion:
    """A diffusers pipeline folder (`model_index.json`, `unet/`, `scheduler/`) or a bare
    `UNet2DModel` folder (`config.json`; its schedule is then DDPMScheduler's default, linear
    1e-4..0.02 over 1000 steps with clipping) as a `PretrainedDiffusion`. Raises InputError for
    anything uncdiff can't run, naming the file, field and value, before loading any weights."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json", "pipeline index")
        if "unet" not in index:
            raise InputError(f"{path / 'model_index.json'} names no unet: uncdiff needs an unconditional "
                             f"UNet2DModel pipeline (this is a {index.get('_class_name')!r})")
        unet_dir, scheduler_file = path / "unet", path / "scheduler" / "scheduler_config.json"
        scheduler_config = read_json(scheduler_file, "scheduler config")
    elif (path / "config.json").is_file():
        unet_dir, scheduler_file, scheduler_config = path, Path("<DDPMScheduler defaults>"), {}
    else:
        raise InputError(f"{path} is neither a diffusers pipeline folder (model_index.json) nor a UNet2DModel folder "
                         "(config.json)")
    unet_config = read_json(unet_dir / "config.json", "UNet config")
    size, channels = check_unet_config(unet_config, unet_dir / "config.json")
    schedule, defaults = schedule_from_config(scheduler_config, scheduler_file)
    unet = load_unet(unet_dir)
    return PretrainedDiffusion(DiffusersEps(unet), schedule, size, channels, float(unet_config.get("dropout", 0.0)),
                               defaults, scheduler_config, {"folder": str(path), "unet": "UNet2DModel",
                                          "scheduler": scheduler_config.get("_class_name", "DDPMScheduler")})


# ------------------------------------------------------------------------ training and export

def build_unet(config: dict, where: str = "diffusers_unet") -> DiffusersEps:
    """A randomly initialised `UNet2DModel` (from the global RNG) from `config`, the options of its
    `config.json` (`_class_name` may be left out). Unknown options and UNets uncdiff can't run are
    refused, naming the option."""
    UNet2DModel = import_unet_class("a diffusers UNet2DModel network")
    config = {"_class_name": "UNet2DModel", **config}
    options = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in options)
    if unknown:
        raise InputError(f"{where}: {', '.join(map(repr, unknown))} "
                         f"{'is not an option' if len(unknown) == 1 else 'are not options'} of UNet2DModel "
                         f"(its options: {', '.join(sorted(options))})")
    check_unet_config(config, Path(where))
    try:
        unet = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    except Exception as error:
        raise InputError(f"{where}: UNet2DModel refuses this config ({type(error).__name__}: {error})") from None
    return DiffusersEps(unet)


def unet_config_of(net: DiffusersEps) -> dict:
    """Every option of the network's `UNet2DModel` (defaults included), as plain JSON values: with
    `build_unet` it rebuilds the same architecture, and a checkpoint holding it loads with
    `weights_only=True`."""
    return json.loads(json.dumps({k: v for k, v in net.unet.config.items() if not k.startswith("_")}))


def ddpm_scheduler_config(schedule: NoiseSchedule, source: dict | None = None) -> dict:
    """The `DDPMScheduler` config of a noise schedule. `source`, the diffusers scheduler config the
    schedule came from, is kept (less what only DDIMScheduler reads); uncdiff's own schedules map to
    diffusers' of the same betas (core.schedule.make_betas; equal to float32 rounding): `linear` to
    `linear` between its first and last beta, `cosine` to `squaredcos_cap_v2` (the same cosine, capped
    at 0.999), anything else to `trained_betas`. The sampler defaults are uncdiff's: x0 clipped to
    [-1, 1], DDPM variance beta_tilde (`fixed_small`)."""
    from diffusers import DDPMScheduler

    options = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    if source is not None:
        check_scheduler_config(source, Path("diffusers_scheduler"))
        return {k: v for k, v in source.items() if k in options}
    T = schedule.num_timesteps
    config = {"num_train_timesteps": T, "clip_sample": True, "clip_sample_range": 1.0,
              "variance_type": "fixed_small", "prediction_type": "epsilon", "timestep_spacing": "leading"}
    if schedule.name == "linear":
        config.update(beta_schedule="linear", beta_start=float(schedule.betas[0]), beta_end=float(schedule.betas[-1]))
    elif schedule.name == "cosine":
        config.update(beta_schedule="squaredcos_cap_v2")
    else:
        config.update(trained_betas=schedule.betas.tolist())
    return config


def save_pipeline(net: DiffusersEps, scheduler_config: dict, folder: str | Path) -> Path:
    """Write `net`'s UNet and a `DDPMScheduler` of `scheduler_config` as a `DDPMPipeline` folder
    (safetensors weights), which `DDPMPipeline.from_pretrained` loads. Written beside `folder` and
    renamed into place, so `folder` is whole or absent; an existing `folder` is never overwritten."""
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = Path(folder)
    if folder.exists():
        raise InputError(f"{folder} exists; a pipeline is never written over it (delete it or choose another folder)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed export of this pid
    try:
        DDPMPipeline(unet=net.unet, scheduler=DDPMScheduler.from_config(scheduler_config)).save_pretrained(
            partial, safe_serialization=True)
        if folder.exists():
            raise InputError(f"{folder} appeared while exporting; not overwritten")
        os.rename(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder
