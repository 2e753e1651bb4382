"""The one training loop: plan, step, evaluate, log, checkpoint. Read top to bottom, it is what a run does.

`Trainer(prepared).setup()` builds everything a prepared run (`lbtrain.session.prepare`) needs: data on the device,
model, optimizer, the run's state, or all of it restored from its checkpoint. `fit()` is the flat loop over epochs
and updates; what happens after an update (divergence, logging, distances, evaluation, checkpoints, preemption)
is one method, `_after_update`. What changes while a run trains lives in one object, `RunState`, with
`state_dict()` / `load_state_dict()`; the checkpoint is that plus the model, the optimizer, w_0, the RNG states and
the instruments' states. Extensions (instruments, benchmarks, tests) attach to the public `hooks` instead of
patching methods; instruments are plug-ins (`lbtrain.instruments.base`) known only through their protocol.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import lbtrain
from lbtrain import branch as branching
from lbtrain import distributed
from lbtrain.checkpoint import (
    CHECKPOINT_KEYS,
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from lbtrain.config import ConfigError
from lbtrain.data import load_dataset, make_loaders, make_test_loader
from lbtrain.devices import pick_device
from lbtrain.ewa import WeightAverage
from lbtrain.ghost_bn import apply_deferred_stats, convert_to_ghost_bn, defer_running_stats
from lbtrain.instruments import base as instruments
from lbtrain.metrics import fit_log, keep_points, log_spaced_steps, weight_distance
from lbtrain.models import build_model
from lbtrain.optim import build_optimizer, uses_sgd_noise_scale
from lbtrain.results import FINAL, Results
from lbtrain.session import Prepared, prepare
from lbtrain.signals import Interrupted, Preemption
from lbtrain.target import TargetBound, target_steps
from lbtrain.tb import TBLogger

log = logging.getLogger("lbtrain")

# Divergence is judged on the mean training loss of fixed blocks of this many updates (updates 8k+1 ... 8k+8, and
# the last block of a run), whatever `log_every` is: the decision is a function of the run, not of its logging.
DIVERGENCE_BLOCK = 8


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        if torch.are_deterministic_algorithms_enabled():  # (the call itself imports torch._dynamo: ~4 s)
            torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def set_threads(threads: int | None) -> None:
    """`threads=N`: torch's intra-op and inter-op thread pools (None: leave what the environment chose)."""
    if threads is None:
        return
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # the inter-op pool can only be sized before its first use
        torch.set_num_interop_threads(threads)


# ---------------------------------------------------------------------------------------------- run state
@dataclass
class RunState:
    """Everything about a run that changes while it trains, other than model and optimizer."""

    device: torch.device
    step: int = 0  # optimizer updates made
    epochs_done: int = 0  # epochs whose end (distance, validation) has been handled
    status: str = "running"
    best_val_error: float = math.inf
    last_val: dict[str, float] = field(default_factory=dict)
    distances: list[tuple[int, float]] = field(default_factory=list)  # (update, ||w_t - w_0||) read so far
    wall: float = 0.0  # seconds of fit() so far, over all attempts
    images: int = 0  # training images processed
    diverged_at: int | None = None
    target_update: int | None = None  # first evaluation at or below target.error / target.loss
    target_gap: int | None = None  # updates since the evaluation before it (the crossing's resolution)
    last_eval: int = 0  # update of the last evaluation
    last_test: dict[str, float] = field(default_factory=dict)  # the test split at the end (dataset.holdout)
    # On the device, summed since the last log step: loss * n, correct, n; and the last gradient norm.
    acc: torch.Tensor = field(init=False)
    grad_norm: torch.Tensor = field(init=False)
    block: torch.Tensor = field(init=False)  # loss * n, n of the current divergence block (DIVERGENCE_BLOCK updates)

    def __post_init__(self) -> None:
        self.zero_interval()
        self.block = torch.zeros(2, device=self.device)

    def zero_interval(self) -> None:
        self.acc = torch.zeros(3, device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epochs_done": self.epochs_done, "status": self.status,
                "best_val_error": self.best_val_error, "last_val": dict(self.last_val),
                "distances": list(self.distances), "wall": self.wall, "images": self.images,
                "diverged_at": self.diverged_at, "target_update": self.target_update, "target_gap": self.target_gap,
                "last_eval": self.last_eval, "last_test": dict(self.last_test),
                # tensors: torch.save copies them to the host itself
                "acc": self.acc.detach().clone(), "grad_norm": self.grad_norm.detach().clone(),  # (a read here
                "block": self.block.detach().clone()}  # would be a sync)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step, self.epochs_done, self.status = int(d["step"]), int(d["epochs_done"]), str(d["status"])
        self.best_val_error, self.last_val = float(d["best_val_error"]), dict(d["last_val"])
        self.distances = [(int(s), float(v)) for s, v in d["distances"]]
        self.wall, self.images, self.diverged_at = float(d["wall"]), int(d["images"]), d["diverged_at"]
        self.target_update, self.target_gap = d.get("target_update"), d.get("target_gap")
        self.last_eval, self.last_test = int(d.get("last_eval", 0)), dict(d.get("last_test", {}))
        self.acc = d["acc"].to(self.device)
        self.grad_norm = d["grad_norm"].to(self.device)
        if "block" in d:  # (checkpoints written before blocks existed: the block starts empty)
            self.block = d["block"].to(self.device)


