"""`lbtrain-interp RUN_A RUN_B`: train and validation loss and error along the line between two solutions.

Keskar, Mudigere, Nocedal, Smelyanskiy, Tang, *On Large-Batch Training for Deep Learning: Generalization Gap and
Sharp Minima* (ICLR 2017), Figure 3: the loss of the weights

    w(α) = (1 − α) · w_A + α · w_B

for α on a grid that extends past both ends (default −1 … 2, 31 points), the 1-D linear interpolation of
Goodfellow, Vinyals, Saxe, *Qualitatively characterizing neural network optimization problems* (ICLR 2015).
Keskar et al. take w_A from a small-batch and w_B from a large-batch run of the same model; any two runs of one
model on one dataset will do (different batch, regime, seed, ghost batch norm: all allowed). Runs of different
models (name or options) or different data (dataset name, subset, shape, classes, sizes) are refused, listing
the keys that differ. Every floating-point entry of the two state dicts (weights, biases, BN affine parameters)
is interpolated; integer buffers (`num_batches_tracked`) are taken from A.

**BatchNorm statistics.** Running means and variances are not weights: averaging A's and B's does not give the
statistics of the averaged network. So, by default, at *every* α (0 and 1 included) the BN running statistics
are recomputed from scratch: every BatchNorm layer's `reset_running_stats()`, momentum set to None (a cumulative
average), then a forward pass with only the BN layers in train mode (everything else, dropout included, in eval
mode), under `torch.no_grad`, over a fixed set of training batches: the first `--bn-batches` (8) batches of
`--bn-batch` (256) samples of one shuffled, non-augmented pass over the training split, the shuffle drawn with a
fixed seed (BN_SEED), so the same samples for every α and every pair of runs. The statistics are then the mean of
the batch means and of the (unbiased) batch variances. A training split smaller than 8 × 256 samples uses as
many whole batches as it holds (the 1536-sample digits split: all of it, 6 batches); one smaller than a batch is
one batch. The model is then evaluated in eval mode. Because α = 0 and α = 1 are recomputed too, their numbers
differ from the runs' own results.json, whose statistics are the training run's momentum (0.1) averages over its
last (ghost) batches: slightly for a run long enough for those averages to settle (the digits default run, 384
updates: validation loss 0.1242 -> 0.1209, error unchanged), a lot for a run of a few updates, whose averages still
hold much of their initial (0, 1) (digits at batch 512, 12 updates: loss 1.222 -> 0.413, error 0.096 -> 0.077).
`--no-bn-recompute` instead interpolates the BN buffers linearly with the weights, which reproduces each run's
own final validation metrics exactly at α = 0 and α = 1 (of runs trained in float32: a bf16 run's results were
evaluated under bf16 autocast), but gives no BN network's statistics in between (variances extrapolated below
zero are clamped to zero).

**Metrics.** Validation: cross-entropy (mean) and top-1 error over the whole validation split, in order, as the
trainer evaluates (float32, whatever precision the runs trained in). Train: the same on a fixed subset of the
training split, `--train-samples` (10000, or `all`) samples drawn with a fixed seed (TRAIN_SEED), without
augmentation.

**Output.** `interp.csv` (alpha, train_loss, train_error, val_loss, val_error; one row per α, ascending) and
`interp.png` (loss, log scale, and error against α; train solid, validation dashed; dotted lines at α = 0 (A) and
1 (B)), written atomically into `--out`, by default `<RUN_A>/interp-<name of RUN_B's folder>`; a short table on
stdout. Data is read from `--data-root`, else the `dataset.root` recorded in RUN_A's (then RUN_B's)
`.hydra/config.yaml`, else $LBTRAIN_DATA, else ./data. A bad option, a folder without a checkpoint, or runs that
cannot be interpolated end as one line on stderr, exit code 2, and write nothing.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import lbtrain
from lbtrain.analysis.figures import INSIDE, log_axes, new_figure, png_bytes, style_axes
from lbtrain.analysis.runs import Run, read_run, recorded_config
from lbtrain.results import ResultsError

PROG = "lbtrain-interp"
DEFAULT_ALPHAS = "-1:2:31"
MAX_ALPHAS = 10001
BN_SEED = 2017  # the fixed shuffle of the training split whose first batches recompute BN statistics
TRAIN_SEED = 2015  # the fixed draw of the training samples the train metrics are measured on
DEFAULT_BN_BATCHES, DEFAULT_BN_BATCH = 8, 256
DEFAULT_TRAIN_SAMPLES = 10000
DEFAULT_EVAL_BATCH = 1024
COLUMNS = ("alpha", "train_loss", "train_error", "val_loss", "val_error")
# identity keys of the dataset that change neither the samples nor their shapes (augmentation is a training
# choice: runs with and without it are comparable)
DATASET_KEYS_IGNORED = ("augment", "workers", "root", "download")

__all__ = ["InterpError", "Endpoint", "Point", "Setup", "parse_alphas", "load_run", "check_compatible", "prepare",
           "interpolate_state", "recompute_bn", "evaluate", "interpolate", "csv_text", "make_figure", "write_outputs",
           "build_parser", "main"]


class InterpError(Exception):
    """A user mistake (bad option, unusable run folder, incompatible runs): one line, exit code 2."""


# ------------------------------------------------------------------------------------------------ inputs
def parse_alphas(text: str) -> list[float]:
    """`START:STOP:NUM` (NUM evenly spaced points, both ends included, like numpy.linspace) or a comma-separated
    list of numbers; returned sorted, without duplicates, rounded to 12 decimals (so 0 and 1 are exact)."""
    spec = str(text).strip()
    try:
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
            if num < 1:
                raise InterpError(f"--alphas {spec}: NUM must be at least 1")
            if num > MAX_ALPHAS:
                raise InterpError(f"--alphas {spec}: at most {MAX_ALPHAS} points")
            values = [start] if num == 1 else [start + (stop - start) * i / (num - 1) for i in range(num)]
        else:
            values = [float(v) for v in spec.split(",")]
    except ValueError:
        raise InterpError(f"--alphas {spec!r}: expected START:STOP:NUM (e.g. {DEFAULT_ALPHAS}) or a comma-separated "
                          "list of numbers (e.g. 0,0.5,1)") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise InterpError(f"--alphas {spec!r}: every alpha must be a finite number")
    out = sorted({round(v, 12) + 0.0 for v in values})  # + 0.0: -0.0 -> 0.0
    if len(out) > MAX_ALPHAS:
        raise InterpError(f"--alphas {spec!r}: at most {MAX_ALPHAS} points")
    return out


@dataclass
class Endpoint:
    """One end of the line: a run folder's checkpointed weights, and its run (results.json) where it has one."""

    path: Path
    identity: dict[str, Any]  # nested, as the checkpoint holds it
    state: dict[str, Tensor]  # the model's state dict, on the CPU
    step: int | None  # updates the checkpoint holds
    run: Run | None  # the folder's results.json, for comparison with α = 0 / 1 (None when it has none)
    data_root: str | None  # dataset.root in the folder's .hydra/config.yaml
    data_workers: int | None

    @property
    def status(self) -> str | None:
        return self.run.results.status if self.run else None

    @property
    def final_val_loss(self) -> float | None:
        return self.run.results.final_val_loss if self.run else None

    @property
    def final_val_error(self) -> float | None:
        return self.run.results.final_val_error if self.run else None

    def describe(self) -> str:
        model = self.identity.get("model") or {}
        kw = ",".join(f"{k}={v}" for k, v in sorted((model.get("kwargs") or {}).items()))
        parts = [f"{model.get('name')}{f'({kw})' if kw else ''} on {(self.identity.get('dataset') or {}).get('name')}",
                 f"batch {self.identity.get('batch')}", f"seed {self.identity.get('seed')}",
                 f"{self.status or 'no results.json'} at update {self.step}"]
        if self.final_val_error is not None and self.final_val_loss is not None:
            parts.append(f"results.json: val_loss {self.final_val_loss:.4f} val_error {self.final_val_error:.4f}")
        return ", ".join(parts)


