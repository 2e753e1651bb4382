"""The dataset registry: one `DatasetEntry` per dataset, holding its facts, how it loads, how its presence is
checked and which dataset config keys it reads. No torch import (loading is named by a "module:function" path and
imported on first use), so config validation and the regime arithmetic read the registry without paying for torch.

Everything reads dataset facts from here: the loaders (`lbtrain.data.datasets`), the regime arithmetic shown by
`lbtrain --cfg job` before any data is loaded (`lbtrain.regime.effective`), the pre-flight check (is the data there?
how many updates will the run make? `facts`, `check_present`) and config validation (`validate_dataset`).

Adding a dataset is one `REGISTRY` entry (or `register(...)` from outside the package) plus one YAML file in
`configs/dataset/`. An in-memory torchvision dataset needs only its facts: the default `load` reads the
`torchvision` class's `.data` / `.targets`, the default `check` looks for the `probe` file. A dataset with config
keys of its own also adds the keys to `lbtrain.config.DatasetConfig` and names them in its entry's `reads`: every
other dataset must then leave them at their defaults (`validate_dataset`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, KeysView, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lbtrain.data.files import imagenet_folder, probe_missing, resolve_root

# (entry, dataset config) -> ArrayDataset | ImageFolderDataset (see lbtrain.data.datasets)
LoadFn = Callable[["DatasetEntry", Any], Any]
# (entry, dataset config) -> None, or raise DatasetNotFoundError
CheckFn = Callable[["DatasetEntry", Any], None]


class DatasetKeyError(ValueError):
    """A `dataset.*` value that the named dataset cannot take. `lbtrain.config.validate` raises it as its ConfigError
    (same key, value and message): a class of its own because lbtrain.config imports this module, not the reverse.
    Entries' `validate` functions raise it."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")


def _positive_int(key: str, value: Any) -> None:
    if value is None or not isinstance(value, int) or value < 1:
        raise DatasetKeyError(key, value, "must be an integer >= 1")


def option(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg.key for an attribute object or a mapping (OmegaConf DictConfig is both); default if absent/None."""
    try:
        value = cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def check_files(entry: DatasetEntry, cfg: Any) -> None:
    """The default presence check: the entry's `probe` file under the data root, unless `download` is on (no probe:
    nothing to check). Cheap: one file; loading verifies the rest."""
    if entry.probe is None:
        return
    root = resolve_root(option(cfg, "root"))
    if not bool(option(cfg, "download", False)) and not (root / entry.probe).exists():
        raise probe_missing(entry.torchvision or entry.name, root, entry.probe, downloadable=entry.downloadable)


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset: its facts, how it loads, how its presence is checked, which config keys it reads."""

    name: str
    num_classes: int | None  # None: from the config (`from_config`) or the data (ImageFolder)
    input_shape: tuple[int, int, int] | None  # (C, H, W); None: from the config (synthetic, ImageNet's image_size)
    train_size: int | None  # the official training split; None: from the config or the files
    val_size: int | None
    mean: tuple[float, ...] | None = None  # published per-channel statistics in [0, 1] pixel units
    std: tuple[float, ...] | None = None
    torchvision: str | None = None  # torchvision.datasets class that reads (and downloads) the files
    probe: str | None = None  # a file (relative to the data root) whose presence says the data is there
    downloadable: bool = False
    in_memory: bool = True  # held whole on the device as uint8 (DeviceLoader); False: streamed (ImageFolderLoader)
    # How it loads: "module:function" (imported on first load, which keeps this table torch-free) or the function.
    load: str | LoadFn = "lbtrain.data.sources:load_torchvision"
    check: CheckFn | None = check_files  # is it there? (before any work; None: always)
    # Dataset config keys of its own (beyond name, root, download, augment, subset, cutout, which all read); a
    # dataset whose entry does not list a key that others list must leave it at its schema default.
    reads: tuple[str, ...] = ()
    # Appended to the error when another dataset's config sets one of `reads` ({name}: that dataset's name).
    misuse_hint: str = ""
    validate: Callable[[Any], None] | None = None  # value checks of `reads` (raise DatasetKeyError)
    # Facts known only from the config (e.g. {"input_shape": ...}), replacing the fields above; see `configured`.
    from_config: Callable[[Any], dict[str, Any]] | None = field(default=None, repr=False)

    def for_config(self, dataset_cfg: Any) -> DatasetEntry:
        """This entry with the facts that come from `dataset_cfg` filled in (`from_config`)."""
        return dataclasses.replace(self, **self.from_config(dataset_cfg)) if self.from_config else self

    def loader(self) -> LoadFn:
        """The load function, imported now if named by its path."""
        if callable(self.load):
            return self.load
        module, _, attr = self.load.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------------ synthetic
