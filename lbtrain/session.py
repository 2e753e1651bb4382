"""Prepare a run once: every check that can refuse it and everything it needs to start, before any file is written.

`prepare(cfg, run_dir)` checks, in order: the config's keys and values (`lbtrain.config.validate`, torch-free),
the optimizer's options, that the data is where the config says, the plan (`lbtrain.regime.make_plan`: batch
layout, sizes, updates; a branch's, `lbtrain.branch.resolve`: its parent folder, kept checkpoint and configuration),
the instruments' own options, the device, the model (built on the meta device with a
meta forward pass: options, shapes, BatchNorm over fewer than two samples), the run's identity, and the run
folder (another run's records, a foreign or corrupt checkpoint, another live writer); with `lock=True` it then
takes the folder's lock. The result, `Prepared`, is what the CLI's pre-flight callback, the job and the `Trainer`
all take: nothing is checked twice. A single run is prepared in Hydra's callback before Hydra makes its folder; a
sweep job (whose callback Hydra does not call in a worker) is prepared in the job.
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lbtrain import branch as branching
from lbtrain import distributed
from lbtrain.checkpoint import CHECKPOINT_KEYS, CheckpointError, load_checkpoint
from lbtrain.config import ConfigError, OptimizerConfig, resolved, schema_defaults, validate
from lbtrain.data import check_present, download_if_missing, facts
from lbtrain.devices import pick_device
from lbtrain.identity import identity, identity_hash
from lbtrain.instruments import base as instruments
from lbtrain.models import MODEL_NAMES, build_model
from lbtrain.optim import validate_optimizer_options
from lbtrain.regime import Plan, make_plan
from lbtrain.rundir import FolderState, RunFolderError, RunLock, check_folder, inspect_folder

log = logging.getLogger("lbtrain")
OPTIMIZER_DEFAULTS = {k: getattr(OptimizerConfig(), k)
                      for k in ("betas", "eps", "trust_coefficient", "bias_correction", "phi_bounds")}


@dataclass(frozen=True)
class Prepared:
    """Everything established about a run before it starts (see the module docstring)."""

    cfg: Any
    run_dir: Path
    world: distributed.Dist
    device: torch.device
    plan: Plan
    identity: dict[str, Any]
    identity_hash: str
    train_size: int
    num_classes: int
    input_shape: tuple[int, int, int]
    has_batchnorm: bool
    bn_batch: int  # samples per BatchNorm statistic: the ghost batch, else the micro-batch or per-process batch
    folder: FolderState
    checkpoint: dict[str, Any] | None = None  # the verified checkpoint to resume from, loaded on the CPU
    lock: RunLock | None = None  # the run folder's lock, held (rank 0 of a prepared-with-lock run)
    branch: branching.Branch | None = None  # a branch (branch.parent): what it starts from and trains

    @property
    def batch(self) -> int:
        """The global batch the run starts training at (the plan's: `regime.momentum` may set it)."""
        return self.plan.epoch_batches[0]

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def with_data(self, train_size: int, num_classes: int, input_shape: tuple[int, int, int]) -> Prepared:
        """The same run, re-planned for the loaded data's real sizes where they differ from what the config said
        (an ImageFolder's classes, say); itself when they agree (every dataset whose sizes are known up front)."""
        if (train_size, num_classes, tuple(input_shape)) == (self.train_size, self.num_classes, self.input_shape):
            return self
        plan, has_bn, bn_batch, branch = _plan_and_model(self.cfg, self.world.world, train_size, num_classes,
                                                         tuple(input_shape))
        return replace(self, plan=plan, train_size=train_size, num_classes=num_classes,
                       input_shape=tuple(input_shape), has_batchnorm=has_bn, bn_batch=bn_batch, branch=branch)


def run_identity(cfg: Any, branch: branching.Branch | None = None) -> tuple[dict[str, Any], str]:
    """(identity, short hash) of a composed config; a branch's with its parent's identity hash."""
    ident = identity(resolved(cfg))
    if branch is not None:
        ident = branch.identity(ident)
    return ident, identity_hash(ident, schema_defaults())


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


def _plan_and_model(cfg: Any, world: int, size: int, classes: int,
                    shape: tuple[int, int, int]) -> tuple[Plan, bool, int, branching.Branch | None]:
    """The checks that depend on the data's sizes: (plan, has BatchNorm, samples per BatchNorm statistic, the branch
    (None: not one)). A branch's plan is its own (lbtrain.branch), checked against its parent's plan and folder."""
    if cfg.dataset.subset is not None and cfg.dataset.subset < classes:
        raise ConfigError("dataset.subset", cfg.dataset.subset, f"must hold every one of the {classes} classes "
                          "at least once")
    if cfg.dataset.cutout > min(shape[1], shape[2]):
        raise ConfigError("dataset.cutout", cfg.dataset.cutout, f"must be at most the image side ({min(shape[1:])})")
    # (refuses absurd lengths before building them; a branch's is its parent's plan, whose batch layout was the
    # parent's to check: the branch's own is checked by `resolve`)
    plan = make_plan(cfg, size, 1 if branching.requested(cfg) else world)
    branch = branching.resolve(cfg, plan, size, world) if branching.requested(cfg) else None
    if branch is not None:
        plan = branching.plan(plan, branch)
    instruments.check(cfg, size)
    model_cfg = json.dumps(OmegaConf.to_container(cfg.model, resolve=True) if OmegaConf.is_config(cfg.model)
                           else dict(cfg.model), sort_keys=True, default=str)
    has_bn = _check_model(model_cfg, classes, tuple(shape))
    per_rank = plan.epoch_batches[0] // world
    bn_batch = plan.ghost_batch or cfg.micro_batch or per_rank
    if has_bn and bn_batch < 2:
        key, value = ("micro_batch", cfg.micro_batch) if cfg.micro_batch else ("batch", plan.epoch_batches[0])
        raise ConfigError(key, value, f"leaves {bn_batch} sample per BatchNorm statistic in {cfg.model.name}, "
                          "which is undefined: use at least 2 samples per process and micro-batch")
    return plan, has_bn, bn_batch, branch


def check_config(cfg: Any, world: int = 1, *, local_rank: int = 0, check_data: bool = True,
                 validated: bool = False) -> dict[str, Any]:
    """Every check of the configuration that needs no run folder; returns the facts `Prepared` is made of.
    `validated`: the caller already ran `lbtrain.config.validate` (the CLI does, before importing torch)."""
    if not validated:
        validate(cfg, world)
    if cfg.model.name not in MODEL_NAMES:
        raise ConfigError("model.name", cfg.model.name, f"allowed: {', '.join(MODEL_NAMES)}")
    o = cfg.optimizer
    # (the recipe's momentum; regime.momentum, when set, is checked by lbtrain.config.validate)
    validate_optimizer_options(o.name, momentum=cfg.base.momentum, weight_decay=cfg.base.weight_decay,
                               betas=list(o.betas), eps=o.eps, trust_coefficient=o.trust_coefficient,
                               nesterov=cfg.base.nesterov, defaults=OPTIMIZER_DEFAULTS,
                               bias_correction=o.bias_correction,
                               phi_bounds=list(o.phi_bounds) if o.phi_bounds is not None else None)
    if check_data:
        check_present(cfg.dataset)
        download_if_missing(cfg.dataset)  # (dataset.download=true: a failed download refuses the run here)
    size, classes, shape = facts(cfg.dataset)
    plan, has_bn, bn_batch, branch = _plan_and_model(cfg, world, size, classes, shape)
    device = pick_device(str(cfg.device), local_rank)
    ident, digest = run_identity(cfg, branch)
    return dict(plan=plan, identity=ident, identity_hash=digest, train_size=size, num_classes=classes,
                input_shape=tuple(shape), has_batchnorm=has_bn, bn_batch=bn_batch, device=device, branch=branch)


_checked: dict[str, dict[str, Any]] = {}  # config -> its facts, from a sweep's whole-sweep check in this process


def _key(cfg: Any, world: distributed.Dist) -> str:
    return json.dumps([resolved(cfg), world.world, world.local_rank], sort_keys=True, default=str)


def precheck(cfg: Any) -> None:
    """Check a sweep job's config before the sweep starts (ConfigError & co. on a mistake); a job of this process
    with the same config then takes these facts instead of checking again."""
    world = distributed.env_world()
    _checked[_key(cfg, world)] = check_config(cfg, world.world, local_rank=world.local_rank)


def prepare(cfg: Any, run_dir: str | Path, *, lock: bool = False, verify: bool = True,
            check_data: bool = True, validated: bool = False) -> Prepared:
    """Prepare a run (see the module docstring). `lock`: take the run folder's lock (rank 0), making the folder;
    `verify`: load the checkpoint it will resume from and check it (kept in `Prepared.checkpoint`); `validated`:
    `lbtrain.config.validate` already accepted `cfg`."""
    world = distributed.env_world()
    facts = _checked.pop(_key(cfg, world), None) if _checked else None
    if facts is None:
        facts = check_config(cfg, world.world, local_rank=world.local_rank, check_data=check_data,
                             validated=validated)
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise OSError(20, "Not a directory", str(run_dir))
    folder_check = functools.partial(check_folder, run_dir, facts["identity"], schema_defaults(), cfg.get("resume"))
    folder = folder_check(check_lock=world.main) if run_dir.is_dir() or cfg.get("resume") else inspect_folder(run_dir)
    held = None
    if lock and world.main:
        made = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            held = RunLock(run_dir).acquire()
            now = inspect_folder(run_dir)  # another process may have written between the check and the lock
            if now != folder:
                folder = folder_check(check_lock=False)
        except BaseException:
            if held is not None:
                held.release()
            if made:
                _remove_if_empty(run_dir)
            raise
    checkpoint = None
    try:
        if verify:
            checkpoint = _verified_checkpoint(cfg, run_dir, folder)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return Prepared(cfg=cfg, run_dir=run_dir, world=world, folder=folder, checkpoint=checkpoint, lock=held, **facts)


def _verified_checkpoint(cfg: Any, run_dir: Path, folder: FolderState) -> dict[str, Any] | None:
    """The checkpoint the run resumes from, loaded (on the CPU) and checked; None when it starts fresh or is final."""
    if folder.final:
        return None
    if folder.checkpoint is not None:
        try:
            return load_checkpoint(run_dir / "checkpoint.pt", required=CHECKPOINT_KEYS)
        except CheckpointError as e:
            raise RunFolderError(str(e)) from None
    if cfg.get("resume"):
        try:
            return load_checkpoint(Path(cfg.resume), required=CHECKPOINT_KEYS)
        except CheckpointError as e:
            raise ConfigError("resume", str(cfg.resume), str(e)) from None
    return None


def _remove_if_empty(folder: Path) -> None:
    try:
        (folder / ".lock").unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        pass


__all__ = ["Prepared", "prepare", "precheck", "check_config", "run_identity"]
