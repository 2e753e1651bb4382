"""The `gns` instrument (`gns=true`; options `gns_options.bn=train|eval`, `gns_options.beta`): the gradient noise
scale B_simple at log steps (McCandlish et al. 2018), from squared gradient norms at two batch sizes, corrected for
sampling without replacement from the run's N = `plan.train_size` training samples, with Fieller's interval (see
`lbtrain.instruments.gns`). The estimators assume the batch is made of i.i.d. units.

`gns_options.bn=train` (default) measures the model as trained. With BatchNorm the unit is then the group BN
normalizes over (a ghost batch under GBN, a micro-batch or a DDP share under plain BN), since BN couples the
samples of a group; where the two sizes come from:
* under DDP: each rank's local gradient (B_small = the per-rank batch, |g_r|^2 averaged over ranks) against the
  all-reduced one (B_big = the global batch), at no extra pass: the local gradient's squared norm is taken inside
  a DDP communication hook, before the all-reduce overwrites it (a per-rank share is always whole units);
* gradient accumulation in one process: each micro-batch's gradient (the difference of the accumulated gradient
  before and after it; |g_m|^2 averaged over micro-batches) against the accumulated gradient;
* otherwise, extra forward/backward passes at log steps only (p.grad untouched, the random state forked, BN
  buffers restored): without BN, or with ghost BN and >= 2 ghost batches, the d strided parts x[j::d] made of
  whole units (d = 2, or the smallest divisor >= 2 of the number of ghost batches), |g_j|^2 averaged over the
  parts, against the step's own gradient; with plain BN over the whole batch, the two strided halves, each
  normalized over itself, giving both sizes - the noise scale of the model with BN over B/2 samples, the model
  that two DDP ranks train. Measured on digits: the half-batch pass against the full-batch gradient under plain BN
  (BN over B/2 vs B) gives negative |G|^2 estimates, i.e. BN's own batch noise counted as gradient noise.
The parts are the ranks' shares (rank r of W holds x[r::W]), so 2 ranks and one process measure the same numbers
(up to float rounding) whenever d = W.

`gns_options.bn=eval` measures the model with BN in eval mode (running statistics, averaged over ranks as
`sync_buffers` would): a fixed function of each sample, so per-example gradients and B_simple are well defined and
comparable across batch sizes and regimes, at the price of not being the function trained. The units are single
samples; the batch is split into d = max(2, micro-batches) strided parts (each part's gradient in one pass), or,
under DDP, into the ranks' shares (each rank's gradient all-reduced once at the log step). Without BN it is the
`train` measurement.

After the fact (`lbtrain-measure RUN gns [--batches N]`, `measure()`): at a checkpoint's weights, N (16) batches of
the run's batch size at that update, each drawn without replacement from the training set with a fixed seed
(MEASURE_SEED: the same batches at every checkpoint of runs on the same training set), without augmentation; each
batch is one measurement through the code above (micro-batches against their mean, the strided parts against the
batch's gradient, or `bn=eval`'s parts, in one process), folded into a fresh estimator with the run's beta. The
record names the batches (seed, count, size, a SHA-256 of their indices).

Cost at the default cadence: at most one extra step's worth of passes every `log_every` updates (2% at 50); none
under DDP in `train` mode, where the comm hook adds one norm of each gradient bucket to every step (one read of
the gradients, ~1e-4 of a ResNet step's memory traffic) and one scalar all-reduce at log steps.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from lbtrain.distributed import all_reduce_sum
from lbtrain.ghost_bn import set_ghost_batch
from lbtrain.instruments.base import Run
from lbtrain.instruments.common import untouched
from lbtrain.instruments.gns import CI_LEVEL, CI_METHOD, GradientNoiseScale, sq_norm

Measured = tuple[torch.Tensor, torch.Tensor, float, float]  # (|G_small|^2, |G_big|^2, B_small, B_big)
MEASURE_SEED = 1812  # after the fact: the fixed draw of the batches (McCandlish et al., arXiv:1812.06162)
MEASURE_BATCHES = 16  # after the fact: batches per measurement, by default


def _ddp_of(model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel | None:
    model = getattr(model, "_orig_mod", model)  # (a torch.compile wrapper around the DDP one)
    return model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None


class GNSProbe:
    """Gradient noise scale at log steps; see the module docstring for where the two gradients come from."""

    def __init__(self, trainer: Run, node: Any = None) -> None:
        self.t = trainer
        bn, beta = (node.bn, node.beta) if node is not None and not isinstance(node, bool) else ("train", 0.95)
        self.bn = str(bn)
        self.eval_bn = self.bn == "eval" and trainer.has_batchnorm
        self.ema = GradientNoiseScale(beta, n=trainer.plan.train_size)
        self._small: tuple[torch.Tensor, float] | None = None  # micro-batches: mean |g_m|^2 so far, B_small
        self._prev: list[torch.Tensor] | None = None  # micro-batches: the accumulated gradient before this one
        self._local: torch.Tensor | None = None  # DDP: this rank's local |g_r|^2 of the current step
        self.ddp = _ddp_of(trainer.model) if trainer.dist.enabled else None
        if self.ddp is not None and not self.eval_bn:
            self.ddp.register_comm_hook(None, self._comm_hook)
        elif not trainer.dist.enabled:
            trainer.hooks.micro_backward.append(self._micro)
        trainer.hooks.after_backward.append(self._after)
        trainer.hooks.log.append(self._log)

    def _grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.t.params]

    # ---------------------------------------------------------------------------------------- the two sizes
    def _comm_hook(self, state, bucket):  # (unannotated: DDP checks the annotations, which are strings here)
        """DDP communication hook: |local gradient|^2 of this bucket (DDP hands the hook the rank's own summed
        gradients, before the default hook divides by the world size and all-reduces), then the default."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        sq = torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32).square()
        self._local = sq if self._local is None else self._local + sq
        return allreduce_hook(state, bucket)

    def _micro(self, trainer: Run, index: int, parts: int, log_now: bool) -> None:
        if not (log_now and parts > 1) or self.eval_bn:
            return
        # p.grad holds the sum over micro-batches 0..index of their mean-loss gradients, each scaled by 1/parts:
        # micro-batch `index` alone is p.grad minus what it held before (norms per parameter: no full-size temp)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(self._grads(), trainer.params)]
        if self._prev is None:
            sq = sq_norm(grads)
        else:
            sq = torch.stack([torch.linalg.vector_norm(g - q, dtype=torch.float32) for g, q in
                              zip(grads, self._prev)]).square().sum()
        sq = sq * parts**2
        total = sq if self._small is None else self._small[0] + sq
        self._small = (total, float(trainer.micro_batch))
        self._prev = [g.detach().clone() for g in grads] if index < parts - 1 else None
        if index == parts - 1:
            self._small = (total / parts, float(trainer.micro_batch))

    def _after(self, trainer: Run, x: torch.Tensor, y: torch.Tensor, log_now: bool) -> None:
        local, self._local = self._local, None  # (the hook runs on every step; read at log steps)
        if not log_now:
            return
        if self.eval_bn:
            measured = self._eval_passes(x, y)
        elif self.ddp is not None:
            measured = self._ddp_pair(local, x.shape[0])
        elif self._small is not None:  # the micro-batches vs the accumulated gradient
            (small, b_small), self._small = self._small, None
            measured = small, sq_norm(self._grads()), b_small, float(x.shape[0])
        else:
            measured = self._extra_passes(x, y)
        if measured is not None:
            self.ema.update(*measured)

    def _ddp_pair(self, local: torch.Tensor | None, n: int) -> Measured | None:
        """Mean over ranks of the local |g_r|^2 (B_small = n per rank) vs the all-reduced gradient (B_big = n W)."""
        if local is None:  # (no all-reduce happened in this step's backward: nothing to pair)
            return None
        world = self.t.dist.world
        small = all_reduce_sum(local.reshape(1).clone())[0] / world  # one scalar all-reduce, at log steps only
        return small, sq_norm(self._grads()), float(n), float(n * world)

    def _extra_passes(self, x: torch.Tensor, y: torch.Tensor) -> Measured | None:
        """(|G_small|^2, |G_big|^2, B_small, B_big) from extra passes that leave training untouched (one process).

        The units that are i.i.d. draws are the groups BatchNorm normalizes over: single samples without BN, ghost
        batches with ghost BN. The small gradients are taken over the d strided parts x[j::d], each made of whole
        units (d = 2 without BN, else the smallest divisor >= 2 of the number of ghost batches), |g_j|^2 averaged
        over the parts; the big one is the step's own gradient (the mean of the parts' gradients). With plain
        BatchNorm over the whole batch (or a single ghost batch) no part of the batch is a whole unit: the batch is
        split into its two strided halves, each normalized over itself, and both gradients come from them (small:
        the mean of the halves' |g|^2; big: |mean of the halves' g|^2). That measures the noise scale of the model
        with BN over B/2 samples: unbiased for that model, and the honest reading of B_simple under plain BN."""
        t = self.t
        n = x.shape[0]
        if n < 2:
            return None
        ghosts = n // t.plan.ghost_batch if t.plan.ghost_batch else 1
        d = 2 if not t.has_batchnorm else next((k for k in range(2, ghosts + 1) if ghosts % k == 0), None)
        if d is not None and n % d == 0:
            small = torch.stack([self._grad_sq(x[j::d], y[j::d]) for j in range(d)]).mean()
            return small, sq_norm(self._grads()), float(n // d), float(n)
        if d is not None:  # (an odd batch without BN: one part against the step)
            return self._grad_sq(x[0::2], y[0::2]), sq_norm(self._grads()), float(len(x[0::2])), float(n)
        m = n - n % 2
        plain = set_ghost_batch(t.net, None) if t.plan.ghost_batch else 0  # one ghost batch = plain BN
        try:
            ga, gb = self._grads_of(x[0:m:2], y[0:m:2]), self._grads_of(x[1:m:2], y[1:m:2])
        finally:
            if plain:
                set_ghost_batch(t.net, t.plan.ghost_batch)
        small = (sq_norm(ga) + sq_norm(gb)) / 2
        big = sq_norm([(a + b) / 2 for a, b in zip(ga, gb)])
        return small, big, float(m // 2), float(m)

    def _eval_passes(self, x: torch.Tensor, y: torch.Tensor) -> Measured | None:
        """`bn=eval`: gradients with BN on its running statistics (rank-averaged), single samples as the units.
        One process: the d = max(2, micro-batches) strided parts; DDP: the ranks' shares (each in micro-batches)."""
        t = self.t
        n, world = x.shape[0], t.dist.world
        parts = n // (t.micro_batch or n)
        d = 1 if t.dist.enabled else max(2, parts)
        m = n - n % d
        if m < d:
            return None
        with untouched(t.net, t.device):  # restores the modes and the buffers changed below
            for mod in t.net.modules():
                if isinstance(mod, _BatchNorm):
                    mod.eval()
            if t.dist.enabled:  # the function one process would evaluate: the rank-averaged running statistics
                with torch.no_grad():
                    for b in t.net.buffers():
                        if b.is_floating_point():
                            all_reduce_sum(b).div_(world)
                chunks = max(parts, 1)
                local = self._mean_grads([self._grads_of(x[j::chunks], y[j::chunks]) for j in range(chunks)])
                small = all_reduce_sum(sq_norm(local).reshape(1))[0] / world
                flat = all_reduce_sum(torch.cat([g.reshape(-1).float() for g in local])) / world
                return small, sq_norm([flat]), float(n), float(n * world)
            grads = [self._grads_of(x[j:m:d], y[j:m:d]) for j in range(d)]
        small = torch.stack([sq_norm(g) for g in grads]).mean()
        return small, sq_norm(self._mean_grads(grads)), float(m // d), float(m)

    @staticmethod
    def _mean_grads(grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.stack(gs).mean(0) for gs in zip(*grads)]

    def _grads_of(self, xs: torch.Tensor, ys: torch.Tensor) -> list[torch.Tensor]:
        t = self.t
        with untouched(t.net, t.device), t.autocast:
            loss = F.cross_entropy(t.net(xs).float(), ys)
            grads = torch.autograd.grad(loss, t.params, allow_unused=True)
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, t.params)]

    def _grad_sq(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return sq_norm(self._grads_of(xs, ys))

    # ------------------------------------------------------------------------------------ after the fact
    def measure(self, batches: int = MEASURE_BATCHES) -> dict[str, Any]:
        """B_simple at the current weights from `batches` fixed batches (see the module docstring: after the fact);
        p.grad, the random streams, buffers and modes are as before afterwards."""
        t = self.t
        if not isinstance(batches, int) or batches < 1:
            raise ValueError(f"batches must be an integer >= 1, got {batches!r}")
        step, n = t.state.step, len(t.train_loader)
        size = min(t.plan.batch_at(max(step - 1, 0)), n)  # the batch the run trained at, up to this update
        gen = torch.Generator().manual_seed(MEASURE_SEED)
        est = GradientNoiseScale(self.ema.beta, n=self.ema.n)
        saved = [p.grad for p in t.params]
        drawn = []
        try:
            with untouched(t.net, t.device):
                t.net.train()
                for _ in range(batches):
                    idx = torch.randperm(n, generator=gen)[:size]
                    drawn.append(idx)
                    measured = self._measure_batch(*t.train_loader.samples(idx))
                    if measured is not None:
                        est.update(*measured)
        finally:
            for p, g in zip(t.params, saved):
                p.grad = g
        self.ema = est  # results() reads it
        keys = ("b_simple", "b_simple_uncorrected", "b_simple_lo", "b_simple_hi", "trace_cov", "grad_norm_sq",
                "grad_norm_sq_uncorrected")
        values = est.values()
        t.tb.scalars(step, {f"gns/{k}": values[k] for k in keys if values[k] is not None})
        digest = hashlib.sha256(torch.stack(drawn).to(torch.int64).numpy().tobytes()).hexdigest()
        return {**self.results(), "update": step, "n_eff": values["n_eff"],
                "batches": {"count": batches, "size": size, "seed": MEASURE_SEED, "indices_sha256": digest,
                            "augmented": False}}

    def _measure_batch(self, x: torch.Tensor, y: torch.Tensor) -> Measured | None:
        """One measurement on one batch, as a training step on it would give it in one process."""
        t = self.t
        if self.eval_bn:
            return self._eval_passes(x, y)
        n = x.shape[0]
        parts = n // (t.micro_batch or n)
        if parts > 1:  # each micro-batch (strided, as train_step splits) against the accumulated gradient
            grads = [self._grads_of(x[j::parts], y[j::parts]) for j in range(parts)]
            small = torch.stack([sq_norm(g) for g in grads]).mean()
            return small, sq_norm(self._mean_grads(grads)), float(n // parts), float(n)
        for p, g in zip(t.params, self._grads_of(x, y)):  # the step's gradient, where the run's passes read it
            p.grad = g
        return self._extra_passes(x, y)

    # ------------------------------------------------------------------------------------------- reporting
    def _log(self, trainer: Run, scalars: dict[str, float]) -> None:
        values = self.ema.values()  # one host read, at the log step
        keys = ("b_simple", "b_simple_uncorrected", "b_simple_lo", "b_simple_hi", "trace_cov", "grad_norm_sq",
                "grad_norm_sq_uncorrected")
        trainer.tb.scalars(trainer.state.step, {f"gns/{k}": values[k] for k in keys if values[k] is not None})

    def results(self) -> dict[str, Any]:
        v = self.ema.values()
        measurements = v.pop("measurements")
        lo, hi = v.pop("b_simple_lo"), v.pop("b_simple_hi")
        return {**v, "b_simple_ci": [lo, hi], "ci_level": CI_LEVEL, "ci_method": CI_METHOD,
                "measurements": int(measurements or 0), "train_size": self.ema.n, "bn": self.bn,
                "beta": self.ema.beta}

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.ema.load_state_dict(d)
