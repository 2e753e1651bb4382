"""Datasets: the in-memory and the folder-streamed kind, and `load_dataset`, which builds the one a dataset config
names through its registry entry (`lbtrain.data.registry`) and applies `dataset.augment` and `dataset.subset`.

The "val" split of MNIST / Fashion-MNIST / CIFAR is the official test split.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lbtrain.data.files import resolve_root
from lbtrain.data.registry import REGISTRY, entry, option

__all__ = ["ArrayDataset", "ImageFolderDataset", "SUBSET_SEED", "class_balanced_subset", "load_dataset"]

HOLDOUT_SEED = 20172  # dataset.holdout is drawn with this fixed seed (never the run's), before any subset
SUBSET_SEED = 20171  # dataset.subset is drawn with this fixed seed, never the run's: every run of a sweep
# trains on the same samples
_IMAGENET = REGISTRY["imagenet"]


@dataclass
class ArrayDataset:
    """A train/val split pair held in memory: images uint8 (N, C, H, W), labels int64 (N,)."""

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False  # pad-4 random crop + horizontal flip for the training split
    # with dataset.holdout: the official validation split, evaluated at the end only (val_* is then the holdout)
    test_x: Tensor | None = None
    test_y: Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def train_size(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def val_size(self) -> int:
        return int(self.val_x.shape[0])


@dataclass
class ImageFolderDataset:
    """ImageNet-style train/ and val/ folders (one subfolder per class), decoded lazily by workers."""

    name: str
    root: Path
    train: Any  # torchvision.datasets.ImageFolder
    val: Any
    num_classes: int
    image_size: int = 224
    workers: int = 8
    mean: tuple[float, ...] = _IMAGENET.mean  # type: ignore[assignment]
    std: tuple[float, ...] = _IMAGENET.std  # type: ignore[assignment]
    augment: bool = True  # RandomResizedCrop + flip; False -> the val transform for training too

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def val_size(self) -> int:
        return len(self.val)


def load_dataset(cfg: Any) -> ArrayDataset | ImageFolderDataset:
    """Build the dataset named by `cfg.name` (fields: name, root, download, augment, subset, + the ones its
    registry entry reads) with that entry's load function."""
    e = entry(str(option(cfg, "name")).lower().replace("-", "_"))
    ds = e.loader()(e, cfg)
    if isinstance(ds, ArrayDataset):  # a folder-streamed dataset reads `augment` itself and takes no subset
        ds.augment = bool(option(cfg, "augment", False))
        holdout = option(cfg, "holdout")
        if holdout:
            hold = class_balanced_subset(ds.train_y, int(holdout), ds.num_classes, seed=HOLDOUT_SEED)
            rest = torch.ones(ds.train_size, dtype=torch.bool)
            rest[hold] = False
            ds.test_x, ds.test_y = ds.val_x, ds.val_y
            ds.val_x, ds.val_y = ds.train_x[hold].contiguous(), ds.train_y[hold]
            ds.train_x, ds.train_y = ds.train_x[rest].contiguous(), ds.train_y[rest]
        subset = option(cfg, "subset")
        if subset:
            keep = class_balanced_subset(ds.train_y, int(subset), ds.num_classes)
            # normalization keeps the whole split's statistics: a subset is fewer samples of the same data
            ds.train_x, ds.train_y = ds.train_x[keep].contiguous(), ds.train_y[keep]
    return ds


def download_if_missing(cfg: Any) -> None:
    """With `download=true`, fetch a downloadable dataset whose files are missing now, in the pre-flight check, so a
    failed download refuses the run before its folder exists; a data folder this made is removed again on failure
    (nothing half-made is left behind)."""
    e = entry(str(option(cfg, "name")).lower().replace("-", "_"))
    if not option(cfg, "download", False) or not e.downloadable or e.probe is None:
        return
    root = resolve_root(option(cfg, "root"))
    if (root / str(e.probe)).exists():
        return
    made = not root.exists()
    try:
        load_dataset(cfg)
    except BaseException:
        if made:
            shutil.rmtree(root, ignore_errors=True)
        raise


def class_balanced_subset(labels: Tensor, n: int, num_classes: int, seed: int = SUBSET_SEED) -> Tensor:
    """Indices (ascending) of `n` training samples, n // C of each class and one more for n % C classes, drawn
    with a fixed generator (`seed`, never the run's seed), so every run of a sweep trains on the same subset.

    Which classes get the extra sample is drawn from the same generator. A class with fewer samples than its
    share is a ValueError (the pre-flight check turns it into a config error before any work)."""
    if not 1 <= n <= labels.numel():
        raise ValueError(f"subset of {n} from {labels.numel()} samples")
    g = torch.Generator().manual_seed(seed)
    quota = torch.full((num_classes,), n // num_classes, dtype=torch.int64)
    quota[torch.randperm(num_classes, generator=g)[: n % num_classes]] += 1
    picked = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        k = int(quota[c])
        if k > members.numel():
            raise ValueError(f"class {c} has {members.numel()} samples, fewer than its share {k} of the subset")
        picked.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    return torch.cat(picked).sort().values

