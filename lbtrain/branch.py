"""Branches: short runs started from a parent run's kept checkpoint at a larger batch, to measure the local critical
batch the way Merrill et al. (2025, "Critical batch size revisited") do.

A branch is an ordinary run (its own folder, lock, checkpoint, resume, results.json; any launcher) whose config is
the parent's plus the `branch` node (`lbtrain.config.BranchConfig`):

    lbtrain <the parent's settings> branch.parent=RUN branch.update=U branch.k=K branch.rule=linear \
        branch.samples=D branch.seed=S

What it trains, from the parent's kept checkpoint `RUN/checkpoints/update_<U>.pt` (`checkpoint.keep` /
`checkpoint.keep_per_decade` in the parent):
- the start: the parent's weights, optimizer state, w_0 and (branch.seed=0) random state at update U, and its
  weight average under `ewa.decay`. Optimizer state is kept as it is: SGD's momentum buffers; Adam-type optimizers'
  (AdamW, LAMB) first and second moments and their step count, so the bias correction goes on from the parent's
  step. The first moment estimates the mean gradient, which does not depend on the batch; the second estimates
  E[g^2] = mean^2 + noise / B at the parent's batch B, larger than at k B, and relaxes to the new batch over about
  1 / (1 - beta_2) updates (1000 at beta_2 = 0.999): a branch shorter than that takes Adam steps a little smaller
  than a run at k B throughout would. Kept rather than reset, because resetting (or rescaling by an unknown noise
  share) would change the k = 1 branch too, which must be the parent itself;
- the batch: k B, B the parent's batch at update U (its next update's); the data: the parent's own stream of
  B-batches from update U on (its epochs continued past its end), taken k at a time. So k = 1 is the parent step
  for step, and every branch from one point with one seed sees the same D samples in the same order, only grouped
  into batches differently: branches differ in k alone. `branch.seed` = S > 0 takes the stream of another data
  seed (the parent's permutation of each epoch replaced, from the same position on): seeds are the repetitions
  whose spread the local critical batch's interval shows;
- the LR: the parent's LR at update U (`Plan.lr_at(U)`) times 1 (`none`), sqrt(k) (`sqrt`) or k (`linear`), held
  constant for the whole branch: the parent's schedule after U is not followed (Merrill et al. branch for a short
  stretch at a fixed LR; a decay inside it would mix the batch's effect with the schedule's). Branch from points
  where the parent's LR is constant over the next D samples for k = 1 to follow the parent exactly;
- the length: D / (k B) updates (D a multiple of k B), a plan of one "epoch" (`plan`); `max_steps` may stop a branch
  early like any run and is the one identity key not compared with the parent's.

The smoothed loss (`TailLoss`): the mean training loss (loss x samples summed, over samples) of the branch's last
quarter of updates, exact on the device (every update counted, whatever `log_every` is) and kept in the checkpoint
across a resume; results.json records it under `branch`, with what the branch was. With D a multiple of 4 k B the
last quarter is the same D / 4 samples for every k. lbtrain.analysis.branching compares branches by it.

The identity: the parent's folder is run-only (where it lies); `lbtrain.session` records `branch.parent_identity`,
the parent's identity hash, beside update, k, rule, samples and seed (`Branch.identity`). Every check that can
refuse a branch (`resolve`: the folder, the kept checkpoint's header and identity, the parent's configuration, the
batch, the samples) is made before anything is written; the kept checkpoint's checksum is verified when it is loaded
(`start`). Under DDP the parent's plan is taken at one process (its batch layout was the parent's to check); the
branch's k B must split over the processes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lbtrain.checkpoint import CHECKPOINT_KEYS, CheckpointError, load_checkpoint, read_checkpoint_meta
from lbtrain.config import ConfigError, resolved, schema_defaults
from lbtrain.identity import describe_diff, diff, identity, identity_hash
from lbtrain.regime import Plan, check_batch, lr_factor

log = logging.getLogger("lbtrain")

TAIL = 0.25  # the smoothed loss is the mean training loss over this last fraction of a branch's updates
KEPT = "checkpoints"  # a run's kept checkpoints: KEPT/update_<N>.pt (lbtrain.trainer.Trainer.save)
NOT_COMPARED = ("max_steps",)  # identity keys a branch need not share with its parent


def kept_checkpoint(parent: str | Path, update: int) -> Path:
    """The parent's kept checkpoint at `update`."""
    return Path(parent) / KEPT / f"update_{int(update):08d}.pt"


