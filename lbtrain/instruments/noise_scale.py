"""The `gns` instrument (`gns=true`): the gradient noise scale B_simple at log steps (McCandlish et al. 2018), from
squared gradient norms at two batch sizes. The estimators assume the batch is made of i.i.d. units; with BatchNorm
the unit is the group BN normalizes over (a ghost batch under GBN, a micro-batch or a DDP share under plain BN),
since BN couples the samples of a group. Where the two sizes come from:
* gradient accumulation: the first micro-batch and the accumulated gradient (what the step computes anyway);
* otherwise, extra forward/backward passes at log steps only (p.grad untouched, the random state forked, BN buffers
  restored): without BN, or with ghost BN and >= 2 ghost batches, one pass on a strided part made of whole units
  (x[0::2], or x[0::d] of the ghost batches) against the step's own gradient; with plain BN over the whole batch,
  two passes on the two strided halves, each normalized over itself, giving both sizes - the noise scale of the
  model with BN over B/2 samples. Measured on digits: the half-batch pass against the full-batch gradient under
  plain BN (BN over B/2 vs B) gives negative |G|^2 estimates, i.e. BN's own batch noise counted as gradient noise;
  the two-halves way does not mix the two. Cost at the default cadence: at most one extra step's worth of passes
  every `log_every` updates (2% at 50).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lbtrain.ghost_bn import set_ghost_batch
from lbtrain.instruments.base import Run
from lbtrain.instruments.common import untouched
from lbtrain.instruments.gns import GradientNoiseScale, sq_norm


class GNSProbe:
    """Gradient noise scale at log steps; see the module docstring for where the two gradients come from."""

    def __init__(self, trainer: Run, node: Any = True, beta: float = 0.95) -> None:
        self.t = trainer
        self.ema = GradientNoiseScale(beta)
        self._small: tuple[torch.Tensor, float] | None = None
        trainer.hooks.micro_backward.append(self._micro)
        trainer.hooks.after_backward.append(self._after)
        trainer.hooks.log.append(self._log)

    def _grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.t.params]

    def _micro(self, trainer: Run, index: int, parts: int, log_now: bool) -> None:
        if log_now and parts > 1 and index == 0:
            # p.grad holds micro-batch 0's mean-loss gradient scaled by its share 1/parts of the batch
            self._small = (sq_norm(self._grads()) * parts**2, trainer.micro_batch)

    def _after(self, trainer: Run, x: torch.Tensor, y: torch.Tensor, log_now: bool) -> None:
        if not log_now:
            return
        if self._small is not None:  # micro-batch 0 vs the accumulated gradient (all-reduced under DDP)
            (small, b_small), self._small = self._small, None
            self.ema.update(small, sq_norm(self._grads()), b_small, x.shape[0] * trainer.dist.world)
            return
        measured = self._extra_passes(x, y)
        if measured is not None:
            import os
            if os.environ.get("GNS_DEBUG"):
                if trainer.dist.world == 1:
                    print("GNSDBG-x04", float(self._grad_sq(x[0::4], y[0::4])), flush=True)
                else:
                    print("GNSDBG-loc", trainer.dist.rank, float(self._grad_sq(x[0::2], y[0::2])), float(self._grad_sq(x[0::2], y[0::2])), flush=True)
                print("GNSDBG", trainer.dist.rank, trainer.state.step, float(measured[0]), float(measured[1]), measured[2], measured[3], flush=True)
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
        if not t.has_batchnorm:
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

    def _log(self, trainer: Run, scalars: dict[str, float]) -> None:
        values = self.ema.values()  # one host read, at the log step
        trainer.tb.scalars(trainer.state.step, {f"gns/{k}": v for k, v in values.items() if v is not None})

    def results(self) -> dict[str, Any]:
        return {**self.ema.values(), "beta": self.ema.beta}

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.ema.load_state_dict(d)
