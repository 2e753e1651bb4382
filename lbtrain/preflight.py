"""The one pre-flight check: everything that can reject a run, run before any file is written.

`preflight(cfg)` checks, in order: the config's keys and values (`lbtrain.config.validate`), that the data is
where the config says, the plan (a batch larger than the data, zero updates, ghost batches that do not divide a
batch of the schedule), the device, and the model (its options, its shapes on this data, BatchNorm over fewer
than two samples). It returns what the run needs from those checks: the plan and the run's identity. The CLI runs
it before Hydra makes the run folder; `Trainer.setup` runs it again with the loaded data's real sizes.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from lbtrain import catalog
from lbtrain.config import ConfigError, resolved, schema_defaults, validate
from lbtrain.data import check_present
from lbtrain.identity import identity, identity_hash
from lbtrain.models import MODEL_NAMES, build_model
from lbtrain.optim import validate_optimizer_options
from lbtrain.regime import Plan, make_plan


@dataclass(frozen=True)
class Checked:
    """What the pre-flight check established about a run."""

    plan: Plan
    identity: dict[str, Any]
    identity_hash: str
    num_classes: int
    input_shape: tuple[int, int, int]
    has_batchnorm: bool
    bn_batch: int  # samples per BatchNorm statistic: the ghost batch, else the micro-batch or per-process batch


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device for `device=` (auto: CUDA when present, else the CPU); ConfigError when not available."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device", name, "CUDA is not available on this machine; use device=cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError("device", name, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("device", name, "MPS (Apple GPU) is not available on this machine; use device=cpu or auto")
    return torch.device(name)


def run_identity(cfg: Any) -> tuple[dict[str, Any], str]:
    """(identity, short hash) of a composed config."""
    ident = identity(resolved(cfg))
    return ident, identity_hash(ident, schema_defaults())


def data_facts(cfg: Any) -> tuple[int, int, tuple[int, int, int]]:
    """(training samples, classes, input shape) of the configured data, known before loading it."""
    ds = cfg.dataset
    facts = catalog.DATASET_FACTS[ds.name]
    size = catalog.train_size(ds)
    classes = facts.num_classes if facts.num_classes is not None else int(ds.num_classes)
    if facts.input_shape is not None:
        shape = facts.input_shape
    elif ds.name == "synthetic":
        shape = tuple(int(s) for s in ds.shape)  # type: ignore[assignment]
    else:
        shape = (3, int(ds.image_size), int(ds.image_size))
    assert size is not None
    return size, classes, shape  # type: ignore[return-value]


@functools.lru_cache(maxsize=32)
def _check_model(model_cfg: str, classes: int, shape: tuple[int, ...]) -> bool:
    """Build the model without memory (meta device) and run a meta forward pass of two samples, which catches option
    and shape mistakes; returns whether it has BatchNorm. Cached: a process checks a model once (the meta pass
    costs ~0.3 s)."""
    spec = json.loads(model_cfg)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Initializing zero-element tensors": the error says it
            model = build_model(spec, classes, shape)
            empty = [n for n, p in model.named_parameters() if p.numel() == 0]
            if empty:
                raise ValueError(f"gives parameters with no elements ({', '.join(empty[:3])})")
            model.train()
            model(torch.empty((2, *shape)))
    except (ValueError, TypeError, RuntimeError, IndexError) as e:  # a config mistake, not a crash
        raise ConfigError("model.kwargs", spec.get("kwargs", {}), " ".join(str(e).split())[:300]) from None
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def preflight(cfg: Any, world: int = 1, *, train_size: int | None = None, num_classes: int | None = None,
              input_shape: tuple[int, int, int] | None = None, local_rank: int = 0,
              check_data: bool = True) -> Checked:
    """Check a composed config end to end; raise ConfigError / DatasetNotFoundError (one line each) on a mistake.

    `train_size`, `num_classes` and `input_shape` are the loaded data's, when known (else the catalog's)."""
    validate(cfg, world)
    if cfg.model.name not in MODEL_NAMES:
        raise ConfigError("model.name", cfg.model.name, f"allowed: {', '.join(MODEL_NAMES)}")
    o = cfg.optimizer
    validate_optimizer_options(o.name, momentum=cfg.regime.momentum if cfg.regime.momentum is not None
                               else cfg.base.momentum, weight_decay=cfg.base.weight_decay, betas=list(o.betas),
                               eps=o.eps, trust_coefficient=o.trust_coefficient, nesterov=cfg.base.nesterov)
    if check_data:
        check_present(cfg.dataset)
    size, classes, shape = data_facts(cfg)
    size, classes, shape = train_size or size, num_classes or classes, input_shape or shape
    if cfg.dataset.subset is not None and cfg.dataset.subset < classes:
        raise ConfigError("dataset.subset", cfg.dataset.subset, f"must hold every one of the {classes} classes "
                          "at least once")
    if cfg.dataset.cutout > min(shape[1], shape[2]):
        raise ConfigError("dataset.cutout", cfg.dataset.cutout, f"must be at most the image side ({min(shape[1:])})")
    plan = make_plan(cfg, size, world)
    if cfg.sharpness.every_epochs and cfg.sharpness.samples > size:
        raise ConfigError("sharpness.samples", cfg.sharpness.samples, f"must be at most the {size} training samples")
    pick_device(str(cfg.device), local_rank)

    model_cfg = json.dumps(OmegaConf.to_container(cfg.model, resolve=True) if OmegaConf.is_config(cfg.model)
                           else dict(cfg.model), sort_keys=True, default=str)
    has_bn = _check_model(model_cfg, classes, tuple(shape))
    per_rank = cfg.batch // world
    bn_batch = plan.ghost_batch or cfg.micro_batch or per_rank
    if has_bn and bn_batch < 2:
        key, value = ("micro_batch", cfg.micro_batch) if cfg.micro_batch else ("batch", cfg.batch)
        raise ConfigError(key, value, f"leaves {bn_batch} sample per BatchNorm statistic in {cfg.model.name}, "
                          "which is undefined: use at least 2 samples per process and micro-batch")
    ident, digest = run_identity(cfg)
    return Checked(plan, ident, digest, classes, shape, has_bn, bn_batch)
