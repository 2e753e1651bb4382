"""The GPU path, checked and measured in one command: CUDA tests, correctness of the fast options, throughput.

lbtrain's fast path (the CUDA device-resident loader, ``precision=bf16``, ``channels_last=true``, ``compile=true``,
fused optimizers) is written for a GPU that this project only borrows now and then, for minutes. This script is
the whole visit: one command that runs within a global time budget (``--budget-s``, default 480 s = 8 min; when it
runs out the remaining items are skipped and listed as such) and writes everything to ``--out``:

1. ``env``: device, torch / CUDA / cuDNN versions, which of lbtrain's dependencies are there.
2. ``cuda_tests``: the CUDA-only tests (those that skip on the CPU: no host sync in the training step, ghost BN
   and the optimizers under ``torch.cuda.set_sync_debug_mode("error")``) run by pytest in a subprocess,
   selected with ``-k cuda`` in the files of ``CUDA_TEST_FILES``; the summary line is reported.
3. ``correctness``: each fast option against fp32 eager on the same short run (same initial weights, same batches
   from lbtrain's ``DeviceLoader``, the update of ``Trainer.train_step``: autocast forward, fp32 cross-entropy,
   backward, gradient-norm clip 5, the fused SGD of ``build_optimizer``): bf16, channels_last, compile and all three,
   for F1 on MNIST-shaped data (1x28x28, B=512) and ResNet-44 with ghost BN on CIFAR-shaped data (3x32x32, B=512,
   ghost 128), 30 updates. Judged (``TOLERANCES``, with the reasons): the weights after the first update relative to
   that update's size, and the training loss of the last 5 updates relative to the first loss; the final weights are
   reported (trajectories drift apart over 30 updates whatever differs in rounding; a second fp32 eager run shows
   that floor: cuDNN autotuning picks algorithms per run). fp32 eager uses torch's defaults (on CUDA cuDNN may use
   TF32 for convolutions, in the reference as in the variants).
4. ``throughput`` (``scripts/bench.py``'s three paths, images/s in one run): the bare model step (limit), lbtrain's
   own loop (a real ``Trainer.fit()``), the usual DataLoader + PIL pipeline with per-chunk ghost BN (always fp32
   eager), for F1 at B=4096, ResNet-44 at B=512 (ghost 128) and ResNet-44 at B=4096 (ghost 128, regime=adapt), each
   in fp32 and with bf16 + channels_last (and + compile in the ``compile`` section); peak
   ``torch.cuda.max_memory_allocated``.
5. ``ghost_bn``: the bare step with ghost BN vs plain BN, bf16 + channels_last, ResNet-44 at B=512 and B=4096;
   then ``scripts/bench_gbn.py``'s one-layer micro-benchmark.
6. ``compile``: the compiled variants of 3 and 4 and the compile time (first update with compile minus the first
   update without). Last, because it is the slowest part (tens of seconds per compiled model), in order of value:
   all options together (correctness), ResNet-44 B=4096 with bf16 + channels_last + compile (lbtrain's loop, then
   the limit), compile alone (correctness), the other workloads compiled. Each compiled item starts from
   ``torch._dynamo.reset()``, as a new process would (a training run compiles one model at one batch size).

Then the targets (``TARGETS``: lbtrain's loop >= 0.90x the bare step on every workload, >= 3x the reference
pipeline, ghost BN <= 1.15x plain BN time with bf16 + channels_last, ResNet-44 at B=4096 regime=adapt >= 90k
images/s) are judged, and written: ``--out``/device_check.json (everything), ``--out``/device_check.md (a section
to paste into BENCHMARKS.md: device, versions, date, tables, targets) and a summary on stdout.

No dataset is needed (synthetic uint8 data of the real shapes, ``lbtrain.data.make_synthetic``).

Hydra. The GPU machine has torch, torchvision, tensorboard, tqdm, timm, pytest but no hydra-core / omegaconf /
antlr4. The measurement building blocks need none of them (models, ghost BN, the loader; ``lbtrain.optim`` imports
``lbtrain.config`` only for ``ConfigError``, so without Hydra a stand-in module holding that one class is put in
its place). Two parts do need them: lbtrain's loop (a ``Trainer`` takes a composed config) and the CUDA tests
(``tests/conftest.py`` composes configs). Bring them as pure-Python packages, no internet needed::

    python scripts/device_check.py --bundle-deps device_check/deps    # here: copies hydra, omegaconf, antlr4
                                                                     # (and their dist-info) from this environment

and pass ``--deps device_check/deps`` on the GPU machine (the folder may also hold wheels / sdists instead, e.g.
from ``pip download hydra-core omegaconf antlr4-python3-runtime==4.9.3 -d DIR``: they are unpacked and put on
``sys.path``, and on the tests' ``PYTHONPATH``). Never commit that folder. Without ``--deps`` (and no Hydra
installed) those two parts are reported as skipped, everything else runs.

Usage on the GPU machine (one H100; expect 6-8 minutes: the budget stops starting new items after 8, an item
already running (a compilation: up to ~1.5 min) finishes first)::

    python scripts/device_check.py --bundle-deps device_check/deps   # here, once, before the visit
    python scripts/device_check.py --deps device_check/deps --out "$OUT"   # there, the deps folder carried along

(``device_check/`` is not git-ignored: never commit it; with the project's device runner a git-ignored folder must be
named in ``carry``.) Write to the folder whose files come back (``$OUT`` there; default ``device_check/``), paste its
``device_check.md`` into BENCHMARKS.md and keep ``device_check.json`` next to it; the summary at the end of stdout
lists every target that failed or was not measured, every skipped item and every error. Other options:
``--budget-s S`` (less when the visit is shorter), ``--no-compile`` (leave out section 6), ``--skip SECTION ...``
and ``--models f1|resnet44`` (to rerun only what a budget cut off), ``--device cuda:N``.

``--quick``: the same sections at tiny sizes and few steps, on the CPU in seconds (compile skipped unless
``--compile``); ``tests/test_device_check.py`` runs it so that this script never breaks before a GPU comes by.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
if str(_ROOT) not in sys.path:  # allow `python scripts/device_check.py` without installing lbtrain
    sys.path.insert(0, str(_ROOT))

MODELS = ("f1", "resnet44")  # the two model families measured (--models picks)
SECTIONS = ("env", "cuda_tests", "correctness", "throughput", "ghost_bn", "compile")
CUDA_TEST_FILES = ("tests/test_sync.py", "tests/test_ghost_bn.py", "tests/test_optim.py")
DEPS_PACKAGES = ("hydra", "omegaconf", "antlr4")  # pure Python: a copied package folder works on any CPython 3
DEPS_DISTS = ("hydra_core", "omegaconf", "antlr4_python3_runtime")  # their dist-info folder names
LBTRAIN_IMPORTS = ("numpy", "torchvision", "PIL", "tqdm", "tensorboard", "yaml", "sklearn", "matplotlib", "hydra",
                   "omegaconf", "antlr4", "pytest")

# Fast option sets, compared with fp32 eager ("fp32"). A set is (bf16, channels_last, compile).
OPTION_SETS: dict[str, tuple[bool, bool, bool]] = {
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "channels_last": (False, True, False),
    "compile": (False, False, True),
    "all": (True, True, True),
}
# Tolerances of the correctness section (the same run as fp32 eager: same initial weights, batches and updates):
#   update1_rel: ||w1 - w1_fp32|| / ||w1_fp32 - w0|| after the FIRST update: the relative error of one update.
#   loss_rel:    |mean loss of the last 5 updates - fp32's| / fp32's first loss.
# Final weights are reported, not judged: after 30 updates at lr 0.1 the trajectories of any two runs that differ in
# rounding drift apart (on the CPU, fp32 ResNet-8 with channels_last ends 40% of the distance travelled away from
# contiguous fp32, while its first update agrees to 1.4e-3); the second fp32 eager run shows that floor on the device.
# Measured on the CPU (F1 at B=512, ResNet-8 at B=128 / ghost 32, 30 updates): bf16 update1_rel 0.12 (F1) and 0.056
# (ResNet-8), loss_rel 6e-4 and 1.7e-3; channels_last update1_rel 0 (F1) and 1.4e-3, loss_rel 3.2e-3. bf16 rounds to
# 8 mantissa bits (4e-3) and gradients at initialisation are sums with heavy cancellation (BN's backward subtracts
# means), hence ~10% on one update; options in fp32 arithmetic (channels_last, compile) only reorder sums or pick
# another cuDNN algorithm (both runs round conv operands to TF32 alike). A real bug (a wrong layout, broken
# statistics, a wrong cast) moves the first update by O(1) and the loss by much more than these bounds.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32_arith": {"update1_rel": 1e-2, "loss_rel": 2e-2},
    "bf16": {"update1_rel": 0.3, "loss_rel": 3e-2},
}
# What the GPU path is expected to deliver (issue 24); judged at the end, each pass / FAIL / not measured.
TARGETS = {
    "loop_over_limit": 0.90,  # lbtrain's loop >= 0.90x the bare step, every workload and option set
    "loop_over_reference": 3.0,  # lbtrain's loop >= 3x the DataLoader + PIL (+ per-chunk GBN) pipeline
    "ghost_over_plain_time": 1.15,  # ghost BN step time <= 1.15x plain BN, bf16 + channels_last
    "adapt_4096_images_per_sec": 90_000.0,  # ResNet-44, B=4096, regime=adapt, lbtrain's loop, fastest option set
}


# --------------------------------------------------------------------------------------------------
# dependencies: Hydra from a folder, and the measurement path without it


def add_deps(folder: Path) -> list[str]:
    """Put the pure-Python packages of `folder` on sys.path (first): the folder itself when it holds package
    folders (what --bundle-deps writes), and every wheel (*.whl) or sdist (*.tar.gz) in it, unpacked into
    `folder`/_unpacked (a pure-Python wheel unpacked is installed; an sdist's package is in its src/ or top
    folder). Returns the entries added, for the tests' PYTHONPATH too."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"--deps {folder}: no such folder")
    entries: list[Path] = []
    if any((folder / pkg).is_dir() for pkg in DEPS_PACKAGES):
        entries.append(folder)
    unpacked = folder / "_unpacked"
    for wheel in sorted(folder.glob("*.whl")):
        target = unpacked / wheel.stem
        if not target.exists():
            with zipfile.ZipFile(wheel) as z:
                z.extractall(target)
        entries.append(target)
    for sdist in sorted(folder.glob("*.tar.gz")):
        target = unpacked / sdist.name[: -len(".tar.gz")]
        if not target.exists():
            with tarfile.open(sdist) as t:
                t.extractall(target, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        for top in sorted(p for p in target.iterdir() if p.is_dir()):
            entries.append(top / "src" if (top / "src").is_dir() else top)
    for e in reversed(entries):
        sys.path.insert(0, str(e))
    importlib.invalidate_caches()
    return [str(e) for e in entries]


def bundle_deps(dest: Path) -> list[str]:
    """Copy hydra, omegaconf, antlr4 and their dist-info folders from this environment into `dest` (for --deps on a
    machine without them and without internet). Returns what was copied."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in DEPS_PACKAGES:
        src = Path(importlib.import_module(pkg).__file__).parent  # type: ignore[arg-type]
        shutil.copytree(src, dest / pkg, dirs_exist_ok=True, ignore=ignore)
        copied.append(pkg)
        for dist in src.parent.glob("*.dist-info"):
            if dist.name.split("-")[0].lower() in DEPS_DISTS:
                shutil.copytree(dist, dest / dist.name, dirs_exist_ok=True)
                copied.append(dist.name)
    return sorted(set(copied))


def hydra_available() -> bool:
    try:
        import hydra  # noqa: F401
        import omegaconf  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


_CONFIG_ERROR_SHIM = '''
class ConfigError(ValueError):
    """Stand-in for lbtrain.config.ConfigError where Hydra is absent (scripts/device_check.py)."""

    def __init__(self, key, value, allowed):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")
'''


def import_build_optimizer() -> Callable[..., torch.optim.Optimizer]:
    """lbtrain.optim.build_optimizer, with or without Hydra: `lbtrain.optim` imports `lbtrain.config` only for
    ConfigError, and that module imports Hydra and OmegaConf at its top. Without them a module holding just that
    class stands in for `lbtrain.config` in this process (which could not import the real one anyway)."""
    if "lbtrain.config" not in sys.modules and not hydra_available():
        shim = types.ModuleType("lbtrain.config")
        shim.__dict__["__device_check_shim__"] = True
        exec(_CONFIG_ERROR_SHIM, shim.__dict__)
        sys.modules["lbtrain.config"] = shim
    from lbtrain.optim import build_optimizer

    return build_optimizer


def load_bench() -> Any:
    """scripts/bench.py as a module (its paths, workloads and clock are reused here, not rewritten)."""
    if "bench" in sys.modules and hasattr(sys.modules["bench"], "run_limit"):
        return sys.modules["bench"]
    spec = importlib.util.spec_from_file_location("bench", _HERE / "bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------------
# the run: budget, items, results


class Budget:
    """A global deadline. `fits(estimate)`: whether an item expected to take `estimate` seconds still fits."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def fits(self, estimate: float) -> bool:
        return self.left() >= estimate


@dataclass
class Check:
    """What one run of this script does and found: results by section, skipped and failed items."""

    device: torch.device
    quick: bool
    budget: Budget
    out: Path
    hydra: bool
    deps_path: list[str]
    workers: int
    compile: bool
    skip_sections: tuple[str, ...] = ()
    models: tuple[str, ...] = MODELS

    def wants(self, model_name: str) -> bool:
        """Whether the model family of build_model's `model_name` is among --models."""
        return ("f1" if model_name == "fc" else "resnet44") in self.models

    def __post_init__(self) -> None:
        self.res: dict[str, Any] = {name: {} for name in SECTIONS}
        self.skipped: list[dict[str, str]] = []
        self.errors: list[dict[str, str]] = []

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def item(self, section: str, name: str, fn: Callable[[], Any], estimate: float,
             needs_hydra: bool = False) -> Any:
        """Run one measurement unless the budget or a missing dependency rules it out; an error is recorded and
        the run goes on (a visit to the GPU is too short to stop at the first problem)."""
        if section in self.skip_sections:
            return self._skip(section, name, "--skip")
        if needs_hydra and not self.hydra:
            return self._skip(section, name, "needs hydra-core + omegaconf: pass --deps (see the docstring)")
        if not self.budget.fits(estimate):
            return self._skip(section, name, f"budget: {self.budget.left():.0f} s left, ~{estimate:.0f} s needed")
        print(f"[device_check] {section}: {name} ({self.budget.elapsed():.0f} s so far)", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - reported, the other items still run
            tb = traceback.format_exc()
            self.errors.append({"section": section, "item": name, "error": f"{type(e).__name__}: {e}"[:500],
                                "traceback": tb[-3000:]})
            print(f"[device_check] {section}: {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return None
        finally:
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        if isinstance(value, dict):
            value.setdefault("wall_s", round(time.perf_counter() - t0, 2))
        return value

    def _skip(self, section: str, name: str, why: str) -> None:
        self.skipped.append({"section": section, "item": name, "reason": why})
        print(f"[device_check] {section}: {name} skipped ({why})", file=sys.stderr, flush=True)
        return None


# --------------------------------------------------------------------------------------------------
# 1. environment


def section_env(ck: Check) -> dict[str, Any]:
    bench = load_bench()
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(ck.device),
        "device_name": torch.cuda.get_device_name(ck.device) if ck.cuda else bench._cpu_name(),
        "cpu": bench._cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "quick": ck.quick,
        "budget_s": ck.budget.seconds,
        "hydra": ck.hydra,
        "deps_path": ck.deps_path,
        "threads": torch.get_num_threads(),
        "reference_workers": ck.workers,
        "compile": ck.compile,
    }
    if ck.cuda:
        props = torch.cuda.get_device_properties(ck.device)
        env["gpu_memory_bytes"] = props.total_memory
        env["capability"] = f"{props.major}.{props.minor}"
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    env["imports"] = {}
    for mod in LBTRAIN_IMPORTS:  # found, not imported (sklearn, matplotlib: seconds each); hydra was imported
        try:
            found = importlib.util.find_spec(mod) is not None
        except Exception:  # noqa: BLE001 - a finder that refuses (or a broken package) counts as missing
            found = False
        env["imports"][mod] = "found" if found else "missing"
    env["imports"]["hydra+omegaconf importable"] = ck.hydra
    return env


# --------------------------------------------------------------------------------------------------
# 2. the CUDA tests


def cuda_test_command(python: str = sys.executable) -> list[str]:
    """pytest on the CUDA-only tests: every test whose id says cuda in CUDA_TEST_FILES (a test function named
    test_cuda_*, or the "cuda" parameter of a device-parametrized test); slow ones included."""
    return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow", "-k", "cuda",
            "-rfEs", *CUDA_TEST_FILES]


def section_cuda_tests(ck: Check, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*ck.deps_path, str(_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = cuda_test_command()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = out + f"\n[timed out after {timeout:.0f} s]", None
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error|"
                                                                         r"deselected)", ln)),
                   lines[-1] if lines else "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    return {"command": " ".join(cmd[1:]), "returncode": rc, "summary": summary, "counts": counts,
            "seconds": round(time.perf_counter() - t0, 1), "output_tail": out[-4000:],
            "ok": rc == 0 and counts.get("passed", 0) > 0 and not counts.get("failed")}