def _recorded_dataset(folder: Path) -> tuple[str | None, int | None]:
    """(dataset.root, dataset.workers) recorded in the folder's .hydra/config.yaml, where there is one."""
    try:
        ds = (recorded_config(folder) or {}).get("dataset") or {}
        root, workers = ds.get("root"), ds.get("workers")
        return (str(root) if root else None), (int(workers) if workers is not None else None)
    except Exception:  # noqa: BLE001 - a record we cannot read is only a missed hint; --data-root still works
        return None, None


def load_run(path: str | Path, label: str = "RUN") -> Endpoint:
    """Read a run folder's checkpoint (and results.json, .hydra/config.yaml if present); InterpError if unusable."""
    from lbtrain.checkpoint import CheckpointError, load_checkpoint

    folder = Path(path)
    if not folder.exists():
        raise InterpError(f"{label} {folder}: no such folder")
    if not folder.is_dir():
        raise InterpError(f"{label} {folder}: not a folder; give the run folder that holds checkpoint.pt")
    ckpt = folder / "checkpoint.pt"
    if not ckpt.is_file():
        raise InterpError(f"{label} {folder}: holds no checkpoint.pt (not a run folder, or a run stopped before its "
                          "first checkpoint)")
    try:
        data = load_checkpoint(ckpt, map_location="cpu", required=("model", "identity"))
    except CheckpointError as e:
        raise InterpError(f"{label}: {e}") from None
    state, ident = data["model"], data["identity"]
    if not isinstance(state, dict) or not isinstance(ident, dict):
        raise InterpError(f"{label} {ckpt}: does not hold a model state dict and identity")
    try:
        run = read_run(folder)
    except ResultsError:
        run = None  # only a comparison value is lost
    step = (data.get("state") or {}).get("step")
    root, workers = _recorded_dataset(folder)
    return Endpoint(path=folder, identity=ident, state=state, step=int(step) if step is not None else None, run=run,
                    data_root=root, data_workers=workers)


