"""Files a later run reads: written atomically, loaded without executing anything.

Every checkpoint, table, cache, manifest and report goes through `write_atomic` / `save_atomic`
(write under a temporary name in the same folder, flush to disk, rename), so a crash or a
concurrent reader never sees half a file. Every `.pt`/`.ckpt` a user may pass goes through
`load_torch`, which unpickles with `weights_only=True`: tensors and plain Python types only, so a
crafted file cannot run code."""

import io
import os
from pathlib import Path
from typing import Any

import torch


class InputError(ValueError):
    """A bad input (an option, a file a user passed), found before any expensive work."""


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either its old contents or all of `data`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


def load_torch(path: str | Path, what: str = "file", **kwargs) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; anything else in the pickle (code, classes)
    is refused with an InputError naming `path`, before it can run."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as error:
        raise InputError(f"{path} is not a {what} torch can read with weights_only=True (only tensors and plain "
                         f"Python values load, never code; {type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0][:300] if str(error).strip() else ''})") from None