# --------------------------------------------------------------------------------------------------
# 3. correctness of the fast options


@dataclass(frozen=True)
class ModelCase:
    name: str
    model: dict[str, Any]  # build_model's spec
    shape: tuple[int, int, int]
    batch: int
    ghost: int | None
    augment: bool
    train_size: int
    steps: int
    num_classes: int = 10


def correctness_cases(quick: bool, cuda: bool) -> list[ModelCase]:
    steps = 3 if quick else 30
    f1 = ModelCase("f1", {"name": "fc", "kwargs": {"hidden": 512, "depth": 5}}, (1, 28, 28), 512, None, False,
                   4096, steps)
    r44 = ModelCase("resnet44", {"name": "resnet_cifar", "kwargs": {"depth": 44}}, (3, 32, 32), 512, 128, True,
                    4096, steps)
    if quick:  # the same code paths at toy sizes (2 shared CPU cores: a few seconds for the section)
        f1 = replace(f1, name="f1_tiny", model={"name": "fc", "kwargs": {"hidden": 64, "depth": 3}}, batch=64,
                     train_size=256)
        r44 = replace(r44, name="resnet8_tiny", model={"name": "resnet_cifar", "kwargs": {"depth": 8}},
                      shape=(3, 16, 16), batch=32, ghost=8, train_size=128)
    return [f1, r44]


