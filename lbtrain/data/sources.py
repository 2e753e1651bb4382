"""The load functions of the shipped registry entries (`lbtrain.data.registry`): each takes (entry, dataset
config) and returns an `ArrayDataset` (held in memory) or an `ImageFolderDataset` (streamed from disk).

`load_torchvision` serves any in-memory torchvision dataset from its entry's facts alone: the class named by
`entry.torchvision` is read as `.data` (uint8, (N, H, W) or (N, H, W, C)) and `.targets`, and a missing or
unreadable copy becomes the one-line error naming `entry.probe`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lbtrain.data.datasets import ArrayDataset, ImageFolderDataset
from lbtrain.data.files import DatasetNotFoundError, imagenet_folder, imagenet_missing, probe_missing, resolve_root
from lbtrain.data.registry import DatasetEntry, option

__all__ = ["load_digits", "load_imagenet", "load_synthetic", "load_torchvision", "make_synthetic"]


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of uint8 images in [0, 1] units, from 256-bin histograms
    (bincount is ~10x faster than a float pass over the data and needs no big temporaries)."""
    v = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(x.shape[1]):
        p = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        p /= p.sum()
        m = float((p * v).sum())
        mean.append(m)
        std.append(max(float((p * v.square()).sum()) - m * m, 0.0) ** 0.5)
    return tuple(mean), tuple(std)


def load_digits(entry: DatasetEntry, cfg: Any) -> ArrayDataset:
    """scikit-learn's 8x8 digits (bundled with the package, so it works offline): 1536 train / 261 val."""
    # Read the CSV that ships inside scikit-learn (what `sklearn.datasets.load_digits` reads) without
    # importing sklearn, whose import costs ~2 s of start-up for every run.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError("the digits dataset ships with scikit-learn: pip install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",")  # 1797 rows: 64 pixels in 0..16, then the label
    x = torch.from_numpy(np.rint(table[:, :64] * (255.0 / 16.0)).astype(np.uint8)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(table[:, 64].astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = 1536  # = 3 * 512 = 96 * 16, so every batch size 16..512 in powers of two divides it
    tr, va = perm[:n_train], perm[n_train:]
    mean, std = _channel_stats(x[tr])
    return ArrayDataset(entry.name, x[tr].contiguous(), y[tr], x[va].contiguous(), y[va], 10, mean, std)


def load_torchvision(entry: DatasetEntry, cfg: Any) -> ArrayDataset:
    """The torchvision dataset class `entry.torchvision`, both splits held in memory as uint8 (N, C, H, W)."""
    import torchvision.datasets as tvd

    root, download = resolve_root(option(cfg, "root")), bool(option(cfg, "download", False))
    cls_name, probe = str(entry.torchvision), str(entry.probe)
    cls = getattr(tvd, cls_name)
    try:
        train = cls(str(root), train=True, download=download)
        val = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as e:  # torchvision: RuntimeError if missing; URLError (OSError) offline
        raise probe_missing(cls_name, root, probe, tried_download=download, cause=e if download else None,
                            downloadable=entry.downloadable, md5_checked=entry.name.startswith("cifar")) from e

    def arrays(split: Any) -> tuple[Tensor, Tensor]:
        data = split.data
        if isinstance(data, np.ndarray):  # CIFAR: (N, H, W, C) numpy
            x = torch.from_numpy(data).permute(0, 3, 1, 2)
        else:  # MNIST family: (N, H, W) uint8 tensor
            x = data.unsqueeze(1)
        return x.contiguous(), torch.as_tensor(split.targets, dtype=torch.int64)

    (tx, ty), (vx, vy) = arrays(train), arrays(val)
    assert entry.num_classes is not None and entry.mean is not None and entry.std is not None
    return ArrayDataset(entry.name, tx, ty, vx, vy, entry.num_classes, entry.mean, entry.std)


def make_synthetic(shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, train_size: int = 4096,
                   val_size: int = 1024, seed: int = 0) -> ArrayDataset:
    """Uniform-noise uint8 images whose label is the argmax of a fixed random linear map of the image.

    The map acts on a coarse (<= 4x4 average-pooled) view, so the rule is linear in the pixels (an MLP can
    fit it) yet smooth enough for a small convnet to pick up. Content depends only on `seed` (default 0),
    never on the training seed, so every run of a sweep sees the same data.
    """
    c, h, w = (int(s) for s in shape)
    g = torch.Generator().manual_seed(seed)
    n = train_size + val_size
    x = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)
    ph, pw = min(h, 4), min(w, 4)
    proj = torch.randn(c * ph * pw, num_classes, generator=g)
    y = torch.empty(n, dtype=torch.int64)
    for i in range(0, n, 8192):  # chunked so float copies stay small for big synthetic sets
        feats = F.adaptive_avg_pool2d(x[i : i + 8192].float().sub_(127.5), (ph, pw)).flatten(1)
        y[i : i + 8192] = (feats @ proj).argmax(1)
    mean, std = _channel_stats(x[:train_size])
    return ArrayDataset("synthetic", x[:train_size], y[:train_size], x[train_size:], y[train_size:],
                        num_classes, mean, std)


def load_synthetic(entry: DatasetEntry, cfg: Any) -> ArrayDataset:
    """`make_synthetic` with the shape, classes and sizes of the config (`dataset.shape`, ...)."""
    f = entry.for_config(cfg)
    assert f.input_shape is not None and f.num_classes is not None
    assert f.train_size is not None and f.val_size is not None
    return make_synthetic(shape=f.input_shape, num_classes=f.num_classes, train_size=f.train_size,
                          val_size=f.val_size, seed=int(option(cfg, "seed", 0)))


def load_imagenet(entry: DatasetEntry, cfg: Any) -> ImageFolderDataset:
    """ImageNet in ImageFolder layout. `dataset.root` may be the imagenet folder itself (holding train/ and val/),
    otherwise root/imagenet is used."""
    from torchvision.datasets import ImageFolder

    root = resolve_root(option(cfg, "root"))
    base = imagenet_folder(root)
    try:
        train, val = ImageFolder(str(base / "train")), ImageFolder(str(base / "val"))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images
        raise imagenet_missing(root, base, cause=e) from e
    shape = entry.for_config(cfg).input_shape  # (3, image_size, image_size)
    assert shape is not None
    return ImageFolderDataset(entry.name, base, train, val, len(train.classes), shape[-1],
                              int(option(cfg, "workers", 8)), augment=bool(option(cfg, "augment", True)))
