"""The progress bar of `sample()`: the math takes a `progress(steps)` callback and draws nothing, so the
bar is made here, out of the math layers."""

import math
from contextlib import contextmanager
from typing import Iterator, Optional

from tqdm.auto import tqdm

from uncdiff.core.samplers import Progress


@contextmanager
def step_bar(show: bool, steps: int, n: int, batch_size: int, desc: str = "sampling") -> Iterator[Optional[Progress]]:
    """A tqdm bar over the sampler steps of `n` images drawn in batches of `batch_size` (`steps` per
    batch), as the `progress` callback of `uncdiff.core.samplers.sample`; None when `show` is False."""
    if not show:
        yield None
        return
    with tqdm(total=steps * math.ceil(n / batch_size), desc=desc, unit="step", leave=False) as bar:
        yield bar.update