# ------------------------------------------------------------------------------------------------- hooks
@dataclass
class Hooks:
    """Public extension points, each a list of callables run in order. Empty lists cost nothing.

    - `micro_backward(trainer, index, parts, log_now)`: after the backward of micro-batch `index` of `parts`
      (parts == 1 without accumulation); `p.grad` holds the sum over micro-batches so far, scaled to the whole batch.
    - `after_backward(trainer, x, y, log_now)`: the whole update's gradient is in `p.grad` (before clipping and the
      optimizer step); `x`, `y` this process's batch; `log_now` whether this update is a log step.
    - `step_end(trainer)`: after the optimizer step; `trainer.state.step` counts it.
    - `log(trainer, scalars)`: at a log step, with the train/opt scalars just written (host values).
    - `distance(trainer, step)`: at each point where ||w_t - w_0|| is measured (log-spaced updates, epoch ends).
    - `flush(trainer)`: before values measured on the device are read back (log points, checkpoints).
    - `epoch_end(trainer, epoch)`: after an epoch's distance, validation and log line.
    """

    micro_backward: list[Callable[..., None]] = field(default_factory=list)
    after_backward: list[Callable[..., None]] = field(default_factory=list)
    step_end: list[Callable[..., None]] = field(default_factory=list)
    log: list[Callable[..., None]] = field(default_factory=list)
    distance: list[Callable[..., None]] = field(default_factory=list)
    flush: list[Callable[..., None]] = field(default_factory=list)
    epoch_end: list[Callable[..., None]] = field(default_factory=list)


