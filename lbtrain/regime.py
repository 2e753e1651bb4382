"""The arithmetic of every regime: update -> LR, epoch -> batch, how many updates. Pure functions.

A run is planned once, from the config and the training-set size, into a `Plan`. Rounding rules:
- a milestone at (fractional) epoch e falls on update `start(floor(e)) + round(frac(e) * steps(floor(e)))`,
  so LR changes land on whole updates; the run's length uses the same rule for its last epoch;
- every epoch has `train_size // distinct` updates, `distinct = batch / duplicates` the distinct samples of a
  step (the last partial batch is dropped, so each step has exactly `batch` samples, which ghost batch norm
  needs; with batch augmentation an epoch is one pass over the distinct samples);
- the batch only changes at epoch boundaries: a batch-increase milestone at epoch e takes effect from
  epoch ceil(e).

LR shapes (`base.schedule`): `step` is the recipe's piecewise-constant schedule (milestones + gamma, or explicit
`lr_schedule` points), stretched by `epochs=` and `adapt`; `cosine` is `lr * (1 + cos(pi t / T)) / 2` and
`linear` is `lr * (1 - t / T)`, per update, over the T updates after warm-up, down to 0 at the last update;
`constant` keeps `lr` to the end (with EWA, the schedule of Zhang et al.'s critical-batch runs: steps to a target
then do not depend on the run's length). The shapes other than `step` take the recipe's `lr` and ignore its
milestones. Every shape starts with the regime's linear warm-up from
`base.lr` to the scaled LR.

Smith et al.'s momentum rule (`regime.momentum`): the SGD noise scale g = lr N / (B (1 - m)) stays the base
recipe's when the momentum changes: with `lr_scaling=none` the batch becomes `base.batch (1 - m_base) / (1 - m)`,
with `lr_scaling=linear` the LR becomes `base.lr (B / base.batch) (1 - m) / (1 - m_base)`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lbtrain.config import ConfigError, LRScaling
from lbtrain.data.registry import train_size as catalog_train_size

SCHEDULES = ("step", "cosine", "linear", "constant")
# A plan longer than this is a typo (epochs=1e9), refused before its per-epoch tables would fill the memory.
# ImageNet at batch 1 for 10k epochs is ~1.3e10 updates; the largest shipped adapt regime has ~6400 epochs.
MAX_EPOCHS = 10**6
MAX_UPDATES = 10**11


def _enum_name(value: Any) -> str:
    return value.name if hasattr(value, "name") else str(value)


@dataclass(frozen=True)
class Plan:
    train_size: int
    r: float  # batch / base.batch
    start_lr: float  # the LR warm-up starts from (the unscaled base LR)
    lr: float  # the scaled LR of the first phase (the peak of a cosine / linear shape)
    epochs: float
    momentum: float
    ghost_batch: int | None
    epoch_batches: tuple[int, ...]  # batch of epoch i (samples per step, copies included)
    epoch_steps: tuple[int, ...]  # updates in epoch i
    epoch_start: tuple[int, ...]  # first update of epoch i
    total_updates: int
    lr_updates: tuple[int, ...]  # updates where a piecewise-constant LR phase starts (first is 0)
    lr_values: tuple[float, ...]
    warmup_updates: int
    schedule: str = "step"  # step | cosine | linear | constant
    duplicates: int = 1  # copies of each distinct sample in a step (batch augmentation)
    base_noise_scale: float | None = None  # the base recipe's g at update 0 (for the momentum rule)

    def lr_at(self, update: int) -> float:
        """LR used by the optimizer step that produces update number `update + 1` (0-based step)."""
        if self.schedule == "step":
            lr = self.lr_values[bisect.bisect_right(self.lr_updates, update) - 1]
        elif self.schedule == "constant":
            lr = self.lr
        else:
            span = max(self.total_updates - self.warmup_updates, 1)
            t = min(max(update - self.warmup_updates, 0), span) / span
            lr = self.lr * (0.5 * (1.0 + math.cos(math.pi * t)) if self.schedule == "cosine" else 1.0 - t)
        if update < self.warmup_updates:
            target = lr if self.schedule == "step" else self.lr
            lr = self.start_lr + (target - self.start_lr) * update / self.warmup_updates
        return lr

    def epoch_of(self, update: int) -> int:
        return max(bisect.bisect_right(self.epoch_start, update) - 1, 0)

    def batch_at_epoch(self, epoch: int) -> int:
        return self.epoch_batches[min(epoch, len(self.epoch_batches) - 1)]

    def batch_at(self, update: int) -> int:
        return self.batch_at_epoch(self.epoch_of(update))

    def noise_scale(self, update: int) -> float:
        """Smith et al.'s SGD noise scale g = lr N / (B (1 - m)), B the distinct samples of a step (copies of one
        sample are not independent draws)."""
        distinct = self.batch_at(update) // self.duplicates
        return self.lr_at(update) * self.train_size / (distinct * (1 - self.momentum))

    def samples_at(self, update: int) -> int:
        """Training samples (copies included) processed by the first `update` updates."""
        done, e = 0, 0
        while e < len(self.epoch_start) and self.epoch_start[e] < update:
            steps = min(update, self.epoch_start[e] + self.epoch_steps[e]) - self.epoch_start[e]
            done += steps * self.epoch_batches[e]
            e += 1
        return done

    @property
    def num_epochs(self) -> int:
        """Epochs touched by the run (the last one may be partial)."""
        return len(self.epoch_steps)

    def summary(self) -> dict[str, Any]:
        """The effective values, for `--cfg job` and results.json."""
        changes = [[0, self.epoch_batches[0]]] + [
            [i, b] for i, b in enumerate(self.epoch_batches) if i and b != self.epoch_batches[i - 1]
        ]
        if self.schedule == "step":
            lr_schedule = [[u, v] for u, v in zip(self.lr_updates, self.lr_values)]  # [[update, lr], ...]
        elif self.schedule == "constant":  # the LR after warm-up, to the end
            lr_schedule = [[self.warmup_updates, self.lr]]
        else:  # the shape's end points: the peak after warm-up and 0 at the last update
            lr_schedule = [[self.warmup_updates, self.lr], [self.total_updates, 0.0]]
        return {
            "train_size": self.train_size,
            "lr": self.lr,
            "epochs": self.epochs,
            "updates": self.total_updates,
            "ghost_batch": self.ghost_batch,
            "batch_schedule": changes,  # [[epoch, batch], ...]
            "schedule": self.schedule,
            "lr_schedule": lr_schedule,
            "warmup_updates": self.warmup_updates,
            "momentum": self.momentum,
            "duplicates": self.duplicates,
            "noise_scale": self.noise_scale(0),
            "base_noise_scale": self.base_noise_scale,
        }


def base_schedule(base: Any) -> list[tuple[float, float]]:
    """The small-batch recipe as [(epoch, lr), ...] starting at epoch 0."""
    if base.lr_schedule is not None:
        return [(float(p.epoch), float(p.lr)) for p in base.lr_schedule]
    points = [(0.0, float(base.lr))]
    for m in base.milestones:
        points.append((float(m), points[-1][1] * base.gamma))
    return points


def expand_batches(schedule: Sequence[Sequence[int]], n_epochs: int) -> list[int]:
    """The batch of each of `n_epochs` epochs from [[epoch, batch], ...] changes (the first at epoch 0)."""
    changes = {int(e): int(b) for e, b in schedule}
    batches, b = [], int(schedule[0][1])
    for i in range(n_epochs):
        b = changes.get(i, b)
        batches.append(b)
    return batches


def epoch_layout(train_size: int, batches: Sequence[int],
                 duplicates: int = 1) -> tuple[list[int], list[int], Callable[[float], int]]:
    """(first update of each epoch, full updates of each epoch, epoch -> update): the rounding rules of the module
    docstring, in one place (the report reuses them to place logged updates on the epoch axis)."""
    steps = [train_size // (b // duplicates) for b in batches]
    starts = [0]
    for s in steps[:-1]:
        starts.append(starts[-1] + s)
    n_epochs = len(batches)

    def update_of(epoch: float) -> int:
        i = min(int(math.floor(epoch + 1e-9)), n_epochs)
        if i >= n_epochs:
            return starts[-1] + steps[-1]
        return starts[i] + round((epoch - i) * steps[i])

    return starts, steps, update_of


def lr_factor(scaling: Any, r: float) -> float:
    scaling = _enum_name(scaling)
    return {"none": 1.0, "sqrt": math.sqrt(r), "linear": r}[LRScaling[scaling].value]


def momentum_rule(cfg: Any) -> tuple[int, float, float]:
    """(batch, LR factor, momentum) of a run: Smith et al.'s momentum rule when `regime.momentum` is set (see the
    module docstring), else the configured batch, the regime's LR factor and the recipe's momentum."""
    base, regime = cfg.base, cfg.regime
    m = getattr(regime, "momentum", None)
    if m is None:
        return int(cfg.batch), lr_factor(regime.lr_scaling, cfg.batch / base.batch), float(base.momentum)
    keep = (1.0 - base.momentum) / (1.0 - m)  # B / (1 - m) constant: the factor g must be given back
    scaling = _enum_name(regime.lr_scaling)
    if scaling == "none":
        if cfg.batch != base.batch:
            raise ConfigError("batch", cfg.batch, "is set by regime.momentum with lr_scaling=none (the batch that "
                              "keeps the noise scale); leave it out, or use regime.lr_scaling=linear")
        batch = base.batch * keep
        if abs(batch - round(batch)) > 1e-6:
            raise ConfigError("regime.momentum", m, f"gives a fractional batch {batch:.4g} from base.batch "
                              f"{base.batch}: choose m so that {base.batch} (1 - {base.momentum}) / (1 - m) is whole")
        return round(batch), 1.0, float(m)
    if scaling == "linear":
        return int(cfg.batch), (cfg.batch / base.batch) / keep, float(m)
    raise ConfigError("regime.lr_scaling", scaling, "with regime.momentum, use none (the batch keeps the noise scale) "
                      "or linear (the LR keeps it)")


def check_batch(batch: int, epoch: int, train_size: int, world_size: int = 1, micro_batch: int | None = None,
                ghost_batch: int | None = None, duplicates: int = 1, configured: bool = True) -> None:
    """The one place of the batch layout rules, for the batch of each epoch of the plan (the batch the run trains
    at: `regime.momentum` or a batch schedule may make it differ from `batch=`): copies, data size, processes,
    micro-batches and ghost batches must divide what they split. ConfigError naming the key on a violation."""
    what = "batch" if epoch == 0 and configured else f"batch (epoch {epoch})"
    of_epoch = f" of epoch {epoch}" if epoch else ""
    if batch % world_size:
        raise ConfigError("batch", batch, f"must be divisible by the number of processes ({world_size})"
                          + (f" (epoch {epoch})" if epoch else ""))
    per_rank = batch // world_size
    if micro_batch and per_rank % micro_batch:
        raise ConfigError("micro_batch", micro_batch, f"must divide the per-process batch{of_epoch} ({per_rank})")
    if ghost_batch:
        chunk = micro_batch or per_rank
        if chunk % ghost_batch:
            part = "micro_batch" if micro_batch else ("per-process batch" if world_size > 1 else "batch")
            raise ConfigError("ghost_batch", ghost_batch, f"must divide the {part}{of_epoch} ({chunk})")
    if batch % duplicates:
        raise ConfigError("duplicates", duplicates, f"must divide the {what} ({batch})")
    if batch // duplicates > train_size:
        raise ConfigError("batch", batch, f"exceeds the training set size ({train_size})"
                          + (f" in distinct samples ({batch // duplicates})" if duplicates > 1 else ""))


def make_plan(cfg: Any, train_size: int, world_size: int = 1, max_updates: int | None = MAX_UPDATES) -> Plan:
    """Plan a run: every LR phase, every epoch's batch and number of updates. A plan of more than MAX_EPOCHS epochs
    or `max_updates` updates is refused (ConfigError) before its per-epoch tables are built."""
    base, regime = cfg.base, cfg.regime
    shape = _enum_name(getattr(base, "schedule", "step"))
    duplicates = int(getattr(cfg, "duplicates", 1) or 1)
    batch0, k, momentum = momentum_rule(cfg)
    r = batch0 / base.batch
    # `epochs=N` shortens/extends the recipe keeping its shape: milestones scale with it.
    stretch = (cfg.epochs / base.epochs) if cfg.epochs is not None else 1.0
    if regime.adapt_epochs:
        stretch *= r  # Hoffer et al.'s regime adaptation: as many updates as the small batch
    epochs = base.epochs * stretch
    phases = [(e * stretch, lr * k) for e, lr in base_schedule(base)]
    if shape != "step":
        phases = [(0.0, float(base.lr) * k)]  # the shape is a function of the update; milestones do not apply

    # Smith et al.: turn LR drops into batch increases until max_batch, then drop the LR (hybrid).
    batch_changes: list[tuple[int, int]] = []  # (epoch, new batch)
    if regime.batch_increase:
        if shape != "step":
            raise ConfigError("base.schedule", shape, "regime.batch_increase turns the step schedule's LR drops "
                              "into batch increases: it needs base.schedule=step")
        max_batch = min(regime.max_batch or train_size * duplicates, train_size * duplicates)
        batch, lr_phases = batch0, [phases[0]]
        for (_, prev), (e, lr) in zip(phases, phases[1:]):
            factor = prev / lr  # the recipe's drop at this milestone (5 in Smith et al.)
            grown = round(batch * factor)
            if factor > 1 and grown <= max_batch:
                batch = grown
                batch_changes.append((math.ceil(e - 1e-9), batch))
            else:
                lr_phases.append((e, lr_phases[-1][1] / factor))
        phases = lr_phases

    if not math.isfinite(epochs):
        key, value = ("epochs", cfg.epochs) if cfg.epochs is not None else ("base.epochs", base.epochs)
        raise ConfigError(key, value, "must be a finite number of epochs")
    updates = epochs * train_size * duplicates / batch0
    if epochs > MAX_EPOCHS or (max_updates is not None and updates > max_updates):
        key, value = ("epochs", cfg.epochs) if cfg.epochs is not None else ("base.epochs", base.epochs)
        raise ConfigError(key, value, f"gives {epochs:.3g} epochs, about {updates:.3g} updates at batch {batch0} "
                          f"of {train_size} samples: "
                          f"more than a plan may have ({MAX_EPOCHS:.0e} epochs, "
                          f"{max_updates or MAX_UPDATES:.0e} updates)")
    n_epochs = max(math.ceil(epochs - 1e-9), 1)
    batches = expand_batches([[0, batch0], *batch_changes], n_epochs)
    ghost = cfg.ghost_batch if regime.ghost_bn else None
    micro = getattr(cfg, "micro_batch", None)
    for i, b in enumerate(batches):
        check_batch(b, i, train_size, world_size, micro, ghost, duplicates, configured=b == cfg.batch)
    starts, steps, update_of = epoch_layout(train_size, batches, duplicates)

    total = update_of(epochs)
    warmup = update_of(regime.warmup_epochs * stretch) if regime.warmup_epochs else 0
    lr_updates, lr_values = [], []
    for e, lr in phases:
        u = update_of(e)
        if lr_updates and u == lr_updates[-1]:
            lr_values[-1] = lr  # two milestones on one update: the later wins
        else:
            lr_updates.append(u)
            lr_values.append(lr)
    if total < 1:
        key, value = ("epochs", cfg.epochs) if cfg.epochs is not None else ("base.epochs", base.epochs)
        raise ConfigError(key, value, f"gives 0 updates at batch {batch0} of {train_size} samples (one update "
                          f"is {batch0 / duplicates / train_size:.3g} epochs)")
    steps[-1] = total - starts[-1]  # a fractional last epoch is partial
    base_g = float(base.lr) * train_size / (base.batch * (1 - base.momentum))
    return Plan(
        train_size=train_size,
        r=r,
        start_lr=float(base_schedule(base)[0][1]) if shape == "step" else float(base.lr),
        lr=float(phases[0][1]),
        epochs=float(epochs),
        momentum=momentum,
        ghost_batch=ghost,
        epoch_batches=tuple(batches),
        epoch_steps=tuple(steps),
        epoch_start=tuple(starts),
        total_updates=total,
        lr_updates=tuple(lr_updates),
        lr_values=tuple(lr_values),
        warmup_updates=min(warmup, total),
        schedule=shape,
        duplicates=duplicates,
        base_noise_scale=base_g,
    )


def effective(cfg: Any, key: str) -> Any:
    """OmegaConf resolver body: one effective value of the planned run (for `lbtrain --cfg job`)."""
    size = catalog_train_size(cfg.dataset)
    if size is None:
        return None
    try:
        value = make_plan(cfg, size).summary()[key]
    except (ConfigError, ZeroDivisionError):
        return None
    if isinstance(value, list):  # OmegaConf value nodes hold scalars: show [[a, b], ...] as "a:b, ..."
        return ", ".join(f"{a}:{b:.6g}" if isinstance(b, float) else f"{a}:{b}" for a, b in value)
    return value
