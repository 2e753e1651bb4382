"""Training throughput: lbtrain's full training loop vs the model's limit vs the usual reference pipeline.

For each workload, on the current device (``--device auto|cpu|cuda``), one run measures images/s of:

1. ``limit``: model forward, backward and SGD step (momentum 0.9, weight decay 1e-4) on ONE pre-made,
   normalized batch already on the device, nothing else. Same model as lbtrain builds (``build_model``,
   with ``convert_to_ghost_bn`` when the workload uses ghost batch norm), same ``--bf16`` /
   ``--channels-last`` / ``--compile``. No gradient clipping, no loader, no metrics: the ceiling.
2. ``lbtrain``: a real ``lbtrain.trainer.Trainer`` built from a config composed with Hydra's compose API
   (``experiment=<workload> dataset=synthetic`` shaped like the workload, its regime and ghost batch,
   ``progress=false``, default ``log_every=50``, ``eval_every=0`` and ``checkpoint.every_epochs=0`` so
   no validation or checkpoint happens inside the timed part), trained by ``Trainer.fit()`` with
   ``max_steps = warmup + steps``. A ``step_end`` hook (the trainer's public hooks; the loop itself is not
   touched) takes a timestamp when update ``warmup`` is done and when update ``warmup + steps`` is done
   (with ``torch.cuda.synchronize`` at those two points only on CUDA). Between the two lie
   exactly ``steps`` full iterations of the trainer's own loop: batch gather + augmentation + normalization
   by the ``DeviceLoader``, the LR update, ``train_step`` (GBN, loss/accuracy accumulators, gradient-norm
   clipping of the recipe, SGD) and the per-update bookkeeping (TensorBoard ``train/*`` every ``log_every``
   updates, weight distance at its log-spaced updates, epoch boundaries). The set-up, the warm-up and the
   final validation/checkpoint/results after the last update are outside the window. The JSON records
   which log and distance points fell inside the window.
3. ``reference``: the pipeline as the authors' code and most tutorials write it: a torchvision-style
   ``Dataset`` holding the same uint8 arrays that makes a ``PIL.Image`` per sample, torchvision PIL
   transforms (CIFAR: ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``;
   MNIST: ``ToTensor``, ``Normalize``), ``DataLoader(num_workers=--workers, shuffle=True, drop_last=True,
   pin_memory on CUDA)`` re-iterated every epoch, the model with plain ``nn.BatchNorm``, ghost batch norm
   done as Hoffer et al.'s ``main_gbn.py`` does it (forward/backward per ghost chunk, gradients
   accumulated then divided by the number of chunks), the recipe's gradient-norm clipping,
   ``torch.optim.SGD``, and per chunk a ``loss.item()`` and a top-1 count for the running averages
   (the authors' AverageMeters; most tutorials do the same per batch). Always fp32, contiguous, eager
   (the flags apply to 1 and 2 only).

Workloads (``--workloads``): ``f1_mnist``: Hoffer et al.'s F1 (``fc``, 5 x 512) on MNIST-shaped data
(1x28x28, 10 classes) at batch 4096, regime ``baseline`` (no GBN: the data-bound case, so the reference
has no chunk loop either); ``resnet44_cifar10``: ResNet-44 on CIFAR-shaped data (3x32x32, pad-4 crop +
flip) at batch 512, regime ``gbn`` with ghost batch 128 (the reference runs 4 chunks of 128);
``f1_mnist_gbn`` (not run by default): F1 at 4096 with ghost batch 128 (32 chunks in the reference).
Data are ``lbtrain.data.make_synthetic`` uint8 images, the same arrays for the three paths; default sizes
are the real training sets (60000 / 50000) so per-epoch costs (reshuffle, DataLoader worker start-up)
recur as often as in real training.

Then the ghost-batch-norm micro-benchmark of ``scripts/bench_gbn.py`` (``run_gbn_bench``: vectorized
``GhostBatchNorm2d`` vs per-chunk loop vs plain BN, 32 ghost batches).

Timing noise: ``--repeat R`` runs the three paths R times, alternating (limit, lbtrain, reference, limit, ...),
and reports each path's fastest run (other processes can only slow a run down, so the best run is the least
disturbed estimate); every run's images/s and the load average before it are in the JSON. On CPU the median
update time of the reported run is printed too.

Memory: on CUDA the peak ``torch.cuda.max_memory_allocated()`` of the lbtrain and limit paths; on every
device the bytes of the dataset lbtrain keeps resident on the device (by dtype; it is uint8) next to what
a float32 copy of the same images would take.

Usage::

    python scripts/bench.py                       # default sizes on the current device
    python scripts/bench.py --quick               # tiny smoke run (seconds on 2 CPU cores; used by tests)
    python scripts/bench.py --repeat 3            # on a shared machine: best of 3 alternating runs
    python scripts/bench.py --device cuda --bf16 --channels-last --json bench.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # allow `python scripts/bench.py` without installing lbtrain
    sys.path.insert(0, str(_ROOT))

from lbtrain.checkpoint import atomic_write_json  # noqa: E402
from lbtrain.data import ArrayDataset, make_synthetic  # noqa: E402
from lbtrain.ghost_bn import convert_to_ghost_bn  # noqa: E402
from lbtrain.models import build_model  # noqa: E402

PATHS = ("limit", "lbtrain", "reference")
# Opt-in (--paths ... instrumented): lbtrain's loop with the per-step instruments on (the gradient noise scale at
# log steps, per-layer distances): their overhead is instrumented / lbtrain. Sharpness runs at epoch ends only
# and reports its own cost (Hessian-vector products, seconds) in results.json.
INSTRUMENTS = ("gns=true", "layer_distance=true")
ALL_PATHS = (*PATHS, "instrumented")
MOMENTUM, WEIGHT_DECAY, LR = 0.9, 1e-4, 0.1


@dataclass(frozen=True)
class Workload:
    name: str
    experiment: str  # configs/experiment/<name>.yaml: the recipe (model, base LR, grad clip, ...)
    model: str
    model_kwargs: dict[str, Any]
    shape: tuple[int, int, int]
    batch: int
    regime: str
    ghost: int | None  # ghost batch (regime gbn); None: plain BN
    augment: bool  # pad-4 crop + flip (CIFAR recipe)
    train_size: int
    grad_clip: float | None = 5.0  # the experiments' recipe (applied by lbtrain and the reference)
    num_classes: int = 10
    # (warmup, steps) defaults per device
    cpu_steps: tuple[int, int] = (2, 10)
    cuda_steps: tuple[int, int] = (50, 200)


WORKLOADS: dict[str, Workload] = {
    "f1_mnist": Workload("f1_mnist", "f1_mnist", "fc", {"hidden": 512, "depth": 5}, (1, 28, 28), 4096,
                         "baseline", None, False, 60000),
    "resnet44_cifar10": Workload("resnet44_cifar10", "resnet44_cifar10", "resnet_cifar", {"depth": 44},
                                 (3, 32, 32), 512, "gbn", 128, True, 50000, cpu_steps=(1, 3)),
    "f1_mnist_gbn": Workload("f1_mnist_gbn", "f1_mnist", "fc", {"hidden": 512, "depth": 5}, (1, 28, 28), 4096,
                             "gbn", 128, False, 60000),
}
DEFAULT_WORKLOADS = ("f1_mnist", "resnet44_cifar10")

# --quick: same structure (GBN chunks, augmentation, all three paths), tiny sizes.
QUICK = {
    "f1_mnist": dict(batch=256, train_size=2048),
    "resnet44_cifar10": dict(batch=64, ghost=16, train_size=1024, model_kwargs={"depth": 8}),
    "f1_mnist_gbn": dict(batch=256, ghost=32, train_size=2048),
}


# --------------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Call `tick()` after every update; times updates warmup+1 .. warmup+steps.

    On CUDA the device is synchronized only when the window opens and closes, so the device queue is
    never drained inside it; on CPU every tick is timestamped too (for a median per-update time).
    """

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device, self.warmup, self.steps = device, warmup, steps
        self.count = 0
        self.stamps: list[float] = []
        self.t0 = self.t1 = math.nan

    def tick(self) -> None:
        self.count += 1
        if self.count == self.warmup:
            _sync(self.device)
            self.t0 = time.perf_counter()
            self.stamps.append(self.t0)
        elif self.warmup < self.count <= self.warmup + self.steps:
            last = self.count == self.warmup + self.steps
            if last:
                _sync(self.device)
            now = time.perf_counter()
            if self.device.type != "cuda" or last:
                self.stamps.append(now)
            if last:
                self.t1 = now

    @property
    def done(self) -> bool:
        return self.count >= self.warmup + self.steps and math.isfinite(self.t1)

    def row(self, batch: int) -> dict[str, Any]:
        if not self.done:
            raise RuntimeError(f"only {self.count} of {self.warmup + self.steps} updates ran")
        seconds = self.t1 - self.t0
        row = {"batch": batch, "warmup": self.warmup, "steps": self.steps, "seconds": seconds,
               "images_per_sec": batch * self.steps / seconds, "step_ms_mean": 1e3 * seconds / self.steps}
        if self.device.type != "cuda":
            per = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
            row["step_ms_median"] = 1e3 * statistics.median(per)
            row["step_ms_min"] = 1e3 * min(per)
        return row


