"""A WandbLogger that goes offline by itself when W&B can't be reached.

Precedence: a `WANDB_MODE` the user set wins; then `offline: true` in the config; otherwise the
run is online only if an API key is configured and the W&B host answers within a few seconds.
Offline runs are said so once, with the `wandb sync` command that uploads them later.
"""

import netrc
import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


def has_api_key(host: str) -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` stores it)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_reason() -> Optional[str]:
    """Why this run can't log online, or None when it can."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = url.hostname or "api.wandb.ai"
    if not has_api_key(host):
        return "no W&B API key found (set WANDB_API_KEY or run `wandb login`)"
    if not reachable(host, url.port or (80 if url.scheme == "http" else 443)):
        return f"{host} is not reachable"
    return None


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, offline-safe (see the module docstring); runs land in `save_dir/wandb`."""

    def __init__(self, save_dir: str = ".", project: str = "uncdiff", name: Optional[str] = None,
                 id: Optional[str] = None, offline: bool = False, log_model: bool = False,
                 tags: Optional[list[str]] = None, group: Optional[str] = None,
                 entity: Optional[str] = None, notes: Optional[str] = None):
        user_mode = os.environ.get("WANDB_MODE")
        if user_mode is None and not offline:
            reason = offline_reason()
            if reason is not None:
                offline = True
                rank_zero_info(f"W&B: {reason}; logging offline to {save_dir}/wandb. "
                               f"Upload later with: wandb sync {save_dir}/wandb/offline-run-*")
        elif user_mode is not None:
            offline = False  # wandb reads WANDB_MODE itself; don't override the user's choice
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(save_dir=save_dir, project=project, name=name, id=id, offline=offline,
                         log_model=log_model and not offline, tags=tags, group=group, entity=entity,
                         notes=notes)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Close the run, so a later fit in the same process (a notebook, a test) gets its own."""
        super().finalize(status)
        close_run(self)


def close_run(logger: LightningWandbLogger) -> None:
    """Finish the W&B run `logger` started, if any, and let it start a new one when used again.

    Lightning has no public API for this: its `experiment` property starts a run when there is none
    (so it can't tell whether one exists) and keeps the run in the private `_experiment`, read and
    reset here only (`wandb.finish()` alone would leave the logger holding a finished run, on which
    a later `trainer.validate` fails). tests/test_lightning_api.py fails if the attribute goes."""
    if logger._experiment is not None:
        logger._experiment.finish()
        logger._experiment = None


# the checkpoint key under which a fit records its W&B run, so that `fit --ckpt_path` continues that run
WANDB_RUN_ID_KEY = "uncdiff_wandb_run_id"


def wandb_run_id(loggers) -> Optional[str]:
    """The id of the W&B run of the first WandbLogger among `loggers` (None if there is none); its run is
    not started to learn it."""
    for logger in loggers:
        if isinstance(logger, LightningWandbLogger) and logger.version is not None:
            return str(logger.version)
    return None
