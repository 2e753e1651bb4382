"""What the instruments share: `untouched`, which lets a measurement run forward/backward passes on the live model
without leaving a trace on training (random streams, BatchNorm buffers, deferred ghost-BN statistics, modes)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lbtrain.ghost_bn import restore_deferred, snapshot_deferred


@contextlib.contextmanager
def untouched(net: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Run a measurement without leaving a trace: the global random streams and every buffer (BN running
    statistics, num_batches_tracked, and what deferring ghost-BN layers collected for the current step) are as
    before afterwards, and so is each module's train/eval mode."""
    buffers = [b.detach().clone() for b in net.buffers()]
    deferred = snapshot_deferred(net)  # ghost BN statistics collected for the step being accumulated
    modes = [m.training for m in net.modules()]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in zip(net.buffers(), buffers):
                    b.copy_(saved)
            restore_deferred(deferred)
            for m, mode in zip(net.modules(), modes):
                m.training = mode
