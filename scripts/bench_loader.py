"""DeviceLoader throughput: images/s of the training loader alone, with batch augmentation and cutout.

For two workloads, the loader's `next()` is timed over `--steps` steps after `--warmup` steps, epochs
streaming back to back (so each epoch's up-front draws are paid as in training):

* ``f1-mnist``: MNIST-shaped uint8 data (1x28x28, 60000 samples), batch 4096, no crop/flip,
* ``resnet44-cifar``: CIFAR-shaped (3x32x32, 50000 samples), batch 512, crop + flip,

each as ``today`` (duplicates=1, cutout=0), ``dup4`` (duplicates=4: same total batch, a quarter as many
distinct samples), ``cutout8`` and ``dup4+cutout8``. Variants alternate within each of ``--repeats`` rounds
and the best round is kept; ratios are to ``today``. With ``--ref REV`` ``today`` is the loader of
``lbtrain.data`` at git revision REV (loaded from ``git archive``) and ``default`` this tree's loader with the
default options (bit-identical output, see tests/test_data.py), and ratios are given to both; without it
``today`` is this tree's default loader. Data are random uint8 (the loader's cost does not depend on pixel
values). Other processes on the machine add noise: compare ratios measured in one run; ``--clock cpu`` times
this process's CPU time instead of wall time (meaningful with ``--threads 1``), which other processes
disturb less.

Usage: ``python scripts/bench_loader.py [--ref HEAD] [--device cpu] [--threads 2] [--clock wall|cpu]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import itertools
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # allow `python scripts/bench_loader.py` without installing lbtrain
    sys.path.insert(0, str(_ROOT))

from lbtrain import data as D  # noqa: E402

WORKLOADS = {  # name: (shape, train samples, batch, crop + flip)
    "f1-mnist": ((1, 28, 28), 60000, 4096, False),
    "resnet44-cifar": ((3, 32, 32), 50000, 512, True),
}


def load_ref(rev: str) -> ModuleType:
    """`lbtrain.data` as of git revision `rev` (a module lbtrain/data.py or the package lbtrain/data/), imported
    from that revision's whole `lbtrain` tree, so its own imports are of that revision too."""
    archive = subprocess.run(["git", "archive", rev, "lbtrain"], cwd=_ROOT, check=True, capture_output=True).stdout
    tree = tempfile.mkdtemp()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree)
    ours = {k: m for k, m in sys.modules.items() if k == "lbtrain" or k.startswith("lbtrain.")}
    for k in ours:  # import the revision's lbtrain under the same name, then put this tree's back
        del sys.modules[k]
    sys.path.insert(0, tree)
    try:
        module = importlib.import_module("lbtrain.data")
        module.DeviceLoader  # noqa: B018 - resolved now: a package resolves it lazily, from the revision's tree
    finally:
        sys.path.remove(tree)
        for k in [k for k in sys.modules if k == "lbtrain" or k.startswith("lbtrain.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    return module


def stream(loader: Any, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of epoch 0, 1, 2, ... back to back."""
    for epoch in itertools.count():
        yield from loader.epoch(epoch, batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(device: str, steps: int, warmup: int, repeats: int, cutout: int, duplicates: int,
        ref: str | None, clock: str = "wall") -> dict[str, dict[str, float]]:
    dev = torch.device(device)
    today_cls = load_ref(ref).DeviceLoader if ref else D.DeviceLoader
    timer = time.process_time if clock == "cpu" else time.perf_counter
    results: dict[str, dict[str, float]] = {}
    for name, (shape, n, batch, augment) in WORKLOADS.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        c = shape[0]
        common = dict(augment=augment, device=dev, seed=0)
        mean, std = (0.5,) * c, (0.25,) * c
        variants = {
            "today": today_cls(x, y, mean, std, **common),
            **({"default": D.DeviceLoader(x, y, mean, std, **common)} if ref else {}),
            f"dup{duplicates}": D.DeviceLoader(x, y, mean, std, duplicates=duplicates, **common),
            f"cutout{cutout}": D.DeviceLoader(x, y, mean, std, cutout=cutout, **common),
            f"dup{duplicates}+cutout{cutout}": D.DeviceLoader(x, y, mean, std, duplicates=duplicates,
                                                              cutout=cutout, **common),
        }
        streams = {k: stream(v, batch) for k, v in variants.items()}
        for it in streams.values():
            for _ in range(warmup):
                next(it)
        _sync(dev)
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(repeats):
            for k, it in streams.items():  # alternate variants within each round
                t0 = timer()
                for _ in range(steps):
                    xb, _ = next(it)
                _sync(dev)
                best[k] = min(best[k], timer() - t0)
        results[name] = {k: steps * batch / t for k, t in best.items()}
        for k, ips in results[name].items():
            line = f"{name:15s} {k:16s} {ips / 1e3:9.1f} k images/s   {ips / results[name]['today']:5.3f}x today"
            if ref:
                line += f"   {ips / results[name]['default']:5.3f}x default"
            print(line, flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cutout", type=int, default=8)
    ap.add_argument("--duplicates", type=int, default=4)
    ap.add_argument("--ref", default=None, help="git revision whose loader is 'today' (default: this tree's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time or this process's CPU time")
    ap.add_argument("--json", type=Path, default=None, help="also write the images/s figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"today = {args.ref or 'this tree, duplicates=1 cutout=0'}, best of {args.repeats} x {args.steps} steps")
    res = run(args.device, args.steps, args.warmup, args.repeats, args.cutout, args.duplicates, args.ref,
              args.clock)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
