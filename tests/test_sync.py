"""The training loop never waits for the device between log steps.

Every Python-level way of reading a tensor's value on the host (`.item()`, `.cpu()`, `.tolist()`, `.numpy()`,
`float(t)`, `bool(t)`, `int(t)`, `t.__index__()`) is a host<->device synchronization on CUDA. On any device we
count those calls, by where they happen:

* inside `Trainer.train_step` (every update, log steps included): must be none;
* inside the loader's `next()` (batch gather, augmentation, normalization): must be none;
* between the end of update k and the start of update k+1 (logging, distance, evaluation, checkpoints of
  update k): only allowed when k is a log step, a weight-distance step or the end of an epoch, so the number
  of syncs of a run is bounded by the number of those points, not by the number of updates.

Syncs that happen inside C++ (data-dependent shapes, `nonzero`, ...) are invisible to this count; with CUDA
present the same run is repeated under `torch.cuda.set_sync_debug_mode("error")`, which catches those too.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import make_cfg

from lbtrain.data import DeviceLoader
from lbtrain.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__float__", "__bool__", "__int__", "__index__")
CUDA = torch.cuda.is_available()


class SyncCounter:
    """Records (phase, update, method) for every host read made while a phase is set."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.update = 0  # train_step: the update being made; between: the update just made
        self.events: list[tuple[str, int, str]] = []

    def record(self, method: str) -> None:
        if self.phase is not None:
            self.events.append((self.phase, self.update, method))

    def where(self, phase: str) -> list[tuple[int, str]]:
        return [(u, m) for p, u, m in self.events if p == phase]


def _install_counter(monkeypatch: pytest.MonkeyPatch, counter: SyncCounter) -> None:
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counter.record(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)


class _CountedBatches:
    """Wraps a loader's epoch iterator: each next() runs in the "loader" phase."""

    def __init__(self, it, counter: SyncCounter, strict_cuda: bool) -> None:
        self.it, self.counter, self.strict_cuda = iter(it), counter, strict_cuda

    def __iter__(self):
        return self

    def __next__(self):
        previous, self.counter.phase = self.counter.phase, "loader"
        try:
            with _sync_debug_error(self.strict_cuda and self.counter.update >= 2):
                return next(self.it)
        finally:
            self.counter.phase = previous