def kept_updates(parent: str | Path) -> list[int]:
    """The updates at which the run in `parent` kept a checkpoint, in order."""
    out = []
    for p in (Path(parent) / KEPT).glob("update_*.pt"):
        try:
            out.append(int(p.stem.split("_", 1)[1]))
        except ValueError:
            continue
    return sorted(out)


def rule_factor(rule: Any, k: int) -> float:
    """The LR factor of `rule` (none | sqrt | linear) at k times the batch."""
    return lr_factor(getattr(rule, "name", rule), float(k))


def data_seed(seed: int, branch_seed: int) -> int:
    """The data seed of a branch's stream: the parent's for branch.seed 0, else one mixed from both (63 bits)."""
    if not branch_seed:
        return int(seed)
    state = np.random.SeedSequence([int(seed), int(branch_seed), 0xB4A5C4]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


@dataclass(frozen=True)
class Branch:
    """A branch, resolved against its parent (`resolve`)."""

    parent: str  # the parent's folder, as given
    checkpoint: str  # its kept checkpoint
    parent_identity: str  # the parent's identity hash
    update: int  # U: the parent's update the branch starts from
    parent_samples: int  # samples the parent trained on up to U
    k: int
    rule: str
    samples: int  # D
    seed: int  # branch.seed
    data_seed: int  # the loader seed of the branch's stream
    parent_batch: int  # B
    parent_lr: float  # the parent's LR at U
    lr: float  # the branch's: rule factor x parent_lr
    updates: int  # D / (k B)
    start_epoch: int  # the parent's epoch at U
    start_step: int  # and its B-batch there

    @property
    def batch(self) -> int:
        return self.k * self.parent_batch

    def identity(self, ident: dict[str, Any]) -> dict[str, Any]:
        """The run's identity (lbtrain.identity.identity, which leaves out the parent's folder) with the parent's
        identity hash."""
        out = json.loads(json.dumps(ident))
        out.setdefault("branch", {})["parent_identity"] = self.parent_identity
        return out

    def record(self) -> dict[str, Any]:
        """What results.json says the branch was (beside its identity): plain values."""
        return {"parent": self.parent, "parent_identity": self.parent_identity, "update": self.update,
                "parent_samples": self.parent_samples, "k": self.k, "rule": self.rule, "batch": self.batch,
                "parent_batch": self.parent_batch, "parent_lr": self.parent_lr, "lr": self.lr,
                "samples": self.samples, "updates": self.updates, "seed": self.seed}


def requested(cfg: Any) -> bool:
    """Whether `cfg` is a branch."""
    node = cfg.get("branch") if hasattr(cfg, "get") else getattr(cfg, "branch", None)
    return node is not None and node.get("parent") is not None


def resolve(cfg: Any, parent_plan: Plan, train_size: int, world: int = 1) -> Branch:
    """Check the branch against its parent and work out what it trains; ConfigError naming the key on a refusal.
    `parent_plan` is the plan of `cfg` as the parent's (the branch's config is the parent's: checked here)."""
    b = cfg.branch
    folder = Path(str(b.parent))
    if not folder.is_dir():
        raise ConfigError("branch.parent", str(b.parent), "no such run folder")
    u = int(b["update"])
    path = kept_checkpoint(folder, u)
    if not path.is_file():
        kept = kept_updates(folder)
        have = (f"it kept updates {', '.join(map(str, kept))}" if kept else
                "it kept none: run the parent with checkpoint.keep=[...] or checkpoint.keep_per_decade=N")
        raise ConfigError("branch.update", u, f"no kept checkpoint {path} ({have})")
    try:
        meta = read_checkpoint_meta(path)
    except CheckpointError as e:
        raise ConfigError("branch.update", u, str(e)) from None
    theirs = meta.get("identity")
    if not isinstance(theirs, dict):
        raise ConfigError("branch.parent", str(b.parent), f"{path} was written without a run identity")
    if "branch" in theirs:
        raise ConfigError("branch.parent", str(b.parent), "is itself a branch: branch from the run it branched from")
    if meta.get("step") != u:
        raise ConfigError("branch.update", u, f"{path} holds update {meta.get('step')}, not {u}")
    mine = identity(resolved(cfg))
    mine.pop("branch", None)
    changes = diff(theirs, mine, schema_defaults(), ignore=NOT_COMPARED)
    if changes:
        raise ConfigError("branch.parent", str(b.parent), "trained another configuration: "
                          + describe_diff(changes, "parent", "this branch")
                          + "; give the branch the parent's settings (only branch.*, max_steps and run-only keys "
                          "may differ)")
    parent_hash = identity_hash(theirs, schema_defaults())  # (as this version computes it: the report's too)
    k, big = int(b.k), parent_plan.batch_at(u)
    kb = k * big
    try:
        check_batch(kb, 0, train_size, world, cfg.get("micro_batch"), parent_plan.ghost_batch,
                    parent_plan.duplicates, configured=False)
    except ConfigError as e:
        raise ConfigError("branch.k", k, f"gives the batch k x B = {k} x {big} = {kb}, which is refused: "
                          f"{e.allowed}") from None
    samples = int(b.samples)
    if samples % kb:
        raise ConfigError("branch.samples", samples, f"must be a multiple of the branch's batch k x B = {k} x {big} "
                          f"= {kb} (every branch trains the same samples)")
    epoch = parent_plan.epoch_of(u)
    rule = getattr(b.rule, "name", str(b.rule))
    parent_lr = parent_plan.lr_at(u)
    return Branch(parent=str(b.parent), checkpoint=str(path), parent_identity=parent_hash, update=u,
                  parent_samples=parent_plan.samples_at(u), k=k, rule=rule, samples=samples, seed=int(b.seed),
                  data_seed=data_seed(int(cfg.seed), int(b.seed)), parent_batch=big, parent_lr=parent_lr,
                  lr=parent_lr * rule_factor(rule, k), updates=samples // kb, start_epoch=epoch,
                  start_step=u - parent_plan.epoch_start[epoch])


def plan(parent: Plan, br: Branch) -> Plan:
    """The branch's plan: `br.updates` updates at batch k B and the constant LR `br.lr`, as one "epoch" (the
    branch's data is the parent's stream, not passes of its own: `batches`)."""
    first = parent.epoch_batches[0]
    return Plan(train_size=parent.train_size, r=parent.r * br.batch / first, start_lr=br.lr, lr=br.lr,
                epochs=br.samples / (parent.train_size * parent.duplicates), momentum=parent.momentum,
                ghost_batch=parent.ghost_batch, epoch_batches=(br.batch,), epoch_steps=(br.updates,),
                epoch_start=(0,), total_updates=br.updates, lr_updates=(0,), lr_values=(br.lr,), warmup_updates=0,
                schedule="constant", duplicates=parent.duplicates, base_noise_scale=parent.base_noise_scale)


def batches(loader: Any, br: Branch, begin: int = 0, rank: int = 0, world: int = 1) -> Iterator[tuple[Any, Any]]:
    """This rank's share of the branch's batches from its update `begin` on: the parent's stream of B-batches
    (`loader.epoch` at batch B and seed `br.data_seed`, from the parent's epoch and step at U, epochs continued
    without end), k at a time. Since a loader's draws are indexed by position in the epoch, k consecutive B-batches
    are the k B-batch a k B loader would serve at that position (rank shares included: rank r's share of each part,
    in order, is its strided share of the whole); k = 1 serves the loader's batches themselves."""
    import torch

    per_epoch = loader.steps_per_epoch(br.parent_batch)
    pos = br.start_step + begin * br.k
    epoch, step = br.start_epoch + pos // per_epoch, pos % per_epoch
    parts: list[tuple[Any, Any]] = []
    while True:
        for xy in loader.epoch(epoch, br.parent_batch, step, rank, world):
            if br.k == 1:
                yield xy
                continue
            parts.append(xy)
            if len(parts) == br.k:
                yield torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
                parts = []
        epoch, step = epoch + 1, 0


def start(trainer: Any) -> None:
    """Load the parent's kept checkpoint into a new branch (see the module docstring for what is kept). The
    parent's instruments and target state stay the parent's: a branch starts its own."""
    import torch

    br: Branch = trainer.branch
    try:
        ckpt = load_checkpoint(br.checkpoint, required=CHECKPOINT_KEYS)
    except CheckpointError as e:
        raise ConfigError("branch.update", br.update, str(e)) from None
    # weights, momentum buffers, Adam moments and step counts, w_0, the weight average; the parent's random state
    # with seed 0 (k = 1 is the parent); the branch's own run state
    trainer.restore(ckpt, run_state=False, rng=br.seed == 0)
    if br.seed != 0:
        torch.manual_seed(br.data_seed)
    log.info("branching from %s at update %d: batch %d x %d = %d, LR %.4g (%s rule from %.4g), %d updates",
             br.checkpoint, br.update, br.k, br.parent_batch, br.batch, br.lr, br.rule, br.parent_lr, br.updates)


class TailLoss:
    """The branch's smoothed loss: the training loss summed (loss x samples, and samples) over its last `TAIL` of
    updates, on the device and without a host sync. Each update's sums are read from the trainer's divergence block
    (`RunState.block`, [loss x samples, samples] since the block's start, zeroed after every DIVERGENCE_BLOCK-th
    update): the difference from what was read at the update before. Under DDP each rank sums its share; at every
    flush (log points, checkpoints: all ranks together) the sums move to rank 0, as the trainer's interval sums do,
    so rank 0's checkpoint holds them all. Follows the instrument protocol (`results`, `state_dict`,
    `load_state_dict`): results.json records it under `branch`."""

    def __init__(self, trainer: Any, block: int):
        import torch

        self.trainer, self.block = trainer, int(block)
        total = trainer.plan.total_updates
        self.window = max(1, math.ceil(TAIL * total))
        self.first = total - self.window  # updates after this one are counted
        self.sums = torch.zeros(2, device=trainer.device)  # loss x samples, samples (this rank, since the last flush)
        self.seen = torch.zeros(2, device=trainer.device)  # the block's sums at the last update
        self.counted = 0
        trainer.hooks.step_end.append(self.step_end)
        trainer.hooks.flush.append(self.flush)

    def step_end(self, trainer: Any) -> None:
        step = trainer.state.step
        if (step - 1) % self.block == 0:  # the block was zeroed after that update (or, at 0, started empty)
            self.seen.zero_()
        now = trainer.state.block.detach().clone()
        if step > self.first:
            self.sums += now - self.seen
            self.counted += 1
        self.seen = now

    def flush(self, trainer: Any) -> None:
        if trainer.dist.enabled:
            from lbtrain.distributed import all_reduce_sum

            total = all_reduce_sum(self.sums.clone())
            self.sums = total if trainer.dist.main else total.zero_()

    def results(self) -> dict[str, Any]:
        br: Branch = self.trainer.branch
        out: dict[str, Any] = {**br.record(), "tail_fraction": TAIL, "tail_updates": self.window,
                               "smoothed_loss": None, "tail_samples": None}
        if self.counted >= self.window:
            loss, n = self.sums.tolist()
            out.update(smoothed_loss=loss / n if n else None, tail_samples=round(n))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.detach().clone(), "counted": self.counted, "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = state["sums"].to(self.trainer.device)
        if not self.trainer.dist.main:
            self.sums.zero_()  # rank 0 carries the sums of all ranks (see flush)
        self.counted = int(state["counted"])
        self.seen = self.trainer.state.block.detach().clone()  # the block as restored


__all__ = ["Branch", "TailLoss", "TAIL", "batches", "data_seed", "kept_checkpoint", "kept_updates", "plan",
           "requested", "resolve", "rule_factor", "start"]