def train_blocks(case: ModelCase, data: Any, device: torch.device, *, bf16: bool, channels_last: bool,
                 compile: bool, seed: int = 0) -> dict[str, Any]:
    """`case.steps` updates made of lbtrain's building blocks exactly as `Trainer.setup` / `Trainer.train_step`
    combine them (one micro-batch): build_model -> convert_to_ghost_bn -> .to(memory format) -> build_optimizer
    ("sgd", fused on CUDA) -> torch.compile; per update bf16 autocast forward, cross-entropy in fp32, backward,
    clip_grad_norm_(5, foreach), step. Batches from the DeviceLoader (its draws depend on the seed only, so every
    option set sees the same batches). Returns the loss per update, the final weights (CPU fp32) and timings."""
    from lbtrain.data import DeviceLoader
    from lbtrain.ghost_bn import convert_to_ghost_bn
    from lbtrain.models import build_model

    build_optimizer = import_build_optimizer()
    torch.manual_seed(seed)
    model = build_model(dict(case.model), case.num_classes, case.shape)
    if case.ghost:
        model = convert_to_ghost_bn(model, case.ghost)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    params = [p for p in model.parameters() if p.requires_grad]
    w0 = [p.detach().float().cpu().clone() for p in params]
    opt = build_optimizer(model, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, fused=device.type == "cuda" or None)
    if compile:
        fresh_compile()
    net = torch.compile(model) if compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    loader = DeviceLoader(data.train_x, data.train_y, data.mean, data.std, augment=case.augment, device=device,
                          seed=seed, channels_last=channels_last)
    per_epoch = loader.steps_per_epoch(case.batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[torch.Tensor] = []
    stamps = [time.perf_counter()]
    model.train()
    for step in range(case.steps):
        if step % per_epoch == 0:
            batches = loader.epoch(step // per_epoch, case.batch)
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = net(x)
            loss = F.cross_entropy(out.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0, foreach=True)
        opt.step()
        losses.append(loss.detach())
        if step == 0:  # one update from the same weights: the gradient's error, before training's chaos adds up
            w1 = [p.detach().float().cpu().clone() for p in params]
        if step < 2 or step == case.steps - 1:  # the first update carries the compile; then steady updates
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())
    steady = (stamps[-1] - stamps[2]) / max(case.steps - 2, 1) if case.steps > 2 else math.nan
    row = {"losses": torch.stack(losses).float().cpu().tolist(), "first_update_s": stamps[1] - stamps[0],
           "second_update_s": stamps[2] - stamps[1] if case.steps > 1 else math.nan, "update_s": steady,
           "weights": [p.detach().float().cpu() for p in params], "w0": w0, "w1": w1}
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


def _dist(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)))