def _start_clock(device: torch.device, warmup: int, steps: int) -> StepClock:
    clock = StepClock(device, warmup, steps)
    if warmup == 0:  # the window opens before the first update
        _sync(device)
        clock.t0 = time.perf_counter()
        clock.stamps.append(clock.t0)
    return clock


# --------------------------------------------------------------------------------------------------
# the three paths


@dataclass
class Options:
    device: torch.device
    warmup: int
    steps: int
    workers: int
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    lbtrain_overrides: tuple[str, ...] = ()


def _model(wl: Workload, device: torch.device, *, ghost: bool, channels_last: bool) -> torch.nn.Module:
    model = build_model({"name": wl.model, "kwargs": dict(wl.model_kwargs)}, wl.num_classes, wl.shape)
    if ghost and wl.ghost:
        model = convert_to_ghost_bn(model, wl.ghost)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    return model.to(device, memory_format=fmt)


def run_limit(wl: Workload, data: ArrayDataset, opt: Options) -> dict[str, Any]:
    """(1) forward + backward + SGD step on one normalized batch already on the device."""
    dev = opt.device
    torch.manual_seed(0)
    model = _model(wl, dev, ghost=True, channels_last=opt.channels_last)
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    x = ((data.train_x[: wl.batch].float() / 255 - mean) / std).to(dev)
    if opt.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = data.train_y[: wl.batch].to(dev)
    net = torch.compile(model) if opt.compile else model
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=opt.bf16)
    model.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    clock = _start_clock(dev, opt.warmup, opt.steps)
    for _ in range(opt.warmup + opt.steps):
        sgd.zero_grad(set_to_none=True)
        with autocast:
            out = net(x)
        F.cross_entropy(out.float(), y).backward()
        sgd.step()
        clock.tick()
    row = clock.row(wl.batch)
    if dev.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
    return row


