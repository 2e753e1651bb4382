"""Datasets and loaders: everything that turns files on disk into training batches.

    registry.py   one entry per dataset: facts, how it loads, how its presence is checked, the config keys it reads
    files.py      where the files are looked for (`resolve_root`), the one-line not-found error, ImageNet's folder
    contract.py   the loader contract (`Loader`, a Protocol) that the trainer, instruments and interp rely on
    datasets.py   ArrayDataset (in memory), ImageFolderDataset (streamed), `load_dataset`, class-balanced subsets
    sources.py    the load functions of the shipped entries (digits, torchvision classes, synthetic, ImageNet)
    loaders.py    DeviceLoader (in memory, batched augmentation), ImageFolderLoader (DataLoader workers)

Adding a dataset is one registry entry plus one YAML file in `configs/dataset/` (see `lbtrain.data.registry`).

This module and the first three above import no torch: config validation (`lbtrain.config`) reads the registry,
and a config mistake is reported without paying for the torch import. The names of the torch-using modules are
imported on first use (PEP 562 `__getattr__`), so `from lbtrain.data import load_dataset` works as before.
"""

from __future__ import annotations

import importlib
from typing import Any

from lbtrain.data.contract import Loader
from lbtrain.data.files import DatasetNotFoundError, resolve_root
from lbtrain.data.registry import (
    DATASETS,
    REGISTRY,
    DatasetEntry,
    DatasetKeyError,
    check_present,
    configured,
    entry,
    facts,
    full_train_size,
    register,
    train_size,
    validate_dataset,
)

# name -> module that defines it, imported when the name is first asked for
_LAZY = {
    "ArrayDataset": "lbtrain.data.datasets",
    "ImageFolderDataset": "lbtrain.data.datasets",
    "SUBSET_SEED": "lbtrain.data.datasets",
    "class_balanced_subset": "lbtrain.data.datasets",
    "load_dataset": "lbtrain.data.datasets",
    "download_if_missing": "lbtrain.data.datasets",
    "make_synthetic": "lbtrain.data.sources",
    "PAD": "lbtrain.data.loaders",
    "DeviceLoader": "lbtrain.data.loaders",
    "ImageFolderLoader": "lbtrain.data.loaders",
    "make_loaders": "lbtrain.data.loaders",
    "make_test_loader": "lbtrain.data.loaders",
}

__all__ = ["DATASETS", "REGISTRY", "DatasetEntry", "DatasetKeyError", "DatasetNotFoundError", "Loader",
           "check_present", "configured", "entry", "facts", "full_train_size", "register", "resolve_root",
           "train_size", "validate_dataset", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'lbtrain.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
