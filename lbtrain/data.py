"""Datasets and loaders: everything that turns files on disk into training batches.

Small datasets (digits, MNIST, Fashion-MNIST, CIFAR, synthetic) are held whole in memory as uint8
tensors and served by `DeviceLoader`, which keeps them on the training device and does shuffling,
pad-4 random crop, horizontal flip and normalization as a handful of batched tensor ops per step
(the airbench recipe): no per-sample Python, no worker processes, no host->device copies.
ImageNet is the exception and streams JPEGs through torch's DataLoader (`ImageFolderLoader`).

Both loaders share one contract so the trainer need not care which it has:
  * an epoch's sample order and augmentation are a pure function of (seed, epoch), so a run resumed
    at `start_step` sees exactly the batches an uninterrupted run would have seen;
  * every training step has exactly `batch` samples (drop_last), as ghost batch norm requires;
  * the batch size may change from one epoch to the next;
  * under data parallelism rank r of W gets the strided share r::W of each global batch (not a contiguous
    slice: ghost batches are strided subsets, see `lbtrain.ghost_bn`, and so stay whole on one rank).

Where data is looked for: `dataset.root`, else $LBTRAIN_DATA, else ./data (see `resolve_root`).
The "val" split of MNIST / Fashion-MNIST / CIFAR is the official test split.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lbtrain.catalog import DATASET_FACTS, DATASETS
from lbtrain.config import DatasetNotFoundError

__all__ = ["DATASETS", "DatasetNotFoundError", "load_dataset", "make_loaders", "DeviceLoader",
           "ImageFolderLoader", "ArrayDataset", "ImageFolderDataset", "resolve_root", "class_balanced_subset"]

PAD = 4  # pixels of zero padding for the random-crop augmentation (standard CIFAR recipe)
SUBSET_SEED = 20171  # dataset.subset is drawn with this fixed seed, never the run's: every run of a sweep
# trains on the same samples
_IMAGENET = DATASET_FACTS["imagenet"]

def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """Data root: `root` if given, else the LBTRAIN_DATA environment variable, else ./data (made absolute).

    Relative paths are taken against the current working directory at call time.
    """
    chosen = root or os.environ.get("LBTRAIN_DATA") or "data"
    return Path(chosen).expanduser().resolve()


# --------------------------------------------------------------------------------------------------
# Datasets


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


def _opt(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg.key for an attribute object or a mapping (OmegaConf DictConfig is both); default if absent/None."""
    try:
        value = cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def load_dataset(cfg: Any) -> ArrayDataset | ImageFolderDataset:
    """Build the dataset named by `cfg.name` (fields: name, root, download, augment, + per-dataset ones)."""
    name = str(_opt(cfg, "name")).lower().replace("-", "_")
    augment = bool(_opt(cfg, "augment", False))
    if name == "digits":
        ds = _load_digits()
    elif name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        ds = _load_torchvision(name, resolve_root(_opt(cfg, "root")), bool(_opt(cfg, "download", False)))
    elif name == "synthetic":
        ds = make_synthetic(
            shape=tuple(_opt(cfg, "shape", (3, 32, 32))),
            num_classes=int(_opt(cfg, "num_classes", 10)),
            train_size=int(_opt(cfg, "train_size", 4096)),
            val_size=int(_opt(cfg, "val_size", 1024)),
            seed=int(_opt(cfg, "seed", 0)),
        )
    elif name == "imagenet":
        return _load_imagenet(
            resolve_root(_opt(cfg, "root")),
            image_size=int(_opt(cfg, "image_size", 224)),
            workers=int(_opt(cfg, "workers", 8)),
            augment=bool(_opt(cfg, "augment", True)),
        )
    else:
        raise ValueError(f"unknown dataset.name={name!r}; expected one of {', '.join(DATASETS)}")
    ds.augment = augment
    subset = _opt(cfg, "subset")
    if subset:
        keep = class_balanced_subset(ds.train_y, int(subset), ds.num_classes)
        # normalization keeps the whole split's statistics: a subset is fewer samples of the same data
        ds.train_x, ds.train_y = ds.train_x[keep].contiguous(), ds.train_y[keep]
    return ds


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


def _load_digits() -> ArrayDataset:
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
    return ArrayDataset("digits", x[tr].contiguous(), y[tr], x[va].contiguous(), y[va], 10, mean, std)