def _tensor_bytes(*objects: Any) -> tuple[dict[str, int], int]:
    """(bytes of the distinct tensor storages held as attributes of `objects` by dtype, bytes of those
    storages that no held tensor spans: memory kept alive only by a view into a larger array)."""
    storages: dict[int, tuple[str, int, list[tuple[int, int]]]] = {}  # data_ptr -> dtype, bytes, spans
    for obj in objects:
        for v in vars(obj).values():
            if isinstance(v, torch.Tensor):
                st = v.untyped_storage()
                dtype = str(v.dtype).replace("torch.", "")
                entry = storages.setdefault(st.data_ptr(), (dtype, st.nbytes(), []))
                lo = v.storage_offset() * v.element_size()
                span = (1 + sum((n - 1) * abs(d) for n, d in zip(v.shape, v.stride()))) if v.numel() else 0
                entry[2].append((lo, lo + span * v.element_size()))
    out: dict[str, int] = {}
    unspanned = 0
    for dtype, nbytes, spans in storages.values():
        out[dtype] = out.get(dtype, 0) + nbytes
        covered, reach = 0, 0
        for lo, hi in sorted(spans):
            lo = max(lo, reach)
            if hi > lo:
                covered += hi - lo
                reach = hi
        unspanned += nbytes - covered
    return out, unspanned


