"""One run per output folder: an exclusive advisory lock (`flock`) on `<folder>/.lock`, held for the
whole run, so that two runs can never write into one folder at once.

The lock is taken before a command looks at what the folder holds (a second run started a moment
later would otherwise find the folder empty too, and both would write into it). Once locked, the
file names its holder (pid, command line, start time), so that a refused run can say who has the
folder. The operating system releases the lock when the holder exits, however it exits (a kill
included): a stale `.lock` file holds nothing, and the next run simply takes it. Resuming a run
takes the lock like any other run.

Under a multi-process launch (DDP, torchrun, SLURM) only the first process locks: the others are
part of the same run. Within one process the lock is re-entrant (a second command run in the same
Python process, e.g. a resume in a notebook, reuses it); it is released when the last holder drops it.
"""

import json
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Callable, Optional, TypeVar

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_NAME = ".lock"
# launcher variables that number a process of a multi-process run; the first process has 0 (or none)
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")

T = TypeVar("T")
_held: "weakref.WeakValueDictionary[str, FolderLock]" = weakref.WeakValueDictionary()


class OutputInUse(RuntimeError):
    """The output folder is locked by another running process."""


class FolderLock:
    """An open, `flock`ed lock file; released when closed or garbage-collected. A lock handed to the
    other processes of a launch is not copied: it unpickles as None (a spawned rank holds nothing)."""

    def __init__(self, path: Path, fd: int, created: bool, made_folder: bool = False):
        self.path, self.fd, self.created, self.made_folder = path, fd, created, made_folder

    def sign(self) -> None:
        """Write who holds the lock (pid, command line, start time) into the lock file."""
        owner = {"pid": os.getpid(), "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(owner).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def abandon(self) -> None:
        """Release, and remove the lock file if this lock created it (and the folder, if taking the lock
        made it and it is still empty): a run refused by the checks that follow the lock leaves the folder
        as it found it. (Safe: a process that opened the file before it was removed finds it gone once it
        holds the lock, and tries again.)"""
        if self.fd is not None and self.created:
            self.path.unlink(missing_ok=True)
            if self.made_folder:
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass
        self.release()

    def __del__(self):
        self.release()

    def __reduce__(self):
        return (type(None), ())


def is_first_process() -> bool:
    """False in the second, third, ... process of a multi-process launch."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def holder(path: Path) -> str:
    """Who holds the lock file `path`, as written by `lock_folder`, in words."""
    try:
        owner = json.loads(path.read_text())
        os.kill(owner["pid"], 0)  # the file may still name an earlier holder, gone since
        return f"pid {owner['pid']}, started {owner['started']}: {' '.join(owner['command'])}"
    except PermissionError:  # alive, another user's
        return f"pid {owner['pid']}, started {owner['started']}: {' '.join(owner['command'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


def lock_folder(folder: str | Path, option: str = "--out", sign: bool = True) -> Optional[FolderLock]:
    """Create `folder` if needed and lock it for this run (`<folder>/.lock`), or raise `OutputInUse`
    naming the process that holds it. Creating the lock file is also the first write to the folder: a
    folder that can't be written is reported here (OSError naming the file), before any work. Returns
    None in a process that is not the first of a launch (see the module docstring)."""
    return lock_file(Path(folder) / LOCK_NAME, f"{option} {folder}", option, sign)


def lock_outputs(path: str | Path, option: str = "--out") -> Optional[FolderLock]:
    """Lock the outputs named after the file `path` (`calibrate`'s table and the files beside it)
    with `<path>.lock` beside them, as `lock_folder` locks a folder."""
    path = Path(path)
    return lock_file(path.with_name(path.name + ".lock"), f"{option} {path}", option)


def lock_file(path: Path, what: str, option: str, sign: bool = True) -> Optional[FolderLock]:
    """Lock `path` (created with its folder if needed), for `lock_folder` and `lock_outputs`; `sign`
    writes this process's name into it at once."""
    if not is_first_process():
        return None
    if fcntl is None:
        raise OSError(f"{option}: locking a run's outputs needs fcntl.flock (Linux, macOS); this platform "
                      f"({sys.platform}) has none")
    key = str(path.resolve())
    held = _held.get(key)
    if held is not None and held.fd is not None:
        return held
    made_folder = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputInUse(f"{what} is in use by another run ({holder(path)}); wait for it to end, or choose "
                              f"another {option}") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the file was removed (`abandon`) between our open and our lock: lock the new one
    lock = FolderLock(path, fd, created, made_folder)
    if sign:
        lock.sign()
    _held[key] = lock
    return lock


def holds_files(folder: str | Path) -> bool:
    """Whether the folder `folder` holds anything but its lock file."""
    return any(p.name != LOCK_NAME for p in Path(folder).iterdir())


def lock_new_folder(folder: str | Path, option: str = "--out") -> Optional[FolderLock]:
    """`lock_folder` for a command that never writes into a folder that holds files: refused
    (InputError) when `folder` holds any, checked once the lock is held."""
    from uncdiff.io.files import InputError

    def check() -> None:
        if holds_files(folder):
            raise InputError(f"{option} {folder} is not an empty folder; nothing is overwritten (choose another "
                             f"{option})")

    return lock_and_check(folder, check, option)[0]


def lock_and_check(folder: str | Path, check: Callable[[], T], option: str = "--out") -> tuple[Optional[FolderLock], T]:
    """`(lock_folder(folder), check())`: the folder's contents checked once no other run can change
    them. The lock is signed once `check` passes; when it raises, the folder is left as it was: the
    lock file is removed again if it was made here (`abandon`), and an earlier run's is not rewritten."""
    was_held = _held.get(str((Path(folder) / LOCK_NAME).resolve())) is not None  # by this process, re-entered
    lock = lock_folder(folder, option, sign=False)
    try:
        result = check()
    except BaseException:
        if lock is not None and not was_held:
            lock.abandon()
        raise
    if lock is not None and not was_held:
        lock.sign()
    return lock, result