def _comparable(ident: dict[str, Any]) -> dict[str, Any]:
    dataset = {k: v for k, v in (ident.get("dataset") or {}).items() if k not in DATASET_KEYS_IGNORED}
    return {"model": ident.get("model"), "dataset": dataset}


def check_compatible(a: Endpoint, b: Endpoint) -> None:
    """InterpError unless the two runs have the same model (name and options) on the same data, and their state
    dicts the same entries and shapes."""
    from lbtrain.config import schema_defaults
    from lbtrain.identity import describe_diff, diff

    changes = diff(_comparable(a.identity), _comparable(b.identity), schema_defaults())
    if changes:
        raise InterpError("the runs differ in model or data, so there is no line between them: "
                          + describe_diff(changes, "RUN_A", "RUN_B"))
    ka, kb = set(a.state), set(b.state)
    if ka != kb:
        only = sorted(ka ^ kb)
        raise InterpError(f"the runs' checkpoints hold different model entries ({', '.join(only[:4])}"
                          f"{', ...' if len(only) > 4 else ''}): written by different lbtrain versions?")
    for k in sorted(ka):
        sa, sb = tuple(a.state[k].shape), tuple(b.state[k].shape)
        if sa != sb:
            raise InterpError(f"the runs' checkpoints differ in the shape of {k}: {sa} (RUN_A) vs {sb} (RUN_B)")


