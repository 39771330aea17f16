"""FID (docs/algorithms.md §6): feature extractors, cached real-data statistics, and an evaluator.

The Fréchet distance itself, its DDP-synced sums and the "keep the real statistics across resets"
logic are torchmetrics' `FrechetInceptionDistance`; this file only supplies what it lacks here:

- feature extractors that take float images in [-1, 1] and carry a `name` that is
  recorded with every FID: `InceptionFeatures` (the standard torch-fidelity Inception-v3 pool3,
  2048-d, for CIFAR-10) and `ClassifierFeatures` (a small CNN trained on a small labelled dataset
  such as the quickstart digits, where Inception features mean little; its weights ship in
  `weights/` and its name carries their sha256, so every machine computes the same features);
- caches on disk, so the expensive parts run once:
    <cache_dir>/fid_stats/<dataset>-<extractor name>.pt          real-feature sums (torchmetrics states)
    <cache_dir>/fid_classifiers/<dataset>-<S>x<S>-<hash>.safetensors   a classifier retrained on request
- `FIDEvaluator` (fake images in, float out, usable under DDP) and `fid_between(a, b, extractor)`.

Images everywhere are float `[B, C, H, W]` in [-1, 1], C = 1 or 3.
"""

import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from uncdiff.data import datasets
from uncdiff.io.files import save_atomic, write_atomic
from uncdiff.io.images import from_uint8, to_uint8
from uncdiff.io.processes import rank_and_world

ImageBatches = Union[Iterable[Tensor], Callable[[], Iterable[Tensor]]]
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def _check_images(images: Tensor) -> None:
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"expected float images [B, C, H, W] in [-1, 1], got {images.dtype} {tuple(images.shape)}")


# --------------------------------------------------------------------------------------- Inception

# weights-inception-2015-12-05-6726825d.pth on torch-fidelity's GitHub releases
INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]

INCEPTION_HELP = (
    "The FID Inception-v3 weights {problem}. Download {url} on a machine with internet and either "
    "put it at {hub} (torch hub's cache, used when no path is given) or anywhere you like and pass "
    "its path as `weights_path` (make_extractor('inception', weights_path=...))."
)


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features `[B, 2048]` with the torch-fidelity weights (the TF FID network
    converted to PyTorch): the standard extractor for CIFAR-10 FID, via torchmetrics' wrapper.

    `weights_path` loads a local copy of `weights-inception-2015-12-05-6726825d.pth`; without it the
    file is taken from torch hub's cache, downloading it there if missing. `antialias=False` keeps
    torch-fidelity's TF1-compatible 299x299 resize, so numbers are comparable with published FIDs.
    """

    num_features = 2048  # torchmetrics reads this instead of probing with a dummy image

    def __init__(self, weights_path: Optional[str] = None, antialias: bool = False):
        super().__init__()
        hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(INCEPTION_HELP.format(problem=f"are not at weights_path={weights_path!r}",
                                                          url=INCEPTION_URL, hub=hub))
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=weights_path, antialias=antialias)
        except Exception as error:  # URLError, HTTPError, OSError, a corrupt file...
            where = (f"could not be loaded from {weights_path!r}" if weights_path
                     else f"are not in {hub} and could not be downloaded")
            problem = f"{where} ({type(error).__name__}: {error})"
            raise FileNotFoundError(INCEPTION_HELP.format(problem=problem, url=INCEPTION_URL, hub=hub)) from error
        self.name = "inception-v3-pool3" + ("-antialias" if antialias else "")

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # a fixed feature extractor: never leaves eval mode

    def forward(self, images: Tensor) -> Tensor:
        """`[B, C, H, W]` in [-1, 1] -> `[B, 2048]`. Quantised to uint8 like a saved PNG; grey -> RGB."""
        _check_images(images)
        x = to_uint8(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)


# ------------------------------------------------------------------------------ small classifier

def _digits(image_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    (train_x, train_y), (val_x, val_y) = datasets.digits(image_size)  # DigitsDataModule's default split
    return from_uint8(train_x), train_y, from_uint8(val_x), val_y


# name -> image_size -> (train images, train labels, held-out images, held-out labels)
LABELLED_DATASETS: dict[str, Callable[[int], tuple[Tensor, Tensor, Tensor, Tensor]]] = {"digits": _digits}


def _classifier(in_channels: int, width: int, feature_dim: int, num_classes: int) -> nn.Sequential:
    """conv x2 -> pool -> conv x2 -> pool to 4x4 -> `feature_dim` (penultimate, the FID features) -> logits."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        nn.Linear(feature_dim, num_classes),
    )


