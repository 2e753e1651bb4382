"""Atomic checkpoint and JSON writes, and verified loads: nothing is ever half-written or half-read."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

_MAGIC = b"LBTRAIN-CKPT-1 "


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, or from another run."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save `state` behind a header holding its SHA-256, written atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by save_checkpoint; raise CheckpointError unless it is intact."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    header, _, payload = data.partition(b"\n")
    if not header.startswith(_MAGIC):
        raise CheckpointError(f"{path} is not an lbtrain checkpoint (bad header)")
    if hashlib.sha256(payload).hexdigest().encode() != header[len(_MAGIC):]:
        raise CheckpointError(f"{path} is truncated or corrupt (checksum mismatch); delete it to start over")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
