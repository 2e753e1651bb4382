"""Tests for lbtrain.data: dataset parsing from real on-disk formats, error messages, and DeviceLoader
semantics (permutation, determinism, resume, rank slicing, augmentation, normalization)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import skip_md5, write_cifar, write_idx

from lbtrain import data as D

SHARED = Path("/work/shared/data")


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
