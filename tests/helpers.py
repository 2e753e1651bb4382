"""Test helpers (fixtures live in conftest.py): compose configs the way the CLI does, run the real CLI in a
subprocess, read TensorBoard files back, write datasets in their real on-disk formats, and make run folders the
trainer would write."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lbtrain.cli import CONFIG_DIR, setup_hydra

ROOT = Path(__file__).resolve().parent.parent
# Real MNIST / Fashion-MNIST copies for the tests that read them: $LBTRAIN_DATA, else the repository's sibling
# shared/data (tests that need them skip when neither holds them).
SHARED_DATA = Path(os.environ.get("LBTRAIN_DATA") or ROOT.parent / "shared" / "data")

setup_hydra()


def make_cfg(*overrides: str) -> DictConfig:
    """Compose the real config tree with CLI-style overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300,
            module: str = "lbtrain") -> subprocess.CompletedProcess:
    """Run `python -m lbtrain ARGS` in `cwd` (outputs/ lands there). One torch thread unless `env` says otherwise:
    on a small shared machine 2-thread runs stall whenever another process runs (tiny models gain nothing)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("LBTRAIN_TEST_SIGNAL", None) if env is None or "LBTRAIN_TEST_SIGNAL" not in env else None
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_main(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Ran:
    """`lbtrain ARGS` in this process, like run_cli but without a new interpreter and torch import (~3 s a call).
    For commands where a subprocess adds nothing: no SIGKILL, no terminal, no launcher. Restores the working
    folder, argv, environment and torch's global settings afterwards."""
    import contextlib
    import io

    import torch

    from lbtrain import cli

    saved = (os.getcwd(), sys.argv, dict(os.environ), torch.get_num_threads(),
             torch.are_deterministic_algorithms_enabled(), torch.get_rng_state())
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        os.chdir(cwd)
        sys.argv = ["lbtrain", *args]
        os.environ.pop("LBTRAIN_TEST_SIGNAL", None)
        os.environ.update({"OMP_NUM_THREADS": "1", **(env or {})})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(saved[0])
        sys.argv = saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        torch.set_num_threads(saved[3])
        torch.use_deterministic_algorithms(saved[4])
        torch.set_rng_state(saved[5])
    return Ran(code, out.getvalue(), err.getvalue())


def scalars(run_dir: Path | str, every_write: bool = False) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run folder, through the package's reader (`lbtrain.analysis.runs.read_all_scalars`;
    TensorBoard's own reader underneath). `every_write=True` keeps a step written twice (duplicate checks)."""
    from lbtrain.analysis.runs import read_all_scalars

    return read_all_scalars(run_dir, every_write=every_write)


def only_run(root: Path) -> Path:
    """The one run folder under `root` (an experiment's folder)."""
    (run,) = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return run


