"""The instruments attached to a training run: they observe through the trainer's public hooks and never change
what is trained (same weights bit for bit, same random streams, same BatchNorm statistics).

- `GNSProbe` (`gns=true`): the gradient noise scale B_simple at log steps (McCandlish et al. 2018), from squared
  gradient norms at two batch sizes. The estimators assume the batch is made of i.i.d. units; with BatchNorm the
  unit is the group BN normalizes over (a ghost batch under GBN, a micro-batch or a DDP share under plain BN), since
  BN couples the samples of a group. Where the two sizes come from:
  * gradient accumulation: the first micro-batch and the accumulated gradient (what the step computes anyway);
  * otherwise, extra forward/backward passes at log steps only (p.grad untouched, the random state forked, BN
    buffers restored): without BN, or with ghost BN and >= 2 ghost batches, one pass on a strided part made of
    whole units (x[0::2], or x[0::d] of the ghost batches) against the step's own gradient; with plain BN over the
    whole batch, two passes on the two strided halves, each normalized over itself, giving both sizes - the noise
    scale of the model with BN over B/2 samples. Measured on digits: the half-batch pass against the full-batch
    gradient under plain BN (BN over B/2 vs B) gives negative |G|^2 estimates, i.e. BN's own batch noise counted
    as gradient noise; the two-halves way does not mix the two.
  Cost at the default cadence: at most one extra step's worth of passes every `log_every` updates (2% at 50).
- `SharpnessProbe` (`sharpness.every_epochs=N`): the top Hessian eigenvalue (Lanczos) and the Hessian trace
  (Hutchinson) of the training loss on a fixed set of `sharpness.samples` training samples (drawn with a fixed
  seed, the same for every run of a sweep; no augmentation). BatchNorm is in train mode over fixed batches of the
  run's BatchNorm batch size (ghost batch, micro-batch or per-process batch, at most the sample count): the loss
  the run actually minimizes; dropout is off (a fixed operator is needed); running statistics are restored.
  PyHessian (Yao et al. 2020) uses eval mode instead, which measures another function.
- `LayerDistance` (`layer_distance=true`): ||w_t - w_0|| per layer (module) at the same log-spaced updates as the
  total distance, as `weights/distance/<layer>`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lbtrain.ghost_bn import restore_deferred, set_ghost_batch, snapshot_deferred
from lbtrain.instruments.gns import GradientNoiseScale, sq_norm
from lbtrain.instruments.hessian import hutchinson_trace, top_eigenvalue

if TYPE_CHECKING:
    from lbtrain.trainer import Trainer

SHARPNESS_SEED = 12345  # the fixed sample set and the Lanczos / Hutchinson vectors: the same for every run


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


class GNSProbe:
    """Gradient noise scale at log steps; see the module docstring for where the two gradients come from."""

    def __init__(self, trainer: Trainer, beta: float = 0.95) -> None:
        self.t = trainer
        self.ema = GradientNoiseScale(beta)
        self._small: tuple[torch.Tensor, float] | None = None
        trainer.hooks.micro_backward.append(self._micro)
        trainer.hooks.after_backward.append(self._after)
        trainer.hooks.log.append(self._log)

    def _grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.t.params]

    def _micro(self, trainer: Trainer, index: int, parts: int, log_now: bool) -> None:
        if log_now and parts > 1 and index == 0:
            # p.grad holds micro-batch 0's mean-loss gradient scaled by its share 1/parts of the batch
            self._small = (sq_norm(self._grads()) * parts**2, trainer.micro_batch)

    def _after(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor, log_now: bool) -> None:
        if not log_now:
            return
        if self._small is not None:  # micro-batch 0 vs the accumulated gradient (all-reduced under DDP)
            (small, b_small), self._small = self._small, None
            self.ema.update(small, sq_norm(self._grads()), b_small, x.shape[0] * trainer.dist.world)
            return
        measured = self._extra_passes(x, y)
        if measured is not None:
            self.ema.update(*measured)

    def _extra_passes(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float,
                                                                           float] | None:
        """(|G_small|^2, |G_big|^2, B_small, B_big) from extra passes that leave training untouched.

        The units that are i.i.d. draws are the groups BatchNorm normalizes over: single samples without BN, ghost
        batches with ghost BN. The small gradient is taken over whole units (the strided x[0::d] with d the
        smallest divisor >= 2 of the number of ghost batches) and the big one is the step's own gradient. With plain
        BatchNorm over the whole batch (or a single ghost batch) no part of the batch is a whole unit: the batch is
        split into its two strided halves, each normalized over itself, and both gradients come from them (small:
        the mean of the halves' |g|^2; big: |mean of the halves' g|^2). That measures the noise scale of the model
        with BN over B/2 samples: unbiased for that model, and the honest reading of B_simple under plain BN."""
        t = self.t
        n = x.shape[0]
        if n < 2:
            return None
        big_real = sq_norm(self._grads())
        b_big = float(n * t.dist.world)  # p.grad is the all-reduced (global-batch) gradient under DDP
        if not t.checked.has_batchnorm:
            return self._grad_sq(x[0::2], y[0::2]), big_real, float(len(x[0::2])), b_big
        ghosts = n // t.plan.ghost_batch if t.plan.ghost_batch else 1
        d = next((k for k in range(2, ghosts + 1) if ghosts % k == 0), None)
        if d is not None:
            return self._grad_sq(x[0::d], y[0::d]), big_real, float(n // d), b_big
        plain = set_ghost_batch(t.net, None) if t.plan.ghost_batch else 0  # one ghost batch = plain BN
        try:
            ga, gb = self._grads_of(x[0::2], y[0::2]), self._grads_of(x[1::2], y[1::2])
        finally:
            if plain:
                set_ghost_batch(t.net, t.plan.ghost_batch)
        small = (sq_norm(ga) + sq_norm(gb)) / 2
        big = sq_norm([(a + b) / 2 for a, b in zip(ga, gb)])
        return small, big, float(n // 2), float(n)

    def _grads_of(self, xs: torch.Tensor, ys: torch.Tensor) -> list[torch.Tensor]:
        t = self.t
        with untouched(t.net, t.device), t.autocast:
            loss = F.cross_entropy(t.net(xs).float(), ys)
            grads = torch.autograd.grad(loss, t.params, allow_unused=True)
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, t.params)]

    def _grad_sq(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return sq_norm(self._grads_of(xs, ys))

    def _log(self, trainer: Trainer, scalars: dict[str, float]) -> None:
        values = self.ema.values()  # one host read, at the log step
        trainer.tb.scalars(trainer.state.step, {f"gns/{k}": v for k, v in values.items() if v is not None})

    def results(self) -> dict[str, Any]:
        return {**self.ema.values(), "beta": self.ema.beta}

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.ema.load_state_dict(d)


class SharpnessProbe:
    """Top Hessian eigenvalue and trace at epoch ends (every `every` epochs, and at the end of the run)."""

    def __init__(self, trainer: Trainer, every: int, samples: int, iters: int, trace_samples: int) -> None:
        self.t, self.every, self.iters, self.trace_samples = trainer, every, iters, trace_samples
        loader = trainer.train_loader
        n = len(loader)
        g = torch.Generator().manual_seed(SHARPNESS_SEED)
        self.indices = torch.randperm(n, generator=g)[: min(samples, n)].sort().values
        self.batch = max(1, min(trainer.bn_batch, len(self.indices)))
        self.last: dict[str, Any] | None = None
        trainer.hooks.epoch_end.append(self._epoch_end)

    def _epoch_end(self, trainer: Trainer, epoch: int) -> None:
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


class LayerDistance:
    """||w_t - w_0|| of each layer at the trainer's distance points (measured on the device, read at log points)."""

    def __init__(self, trainer: Trainer) -> None:
        names = [n for n, p in trainer.net.named_parameters() if p.requires_grad]
        layers = [n.rsplit(".", 1)[0] if "." in n else n for n in names]
        self.layers = list(dict.fromkeys(layers))
        index = {name: i for i, name in enumerate(self.layers)}
        self.owner = torch.tensor([index[lay] for lay in layers])
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.t = trainer

    def measure(self, step: int) -> None:
        t = self.t
        with torch.no_grad():
            diffs = torch._foreach_sub(t.params, t.w0)
            sq = torch.stack(torch._foreach_norm(diffs)).square()
            per_layer = torch.zeros(len(self.layers), device=sq.device).index_add_(0, self.owner.to(sq.device), sq)
        self.pending.append((step, per_layer.sqrt()))

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([v for _, v in self.pending]).tolist()  # one host read for all of them
        for (step, _), row in zip(self.pending, values):
            self.t.tb.scalars(step, {f"weights/distance/{name}": v for name, v in zip(self.layers, row)})
        self.pending = []


def _finite(v: Any) -> Any:
    return v if v is None or (isinstance(v, float) and math.isfinite(v)) else None


def attach(trainer: Trainer) -> dict[str, Any]:
    """The instruments a run's config asks for, attached to `trainer` (name -> probe)."""
    cfg = trainer.cfg
    probes: dict[str, Any] = {}
    if cfg.gns:
        probes["gns"] = GNSProbe(trainer)
    s = cfg.sharpness
    if s.every_epochs:
        probes["sharpness"] = SharpnessProbe(trainer, s.every_epochs, s.samples, s.iters, s.trace_samples)
    if cfg.layer_distance:
        probes["layer_distance"] = LayerDistance(trainer)
    return probes