def compose_config(wl: Workload, opt: Options, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The lbtrain config of a workload on synthetic data, composed as the CLI does."""
    from hydra import compose, initialize_config_dir

    from lbtrain.cli import CONFIG_DIR, setup_hydra
    from lbtrain.config import validate

    setup_hydra()
    c, h, w = wl.shape
    args = [
        f"experiment={wl.experiment}",
        "dataset=synthetic",
        f"dataset.shape=[{c},{h},{w}]",
        f"dataset.num_classes={wl.num_classes}",
        f"dataset.train_size={wl.train_size}",
        "dataset.val_size=256",  # validation only runs after the timed window (final evaluation)
        f"dataset.augment={str(wl.augment).lower()}",
        *(f"model.kwargs.{k}={v}" for k, v in wl.model_kwargs.items()),
        f"batch={wl.batch}",
        f"regime={wl.regime}",
        f"ghost_batch={wl.ghost or wl.batch}",
        f"base.grad_clip={'null' if wl.grad_clip is None else wl.grad_clip}",
        f"device={opt.device}",
        "progress=false",
        "eval_every=0",
        "checkpoint.every_epochs=0",
        "checkpoint.every_steps=0",
        f"max_steps={opt.warmup + opt.steps}",
        f"precision={'bf16' if opt.bf16 else 'fp32'}",
        f"channels_last={str(opt.channels_last).lower()}",
        f"compile={str(opt.compile).lower()}",
        *overrides,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=args)
    validate(cfg)
    return cfg


def run_lbtrain(wl: Workload, opt: Options, run_dir: Path) -> dict[str, Any]:
    """(2) the real Trainer.fit() loop; updates warmup+1 .. warmup+steps are timed (see module doc)."""
    from lbtrain.trainer import Trainer

    dev = opt.device
    cfg = compose_config(wl, opt, list(opt.lbtrain_overrides))
    run_dir.mkdir(parents=True, exist_ok=True)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    trainer = Trainer(cfg, run_dir)
    trainer.setup()
    target = trainer.target_updates
    if target < opt.warmup + opt.steps:
        raise ValueError(f"{wl.name}: the recipe has only {target} updates; ask for fewer --steps")
    clock = _start_clock(dev, opt.warmup, opt.steps)
    trainer.hooks.step_end.append(lambda _trainer: clock.tick())  # right after each optimizer step
    results = trainer.fit()
    if results["status"] != "completed":
        raise RuntimeError(f"{wl.name}: lbtrain run ended {results['status']}")
    row = clock.row(wl.batch)
    # per-update bookkeeping of updates warmup .. warmup+steps-1 lies in the window
    inside = range(opt.warmup, opt.warmup + opt.steps)
    row["log_points_in_window"] = [s for s in inside if s and (s % cfg.log_every == 0 or s == target)]
    row["distance_points_in_window"] = sorted(s for s in trainer.distance_steps if s in inside)
    loaders = (trainer.train_loader, trainer.val_loader)
    row["dataset_resident_bytes"], row["dataset_unviewed_bytes"] = _tensor_bytes(*loaders)
    row["dataset_float32_copy_bytes"] = 4 * sum(lo.n * lo.c * lo.h * lo.w for lo in loaders)
    if dev.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
    return row


class PILArrayDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 / MNIST do: uint8 arrays, one PIL image made per __getitem__."""

    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, transform: Callable[[Any], Any]) -> None:
        if x_uint8.shape[1] == 1:  # MNIST: (N, H, W) -> mode "L"
            self.data = x_uint8[:, 0].numpy()
        else:  # CIFAR: (N, H, W, C) -> RGB
            self.data = np.ascontiguousarray(x_uint8.permute(0, 2, 3, 1).numpy())
        self.targets = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        img = Image.fromarray(self.data[index])
        return self.transform(img), self.targets[index]