def train_classifier(settings: dict) -> dict:
    """Train the classifier described by `settings` on CPU, deterministically (seeded init and
    batch order, global RNG untouched). Returns a checkpoint dict: state dict, settings and
    held-out accuracy."""
    s = settings
    train_x, train_y, val_x, val_y = LABELLED_DATASETS[s["dataset"]](s["image_size"])
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    threads = torch.get_num_threads()
    # One thread: the net is too small to gain from more (under CPU contention they cost 10x), and
    # a fixed thread count keeps the float reductions, hence the weights, reproducible.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s["seed"])
            net = _classifier(train_x.shape[1], s["width"], s["feature_dim"], num_classes)
            optimizer = torch.optim.Adam(net.parameters(), lr=s["lr"])
            order_rng = torch.Generator().manual_seed(s["seed"])
            for _ in range(s["epochs"]):
                for batch in torch.randperm(len(train_x), generator=order_rng).split(s["batch_size"]):
                    loss = F.cross_entropy(net(train_x[batch]), train_y[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            with torch.no_grad():
                accuracy = (net(val_x).argmax(1) == val_y).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    return {"state_dict": net.state_dict(), "settings": dict(s), "num_classes": num_classes,
            "in_channels": train_x.shape[1], "val_accuracy": accuracy, "val_size": len(val_x)}


def classifier_bytes(checkpoint: dict) -> bytes:
    """`train_classifier`'s checkpoint as a safetensors file: the weights, and everything else as one
    metadata entry `classifier` (JSON with sorted keys: safetensors writes several entries in a
    random order, and the file's bytes must depend on its contents only, for its sha256 to name them)."""
    info = {key: value for key, value in checkpoint.items() if key != "state_dict"}
    return save_safetensors(checkpoint["state_dict"], {"classifier": json.dumps(info, sort_keys=True)})


def read_classifier(path: Path) -> tuple[dict[str, Tensor], dict, str]:
    """A file `classifier_bytes` wrote: (state dict, its metadata, sha256 hex of the file's bytes)."""
    data = path.read_bytes()
    try:
        state_dict = load_safetensors(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # the safetensors layout
        info = json.loads(header["__metadata__"]["classifier"])
    except (SafetensorError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a classifier file written by uncdiff (retrain: true writes one): "
                         f"{type(error).__name__}: {error}") from None
    return state_dict, info, hashlib.sha256(data).hexdigest()


WEIGHTS_DIR = Path(__file__).with_name("weights")
# The shipped classifiers by (dataset, image size): their files' sha256, checked at every load, so
# no other weights are ever used under these names. Made with `retrain: true` and the default
# training settings (uncdiff 0.1.0) and copied to WEIGHTS_DIR as <dataset>-classifier-<S>.safetensors.
SHIPPED_WEIGHTS = {
    ("digits", 8): "486218ac370a4218ef49c1703e04823863833221d409b8aa53cf273175cd26f1",
    ("digits", 16): "9a9136327f8cebeb2590f3a7a50ea54072a2f740955b9fc8c7c0c614344dcbe6",
}
TRAINING_DEFAULTS = dict(epochs=20, lr=1e-3, batch_size=64, width=16, feature_dim=128, seed=0)


def shipped_weights(dataset: str, image_size: int) -> Path:
    """The shipped weights file of the classifier for `dataset` at `image_size` (whether or not one ships)."""
    return WEIGHTS_DIR / f"{dataset}-classifier-{image_size}.safetensors"


class ClassifierFeatures(nn.Module):
    """Penultimate-layer features `[B, feature_dim]` of a small CNN trained on a labelled dataset
    (for FID on small datasets such as the 16x16 digits), named `<dataset>-classifier-<first 12 hex
    of its weights file's sha256>`: the name says which weights made a feature, so caches keyed by
    it never mix two classifiers.

    The weights come from, in this order of choice:
    - `weights_path`: a file that `retrain: true` wrote (on this or another machine);
    - `retrain=True`: trained on this machine with the training settings (`epochs`, `lr`,
      `batch_size`, `width`, `feature_dim`, `seed`; TRAINING_DEFAULTS where not given), once per
      settings: `<cache_dir>/fid_classifiers/<dataset>-<S>x<S>-<hash of settings>.safetensors` is
      reused (on rank 0 under DDP; the others wait and read it). `trained_now` says whether it trained;
    - otherwise the weights shipped with the package (SHIPPED_WEIGHTS, 8x8 and 16x16 digits),
      checked against their sha256.
    `sha256` is the file's digest, `val_accuracy` the accuracy on the dataset's held-out split."""

    def __init__(self, dataset: str = "digits", image_size: int = 16, weights_path: Optional[str] = None,
                 retrain: bool = False, cache_dir: str = "cache", epochs: Optional[int] = None,
                 lr: Optional[float] = None, batch_size: Optional[int] = None, width: Optional[int] = None,
                 feature_dim: Optional[int] = None, seed: Optional[int] = None):
        super().__init__()
        if dataset not in LABELLED_DATASETS:
            raise ValueError(f"no labelled dataset {dataset!r} for a classifier; known: {sorted(LABELLED_DATASETS)}")
        given = {k: v for k, v in dict(epochs=epochs, lr=lr, batch_size=batch_size, width=width,
                                       feature_dim=feature_dim, seed=seed).items() if v is not None}
        if given and not retrain:
            raise ValueError(f"{', '.join(given)}: training settings, used only with retrain: true (add it, or "
                             f"drop them to use the shipped weights)")
        if retrain and weights_path is not None:
            raise ValueError("retrain: true trains new weights and weights_path loads existing ones: give one of them")

        self.trained_now = False
        if weights_path is not None:
            self.path = Path(weights_path)
            if not self.path.is_file():
                raise FileNotFoundError(f"weights_path={weights_path!r} is not a file")
        elif retrain:
            settings = dict(dataset=dataset, image_size=image_size, **{**TRAINING_DEFAULTS, **given},
                            version=1)  # bump when _classifier or train_classifier change: a new file
            key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
            self.path = Path(cache_dir) / "fid_classifiers" / f"{dataset}-{image_size}x{image_size}-{key}.safetensors"
            if rank_and_world()[0] == 0 and not self.path.is_file():
                write_atomic(self.path, classifier_bytes(train_classifier(settings)))
                self.trained_now = True
            _barrier()  # other ranks wait for rank 0's file
        else:
            if (dataset, image_size) not in SHIPPED_WEIGHTS:
                sizes = sorted(size for name, size in SHIPPED_WEIGHTS if name == dataset)
                raise ValueError(f"no {dataset} classifier ships for {image_size}x{image_size} images (shipped: "
                                 f"{sizes}); set retrain: true to train one on this machine, or weights_path to "
                                 f"a file such a training wrote")
            self.path = shipped_weights(dataset, image_size)

        state_dict, info, self.sha256 = read_classifier(self.path)
        if weights_path is None and not retrain and self.sha256 != SHIPPED_WEIGHTS[dataset, image_size]:
            raise ValueError(f"{self.path} has sha256 {self.sha256}, not the shipped "
                             f"{SHIPPED_WEIGHTS[dataset, image_size]}: reinstall uncdiff")
        trained_on = (info["settings"]["dataset"], info["settings"]["image_size"])
        if trained_on != (dataset, image_size):
            raise ValueError(f"{self.path} holds a classifier of {trained_on[1]}x{trained_on[1]} {trained_on[0]} "
                             f"images, not {image_size}x{image_size} {dataset}")
        self.name = f"{dataset}-classifier-{self.sha256[:12]}"
        self.image_size, self.in_channels = image_size, info["in_channels"]
        self.num_features = info["settings"]["feature_dim"]
        self.val_accuracy = info["val_accuracy"]
        net = _classifier(info["in_channels"], info["settings"]["width"], self.num_features, info["num_classes"])
        net.load_state_dict(state_dict)
        self.features, self.head = net[:-1], net[-1]
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """`[B, C, S, S]` in [-1, 1] (S = image_size, C = in_channels) -> `[B, feature_dim]`."""
        _check_images(images)
        if images.shape[1] != self.in_channels:
            raise ValueError(f"{self.name} reads {self.in_channels}-channel images, got {images.shape[1]} channels")
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"{self.name} was trained on {self.image_size}x{self.image_size} images, "
                             f"got {tuple(images.shape[-2:])}")
        return self.features(images)


# -------------------------------------------------------------------------------------- factory

EXTRACTORS: dict[str, Callable[..., nn.Module]] = {
    "inception": InceptionFeatures,
    "digits-classifier": lambda **options: ClassifierFeatures(dataset="digits", **options),
}


def make_extractor(name: str, **options) -> nn.Module:
    """'inception' (options: weights_path, antialias) or 'digits-classifier' (ClassifierFeatures'
    options: image_size, weights_path, retrain, cache_dir, epochs, ...). The result has `.name` and
    `.num_features`; the digits classifier also `.sha256`, its weights file's digest."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown FID feature extractor {name!r}; choose one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](**options)


# ------------------------------------------------------------------------- real statistics cache

def _metric(extractor: nn.Module, **metric_kwargs) -> FrechetInceptionDistance:
    # normalize=True: the extractor takes float images (torchmetrics only uses it to type its probe)
    return FrechetInceptionDistance(feature=extractor, reset_real_features=False, normalize=True, **metric_kwargs)


def stats_path(cache_dir: str, dataset: str, extractor_name: str) -> Path:
    """`<cache_dir>/fid_stats/<dataset>-<extractor name>.pt`."""
    for part in (dataset, extractor_name):
        if not re.fullmatch(r"[\w.+-]+", part):
            raise ValueError(f"{part!r} cannot be part of a file name (use letters, digits, '.', '+', '-', '_')")
    return Path(cache_dir) / "fid_stats" / f"{dataset}-{extractor_name}.pt"


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


def compute_real_stats(extractor: nn.Module, real_images: Iterable[Tensor]) -> dict[str, Tensor]:
    """torchmetrics' real-feature states (feature sum, sum of outer products, count; float64) over
    all batches of `real_images` (float `[B, C, H, W]` in [-1, 1])."""
    metric = _metric(extractor).to(_device(extractor))
    for batch in real_images:
        metric.update(batch.to(_device(extractor)), real=True)
    return {k: getattr(metric, k).cpu() for k in REAL_STATES}


def real_feature_stats(extractor: nn.Module, dataset: str, real_images: ImageBatches,
                       cache_dir: str = "cache") -> tuple[dict[str, Tensor], bool]:
    """The real-feature states for (dataset, extractor.name), from the cache file or computed once
    and cached (on rank 0 under DDP; the other ranks wait and read the file). Returns (states,
    computed_now). `dataset` must name the exact image set (e.g. 'digits-16x16-train', from
    `uncdiff.lightning.data.dataset_key`): it is the cache key. `real_images` may be a callable,
    called only when computing."""
    path = stats_path(cache_dir, dataset, extractor.name)
    computed = False
    if rank_and_world()[0] == 0 and not path.is_file():
        batches = real_images() if callable(real_images) else real_images
        stats = compute_real_stats(extractor, batches)
        save_atomic({**stats, "dataset": dataset, "extractor": extractor.name}, path)
        computed = True
    _barrier()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["extractor"] != extractor.name or saved["dataset"] != dataset:
        raise ValueError(f"{path} holds statistics of ({saved['dataset']}, {saved['extractor']}), "
                         f"not ({dataset}, {extractor.name}); delete it")
    return {k: saved[k] for k in REAL_STATES}, computed


def datamodule_images(datamodule, split: str = "train", batch_size: int = 500) -> Callable[[], Iterable[Tensor]]:
    """Batches of a uncdiff data module's split (`train` or `val`) as float images in [-1, 1],
    lazily (nothing is loaded until the cache needs it)."""

    def batches() -> Iterable[Tensor]:
        datamodule.setup("fit")
        images, labels = getattr(datamodule, f"{split}_set").tensors
        for i in range(0, len(images), batch_size):
            yield datamodule.on_after_batch_transfer((images[i:i + batch_size], labels[i:i + batch_size]), 0)[0]

    return batches


# ------------------------------------------------------------------------------------ evaluation

class _Features(nn.Module):
    """The identity as an "extractor": FID of features that were extracted once."""

    name = "features"

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: Tensor) -> Tensor:
        return features


class FIDEvaluator(nn.Module):
    """FID of generated images against the cached real statistics of `dataset`.

    `update(fake)` any number of times (on every rank under DDP: torchmetrics sums the states over
    ranks at `compute()`), `compute()` -> float, `reset()` drops the fake images and keeps the real
    statistics. The real statistics are loaded by `prepare()`, which `update` calls if needed; call
    it yourself after DDP is initialised (e.g. in a callback's `setup`). Only rank 0 holds them, so
    the synced sums count each real image once. Move it with `.to(device)`.
    `name` is the extractor's, to be logged next to every value (docs/algorithms.md §6).

    `FIDEvaluator.from_features(real_stats)` takes features `[N, D]` extracted once per sample set
    instead of images, so the FID of any subset costs no network pass (`evaluate`'s experiments);
    `score(x)` is the FID of one set `x` on its own.
    """

    def __init__(self, extractor: nn.Module, dataset: str, real_images: ImageBatches, cache_dir: str = "cache",
                 **metric_kwargs):
        super().__init__()
        self.metric = _metric(extractor, **metric_kwargs)
        self.name, self.dataset, self.cache_dir = extractor.name, dataset, cache_dir
        self._real_images = real_images
        self.prepared = False

    @classmethod
    def from_features(cls, real_stats: dict[str, Tensor], device: torch.device | str = "cpu") -> "FIDEvaluator":
        """FID of feature sets `[N, D]` against real statistics (`real_feature_stats`' states). Never
        syncs across processes: it runs on one rank."""
        evaluator = cls(_Features(real_stats["real_features_sum"].numel()), dataset="features", real_images=(),
                        sync_on_compute=False).to(device)
        evaluator._set_real(real_stats, keep=True)
        return evaluator

    def prepare(self) -> bool:
        """Load (or compute once and cache) the real statistics. Returns whether they were computed."""
        stats, computed = real_feature_stats(self.metric.inception, self.dataset, self._real_images, self.cache_dir)
        self._set_real(stats, keep=rank_and_world()[0] == 0)
        return computed

    def _set_real(self, stats: dict[str, Tensor], keep: bool) -> None:
        for key, value in stats.items():
            state = getattr(self.metric, key)
            setattr(self.metric, key, (value if keep else torch.zeros_like(value)).to(state.device, state.dtype))
        self.prepared = True

    def score(self, fake: Tensor, batch_size: int = 4096) -> float:
        """The FID of `fake` alone (images, or features for `from_features`), after a `reset`."""
        self.reset()
        for batch in fake.split(batch_size):
            self.update(batch.to(self.metric.real_features_sum.device))
        return self.compute()

    def update(self, fake_images: Tensor) -> None:
        """`fake_images`: float `[B, C, H, W]` in [-1, 1]."""
        if not self.prepared:
            self.prepare()
        self.metric.update(fake_images, real=False)

    def compute(self) -> float:
        return float(self.metric.compute())

    def reset(self) -> None:
        self.metric.reset()


def fid_between(a: Tensor, b: Tensor, extractor: nn.Module, batch_size: int = 500) -> float:
    """FID between two image sets, float `[N, C, H, W]` in [-1, 1] (no caching)."""
    metric = _metric(extractor).to(_device(extractor))
    for images, real in ((a, True), (b, False)):
        for batch in images.split(batch_size):
            metric.update(batch.to(_device(extractor)), real=real)
    return float(metric.compute())