def fresh_compile() -> None:
    """Forget what dynamo compiled so far, as a new process would: a run compiles one model at one batch size,
    while this script compiles several in one process. (Without this a second batch size of the same model makes
    dynamo recompile with a symbolic batch dimension, which fails in ghost BN: see the report of issue 24.)"""
    torch._dynamo.reset()


def compare(run: dict[str, Any], ref: dict[str, Any], tail: int = 5) -> dict[str, Any]:
    """Differences of `run` from `ref` (same weights, batches and updates):

    - `update1_rel`: weights after the first update, ||w1 - w1_ref|| / ||w1_ref - w0||: the relative error of that
      update (gradient and optimizer step), before the chaos of training amplifies differences;
    - `loss_rel`: |mean training loss of the last `tail` updates - ref's| / ref's first loss (the loss curves
      must agree on the progress made; relative to the starting loss, as a loss near 0 makes ratios meaningless);
    - `weights_rel` (reported, not judged): final weights relative to the distance ref travelled; after many
      updates this measures trajectory divergence (the second fp32 run shows the floor on the device).
    """
    la, lb = run["losses"][-tail:], ref["losses"][-tail:]
    mean_a, mean_b = sum(la) / len(la), sum(lb) / len(lb)
    first = max(abs(ref["losses"][0]), 1e-12)
    finite = all(math.isfinite(v) for v in run["losses"]) and all(bool(torch.isfinite(w).all())
                                                                    for w in run["weights"])
    return {"loss": mean_a, "loss_fp32": mean_b, "loss_rel": abs(mean_a - mean_b) / first,
            "loss_rel_max_update": max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) / first,
            "update1_rel": _dist(run["w1"], ref["w1"]) / max(_dist(ref["w1"], ref["w0"]), 1e-12),
            "weights_rel": _dist(run["weights"], ref["weights"]) / max(_dist(ref["weights"], ref["w0"]), 1e-12),
            "finite": finite}


def tolerance_for(option: str) -> dict[str, float]:
    bf16 = OPTION_SETS[option][0]
    return TOLERANCES["bf16" if bf16 else "fp32_arith"]


def section_correctness(ck: Check, options: tuple[str, ...]) -> None:
    """Each of `options` against fp32 eager (run first, then again for the noise floor), per model case."""
    from lbtrain.data import make_synthetic

    out = ck.res["correctness"]
    out.setdefault("tolerances", TOLERANCES)
    out.setdefault("cases", {})
    for case in correctness_cases(ck.quick, ck.cuda):
        if not ck.wants(case.model["name"]):
            continue
        entry = out["cases"].setdefault(case.name, {"batch": case.batch, "ghost": case.ghost, "steps": case.steps,
                                                    "shape": list(case.shape), "options": {}})
        data = make_synthetic(case.shape, case.num_classes, case.train_size, 64)
        cache = ck.res.setdefault("_fp32_runs", {})
        if case.name not in cache:
            def eager(case: ModelCase = case, data: Any = data) -> dict[str, Any]:
                return train_blocks(case, data, ck.device, bf16=False, channels_last=False, compile=False)

            ref = ck.item("correctness", f"{case.name} fp32 eager", eager, 10)
            again = ck.item("correctness", f"{case.name} fp32 eager (again: noise floor)", eager, 10)
            if ref is None:
                continue
            # the eager first update to subtract from a compiled one: the second run's (the first run's also pays
            # for CUDA / cuBLAS / cuDNN initialisation)
            ref["eager_first_s"] = (again or ref)["first_update_s"]
            cache[case.name] = ref
            entry["fp32"] = {"final_loss": ref["losses"][-1], "first_update_s": ref["first_update_s"],
                             "update_s": ref["update_s"], "peak_memory_bytes": ref.get("peak_memory_bytes")}
            if again is not None:
                entry["noise_floor"] = compare(again, ref)
        ref = cache[case.name]
        for option in options:
            bf16, cl, comp = OPTION_SETS[option]
            est = (40 if case.model["name"] == "fc" else 75) if comp else 10  # compile: tens of seconds

            def one(case: ModelCase = case, data: Any = data, bf16: bool = bf16, cl: bool = cl,
                    comp: bool = comp) -> dict[str, Any]:
                return train_blocks(case, data, ck.device, bf16=bf16, channels_last=cl, compile=comp)

            run = ck.item("correctness" if not comp else "compile", f"{case.name} {option}", one, est)
            if run is None:
                continue
            d = compare(run, ref)
            tol = tolerance_for(option)
            d.update(tolerance=tol, first_update_s=run["first_update_s"], update_s=run["update_s"],
                     peak_memory_bytes=run.get("peak_memory_bytes"),
                     ok=d["finite"] and d["loss_rel"] <= tol["loss_rel"] and d["update1_rel"] <= tol["update1_rel"])
            if comp:  # the compile time: what the first update costs beyond an eager first update
                d["compile_s"] = run["first_update_s"] - ref["eager_first_s"]
            entry["options"][option] = d


