"""The loaders: a dataset split served as normalized training and evaluation batches (the contract they keep is
`lbtrain.data.contract.Loader`).

Small datasets (digits, MNIST, Fashion-MNIST, CIFAR, synthetic) are held whole in memory as uint8 tensors and
served by `DeviceLoader`, which keeps them on the training device and does shuffling, pad-4 random crop,
horizontal flip and normalization as a handful of batched tensor ops per step (the airbench recipe): no
per-sample Python, no worker processes, no host->device copies. ImageNet is the exception and streams JPEGs
through torch's DataLoader (`ImageFolderLoader`).

Batch augmentation (Hoffer et al., "Augment Your Batch", 2019/2020) and cutout (DeVries & Taylor 2017) are
`DeviceLoader` options for the training loader only (`duplicates=M`, `cutout=L`; see its docstring): a step of
`batch` samples then holds `batch // M` distinct samples, each M times with independent crop/flip/cutout.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lbtrain.data.contract import Loader
from lbtrain.data.datasets import ArrayDataset, ImageFolderDataset

__all__ = ["PAD", "DeviceLoader", "ImageFolderLoader", "make_loaders", "make_test_loader"]

PAD = 4  # pixels of zero padding for the random-crop augmentation (standard CIFAR recipe)


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
    augmentation is a pure function of (seed, epoch, index) whatever the worker count or scheduling.
    Seed None: the `plain` (evaluation) transform, which draws nothing."""

    def __init__(self, folder: Any, transform: Any, plain: Any) -> None:
        self.folder, self.transform, self.plain = folder, transform, plain

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[Tensor, int]:
        index, seed = key
        path, target = self.folder.samples[index]
        img = self.folder.loader(path)
        if seed is None:
            return self.plain(img), target
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
        resize = round(image_size * 256 / 224)  # the classic 256 -> 224 ratio
        plain = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.PILToTensor()])
        if augment:
            tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])
        else:
            tf = plain
        self.scale, self.shift = _affine(mean, std, self.device, dtype)
        self._sampler = _EpochBatches()
        self._loader = torch.utils.data.DataLoader(
            _SeededFolder(folder, tf, plain), batch_sampler=self._sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            generator=torch.Generator(),  # its per-iter base-seed draw would otherwise consume the global RNG
        )

    def __len__(self) -> int:
        return self.n

    def steps_per_epoch(self, batch: int) -> int:
        return self.n // batch

    def _run(self, batches: list[list[tuple[int, int | None]]]) -> Iterator[tuple[Tensor, Tensor]]:
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
        # each rank decodes only its own share of every batch; seed None: the plain (evaluation) transform
        return self._run([[(i, None) for i in range(lo, hi)]
                          for lo, hi in _eval_shares(self.n, batch, rank, world)])

    def samples(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The samples at `indices` as one batch, with the plain (evaluation) transform (e.g. sharpness)."""
        keys: list[tuple[int, int | None]] = [(int(i), None) for i in indices.flatten().tolist()]
        if not keys:
            raise ValueError("samples() needs at least one index")
        (batch,) = list(self._run([keys]))  # consumed whole: the DataLoader iterator is not left half-way
        return batch


def make_loaders(ds: ArrayDataset | ImageFolderDataset, *, device: torch.device | str, seed: int,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32,
                 augment: bool | None = None, duplicates: int = 1,
                 cutout: int = 0) -> tuple[Loader, Loader]:
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


def make_test_loader(ds: ArrayDataset | ImageFolderDataset, *, device: torch.device | str, seed: int,
                     channels_last: bool = False, dtype: torch.dtype = torch.float32) -> Loader | None:
    """The test split's loader when `dataset.holdout` moved the official validation split there (else None)."""
    if not isinstance(ds, ArrayDataset) or ds.test_x is None:
        return None
    return DeviceLoader(ds.test_x, ds.test_y, ds.mean, ds.std, augment=False, device=device, seed=seed,
                        channels_last=channels_last, dtype=dtype)