def run_reference(wl: Workload, data: ArrayDataset, opt: Options) -> dict[str, Any]:
    """(3) PIL Dataset + DataLoader workers + torchvision transforms + per-ghost-chunk loop."""
    from torchvision import transforms as T

    dev = opt.device
    h = wl.shape[1]
    tf = [T.RandomCrop(h, padding=4), T.RandomHorizontalFlip()] if wl.augment else []
    tf += [T.ToTensor(), T.Normalize(data.mean, data.std)]
    ds = PILArrayDataset(data.train_x, data.train_y, T.Compose(tf))
    loader = torch.utils.data.DataLoader(ds, batch_size=wl.batch, shuffle=True, num_workers=opt.workers,
                                         pin_memory=dev.type == "cuda", drop_last=True)
    torch.manual_seed(0)
    model = _model(wl, dev, ghost=False, channels_last=False)  # plain BN: each chunk is a ghost batch
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    chunk = wl.ghost or wl.batch
    model.train()
    clock = _start_clock(dev, opt.warmup, opt.steps)
    done, epochs = 0, 0
    loss_sum, correct, seen = 0.0, 0, 0  # the AverageMeters of the authors' train loop
    while done < opt.warmup + opt.steps:
        epochs += 1
        for x, y in loader:  # a new iterator (and new worker processes) every epoch, as usual
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            sgd.zero_grad()
            xs, ys = x.split(chunk), y.split(chunk)
            for xc, yc in zip(xs, ys):  # Hoffer et al.'s main_gbn.py: BN only ever sees one chunk
                out = model(xc)
                loss = F.cross_entropy(out, yc)
                loss_sum += loss.item() * yc.shape[0]
                correct += int((out.argmax(1) == yc).sum().item())
                seen += yc.shape[0]
                loss.backward()
            if len(xs) > 1:
                for p in params:
                    p.grad.div_(len(xs))
            if wl.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, wl.grad_clip)
            sgd.step()
            done += 1
            clock.tick()
            if done >= opt.warmup + opt.steps:
                break
    row = clock.row(wl.batch)
    row["workers"] = opt.workers
    row["chunks"] = wl.batch // chunk
    row["epochs_started"] = epochs
    return row


# --------------------------------------------------------------------------------------------------
# driver


def _load_bench_gbn() -> Any:
    spec = importlib.util.spec_from_file_location("bench_gbn", Path(__file__).resolve().parent / "bench_gbn.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_gbn", mod)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_table(res: dict[str, Any]) -> str:
    m = res["meta"]
    lines = [
        f"device {m['device']} ({m['device_name']}), {m['threads']} torch threads, torch {m['torch']}, "
        f"flags: bf16={m['bf16']} channels_last={m['channels_last']} compile={m['compile']}"
        + (" [--quick]" if m["quick"] else ""),
        f"{'workload':<18}{'path':<13}{'batch':>6}{'steps':>6}{'images/s':>11}{'ms/step':>10}"
        f"{'median ms':>11}  ratio",
    ]
    for r in res["rows"]:
        rat = res["ratios"].get(r["workload"], {})
        parts = []
        if r["path"] == "lbtrain":
            if "lbtrain_over_limit" in rat:
                parts.append(f"(2)/(1) = {rat['lbtrain_over_limit']:.2f}")
            if "lbtrain_over_reference" in rat:
                parts.append(f"(2)/(3) = {rat['lbtrain_over_reference']:.2f}")
        elif r["path"] == "instrumented" and "instrumented_over_lbtrain" in rat:
            parts.append(f"instrumented/(2) = {rat['instrumented_over_lbtrain']:.3f}")
        ratio = ", ".join(parts)
        med = f"{r['step_ms_median']:>11.1f}" if "step_ms_median" in r else f"{'-':>11}"
        lines.append(f"{r['workload']:<18}{r['path']:<13}{r['batch']:>6}{r['steps']:>6}"
                     f"{r['images_per_sec']:>11.1f}{r['step_ms_mean']:>10.1f}{med}  {ratio}".rstrip())
    for name, mem in res["memory"].items():
        resident = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in mem["dataset_resident_bytes"].items())
        line = (f"memory {name}: lbtrain dataset resident on {m['device']}: {resident} "
                f"(a float32 copy of the images would be {_fmt_bytes(mem['dataset_float32_copy_bytes'])})")
        if mem["dataset_unviewed_bytes"]:
            line += f"; {_fmt_bytes(mem['dataset_unviewed_bytes'])} of it is held only through views"
        if "lbtrain_peak_bytes" in mem:
            line += f"; peak allocated: lbtrain {_fmt_bytes(mem['lbtrain_peak_bytes'])}"
            if "limit_peak_bytes" in mem:
                line += f", limit {_fmt_bytes(mem['limit_peak_bytes'])}"
        lines.append(line)
    return "\n".join(lines)


