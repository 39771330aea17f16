"""Image sets as uint8 tensors, without Lightning: what the data modules serve and what the FID
classifier trains on come from here, so both see the very same pixels and split."""

import torch
import torch.nn.functional as F

from uncdiff.io.images import to_uint8

Split = tuple[torch.Tensor, torch.Tensor]  # (uint8 images [N, C, H, W], long labels [N])


def resize_to_uint8(images: torch.Tensor, size: int, max_value: float) -> torch.Tensor:
    """Float `[N, C, h, w]` in [0, max_value] -> uint8 `[N, C, size, size]` (bilinear, antialiased resize)."""
    x = images.float() / max_value
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return to_uint8(x, (0.0, 1.0))


def digits(image_size: int = 16, val_fraction: float = 0.1, min_val: int = 64) -> tuple[Split, Split]:
    """The 1797 8x8 handwritten digits of scikit-learn, resized to `image_size` (one channel):
    `(train, val)`, the held-out `val` a fixed random `max(floor(N val_fraction), min_val)` of them."""
    from sklearn.datasets import load_digits

    loaded = load_digits()
    images = resize_to_uint8(torch.from_numpy(loaded.images)[:, None], image_size, 16.0)
    labels = torch.from_numpy(loaded.target).long()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n_val = max(int(len(images) * val_fraction), min_val)
    val, train = order[:n_val], order[n_val:]
    return (images[train], labels[train]), (images[val], labels[val])