class DivergenceMonitor:
    """Judges each DIVERGENCE_BLOCK-update block of the training loss (non-finite, or its mean above `diverge_loss`)
    without a host sync. A sticky flag on the device records whether any block was bad; on the CPU it is read at
    once, on CUDA a non-blocking copy into pinned memory plus an event lets the loop read it once the copy is done
    (a divergence is then noticed up to a block late, at the run's last update at once). Under DDP the ranks'
    flags are combined at log steps (`agreed`), where they synchronise anyway."""

    def __init__(self, device: torch.device, limit: float) -> None:
        self.limit = limit
        cuda = device.type == "cuda"
        self.flag = torch.zeros((), dtype=torch.bool, device=device)
        self.host = torch.zeros(1, dtype=torch.bool, pin_memory=cuda)
        self.view = self.host.numpy()  # read through numpy: no tensor method, no sync
        self.event = torch.cuda.Event() if cuda else None
        self.pending = False

    def accumulate(self, block: torch.Tensor) -> None:
        """Judge a finished block = [loss sum, samples] on the device (then zero it)."""
        self.flag |= ~torch.isfinite(block[0]) | (block[0] > self.limit * block[1])
        block.zero_()

    def check(self, block: torch.Tensor, wait: bool = False) -> bool:
        """Judge a finished block; True once a block is known to be bad. `wait`: read the verdict now."""
        self.accumulate(block)
        if self.event is None:  # on the CPU the copy is done at once: read it through numpy (no tensor method)
            self.host.copy_(self.flag.reshape(1))
            return bool(self.view[0])
        if self.pending and (wait or self.event.query()):
            self.event.synchronize()
            self.pending = False
            if self.view[0]:
                return True
        if not self.pending:
            self.host.copy_(self.flag.reshape(1), non_blocking=True)
            self.event.record()
            self.pending = True
            if wait:
                self.event.synchronize()
                self.pending = False
                return bool(self.view[0])
        return False

    def agreed(self) -> bool:
        """Under DDP: whether any rank saw a bad block (one all-reduce; ranks call it at the same log steps)."""
        return bool(distributed.all_reduce_sum(self.flag.float().reshape(1)).item() > 0)


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """One run. `Trainer(prepared)` takes a run prepared by `lbtrain.session.prepare` (what the CLI does); API users
    (tests, scripts) may pass a composed config and a folder they own instead: it is prepared (without a lock)
    in `setup()`."""

    def __init__(self, run: Prepared | Any, run_dir: str | Path | None = None):
        self.prepared: Prepared | None = run if isinstance(run, Prepared) else None
        self.cfg = run.cfg if isinstance(run, Prepared) else run
        self.run_dir = run.run_dir if isinstance(run, Prepared) else Path(run_dir)  # type: ignore[arg-type]
        self.dist = distributed.env_world()
        self.device = self.prepared.device if self.prepared else pick_device(str(self.cfg.device),
                                                                             self.dist.local_rank)
        self.hooks = Hooks()

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def target_updates(self) -> int:
        """Where this run stops: the plan's last update, or `max_steps` when that comes first."""
        total = self.plan.total_updates
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    # ---------------------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Build the run (or restore it from its checkpoint). Sets process-wide torch state as a run needs it: the
        seed, deterministic algorithms (`deterministic=`), cuDNN autotuning and the thread count (`threads=`)."""
        cfg, dev = self.cfg, self.device
        if self.prepared is None:
            self.prepared = prepare(cfg, self.run_dir)
        self.dist = distributed.init(dev)
        set_threads(cfg.threads)
        set_determinism(cfg.seed, cfg.deterministic)
        try:
            data = load_dataset(cfg.dataset)  # not kept: on CUDA the loaders hold it, on the device
        except ValueError as e:  # a subset that the data's classes cannot fill
            raise ConfigError("dataset.subset", cfg.dataset.subset, str(e)) from None
        p = self.prepared = self.prepared.with_data(data.train_size, data.num_classes, data.input_shape)
        self.plan, self.identity, self.identity_hash, self.folder = p.plan, p.identity, p.identity_hash, p.folder
        self.batch, self.bn_batch, self.has_batchnorm = p.batch, p.bn_batch, p.has_batchnorm
        self.branch = p.branch  # a branch (lbtrain.branch): its start, data stream and smoothed loss
        if cfg.duplicates > 1 and not data.augment and not cfg.dataset.cutout:
            log.warning("duplicates=%d without augmentation (dataset.augment=false, no cutout): the copies of a "
                        "sample are identical", cfg.duplicates)
        self.train_loader, self.val_loader = make_loaders(
            data, device=dev, seed=self.branch.data_seed if self.branch else cfg.seed,
            channels_last=cfg.channels_last, duplicates=cfg.duplicates, cutout=cfg.dataset.cutout)
        self.test_loader = make_test_loader(data, device=dev, seed=cfg.seed, channels_last=cfg.channels_last)

        model = build_model(cfg.model, data.num_classes, data.input_shape)
        if self.plan.ghost_batch:
            model = convert_to_ghost_bn(model, self.plan.ghost_batch)
        model = model.to(dev, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
        self.net = model  # the plain module: checkpoints and the weight distance use it
        self.params = [p for p in model.parameters() if p.requires_grad]
        b, o = cfg.base, cfg.optimizer
        self.opt = build_optimizer(model, o.name, lr=self.plan.lr, momentum=self.plan.momentum,
                                   weight_decay=b.weight_decay, nesterov=b.nesterov, betas=tuple(o.betas), eps=o.eps,
                                   trust_coefficient=o.trust_coefficient, exclude_bn_bias=o.exclude_bn_bias,
                                   fused=dev.type == "cuda" or None, bias_correction=o.bias_correction,
                                   phi_bounds=list(o.phi_bounds) if o.phi_bounds is not None else None)
        # Smith et al.'s g = lr N / (B (1 - m)) is SGD's noise scale: for the others opt/noise_scale is not logged
        # (an adaptive optimizer rescales each coordinate's step, so lr alone does not set the noise).
        self.sgd_noise_scale = uses_sgd_noise_scale(o.name, self.plan.momentum)
        # Read on every update: plain attributes, not config lookups (~10-25 us each).
        self.micro_batch, self.grad_clip = cfg.micro_batch, b.grad_clip
        self.log_every, self.every_steps = cfg.log_every, cfg.checkpoint.every_steps
        self.w0 = [p.detach().clone() for p in self.params]
        self.ewa = WeightAverage(model, cfg.ewa.decay) if cfg.ewa.decay else None
        t = cfg.target
        self.target = ("error", t.error) if t.error is not None else ("loss", t.loss) if t.loss is not None else None
        self.autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision.name == "bf16")
        self.state = RunState(dev)
        self._pending: list[tuple[int, torch.Tensor]] = []  # distances measured on the device, not yet read
        # Under DDP ranks must agree on when to stop, so the blocks are judged at log steps there (all-reduced).
        self.monitor = DivergenceMonitor(dev, cfg.diverge_loss)

        # Accumulating: ghost BN running stats get the one update of the whole step after the last micro-batch.
        self.deferred_bn = defer_running_stats(model) if self.micro_batch and self.plan.ghost_batch else []
        if not self.plan.ghost_batch and self.bn_batch < self.batch and self.has_batchnorm:
            log.warning("BatchNorm statistics are computed over %d samples (%s), not the batch of %d: this acts like "
                        "ghost batch norm of that size. Recorded as bn_batch in results.json.", self.bn_batch,
                        "micro_batch" if self.micro_batch else "the per-process share", self.batch)
        checkpoint = None if self.folder.final else self._resume()
        self.resumed_from = checkpoint is not None
        if self.branch and not self.resumed_from and not self.folder.final:  # a new branch: the parent's state
            branching.start(self)
        self.model = model
        if self.dist.enabled:
            # Buffers are not broadcast from rank 0: each rank updates BN running stats from its own (ghost)
            # batches and sync_buffers() averages them, which equals the single-process statistics exactly
            # because the running-stat update is affine in the batch statistics.
            with warnings.catch_warnings():  # torch advises keeping broadcast_buffers=False for rank-local buffers
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)
        if cfg.compile:
            # dynamic=False: one graph per batch size (a schedule has a few). With dynamic shapes, inductor cannot
            # compile ghost BN's reshapes of a symbolic batch on conv models (batch_increase + compile failed).
            self.model = torch.compile(self.model, dynamic=False)
        self.distance_steps = log_spaced_steps(self.plan.total_updates)
        self.keep_steps = keep_points(cfg.checkpoint, self.plan.total_updates)
        per_decade = cfg.eval_per_decade
        self.eval_steps = log_spaced_steps(self.plan.total_updates, per_decade) if per_decade else set()
        # Steps to target at a fine resolution (lbtrain.target): at these points only whether the target is reached
        # is decided, from as few samples as the decision needs (the bound); target.log_all: full evaluations.
        self.target_steps = target_steps(self.plan.total_updates, cfg.target.resolution) if self.target else set()
        self.bound = (TargetBound(*self.target, len(self.val_loader), dev)
                      if self.target and not cfg.target.log_all else None)
        if self.target and cfg.target.log_all:
            self.eval_steps |= self.target_steps
        if self.bound and checkpoint and "target_bound" in checkpoint:
            self.bound.load_state_dict(checkpoint["target_bound"])
        self.instruments = instruments.attach(self)
        if self.branch:  # its smoothed loss, kept like an instrument's results and state
            self.instruments["branch"] = branching.TailLoss(self, DIVERGENCE_BLOCK)
        saved = (checkpoint or {}).get("instruments") or {}
        for name, inst in self.instruments.items():  # an instrument's state (e.g. the noise scale's averages)
            if name in saved:
                inst.load_state_dict(saved[name])
        if not self.resumed_from and self.dist.main and not self.folder.final:
            # a run killed before its first checkpoint starts over: its points would otherwise be duplicated
            for stale in self.run_dir.glob("events.out.tfevents.*"):
                log.info("starting over: removing %s of an earlier attempt without a checkpoint", stale.name)
                stale.unlink()
        self.tb = TBLogger(self.run_dir, enabled=self.dist.main and not self.folder.final,
                           purge_step=self.state.step + 1 if self.resumed_from else None)

    # ------------------------------------------------------------------------------------------ checkpoints
    def sync_buffers(self) -> None:
        """Average floating-point buffers (BN running stats) over ranks; a no-op in one process."""
        if self.dist.enabled:
            for b in self.net.buffers():
                if b.is_floating_point():
                    distributed.all_reduce_sum(b).div_(self.dist.world)

    def save(self) -> None:
        """Write the rolling checkpoint (and, at a `checkpoint.keep` point, a copy into the run's history)."""
        self.flush_distances()
        self.sync_buffers()
        st = self.state
        if self.dist.enabled:  # the checkpoint holds the interval's metric sums over all ranks, on rank 0
            sums = distributed.all_reduce_sum(st.acc.clone())
            st.acc = sums if self.dist.main else torch.zeros_like(sums)
        if not self.dist.main:
            return
        self.tb.flush()  # every point up to this step is on disk before the checkpoint says so
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        save_checkpoint(self.ckpt_path, {
            "model": self.net.state_dict(), "optimizer": self.opt.state_dict(), "w0": self.w0,
            "state": st.state_dict(), "rng": rng, "identity": self.identity,
            "identity_hash": self.identity_hash, "plan": self.plan.summary(),
            "instruments": {name: inst.state_dict() for name, inst in self.instruments.items()},
            **({"ewa": self.ewa.state_dict()} if self.ewa else {}),
            **({"target_bound": self.bound.state_dict()} if self.bound else {}),
        }, meta={"identity": self.identity, "identity_hash": self.identity_hash, "status": st.status,
                 "step": st.step, "version": lbtrain.__version__})
        if st.step in self.keep_steps:  # the history: an atomic copy named by its update, read back
            kept = self.run_dir / "checkpoints" / f"update_{st.step:08d}.pt"
            kept.parent.mkdir(exist_ok=True)
            atomic_write_bytes(kept, self.ckpt_path.read_bytes())
            read_checkpoint_meta(kept)  # header and checksum of the copy (CheckpointError if it does not read)

    def _resume(self) -> dict[str, Any] | None:
        """Restore the run from its own checkpoint, else from `resume=PATH` (a checkpoint of this same run moved
        elsewhere; `prepare` checked that its identity is this run's); None when starting fresh."""
        path = self.ckpt_path if self.ckpt_path.exists() else (Path(self.cfg.resume) if self.cfg.resume else None)
        ckpt = self.prepared.checkpoint if self.prepared else None
        if ckpt is None and path is None:
            return None
        if ckpt is None:  # prepared without verification: load it now
            ckpt = load_checkpoint(path, required=CHECKPOINT_KEYS)
        self.prepared = replace(self.prepared, checkpoint=None)  # not kept twice in memory
        self.restore(ckpt)
        if self.state.status not in FINAL:
            self.state.status = "running"  # an interrupted (or failed) attempt goes on
        if not self.dist.main:  # rank 0 carries the sums of all ranks (see save)
            self.state.acc.zero_()
        log.info("resuming %s from update %d", path, self.state.step)
        return ckpt

    @torch.no_grad()
    def restore(self, ckpt: dict[str, Any], *, run_state: bool = True, rng: bool = True) -> None:
        """A checkpoint's training state into this set-up trainer: the model, the optimizer (momentum buffers, Adam
        moments and step counts), w_0 and the weight average; with `run_state` its `RunState`, with `rng` its random
        state. What resuming, a branch (`lbtrain.branch.start`) and `lbtrain-measure` load."""
        self.net.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        for w, saved in zip(self.w0, ckpt["w0"]):
            w.copy_(saved)
        if self.ewa is not None and "ewa" in ckpt:
            self.ewa.load_state_dict(ckpt["ewa"])
        if run_state:
            self.state.load_state_dict(ckpt["state"])
        if rng:
            torch.set_rng_state(ckpt["rng"]["torch"].cpu())
            if ckpt["rng"]["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), self.device)

    # -------------------------------------------------------------------------------------------- one update
    def train_step(self, x: torch.Tensor, y: torch.Tensor, log_now: bool) -> None:
        """One optimizer update on a (per-rank) batch, split into micro-batches if asked. No host sync.
        The model is in train mode (fit() sets it, and again after each evaluation)."""
        self.opt.zero_grad(set_to_none=True)
        n = x.shape[0]
        parts = n // (self.micro_batch or n)
        # Micro-batch m is the strided x[m::parts] (views), as ghost batches are strided: each ghost batch of
        # a micro-batch is then one of the whole batch, and the update equals the one without accumulation.
        chunks = [(x, y)] if parts == 1 else list(zip(x.unflatten(0, (-1, parts)).transpose(0, 1),
                                                      y.view(-1, parts).t()))
        acc = self.state.acc
        for i, (xc, yc) in enumerate(chunks):
            # DDP: all-reduce gradients only on the last micro-batch (no_sync is one-shot: one `with` per chunk)
            sync = self.model.no_sync() if self.dist.enabled and i < parts - 1 else contextlib.nullcontext()
            with sync:
                with self.autocast:
                    out = self.model(xc)
                    loss = F.cross_entropy(out.float(), yc)
                (loss * (yc.shape[0] / n)).backward()
            summed = loss.detach() * yc.shape[0]
            acc[0] += summed
            self.state.block[0] += summed  # the divergence block's sum (see DivergenceMonitor)
            acc[1] += (out.argmax(1) == yc).sum()
            for hook in self.hooks.micro_backward:
                hook(self, i, parts, log_now)
        acc[2] += n
        self.state.block[1] += n
        apply_deferred_stats(self.deferred_bn)
        for hook in self.hooks.after_backward:
            hook(self, x, y, log_now)
        if self.grad_clip is not None:
            self.state.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        elif log_now:
            self.state.grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None], foreach=True)
        self.opt.step()

    # -------------------------------------------------------------------------------------------- evaluation
    def _eval_net(self) -> torch.nn.Module:
        """The network evaluations use (the averaged weights under EWA), in eval mode; `self.model.train()` after."""
        self.sync_buffers()
        self.model.eval()
        net = self.net if not self.cfg.compile else self.model
        if self.ewa:
            net = self.ewa.model(self.net)
            net.eval()
        return net

    def _predict(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample cross-entropy and wrong (0/1, float) of `net` on one batch."""
        with self.autocast:
            out = net(x)
        return F.cross_entropy(out.float(), y, reduction="none"), (out.argmax(1) != y).float()

    @property
    def eval_batch(self) -> int:
        """Evaluation batch per process: micro_batch is what fits in memory; without it, at least the training
        batch does."""
        return self.micro_batch or max(self.batch // self.dist.world, 256)

    @torch.no_grad()
    def evaluate(self, loader: Any = None) -> dict[str, float]:
        """Loss and error on `loader` (the validation split by default), with the averaged weights under EWA."""
        net = self._eval_net()
        totals = torch.zeros(3, device=self.device)  # loss sum, wrong, count
        # the validation split's per-sample losses order the bound's next look (one process: its batches are the
        # split in order; under DDP the bounded looks keep the order up to date themselves)
        record = loader is None and self.bound is not None and not self.dist.enabled
        loader = loader or self.val_loader
        seen = 0
        for x, y in loader.eval_batches(self.eval_batch * self.dist.world, self.dist.rank, self.dist.world):
            losses, wrong = self._predict(net, x, y)
            totals[0] += losses.sum()
            totals[1] += wrong.sum()
            totals[2] += y.shape[0]
            if record:
                self.bound.record(torch.arange(seen, seen + y.shape[0], device=self.device), losses)
                seen += y.shape[0]
        loss, wrong, count = distributed.all_reduce_sum(totals).tolist()
        self.model.train()
        # wrong / count, not 1 - correct / count: 100 errors in 2000 are exactly 0.05, so a run stops at a target of
        # 0.05 where its (float32) TensorBoard point says it reached it
        return {"val/loss": loss / count, "val/error": wrong / count}

    def validate(self) -> None:
        """Evaluate now and record it (val/* at this update, best error; the target's crossing)."""
        st = self.state
        st.last_val = self.evaluate()
        st.best_val_error = min(st.best_val_error, st.last_val["val/error"])
        self.tb.scalars(st.step, st.last_val)
        if self.target and st.target_update is None and st.last_val[f"val/{self.target[0]}"] <= self.target[1]:
            st.target_update, st.target_gap = st.step, st.step - st.last_eval
            log.info("target val %s <= %g reached at update %d (resolution %d updates)", self.target[0],
                     self.target[1], st.step, st.target_gap)
        st.last_eval = st.step
        self._tick = time.perf_counter()  # evaluation time is not training throughput

    @torch.no_grad()
    def check_target(self) -> None:
        """At a target point (`target_steps`): decide whether the validation split is still above the target from
        its hardest samples first (the exact bound of `lbtrain.target`); only a point the bound cannot decide is
        evaluated and recorded in full (`validate`), so the crossing is a full evaluation's."""
        bound, st, dist = self.bound, self.state, self.dist
        assert bound is not None
        net, order, partial = self._eval_net(), bound.order(), torch.zeros((), device=self.device)
        above = False
        for lo, hi in bound.chunks():
            idx = order[lo:hi].tensor_split(dist.world)[dist.rank] if dist.enabled else order[lo:hi]
            losses = []
            for part in idx.split(self.eval_batch):
                x, y = self.val_loader.samples(part)
                loss, wrong = self._predict(net, x, y)
                partial += wrong.sum() if bound.metric == "error" else loss.sum()
                losses.append(loss)
            losses = torch.cat(losses) if losses else torch.zeros(0, device=self.device)
            if dist.enabled:  # every rank keeps the same order: the chunk's losses from all ranks
                scattered = torch.zeros(bound.n, device=self.device)
                scattered[idx] = losses
                bound.record(order[lo:hi], distributed.all_reduce_sum(scattered)[order[lo:hi]])
            else:
                bound.record(idx, losses)
            if bound.above(distributed.all_reduce_sum(partial.clone()).item()):  # one host read per chunk
                above = True
                break
        self.model.train()
        if not above:
            self.validate()  # at or below the target by the bound's own count: the full evaluation decides
            return
        st.last_eval = st.step  # a look, without a value for the whole split
        self._tick = time.perf_counter()  # evaluation time is not training throughput

    @property
    def reached(self) -> bool:
        """The run reached its target (it stops there)."""
        return self.state.target_update is not None

    # ----------------------------------------------------------------------------------------------- logging
    def log_train(self, interval_images: int, interval_time: float) -> float:
        """Write train/* and opt/* for the interval since the last log; returns the mean train loss."""
        st = self.state
        acc = distributed.all_reduce_sum(st.acc.clone())
        # one host sync for all of it; the gradient norm is the same on every rank (gradients are all-reduced)
        loss_sum, correct, n, grad_norm = torch.cat([acc, st.grad_norm.float().reshape(1)]).tolist()
        loss = loss_sum / n if n else math.nan
        self.flush_distances()
        last = st.step - 1
        scalars = {
            "train/loss": loss,
            "train/error": 1.0 - correct / n if n else math.nan,
            "opt/lr": self.plan.lr_at(last),
            "opt/batch_size": self.plan.batch_at(last),
            **({"opt/noise_scale": self.plan.noise_scale(last)} if self.sgd_noise_scale else {}),
            "opt/grad_norm": grad_norm,
            "perf/images_per_sec": interval_images / max(interval_time, 1e-9),
        }
        self.tb.scalars(st.step, scalars)
        st.zero_interval()
        for hook in self.hooks.log:
            hook(self, scalars)
        return loss

    def log_distance(self) -> None:
        """Measure ||w_t - w_0|| now, on the device; it is read (and written) at the next log point."""
        st = self.state
        last = self._pending[-1][0] if self._pending else (st.distances[-1][0] if st.distances else None)
        if last != st.step:
            self._pending.append((st.step, weight_distance(self.params, self.w0)))
            for hook in self.hooks.distance:
                hook(self, st.step)

    def flush_distances(self) -> None:
        for hook in self.hooks.flush:
            hook(self)
        if not self._pending:
            return
        values = torch.stack([d for _, d in self._pending]).tolist()  # one host sync for all of them
        for (step, _), d in zip(self._pending, values):
            self.state.distances.append((step, d))
            self.tb.scalars(step, {"weights/distance": d})
        self._pending = []

    # ------------------------------------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        """Train to the end of the plan (or max_steps); returns results.json's content."""
        st, cfg = self.state, self.cfg
        if self.folder.final or st.status in FINAL:
            return self._already_done()
        if not self.resumed_from:
            self.tb.hparams(self.results().hparams())
            d0 = weight_distance(self.params, self.w0).item() if self.branch else 0.0  # (a branch starts at U)
            self.tb.scalars(0, {"weights/distance": d0})
            st.distances.append((0, d0))
        self._clock = time.perf_counter() - st.wall  # wall time accumulates over attempts
        with Preemption() as self._preempt, self._progress(self.target_updates) as self._bar:
            try:
                self.model.train()
                self._tick, self._tick_images = time.perf_counter(), 0
                for epoch in range(st.epochs_done, self.plan.num_epochs):
                    for x, y in self._batches(epoch):
                        self._update(x, y)
                        if not self._after_update():
                            break
                    if st.status != "running" or self._end_of_epoch(epoch):
                        break
                if st.status == "running":
                    st.status = "completed"  # (at the plan's end, or at the target)
                if self.test_loader is not None and cfg.eval_test and not st.last_test:  # the test split, once
                    st.last_test = {k.replace("val/", "test/"): v for k, v in self.evaluate(self.test_loader).items()}
                    self.tb.scalars(st.step, st.last_test)
                self._checkpoint(final=True)
            except Interrupted as e:
                st.status = "interrupted"
                self._checkpoint(final=True)
                self._write_results()
                log.warning("interrupted at update %d; checkpoint saved. Re-run the same command to resume.", st.step)
                self._preempt.chain(e.signum)
                raise
        self.tb.hparams(self.results().hparams(), end=True)
        if math.isfinite(st.best_val_error):  # a run that diverged before any evaluation has none
            self.tb.scalars(st.step, {"val/best_error": st.best_val_error})
        self.tb.close()
        return self._write_results()

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's batches of `epoch`, from the current update up to the epoch's end (or the target)."""
        st, plan = self.state, self.plan
        self._epoch_batch = plan.batch_at_epoch(epoch)
        self._epoch_last = min(plan.epoch_start[epoch] + plan.epoch_steps[epoch], self.target_updates)
        begin = st.step - plan.epoch_start[epoch]
        batches = (branching.batches(self.train_loader, self.branch, begin, self.dist.rank, self.dist.world)
                   if self.branch else
                   self.train_loader.epoch(epoch, self._epoch_batch, begin, self.dist.rank, self.dist.world))
        return itertools.islice(batches, max(self._epoch_last - st.step, 0))

    def _update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer update at the plan's LR, counted."""
        st = self.state
        self._log_now = (st.step + 1) % self.log_every == 0 or st.step + 1 == self.target_updates
        for g in self.opt.param_groups:
            g["lr"] = self.plan.lr_at(st.step)
        self.train_step(x, y, self._log_now)
        if self.ewa:
            self.ewa.update(self.params)
        st.step += 1
        self._tick_images += self._epoch_batch
        self._bar.update(1)
        self._preempt.after_update(st.step)
        for hook in self.hooks.step_end:
            hook(self)

    def _after_update(self) -> bool:
        """Every per-update schedule, in one place: divergence, logging, distance, evaluation, checkpoint,
        preemption. False when the run stops here (diverged); raises Interrupted when a signal asked to stop."""
        st, log_now = self.state, self._log_now
        diverged = False
        if st.step % DIVERGENCE_BLOCK == 0 or st.step == self.target_updates:
            if self.dist.enabled:
                self.monitor.accumulate(st.block)  # ranks agree at log steps (below)
            else:
                diverged = self.monitor.check(st.block, wait=st.step == self.target_updates)
        if self.dist.enabled and log_now:
            diverged = self.monitor.agreed()
        if log_now or diverged:  # a diverged interval's (bad) loss is written, then the run stops
            now = time.perf_counter()
            loss = self.log_train(self._tick_images, now - self._tick)
            st.images += self._tick_images
            self._tick, self._tick_images = now, 0
            self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.plan.lr_at(st.step - 1):.3g}",
                                  batch=self._epoch_batch)
            if diverged:
                self._diverged(loss)
                return False
        if st.step in self.distance_steps:
            self.log_distance()
        within = st.step < self._epoch_last  # (the epoch's end validates and checkpoints itself)
        if within and (st.step in self.eval_steps or st.step in self.target_steps):
            self.validate() if st.step in self.eval_steps or not self.bound else self.check_target()
            if self.reached:
                return False
        if within and (st.step in self.keep_steps or (self.every_steps and st.step % self.every_steps == 0)):
            self._checkpoint()
        stop = bool(self._preempt.received)
        if self.dist.enabled:  # every rank must stop at the same update: they compare flags at log steps
            stop = log_now and distributed.broadcast_flag(stop, self.device)
        if stop:
            raise Interrupted(self._preempt.signum)
        return True

    def _end_of_epoch(self, epoch: int) -> bool:
        """Distance, validation, the log line, instruments, the epoch's checkpoint. True at the run's last update."""
        st, cfg = self.state, self.cfg
        final = st.step >= self.target_updates
        self.log_distance()
        self.flush_distances()
        due = final or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or st.step in self.eval_steps
        if due and not (st.last_val and st.last_eval == st.step):  # (not twice at one update: a target stop)
            self.validate()
        elif st.step in self.target_steps and st.last_eval != st.step:
            self.validate() if not self.bound else self.check_target()
        final = final or self.reached
        if self.dist.main:  # printed above the progress bar in a terminal, always in lbtrain.log
            val = f" val_err {st.last_val['val/error']:.4f}" if st.last_val else ""
            log.info("epoch %d/%d update %d/%d lr %.4g batch %d dist %.3f%s", epoch + 1, self.plan.num_epochs,
                     st.step, self.target_updates, self.plan.lr_at(st.step - 1), self.plan.batch_at(st.step - 1),
                     st.distances[-1][1], val)
        for hook in self.hooks.epoch_end:
            hook(self, epoch)
        st.epochs_done += 1
        self._tick = time.perf_counter()  # evaluation time is not training throughput
        if final:
            return True
        every = cfg.checkpoint.every_epochs
        if ((every and st.epochs_done % every == 0) or (self.every_steps and st.step % self.every_steps == 0)
                or st.step in self.keep_steps):
            self._checkpoint()
        return False

    def _checkpoint(self, final: bool = False) -> None:
        """The wall time so far, then a checkpoint; `final` (the run's end, or a stop): the last interval's images
        are counted too."""
        st = self.state
        if final:
            st.images += self._tick_images
            self._tick_images = 0
        st.wall = time.perf_counter() - self._clock
        self.save()

    @contextlib.contextmanager
    def _progress(self, target: int) -> Iterator[tqdm]:
        """The tqdm bar (in a terminal, or progress=true); log lines print above it instead of through it."""
        p = self.cfg.progress
        show = self.dist.main and (sys.stderr.isatty() if p is None else bool(p))
        bar = tqdm(total=target, initial=self.state.step, unit="upd", dynamic_ncols=True, disable=not show,
                   file=sys.stderr)
        try:
            with logging_redirect_tqdm(loggers=[logging.getLogger()]) if show else contextlib.nullcontext():
                yield bar
        finally:
            bar.close()

    def _diverged(self, loss: float) -> None:
        self.state.status = "diverged"
        self.state.diverged_at = self.state.step
        self.tb.scalars(self.state.step, {"status/diverged": 1.0})
        log.error("diverged at update %d: train loss %s (limit diverge_loss=%g, judged over blocks of %d updates); "
                  "stopping this run", self.state.step, loss, self.cfg.diverge_loss, DIVERGENCE_BLOCK)

    def _already_done(self) -> dict[str, Any]:
        """A completed/diverged run: nothing is trained, deleted or rewritten (results are rebuilt only when
        results.json was lost and the checkpoint knows the outcome)."""
        previous, st = self.folder.results, self.state
        log.info("run already %s (%d updates); nothing to do. Results: %s",
                 previous.status if previous else st.status, previous.updates if previous else st.step,
                 self.run_dir / "results.json")
        return previous.to_dict() if previous else self._write_results()

    # ----------------------------------------------------------------------------------------------- results
    def results(self, status: str | None = None, error: str | None = None) -> Results:
        plan, st = self.plan, self.state
        first_phase_end = plan.lr_updates[1] if len(plan.lr_updates) > 1 else plan.total_updates
        early = [(t, d) for t, d in st.distances if 1 <= t <= first_phase_end]
        pts = early if len(early) >= 3 else [(t, d) for t, d in st.distances if t >= 1]
        fit = fit_log([t for t, _ in pts], [d for _, d in pts])
        e = plan.epoch_of(st.step)  # epochs done = whole epochs + the fraction of a full epoch's updates
        full = plan.train_size // (plan.batch_at_epoch(e) // plan.duplicates)  # updates of a whole epoch e
        done_epochs = e + (st.step - plan.epoch_start[e]) / full
        measured = {name: inst.results() for name, inst in getattr(self, "instruments", {}).items()}
        return Results.of_run(
            status or st.status, self.identity, self.identity_hash, plan.summary(), self.bn_batch, error=error,
            final_val_error=st.last_val.get("val/error"), final_val_loss=st.last_val.get("val/loss"),
            best_val_error=st.best_val_error if math.isfinite(st.best_val_error) else None,
            updates=st.step, planned_updates=plan.total_updates, target_updates=self.target_updates,
            epochs=round(done_epochs, 4), wall_time_s=round(st.wall, 3),
            images_per_sec=round(st.images / st.wall, 1) if st.wall > 0 else None,
            final_distance=st.distances[-1][1] if st.distances else None,
            # a diverged run's fit describes its blow-up, not diffusion: not reported
            distance_fit={**(fit if st.status != "diverged" else dict.fromkeys(fit)), "points": len(pts)},
            diverged_at=st.diverged_at, world_size=self.dist.world, train_size=plan.train_size,
            final_test_error=st.last_test.get("test/error"), final_test_loss=st.last_test.get("test/loss"),
            target=self._target_record(),
            version=lbtrain.__version__, instruments={k: v for k, v in measured.items() if v is not None})

    def _target_record(self) -> dict[str, Any] | None:
        """results.json's `target`: where the run first evaluated at or below its target, and how finely."""
        if not self.target:
            return None
        st, hit = self.state, self.state.target_update
        return {"metric": self.target[0], "value": self.target[1],
                "split": "holdout" if self.cfg.dataset.holdout else "val", "reached": hit is not None,
                "update": hit, "samples": self.plan.samples_at(hit) if hit is not None else None,
                "resolution": st.target_gap, "max_resolution": self.cfg.target.resolution}

    def _write_results(self, status: str | None = None, error: str | None = None) -> dict[str, Any]:
        res = self.results(status, error).to_dict()
        if self.dist.main:
            atomic_write_json(self.run_dir / "results.json", res)
        return res


def run(run: Prepared | Any, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train one prepared run (or a config into `run_dir`); failures are recorded in results.json, then
    re-raised."""
    trainer = Trainer(run, run_dir)
    try:
        trainer.setup()
    except CheckpointError as e:
        raise ConfigError("resume", str(trainer.ckpt_path), str(e)) from None
    try:
        results = trainer.fit()
    except Interrupted:
        distributed.barrier()  # every rank stops at the same update (they agreed at a log step)
        raise
    except (Exception, KeyboardInterrupt) as e:
        if trainer.dist.main:
            with contextlib.suppress(Exception):  # e.g. the disk is full: the original error matters more
                trainer._write_results("failed", f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    else:
        # Ranks leave together: a process that tears down its Gloo group and exits while rank 0 still writes
        # its files can abort ("terminate called without an active exception").
        distributed.barrier()
        return results
    finally:
        distributed.shutdown()


__all__ = ["Trainer", "RunState", "Hooks", "Interrupted", "run", "set_determinism", "set_threads"]
