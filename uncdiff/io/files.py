"""Files a later run reads: written atomically, loaded without executing anything.

Every checkpoint, table, cache, manifest and report goes through `write_atomic` / `save_atomic`
(write under a temporary name in the same folder, flush to disk, rename), so a crash or a
concurrent reader never sees half a file. Every `.pt`/`.ckpt` a user may pass goes through
`load_torch`, which unpickles with `weights_only=True`: tensors and plain Python types only, so a
crafted file cannot run code."""

import errno
import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


class InputError(ValueError):
    """A bad input (an option, a file a user passed), found before any expensive work."""


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either its old contents or all of `data`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:  # name the file being written, not its temporary name
        raise OSError(error.errno, error.strerror, str(path)) from error
    finally:
        tmp.unlink(missing_ok=True)


def temporary_name(path: Path) -> Path:
    """Where `write_atomic` writes `path` before renaming it: `.<name>.<pid>.tmp` beside it. A process
    killed while writing leaves this file behind (`remove_temporary_files` clears a folder of them)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_temporary_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files of interrupted `write_atomic`s in `folder` (not below it) whose
    writer is gone; returns them. Call it only while holding the folder (its lock, or no other writer)."""
    removed = []
    for tmp in Path(folder).glob(".*.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def written_together(*paths: Path) -> Iterator[list[Path]]:
    """Write several files as one unit: the block writes each to the temporary path it is given (in
    order); when it ends normally they are all renamed to `paths`, else removed. A failure (a full
    disk) leaves none of `paths`; one while renaming removes those already renamed. None of `paths`
    may exist (a FileExistsError otherwise: callers never overwrite, and hold the files' lock)."""
    staged = [temporary_name(Path(p)) for p in paths]
    renamed = []
    try:
        yield staged
        for tmp, path in zip(staged, paths):
            if Path(path).exists():
                raise FileExistsError(errno.EEXIST, "exists, not overwritten", str(path))
        for tmp, path in zip(staged, paths):
            os.replace(tmp, path)
            renamed.append(Path(path))
    except BaseException:
        for path in renamed:
            path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)


def check_free_space(folder: str | Path, need: int, option: str) -> None:
    """An InputError when `folder`'s file system has less than `need` bytes free."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free < need:
        raise InputError(f"{option}: {folder} has {free / 2**20:.1f} MiB free; this run writes about "
                         f"{need / 2**20:.1f} MiB: free some space or choose another {option}")


def torch_bytes(obj: Any) -> bytes:
    """What `torch.save(obj, path)` would write."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_atomic(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`, atomically."""
    write_atomic(path, torch_bytes(obj))


def load_torch(path: str | Path, what: str = "file", **kwargs) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; anything else in the pickle (code, classes)
    is refused with an InputError naming `path`, before it can run, and so are an empty file and a
    checkpoint (a dict with a `state_dict`) whose weights are not all finite (`check_finite`)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"{what} {path} is an empty file (0 bytes): a copy or a write that did not finish")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as error:
        raise InputError(f"{path} is not a {what} torch can read with weights_only=True (only tensors and plain "
                         f"Python values load, never code; {type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0][:300] if str(error).strip() else ''})") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # a Lightning checkpoint
        check_finite(loaded["state_dict"], path, what)
    return loaded


def check_finite(tensors: dict, path: str | Path, what: str = "checkpoint") -> None:
    """Refuse (InputError naming the file and the first such entry) a dict of tensors, e.g. a
    checkpoint's state_dict, where a floating-point tensor holds NaN or inf: nothing sampled or
    trained from it could mean anything."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise InputError(f"{what} {path}: its weights {name!r} hold NaN or inf (a training run that diverged?): "
                             f"use an earlier checkpoint")
