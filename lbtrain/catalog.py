"""One table of dataset facts: sizes, shapes, classes, normalization statistics and where the files live.

Everything else reads these facts from here: the loaders (`lbtrain.data`), the regime arithmetic shown by
`lbtrain --cfg job` before any data is loaded (`lbtrain.regime.effective`), the pre-flight check (is the data
there? how many updates will the run make?) and config validation (which names exist). No torch import, so a
config mistake is reported without paying for it.

Adding a dataset held in memory is one entry here plus one loader branch in `lbtrain.data` and one YAML file in
`configs/dataset/`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetFacts:
    name: str
    num_classes: int | None  # None: read from the data (ImageFolder, synthetic)
    input_shape: tuple[int, int, int] | None  # (C, H, W); None: from the config (synthetic, ImageNet's image_size)
    train_size: int | None  # the official training split; None: from the config or the files
    val_size: int | None
    mean: tuple[float, ...] | None = None  # published per-channel statistics in [0, 1] pixel units
    std: tuple[float, ...] | None = None
    torchvision: str | None = None  # torchvision.datasets class that reads (and downloads) the files
    probe: str | None = None  # a file (relative to the data root) whose presence says the data is there
    downloadable: bool = False
    in_memory: bool = True  # held whole on the device as uint8 (DeviceLoader); False: streamed (ImageFolderLoader)


DATASET_FACTS: dict[str, DatasetFacts] = {
    # scikit-learn's 8x8 digits, shipped inside scikit-learn: 1797 images, split 1536 train / 261 val
    "digits": DatasetFacts("digits", 10, (1, 8, 8), 1536, 261),
    "mnist": DatasetFacts("mnist", 10, (1, 28, 28), 60000, 10000, (0.1307,), (0.3081,), "MNIST",
                          "MNIST/raw/train-images-idx3-ubyte", downloadable=True),
    "fashion_mnist": DatasetFacts("fashion_mnist", 10, (1, 28, 28), 60000, 10000, (0.2860,), (0.3530,),
                                  "FashionMNIST", "FashionMNIST/raw/train-images-idx3-ubyte", downloadable=True),
    "cifar10": DatasetFacts("cifar10", 10, (3, 32, 32), 50000, 10000, (0.4914, 0.4822, 0.4465),
                            (0.2470, 0.2435, 0.2616), "CIFAR10", "cifar-10-batches-py/data_batch_1", downloadable=True),
    "cifar100": DatasetFacts("cifar100", 100, (3, 32, 32), 50000, 10000, (0.5071, 0.4865, 0.4409),
                             (0.2673, 0.2564, 0.2762), "CIFAR100", "cifar-100-python/train", downloadable=True),
    "imagenet": DatasetFacts("imagenet", 1000, None, 1281167, 50000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                             in_memory=False),
    # random images with learnable labels (tests, benchmarks): shape, classes and sizes come from the config
    "synthetic": DatasetFacts("synthetic", None, None, None, None),
}
DATASETS: tuple[str, ...] = tuple(DATASET_FACTS)


def _get(cfg: object, key: str) -> object:
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def full_train_size(dataset_cfg: object) -> int | None:
    """Samples of the whole training split named by a dataset config (before any `subset`), if known."""
    facts = DATASET_FACTS.get(str(_get(dataset_cfg, "name")))
    if facts is None:
        return None
    if facts.name == "synthetic":
        return int(_get(dataset_cfg, "train_size"))  # type: ignore[arg-type]
    return facts.train_size


def train_size(dataset_cfg: object) -> int | None:
    """Samples a run trains on: `dataset.subset` when set, else the whole training split (None if unknown)."""
    subset = _get(dataset_cfg, "subset")
    return int(subset) if subset else full_train_size(dataset_cfg)  # type: ignore[arg-type]