# ------------------------------------------------------------------------------- datasets in real formats
def write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST idx files: big-endian magic (2051 images / 2049 labels) and dims, then uint8 payload."""
    n, h, w = images.shape
    blobs = {
        f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, h, w) + np.uint8(images).tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + np.uint8(labels).tobytes(),
    }
    for name, blob in blobs.items():
        (raw / name).write_bytes(blob)  # torchvision checks for the uncompressed files
        with gzip.open(raw / f"{name}.gz", "wb") as f:
            f.write(blob)



def write_cifar(root: Path, hundred: bool, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """CIFAR python pickles: dicts with 'data' (N, 3072) uint8 rows in R,G,B planes and label lists."""
    rng = np.random.default_rng(1)
    k = 100 if hundred else 10
    arr = {
        "train_x": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
        "train_y": rng.integers(0, k, n_train),
        "test_y": rng.integers(0, k, n_test),
    }
    label_key = "fine_labels" if hundred else "labels"

    def dump(path: Path, obj: dict) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    def batch(x: np.ndarray, y: np.ndarray) -> dict:
        d = {"batch_label": "tiny", "data": x, label_key: [int(v) for v in y], "filenames": ["f"] * len(y)}
        if hundred:
            d["coarse_labels"] = [int(v) // 5 for v in y]
        return d

    if hundred:
        base = root / "cifar-100-python"
        base.mkdir(parents=True)
        dump(base / "train", batch(arr["train_x"], arr["train_y"]))
        dump(base / "test", batch(arr["test_x"], arr["test_y"]))
        dump(base / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                             "coarse_label_names": [f"s{i}" for i in range(20)]})
    else:
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            dump(base / f"data_batch_{i}", batch(arr["train_x"][part], arr["train_y"][part]))
        dump(base / "test_batch", batch(arr["test_x"], arr["test_y"]))
        dump(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})
    return arr



def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our tiny files can't match torchvision's MD5s. CIFAR checks them in two places (the class's
    `_check_integrity` for the batches and `_load_meta` for the meta file), both via the module-level
    `check_integrity`; replace just that with an existence check. Parsing stays real."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))




# ------------------------------------------------------------------------------------------- run folders
TRAIN_SIZE = 1024


def make_run(root: Path, *overrides: str, status: str = "completed", error: float | None = 0.1,
             epoch_batches: list[int] | None = None, log_every: int = 1, dist_ab: tuple[float, float] = (0.5, 2.0),
             with_fit: bool = True, events: bool = True, updates: int | None = None, diverged_at: int | None = None,
             folder: str | None = None, **fields: Any) -> Path:
    """A run folder as the trainer writes it: results.json (through lbtrain.results.Results, with the identity of
    the real config composed from `overrides`, on digits unless they say otherwise) and TensorBoard scalars.

    Epoch e has TRAIN_SIZE // batch_e updates; the distance is a + b log t at every update; opt/* every
    `log_every` updates; val/error at each epoch end. `updates` < planned stops the run early (max_steps).
    """
    from torch.utils.tensorboard import SummaryWriter

    from lbtrain.config import resolved, schema_defaults
    from lbtrain.identity import identity, identity_hash
    from lbtrain.regime import make_plan
    from lbtrain.results import Results

    cfg = make_cfg(*overrides)
    ident = identity(resolved(cfg))
    batch = int(cfg.batch)
    epoch_batches = epoch_batches or [batch, batch]
    batches = [b for b in epoch_batches for _ in range(TRAIN_SIZE // b)]  # the batch of each update
    planned = len(batches)
    done = planned if updates is None else updates
    d = root / cfg.name / (folder or (",".join(o for o in overrides if not o.startswith("experiment=")) or "default"))
    d.mkdir(parents=True)
    a, b = dist_ab
    if events:
        w = SummaryWriter(str(d))
        w.add_scalar("weights/distance", 0.0, 0)
        for t in range(1, done + 1):
            w.add_scalar("weights/distance", a + b * np.log(t), t)
            if t % log_every == 0 or t == done:
                w.add_scalar("opt/batch_size", batches[t - 1], t)
                w.add_scalar("opt/noise_scale", 0.1 * TRAIN_SIZE / (batches[t - 1] * 0.1), t)
            if t % (TRAIN_SIZE // batches[t - 1]) == 0:
                w.add_scalar("val/error", 0.5 / t**0.5, t)
        w.close()
    schedule = [[i, b] for i, b in enumerate(epoch_batches) if i == 0 or b != epoch_batches[i - 1]]
    plan = make_plan(cfg, TRAIN_SIZE).summary()  # the regime's real LR schedule
    effective = {"lr": plan["lr"], "epochs": float(len(epoch_batches)), "updates": planned, "train_size": TRAIN_SIZE,
                 "batch_schedule": schedule, "lr_schedule": plan["lr_schedule"], "ghost_batch": plan["ghost_batch"],
                 "warmup_updates": plan["warmup_updates"]}
    res = Results.of_run(
        status, ident, identity_hash(ident, schema_defaults()), effective,
        bn_batch=int(cfg.ghost_batch) if cfg.regime.ghost_bn else batch,
        final_val_error=error, final_val_loss=0.3, best_val_error=error, updates=done, planned_updates=planned,
        target_updates=done, epochs=float(len(epoch_batches)) * done / planned, wall_time_s=1.5,
        images_per_sec=1000.0, final_distance=a + b * float(np.log(max(done, 1))),
        distance_fit=({"a": a, "b": b, "r2": 1.0, "points": done} if with_fit
                      else {"a": None, "b": None, "r2": None, "points": 0}),
        diverged_at=diverged_at, train_size=TRAIN_SIZE, error="RuntimeError: boom" if status == "failed" else None,
    )
    for k, v in fields.items():
        setattr(res, k, v)
    (d / "results.json").write_text(json.dumps(res.to_dict()))
    return d


def read_json_strict(path: Path) -> Any:
    """json.loads that refuses NaN/Infinity (as every other JSON parser does)."""
    def refuse(token: str) -> Any:
        raise ValueError(f"non-standard JSON token {token} in {path}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)
