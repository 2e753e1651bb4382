"""The one training loop: plan, step, evaluate, log, checkpoint. Read top to bottom, it is what a run does."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from lbtrain import distributed
from lbtrain.checkpoint import CheckpointError, atomic_write_json, load_checkpoint, save_checkpoint
from lbtrain.config import ConfigError
from lbtrain.data import load_dataset, make_loaders
from lbtrain.ghost_bn import apply_deferred_stats, convert_to_ghost_bn, defer_running_stats
from lbtrain.metrics import fit_log, log_spaced_steps, weight_distance
from lbtrain.models import build_model
from lbtrain.regime import Plan, make_plan
from lbtrain.tb import TBLogger

log = logging.getLogger("lbtrain")

# Config keys a checkpoint must agree on before it is resumed (else it belongs to another run).
_FINGERPRINT = ("name", "dataset.name", "model", "batch", "seed", "regime.name")


class Interrupted(BaseException):
    """SIGTERM/SIGINT: the run checkpointed and stopped. A BaseException so a multirun stops too."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this machine; use device=cpu or auto")
    return torch.device(name)


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def _fingerprint(cfg: Any) -> dict[str, Any]:
    return {k: OmegaConf.to_container(OmegaConf.select(cfg, k), resolve=True)
            if OmegaConf.is_config(OmegaConf.select(cfg, k)) else OmegaConf.select(cfg, k) for k in _FINGERPRINT}


