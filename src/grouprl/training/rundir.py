"""The run's output folder: one run per folder, one process per run.

A folder that already holds a run (its config, metrics, checkpoints or reference) is never
mixed with a new one: without `train.resume` the new run refuses and names the two ways
forward, and `train.overwrite` moves the old run aside first. A lock file held with
`fcntl.flock` for the life of the process keeps a second process out; the kernel drops the
lock when its holder dies, so the lock of a killed run is never stale.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from grouprl.config import ConfigError

log = logging.getLogger("grouprl")

LOCK_NAME = ".grouprl.lock"
# what a run writes: any of these means the folder holds a run
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "reference", "tensorboard")


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / m).exists() for m in RUN_MARKERS)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run into a folder that holds an earlier one (before any work)."""
    if resume and overwrite:
        raise ConfigError(
            "train.overwrite: cannot be combined with train.resume=true "
            "(resume continues the run in the folder; overwrite moves it aside)"
        )
    if resume or overwrite or not holds_a_run(run_dir):
        return
    raise ConfigError(
        f"train.output_dir: {run_dir} already holds a run. Continue it with "
        f"train.resume=true, or start over with train.overwrite=true (the old run is moved "
        f"to {run_dir}.old-<time>), or choose another train.output_dir"
    )


def move_aside(run_dir: Path) -> Path | None:
    """With `train.overwrite`: move the earlier run's files to `<dir>.old-<time>` (never
    delete them). Called with the run's lock held, so a live run is never moved."""
    if not holds_a_run(run_dir):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while dest.exists():
        dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    dest.mkdir(parents=True)
    for entry in run_dir.iterdir():
        if entry.name != LOCK_NAME:
            os.replace(entry, dest / entry.name)
    log.warning("train.overwrite=true: moved the earlier run in %s to %s", run_dir, dest)
    return dest


class RunLock:
    """An exclusive lock on `<run_dir>/.grouprl.lock` for as long as it is held.

    Acquiring fails at once with a ConfigError that names the holder (pid, host, start time)
    when another live process holds it. The file's contents are only for that message.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"train.output_dir: another grouprl run is using {self.path.parent} ({holder}); "
                "wait for it to finish, or choose another train.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
