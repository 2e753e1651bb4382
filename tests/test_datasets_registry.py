"""The dataset registry (lbtrain.data.registry): a dataset is one entry; facts before loading; generic validation of
the keys each entry reads; the registry and config validation stay torch-free; the loader contract (Protocol)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, make_cfg, only_run, run_main, write_idx

from lbtrain import data as D
from lbtrain.config import ConfigError, DatasetNotFoundError, validate
from lbtrain.data.contract import Loader
from lbtrain.data.registry import REGISTRY, DatasetEntry, facts

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- one entry is a dataset


def load_toy(entry: DatasetEntry, cfg) -> D.ArrayDataset:
    """A toy in-memory dataset: 64 train / 16 val 1x6x6 images of 4 classes, fixed content."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (80, 1, 6, 6), dtype=torch.uint8, generator=g)
    y = torch.arange(80) % 4
    return D.ArrayDataset(entry.name, x[:64], y[:64], x[64:], y[64:], entry.num_classes, entry.mean, entry.std)


TOY = DatasetEntry("toy", 4, (1, 6, 6), 64, 16, (0.5,), (0.25,), load=load_toy)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> DatasetEntry:
    monkeypatch.setitem(REGISTRY, TOY.name, TOY)  # registered for this test only (register() has no undo)
    return TOY


def test_register_refuses_a_second_entry_of_one_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        D.register(REGISTRY["mnist"])


def test_toy_entry_loads_and_states_its_facts(toy: DatasetEntry) -> None:
    assert "toy" in D.DATASETS  # a live view of the registry
    ds = D.load_dataset({"name": "toy", "subset": 32, "augment": True})
    assert isinstance(ds, D.ArrayDataset) and ds.train_size == 32 and ds.val_size == 16 and ds.augment
    assert sorted(ds.train_y.bincount().tolist()) == [8, 8, 8, 8]  # the class-balanced subset, as for any entry
    cfg = make_cfg("dataset.name=toy")
    validate(cfg)
    D.check_present(cfg.dataset)  # no probe file: nothing to look for
    assert facts(cfg.dataset) == (64, 4, (1, 6, 6))
    assert facts(make_cfg("dataset.name=toy", "dataset.subset=40").dataset) == (40, 4, (1, 6, 6))