# ------------------------------------------------------------------------------------------------ method
def _is_bn_stat(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("running_mean", "running_var")


def interpolate_state(a: dict[str, Tensor], b: dict[str, Tensor], alpha: float,
                      bn_buffers: bool = True) -> dict[str, Tensor]:
    """(1 − α)·a + α·b for every floating-point entry (exactly a at α = 0 and b at α = 1); integer entries from a.
    With `bn_buffers` False, BN running statistics are taken from a (they are recomputed afterwards anyway)."""
    out = {}
    for k, ta in a.items():
        tb = b[k]
        if not ta.is_floating_point() or (not bn_buffers and _is_bn_stat(k)):
            out[k] = ta
            continue
        if alpha == 0.0:
            out[k] = ta
        elif alpha == 1.0:
            out[k] = tb
        else:
            v = ta * (1.0 - alpha) + tb * alpha
            if k.endswith("running_var"):
                v = v.clamp_min(0.0)  # extrapolated variances can go negative
            out[k] = v
    return out


def _bn_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> int:
    """Reset every BatchNorm layer's running statistics and recompute them as the plain (cumulative) average over
    `batches`, with only the BN layers in train mode. Leaves the model in eval mode; returns the samples used."""
    layers = _bn_layers(model)
    model.eval()
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    seen = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # running stat = mean over the batches seen since the reset
            m.train()
        for x, _ in batches:
            model(x)
            seen += int(x.shape[0])
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    return seen


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """(mean cross-entropy, top-1 error) of the model in eval mode over `batches` (sums kept in float64)."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in batches:
        out = model(x).float()
        loss += float(F.cross_entropy(out, y, reduction="sum").double())
        correct += int((out.argmax(1) == y).sum())
        n += int(y.shape[0])
    if n == 0:
        return math.nan, math.nan
    return loss / n, 1.0 - correct / n


@dataclass
class Point:
    alpha: float
    train_loss: float
    train_error: float
    val_loss: float
    val_error: float

    def row(self) -> tuple[float, ...]:
        return tuple(getattr(self, c) for c in COLUMNS)


@dataclass
class Setup:
    """The data and model that every α shares."""

    model: nn.Module
    bn_batches: Callable[[], Iterator[tuple[Tensor, Tensor]]]  # the fixed BN batches, anew for each α
    train_batches: Callable[[], Iterator[tuple[Tensor, Tensor]]]
    val_batches: Callable[[], Iterator[tuple[Tensor, Tensor]]]
    bn_batch: int
    bn_count: int
    train_samples: int
    train_size: int
    val_size: int


def prepare(a: Endpoint, b: Endpoint, device: torch.device, *, data_root: str | None = None,
            bn_batches: int = DEFAULT_BN_BATCHES, bn_batch: int = DEFAULT_BN_BATCH,
            train_samples: int | None = DEFAULT_TRAIN_SAMPLES, eval_batch: int = DEFAULT_EVAL_BATCH,
            workers: int | None = None) -> Setup:
    """Load the data, build the model (plain BatchNorm: ghost BN state dicts load into it), check that both
    checkpoints load into it; InterpError for anything a user can fix."""
    from lbtrain.config import DatasetNotFoundError
    from lbtrain.data import DeviceLoader, ImageFolderLoader, load_dataset, make_loaders
    from lbtrain.models import build_model

    check_compatible(a, b)
    ds_cfg = dict(a.identity.get("dataset") or {})
    ds_cfg["root"] = data_root or a.data_root or b.data_root  # None: $LBTRAIN_DATA, else ./data
    ds_cfg["download"] = False
    workers = workers if workers is not None else a.data_workers
    if workers is not None:  # ImageFolder datasets only
        ds_cfg["workers"] = workers
    try:
        ds = load_dataset(ds_cfg)
    except (DatasetNotFoundError, ValueError) as e:
        raise InterpError(f"dataset: {' '.join(str(e).split())}") from None
    try:
        model = build_model(a.identity["model"], ds.num_classes, ds.input_shape)
    except (ValueError, TypeError, KeyError) as e:
        raise InterpError(f"model: {' '.join(str(e).split())}") from None
    for label, run in (("RUN_A", a), ("RUN_B", b)):
        try:
            model.load_state_dict(run.state)
        except RuntimeError as e:
            raise InterpError(f"{label}: its checkpoint does not fit the model {a.identity['model'].get('name')!r} "
                              f"built for {ds.name}: {str(e).splitlines()[-1].strip()}") from None
    model.to(device).eval()

    train_loader, val_loader = make_loaders(ds, device=device, seed=BN_SEED, augment=False)
    n = ds.train_size
    bsz = min(bn_batch, n)
    count = max(1, min(bn_batches, n // bsz))

    def bn_iter() -> Iterator[tuple[Tensor, Tensor]]:
        return itertools.islice(train_loader.epoch(0, bsz), count)  # same (seed, epoch): same batches every time

    if train_samples is None or train_samples >= n:
        sub, used = train_loader, n
    else:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(TRAIN_SEED))[:train_samples].sort().values
        used = train_samples
        if isinstance(train_loader, ImageFolderLoader):
            folder = copy.copy(ds.train)  # type: ignore[union-attr]
            folder.samples = [folder.samples[i] for i in keep.tolist()]
            folder.targets = [s[1] for s in folder.samples]
            folder.imgs = folder.samples
            sub = ImageFolderLoader(folder, ds.mean, ds.std, augment=False, device=device, seed=TRAIN_SEED,
                                    image_size=ds.image_size, workers=ds.workers)  # type: ignore[union-attr]
        else:
            sub = DeviceLoader(ds.train_x[keep], ds.train_y[keep], ds.mean, ds.std,  # type: ignore[union-attr]
                               augment=False, device=device, seed=TRAIN_SEED)

    return Setup(model=model, bn_batches=bn_iter, train_batches=lambda: sub.eval_batches(eval_batch),
                 val_batches=lambda: val_loader.eval_batches(eval_batch), bn_batch=bsz, bn_count=count,
                 train_samples=used, train_size=n, val_size=ds.val_size)


def interpolate(a: Endpoint, b: Endpoint, alphas: Sequence[float], setup: Setup, *, bn_recompute: bool = True,
                on_point: Callable[[Point], None] | None = None) -> list[Point]:
    """Train and validation metrics at (1 − α)·w_A + α·w_B for each α (see the module docstring)."""
    model = setup.model
    device = next(model.parameters()).device
    points = []
    for alpha in alphas:
        state = interpolate_state(a.state, b.state, alpha, bn_buffers=not bn_recompute)
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
        if bn_recompute:
            recompute_bn(model, setup.bn_batches())
        train_loss, train_error = evaluate(model, setup.train_batches())
        val_loss, val_error = evaluate(model, setup.val_batches())
        p = Point(alpha, train_loss, train_error, val_loss, val_error)
        points.append(p)
        if on_point is not None:
            on_point(p)
    return points


# ----------------------------------------------------------------------------------------------- outputs
def _csv_value(v: float) -> str:
    """A CSV field at full precision (repr round-trips the float); "nan" for anything not finite."""
    return repr(float(v)) if math.isfinite(v) else "nan"


def csv_text(points: Sequence[Point]) -> str:
    lines = [",".join(COLUMNS)] + [",".join(_csv_value(v) for v in p.row()) for p in points]
    return "\n".join(lines) + "\n"


def make_figure(points: Sequence[Point], label_a: str, label_b: str, subtitle: str = "") -> Any:
    """Two panels against α: loss (log scale when every value is positive) and error, train and validation,
    dotted lines at α = 0 (RUN_A) and α = 1 (RUN_B)."""
    fig, (ax_loss, ax_err) = new_figure(size=(10.5, 4.4), ncols=2)
    alphas = [p.alpha for p in points]
    for ax, what, ylabel in ((ax_loss, "loss", "cross-entropy loss"), (ax_err, "error", "top-1 error")):
        train = [getattr(p, f"train_{what}") for p in points]
        val = [getattr(p, f"val_{what}") for p in points]
        ax.plot(alphas, train, color="C0", marker=".", label="train")
        ax.plot(alphas, val, color="C1", marker=".", linestyle="--", label="validation")
        for x, name in ((0.0, "A"), (1.0, "B")):
            ax.axvline(x, color="0.4", linestyle=":", linewidth=1)
            ax.text(x, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize="small")
        finite = [v for v in train + val if math.isfinite(v)]
        if what == "loss" and finite and min(finite) > 0:
            log_axes(ax, y=True)
        elif what == "error":
            ax.set_ylim(bottom=0.0)
        # two panels leave no room beside them: the legend goes inside (two entries, in a corner)
        style_axes(ax, "α   (weights (1 − α)·w_A + α·w_B)", ylabel, legend=INSIDE)
    title = f"A: {label_a}    B: {label_b}"
    fig.suptitle(title if not subtitle else f"{title}\n{subtitle}", fontsize="small")
    fig.tight_layout()
    return fig


def write_outputs(points: Sequence[Point], out: Path, label_a: str, label_b: str, subtitle: str = "",
                  record: dict[str, Any] | None = None) -> list[Path]:
    """interp.csv and interp.png into `out` (created if missing), each written atomically; with `record`, also
    interp.json (which runs, which identities, which options: where the numbers came from)."""
    from lbtrain.checkpoint import atomic_write_bytes, atomic_write_json

    png = png_bytes(make_figure(points, label_a, label_b, subtitle))
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "interp.csv", out / "interp.png"
    atomic_write_bytes(csv_path, csv_text(points).encode())
    atomic_write_bytes(png_path, png)
    if record is None:
        return [csv_path, png_path]
    atomic_write_json(out / "interp.json", {**record, "points": [vars(p) for p in points]})
    return [csv_path, png_path, out / "interp.json"]


# --------------------------------------------------------------------------------------------------- cli
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not argparse's usage block
        raise InterpError(message)


def _positive(minimum: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}")
        return value

    return parse


def _train_samples(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    return _positive()(text)


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda or cuda:N")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Train and validation loss and error along the line (1 − α)·w_A + α·w_B "
                "between two runs of one model on one dataset (Keskar et al. 2017, Figure 3). BatchNorm "
                "statistics are recomputed at every α on fixed training batches.")
    p.add_argument("run_a", type=Path, metavar="RUN_A", help="run folder (holding checkpoint.pt) at α = 0")
    p.add_argument("run_b", type=Path, metavar="RUN_B", help="run folder (holding checkpoint.pt) at α = 1")
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, metavar="SPEC",
                   help=f"START:STOP:NUM (both ends included) or a list a,b,c (default {DEFAULT_ALPHAS})")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default: RUN_A/interp-<name of RUN_B>)")
    p.add_argument("--device", type=_device, default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--data-root", default=None, metavar="PATH",
                   help="data folder (default: dataset.root of RUN_A's .hydra/config.yaml, else $LBTRAIN_DATA, "
                        "else ./data)")
    p.add_argument("--workers", type=_positive(0), default=None, metavar="N",
                   help="data-loading processes for ImageFolder datasets (default: RUN_A's dataset.workers, else 8)")
    p.add_argument("--no-bn-recompute", dest="bn_recompute", action="store_false",
                   help="interpolate the BN running statistics linearly instead of recomputing them (reproduces "
                        "each run's own metrics exactly at α = 0 and 1)")
    p.add_argument("--bn-batches", type=_positive(), default=DEFAULT_BN_BATCHES, metavar="K",
                   help=f"training batches the BN statistics are recomputed on (default {DEFAULT_BN_BATCHES})")
    p.add_argument("--bn-batch", type=_positive(2), default=DEFAULT_BN_BATCH, metavar="B",
                   help=f"samples per such batch (default {DEFAULT_BN_BATCH})")
    p.add_argument("--train-samples", type=_train_samples, default=DEFAULT_TRAIN_SAMPLES, metavar="N",
                   help=f"training samples the train metrics are measured on, or 'all' (default "
                        f"{DEFAULT_TRAIN_SAMPLES})")
    p.add_argument("--eval-batch", type=_positive(), default=DEFAULT_EVAL_BATCH, metavar="B",
                   help=f"evaluation batch size (default {DEFAULT_EVAL_BATCH}; does not change the results)")
    return p


def _join_dash_values(argv: list[str]) -> list[str]:
    """`--alphas -1:2:31` as `--alphas=-1:2:31` (argparse takes a value starting with '-' for an option)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--alphas" and i + 1 < len(argv):
            out.append(f"--alphas={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _check_out(out: Path) -> None:
    """Refuse, before any work, an output path that is a file or that cannot be created (a temporary file in its
    nearest existing folder, removed at once, is the test: permission bits alone do not tell, e.g. for root)."""
    if out.exists() and not out.is_dir():
        raise InterpError(f"--out {out}: is a file; give a folder (it is created if missing)")
    probe = out.absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(probe))
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise InterpError(f"--out {out}: cannot write there ({probe}: {e.strerror})") from None


def _fixed(v: float) -> str:
    """A number of the stdout table: 4 decimals (losses and errors), "nan" for anything not finite."""
    return f"{v:.4f}" if math.isfinite(v) else "nan"


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (0, or 2 after one line on stderr)."""
    args_list = _join_dash_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
        alphas = parse_alphas(args.alphas)
        out = args.out or args.run_a / f"interp-{args.run_b.resolve().name}"
        a = load_run(args.run_a, "RUN_A")
        b = load_run(args.run_b, "RUN_B")
        check_compatible(a, b)
        _check_out(out)
        from lbtrain.config import ConfigError
        from lbtrain.devices import pick_device

        try:
            device = pick_device(args.device)
        except ConfigError as e:
            raise InterpError(f"--device {args.device}: {e.allowed.replace('device=', '--device ')}") from None
        setup = prepare(a, b, device, data_root=args.data_root, bn_batches=args.bn_batches, bn_batch=args.bn_batch,
                        train_samples=args.train_samples, eval_batch=args.eval_batch, workers=args.workers)
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except InterpError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    if args.bn_recompute:
        bn_line = (f"BatchNorm statistics recomputed at every alpha on {setup.bn_count} fixed training batches of "
                   f"{setup.bn_batch} ({setup.bn_count * setup.bn_batch} of {setup.train_size} samples)")
    else:
        bn_line = "BatchNorm statistics interpolated linearly with the weights (--no-bn-recompute)"
    data_line = (f"train metrics on {setup.train_samples} of {setup.train_size} training samples, val on all "
                 f"{setup.val_size}; device {device}")
    print(f"A = {a.path}  ({a.describe()})")
    print(f"B = {b.path}  ({b.describe()})")
    print(bn_line)
    print(data_line)
    print(f"{'alpha':>8} {'train_loss':>11} {'train_error':>11} {'val_loss':>9} {'val_error':>9}")

    def show(p: Point) -> None:
        print(f"{p.alpha:>8.4g} {_fixed(p.train_loss):>11} {_fixed(p.train_error):>11} {_fixed(p.val_loss):>9} "
              f"{_fixed(p.val_error):>9}", flush=True)

    start = time.perf_counter()
    try:
        points = interpolate(a, b, alphas, setup, bn_recompute=args.bn_recompute, on_point=show)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    try:
        from lbtrain.identity import identity_hash

        record = {"run_a": str(a.path), "run_b": str(b.path), "identity_a": identity_hash(a.identity),
                  "identity_b": identity_hash(b.identity), "alphas": list(alphas), "bn_recompute": args.bn_recompute,
                  "bn_batches": setup.bn_count, "bn_batch": setup.bn_batch, "train_samples": setup.train_samples,
                  "device": str(device), "version": lbtrain.__version__}
        files = write_outputs(points, out, str(a.path), str(b.path), bn_line, record)
    except OSError as e:
        print(f"{PROG}: error: cannot write {e.filename or out}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"{len(points)} points in {time.perf_counter() - start:.1f} s. Wrote:")
    for f in files:
        print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