# Random images with learnable labels (tests, benchmarks): shape, classes and sizes come from the config.
# Absent keys (a plain mapping, not the schema) fall back to these, as loading always did.
SYNTHETIC_FALLBACK = {"shape": (3, 32, 32), "num_classes": 10, "train_size": 4096, "val_size": 1024}


def _synthetic_facts(ds: Any) -> dict[str, Any]:
    get = lambda key: option(ds, key, SYNTHETIC_FALLBACK[key])
    return {"input_shape": tuple(int(s) for s in get("shape")), "num_classes": int(get("num_classes")),
            "train_size": int(get("train_size")), "val_size": int(get("val_size"))}


def _validate_synthetic(ds: Any) -> None:
    shape = list(option(ds, "shape"))
    if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise DatasetKeyError("dataset.shape", shape, "must be [channels, height, width] of integers >= 1")
    classes = option(ds, "num_classes")
    if not isinstance(classes, int) or classes < 2:
        raise DatasetKeyError("dataset.num_classes", classes, "must be an integer >= 2")
    for key in ("train_size", "val_size"):
        _positive_int(f"dataset.{key}", option(ds, key))


# ------------------------------------------------------------------------------------------------ imagenet
def _imagenet_facts(ds: Any) -> dict[str, Any]:
    size = int(option(ds, "image_size", 224))
    return {"input_shape": (3, size, size)}


def _check_imagenet(entry: DatasetEntry, cfg: Any) -> None:
    imagenet_folder(resolve_root(option(cfg, "root")))


# ------------------------------------------------------------------------------------------------ the registry
REGISTRY: dict[str, DatasetEntry] = {
    # scikit-learn's 8x8 digits, shipped inside scikit-learn: 1797 images, split 1536 train / 261 val
    "digits": DatasetEntry("digits", 10, (1, 8, 8), 1536, 261, load="lbtrain.data.sources:load_digits"),
    "mnist": DatasetEntry("mnist", 10, (1, 28, 28), 60000, 10000, (0.1307,), (0.3081,), "MNIST",
                          "MNIST/raw/train-images-idx3-ubyte", downloadable=True),
    "fashion_mnist": DatasetEntry("fashion_mnist", 10, (1, 28, 28), 60000, 10000, (0.2860,), (0.3530,),
                                  "FashionMNIST", "FashionMNIST/raw/train-images-idx3-ubyte", downloadable=True),
    "cifar10": DatasetEntry("cifar10", 10, (3, 32, 32), 50000, 10000, (0.4914, 0.4822, 0.4465),
                            (0.2470, 0.2435, 0.2616), "CIFAR10", "cifar-10-batches-py/data_batch_1", downloadable=True),
    "cifar100": DatasetEntry("cifar100", 100, (3, 32, 32), 50000, 10000, (0.5071, 0.4865, 0.4409),
                             (0.2673, 0.2564, 0.2762), "CIFAR100", "cifar-100-python/train", downloadable=True),
    # ImageFolder layout under <root>/imagenet/{train,val}/<class>/ (or <root>/{train,val}), streamed from disk
    "imagenet": DatasetEntry("imagenet", 1000, None, 1281167, 50000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                             in_memory=False, load="lbtrain.data.sources:load_imagenet", check=_check_imagenet,
                             reads=("image_size", "workers"), from_config=_imagenet_facts),
    "synthetic": DatasetEntry("synthetic", None, None, None, None, load="lbtrain.data.sources:load_synthetic",
                              reads=("shape", "num_classes", "train_size", "val_size"),
                              misuse_hint="to train on fewer samples of {name}, use dataset.subset=N",
                              validate=_validate_synthetic, from_config=_synthetic_facts),
}
DATASETS: KeysView[str] = REGISTRY.keys()  # a live view: names registered later are in it too


def register(entry: DatasetEntry) -> DatasetEntry:
    """Add a dataset from outside the package (its YAML file still goes in `configs/dataset/`)."""
    if entry.name in REGISTRY:
        raise ValueError(f"dataset {entry.name!r} is already registered")
    REGISTRY[entry.name] = entry
    return entry


