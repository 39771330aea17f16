"""How `train.py fit` writes and reads checkpoints: crash-safe writes, loads that never run code.

`SafeCheckpointIO` is the Trainer's checkpoint plugin for every run the CLI makes (its
`trainer_defaults`). Saving goes through `save_atomic` (temporary file in the same folder, fsync,
rename), so a run killed while writing `last.ckpt` leaves the previous `last.ckpt` whole. Loading
(`fit --ckpt_path`, `validate --ckpt_path`) goes through `load_torch`, i.e. `weights_only=True`
whatever the caller asks for: a crafted checkpoint gets an `InputError` naming the file instead of
running its pickle.
"""

from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.plugins.io import TorchCheckpointIO

from uncdiff.io.files import load_torch, save_atomic


class SafeCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are atomic and whose loads are `weights_only=True`.
    URLs (`s3://...`) keep Lightning's own fsspec save, and load with `weights_only=True` too."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomic(checkpoint, path)

    def load_checkpoint(self, path: str | Path, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        # map_location is ignored: load_torch maps to the CPU, as Lightning's default does; the
        # strategy moves the weights to the device afterwards.
        if not is_local(path):
            return super().load_checkpoint(path, weights_only=True)
        return load_torch(path, "checkpoint")


def is_local(path: str | Path) -> bool:
    """A plain file path (no `protocol://`, which Lightning hands to fsspec)."""
    return "://" not in str(path)