class Trainer:
    def __init__(self, cfg: Any, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist = distributed.env_world()
        self.device = pick_device(cfg.device, self.dist.local_rank)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg, dev = self.cfg, self.device
        self.dist = distributed.init(dev)
        set_determinism(cfg.seed, cfg.deterministic)
        data = load_dataset(cfg.dataset)  # not kept: on CUDA the loaders hold it, on the device
        self.train_loader, self.val_loader = make_loaders(
            data, device=dev, seed=cfg.seed, channels_last=cfg.channels_last)
        self.plan: Plan = make_plan(cfg, len(self.train_loader), self.dist.world)

        try:
            model = build_model(cfg.model, data.num_classes, data.input_shape)
        except ValueError as e:  # unknown model option or shape: a config mistake
            raise ConfigError("model", OmegaConf.to_container(cfg.model), str(e)) from None
        if self.plan.ghost_batch:
            model = convert_to_ghost_bn(model, self.plan.ghost_batch)
        model = model.to(dev, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
        self.net = model  # the plain module: checkpoints and the weight distance use it
        self.params = [p for p in model.parameters() if p.requires_grad]
        b = cfg.base
        self.opt = torch.optim.SGD(self.params, lr=self.plan.lr, momentum=b.momentum, weight_decay=b.weight_decay,
                                   nesterov=b.nesterov, fused=dev.type == "cuda" or None)
        # Read on every update: plain attributes, not config lookups (~10-25 us each).
        self.micro_batch, self.grad_clip = cfg.micro_batch, b.grad_clip
        self.log_every, self.diverge_loss = cfg.log_every, cfg.diverge_loss
        self.every_steps = cfg.checkpoint.every_steps
        self.num_classes, self.input_shape = data.num_classes, data.input_shape
        self.w0 = [p.detach().clone() for p in self.params]
        self.autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision.name == "bf16")

        # Run state (all of it goes into the checkpoint).
        self.step = 0
        self.epochs_done = 0  # epochs whose end (distance, validation) has been handled
        self.best_val_error = math.inf
        self.last_val: dict[str, float] = {}
        self.distances: list[tuple[int, float]] = []
        self._pending: list[tuple[int, torch.Tensor]] = []  # distances measured but not yet read
        self.wall = 0.0
        self.images = 0
        self._zero_accumulators()
        self.status = "running"

        per_rank = cfg.batch // self.dist.world
        # Accumulating: ghost BN running stats get the one update of the whole step after the last micro-batch.
        self.deferred_bn = defer_running_stats(model) if self.micro_batch and self.plan.ghost_batch else []
        self.bn_batch = self.plan.ghost_batch or (self.micro_batch or per_rank)
        if not self.plan.ghost_batch and self.bn_batch < cfg.batch and _has_batchnorm(model):
            log.warning("BatchNorm statistics are computed over %d samples (%s), not the batch of %d: this acts like "
                        "ghost batch norm of that size. Recorded as bn_batch in results.json.", self.bn_batch,
                        "micro_batch" if self.micro_batch else "the per-process share", cfg.batch)
        self.resumed_from = self._maybe_resume()
        self.model = model
        if self.dist.enabled:
            # Buffers are not broadcast from rank 0: each rank updates BN running stats from its own (ghost)
            # batches and sync_buffers() averages them, which equals the single-process statistics exactly
            # because the running-stat update is affine in the batch statistics.
            with warnings.catch_warnings():  # torch advises keeping broadcast_buffers=False for rank-local buffers
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.distance_steps = log_spaced_steps(self.plan.total_updates)
        if not self.resumed_from and self.dist.main:
            # a run killed before its first checkpoint starts over: its points would otherwise be duplicated
            for stale in self.run_dir.glob("events.out.tfevents.*"):
                log.info("starting over: removing %s of an earlier attempt without a checkpoint", stale.name)
                stale.unlink()
        self.tb = TBLogger(self.run_dir, enabled=self.dist.main,
                           purge_step=self.step + 1 if self.resumed_from else None)

    def _zero_accumulators(self) -> None:
        z = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.acc_loss, self.acc_correct, self.acc_n = z(), z(), z()
        self.grad_norm = z()

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "epochs_done": self.epochs_done,
            "w0": self.w0,
            "best_val_error": self.best_val_error,
            "last_val": self.last_val,
            "distances": self.distances,
            "wall": self.wall,
            "images": self.images,
            "accumulators": [self.acc_loss, self.acc_correct, self.acc_n, self.grad_norm],
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "fingerprint": _fingerprint(self.cfg),
            "plan": self.plan.summary(),
        }

    def sync_buffers(self) -> None:
        """Average floating-point buffers (BN running stats) over ranks; a no-op in one process."""
        if self.dist.enabled:
            for b in self.net.buffers():
                if b.is_floating_point():
                    distributed.all_reduce_sum(b).div_(self.dist.world)

    def save(self) -> None:
        self.flush_distances()
        self.sync_buffers()
        if self.dist.enabled:  # the checkpoint holds the interval's metric sums over all ranks, on rank 0
            sums = distributed.all_reduce_sum(torch.stack([self.acc_loss, self.acc_correct, self.acc_n]))
            self.acc_loss, self.acc_correct, self.acc_n = sums if self.dist.main else torch.zeros_like(sums)
        if self.dist.main:
            self.tb.flush()  # every point up to this step is on disk before the checkpoint says so
            save_checkpoint(self.ckpt_path, self._state())

    def _maybe_resume(self) -> Path | None:
        path = Path(self.cfg.resume) if self.cfg.resume else self.ckpt_path
        if not path.exists():
            if self.cfg.resume:
                raise ConfigError("resume", str(path), "no such checkpoint file")
            return None
        state = load_checkpoint(path, map_location=self.device)
        mine = _fingerprint(self.cfg)
        if state.get("fingerprint") != mine:
            theirs = state.get("fingerprint", {})
            diff = ", ".join(f"{k}={theirs.get(k)!r} (this run: {mine[k]!r})"
                             for k in mine if theirs.get(k) != mine[k])
            raise ConfigError("resume", str(path), f"checkpoint is from another run: {diff}")
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        for w, saved in zip(self.w0, state["w0"]):
            w.copy_(saved)
        self.step = state["step"]
        self.epochs_done = state["epochs_done"]
        self.best_val_error = state["best_val_error"]
        self.last_val = state["last_val"]
        self.distances = [tuple(d) for d in state["distances"]]
        self.wall, self.images = state["wall"], state["images"]
        self.acc_loss, self.acc_correct, self.acc_n, self.grad_norm = (
            t.to(self.device) for t in state["accumulators"])
        if not self.dist.main:  # rank 0 carries the sums of all ranks (see save)
            self.acc_loss, self.acc_correct, self.acc_n = (torch.zeros_like(self.acc_loss) for _ in range(3))
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        log.info("resuming %s from update %d", path, self.step)
        return path

    # ------------------------------------------------------------------ one update
    def train_step(self, x: torch.Tensor, y: torch.Tensor, want_grad_norm: bool) -> None:
        """One optimizer update on a (per-rank) batch, split into micro-batches if asked. No host sync.
        The model is in train mode (fit() sets it, and again after each evaluation)."""
        self.opt.zero_grad(set_to_none=True)
        n = x.shape[0]
        parts = n // (self.micro_batch or n)
        # Micro-batch m is the strided x[m::parts] (views), as ghost batches are strided: each ghost batch of
        # a micro-batch is then one of the whole batch, and the update equals the one without accumulation.
        chunks = [(x, y)] if parts == 1 else list(zip(x.unflatten(0, (-1, parts)).transpose(0, 1),
                                                      y.view(-1, parts).t()))
        for i, (xc, yc) in enumerate(chunks):
            # DDP: all-reduce gradients only on the last micro-batch (no_sync is one-shot: one `with` per chunk)
            sync = self.model.no_sync() if self.dist.enabled and i < len(chunks) - 1 else contextlib.nullcontext()
            with sync:
                with self.autocast:
                    out = self.model(xc)
                    loss = F.cross_entropy(out.float(), yc)
                (loss * (yc.shape[0] / n)).backward()
            self.acc_loss += loss.detach() * yc.shape[0]
            self.acc_correct += (out.argmax(1) == yc).sum()
        self.acc_n += n
        apply_deferred_stats(self.deferred_bn)
        if self.grad_clip is not None:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        elif want_grad_norm:
            self.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None],
                                                           foreach=True)
        self.opt.step()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.sync_buffers()
        self.model.eval()
        net = self.net if not self.cfg.compile else self.model
        totals = torch.zeros(3, device=self.device)  # loss sum, correct, count
        # micro_batch is what fits in memory; without it, at least the training batch does
        eval_batch = self.micro_batch or max(self.cfg.batch // self.dist.world, 256)
        for x, y in self.val_loader.eval_batches(eval_batch * self.dist.world, self.dist.rank, self.dist.world):
            with self.autocast:
                out = net(x)
            totals[0] += F.cross_entropy(out.float(), y, reduction="sum")
            totals[1] += (out.argmax(1) == y).sum()
            totals[2] += y.shape[0]
        loss, correct, count = distributed.all_reduce_sum(totals).tolist()
        self.model.train()
        return {"val/loss": loss / count, "val/error": 1.0 - correct / count}

    # ------------------------------------------------------------------ logging
    def log_train(self, interval_images: int, interval_time: float) -> float:
        """Write train/* and opt/* for the interval since the last log; returns the mean train loss."""
        acc = distributed.all_reduce_sum(torch.stack([self.acc_loss, self.acc_correct, self.acc_n]))
        # one host sync for all of it; the gradient norm is the same on every rank (gradients are all-reduced)
        loss_sum, correct, n, grad_norm = torch.cat([acc, self.grad_norm.float().reshape(1)]).tolist()
        loss = loss_sum / n
        self.flush_distances()
        self.tb.scalars(self.step, {
            "train/loss": loss,
            "train/error": 1.0 - correct / n,
            "opt/lr": self.plan.lr_at(self.step - 1),
            "opt/batch_size": self.plan.batch_at(self.step - 1),
            "opt/noise_scale": self.plan.noise_scale(self.step - 1),
            "opt/grad_norm": grad_norm,
            "perf/images_per_sec": interval_images / max(interval_time, 1e-9),
        })
        self._zero_accumulators()
        return loss

    def log_distance(self) -> None:
        """Measure ||w_t - w_0|| now, on the device; it is read (and written) at the next log point."""
        last = self._pending[-1][0] if self._pending else (self.distances[-1][0] if self.distances else None)
        if last != self.step:
            self._pending.append((self.step, weight_distance(self.params, self.w0)))

    def flush_distances(self) -> None:
        if not self._pending:
            return
        values = torch.stack([d for _, d in self._pending]).tolist()  # one host sync for all of them
        for (step, _), d in zip(self._pending, values):
            self.distances.append((step, d))
            self.tb.scalars(step, {"weights/distance": d})
        self._pending = []

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        cfg, plan = self.cfg, self.plan
        previous = self._previous_status()
        if self.resumed_from and previous in ("completed", "diverged"):
            log.info("run already %s (%d updates); nothing to do. Results: %s", previous, self.step,
                     self.run_dir / "results.json")
            return self.results(previous)
        if not self.resumed_from:
            self.tb.hparams(self.hparams())
            self.tb.scalars(0, {"weights/distance": 0.0})
            self.distances.append((0, 0.0))

        stop_signal: list[int] = []
        handlers = self._install_signal_handlers(stop_signal)
        fault = _test_fault()
        target = self._target_updates()
        bar = tqdm(total=target, initial=self.step, unit="upd", dynamic_ncols=True,
                   disable=not self._show_progress(), file=sys.stderr)
        tick, tick_images = time.perf_counter(), 0
        run_start = time.perf_counter() - self.wall
        self.model.train()
        try:
            # Invariant: a checkpoint at update s is written after everything logged for s, so a resumed
            # run purges TensorBoard points after s and re-logs nothing at or before s.
            while self.status == "running" and self.epochs_done < plan.num_epochs and self.step <= target:
                epoch = self.epochs_done
                batch = plan.batch_at_epoch(epoch)
                begin = self.step - plan.epoch_start[epoch]
                end = min(plan.epoch_start[epoch] + plan.epoch_steps[epoch], target)
                batches = self.train_loader.epoch(epoch, batch, begin, self.dist.rank, self.dist.world)
                for x, y in itertools.islice(batches, max(end - self.step, 0)):
                    nxt = self.step + 1
                    log_now = nxt % self.log_every == 0 or nxt == target
                    for g in self.opt.param_groups:
                        g["lr"] = plan.lr_at(self.step)
                    self.train_step(x, y, want_grad_norm=log_now)
                    self.step = nxt
                    tick_images += batch
                    bar.update(1)
                    if fault and fault[1] == self.step:
                        os.kill(os.getpid(), fault[0])
                    if log_now:
                        now = time.perf_counter()
                        loss = self.log_train(tick_images, now - tick)
                        self.images += tick_images
                        tick, tick_images = now, 0
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{plan.lr_at(self.step - 1):.3g}", batch=batch)
                        if not math.isfinite(loss) or loss > self.diverge_loss:
                            self._diverged(loss)
                            break
                    if self.step in self.distance_steps:
                        self.log_distance()
                    if self.step < end and self._step_checkpoint_due():
                        self.wall = time.perf_counter() - run_start
                        self.save()
                    # DDP: every rank must agree to stop, so ranks compare flags at log steps only
                    stop = (log_now and distributed.broadcast_flag(bool(stop_signal), self.device)
                            if self.dist.enabled else bool(stop_signal))
                    if stop:
                        raise Interrupted(stop_signal[0] if stop_signal else signal.SIGTERM)
                if self.status != "running":
                    break
                final = self.step >= target
                self._end_of_epoch(epoch, final)
                self.epochs_done += 1
                tick = time.perf_counter()  # evaluation time is not training throughput
                every = cfg.checkpoint.every_epochs
                if not final and ((every and self.epochs_done % every == 0) or self._step_checkpoint_due()):
                    self.wall = time.perf_counter() - run_start
                    self.save()
                if final:
                    break
            if self.status == "running":
                self.status = "completed"
            self.wall = time.perf_counter() - run_start
            self.images += tick_images
            self.save()
        except Interrupted as e:
            self.wall = time.perf_counter() - run_start
            self.images += tick_images
            self.status = "interrupted"
            self.save()
            self._write_results()
            log.warning("interrupted at update %d; checkpoint saved. Re-run the same command to resume.",
                        self.step)
            previous = handlers.get(e.signum)
            if e.signum == getattr(signal, "SIGUSR2", None) and callable(previous):
                previous(e.signum, None)  # a launcher's own handler (submitit: requeue the job), now that it is safe
            raise
        finally:
            bar.close()
            for sig, old in handlers.items():
                signal.signal(sig, old)
        self.tb.hparams(self.hparams(), end=True)
        if math.isfinite(self.best_val_error):  # a run that diverged before any evaluation has none
            self.tb.scalars(self.step, {"val/best_error": self.best_val_error})
        self.tb.close()
        return self._write_results()

    def _step_checkpoint_due(self) -> bool:
        return bool(self.every_steps) and self.step % self.every_steps == 0

    def _target_updates(self) -> int:
        total = self.plan.total_updates
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def _end_of_epoch(self, epoch: int, final: bool) -> None:
        self.log_distance()
        self.flush_distances()
        every = self.cfg.eval_every
        if final or (every and (epoch + 1) % every == 0):
            self.last_val = self.evaluate()
            self.best_val_error = min(self.best_val_error, self.last_val["val/error"])
            self.tb.scalars(self.step, self.last_val)
        if self.dist.main and not self._show_progress():
            val = f" val_err {self.last_val['val/error']:.4f}" if self.last_val else ""
            log.info("epoch %d/%d update %d/%d lr %.4g batch %d dist %.3f%s", epoch + 1, self.plan.num_epochs,
                     self.step, self._target_updates(), self.plan.lr_at(self.step - 1),
                     self.plan.batch_at(self.step - 1), self.distances[-1][1], val)

    def _diverged(self, loss: float) -> None:
        self.status = "diverged"
        self.tb.scalars(self.step, {"status/diverged": 1.0})
        log.error("diverged at update %d: train loss %s (limit diverge_loss=%g); stopping this run",
                  self.step, loss, self.cfg.diverge_loss)

    def _show_progress(self) -> bool:
        p = self.cfg.progress
        return self.dist.main and (sys.stderr.isatty() if p is None else bool(p))

    def _previous_status(self) -> str | None:
        try:
            return json.loads((self.run_dir / "results.json").read_text())["status"]
        except (OSError, ValueError, KeyError):
            return None

    def _install_signal_handlers(self, flag: list[int]) -> dict[int, Any]:
        """First SIGTERM/SIGINT/SIGUSR2: finish the step, checkpoint, exit. Second: exit at once. SIGUSR2 is
        what SLURM/submitit send before a time limit; their handler runs after the checkpoint."""

        def handler(signum: int, frame: Any) -> None:
            if flag:
                os._exit(128 + signum)
            flag.append(signum)
            log.warning("received %s: stopping after this update (send again to exit at once)",
                        signal.Signals(signum).name)

        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT, *([signal.SIGUSR2] if hasattr(signal, "SIGUSR2") else [])):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. some launchers): no preemption handling
                pass
        return old

    # ------------------------------------------------------------------ results
    def hparams(self) -> dict[str, Any]:
        c = self.cfg
        return {"experiment": c.name, "batch": c.batch, "regime": c.regime.name, "lr": self.plan.lr,
                "ghost_batch": self.plan.ghost_batch or 0, "seed": c.seed, "base_batch": c.base.batch,
                "epochs": self.plan.epochs}

    def results(self, status: str) -> dict[str, Any]:
        c, plan = self.cfg, self.plan
        first_phase_end = plan.lr_updates[1] if len(plan.lr_updates) > 1 else plan.total_updates
        early = [(t, d) for t, d in self.distances if 1 <= t <= first_phase_end]
        pts = early if len(early) >= 3 else [(t, d) for t, d in self.distances if t >= 1]
        fit = fit_log([t for t, _ in pts], [d for _, d in pts])
        e = plan.epoch_of(self.step)  # epochs done = whole epochs + the fraction of a full epoch's updates
        done_epochs = e + (self.step - plan.epoch_start[e]) / (plan.train_size // plan.batch_at_epoch(e))
        finite = lambda v: v if v is not None and math.isfinite(v) else None  # noqa: E731
        return {
            "status": status,
            "experiment": c.name,
            "dataset": c.dataset.name,
            "model": c.model.name,
            "regime": c.regime.name,
            "batch": c.batch,
            "base_batch": c.base.batch,
            "ghost_batch": plan.ghost_batch,
            "bn_batch": self.bn_batch,  # samples per BatchNorm statistic (ghost, micro-batch or per-rank batch)
            "seed": c.seed,
            "lr": plan.lr,
            "final_val_error": finite(self.last_val.get("val/error")),
            "final_val_loss": finite(self.last_val.get("val/loss")),
            "best_val_error": finite(self.best_val_error),
            "updates": self.step,
            "planned_updates": plan.total_updates,
            "epochs": round(done_epochs, 4),
            "wall_time_s": round(self.wall, 3),
            "images_per_sec": round(self.images / self.wall, 1) if self.wall > 0 else None,
            "final_distance": self.distances[-1][1] if self.distances else None,
            "distance_fit": {**fit, "points": len(pts)},
            "effective": plan.summary(),
            "world_size": self.dist.world,
            "train_size": plan.train_size,
        }

    def _write_results(self) -> dict[str, Any]:
        res = self.results(self.status)
        if self.dist.main:
            atomic_write_json(self.run_dir / "results.json", res)
        return res


def _has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _test_fault() -> tuple[int, int] | None:
    """LBTRAIN_TEST_SIGNAL=SIGKILL@37 sends that signal to this process after update 37 (tests only)."""
    spec = os.environ.get("LBTRAIN_TEST_SIGNAL")
    if not spec:
        return None
    name, _, step = spec.partition("@")
    return int(getattr(signal, name)), int(step)


def run(cfg: Any, run_dir: str | Path) -> dict[str, Any]:
    """Train one configured run into `run_dir`; failures are recorded in results.json, then re-raised."""
    trainer = Trainer(cfg, run_dir)
    try:
        trainer.setup()
    except CheckpointError as e:
        raise ConfigError("resume", str(trainer.ckpt_path), str(e)) from None
    try:
        results = trainer.fit()
    except Interrupted:
        distributed.barrier()  # every rank stops at the same update (they agreed at a log step)
        raise
    except (Exception, KeyboardInterrupt) as e:
        if trainer.dist.main:
            res = trainer.results("failed")
            res["error"] = f"{type(e).__name__}: {e}"
            atomic_write_json(trainer.run_dir / "results.json", res)
        raise
    else:
        # Ranks leave together: a process that tears down its Gloo group and exits while rank 0 still writes
        # its files can abort ("terminate called without an active exception").
        distributed.barrier()
        return results
    finally:
        distributed.shutdown()
