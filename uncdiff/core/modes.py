"""`eval_mode`: run a network in eval mode for a while, then put every layer back as it was."""

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module.eval()` inside the block; afterwards each submodule gets back its own `training`
    flag (also when they differed, e.g. a frozen feature extractor inside a trained model)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module.eval()
    finally:
        for m, mode in modes:
            m.training = mode
