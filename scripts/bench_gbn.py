"""Ghost Batch Norm micro-benchmark: forward+backward time of one BN layer.

Compares, on a ResNet-44-like activation (default (4096, 16, 32, 32) on CUDA, (1024, 16, 32, 32)
on CPU) split into ``--ghosts`` ghost batches:

* ``vectorized``: ``GhostBatchNorm2d`` (one ``F.batch_norm`` call on a view of the input; with
  ``--channels-last`` one copy each way),
* ``loop``: one ``F.batch_norm`` call per ghost batch (the authors' implementation),
* ``plain``: ``nn.BatchNorm2d`` on the whole batch (no ghost batches).

Usage: ``python scripts/bench_gbn.py [--device cpu] [--quick] [--json out.json]``.
Other scripts can ``import`` this file and call :func:`run_gbn_bench`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # allow `python scripts/bench_gbn.py` without installing lbtrain
    sys.path.insert(0, str(_ROOT))

from lbtrain.checkpoint import atomic_write_json  # noqa: E402
from lbtrain.ghost_bn import GhostBatchNorm2d  # noqa: E402

VARIANTS = ("plain", "vectorized", "loop")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_gbn_bench(
    device: str | torch.device,
    batch: int,
    channels: int,
    size: int,
    ghosts: int,
    iters: int,
    *,
    warmup: int = 2,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Time forward+backward of one BN layer for the three variants; returns ms and ratios.

    Variants are run round-robin (one iteration each per round) so that machine noise hits all of
    them alike; ``*_ms`` are medians over ``iters`` rounds, ``*_min_ms`` minima.
    """
    device = torch.device(device)
    if batch % ghosts != 0:
        raise ValueError(f"batch {batch} is not divisible by ghosts {ghosts}")
    g = batch // ghosts
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, channels, size, size, generator=gen, dtype=dtype)
    x0 = x0.to(device).contiguous(memory_format=fmt)
    dy = torch.randn(x0.shape, generator=gen, dtype=dtype).to(device).contiguous(memory_format=fmt)

    gbn = GhostBatchNorm2d(channels, g, device=device, dtype=dtype)
    bn = nn.BatchNorm2d(channels, device=device, dtype=dtype)
    loop_bn = nn.BatchNorm2d(channels, device=device, dtype=dtype)

    def loop_forward(x: torch.Tensor) -> torch.Tensor:
        m = loop_bn  # running statistics updated once per ghost batch, as in the authors' code
        return torch.cat(
            [
                F.batch_norm(c, m.running_mean, m.running_var, m.weight, m.bias, True, m.momentum, m.eps)
                for c in x.split(g)
            ]
        )

    forwards: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]] = {
        "plain": (bn, bn),
        "vectorized": (gbn, gbn),
        "loop": (loop_forward, loop_bn),
    }
    inputs = {name: x0.clone().requires_grad_() for name in VARIANTS}

    def step(name: str) -> None:
        fwd, module = forwards[name]
        x = inputs[name]
        x.grad = None
        module.zero_grad(set_to_none=True)
        fwd(x).backward(dy)

    for _ in range(warmup):
        for name in VARIANTS:
            step(name)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(iters):
        for name in VARIANTS:
            _sync(device)
            t0 = time.perf_counter()
            step(name)
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)

    res: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": [batch, channels, size, size],
        "dtype": str(dtype).replace("torch.", ""),
        "channels_last": channels_last,
        "ghosts": ghosts,
        "ghost_batch": g,
        "iters": iters,
    }
    for name in VARIANTS:
        res[f"{name}_ms"] = statistics.median(times[name])
        res[f"{name}_min_ms"] = min(times[name])
    for suffix in ("", "_min"):
        vec = res[f"vectorized{suffix}_ms"]
        res[f"vectorized_over_plain{suffix}"] = vec / res[f"plain{suffix}_ms"]
        res[f"loop_over_vectorized{suffix}"] = res[f"loop{suffix}_ms"] / vec
    return res


def format_table(res: dict) -> str:
    b, c, h, w = res["shape"]
    layout = "channels_last" if res["channels_last"] else "contiguous"
    lines = [
        f"GBN micro-benchmark, fwd+bwd of one layer: device={res['device']} ({res['device_name']}), "
        f"torch {res['torch']}, {res['threads']} threads",
        f"x=({b}, {c}, {h}, {w}) {res['dtype']} {layout}, {res['ghosts']} ghost batches of "
        f"{res['ghost_batch']}, {res['iters']} rounds",
        f"{'variant':<40}{'median ms':>12}{'min ms':>12}",
    ]
    labels = {
        "plain": "plain nn.BatchNorm2d (no ghosts)",
        "vectorized": "GhostBatchNorm2d (1 fused call)",
        "loop": f"per-chunk loop ({res['ghosts']} F.batch_norm calls)",
    }
    for name in VARIANTS:
        lines.append(f"{labels[name]:<40}{res[f'{name}_ms']:>12.2f}{res[f'{name}_min_ms']:>12.2f}")
    for label, key in (
        ("vectorized / plain", "vectorized_over_plain"),
        ("loop / vectorized", "loop_over_vectorized"),
    ):
        lines.append(f"{label:<40}{res[key]:>12.2f}{res[key + '_min']:>12.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 4096 on CUDA, 1024 on CPU")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--ghosts", type=int, default=32, help="number of ghost batches")
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default 50 CUDA, 15 CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--quick", action="store_true", help="small, fast smoke run")
    p.add_argument("--json", type=Path, default=None, help="write results to this JSON file")
    args = p.parse_args(argv)

    cuda = torch.device(args.device).type == "cuda"
    batch = args.batch or (4096 if cuda else 1024)
    iters = args.iters or (50 if cuda else 15)
    warmup = args.warmup
    if args.quick:
        batch, iters, warmup = args.batch or (1024 if cuda else 256), args.iters or 5, 1
    res = run_gbn_bench(
        args.device,
        batch,
        args.channels,
        args.size,
        args.ghosts,
        iters,
        warmup=warmup,
        channels_last=args.channels_last,
    )
    print(format_table(res))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