# --------------------------------------------------------------------------------------------------
# 4. throughput (scripts/bench.py's three paths)


def throughput_workloads(quick: bool) -> list[Any]:
    """bench.py's workloads at the batches of issue 24: F1 at 4096, ResNet-44 at 512 and at 4096 (regime adapt)."""
    b = load_bench()
    f1, r44 = b.WORKLOADS["f1_mnist"], b.WORKLOADS["resnet44_cifar10"]
    r44_4096 = replace(r44, name="resnet44_b4096_adapt", batch=4096, regime="adapt")
    if quick:  # structure kept (ghost chunks, augmentation, regimes), sizes cut to seconds on 2 CPU cores
        f1 = replace(f1, batch=128, train_size=512, model_kwargs={"hidden": 64, "depth": 2})
        r44 = replace(r44, batch=32, ghost=8, train_size=256, shape=(3, 16, 16), model_kwargs={"depth": 8})
        r44_4096 = replace(r44_4096, batch=64, ghost=8, train_size=256, shape=(3, 16, 16), model_kwargs={"depth": 8})
    return [f1, r44, r44_4096]


def _steps(wl: Any, quick: bool, path: str) -> tuple[int, int]:
    """(warm-up, timed) updates: enough on an H100 for a stable rate, few enough for the budget. The reference is
    slow (CPU-bound) and its rate is steady after a couple of updates."""
    if quick:
        return (1, 2)
    if path == "reference":
        return (2, 10) if wl.batch <= 512 else (1, 5)
    return {512: (10, 50), 4096: (20, 100) if wl.model == "fc" else (5, 25)}.get(wl.batch, (5, 25))


FLAG_SETS = {"fp32": (False, False, False), "bf16+cl": (True, True, False), "bf16+cl+compile": (True, True, True)}


def measure_workload(ck: Check, wl: Any, flags: str, data: Any, tmp: Path) -> None:
    """limit and lbtrain for one (workload, flag set), and the reference (fp32 eager) once per workload."""
    b = load_bench()
    bf16, cl, comp = FLAG_SETS[flags]
    section = "compile" if comp else "throughput"
    rows = ck.res["throughput"].setdefault("rows", [])
    est = (40 if wl.model == "fc" else 75) if comp else (20 if ck.cuda else 5)

    def opts(path: str) -> Any:
        warmup, steps = _steps(wl, ck.quick, path)
        if comp:
            fresh_compile()
        return b.Options(ck.device, warmup, steps, ck.workers, bf16, cl, comp)

    def add(path: str, row: dict[str, Any] | None) -> None:
        if row is not None:
            rows.append({"workload": wl.name, "flags": flags if path != "reference" else "fp32", "path": path,
                         "model": wl.model, "ghost": wl.ghost, "regime": wl.regime, **row})

    def limit() -> None:
        add("limit", ck.item(section, f"{wl.name} {flags} limit", lambda: b.run_limit(wl, data, opts("limit")), est))

    def loop() -> None:
        add("lbtrain", ck.item(section, f"{wl.name} {flags} lbtrain",
                               lambda: b.run_lbtrain(wl, opts("lbtrain"), tmp / f"{wl.name}-{flags}"), est + 10,
                               needs_hydra=True))

    for part in (loop, limit) if comp else (limit, loop):  # compiled: lbtrain's own number first (budget)
        part()
    if flags == "fp32":
        add("reference", ck.item(section, f"{wl.name} reference (DataLoader + PIL)",
                                 lambda: b.run_reference(wl, data, opts("reference")), 30 if ck.cuda else 10))


def ghost_vs_plain(ck: Check, wl: Any, data: Any) -> None:
    """The bare step with ghost BN vs plain BN, bf16 + channels_last (the layout GBN's views must not break)."""
    b = load_bench()
    warmup, steps = _steps(wl, ck.quick, "limit")
    o = b.Options(ck.device, warmup, steps, ck.workers, True, True, False)
    out = ck.res["ghost_bn"].setdefault("steps", {})
    ghost = ck.item("ghost_bn", f"{wl.name} ghost BN ({wl.ghost})", lambda: b.run_limit(wl, data, o), 15)
    plain = ck.item("ghost_bn", f"{wl.name} plain BN", lambda: b.run_limit(replace(wl, ghost=None), data, o), 15)
    if ghost and plain:
        out[wl.name] = {"batch": wl.batch, "ghost_batch": wl.ghost, "flags": "bf16+cl", "ghost_bn": ghost,
                        "plain_bn": plain, "ghost_over_plain_time": plain["images_per_sec"] / ghost["images_per_sec"]}


def gbn_micro(ck: Check) -> dict[str, Any]:
    gbn = load_bench()._load_bench_gbn()
    batch, size, iters = (64, 16, 2) if ck.quick else ((4096, 32, 30) if ck.cuda else (1024, 32, 10))
    return {name: gbn.run_gbn_bench(ck.device, batch, 16, size, 32 if not ck.quick else 8, iters, warmup=1,
                                    channels_last=True, dtype=dtype)
            for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))}