def _not_found(what: str, root: Path, looked_for: str, holding: str, *, tried_download: bool = False,
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


def check_present(cfg: Any) -> None:
    """Raise DatasetNotFoundError (the same one line loading would give) when a dataset's files are not where the
    config says and `download` is off. Cheap: it looks for one file or folder; loading verifies the rest."""
    name = str(_opt(cfg, "name"))
    facts = DATASET_FACTS.get(name)
    if facts is None or facts.name in ("digits", "synthetic"):
        return
    root = resolve_root(_opt(cfg, "root"))
    if facts.name == "imagenet":
        base = root if (root / "train").is_dir() and (root / "val").is_dir() else root / "imagenet"
        if not ((base / "train").is_dir() and (base / "val").is_dir()):
            raise _not_found("ImageNet", root, f"{base / 'train'} and {base / 'val'}",
                             "imagenet/train/ and imagenet/val/ (one folder per class)", downloadable=False)
        return
    if not bool(_opt(cfg, "download", False)) and not (root / str(facts.probe)).exists():
        raise _not_found(str(facts.torchvision), root, str(root / str(facts.probe)),
                         str(facts.probe).split("/")[0] + "/")


def _load_torchvision(name: str, root: Path, download: bool) -> ArrayDataset:
    import torchvision.datasets as tvd

    facts = DATASET_FACTS[name]
    cls_name, probe, mean, std, num_classes = facts.torchvision, facts.probe, facts.mean, facts.std, facts.num_classes
    cls = getattr(tvd, cls_name)
    try:
        train = cls(str(root), train=True, download=download)
        val = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as e:  # torchvision: RuntimeError if missing; URLError (OSError) offline
        holding = probe.split("/")[0] + "/"
        raise _not_found(cls_name, root, str(root / probe), holding, tried_download=download,
                         cause=e if download else None, md5_checked=name.startswith("cifar")) from e

    def arrays(split: Any) -> tuple[Tensor, Tensor]:
        data = split.data
        if isinstance(data, np.ndarray):  # CIFAR: (N, H, W, C) numpy
            x = torch.from_numpy(data).permute(0, 3, 1, 2)
        else:  # MNIST family: (N, H, W) uint8 tensor
            x = data.unsqueeze(1)
        return x.contiguous(), torch.as_tensor(split.targets, dtype=torch.int64)

    (tx, ty), (vx, vy) = arrays(train), arrays(val)
    return ArrayDataset(name, tx, ty, vx, vy, num_classes, mean, std)


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


def _load_imagenet(root: Path, *, image_size: int, workers: int, augment: bool) -> ImageFolderDataset:
    """ImageNet in ImageFolder layout. `root` may be the imagenet folder itself (holding train/ and val/),
    otherwise root/imagenet is used."""
    from torchvision.datasets import ImageFolder

    base = root if (root / "train").is_dir() and (root / "val").is_dir() else root / "imagenet"
    looked_for = f"{base / 'train'} and {base / 'val'}"
    holding = "imagenet/train/ and imagenet/val/ (one folder per class)"
    if not ((base / "train").is_dir() and (base / "val").is_dir()):
        raise _not_found("ImageNet", root, looked_for, holding, downloadable=False)
    try:
        train, val = ImageFolder(str(base / "train")), ImageFolder(str(base / "val"))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images
        raise _not_found("ImageNet", root, looked_for, holding, cause=e, downloadable=False) from e
    return ImageFolderDataset("imagenet", base, train, val, len(train.classes), image_size, workers,
                              augment=augment)


# --------------------------------------------------------------------------------------------------
# Loaders


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 64-bit seed from (seed, epoch); nearby inputs give unrelated streams."""
    mask = (1 << 64) - 1
    return int(np.random.SeedSequence([seed & mask, epoch & mask]).generate_state(1, np.uint64)[0])


def _check_batch(n: int, batch: int, rank: int, world: int) -> int:
    if batch <= 0 or batch > n:
        raise ValueError(f"batch={batch} must be in 1..{n} (the number of training samples)")
    if world <= 0 or batch % world or not 0 <= rank < world:
        raise ValueError(f"batch={batch} must split evenly over world={world} ranks (rank={rank})")
    return batch // world


def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
            dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(x/255 - mean)/std folded into x*scale + shift, shaped to broadcast over (B, C, H, W)."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale, shift = (1.0 / (255.0 * s)), (-m / s)
    return (scale.to(device, dtype).view(1, -1, 1, 1), shift.to(device, dtype).view(1, -1, 1, 1))


class DeviceLoader:
    """Whole dataset on `device` as uint8; batched augmentation.

    Augmentation is torchvision's RandomCrop(size, padding=4) (zero/black padding) + RandomHorizontalFlip,
    done for a whole batch as ONE advanced-indexing gather: sample index, channel, per-sample row grid and
    per-sample (possibly reversed) column grid broadcast to (b, C, H, W). Grid positions that fall in the
    padding are clamped into the image and then zeroed with a mask, so the dataset is held once, unpadded.
    """

    def __init__(self, x_uint8: Tensor, y: Tensor, mean: tuple[float, ...], std: tuple[float, ...], *,
                 augment: bool, device: torch.device | str, seed: int, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        if x_uint8.dtype != torch.uint8 or x_uint8.ndim != 4:
            raise TypeError(f"expected uint8 (N, C, H, W) images, got {x_uint8.dtype} {tuple(x_uint8.shape)}")
        self.device = torch.device(device)
        self.augment, self.seed, self.channels_last, self.dtype = augment, int(seed), channels_last, dtype
        self.n, self.c, self.h, self.w = (int(s) for s in x_uint8.shape)
        self.x = x_uint8.to(self.device).contiguous()  # on the CPU: the caller's tensor itself, no copy
        self.y = y.to(self.device, torch.int64)
        self.scale, self.shift = _affine(mean, std, self.device, dtype)
        self._rows = torch.arange(self.h, device=self.device)
        self._cols = torch.arange(self.w, device=self.device)
        self._chan = torch.arange(self.c, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return self.n

    def steps_per_epoch(self, batch: int) -> int:
        return self.n // batch

    def _finish(self, xb: Tensor) -> Tensor:
        """uint8 (b, C, H, W) -> normalized `dtype`; any layout change is done on uint8 (4x cheaper)."""
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return torch.addcmul(self.shift, xb.to(self.dtype), self.scale)  # elementwise: keeps memory format

    def epoch(self, epoch: int, batch: int, start_step: int = 0, rank: int = 0,
              world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's strided share (rank::world) of each global batch of `epoch`, from `start_step` on
        (drop_last)."""
        b = _check_batch(self.n, batch, rank, world)
        return self._epoch(epoch, batch, b, start_step, rank)

    def _epoch(self, epoch: int, batch: int, b: int, start_step: int,
               rank: int) -> Iterator[tuple[Tensor, Tensor]]:
        # Draw the whole epoch's randomness up front, indexed by position in the epoch: batch size, resume
        # point and rank then only choose which positions to read, never what a position holds.
        g = torch.Generator(device=self.device).manual_seed(_epoch_seed(self.seed, epoch))
        perm = torch.randperm(self.n, device=self.device, generator=g)
        if self.augment:
            dy = torch.randint(0, 2 * PAD + 1, (self.n,), device=self.device, generator=g)
            dx = torch.randint(0, 2 * PAD + 1, (self.n,), device=self.device, generator=g)
            flip = torch.rand(self.n, device=self.device, generator=g) < 0.5
        for step in range(start_step, self.n // batch):
            pos = slice(step * batch + rank, (step + 1) * batch, batch // b)  # this rank's strided share
            idx = perm[pos]
            if self.augment:
                rows = dy[pos, None] - PAD + self._rows  # (b, H) source rows; outside [0, H) is padding
                cols = dx[pos, None] - PAD + torch.where(flip[pos, None], self.w - 1 - self._cols, self._cols)
                inside = ((rows >= 0) & (rows < self.h))[:, None, :, None] & \
                    ((cols >= 0) & (cols < self.w))[:, None, None, :]
                n = idx.view(-1, 1, 1, 1)
                xb = self.x[n, self._chan, rows.clamp(0, self.h - 1)[:, None, :, None],
                            cols.clamp(0, self.w - 1)[:, None, None, :]]
                xb = xb * inside  # zero padding (uint8 * bool stays uint8)
            else:
                xb = self.x[idx]
            yield self._finish(xb), self.y[idx]

    def eval_batches(self, batch: int, rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """All samples in order, no augmentation, last partial batch included; with `world` > 1, this rank's
        contiguous share of each batch (the ranks together see every sample once)."""
        for lo, hi in _eval_shares(self.n, batch, rank, world):
            yield self._finish(self.x[lo:hi]), self.y[lo:hi]


def _eval_shares(n: int, batch: int, rank: int, world: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) of this rank's share of each evaluation batch (as `tensor_split` would divide it); empty
    shares (a last batch smaller than the number of ranks) are skipped."""
    for start in range(0, n, batch):
        m = min(batch, n - start)
        size, extra = divmod(m, world)
        lo = start + rank * size + min(rank, extra)
        hi = lo + size + (1 if rank < extra else 0)
        if hi > lo:
            yield lo, hi


class _EpochBatches:
    """Batch sampler whose content the loader swaps before each pass. With persistent workers the
    DataLoader re-iterates this object (in the main process) on every `iter()`, so one DataLoader and
    one pool of workers serve all epochs and batch sizes."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _SeededFolder(torch.utils.data.Dataset):
    """ImageFolder item keyed by (index, seed): the transform runs under its own RNG seed, so
    augmentation is a pure function of (seed, epoch, index) whatever the worker count or scheduling."""

    def __init__(self, folder: Any, transform: Any) -> None:
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = key
        path, target = self.folder.samples[index]
        img = self.folder.loader(path)
        with torch.random.fork_rng(devices=[]):  # don't disturb the process RNG (matters with workers=0)
            torch.manual_seed(seed)
            return self.transform(img), target


class ImageFolderLoader:
    """ImageNet-style loader with DeviceLoader's interface, on torch DataLoader worker processes.

    Workers decode and augment to uint8 (4x less to pin and copy than float); the device normalizes.
    """

    def __init__(self, folder: Any, mean: tuple[float, ...], std: tuple[float, ...], *, augment: bool,
                 device: torch.device | str, seed: int, image_size: int = 224, workers: int = 8,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32) -> None:
        from torchvision import transforms as T

        self.device = torch.device(device)
        self.augment, self.seed, self.channels_last, self.dtype = augment, int(seed), channels_last, dtype
        self.n = len(folder)
        if augment:
            tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])
        else:
            resize = round(image_size * 256 / 224)  # the classic 256 -> 224 ratio
            tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.PILToTensor()])
        self.scale, self.shift = _affine(mean, std, self.device, dtype)
        self._sampler = _EpochBatches()
        self._loader = torch.utils.data.DataLoader(
            _SeededFolder(folder, tf), batch_sampler=self._sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            generator=torch.Generator(),  # its per-iter base-seed draw would otherwise consume the global RNG
        )

    def __len__(self) -> int:
        return self.n

    def steps_per_epoch(self, batch: int) -> int:
        return self.n // batch

    def _run(self, batches: list[list[tuple[int, int]]]) -> Iterator[tuple[Tensor, Tensor]]:
        self._sampler.batches = batches  # read by iter() below, before anything is yielded
        for xb, yb in self._loader:
            xb = xb.to(self.device, non_blocking=True)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            xb = torch.addcmul(self.shift, xb.to(self.dtype), self.scale)
            yield xb, yb.to(self.device, non_blocking=True)

    def epoch(self, epoch: int, batch: int, start_step: int = 0, rank: int = 0,
              world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        b = _check_batch(self.n, batch, rank, world)
        es = _epoch_seed(self.seed, epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(es)).tolist()
        # Per-sample seed; the odd multiplier keeps the low 32 bits (all the CPU generator uses) distinct.
        key = lambda i: (i, (es + i * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
        world = batch // b
        starts = (s * batch for s in range(start_step, self.n // batch))
        batches = [[key(i) for i in perm[lo + rank : lo + batch : world]] for lo in starts]  # strided share
        return self._run(batches)

    def eval_batches(self, batch: int, rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        # each rank decodes only its own share of every batch
        return self._run([[(i, 0) for i in range(lo, hi)] for lo, hi in _eval_shares(self.n, batch, rank, world)])


def make_loaders(ds: ArrayDataset | ImageFolderDataset, *, device: torch.device | str, seed: int,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32,
                 augment: bool | None = None) -> tuple[DeviceLoader | ImageFolderLoader,
                                                       DeviceLoader | ImageFolderLoader]:
    """(train, val) loaders for `ds`; training augmentation follows `ds.augment` unless `augment` is given."""
    aug = ds.augment if augment is None else augment
    if isinstance(ds, ImageFolderDataset):
        kw = dict(device=device, seed=seed, image_size=ds.image_size, workers=ds.workers,
                  channels_last=channels_last, dtype=dtype)
        return (ImageFolderLoader(ds.train, ds.mean, ds.std, augment=aug, **kw),
                ImageFolderLoader(ds.val, ds.mean, ds.std, augment=False, **kw))
    kw = dict(device=device, seed=seed, channels_last=channels_last, dtype=dtype)
    return (DeviceLoader(ds.train_x, ds.train_y, ds.mean, ds.std, augment=aug, **kw),
            DeviceLoader(ds.val_x, ds.val_y, ds.mean, ds.std, augment=False, **kw))
