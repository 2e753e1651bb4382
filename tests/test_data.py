"""Tests for lbtrain.data: dataset parsing from real on-disk formats, error messages, and DeviceLoader
semantics (permutation, determinism, resume, rank slicing, augmentation, normalization, batch augmentation
with `duplicates`, cutout)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import SHARED_DATA, skip_md5, write_cifar, write_idx

from lbtrain import data as D
from lbtrain.data import loaders as L  # the loaders' private helpers, for reference implementations

SHARED = SHARED_DATA


def cfg(**kw) -> SimpleNamespace:
    base = dict(name="synthetic", root=None, download=False, augment=False)
    return SimpleNamespace(**{**base, **kw})


# ---------------------------------------------------------------- on-disk formats


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_format(tmp_path: Path, name: str, folder: str) -> None:
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tr_x, te_x = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 256, (7, 28, 28))
    tr_y, te_y = rng.integers(0, 10, 20), rng.integers(0, 10, 7)
    write_idx(raw, "train", tr_x, tr_y)
    write_idx(raw, "t10k", te_x, te_y)

    ds = D.load_dataset(cfg(name=name, root=str(tmp_path)))
    assert isinstance(ds, D.ArrayDataset) and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.val_x.shape == (7, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert np.array_equal(ds.train_x[:, 0].numpy(), tr_x) and np.array_equal(ds.val_x[:, 0].numpy(), te_x)
    assert np.array_equal(ds.train_y.numpy(), tr_y) and np.array_equal(ds.val_y.numpy(), te_y)
    assert len(ds.mean) == len(ds.std) == 1


@pytest.mark.parametrize("name,hundred", [("cifar10", False), ("cifar100", True)])
def test_cifar_pickle_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                             hundred: bool) -> None:
    skip_md5(monkeypatch)
    arr = write_cifar(tmp_path, hundred, n_train=12, n_test=5)
    ds = D.load_dataset(cfg(name=name, root=str(tmp_path), augment=True))
    assert ds.augment and ds.num_classes == (100 if hundred else 10) and ds.input_shape == (3, 32, 32)
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.val_x.shape == (5, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.is_contiguous()
    # each row is three 32x32 planes (R, G, B): CHW order must survive torchvision's HWC round trip
    assert np.array_equal(ds.train_x.numpy(), arr["train_x"].reshape(-1, 3, 32, 32))
    assert np.array_equal(ds.val_x.numpy(), arr["test_x"].reshape(-1, 3, 32, 32))
    assert ds.train_y.tolist() == arr["train_y"].tolist() and ds.val_y.tolist() == arr["test_y"].tolist()
    assert len(ds.mean) == 3


MISSING = [("mnist", "MNIST/"), ("fashion_mnist", "FashionMNIST/"), ("cifar10", "cifar-10-batches-py/"),
           ("cifar100", "cifar-100-python/")]


@pytest.mark.parametrize("name,holding", MISSING)
def test_missing_files_message(tmp_path: Path, name: str, holding: str) -> None:
    with pytest.raises(D.DatasetNotFoundError) as ei:
        D.load_dataset(cfg(name=name, root=str(tmp_path)))
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path.resolve()) in msg and holding in msg
    for fix in ("dataset.root=", "LBTRAIN_DATA=", "dataset.download=true"):
        assert fix in msg


def test_missing_imagenet_message(tmp_path: Path) -> None:
    with pytest.raises(D.DatasetNotFoundError) as ei:
        D.load_dataset(cfg(name="imagenet", root=str(tmp_path)))
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path / "imagenet" / "train") in msg and "dataset.root=" in msg


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="cifar10"):
        D.load_dataset(cfg(name="svhn"))


def test_resolve_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LBTRAIN_DATA", str(tmp_path / "env"))
    assert D.resolve_root(None) == tmp_path / "env"
    assert D.resolve_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    monkeypatch.delenv("LBTRAIN_DATA")
    monkeypatch.chdir(tmp_path)
    assert D.resolve_root(None) == tmp_path.resolve() / "data"


def test_env_root_used_by_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LBTRAIN_DATA", str(tmp_path))
    with pytest.raises(D.DatasetNotFoundError, match=str(tmp_path)):
        D.load_dataset(cfg(name="mnist"))


def test_digits() -> None:
    ds = D.load_dataset(cfg(name="digits"))
    assert ds.train_x.shape == (1536, 1, 8, 8) and ds.val_x.shape == (261, 1, 8, 8)
    assert ds.train_x.dtype == torch.uint8 and ds.num_classes == 10 and int(ds.train_x.max()) == 255
    assert set(ds.train_y.tolist()) == set(range(10))
    again = D.load_dataset(cfg(name="digits"))
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.val_y, again.val_y)
    x = ds.train_x.float() / 255
    assert abs(ds.mean[0] - x.mean().item()) < 1e-4 and abs(ds.std[0] - x.std().item()) < 1e-3


def test_synthetic_from_dictconfig() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    c = omegaconf.OmegaConf.create(dict(name="synthetic", root=None, download=False, augment=True,
                                        shape=[3, 16, 16], num_classes=5, train_size=300, val_size=50))
    omegaconf.OmegaConf.set_struct(c, True)  # as with the schema-backed config: absent `seed` -> default 0
    ds = D.load_dataset(c)
    assert ds.train_x.shape == (300, 3, 16, 16) and ds.val_x.shape == (50, 3, 16, 16) and ds.augment
    assert ds.train_y.max() < 5 and len(set(ds.train_y.tolist())) == 5  # every class present
    assert torch.equal(ds.train_x, D.load_dataset(c).train_x)  # content is fixed


# ---------------------------------------------------------------- DeviceLoader


def id_loader(n: int = 96, h: int = 8, w: int = 8, **kw) -> D.DeviceLoader:
    """Sample i has label i and constant pixel value i, so batches reveal exactly which samples they hold."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, h, w).contiguous()
    y = torch.arange(n)
    kw = dict(augment=False, device="cpu", seed=0) | kw
    return D.DeviceLoader(x, y, (0.0,), (1 / 255,), **kw)  # mean 0, std 1/255 -> output == raw pixel