def section_throughput(ck: Check, flag_sets: tuple[str, ...], order: tuple[int, ...] = (0, 1, 2)) -> None:
    """The workloads of `throughput_workloads` in `order` (indices), each with every flag set of `flag_sets`."""
    from lbtrain.data import make_synthetic

    workloads = throughput_workloads(ck.quick)
    with tempfile.TemporaryDirectory(prefix="lbtrain-device-check-") as tmp:
        for wl in (workloads[i] for i in order):
            if not ck.wants(wl.model):
                continue
            data = make_synthetic(wl.shape, wl.num_classes, wl.train_size, 256)  # = lbtrain's synthetic set
            for flags in flag_sets:
                measure_workload(ck, wl, flags, data, Path(tmp))
            del data


def compute_ratios(ck: Check) -> None:
    rows = ck.res["throughput"].get("rows", [])
    by = {(r["workload"], r["flags"], r["path"]): r for r in rows}
    ratios: dict[str, dict[str, Any]] = {}
    for (w, f, p), r in by.items():
        if p != "lbtrain":
            continue
        d = ratios.setdefault(f"{w} {f}", {"workload": w, "flags": f})
        if (w, f, "limit") in by:
            d["lbtrain_over_limit"] = r["images_per_sec"] / by[(w, f, "limit")]["images_per_sec"]
        if (w, "fp32", "reference") in by:
            d["lbtrain_over_reference"] = r["images_per_sec"] / by[(w, "fp32", "reference")]["images_per_sec"]
    ck.res["throughput"]["ratios"] = ratios


# --------------------------------------------------------------------------------------------------
# targets, JSON, Markdown


