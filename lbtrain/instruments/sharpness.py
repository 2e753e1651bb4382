"""The `sharpness` instrument: curvature of the training loss along training, defined so that values compare across
batch sizes, and the edge of stability.

When (any combination; each update is measured at most once): `sharpness.every_epochs=N` at every N-th epoch end,
`sharpness.every_steps=N` after every N-th update, `sharpness.per_decade=K` at K log-spaced updates per decade
(`lbtrain.metrics.log_spaced_steps`: every update up to 10, then K per decade); and always at the run's last update.
`measure()` measures at the current weights outside of any hook too (`lbtrain-measure`).

Definitions (all recorded in results.json under `sharpness.definition`):
* The loss L(w): mean cross-entropy (no weight decay term) over a fixed set of training samples - the first
  floor(samples / bn_batch) * bn_batch of `sharpness.samples` samples drawn with a fixed seed (SHARPNESS_SEED, the
  same set for every run on the same training set), without augmentation, dropout off - split into consecutive
  batches of `sharpness.bn_batch` samples, L the mean of the batch losses.
* BatchNorm (`sharpness.bn`): `train` (default) normalizes each of those batches over itself, i.e. over
  `bn_batch` samples whatever the run's batch, ghost batch or micro-batch (ghost BN layers are set to one ghost
  batch for the measurement); `eval` uses the running statistics (PyHessian's choice, Yao et al. 2020; averaged
  over ranks under DDP), a fixed function of each sample, `bn_batch` then only sizes the chunks. Running
  statistics, modes and random streams are restored. The BN batch is fixed (default `${base.batch}`, the recipe's
  small batch B_S, the same for every batch size of a sweep) because it changes the numbers by itself. Measured on
  digits at the end of its recipe (384 updates, 1024 samples, 100 probes), at the same weights: bn_batch 16 / 128 /
  1024 give lambda_max 0.356 / 0.223 / 0.215 and trace 7.47 / 3.83 / 3.33 (+-0.2), and `eval` 0.696 (1.96x).
* lambda_max, lambda_2..k (`sharpness.top_k`): the largest algebraic eigenvalues of the Hessian of L, Lanczos
  (`sharpness.iters` steps at most, relative residual tolerance 1e-3; top_k > 1 with full reorthogonalisation,
  memory `iters` parameter-sized vectors).
* trace: Hutchinson's estimate with `sharpness.trace_samples` Rademacher probes and its standard error (sample
  standard deviation of the per-probe z^T H z over sqrt(probes)). The probes (and the Lanczos start) are drawn
  afresh at every measurement from a generator seeded with (SHARPNESS_SEED, update): the same update at the same
  weights gives the same numbers bit for bit (a run and `lbtrain-measure` on its checkpoint), while successive
  measurements do not share one draw of the probes, whose sampling error would otherwise sit in every standard
  error of the run. (The old scheme, the same 10 probes at every measurement, reported 0.66x-0.97x the true
  standard error at six points of a digits run, 0.47x at one point with 256 samples: never above; at 10 probes the
  sample standard deviation is also biased low and +-24% noisy, and +-1.96 SE covers ~92% for Gaussian z^T H z,
  less when skewed. The formula itself was right: against dense Hessians its median is 0.97x the exact standard
  error.)
* batch sharpness (Andreyev & Beneventano 2024, "Edge of Stochastic Stability"): the mean over
  `sharpness.batch_batches` fixed mini-batches of g_B^T H_B g_B / |g_B|^2, g_B and H_B the gradient and Hessian of
  the mini-batch loss as the run descends it: the run's own batch at that update (distinct samples:
  batch / duplicates), each drawn without replacement with a fixed seed (SHARPNESS_SEED + 1: the same batches at
  every measurement while the batch size is the same), no augmentation; with `bn=train` BN normalizes each of the
  run's BN groups (its ghost batch, micro-batch or per-process share) over itself, as in training; with
  `bn=eval` on the running statistics. Andreyev & Beneventano find that under SGD it settles near 2/lr while
  lambda_max stays below.
* the edge of stability (Cohen et al. 2021): under full-batch GD lambda_max rises to 2/lr and hovers there (on
  digits, a BN network with weight decay, it rises to 2/lr and is knocked back by a catapult, periodically); with
  heavy-ball momentum m the threshold is 2(1+m)/lr (Nesterov: 2(1+m)/(lr (1+2m))). Logged beside each
  measurement for SGD, from the LR of the update that produced the weights (`plan.lr_at(update - 1)`) and the
  run's momentum; the optimizer's L2 weight decay adds `weight_decay` to every eigenvalue of the objective it
  descends (not included in the loss above), and gradient clipping shortens the step (thresholds then do not
  apply). Not logged for AdamW / LARS / LAMB, whose thresholds concern a preconditioned Hessian.

TensorBoard (step = update): sharpness/lambda_max, sharpness/lambda_2.. (top_k > 1), sharpness/trace,
sharpness/trace_stderr, sharpness/batch_sharpness, sharpness/batch_sharpness_stderr, sharpness/two_over_lr,
sharpness/two_over_lr_momentum. results.json: the last measurement, its definition, the number of measurements.

Cost per measurement: (Lanczos steps + probes) HVPs over the fixed samples (one BN batch's graph at a time; an HVP
costs ~2 forward-backward passes) plus a gradient and an HVP over each of batch_batches training batches. Measured
with the defaults on one CPU thread (a shared 2-core machine): digits (35k parameters, bn_batch 16, so 64 batches;
10 Lanczos steps + 30 probes + 8 batches of 16) 4.3 s; F1/MNIST (1.46M parameters, bn_batch 128: 8 batches) 17.9 s;
digits at full batch with bn_batch 1536, no trace, one batch (the edge-of-stability run) 0.36 s.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from lbtrain.distributed import all_reduce_sum
from lbtrain.ghost_bn import set_ghost_batch
from lbtrain.instruments.base import Run
from lbtrain.instruments.common import untouched
from lbtrain.instruments.hessian import gradient_curvature, hutchinson_trace, top_eigenvalue, top_eigenvalues
from lbtrain.metrics import log_spaced_steps

SHARPNESS_SEED = 12345  # the fixed sample set; SHARPNESS_SEED + 1 the batch-sharpness batches
LANCZOS_TOL = 1e-3  # relative Ritz residual at which Lanczos stops


def probe_seed(update: int) -> int:
    """Seed of the Lanczos start and the Hutchinson probes of the measurement at `update`: a fresh draw per
    measurement, the same draw for the same update (a run and lbtrain-measure on its checkpoint)."""
    return SHARPNESS_SEED * 2**32 + int(update)


def eos_thresholds(optimizer: str, lr: float, momentum: float, nesterov: bool) -> dict[str, float] | None:
    """The stability thresholds of SGD at this LR and momentum on a quadratic (Cohen et al. 2021): 2/lr for plain
    gradient descent, 2(1+m)/lr with heavy-ball momentum m (PyTorch's SGD), 2(1+m)/(lr (1+2m)) with Nesterov's.
    None for the other optimizers (or lr <= 0)."""
    if optimizer != "sgd" or not lr > 0:
        return None
    m = float(momentum)
    with_m = 2 * (1 + m) / (lr * (1 + 2 * m)) if nesterov else 2 * (1 + m) / lr
    return {"two_over_lr": 2 / lr, "two_over_lr_momentum": with_m}


class SharpnessProbe:
    """lambda_max (top-k), the Hessian trace and the batch sharpness at the configured updates; see the module
    docstring for the definitions. `measure()` measures now (usable outside of hooks)."""

    def __init__(self, trainer: Run, node: Any) -> None:
        self.t = trainer
        opt = lambda key, default: getattr(node, key, default) or default  # (a node recorded before a key existed)
        self.every_epochs, self.every_steps, self.per_decade = (int(opt(k, 0)) for k in
                                                                ("every_epochs", "every_steps", "per_decade"))
        self.bn = str(opt("bn", "train"))
        self.top_k, self.iters = int(opt("top_k", 1)), int(node.iters)
        self.trace_samples, self.batch_batches = int(node.trace_samples), int(opt("batch_batches", 0))
        n = len(trainer.train_loader)
        drawn = torch.randperm(n, generator=torch.Generator().manual_seed(SHARPNESS_SEED))[: min(node.samples, n)]
        self.batch = max(1, min(int(opt("bn_batch", trainer.bn_batch)), len(drawn)))
        self.batches = len(drawn) // self.batch  # whole BN batches (a partial one would normalize over fewer)
        self.indices = drawn.sort().values[: self.batches * self.batch]
        self.decade_steps = log_spaced_steps(trainer.target_updates, self.per_decade) if self.per_decade else set()
        self.last: dict[str, Any] | None = None
        self.count = 0
        self._measured_at: int | None = None
        if self.every_epochs:
            trainer.hooks.epoch_end.append(self._epoch_end)
        if self.every_steps or self.per_decade:
            trainer.hooks.step_end.append(self._step_end)

    # ------------------------------------------------------------------------------------------------ cadence
    def _epoch_end(self, trainer: Run, epoch: int) -> None:
        final = trainer.state.step >= trainer.target_updates
        if (final or (epoch + 1) % self.every_epochs == 0) and self._measured_at != trainer.state.step:
            self.measure()

    def _step_end(self, trainer: Run) -> None:
        step = trainer.state.step  # plain ints: no host read unless a measurement is due
        due = (self.every_steps and step % self.every_steps == 0) or step in self.decade_steps
        if (due or step >= trainer.target_updates) and self._measured_at != step:
            self.measure()

    # -------------------------------------------------------------------------------------------- definition
    def definition(self) -> dict[str, Any]:
        """What is measured, as results.json records it (fixed by the config; the batch of the batch sharpness,
        which follows the run's batch schedule, is recorded with each measurement)."""
        return {"loss": "mean cross-entropy of the fixed samples' BN batches (no weight decay, no augmentation, "
                        "dropout off)",
                "bn": self.bn, "bn_batch": self.batch, "samples": len(self.indices), "batches": self.batches,
                "sample_seed": SHARPNESS_SEED, "top_k": self.top_k, "lanczos_iters": self.iters,
                "lanczos_tol": LANCZOS_TOL, "reorthogonalisation": "full" if self.top_k > 1 else "local",
                "trace": "Hutchinson, Rademacher probes; stderr = sd(z^T H z, ddof=1) / sqrt(probes)",
                "trace_probes": self.trace_samples, "probe_seed": "SHARPNESS_SEED * 2**32 + update",
                "batch_sharpness": "mean over fixed mini-batches of the run's batch of g_B^T H_B g_B / |g_B|^2",
                "batch_batches": self.batch_batches, "batch_seed": SHARPNESS_SEED + 1,
                "batch_bn_batch": self.t.bn_batch if self.bn == "train" else None,
                "thresholds": "SGD: 2/lr and 2(1+m)/lr (Nesterov 2(1+m)/(lr(1+2m))), lr = plan.lr_at(update - 1)"}

    # ------------------------------------------------------------------------------------------- measuring
    @contextlib.contextmanager
    def _bn_mode(self) -> Iterator[None]:
        """The measurement's modes inside `untouched` (which restores modes and buffers): dropout off; BN in train
        mode with ghost BN set to one ghost batch (each forward's batch is one BN group), or in eval mode on the
        running statistics (rank-averaged under DDP)."""
        t = self.t
        net = t.net
        net.eval()
        ghost = t.plan.ghost_batch if self.bn == "train" else None
        if self.bn == "train":
            for m in net.modules():
                if isinstance(m, _BatchNorm):
                    m.train()
        elif t.dist.enabled:
            with torch.no_grad():
                for b in net.buffers():
                    if b.is_floating_point():
                        all_reduce_sum(b).div_(t.dist.world)
        if ghost:
            set_ghost_batch(net, None)
        try:
            yield
        finally:
            if ghost:
                set_ghost_batch(net, ghost)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.t.net(x)  # (no autocast: in the parameters' precision, at least float32)
        return F.cross_entropy(out.to(torch.promote_types(out.dtype, torch.float32)), y)

    def measure(self, batches: int | None = None) -> dict[str, Any]:
        """Measure at the current weights (update `run.state.step`), log the TensorBoard scalars at that update and
        return the measurement (also what `results()` gives from now on). `batches`: mini-batches of the batch
        sharpness (default `sharpness.batch_batches`; `lbtrain-measure --batches N`)."""
        t = self.t
        step = int(t.state.step)
        nb = self.batch_batches if batches is None else int(batches)
        start = time.perf_counter()
        x, y = t.train_loader.samples(self.indices)
        b = self.batch
        closures = [lambda i=i: self._loss(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(self.batches)]
        device = t.params[0].device
        with untouched(t.net, t.device), self._bn_mode():
            gen = torch.Generator(device=device).manual_seed(probe_seed(step))
            if self.top_k > 1:
                top = top_eigenvalues(closures, t.params, k=self.top_k, iters=self.iters, tol=LANCZOS_TOL,
                                      generator=gen)
            else:
                top = top_eigenvalue(closures, t.params, iters=self.iters, tol=LANCZOS_TOL, generator=gen)
                top["eigenvalues"] = [top["lambda_max"]]
            trace = (hutchinson_trace(closures, t.params, samples=self.trace_samples, generator=gen)
                     if self.trace_samples else {"trace": None, "stderr": None, "hvps": 0})
            bsharp = self._batch_sharpness(step, nb) if nb else None
        hvps = top["hvps"] + trace["hvps"] + (bsharp["hvps"] if bsharp else 0)
        seconds = time.perf_counter() - start
        lr = t.plan.lr_at(max(step - 1, 0))
        cfg = t.cfg
        eos = eos_thresholds(str(cfg.optimizer.name), lr, t.plan.momentum, bool(cfg.base.nesterov))
        self.last = {"lambda_max": top["lambda_max"], "eigenvalues": top["eigenvalues"],
                     "lanczos_converged": top["converged"], "lanczos_iters": top["iters"],
                     "trace": trace["trace"], "trace_stderr": _finite(trace["stderr"]),
                     "trace_probes": self.trace_samples,
                     "batch_sharpness": bsharp["value"] if bsharp else None,
                     "batch_sharpness_stderr": _finite(bsharp["stderr"]) if bsharp else None,
                     "batch_sharpness_batch": bsharp["batch"] if bsharp else None,
                     "batch_sharpness_batches": nb,
                     "lr": lr, "momentum": t.plan.momentum, **(eos or {"two_over_lr": None,
                                                                   "two_over_lr_momentum": None}),
                     "hvps": hvps, "seconds": round(seconds, 3), "update": step,
                     "samples": len(self.indices), "batches": self.batches, "batch": self.batch,
                     "measurements": self.count + 1, "definition": self.definition()}
        self.count += 1
        self._measured_at = step
        scalars = {"sharpness/lambda_max": top["lambda_max"],
                   **{f"sharpness/lambda_{i + 1}": v for i, v in enumerate(top["eigenvalues"]) if i > 0}}
        if trace["trace"] is not None:
            scalars["sharpness/trace"] = trace["trace"]
            if self.last["trace_stderr"] is not None:
                scalars["sharpness/trace_stderr"] = self.last["trace_stderr"]
        if bsharp:
            scalars["sharpness/batch_sharpness"] = bsharp["value"]
            if self.last["batch_sharpness_stderr"] is not None:
                scalars["sharpness/batch_sharpness_stderr"] = self.last["batch_sharpness_stderr"]
        if eos:
            scalars.update({f"sharpness/{k}": v for k, v in eos.items()})
        t.tb.scalars(step, scalars)
        return self.last

    def _batch_sharpness(self, step: int, count: int) -> dict[str, Any] | None:
        """Mean over `count` fixed mini-batches of the run's batch at `step` of g_B^T H_B g_B / |g_B|^2, each
        mini-batch's loss the mean over its BN groups (the run's bn_batch samples each), fetched group by group
        (a large batch is never on the device at once)."""
        t = self.t
        n = len(t.train_loader)
        size = min(t.plan.batch_at(max(step - 1, 0)) // max(t.plan.duplicates, 1), n)
        group = max(1, min(t.bn_batch, size))
        size -= size % group
        gen = torch.Generator().manual_seed(SHARPNESS_SEED + 1)
        values, hvps = [], 0
        for _ in range(count):
            idx = torch.randperm(n, generator=gen)[:size]
            closures = [self._lazy_loss(idx[i:i + group]) for i in range(0, size, group)]
            r = gradient_curvature(closures, t.params)
            values.append(r["curvature"])
            hvps += r["hvps"]
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return None
        mean = math.fsum(finite) / len(finite)
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else None
        return {"value": mean, "stderr": sd / math.sqrt(len(finite)) if sd is not None else None, "batch": size,
                "hvps": hvps}

    def _lazy_loss(self, idx: torch.Tensor) -> Callable[[], torch.Tensor]:
        def loss() -> torch.Tensor:
            return self._loss(*self.t.train_loader.samples(idx))

        return loss

    # ------------------------------------------------------------------------------------------------ record
    def results(self) -> dict[str, Any] | None:
        return self.last

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last, "count": self.count}  # results.json is rebuilt from it after a kill

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = state.get("last")
        self.count = int(state.get("count") or (1 if self.last else 0))


def _finite(v: Any) -> Any:
    return v if v is None or (isinstance(v, float) and math.isfinite(v)) else None
