"""A run folder: who may write it (one process, by an OS lock) and which run it holds.

The lock is `fcntl.flock` on `<run>/.lock`, held for the life of the run. The kernel releases it when the process
ends, however it ends (SIGKILL included), so a lock is never stale. The file holds the holder's pid, host, start
time and command line, for the message a second writer gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbtrain.checkpoint import CHECKPOINT_KEYS, CheckpointError, load_checkpoint, read_checkpoint_meta
from lbtrain.config import ConfigError
from lbtrain.identity import describe_diff, diff
from lbtrain.results import Results, ResultsError, read_results

LOCK_NAME = ".lock"


class RunFolderError(RuntimeError):
    """A run folder that this command must not write: locked by another process, or holding another run."""


class RunLock:
    """An exclusive, non-blocking lock on a run folder, released by `release()` or when the process ends."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderError(f"{self.folder} is being written by another lbtrain process ({holder}); wait for "
                                 "it to finish, or stop it (it checkpoints on SIGTERM)") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_holder(folder: str | Path) -> str | None:
    """Who holds `folder`'s lock right now (None: nobody). Looks without taking it for longer than a moment."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    finally:
        os.close(fd)
    return None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


@dataclass
class FolderState:
    """What a run folder already holds."""

    path: Path
    results: Results | None  # None: no results.json
    checkpoint: dict[str, Any] | None  # the checkpoint's metadata; None: no checkpoint.pt

    @property
    def identity(self) -> dict[str, Any] | None:
        """The identity of the run in the folder (checkpoint first, else results.json); None if there is none."""
        if self.checkpoint and self.checkpoint.get("identity"):
            return self.checkpoint["identity"]
        if self.results and self.results.identity:
            return self.results.identity
        return None

    @property
    def final(self) -> bool:
        """The folder's run is completed or diverged: it is never trained again, and nothing of it is deleted."""
        return self.results is not None and self.results.status in ("completed", "diverged")

    @property
    def empty(self) -> bool:
        return self.results is None and self.checkpoint is None


def inspect_folder(folder: str | Path) -> FolderState:
    """Read what `folder` holds; RunFolderError for a results.json or checkpoint that cannot be read."""
    folder = Path(folder)
    ckpt = folder / "checkpoint.pt"
    try:
        results = read_results(folder / "results.json")
    except ResultsError as e:
        fix = "delete it to rebuild it from the checkpoint" if ckpt.exists() else "delete it to train the run again"
        raise RunFolderError(f"{e}: move it away, or {fix}") from None
    meta = None
    if ckpt.exists():
        try:
            meta = read_checkpoint_meta(ckpt)
        except CheckpointError as e:
            raise RunFolderError(str(e)) from None
    return FolderState(folder, results, meta)


def check_folder(folder: str | Path, ident: dict[str, Any], defaults: dict[str, Any],
                 resume: str | None = None, check_lock: bool = True, verify: bool = False) -> FolderState:
    """Everything about a run folder that can refuse a run, read-only: another live writer, another run's results
    or checkpoint in it, a `resume=PATH` checkpoint that is missing or of another run; with `verify`, the
    checkpoint to resume from is loaded and checked (checksum, keys) too. Returns the folder's state."""
    folder = Path(folder)
    holder = lock_holder(folder) if check_lock else None
    if holder is not None:
        raise RunFolderError(f"{folder} is being written by another lbtrain process ({holder}); wait for it to "
                             "finish, or stop it (it checkpoints on SIGTERM)")
    state = inspect_folder(folder)
    theirs = state.identity
    if not state.empty:
        if theirs is None:
            raise RunFolderError(f"{folder} holds a run without a recorded identity (written by an older lbtrain); "
                                 "choose another folder (hydra.run.dir=PATH) or move it away")
        changes = diff(theirs, ident, defaults)
        if changes:
            raise RunFolderError(f"{folder} holds another run ({describe_diff(changes, 'there', 'this run')}); "
                                 "choose another folder (hydra.run.dir=PATH) or move it away")
    if verify and state.checkpoint is not None and not state.final:
        try:
            load_checkpoint(folder / "checkpoint.pt", required=CHECKPOINT_KEYS)
        except CheckpointError as e:
            raise RunFolderError(str(e)) from None
    if resume and state.checkpoint is None:
        path = Path(resume)
        if not path.is_file():
            raise ConfigError("resume", str(path), "no such checkpoint file")
        try:
            meta = read_checkpoint_meta(path)
        except CheckpointError as e:
            raise ConfigError("resume", str(path), str(e)) from None
        if not meta.get("identity"):
            raise ConfigError("resume", str(path), "checkpoint written by an older lbtrain without a run identity")
        changes = diff(meta["identity"], ident, defaults)
        if changes:
            raise ConfigError("resume", str(path), "checkpoint belongs to another run: "
                              + describe_diff(changes, "checkpoint", "this run"))
        if verify:
            try:
                load_checkpoint(path, required=CHECKPOINT_KEYS)
            except CheckpointError as e:
                raise ConfigError("resume", str(path), str(e)) from None
    return state