def judge_targets(ck: Check) -> list[dict[str, Any]]:
    """Each target: measured value(s), threshold, pass (True / False / None when not measured)."""
    t: list[dict[str, Any]] = []
    ratios = ck.res["throughput"].get("ratios", {})
    workloads = [wl.name for wl in throughput_workloads(ck.quick) if ck.wants(wl.model)]

    def verdict(values: list[float], ok: Callable[[float], bool]) -> bool | None:
        # --quick times one or two updates of toy models on a shared CPU: shown, never judged
        return None if not values or ck.quick else all(ok(v) for v in values)

    for w in workloads:
        for f in FLAG_SETS:
            r = ratios.get(f"{w} {f}", {})
            if f == "bf16+cl+compile" and not r:
                continue  # compile is optional (its section may be off)
            v = r.get("lbtrain_over_limit")
            t.append({"target": f"lbtrain loop >= {TARGETS['loop_over_limit']:.2f}x bare step: {w} {f}",
                      "measured": v, "pass": verdict([v] if v is not None else [],
                                                     lambda x: x >= TARGETS["loop_over_limit"])})
        for f in FLAG_SETS:
            v = ratios.get(f"{w} {f}", {}).get("lbtrain_over_reference")
            if v is None and f != "fp32":
                continue
            t.append({"target": f"lbtrain loop >= {TARGETS['loop_over_reference']:.0f}x DataLoader+PIL"
                                f"{'+chunk GBN' if 'resnet' in w else ''} (fp32 eager): {w} {f}",
                      "measured": v, "pass": verdict([v] if v is not None else [],
                                                     lambda x: x >= TARGETS["loop_over_reference"])})
    for w, g in ck.res["ghost_bn"].get("steps", {}).items():
        v = g["ghost_over_plain_time"]
        t.append({"target": f"ghost BN time <= {TARGETS['ghost_over_plain_time']:.2f}x plain BN (bf16+cl, bare step): "
                            f"{w}", "measured": v,
                  "pass": verdict([v], lambda x: x <= TARGETS["ghost_over_plain_time"])})
    adapt = [r for r in ck.res["throughput"].get("rows", []) if r["path"] == "lbtrain" and r["regime"] == "adapt"]
    best = max(adapt, key=lambda r: r["images_per_sec"], default=None)
    need = TARGETS["adapt_4096_images_per_sec"]
    if ck.wants("resnet_cifar"):
            t.append({"target": f"ResNet-44 B={best['batch'] if best else 4096} regime=adapt lbtrain loop >= "
                            f"{need:,.0f} images/s" + (f" (best: {best['flags']})" if best else ""),
                  "measured": best["images_per_sec"] if best else None,
                  "pass": verdict([best["images_per_sec"]] if best else [], lambda x: x >= need)})
    for name, case in ck.res["correctness"].get("cases", {}).items():
        for option, d in case["options"].items():
            t.append({"target": f"{name} {option} matches fp32 eager (update 1 rel <= "
                                f"{d['tolerance']['update1_rel']:g}, loss rel <= {d['tolerance']['loss_rel']:g})",
                      "measured": f"{d['update1_rel']:.2g} / {d['loss_rel']:.2g}", "pass": d["ok"]})
    ct = ck.res["cuda_tests"]
    if ct:
        t.append({"target": "CUDA tests pass", "measured": ct.get("summary"), "pass": ct.get("ok")})
    return t


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tensors dropped, tuples -> lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj if not isinstance(v, torch.Tensor)]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def _f(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _mib(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def markdown(ck: Check, result: dict[str, Any]) -> str:
    env = result["env"] or {}
    L = [f"## Device check: {env.get('device_name', ck.device)} ({env.get('date', '?')})", ""]
    L.append(f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, Python "
             f"{env.get('python')}; {env.get('cpu_count')} CPU cores ({env.get('cpu')}); DataLoader workers "
             f"{env.get('reference_workers')}. `python scripts/device_check.py"
             f"{' --quick' if ck.quick else ''}`: {result['wall_s']:.0f} s of a {ck.budget.seconds:.0f} s budget"
             f"{' (--quick: tiny sizes, not a measurement)' if ck.quick else ''}.")
    L.append("")
    ct = result["cuda_tests"]
    L += ["### CUDA tests", ""]
    L.append(f"`{ct['command']}`: **{ct['summary']}**" if ct else "not run (see Skipped)")
    L += ["", "### Fast options vs fp32 eager (same run: weights, batches, update)", ""]
    cor = result["correctness"].get("cases", {})
    if cor:
        tol = TOLERANCES
        L.append(f"Tolerances: options in fp32 arithmetic (channels_last, compile): update 1 rel <= "
                 f"{tol['fp32_arith']['update1_rel']:g}, loss rel <= {tol['fp32_arith']['loss_rel']:g}; with bf16: "
                 f"update 1 rel <= {tol['bf16']['update1_rel']:g}, loss rel <= {tol['bf16']['loss_rel']:g}. "
                 "Update 1 rel: ||w1 - w1_fp32|| / ||w1_fp32 - w0|| after the first update; loss rel: mean training "
                 "loss of the last 5 updates minus fp32's, over fp32's first loss; final weights rel: "
                 "||w - w_fp32|| / ||w_fp32 - w0|| (trajectory drift, not judged; compare the fp32 rerun).")
        L += ["", "| model | batch (ghost) | updates | option | loss | fp32 loss | loss rel | update 1 rel "
                  "| final weights rel | update ms | first update s | peak mem | ok |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, c in cor.items():
            rows = [("fp32 again (noise floor)", c["noise_floor"])] if "noise_floor" in c else []
            for option, d in [*rows, *c["options"].items()]:
                ms = 1e3 * d["update_s"] if d.get("update_s") is not None else None
                L.append(f"| {name} | {c['batch']} ({c['ghost'] or '-'}) | {c['steps']} | {option} | "
                         f"{_f(d['loss'], '.4f')} | {_f(d['loss_fp32'], '.4f')} | {_f(d['loss_rel'], '.1e')} | "
                         f"{_f(d['update1_rel'], '.1e')} | {_f(d['weights_rel'], '.1e')} | {_f(ms, '.1f')}"
                         f" | {_f(d.get('first_update_s'), '.2f')} | {_mib(d.get('peak_memory_bytes'))} | "
                         f"{'yes' if d.get('ok', True) else '**NO**'} |")
    else:
        L.append("not run (see Skipped)")
    L += ["", "### Throughput, images/s (limit: bare model step; lbtrain: `Trainer.fit()`; reference: DataLoader + "
              "PIL + per-chunk ghost BN, fp32 eager)", ""]
    thr = result["throughput"]
    if thr.get("rows"):
        L += ["| workload | batch | ghost | flags | limit | lbtrain | reference | lbtrain/limit | lbtrain/reference "
              "| peak mem lbtrain | peak mem limit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        by = {(r["workload"], r["flags"], r["path"]): r for r in thr["rows"]}
        for rat in thr.get("ratios", {}).values():
            w, f = rat["workload"], rat["flags"]
            lim, lb, ref = by.get((w, f, "limit")), by.get((w, f, "lbtrain")), by.get((w, "fp32", "reference"))
            anyrow = lb or lim
            L.append(f"| {w} | {anyrow['batch']} | {anyrow['ghost'] or '-'} | {f} | "
                     f"{_f(lim and lim['images_per_sec'], ',.0f')} | {_f(lb['images_per_sec'], ',.0f')} | "
                     f"{_f(ref and ref['images_per_sec'], ',.0f')} | {_f(rat.get('lbtrain_over_limit'))} | "
                     f"{_f(rat.get('lbtrain_over_reference'))} | {_mib(lb.get('peak_memory_bytes'))} | "
                     f"{_mib(lim and lim.get('peak_memory_bytes'))} |")
        listed = {(r["workload"], r["flags"]) for r in thr.get("ratios", {}).values()}
        for r in thr["rows"]:  # paths measured without an lbtrain row (e.g. no Hydra)
            if (r["workload"], r["flags"]) not in listed and r["path"] != "reference":
                ref = by.get((r["workload"], "fp32", "reference"))
                L.append(f"| {r['workload']} | {r['batch']} | {r['ghost'] or '-'} | {r['flags']} | "
                         f"{_f(r['images_per_sec'], ',.0f')} | - | {_f(ref and ref['images_per_sec'], ',.0f')} | - | - "
                         f"| - | {_mib(r.get('peak_memory_bytes'))} |")
    else:
        L.append("not run (see Skipped)")
    g = result["ghost_bn"]
    L += ["", "### Ghost BN vs plain BN (bare step, bf16 + channels_last)", ""]
    if g.get("steps"):
        L += ["| workload | batch | ghost | ghost BN images/s | plain BN images/s | time ratio |",
              "|---|---|---|---|---|---|"]
        for w, s in g["steps"].items():
            L.append(f"| {w} | {s['batch']} | {s['ghost_batch']} | {_f(s['ghost_bn']['images_per_sec'], ',.0f')} | "
                     f"{_f(s['plain_bn']['images_per_sec'], ',.0f')} | {_f(s['ghost_over_plain_time'])} |")
    if g.get("micro"):
        for name, m in g["micro"].items():
            if not isinstance(m, dict):
                continue
            L.append("")
            L.append(f"One BN layer, x={tuple(m['shape'])} {name} channels_last, {m['ghosts']} ghost batches: "
                     + ", ".join(f"{k.removesuffix('_ms')} {v:.3f} ms" for k, v in m.items()
                                 if k.endswith("_ms") and not k.endswith("min_ms") and isinstance(v, float)))
    if not g:
        L.append("not run (see Skipped)")
    comp = [(name, o, d) for name, c in cor.items() for o, d in c["options"].items() if "compile_s" in d]
    L += ["", "### Compile", ""]
    if comp:
        L.append(f"Inductor cache: {env.get('inductor_cache')}; later compilations in the run reuse what earlier ones "
                 "wrote. Compile time = first update compiled - first update eager (fp32).")
        L.append("")
        for name, o, d in comp:
            L.append(f"- {name} ({o}): compile time {d['compile_s']:.1f} s (first update {d['first_update_s']:.1f} s "
                     f"vs eager {d['first_update_s'] - d['compile_s']:.2f} s)")
    else:
        L.append("not run (see Skipped)")
    L += ["", "### Targets", "", "| target | measured | pass |", "|---|---|---|"]
    for t in result["targets"]:
        m = t["measured"]
        shown = _f(m, ".3g") if isinstance(m, float) else ("-" if m is None else str(m))
        L.append(f"| {t['target']} | {shown} | {'-' if t['pass'] is None else 'yes' if t['pass'] else '**NO**'} |")
    if result["skipped"] or result["errors"]:
        L += ["", "### Skipped / failed", ""]
        L += [f"- skipped {s['section']}: {s['item']} ({s['reason']})" for s in result["skipped"]]
        L += [f"- FAILED {e['section']}: {e['item']}: `{e['error']}`" for e in result["errors"]]
    return "\n".join(L) + "\n"


def summary(result: dict[str, Any]) -> str:
    t = result["targets"]
    failed = [x for x in t if x["pass"] is False]
    unmeasured = [x for x in t if x["pass"] is None]
    lines = [f"device_check: {result['env'].get('device_name')} torch {result['env'].get('torch')} CUDA "
             f"{result['env'].get('cuda')}; {result['wall_s']:.0f} s; targets: {len(t) - len(failed) - len(unmeasured)}"
             f" pass, {len(failed)} FAIL, {len(unmeasured)} not measured; {len(result['skipped'])} skipped, "
             f"{len(result['errors'])} errors"]
    lines += [f"  FAIL {x['target']}: {x['measured']}" for x in failed]
    lines += [f"  not measured: {x['target']}" for x in unmeasured]
    lines += [f"  skipped {s['section']}: {s['item']} ({s['reason']})" for s in result["skipped"]]
    lines += [f"  ERROR {e['section']}: {e['item']}: {e['error']}" for e in result["errors"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# driver


def run_check(ck: Check) -> dict[str, Any]:
    """All sections in order of value per second (compile, the slowest, last); returns the result dict."""
    if ck.cuda:
        torch.backends.cudnn.benchmark = True  # as lbtrain (set_determinism) and bench.py do
    ck.res["env"] = ck.item("env", "versions", lambda: section_env(ck), 0) or {}
    if not ck.cuda:
        ck._skip("cuda_tests", "pytest -k cuda", f"no CUDA device ({ck.device})")
    else:
        timeout = min(180.0, max(ck.budget.left() - 120, 30))  # leave time for the measurements
        ck.res["cuda_tests"] = ck.item("cuda_tests", "pytest -k cuda", lambda: section_cuda_tests(ck, timeout), 30,
                                       needs_hydra=True) or {}
    section_correctness(ck, ("bf16", "channels_last"))
    section_throughput(ck, ("fp32", "bf16+cl"))
    if "ghost_bn" not in ck.skip_sections:
        from lbtrain.data import make_synthetic

        # the ResNet-44 workloads (F1 has no ghost batches in its workload); --quick: the first one only
        for wl in throughput_workloads(ck.quick)[1:2 if ck.quick else 3]:
            if not ck.wants(wl.model):
                continue
            data = make_synthetic(wl.shape, wl.num_classes, wl.train_size, 256)
            ghost_vs_plain(ck, wl, data)
            del data
        micro = ck.item("ghost_bn", "one-layer micro-benchmark (bench_gbn.py)", lambda: gbn_micro(ck), 10)
        if micro:
            ck.res["ghost_bn"]["micro"] = micro
    if ck.compile:  # most informative first: all options together, then the 90k target's workload
        section_correctness(ck, ("all",))
        section_throughput(ck, ("bf16+cl+compile",), order=(2,))
        section_correctness(ck, ("compile",))
        section_throughput(ck, ("bf16+cl+compile",), order=(1, 0))
    else:
        ck._skip("compile", "compiled variants", "compile off (--no-compile, or --quick without --compile)")
    compute_ratios(ck)
    ck.res.pop("_fp32_runs", None)
    if ck.res["env"]:  # whether lbtrain.config was stood in for (build_optimizer without Hydra), known only now
        ck.res["env"]["config_shim"] = bool(getattr(sys.modules.get("lbtrain.config"), "__device_check_shim__", False))
    result = {**ck.res, "skipped": ck.skipped, "errors": ck.errors, "wall_s": ck.budget.elapsed()}
    result["targets"] = judge_targets(ck)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--out", type=Path, default=Path("device_check"), help="folder for the JSON and Markdown")
    p.add_argument("--budget-s", type=float, default=480.0, help="global time budget, seconds (default 480)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and steps: a smoke run (CPU, seconds)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="the compile section (default: on for CUDA, off with --quick or on the CPU)")
    p.add_argument("--deps", type=Path, default=None,
                   help="folder with hydra/omegaconf/antlr4 (package folders, wheels or sdists) to use")
    p.add_argument("--bundle-deps", type=Path, default=None, metavar="DIR",
                   help="copy hydra, omegaconf, antlr4 from this environment into DIR, then exit")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of the reference pipeline (default min(8, CPU count); --quick 0)")
    p.add_argument("--skip", nargs="+", default=[], choices=SECTIONS[1:], help="sections to leave out")
    p.add_argument("--warm-cache", action="store_true",
                   help="keep torch inductor's on-disk cache (default: a fresh one, so compile times are cold, as on a "
                        "fresh machine)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                   help="model families to measure (default both)")
    args = p.parse_args(argv)

    if args.bundle_deps is not None:
        copied = bundle_deps(args.bundle_deps)
        print(f"copied into {args.bundle_deps}: {', '.join(copied)}\n"
              f"on the GPU machine: python scripts/device_check.py --deps {args.bundle_deps}")
        return None
    deps_path = add_deps(args.deps) if args.deps is not None else []
    device = load_bench().cli_device(p, args.device, cuda_ok=not args.quick)
    compile_on = args.compile if args.compile is not None else (device.type == "cuda" and not args.quick)
    workers = args.workers if args.workers is not None else (0 if args.quick else min(8, os.cpu_count() or 1))
    ck = Check(device, args.quick, Budget(args.budget_s), args.out, hydra_available(), deps_path, workers,
               compile_on, tuple(args.skip), tuple(args.models))
    fresh_cache = None
    if compile_on and not args.warm_cache:  # compiled graphs of earlier runs would hide the compile time
        fresh_cache = tempfile.mkdtemp(prefix="device-check-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh_cache
    try:
        result = run_check(ck)
    finally:
        if fresh_cache:
            shutil.rmtree(fresh_cache, ignore_errors=True)
    result["env"]["inductor_cache"] = "fresh (cold)" if fresh_cache else "default (may be warm)"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps(_clean(result), indent=1) + "\n")
    md = markdown(ck, result)
    (args.out / "device_check.md").write_text(md)
    print(md)
    print(summary(result))
    print(f"\nwritten: {args.out / 'device_check.json'}, {args.out / 'device_check.md'}")
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