def cli_device(parser: argparse.ArgumentParser, name: str, cuda_ok: bool = True) -> torch.device:
    """The device a `--device` option names (auto: CUDA when present and `cuda_ok`), made current; a parser error
    when CUDA is asked for and missing."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() and cuda_ok else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--workloads", nargs="+", default=None,
                   help=f"any of {', '.join(WORKLOADS)} (default: {' '.join(DEFAULT_WORKLOADS)}); commas work too")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=ALL_PATHS,
                   help="which paths to run (instrumented: lbtrain with the per-step instruments on)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed updates per path (default per workload: CPU f1 10 / resnet44 3, CUDA 200)")
    p.add_argument("--warmup", type=int, default=None, help="untimed updates first (default CPU 2 / 1, CUDA 50)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of the reference (default min(8, CPU count))")
    p.add_argument("--dataset-size", type=int, default=None,
                   help="training samples (default: the real set, 60000 MNIST-shaped / 50000 CIFAR-shaped)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for limit and lbtrain")
    p.add_argument("--channels-last", action="store_true", help="channels_last for limit and lbtrain")
    p.add_argument("--compile", action="store_true", help="torch.compile for limit and lbtrain")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the paths this many times, alternating, and report each path's best run (contention "
                        "from other processes only ever slows a run down); all runs are kept in the JSON")
    p.add_argument("--lbtrain-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for the lbtrain path (repeatable), e.g. micro_batch=128")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run (default: torch's)")
    p.add_argument("--skip-gbn", action="store_true", help="skip the GBN micro-benchmark")
    p.add_argument("--quick", action="store_true", help="tiny sizes and steps: a smoke run")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    device = cli_device(p, args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as lbtrain (set_determinism) and the authors' code do
    names = [n for item in (args.workloads or DEFAULT_WORKLOADS) for n in str(item).split(",") if n]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    plans: list[tuple[Workload, int, int]] = []  # (workload, warmup, timed steps)
    for wname in names:
        wl = WORKLOADS[wname]
        if args.quick:
            wl = replace(wl, **QUICK[wname])
        if args.dataset_size is not None:
            wl = replace(wl, train_size=args.dataset_size)
        warmup, steps = (1, 2) if args.quick else wl.cuda_steps if device.type == "cuda" else wl.cpu_steps
        warmup = args.warmup if args.warmup is not None else warmup
        steps = args.steps if args.steps is not None else steps
        if steps < 1 or warmup < 0:
            p.error("--steps must be >= 1 and --warmup >= 0")
        if wl.batch > wl.train_size:
            p.error(f"{wname}: --dataset-size must be >= the batch ({wl.batch})")
        if args.repeat < 1:
            p.error("--repeat must be >= 1")
        plans.append((wl, warmup, steps))
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device, plans, workers)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device: torch.device, plans: list[tuple[Workload, int, int]],
         workers: int) -> dict[str, Any]:
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quick": args.quick,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "workers": workers,
        "repeat": args.repeat,
        "lbtrain_overrides": list(args.lbtrain_override),
        "loadavg_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    res: dict[str, Any] = {"meta": meta, "rows": [], "ratios": {}, "memory": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lbtrain-bench-") as tmp:
        for wl, warmup, steps in plans:
            wname = wl.name
            opt = Options(device, warmup, steps, workers, args.bf16, args.channels_last, args.compile,
                          tuple(args.lbtrain_override))
            data = make_synthetic(wl.shape, wl.num_classes, wl.train_size, 256)  # = lbtrain's synthetic set
            runs: dict[str, list[dict[str, Any]]] = {path: [] for path in ALL_PATHS if path in args.paths}
            for rep in range(args.repeat):
                for path in runs:
                    which = f", run {rep + 1}/{args.repeat}" if args.repeat > 1 else ""
                    print(f"[bench] {wname}: {path} (batch {wl.batch}, {warmup} warm-up + {steps} timed updates"
                          f"{which})", file=sys.stderr, flush=True)
                    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
                    if path == "limit":
                        row = run_limit(wl, data, opt)
                    elif path == "lbtrain":
                        row = run_lbtrain(wl, opt, Path(tmp) / f"{wname}-{rep}")  # a fresh run, never a resume
                    elif path == "instrumented":
                        row = run_lbtrain(wl, replace(opt, lbtrain_overrides=(*opt.lbtrain_overrides, *INSTRUMENTS)),
                                          Path(tmp) / f"{wname}-instrumented-{rep}")
                    else:
                        row = run_reference(wl, data, opt)
                    runs[path].append({"workload": wname, "path": path, **row, "loadavg_before": load})
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            rows: dict[str, dict[str, Any]] = {}
            for path, done in runs.items():
                best = max(done, key=lambda r: r["images_per_sec"])
                rows[path] = {**best, "runs_images_per_sec": [r["images_per_sec"] for r in done]}
                res["rows"].append(rows[path])
            ratios = {}
            if "lbtrain" in rows:
                speed = rows["lbtrain"]["images_per_sec"]
                for other in ("limit", "reference"):
                    if other in rows:
                        ratios[f"lbtrain_over_{other}"] = speed / rows[other]["images_per_sec"]
                        if "step_ms_median" in rows[other]:  # CPU: the same from median update times
                            ratios[f"lbtrain_over_{other}_median"] = (rows[other]["step_ms_median"]
                                                                     / rows["lbtrain"]["step_ms_median"])
                if "instrumented" in rows:  # < 1: the instruments' cost per update, log steps included
                    ratios["instrumented_over_lbtrain"] = rows["instrumented"]["images_per_sec"] / speed
                lb = rows["lbtrain"]
                mem = {key: lb[key] for key in ("dataset_resident_bytes", "dataset_unviewed_bytes",
                                                "dataset_float32_copy_bytes")}
                if "peak_memory_bytes" in lb:
                    mem["lbtrain_peak_bytes"] = lb["peak_memory_bytes"]
                if "limit" in rows and "peak_memory_bytes" in rows["limit"]:
                    mem["limit_peak_bytes"] = rows["limit"]["peak_memory_bytes"]
                res["memory"][wname] = mem
            res["ratios"][wname] = ratios
            del data
    print(format_table(res))

    if not args.skip_gbn:
        gbn = _load_bench_gbn()
        cuda = device.type == "cuda"
        batch, iters, warm = (4096 if cuda else 1024), (50 if cuda else 15), 3
        if args.quick:
            batch, iters, warm = 256, 3, 1
        print("[bench] GBN micro-benchmark", file=sys.stderr, flush=True)
        res["gbn"] = gbn.run_gbn_bench(device, batch, 16, 32, 32, iters, warmup=warm,
                                       channels_last=args.channels_last)
        print()
        print(gbn.format_table(res["gbn"]))
    meta["wall_s"] = time.perf_counter() - start
    meta["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