class _sync_debug_error:
    """torch.cuda.set_sync_debug_mode("error") inside the block (when enabled), then the previous mode."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.previous = enabled, 0

    def __enter__(self) -> None:
        if self.enabled:
            self.previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode(self.previous)


def run_counted(monkeypatch: pytest.MonkeyPatch, tmp_path, *overrides: str) -> tuple[Trainer, SyncCounter]:
    """Train a real Trainer with every host read counted by phase and update.

    On CUDA, from update 3 on (the first updates may autotune kernels and grow the allocator), CUDA's own
    sync detector raises inside every train_step and loader next(), and from the end of any update that is
    not a log / distance / epoch-end point until the next train_step (the loop's bookkeeping of that update).
    """
    cfg = make_cfg(*overrides, "progress=false")
    strict_cuda = torch.device(cfg.device).type == "cuda"
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    assert isinstance(trainer.train_loader, DeviceLoader)
    logs, dist, ends = sync_points(trainer, trainer.target_updates)
    counter = SyncCounter()
    original_step, original_epoch = Trainer.train_step, DeviceLoader.epoch

    def counted_step(self, x, y, log_now):
        counter.phase, counter.update = "train_step", self.state.step + 1
        try:
            with _sync_debug_error(strict_cuda and counter.update > 2):
                return original_step(self, x, y, log_now)
        finally:
            counter.phase = "between"
            if strict_cuda:  # the bookkeeping after a quiet update must not sync either
                quiet = counter.update > 2 and counter.update not in logs | dist | ends
                torch.cuda.set_sync_debug_mode("error" if quiet else "default")

    def counted_epoch(self, *args, **kwargs):
        return _CountedBatches(original_epoch(self, *args, **kwargs), counter, strict_cuda)

    monkeypatch.setattr(Trainer, "train_step", counted_step)
    monkeypatch.setattr(DeviceLoader, "epoch", counted_epoch)
    _install_counter(monkeypatch, counter)
    counter.phase = "between"
    try:
        results = trainer.fit()
    finally:
        counter.phase = None
        if strict_cuda:
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()  # restore torch.Tensor before any assertion message formats tensors
    assert results["status"] == "completed"
    return trainer, counter


def sync_points(trainer: Trainer, target: int) -> tuple[set[int], set[int], set[int]]:
    """(log steps, distance steps, epoch ends and validation points) of a run of `target` updates: where a sync is
    allowed (distances are measured on the device and read at the next log point)."""
    cfg, plan = trainer.cfg, trainer.plan
    logs = {k for k in range(1, target + 1) if k % cfg.log_every == 0 or k == target}
    dist = {k for k in trainer.distance_steps if k <= target} | {0}
    ends = {s + n for s, n in zip(plan.epoch_start, plan.epoch_steps) if s + n <= target} | {target}
    ends |= {k for k in trainer.eval_steps if k <= target}  # log-spaced validation (eval_per_decade)
    return logs, dist, ends




DIGITS_GBN = ("experiment=digits", "regime=gbn", "batch=64", "ghost_batch=16", "log_every=7", "max_steps=60")
CONV_AUGMENT = ("experiment=resnet44_cifar10", "dataset=synthetic", "dataset.shape=[3,8,8]",
                "dataset.train_size=256", "dataset.val_size=64", "dataset.augment=true", "model.kwargs.depth=8",
                "batch=32", "regime=gbn", "ghost_batch=8", "micro_batch=16", "channels_last=true", "log_every=5",
                "max_steps=20", "eval_every=1")
# Every instrument on: the noise scale's extra passes and per-layer distances must not sync between log steps
# either (sharpness and log-spaced validation sync at their own points, which count as epoch ends here).
INSTRUMENTS = (*DIGITS_GBN, "gns=true", "layer_distance=true", "eval_per_decade=3", "sharpness.every_epochs=1",
               "sharpness.samples=64", "sharpness.iters=3", "sharpness.trace_samples=2")
CASES = {"digits_mlp_gbn": DIGITS_GBN, "conv_augment_gbn_microbatch": CONV_AUGMENT, "instruments_on": INSTRUMENTS}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]


def test_counter_sees_host_reads(monkeypatch):
    """The instrument itself: each kind of host read is counted, and only while a phase is set."""
    counter = SyncCounter()
    _install_counter(monkeypatch, counter)
    t = torch.ones(())
    float(t)  # no phase: not counted
    counter.phase = "train_step"
    t.item(), t.cpu(), t.tolist(), t.numpy(), float(t), bool(t), int(t), [0, 1][t.long()]
    counter.phase = None
    monkeypatch.undo()
    assert Counter(m for _, m in counter.where("train_step")) == Counter(
        {"item": 1, "cpu": 1, "tolist": 1, "numpy": 1, "__float__": 1, "__bool__": 1, "__int__": 1, "__index__": 1})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_no_sync_between_log_steps(monkeypatch, tmp_path, case, device):
    trainer, counter = run_counted(monkeypatch, tmp_path, *CASES[case], f"device={device}")
    steps = trainer.state.step
    assert steps == trainer.cfg.max_steps

    assert counter.where("train_step") == [], "train_step read a tensor on the host"
    assert counter.where("loader") == [], "the loader read a tensor on the host"

    logs, dist, ends = sync_points(trainer, steps)
    between = counter.where("between")
    synced = {u for u, _ in between}
    # weight distances are measured on the device and read at the next log point, so only log steps and
    # epoch ends (validation, checkpoint) may read the device
    unexpected = sorted((u, m) for u, m in between if u not in logs | ends)
    assert not unexpected, f"host reads after updates that are not log/epoch-end points: {unexpected}"
    assert dist - logs - ends, "the case should have distance points between log steps"
    # the loop does sync where it must (it logs), and most updates are free of syncs
    assert logs <= synced
    quiet = [k for k in range(1, steps + 1) if k not in synced]
    assert len(quiet) >= steps - len(logs | dist | ends) > 0
    # bounded by the points, not by the updates: 2 reads per log point (metric sums + pending distances),
    # 2 per epoch end (distances + validation sums); instruments add theirs at those points only
    if case != "instruments_on":
        assert len(between) <= 2 * len(logs) + 2 * len(ends)


def test_sync_count_does_not_grow_with_updates(monkeypatch, tmp_path):
    """Same run, 4x the updates, no logging in between: the number of host reads barely moves."""
    base = ("experiment=digits", "batch=64", "log_every=1000", "eval_every=0", "checkpoint.every_epochs=0")
    counts = []
    for n in (6, 24):  # 24 updates = one epoch of digits at batch 64
        trainer, counter = run_counted(monkeypatch, tmp_path / str(n), *base, f"max_steps={n}", "device=cpu")
        logs, dist, ends = sync_points(trainer, trainer.state.step)
        counts.append((len(counter.events), len(logs | dist | ends)))
        assert counter.where("train_step") == [] and counter.where("loader") == []
    (short, short_points), (long, long_points) = counts
    assert long - short <= 2  # one more epoch end: its distances and nothing else