def test_toy_entry_plus_one_yaml_trains_through_the_cli(toy: DatasetEntry, tmp_path: Path) -> None:
    """One registry entry and one YAML file (here in a user's config folder): the CLI trains on it."""
    mine = tmp_path / "my_configs" / "dataset"
    mine.mkdir(parents=True)
    (mine / "toy.yaml").write_text("name: toy\naugment: true\n")
    p = run_main(f"hydra.searchpath=[file://{mine.parent}]", "dataset=toy", "max_steps=3", "progress=false",
                 cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads((only_run(tmp_path / "outputs" / "digits") / "results.json").read_text())
    assert res["status"] == "completed" and res["updates"] == 3 and res["train_size"] == 64
    assert res["identity"]["dataset"]["name"] == "toy"


def test_new_torchvision_dataset_is_one_entry_of_facts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-memory torchvision dataset (KMNIST here) needs only its facts: the default load reads the class's
    .data/.targets, the default presence check looks for the probe file."""
    kmnist = DatasetEntry("kmnist", 10, (1, 28, 28), 20, 7, (0.19,), (0.35,), "KMNIST",
                          "KMNIST/raw/train-images-idx3-ubyte", downloadable=True)
    monkeypatch.setitem(REGISTRY, kmnist.name, kmnist)
    cfg = make_cfg("dataset.name=kmnist", f"dataset.root={tmp_path}")
    with pytest.raises(DatasetNotFoundError, match="KMNIST/") as ei:
        D.check_present(cfg.dataset)
    assert "dataset.download=true" in str(ei.value)
    with pytest.raises(DatasetNotFoundError, match="KMNIST/"):
        D.load_dataset(cfg.dataset)
    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tr_x, te_x = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 256, (7, 28, 28))
    write_idx(raw, "train", tr_x, rng.integers(0, 10, 20))
    write_idx(raw, "t10k", te_x, rng.integers(0, 10, 7))
    D.check_present(cfg.dataset)
    ds = D.load_dataset(cfg.dataset)
    assert ds.name == "kmnist" and ds.input_shape == (1, 28, 28) and ds.mean == (0.19,)
    assert np.array_equal(ds.train_x[:, 0].numpy(), tr_x) and ds.val_size == 7
    assert facts(cfg.dataset) == (20, 10, (1, 28, 28))


# ---------------------------------------------------------------- facts before loading, generic validation


@pytest.mark.parametrize("overrides,expected", [
    (["dataset=digits"], (1536, 10, (1, 8, 8))),
    (["dataset=mnist"], (60000, 10, (1, 28, 28))),
    (["dataset=fashion_mnist", "dataset.subset=1000"], (1000, 10, (1, 28, 28))),
    (["dataset=cifar100"], (50000, 100, (3, 32, 32))),
    (["dataset=imagenet"], (1281167, 1000, (3, 224, 224))),
    (["dataset=imagenet", "dataset.image_size=64"], (1281167, 1000, (3, 64, 64))),
    (["dataset=synthetic", "dataset.shape=[1,8,8]", "dataset.num_classes=3", "dataset.train_size=100"],
     (100, 3, (1, 8, 8))),
])
def test_facts_before_loading(overrides: list[str], expected: tuple) -> None:
    assert facts(make_cfg(*overrides).dataset) == expected


def test_facts_match_the_loaded_data(tmp_path: Path) -> None:
    for overrides in (["dataset=digits", "dataset.subset=100"],
                      ["dataset=synthetic", "dataset.shape=[2,5,7]", "dataset.num_classes=3", "dataset.train_size=40",
                       "dataset.val_size=8"]):
        cfg = make_cfg(*overrides).dataset
        ds = D.load_dataset(cfg)
        assert facts(cfg) == (ds.train_size, ds.num_classes, ds.input_shape)


@pytest.mark.parametrize("overrides,message", [
    (["dataset=mnist", "dataset.image_size=64"], "dataset.image_size=64: only dataset=imagenet reads it"),
    (["dataset=cifar10", "dataset.workers=2"], "dataset.workers=2: only dataset=imagenet reads it"),
    (["dataset=imagenet", "dataset.shape=[1,8,8]"], "dataset.shape=[1, 8, 8]: only dataset=synthetic reads it; to "
                                                    "train on fewer samples of imagenet, use dataset.subset=N"),
    (["dataset=synthetic", "dataset.workers=0"], "dataset.workers=0: only dataset=imagenet reads it"),
])
def test_keys_of_other_entries_must_stay_at_their_defaults(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        validate(make_cfg(*overrides))
    assert str(ei.value) == message


def test_an_entry_reading_a_key_accepts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    sized = DatasetEntry("sized", 10, (3, 32, 32), 100, 10, reads=("image_size",), load=load_toy)
    monkeypatch.setitem(REGISTRY, sized.name, sized)
    validate(make_cfg("dataset.name=sized", "dataset.image_size=32"))
    validate(make_cfg("dataset=imagenet", "dataset.image_size=32"))
    with pytest.raises(ConfigError, match="only dataset=imagenet or dataset=sized reads it"):
        validate(make_cfg("dataset=mnist", "dataset.image_size=32"))


def test_registry_and_validation_import_no_torch() -> None:
    """Config mistakes are reported without the torch import: the registry, the package's torch-free names and
    config validation must not pull it in."""
    code = (
        "import sys\n"
        "from omegaconf import OmegaConf\n"
        "from lbtrain.config import Config, ConfigError, validate\n"
        "from lbtrain.data import DATASETS, check_present, facts, resolve_root\n"
        "from lbtrain.regime import effective\n"
        "cfg = OmegaConf.structured(Config)\n"
        "cfg.dataset.name = 'mnist'\n"
        "cfg.dataset.train_size = 500\n"
        "try:\n"
        "    validate(cfg)\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "print(facts(cfg.dataset), 'torch' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "dataset.train_size=500: only dataset=synthetic reads it; to train on fewer samples of mnist, use "
        "dataset.subset=N", "(60000, 10, (1, 28, 28)) False"]


@pytest.mark.parametrize("name", ["mnist", "imagenet"])
def test_presence_check_and_loading_give_one_message(tmp_path: Path, name: str) -> None:
    """The pre-flight check and loading share each entry's file logic (ImageNet's root rule is written once)."""
    cfg = {"name": name, "root": str(tmp_path)}
    with pytest.raises(DatasetNotFoundError) as checked:
        D.check_present(cfg)
    with pytest.raises(DatasetNotFoundError) as loaded:
        D.load_dataset(cfg)
    assert str(checked.value) == str(loaded.value)


def test_imagenet_root_may_be_the_folder_itself(tmp_path: Path) -> None:
    _image_folder(tmp_path)
    for root in (tmp_path, tmp_path / "imagenet"):
        D.check_present({"name": "imagenet", "root": str(root)})
        assert D.load_dataset({"name": "imagenet", "root": str(root), "workers": 0}).root == tmp_path / "imagenet"


# ---------------------------------------------------------------- the loader contract


def _image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for c in ("n01", "n02"):
            (root / "imagenet" / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    root / "imagenet" / split / c / f"{i}.png")


def _same_signature(loader_cls: type, name: str) -> None:
    """The loader's method takes the Protocol's parameters, in order, with the same defaults."""
    ours = inspect.signature(getattr(Loader, name)).parameters
    theirs = inspect.signature(getattr(loader_cls, name)).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()], name


def test_both_loaders_keep_the_contract(tmp_path: Path) -> None:
    _image_folder(tmp_path)
    folder = D.load_dataset({"name": "imagenet", "root": str(tmp_path), "image_size": 16, "workers": 0})
    memory = D.load_dataset({"name": "synthetic", "shape": [1, 6, 6], "train_size": 20, "val_size": 5})
    for ds in (folder, memory):
        for loader in D.make_loaders(ds, device="cpu", seed=0):
            assert isinstance(loader, Loader)
    methods = [n for n in ("__len__", "steps_per_epoch", "epoch", "eval_batches", "samples") if hasattr(Loader, n)]
    for cls in (D.DeviceLoader, D.ImageFolderLoader):
        for name in methods:
            _same_signature(cls, name)


def test_image_folder_samples_are_the_evaluation_view(tmp_path: Path) -> None:
    """ImageFolderLoader.samples (the sharpness probe's fixed set) serves the plain evaluation transform, also for
    an augmented training loader, as DeviceLoader.samples does."""
    _image_folder(tmp_path)
    ds = D.load_dataset({"name": "imagenet", "root": str(tmp_path), "image_size": 16, "workers": 0})
    augmented, _ = D.make_loaders(ds, device="cpu", seed=0)
    plain, _ = D.make_loaders(ds, device="cpu", seed=0, augment=False)
    idx = torch.tensor([1, 5, 6])
    x, y = augmented.samples(idx)
    (ex, ey), = [(xb[idx], yb[idx]) for xb, yb in plain.eval_batches(8)]
    assert x.shape == (3, 3, 16, 16) and torch.equal(x, ex) and torch.equal(y, ey)
    assert torch.equal(torch.cat([xb for xb, _ in augmented.eval_batches(8)]),
                       torch.cat([xb for xb, _ in plain.eval_batches(8)]))
