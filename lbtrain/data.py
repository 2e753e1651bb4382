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
  * `steps_per_epoch(batch)` is the number of such steps in one pass over the distinct training samples;
  * the batch size may change from one epoch to the next;
  * under data parallelism rank r of W gets the strided share r::W of each global batch (not a contiguous
    slice: ghost batches are strided subsets, see `lbtrain.ghost_bn`, and so stay whole on one rank).

Where data is looked for: `dataset.root`, else $LBTRAIN_DATA, else ./data (see `resolve_root`).
The "val" split of MNIST / Fashion-MNIST / CIFAR is the official test split.

Batch augmentation (Hoffer et al., "Augment Your Batch", 2019/2020) and cutout (DeVries & Taylor 2017) are
`DeviceLoader` options for the training loader only (`duplicates=M`, `cutout=L`; see its docstring): a step of
`batch` samples then holds `batch // M` distinct samples, each M times with independent crop/flip/cutout.
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


def _check_duplicates(duplicates: Any, cutout: Any) -> tuple[int, int]:
    if isinstance(duplicates, bool) or not isinstance(duplicates, int) or duplicates < 1:
        raise ValueError(f"dataset.duplicates={duplicates!r}: must be an integer >= 1")
    if isinstance(cutout, bool) or not isinstance(cutout, int) or cutout < 0:
        raise ValueError(f"dataset.cutout={cutout!r}: must be an integer >= 0 (0: no cutout)")
    return duplicates, cutout


