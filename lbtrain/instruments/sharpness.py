"""The `sharpness` instrument (`sharpness.every_epochs=N`): the top Hessian eigenvalue (Lanczos) and the Hessian trace
(Hutchinson) of the training loss on a fixed set of `sharpness.samples` training samples (drawn with a fixed seed,
the same for every run of a sweep; no augmentation). BatchNorm is in train mode over fixed batches of the run's
BatchNorm batch size (ghost batch, micro-batch or per-process batch, at most the sample count): the loss the run
actually minimizes; dropout is off (a fixed operator is needed); running statistics are restored. PyHessian (Yao et
al. 2020) uses eval mode instead, which measures another function.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from lbtrain.instruments.base import Run
from lbtrain.instruments.common import untouched
from lbtrain.instruments.hessian import hutchinson_trace, top_eigenvalue

SHARPNESS_SEED = 12345  # the fixed sample set and the Lanczos / Hutchinson vectors: the same for every run


class SharpnessProbe:
    """Top Hessian eigenvalue and trace at epoch ends (every `every` epochs, and at the end of the run)."""

    def __init__(self, trainer: Run, node: Any) -> None:
        self.t, self.every, self.iters, self.trace_samples = trainer, node.every_epochs, node.iters, node.trace_samples
        samples = node.samples
        loader = trainer.train_loader
        n = len(loader)
        g = torch.Generator().manual_seed(SHARPNESS_SEED)
        self.indices = torch.randperm(n, generator=g)[: min(samples, n)].sort().values
        self.batch = max(1, min(trainer.bn_batch, len(self.indices)))
        self.last: dict[str, Any] | None = None
        trainer.hooks.epoch_end.append(self._epoch_end)

    def _epoch_end(self, trainer: Run, epoch: int) -> None:
        final = trainer.state.step >= trainer.target_updates
        if final or (epoch + 1) % self.every == 0:
            self.measure()

    def measure(self) -> dict[str, Any]:
        t = self.t
        start = time.perf_counter()
        x, y = t.train_loader.samples(self.indices)
        # whole batches of the BN batch size (a last partial batch would be normalized over fewer samples)
        k = max(1, len(self.indices) // self.batch)
        batches = [(x[i * self.batch:(i + 1) * self.batch], y[i * self.batch:(i + 1) * self.batch])
                   for i in range(k)]
        net = t.net
        with untouched(net, t.device):
            net.eval()
            for m in net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.train()  # BN as in training (over fixed batches), dropout off
            closures = [lambda xb=xb, yb=yb: F.cross_entropy(net(xb).float(), yb) for xb, yb in batches]
            g = torch.Generator(device=t.params[0].device).manual_seed(SHARPNESS_SEED)
            top = top_eigenvalue(closures, t.params, iters=self.iters, generator=g)
            trace = (hutchinson_trace(closures, t.params, samples=self.trace_samples, generator=g)
                     if self.trace_samples else {"trace": None, "stderr": None, "hvps": 0})
        seconds = time.perf_counter() - start
        self.last = {"lambda_max": top["lambda_max"], "lanczos_converged": top["converged"],
                     "trace": trace["trace"], "trace_stderr": _finite(trace["stderr"]),
                     "hvps": top["hvps"] + trace["hvps"], "seconds": round(seconds, 3), "update": t.state.step,
                     "samples": len(self.indices), "batches": k, "batch": self.batch}
        t.tb.scalars(t.state.step, {"sharpness/lambda_max": top["lambda_max"],
                                    **({"sharpness/trace": trace["trace"]} if trace["trace"] is not None else {})})
        return self.last

    def results(self) -> dict[str, Any] | None:
        return self.last

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last}  # the last measurement: results.json is rebuilt from it after a kill

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = state.get("last")


def _finite(v: Any) -> Any:
    return v if v is None or (isinstance(v, float) and math.isfinite(v)) else None