def labels(it) -> list[list[int]]:
    return [yb.tolist() for _, yb in it]


def test_epoch_is_permutation() -> None:
    dl = id_loader()
    assert len(dl) == 96 and dl.steps_per_epoch(32) == 3 and dl.steps_per_epoch(40) == 2
    batches = list(dl.epoch(0, 32))
    assert len(batches) == 3
    seen = torch.cat([yb for _, yb in batches])
    assert sorted(seen.tolist()) == list(range(96))
    for xb, yb in batches:  # images travel with their labels
        assert xb.shape == (32, 1, 8, 8) and xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert torch.equal(xb[:, 0, 0, 0], yb.float())
    assert seen.tolist() != list(range(96))  # actually shuffled


def test_drop_last_and_batch_change() -> None:
    dl = id_loader()
    for batch in (40, 16, 96):  # batch size changes between epochs
        bs = labels(dl.epoch(1, batch))
        assert len(bs) == 96 // batch and all(len(b) == batch for b in bs)
        assert len(set(sum(bs, []))) == 96 // batch * batch
    # order is a function of (seed, epoch) only: a different batch size reads the same sequence
    assert sum(labels(dl.epoch(3, 16)), []) == sum(labels(dl.epoch(3, 32)), [])
    with pytest.raises(ValueError):
        dl.epoch(0, 97)