class DeviceLoader:
    """Whole dataset on `device` as uint8; batched augmentation.

    Augmentation is torchvision's RandomCrop(size, padding=4) (zero/black padding) + RandomHorizontalFlip,
    done for a whole batch as ONE advanced-indexing gather: sample index, channel, per-sample row grid and
    per-sample (possibly reversed) column grid broadcast to (b, C, H, W). Grid positions that fall in the
    padding are clamped into the image and then zeroed with a mask, so the dataset is held once, unpadded.

    Batch augmentation, `duplicates=M` (Hoffer et al., "Augment Your Batch"; their `--duplicates M`):
      * `batch` (as passed to `epoch` / `steps_per_epoch`) stays the number of samples per step, global over
        ranks; it must be divisible by M. A step holds n = batch // M DISTINCT samples, each served M times
        with independent crop/flip/cutout. An epoch is one pass over the distinct samples (drop_last):
        `steps_per_epoch(batch)` = N // (batch // M), so the regime's epoch arithmetic counts distinct
        samples, and an epoch serves M times as many images as without duplicates.
      * Layout of a global step: sample-major, copies adjacent. Position p = i*M + m holds copy m of distinct
        sample i (i < n), as Hoffer et al.'s `_flatten_duplicates` lays out their (B, M, ...) batches.
      * Ghost batches (`lbtrain.ghost_bn`), DDP rank shares and micro-batches are all strided subsets: rank r
        of W takes r::W, micro-batch m of P takes m::P of that, ghost batch k of G takes k::G of that, so the
        global position p lands in (rank, micro-batch, ghost batch) given by p mod (W*P*G), where
        W*P*G = batch // ghost_batch is the number of ghost batches in the global step. The M copies of a
        sample sit at M consecutive positions, hence at M consecutive residues mod W*P*G: they fall into M
        DIFFERENT ghost batches whenever M <= batch // ghost_batch, and then no ghost batch holds two copies
        of one sample (likewise they go to M different ranks when M <= W, and to M different (rank,
        micro-batch) parts when M <= W*P). With more copies than ghost batches, each ghost batch holds
        floor or ceil of M / (batch // ghost_batch) copies of every sample of the step.
      * Without augmentation (augment=False and cutout=0) the M copies are identical; allowed (it changes
        the step's sample count only), but rarely what is meant.
      * duplicates=1 is bit-identical to the loader without the option (same draws, same ops).

    Cutout, `cutout=L` (DeVries & Taylor 2017): per image copy, a square of side L centred at a uniformly
    drawn pixel (cy, cx) in [0, H) x [0, W), rows cy - L//2 .. cy - L//2 + L - 1 (likewise columns), clipped
    at the border. It is applied after crop/flip and normalization and sets the square to 0 in the NORMALIZED
    output, i.e. to the dataset's per-channel mean, as the reference implementations do (torchvision
    pipeline with `Cutout` appended after `Normalize`, multiplying by a 0/1 mask: DeVries & Taylor's
    uoguelph-mlrg/Cutout train.py and Hoffer's eladhoffer/convNet.pytorch preprocess.py `get_transform`).
    For even L the square is theirs exactly; for odd L theirs is L-1 wide (y - L//2 .. y + L//2 - 1), ours
    is L wide, centred. The squares' pixels are written directly (one `index_fill_` over a clamped (b, C, L, L)
    index grid, see `_cut`), not through a full-size mask. Cutout works with or without crop/flip (`augment`).

    Randomness is drawn once per epoch, a pure function of (seed, epoch), indexed by position in the epoch:
    the permutation of N samples, then, with augmentation, crop row offsets for all N*M (position, copy)
    pairs, then column offsets for all, then flips for all (flat index = distinct position * M + copy =
    step * batch + position in the step), then, only with cutout, cutout centre rows for all N*M, then
    columns. With M = 1 and no cutout these are exactly the draws of the loader without these options.
    """

    def __init__(self, x_uint8: Tensor, y: Tensor, mean: tuple[float, ...], std: tuple[float, ...], *,
                 augment: bool, device: torch.device | str, seed: int, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, duplicates: int = 1, cutout: int = 0) -> None:
        if x_uint8.dtype != torch.uint8 or x_uint8.ndim != 4:
            raise TypeError(f"expected uint8 (N, C, H, W) images, got {x_uint8.dtype} {tuple(x_uint8.shape)}")
        self.device = torch.device(device)
        self.augment, self.seed, self.channels_last, self.dtype = augment, int(seed), channels_last, dtype
        self.n, self.c, self.h, self.w = (int(s) for s in x_uint8.shape)
        self.duplicates, self.cutout = _check_duplicates(duplicates, cutout)
        if cutout > min(self.h, self.w):
            raise ValueError(f"dataset.cutout={cutout}: must be at most the image side "
                             f"(images are {self.h}x{self.w})")
        self.x = x_uint8.to(self.device).contiguous()  # on the CPU: the caller's tensor itself, no copy
        self.y = y.to(self.device, torch.int64)
        self.scale, self.shift = _affine(mean, std, self.device, dtype)
        self._rows = torch.arange(self.h, device=self.device)
        self._cols = torch.arange(self.w, device=self.device)
        self._chan = torch.arange(self.c, device=self.device).view(1, -1, 1, 1)
        self._square = torch.arange(cutout, device=self.device) - cutout // 2  # cutout rows/cols - its centre's

    def __len__(self) -> int:
        return self.n

    def _distinct(self, batch: int) -> int:
        """Distinct samples per step for `batch` samples per step."""
        if batch % self.duplicates:
            raise ValueError(f"batch={batch} must be divisible by dataset.duplicates={self.duplicates} "
                             f"(a step holds batch // duplicates distinct samples, each duplicates times)")
        return batch // self.duplicates

    def steps_per_epoch(self, batch: int) -> int:
        """Steps in one pass over the distinct samples: N // (batch // duplicates) (drop_last)."""
        return self.n // self._distinct(batch)

    def _finish(self, xb: Tensor) -> Tensor:
        """uint8 (b, C, H, W) -> normalized `dtype`; any layout change is done on uint8 (4x cheaper)."""
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        # In place on the fresh converted copy: the same values as an out-of-place addcmul, without a second
        # output-sized allocation, which on the CPU can cost more than the arithmetic (fresh pages each step).
        xf = xb.to(self.dtype, copy=True)  # copy=True: never the dataset itself, whatever `dtype`
        return torch.addcmul(self.shift, xf, self.scale, out=xf)  # elementwise: keeps memory format

    def _cut(self, out: Tensor, cy: Tensor, cx: Tensor) -> Tensor:
        """Set, in place, the cutout square of every image of the normalized (b, C, H, W) `out` to 0; cy, cx are
        the (b,) centres.

        The square's L rows cy - L//2 .. cy - L//2 + L - 1 are clamped into [0, H) (likewise columns): a row
        outside the image clamps to the border row, which is then inside the square too (the square always
        covers its centre, and reaches past a border only by covering that border), so the clamped (b, L, L)
        grid hits exactly the square's pixels inside the image, some twice. One `index_fill_` on the flat
        storage writes them: ~L*L/(H*W) of the output, where a (b, 1, H, W) mask times the output would read
        and write all of it (measured 2x slower on MNIST-shaped batches on CPU, same cost on CIFAR-shaped ones).
        """
        s0, s1, s2, s3 = out.stride()  # contiguous or channels_last: dense either way
        rows = (cy[:, None] + self._square).clamp_(0, self.h - 1).mul_(s2)  # (b, L) offsets of the square's rows
        cols = (cx[:, None] + self._square).clamp_(0, self.w - 1).mul_(s3)
        rows += torch.arange(0, out.shape[0] * s0, s0, device=out.device)[:, None]  # + each image's offset
        off = rows[:, None, :, None] + cols[:, None, None, :]  # (b, 1, L, L)
        if self.c > 1:
            off = off + (self._chan * s1)  # (b, C, L, L)
        out.as_strided((out.numel(),), (1,)).index_fill_(0, off.view(-1), 0)  # `out` is fresh: offset 0, dense
        return out

    def epoch(self, epoch: int, batch: int, start_step: int = 0, rank: int = 0,
              world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's strided share (rank::world) of each global batch of `epoch`, from `start_step` on
        (drop_last). `batch` is the global number of samples per step: batch // duplicates distinct samples,
        each `duplicates` times (copies adjacent, see the class docstring)."""
        m = self.duplicates
        if not 1 <= self._distinct(batch) <= self.n:
            raise ValueError(f"batch={batch} must be in {m}..{self.n * m} (" + (
                f"batch // duplicates distinct samples, each {m} times, of the {self.n} training samples)"
                if m > 1 else "the number of training samples)"))
        b = _check_batch(self.n * m, batch, rank, world)  # here: only the split over ranks
        return self._epoch(epoch, batch, b, start_step, rank)

    def _epoch(self, epoch: int, batch: int, b: int, start_step: int,
               rank: int) -> Iterator[tuple[Tensor, Tensor]]:
        # Draw the whole epoch's randomness up front, indexed by position in the epoch: batch size, resume
        # point and rank then only choose which positions to read, never what a position holds. Per-image
        # draws are indexed by the flat (distinct position, copy) index q*M + m = step*batch + position.
        m, dev = self.duplicates, self.device
        total = self.n * m
        g = torch.Generator(device=dev).manual_seed(_epoch_seed(self.seed, epoch))
        perm = torch.randperm(self.n, device=dev, generator=g)
        if self.augment:
            dy = torch.randint(0, 2 * PAD + 1, (total,), device=dev, generator=g)
            dx = torch.randint(0, 2 * PAD + 1, (total,), device=dev, generator=g)
            flip = torch.rand(total, device=dev, generator=g) < 0.5
        if self.cutout:  # drawn after everything else, so cutout=0 changes no other draw
            cy = torch.randint(0, self.h, (total,), device=dev, generator=g)
            cx = torch.randint(0, self.w, (total,), device=dev, generator=g)
        source = perm.repeat_interleave(m) if m > 1 else perm  # flat index -> sample: copies adjacent
        for step in range(start_step, self.n // (batch // m)):
            pos = slice(step * batch + rank, (step + 1) * batch, batch // b)  # this rank's strided share
            idx = source[pos]
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
            out = self._finish(xb)
            if self.cutout:
                out = self._cut(out, cy[pos], cx[pos])
            yield out, self.y[idx]

    def samples(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The samples at `indices`, normalized, without augmentation (a fixed measurement set, e.g. sharpness)."""
        idx = indices.to(self.device)
        return self._finish(self.x[idx]), self.y[idx]

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
    Batch augmentation (`duplicates` > 1) and `cutout` are not implemented here (only for in-memory
    datasets, `DeviceLoader`): asking for them is a ValueError.
    """

    def __init__(self, folder: Any, mean: tuple[float, ...], std: tuple[float, ...], *, augment: bool,
                 device: torch.device | str, seed: int, image_size: int = 224, workers: int = 8,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, duplicates: int = 1,
                 cutout: int = 0) -> None:
        from torchvision import transforms as T

        if _check_duplicates(duplicates, cutout) != (1, 0):
            raise ValueError(f"dataset.duplicates={duplicates}, dataset.cutout={cutout}: batch augmentation and "
                             "cutout are implemented only for in-memory datasets, not the ImageNet folder loader")

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
                 augment: bool | None = None, duplicates: int = 1,
                 cutout: int = 0) -> tuple[DeviceLoader | ImageFolderLoader, DeviceLoader | ImageFolderLoader]:
    """(train, val) loaders for `ds`; training augmentation follows `ds.augment` unless `augment` is given.

    `duplicates` (batch augmentation) and `cutout` apply to the training loader only (see `DeviceLoader`);
    validation never duplicates or cuts. Both are a ValueError for ImageNet (`ImageFolderDataset`)."""
    aug = ds.augment if augment is None else augment
    if isinstance(ds, ImageFolderDataset):
        kw = dict(device=device, seed=seed, image_size=ds.image_size, workers=ds.workers,
                  channels_last=channels_last, dtype=dtype)
        return (ImageFolderLoader(ds.train, ds.mean, ds.std, augment=aug, duplicates=duplicates, cutout=cutout,
                                  **kw),
                ImageFolderLoader(ds.val, ds.mean, ds.std, augment=False, **kw))
    kw = dict(device=device, seed=seed, channels_last=channels_last, dtype=dtype)
    return (DeviceLoader(ds.train_x, ds.train_y, ds.mean, ds.std, augment=aug, duplicates=duplicates, cutout=cutout,
                         **kw),
            DeviceLoader(ds.val_x, ds.val_y, ds.mean, ds.std, augment=False, **kw))