def entry(name: str) -> DatasetEntry:
    """The entry named `name`; ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset.name={name!r}; expected one of {', '.join(DATASETS)}") from None


def configured(dataset_cfg: Any) -> DatasetEntry:
    """The entry named by a dataset config, with the facts that come from the config filled in."""
    return entry(str(option(dataset_cfg, "name"))).for_config(dataset_cfg)


def full_train_size(dataset_cfg: Any) -> int | None:
    """Samples of the whole training split named by a dataset config (before any `subset`), if known."""
    if str(option(dataset_cfg, "name")) not in REGISTRY:
        return None
    return configured(dataset_cfg).train_size


def train_size(dataset_cfg: Any) -> int | None:
    """Samples a run trains on: `dataset.subset` when set, else the whole training split less the `holdout`
    samples (None if unknown)."""
    subset = option(dataset_cfg, "subset")
    if subset:
        return int(subset)
    full = full_train_size(dataset_cfg)
    return None if full is None else full - int(option(dataset_cfg, "holdout") or 0)


def facts(dataset_cfg: Any) -> tuple[int, int, tuple[int, int, int]]:
    """(training samples, classes, input shape) of the configured data, known before loading it."""
    e = configured(dataset_cfg)
    size = train_size(dataset_cfg)
    if size is None or e.num_classes is None or e.input_shape is None:
        raise ValueError(f"dataset {e.name!r}: sizes, classes and shape are known only after loading it")
    return size, e.num_classes, tuple(int(s) for s in e.input_shape)  # type: ignore[return-value]


def check_present(dataset_cfg: Any) -> None:
    """Raise DatasetNotFoundError (the same one line loading would give) when a dataset's files are not where the
    config says and `download` is off. Cheap: it looks for one file or folder; loading verifies the rest."""
    e = REGISTRY.get(str(option(dataset_cfg, "name")))
    if e is not None and e.check is not None:
        e.check(e, dataset_cfg)


def _plain(value: Any) -> Any:
    # a ListConfig (shape) compares equal to the schema's list default only as a list
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def validate_dataset(ds: Any, defaults: Any) -> None:
    """Checks of the `dataset` config node that need no data (raises DatasetKeyError); `ds.name` is a registered
    name, `defaults` the schema's dataset node (`lbtrain.config.DatasetConfig()`).

    The named entry checks the keys it reads (`validate`); a key that other entries alone read must stay at its
    schema default (a value there would be silently ignored)."""
    e = REGISTRY[ds.name]
    if e.validate is not None:
        e.validate(ds)
    for other in REGISTRY.values():
        for key in other.reads:
            if key in e.reads or other is e:
                continue
            value, default = _plain(option(ds, key)), _plain(getattr(defaults, key, None))
            if value != default:
                owners = " or ".join(f"dataset={o.name}" for o in REGISTRY.values() if key in o.reads)
                hint = other.misuse_hint.format(name=ds.name)
                raise DatasetKeyError(f"dataset.{key}", value,
                                      f"only {owners} reads it" + (f"; {hint}" if hint else ""))
    cutout = option(ds, "cutout")
    if not isinstance(cutout, int) or cutout < 0:
        raise DatasetKeyError("dataset.cutout", cutout, "must be an integer >= 0 (0: no cutout)")
    if cutout and not e.in_memory:
        raise DatasetKeyError("dataset.cutout", cutout, f"is not available for {ds.name} (in-memory datasets only)")
    holdout = option(ds, "holdout")
    if holdout is not None:
        _positive_int("dataset.holdout", holdout)
        full = e.for_config(ds).train_size
        if not e.in_memory:
            raise DatasetKeyError("dataset.holdout", holdout, f"is not available for {ds.name} (in-memory datasets "
                                  "only)")
        if full is not None and holdout >= full:
            raise DatasetKeyError("dataset.holdout", holdout, f"must be less than the training set's {full} samples")
    subset = option(ds, "subset")
    if subset is not None:
        _positive_int("dataset.subset", subset)
        full = e.for_config(ds).train_size
        if full is not None and holdout:
            full -= holdout
        if full is not None and subset > full:
            raise DatasetKeyError("dataset.subset", subset, f"must be at most the training set's {full} samples"
                                  + (" left after the holdout" if holdout else ""))
