"""Where dataset files are looked for, and the one-line error when they are not there. No torch import: the
pre-flight check looks for the files before anything heavy is loaded.

Where data is looked for: `dataset.root`, else $LBTRAIN_DATA, else ./data (see `resolve_root`).
"""

from __future__ import annotations

import os
from pathlib import Path


class DatasetNotFoundError(RuntimeError):
    """Dataset files missing (or download failed); the one-line message says where we looked and the fixes.

    Also importable as `lbtrain.config.DatasetNotFoundError` (the CLI reports it, like a ConfigError, as one line)."""


IMAGENET_HOLDING = "imagenet/train/ and imagenet/val/ (one folder per class)"


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """Data root: `root` if given, else the LBTRAIN_DATA environment variable, else ./data (made absolute).

    Relative paths are taken against the current working directory at call time.
    """
    chosen = root or os.environ.get("LBTRAIN_DATA") or "data"
    return Path(chosen).expanduser().resolve()


def not_found(what: str, root: Path, looked_for: str, holding: str, *, tried_download: bool = False,
              cause: BaseException | None = None, downloadable: bool = True,
              md5_checked: bool = False) -> DatasetNotFoundError:
    """One-line error: what was missing, where we looked, and how to fix it."""
    status = "not found or corrupted (MD5 mismatch)" if md5_checked else "not found"
    msg = f"{what} {status} under {root} (looked for {looked_for})"
    if tried_download:
        msg += " and dataset.download=true failed"
    if cause is not None:
        msg += f" [{' '.join(str(cause).split())}]"  # flattened so the message stays on one line
    fix = f"set dataset.root=PATH or LBTRAIN_DATA=PATH to a folder holding {holding}"
    if not downloadable:
        fix += f" ({what} cannot be downloaded automatically)"
    elif tried_download:
        fix += ", or retry dataset.download=true with network access"
    else:
        fix += ", or dataset.download=true"
    return DatasetNotFoundError(f"{msg}: {fix}")


def probe_missing(what: str, root: Path, probe: str, *, tried_download: bool = False,
                  cause: BaseException | None = None, downloadable: bool = True,
                  md5_checked: bool = False) -> DatasetNotFoundError:
    """The error for a dataset whose `probe` file (relative to `root`) is missing or unreadable: the probe's top
    folder is what the root should hold."""
    return not_found(what, root, str(root / probe), probe.split("/")[0] + "/", tried_download=tried_download,
                     cause=cause, downloadable=downloadable, md5_checked=md5_checked)


def imagenet_folder(root: Path) -> Path:
    """The folder holding ImageNet's train/ and val/: `root` itself when it holds both, else root/imagenet.
    DatasetNotFoundError when neither does."""
    base = root if (root / "train").is_dir() and (root / "val").is_dir() else root / "imagenet"
    if not ((base / "train").is_dir() and (base / "val").is_dir()):
        raise imagenet_missing(root, base)
    return base


def imagenet_missing(root: Path, base: Path, cause: BaseException | None = None) -> DatasetNotFoundError:
    """The error for ImageNet missing (or unreadable: `cause`) under `base` = `root` or root/imagenet."""
    return not_found("ImageNet", root, f"{base / 'train'} and {base / 'val'}", IMAGENET_HOLDING, cause=cause,
                     downloadable=False)
