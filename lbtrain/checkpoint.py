"""Atomic checkpoint and JSON writes, and verified loads: nothing is ever half-written or half-read.

Checkpoint format (version 2): one header line `LBTRAIN-CKPT-2 <sha256> <n>\\n`, then `n` bytes of JSON metadata
(the run's identity, its hash, status and update: readable without loading the tensors), then the `torch.save`
payload. The SHA-256 covers `<n>\\n`, the metadata and the payload. Version 1 files (no metadata) still load.

Loading never runs code a checkpoint carries. The SHA-256 is a checksum, not a signature: anyone can write a file
that passes it, and a pickle can name any callable to run as it is read (`__reduce__` -> `os.system`). Checkpoints are
read back from shared output folders (`lbtrain-interp RUN_A RUN_B`, `resume=PATH`, a re-run), so the payload is
unpickled with `torch.load(weights_only=True)`: tensors and plain containers only, anything else refused unread. To
keep every checkpoint loadable that way, `save_checkpoint` accepts only what it allows (`PLAIN_TYPES` and tensors).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbtrain.results import dumps

if TYPE_CHECKING:
    pass  # imported where tensors are saved or loaded: the rest of this module (and every config error
    # the CLI reports) does not pay for it

CHECKPOINT_KEYS = ("model", "optimizer", "w0", "state", "rng", "identity")  # what a run checkpoint must hold
_MAGIC1 = b"LBTRAIN-CKPT-1 "
_MAGIC2 = b"LBTRAIN-CKPT-2 "
# What a checkpoint may hold besides tensors (torch.Tensor, nn.Parameter, torch.Size, torch.dtype), checked by
# type, not isinstance: a subclass (numpy.float64 of float, an Enum of str, defaultdict of dict) pickles as a
# reference to its class, which weights_only=True refuses. All of these are in torch.load(weights_only=True)'s
# default allow-list since torch 2.4, our floor (later versions load more, e.g. set and bytes: not relied on).
PLAIN_TYPES: tuple[type, ...] = (dict, OrderedDict, list, tuple, str, int, float, bool, type(None))


def _umask() -> int:
    """The process's umask, read without changing it where the OS says it (Linux), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, or from another run."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`. The file gets the mode a
    plain open() would (the umask is respected). An OSError always names `path` (ENOSPC from write() has none)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would give: mkstemp alone makes every file 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (non-finite floats written as null), atomically."""
    atomic_write_bytes(path, dumps(obj).encode())


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the `.NAME.*.tmp` files a process killed in the middle of an atomic write left in `folder`.
    Only call this while holding the folder's lock (no live writer can own them)."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _check_plain(obj: Any, where: str = "state") -> None:
    """TypeError naming the first value of `obj` (and where it lies) that torch.load(weights_only=True) would refuse:
    a run that checkpoints one would fail only when it resumes, maybe hours later."""
    import torch

    kind = type(obj)
    if kind in (torch.Tensor, torch.nn.Parameter, torch.Size, torch.dtype):
        return
    if kind not in PLAIN_TYPES:
        raise TypeError(f"checkpoint {where} is a {kind.__module__}.{kind.__qualname__}: a checkpoint holds only "
                        "tensors and plain dict/list/tuple/str/int/float/bool/None (convert it: float(x), "
                        ".tolist(), a dict of its fields), so that loading it never runs code")
    if kind in (dict, OrderedDict):
        for k, v in obj.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    elif kind in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")


def save_checkpoint(path: str | Path, state: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
    """torch.save `state` behind a header holding the SHA-256 and JSON `meta`, written atomically. `state` may hold
    only tensors and plain containers (PLAIN_TYPES): anything else is a TypeError, before anything is written."""
    import torch

    _check_plain(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    meta_bytes = dumps(meta or {}).encode()
    body = meta_bytes + buf.getvalue()
    length = f"{len(meta_bytes)}\n".encode()
    header = _MAGIC2 + hashlib.sha256(length + body).hexdigest().encode() + b" " + length
    atomic_write_bytes(path, header + body)


def _split(path: Path, data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(expected sha256 hex, metadata bytes, payload, the bytes the digest covers) of a checkpoint file."""
    header, _, body = data.partition(b"\n")
    if header.startswith(_MAGIC2):
        parts = header[len(_MAGIC2):].split(b" ")
        if len(parts) != 2 or not parts[1].isdigit():
            raise CheckpointError(f"{path} is truncated or corrupt (bad header); delete it to start over")
        n = int(parts[1])
        return parts[0], body[:n], body[n:], parts[1] + b"\n" + body
    if header.startswith(_MAGIC1):
        return header[len(_MAGIC1):], b"", body, body
    raise CheckpointError(f"{path} is not an lbtrain checkpoint (bad header)")


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint ({} for a version-1 file), without loading or verifying the tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.readline(4096)
            if head.startswith(_MAGIC1):
                return {}
            if not head.startswith(_MAGIC2):
                raise CheckpointError(f"{path} is not an lbtrain checkpoint (bad header)")
            parts = head.rstrip(b"\n")[len(_MAGIC2):].split(b" ")
            if len(parts) != 2 or not parts[1].isdigit():
                raise CheckpointError(f"{path} is truncated or corrupt (bad header); delete it to start over")
            meta = f.read(int(parts[1]))
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    try:
        out = json.loads(meta)
    except ValueError:
        raise CheckpointError(f"{path} is truncated or corrupt (bad metadata); delete it to start over") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path} is truncated or corrupt (bad metadata); delete it to start over")
    return out


def load_checkpoint(path: str | Path, map_location: Any = "cpu", required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint written by save_checkpoint; raise CheckpointError unless it is intact, holds only tensors
    and plain data (nothing in it is run: see the module docstring), and holds every key of `required`."""
    import torch

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    digest, _, payload, covered = _split(path, data)
    if hashlib.sha256(covered).hexdigest().encode() != digest:
        raise CheckpointError(f"{path} is truncated or corrupt (checksum mismatch); delete it to start over")
    try:
        # weights_only=True, always: the restricted unpickler refuses any class or function the file names (other
        # than tensor rebuilds and plain containers) before calling it. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot
        # turn it off (it only changes the default); nothing here widens torch's allow-list.
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # the restricted unpickler's refusal (its text spans many lines)
        name = re.search(r"GLOBAL ([\w.]{1,100})", str(e))  # the callable or class it names, e.g. posix.system
        raise CheckpointError(f"{path} holds objects that are not tensors or plain data"
                              f"{f' ({name.group(1)})' if name else ''}, so it was not loaded (loading could run "
                              "code it carries); use only checkpoints lbtrain wrote") from None
    except Exception as e:  # a file that checks out but does not unpickle: written by something else
        raise CheckpointError(f"{path} cannot be loaded ({type(e).__name__}: {e})".splitlines()[0]) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold an lbtrain checkpoint (a {type(state).__name__})")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(map(repr, missing))} (written by another version of "
                              "lbtrain?); delete it to start over")
    return state