def test_determinism_and_epochs_differ() -> None:
    a, b, c = (id_loader(augment=True, seed=s) for s in (5, 5, 6))
    for (xa, ya), (xb, yb) in zip(a.epoch(2, 16), b.epoch(2, 16), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert labels(a.epoch(0, 16)) != labels(a.epoch(1, 16))
    assert labels(a.epoch(0, 16)) != labels(c.epoch(0, 16))


def test_resume_from_start_step() -> None:
    dl = id_loader(augment=True)
    full = list(dl.epoch(4, 16))
    resumed = list(dl.epoch(4, 16, start_step=2))
    assert len(resumed) == len(full) - 2
    for (xa, ya), (xb, yb) in zip(full[2:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_rank_shares_interleave_to_global_batch() -> None:
    """Rank r of W gets samples r::W of each global batch (strided, like ghost batches)."""
    dl = id_loader(augment=True)
    world = 4
    glob = list(dl.epoch(7, 32))
    per_rank = [list(dl.epoch(7, 32, rank=r, world=world)) for r in range(world)]
    for step, (xg, yg) in enumerate(glob):
        parts = [per_rank[r][step] for r in range(world)]
        assert all(p[0].shape[0] == 8 for p in parts)
        for r, (xr, yr) in enumerate(parts):
            assert torch.equal(xr, xg[r::world]) and torch.equal(yr, yg[r::world])
    with pytest.raises(ValueError):
        dl.epoch(0, 30, world=4)


def test_augmentation_is_shift_and_flip() -> None:
    n, h, w = 64, 8, 8
    img = torch.arange(1, h * w + 1, dtype=torch.uint8).view(1, 1, h, w)  # every pixel distinct and nonzero
    x = img.expand(n, 1, h, w).contiguous()
    dl = D.DeviceLoader(x, torch.zeros(n, dtype=torch.int64), (0.0,), (1 / 255,), augment=True, device="cpu",
                        seed=0)
    padded = torch.nn.functional.pad(img[0, 0], (4, 4, 4, 4)).float()
    candidates = {}
    for dy in range(9):
        for dx in range(9):
            crop = padded[dy : dy + h, dx : dx + w]
            candidates[(dy, dx, False)] = crop
            candidates[(dy, dx, True)] = crop.flip(1)
    found = set()
    for xb, _ in dl.epoch(0, 32):
        assert xb.shape == (32, 1, h, w) and xb.dtype == torch.float32
        for s in xb[:, 0]:
            match = [k for k, v in candidates.items() if torch.equal(v, s)]
            assert match, "output is not a <=4 px shift (zero padded) of the image, optionally flipped"
            found.add(match[0])
    assert {k[2] for k in found} == {False, True} and len(found) > 10  # both flips, many offsets
    # eval batches are never augmented, keep order and include the last partial batch
    ev = list(dl.eval_batches(24))
    assert [b[0].shape[0] for b in ev] == [24, 24, 16]
    assert all(torch.equal(b[0][i, 0], img[0, 0].float()) for b in ev for i in range(b[0].shape[0]))


def test_normalization_and_layout() -> None:
    ds = D.make_synthetic(shape=(3, 16, 16), num_classes=4, train_size=512, val_size=64)
    train, val = D.make_loaders(ds, device="cpu", seed=0, channels_last=True)
    xs = torch.cat([xb for xb, _ in train.epoch(0, 128)])
    assert xs.is_contiguous(memory_format=torch.channels_last)
    assert xs.mean((0, 2, 3)).abs().max() < 1e-3 and (xs.std((0, 2, 3)) - 1).abs().max() < 1e-3
    assert not train.augment and not val.augment
    aug_train, _ = D.make_loaders(ds, device="cpu", seed=0, augment=True, dtype=torch.bfloat16)
    xb, yb = next(aug_train.epoch(0, 64))
    assert xb.shape == (64, 3, 16, 16) and xb.dtype == torch.bfloat16 and yb.dtype == torch.int64
    assert sum(b[0].shape[0] for b in val.eval_batches(50)) == 64


def test_val_loader_matches_data_order() -> None:
    ds = D.make_synthetic(shape=(1, 4, 4), num_classes=3, train_size=64, val_size=10)
    _, val = D.make_loaders(ds, device="cpu", seed=0)
    ys = torch.cat([yb for _, yb in val.eval_batches(4)])
    assert torch.equal(ys, ds.val_y)


# ---------------------------------------------------------------- ImageFolder (ImageNet path)


def test_imagefolder_loader(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for c in ("n01", "n02", "n03"):
            (tmp_path / "imagenet" / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / "imagenet" / split / c / f"{i}.png")
    ds = D.load_dataset(cfg(name="imagenet", root=str(tmp_path), image_size=32, workers=0, augment=True))
    assert isinstance(ds, D.ImageFolderDataset)
    assert ds.num_classes == 3 and ds.input_shape == (3, 32, 32) and ds.train_size == 12 and ds.val_size == 6
    # root may also point straight at the folder holding train/ and val/
    direct = D.load_dataset(cfg(name="imagenet", root=str(tmp_path / "imagenet"), image_size=32, workers=0))
    assert direct.root == ds.root

    train, val = D.make_loaders(ds, device="cpu", seed=3, channels_last=False)
    state = torch.random.get_rng_state()
    a = list(train.epoch(1, 4))
    assert torch.equal(state, torch.random.get_rng_state())  # per-sample seeding leaves global RNG alone
    b = list(train.epoch(1, 4))
    assert len(a) == 3 and all(xb.shape == (4, 3, 32, 32) and xb.dtype == torch.float32 for xb, _ in a)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    resumed = list(train.epoch(1, 4, start_step=1))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a[1:], resumed, strict=True))
    halves = [list(train.epoch(1, 4, rank=r, world=2)) for r in range(2)]
    for r in range(2):  # rank r's share is r::2 of the global batch, pixels included
        assert torch.equal(halves[r][0][1], a[0][1][r::2]) and torch.equal(halves[r][0][0], a[0][0][r::2])
    assert sorted(torch.cat([yb for _, yb in a]).tolist()) == sorted([0, 1, 2] * 4)
    assert [xb.shape[0] for xb, _ in val.eval_batches(4)] == [4, 2]


# ---------------------------------------------------------------- the real MNIST copy, when present


@pytest.mark.skipif(not (SHARED / "MNIST" / "raw").is_dir(), reason="no shared MNIST copy")
def test_real_mnist() -> None:
    ds = D.load_dataset(cfg(name="mnist", root=str(SHARED)))
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.val_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.bincount().tolist()[:2] == [5923, 6742]
    assert abs(ds.train_x.float().mean().item() / 255 - ds.mean[0]) < 1e-3


def test_eval_shares_cover_every_sample_once() -> None:
    loader = id_loader(n=96)
    whole = torch.cat([y for _, y in loader.eval_batches(40)])
    for world in (1, 2, 3, 5):
        parts = [[y for _, y in loader.eval_batches(40 * world, r, world)] for r in range(world)]
        seen = torch.cat([y for part in parts for y in part])
        assert sorted(seen.tolist()) == sorted(whole.tolist()) and len(seen) == 96


# ---------------------------------------------------------------- batch augmentation (duplicates) and cutout


def _todays_epoch(x, y, mean, std, *, augment: bool, seed: int, epoch: int, batch: int, start_step: int = 0,
                  rank: int = 0, world: int = 1, channels_last: bool = False, dtype=torch.float32):
    """DeviceLoader.epoch as it was before `duplicates` and `cutout` (commit e73f32c), kept here as the reference
    that `duplicates=1, cutout=0` must reproduce bit for bit."""
    n, _, h, w = x.shape
    scale, shift = L._affine(mean, std, torch.device("cpu"), dtype)
    rows_, cols_ = torch.arange(h), torch.arange(w)
    chan = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    g = torch.Generator().manual_seed(L._epoch_seed(seed, epoch))
    perm = torch.randperm(n, generator=g)
    if augment:
        dy = torch.randint(0, 2 * D.PAD + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * D.PAD + 1, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
    for step in range(start_step, n // batch):
        pos = slice(step * batch + rank, (step + 1) * batch, world)
        idx = perm[pos]
        if augment:
            rows = dy[pos, None] - D.PAD + rows_
            cols = dx[pos, None] - D.PAD + torch.where(flip[pos, None], w - 1 - cols_, cols_)
            inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
            xb = x[idx.view(-1, 1, 1, 1), chan, rows.clamp(0, h - 1)[:, None, :, None],
                   cols.clamp(0, w - 1)[:, None, None, :]] * inside
        else:
            xb = x[idx]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield torch.addcmul(shift, xb.to(dtype), scale), y[idx]


def _random_images(n: int = 120, shape=(3, 10, 12), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g), torch.randint(0, 7, (n,), generator=g)


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("channels_last,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_duplicates_one_is_bit_identical_to_todays_loader(augment: bool, channels_last: bool, dtype) -> None:
    x, y = _random_images()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    kw = dict(augment=augment, seed=11, channels_last=channels_last, dtype=dtype)
    dl = D.DeviceLoader(x, y, mean, std, device="cpu", duplicates=1, cutout=0, **kw)
    for epoch, batch, start, rank, world in [(0, 24, 0, 0, 1), (3, 40, 1, 1, 2), (5, 16, 2, 3, 4)]:
        got = list(dl.epoch(epoch, batch, start, rank, world))
        want = list(_todays_epoch(x, y, mean, std, epoch=epoch, batch=batch, start_step=start, rank=rank,
                                  world=world, **kw))
        assert len(got) == len(want) == 120 // batch - start and dl.steps_per_epoch(batch) == 120 // batch
        for (xa, ya), (xb, yb) in zip(got, want, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert xa.dtype == xb.dtype and xa.stride() == xb.stride()


@pytest.mark.parametrize("m", [2, 3, 4])
def test_duplicates_serve_each_distinct_sample_m_times_adjacent(m: int) -> None:
    dl = id_loader(duplicates=m)  # no augmentation: the copies are identical
    batch = 8 * m  # 8 distinct samples per step
    assert dl.steps_per_epoch(batch) == 96 // 8
    steps = list(dl.epoch(1, batch))
    assert len(steps) == 12
    for xb, yb in steps:
        assert xb.shape[0] == yb.shape[0] == batch
        counts = torch.bincount(yb, minlength=96)
        assert set(counts[counts > 0].tolist()) == {m} and int((counts > 0).sum()) == 8
        by_sample = yb.view(8, m)  # position i*M + c holds copy c of distinct sample i
        assert torch.equal(by_sample, by_sample[:, :1].expand(8, m))
        assert torch.equal(xb[:, 0, 0, 0], yb.float())
        assert torch.equal(xb.view(8, m, -1), xb.view(8, m, -1)[:, :1].expand(-1, m, -1))  # identical copies


@pytest.mark.parametrize("m,batch", [(2, 16), (4, 40), (3, 33)])
def test_duplicates_epoch_covers_each_distinct_sample_once(m: int, batch: int) -> None:
    dl = id_loader(augment=True, cutout=3, duplicates=m)
    n = batch // m
    distinct = [yb[::m] for _, yb in dl.epoch(2, batch)]
    assert len(distinct) == dl.steps_per_epoch(batch) == 96 // n
    seen = torch.cat(distinct).tolist()
    assert len(seen) == len(set(seen)) == 96 // n * n
    # the distinct-sample order is the epoch's permutation, whatever the batch size or number of copies
    assert seen == sum(labels(id_loader(augment=True).epoch(2, 1)), [])[: len(seen)]


def _distinct_pixel_loader(n: int = 64, h: int = 8, w: int = 8, **kw) -> tuple[D.DeviceLoader, torch.Tensor]:
    img = torch.arange(1, h * w + 1, dtype=torch.uint8).view(1, 1, h, w)  # every pixel distinct and nonzero
    x = img.expand(n, 1, h, w).contiguous()
    return D.DeviceLoader(x, torch.arange(n), (0.0,), (1 / 255,), device="cpu", seed=0, **kw), img[0, 0].float()


@pytest.mark.parametrize("kw", [dict(augment=True), dict(augment=False, cutout=3), dict(augment=True, cutout=4)])
def test_duplicate_copies_differ_in_augmentation(kw: dict) -> None:
    m = 4
    dl, _ = _distinct_pixel_loader(duplicates=m, **kw)
    differ = total = 0
    for xb, yb in dl.epoch(0, 32):
        copies = xb.view(-1, m, 8 * 8)
        assert torch.equal(yb.view(-1, m), yb.view(-1, m)[:, :1].expand(-1, m))
        differ += int((copies != copies[:, :1]).any(2).any(1).sum())
        total += copies.shape[0]
    assert total == 64 and differ >= 0.9 * total  # (81 offsets x 2 flips) ** 3 or 64 ** 3 ways to all agree


def test_duplicates_with_crop_flip_are_valid_shifts() -> None:
    dl, img = _distinct_pixel_loader(duplicates=2, augment=True)
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    candidates = [c for dy in range(9) for dx in range(9)
                  for c in (padded[dy : dy + 8, dx : dx + 8], padded[dy : dy + 8, dx : dx + 8].flip(1))]
    for xb, _ in dl.epoch(0, 32):
        for s in xb[:, 0]:
            assert any(torch.equal(s, c) for c in candidates)


def test_duplicates_resume_and_rank_shares() -> None:
    x, y = _random_images()
    dl = D.DeviceLoader(x, y, (0.5,) * 3, (0.25,) * 3, augment=True, device="cpu", seed=4, duplicates=3, cutout=5)
    full = list(dl.epoch(6, 24))
    assert len(full) == dl.steps_per_epoch(24) == 120 // 8
    resumed = list(dl.epoch(6, 24, start_step=4))
    assert len(resumed) == len(full) - 4
    for (xa, ya), (xb, yb) in zip(full[4:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    again = D.DeviceLoader(x, y, (0.5,) * 3, (0.25,) * 3, augment=True, device="cpu", seed=4, duplicates=3, cutout=5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(full, again.epoch(6, 24), strict=True))  # deterministic
    for world in (2, 4):
        shares = [list(dl.epoch(6, 24, start_step=1, rank=r, world=world)) for r in range(world)]
        for step, (xg, yg) in enumerate(full[1:]):
            for r in range(world):
                xr, yr = shares[r][step]
                assert torch.equal(xr, xg[r::world]) and torch.equal(yr, yg[r::world])


def _ghost_of_position(batch: int, ghost: int, world: int = 1, micro: int = 1) -> list[tuple[int, int, int]]:
    """(rank, micro-batch, ghost batch) of each position of a global step, splitting the way lbtrain does:
    rank r takes r::world, micro-batch q takes q::micro of that, ghost k takes k::G of that (G = part // ghost)."""
    where = [None] * batch
    for r in range(world):
        share = list(range(batch))[r::world]
        for q in range(micro):
            part = share[q::micro]
            n_ghost = len(part) // ghost
            for k in range(n_ghost):
                for p in part[k::n_ghost]:
                    where[p] = (r, q, k)
    return where


@pytest.mark.parametrize("m,batch,ghost,world,micro", [
    (2, 32, 8, 1, 1), (4, 32, 8, 1, 1), (4, 64, 16, 1, 1), (3, 48, 8, 2, 1), (4, 64, 4, 2, 2), (8, 64, 8, 1, 1),
    (8, 64, 4, 2, 1)])
def test_copies_spread_over_ghost_batches(m: int, batch: int, ghost: int, world: int, micro: int) -> None:
    """Copies adjacent + strided ghost batches / rank shares / micro-batches: the M copies of a sample land in M
    different ghost batches whenever M <= batch // ghost (the number of ghost batches in the global step)."""
    assert m <= batch // ghost
    where = _ghost_of_position(batch, ghost, world, micro)
    assert all(w is not None for w in where)
    for i in range(batch // m):
        assert len({where[i * m + c] for c in range(m)}) == m
    # and on real batches: split a duplicated step as the trainer and GhostBatchNorm do
    dl = id_loader(augment=True, duplicates=m)
    ranks = [dl.epoch(0, batch, rank=r, world=world) for r in range(world)]
    for step in zip(*ranks, strict=True):
        homes: dict[int, list[tuple[int, int, int]]] = {}
        for r, (_, yb) in enumerate(step):
            for q in range(micro):
                part = yb[q::micro]
                n_ghost = len(part) // ghost
                for k in range(n_ghost):
                    ids = part[k::n_ghost].tolist()
                    assert len(ids) == ghost and len(set(ids)) == ghost  # no sample twice in a ghost batch
                    for i in ids:
                        homes.setdefault(i, []).append((r, q, k))
        assert len(homes) == batch // m and all(len(set(h)) == len(h) == m for h in homes.values())


def test_more_copies_than_ghost_batches_spread_evenly() -> None:
    m, batch, ghost = 8, 32, 8  # 4 ghost batches, 8 copies: each ghost batch gets 2 copies of every sample
    where = _ghost_of_position(batch, ghost)
    for i in range(batch // m):
        ghosts = [where[i * m + c][2] for c in range(m)]
        assert sorted(ghosts) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_ghost_bn_on_duplicated_batch_matches_per_ghost_reference() -> None:
    from lbtrain.ghost_bn import GhostBatchNorm2d

    x, _ = _random_images(96, (3, 8, 8))
    dl = D.DeviceLoader(x, torch.arange(96), (0.5,) * 3, (0.25,) * 3, augment=True, device="cpu", seed=1,
                        duplicates=4, cutout=3, dtype=torch.float64)
    xb, yb = next(dl.epoch(0, 64))
    g = 8  # 8 ghost batches of 8; each holds 8 distinct samples, each sample's 4 copies in 4 ghost batches
    m = GhostBatchNorm2d(3, ghost_batch=g, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    xg = xb.clone().requires_grad_()
    out = m(xg)
    n_ghost = 64 // g
    ref = torch.empty_like(xb)
    for k in range(n_ghost):
        assert len(set(yb[k::n_ghost].tolist())) == g
        ref[k::n_ghost] = torch.nn.functional.batch_norm(xb[k::n_ghost], None, None, m.weight.detach(),
                                                         m.bias.detach(), True, 0.0, 1e-3)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    # and it is not plain batch norm over the step (the ghost batches' statistics differ)
    whole = torch.nn.functional.batch_norm(xb, None, None, m.weight.detach(), m.bias.detach(), True, 0.0, 1e-3)
    assert not torch.allclose(out, whole)


def _expected_cut(dl: D.DeviceLoader, epoch: int, batch: int) -> list[torch.Tensor]:
    """(b, H, W) bool cutout squares of each step, from the documented draw order, by plain loops."""
    total = dl.n * dl.duplicates
    g = torch.Generator().manual_seed(L._epoch_seed(dl.seed, epoch))
    torch.randperm(dl.n, generator=g)
    if dl.augment:
        torch.randint(0, 9, (total,), generator=g), torch.randint(0, 9, (total,), generator=g)
        torch.rand(total, generator=g)
    cy, cx = torch.randint(0, dl.h, (total,), generator=g), torch.randint(0, dl.w, (total,), generator=g)
    steps = []
    for step in range(dl.steps_per_epoch(batch)):
        mask = torch.zeros(batch, dl.h, dl.w, dtype=torch.bool)
        for p in range(batch):
            top, left = int(cy[step * batch + p]) - dl.cutout // 2, int(cx[step * batch + p]) - dl.cutout // 2
            mask[p, max(top, 0) : max(top + dl.cutout, 0), max(left, 0) : max(left + dl.cutout, 0)] = True
        steps.append(mask)
    return steps


@pytest.mark.parametrize("side", [1, 4, 5, 10])
@pytest.mark.parametrize("augment,channels_last,dtype", [(False, False, torch.float32), (True, True, torch.bfloat16)])
def test_cutout_zeroes_a_clipped_square_in_normalized_space(side: int, augment: bool, channels_last: bool,
                                                            dtype: torch.dtype) -> None:
    x, y = _random_images(60, (3, 10, 12))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    kw = dict(augment=augment, device="cpu", seed=2, duplicates=2, channels_last=channels_last, dtype=dtype)
    plain = D.DeviceLoader(x, y, mean, std, **kw)
    cut = D.DeviceLoader(x, y, mean, std, cutout=side, **kw)
    masks = _expected_cut(cut, 3, 12)
    clipped = 0
    for (xa, ya), (xc, yc), mask in zip(plain.epoch(3, 12), cut.epoch(3, 12), masks, strict=True):
        assert torch.equal(ya, yc)  # cutout draws come last: crop, flip and order are unchanged
        assert xc.is_contiguous(memory_format=torch.channels_last) == channels_last
        inside = mask[:, None].expand_as(xc)
        assert torch.equal(xc[inside], torch.zeros(int(inside.sum()), dtype=dtype))  # the mean, every channel
        assert torch.equal(xc[~inside], xa[~inside])  # everything else untouched
        sizes = mask.sum((1, 2))
        assert (sizes >= 1).all() and (sizes <= side * side).all()  # centred on a pixel: never empty
        clipped += int((sizes < side * side).sum())
    assert clipped > 0 or side == 1  # some squares reach past the border and are clipped
    # squares are side x side where they fit; copies of one sample are cut in different places
    all_masks = torch.cat(masks)
    assert (all_masks.sum((1, 2)) == side * side).any()
    if side < 10:
        pairs = all_masks.view(-1, 2, 10, 12)
        assert (pairs[:, 0] != pairs[:, 1]).any((1, 2)).float().mean() > 0.5


def test_cutout_square_shape_without_the_reference() -> None:
    """Independent of the draw-order reconstruction: on constant images the zeroed set of each image is an
    axis-aligned rectangle, L x L unless it touches the border, in every channel."""
    n, side = 48, 4
    x = torch.full((n, 2, 9, 9), 200, dtype=torch.uint8)
    dl = D.DeviceLoader(x, torch.arange(n), (0.1, 0.2), (0.3, 0.3), augment=False, device="cpu", seed=0,
                        cutout=side, duplicates=3)
    for xb, _ in dl.epoch(0, 24):
        zero = xb == 0
        assert torch.equal(zero[:, 0], zero[:, 1])
        for z in zero[:, 0]:
            rows, cols = z.any(1).nonzero().flatten(), z.any(0).nonzero().flatten()
            r0, r1, c0, c1 = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
            assert z.sum() == (r1 - r0 + 1) * (c1 - c0 + 1) and z[r0 : r1 + 1, c0 : c1 + 1].all()
            assert r1 - r0 + 1 == side or r0 == 0 or r1 == 8
            assert c1 - c0 + 1 == side or c0 == 0 or c1 == 8
            assert r1 - r0 + 1 <= side and c1 - c0 + 1 <= side


def test_make_loaders_duplicates_and_cutout_train_only() -> None:
    ds = D.make_synthetic(shape=(3, 8, 8), num_classes=4, train_size=256, val_size=40)
    train, val = D.make_loaders(ds, device="cpu", seed=0, augment=True, duplicates=4, cutout=4)
    assert (train.duplicates, train.cutout) == (4, 4) and (val.duplicates, val.cutout) == (1, 0)
    assert train.steps_per_epoch(64) == 256 // 16
    _, plain_val = D.make_loaders(ds, device="cpu", seed=0)
    for (xa, ya), (xb, yb) in zip(val.eval_batches(16), plain_val.eval_batches(16), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_duplicates_and_cutout_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicates"):
        id_loader(duplicates=0)
    with pytest.raises(ValueError, match="duplicates"):
        id_loader(duplicates=True)
    with pytest.raises(ValueError, match="duplicates"):
        id_loader(duplicates=2.0)
    with pytest.raises(ValueError, match="cutout"):
        id_loader(cutout=-1)
    with pytest.raises(ValueError, match=r"dataset.cutout=9: must be at most the image side"):
        id_loader(cutout=9)
    id_loader(cutout=8)  # the whole image is allowed
    dl = id_loader(duplicates=4)
    with pytest.raises(ValueError, match="divisible by dataset.duplicates=4"):
        dl.epoch(0, 30)
    with pytest.raises(ValueError, match="divisible by dataset.duplicates=4"):
        dl.steps_per_epoch(30)
    with pytest.raises(ValueError, match="4..384"):
        dl.epoch(0, 388)  # 97 distinct samples of 96
    assert len(list(dl.epoch(0, 384))) == 1  # every sample, 4 times, in one step
    with pytest.raises(ValueError, match="world"):
        dl.epoch(0, 36, world=8)
    with pytest.raises(ValueError, match="only for in-memory datasets"):
        D.ImageFolderLoader([], (0.5,), (0.5,), augment=True, device="cpu", seed=0, duplicates=2)
    with pytest.raises(ValueError, match="only for in-memory datasets"):
        D.ImageFolderLoader([], (0.5,), (0.5,), augment=True, device="cpu", seed=0, cutout=8)
