"""The GPU fast options, covered on the CPU: `precision=bf16`, `channels_last=true`, `compile=true` train end to end
through the real Trainer, and match the fp32 / contiguous / eager run within stated tolerances.

These options exist for the GPU (scripts/device_check.py measures them there); on the CPU they take the same code
paths (autocast, memory formats, torch.compile), so a mistake in how the trainer wires them shows up here first.

Tolerances (measured on this CPU, with margin):
  * bf16: the training loss at every log point within BF16_LOSS_TOL = 0.06 of the fp32 run's, relative to the fp32
    run's first logged loss. Measured (torch 2.14, this CPU): 0.024 for F1 with plain BN, 0.004 with ghost BN (the
    curves fall from 2.39 to 2.08). bf16 rounds activations to 8 mantissa bits and 32 updates at lr 0.1 amplify
    that; the curves agree on the progress made, not to the last digit. Both curves must also go down.
  * channels_last (fp32): the loss at every log point within CL_TOL = 1e-3 relative, and the final state (weights
    and BN statistics, one relative L2 distance) within 1e-3; measured 3e-6 and 1.3e-5: only the order of the
    convolutions' sums changes.
  * compile: resume after SIGTERM is bit-identical to the uninterrupted compiled run (slow: three compilations).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import make_cfg, only_run, run_cli, scalars

from lbtrain.checkpoint import load_checkpoint, read_checkpoint_meta
from lbtrain.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# F1 (5 x [Linear, BN, ReLU], narrowed to 64) on MNIST-shaped synthetic data: 512 samples, B=32: 16 updates/epoch.
F1 = ("experiment=f1_mnist", "dataset=synthetic", "dataset.shape=[1,28,28]", "dataset.train_size=512",
      "dataset.val_size=128", "model.kwargs.hidden=64", "base.batch=32", "epochs=2", "log_every=4",
      "deterministic=true", "threads=1", "progress=false", "checkpoint.every_epochs=0", "device=cpu")
# Keskar et al.'s C1 conv net on CIFAR-shaped data (as tests/test_instruments.py): 16 updates.
C1 = ("experiment=c1_cifar10", "dataset=synthetic", "dataset.shape=[3,8,8]", "dataset.train_size=128",
      "dataset.val_size=32", "dataset.augment=true", "model.kwargs.channels=8", "base.batch=16", "epochs=2",
      "log_every=4", "deterministic=true", "threads=1", "progress=false", "checkpoint.every_epochs=0", "device=cpu")
BF16_LOSS_TOL = 0.06
CL_TOL = 1e-3


def train(run_dir, *overrides: str) -> tuple[Trainer, dict, list[tuple[int, float]], list[tuple[torch.Size, bool]]]:
    """A run through the real Trainer; returns it, results.json's content, the logged train/loss curve and, per
    update, the (shape, channels_last?) of the batch it trained on."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    t = Trainer(make_cfg(*overrides), run_dir)
    curve: list[tuple[int, float]] = []
    batches: list[tuple[torch.Size, bool]] = []
    try:
        t.setup()
        t.hooks.log.append(lambda tr, s: curve.append((tr.state.step, s["train/loss"])))
        t.hooks.after_backward.append(lambda tr, x, y, log_now: batches.append(
            (x.shape, x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())))
        res = t.fit()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return t, res, curve, batches


@pytest.mark.parametrize("regime", [(), ("regime=gbn", "batch=64", "ghost_batch=16")], ids=["plain_bn", "ghost_bn"])
def test_bf16_trains_end_to_end_close_to_fp32(tmp_path, regime):
    _, ref, fp32, _ = train(tmp_path / "fp32", *F1, *regime)
    t, res, bf16, _ = train(tmp_path / "bf16", *F1, *regime, "precision=bf16")
    assert res["status"] == "completed" and res["updates"] == ref["updates"] > 0
    assert t.autocast.fast_dtype == torch.bfloat16 and t.autocast._enabled
    assert [s for s, _ in bf16] == [s for s, _ in fp32] and len(fp32) >= 4
    scale = fp32[0][1]
    worst = max(abs(a - b) for (_, a), (_, b) in zip(bf16, fp32)) / scale
    assert worst <= BF16_LOSS_TOL, (worst, bf16, fp32)
    print(f"bf16 worst loss difference {worst:.2e} of the first loss; fp32 {fp32[0][1]:.3f} -> {fp32[-1][1]:.3f}")
    assert fp32[-1][1] < 0.95 * scale and bf16[-1][1] < 0.95 * scale  # both learn (not a flat curve agreeing)
    assert abs(res["final_val_error"] - ref["final_val_error"]) <= 0.1
    for p in t.net.parameters():  # master weights stay fp32 under autocast
        assert p.dtype == torch.float32 and torch.isfinite(p).all()


def test_channels_last_trains_a_conv_net_end_to_end(tmp_path):
    ref_t, ref, contiguous, ref_batches = train(tmp_path / "contiguous", *C1)
    t, res, cl, batches = train(tmp_path / "channels_last", *C1, "channels_last=true")
    assert res["status"] == "completed" and res["updates"] == ref["updates"] == len(batches) > 0
    assert all(is_cl for _, is_cl in batches) and not any(is_cl for _, is_cl in ref_batches)  # the loader's layout
    convs = [m.weight for m in t.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)  # the model's
    assert [s for s, _ in cl] == [s for s, _ in contiguous]
    loss_diff = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(cl, contiguous))
    a, b = t.net.state_dict(), ref_t.net.state_dict()
    diff = norm = 0.0  # over the whole state (weights, BN statistics): one relative L2 distance
    for k in b:
        if b[k].is_floating_point():
            diff += float((a[k] - b[k]).pow(2).sum())
            norm += float(b[k].pow(2).sum())
        else:
            assert torch.equal(a[k], b[k]), k
    weight_diff = (diff / norm) ** 0.5
    print(f"channels_last: loss rel {loss_diff:.1e}, weights rel {weight_diff:.1e}")
    assert loss_diff <= CL_TOL and weight_diff <= CL_TOL


# ------------------------------------------------------------------------------------------------- compile
# The digits recipe (3-layer MLP with BN) compiled, 30 updates, checkpoints every 7; SIGTERM after update 12.
COMPILE_ARGS = ("compile=true", "deterministic=true", "max_steps=30", "checkpoint.every_steps=7", "log_every=5",
                "threads=1")


def _losses(run) -> list:
    return scalars(run)["train/loss"]


@pytest.mark.slow
def test_compiled_run_resumes_bit_identically(tmp_path):
    ref_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    ref_dir.mkdir()
    killed_dir.mkdir()
    p = run_cli(*COMPILE_ARGS, cwd=ref_dir, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ref = only_run(ref_dir / "outputs" / "digits")
    p = run_cli(*COMPILE_ARGS, cwd=killed_dir, env={"LBTRAIN_TEST_SIGNAL": "SIGTERM@12"}, timeout=600)
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, p.stderr[-3000:])
    run = only_run(killed_dir / "outputs" / "digits")
    meta = read_checkpoint_meta(run / "checkpoint.pt")
    assert meta["status"] == "interrupted" and meta["step"] == 12
    p = run_cli(*COMPILE_ARGS, cwd=killed_dir, timeout=600)  # the same command resumes, compiling again
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stdout + p.stderr
    assert json.loads((run / "results.json").read_text())["updates"] == 30
    mine, theirs = load_checkpoint(run / "checkpoint.pt")["model"], load_checkpoint(ref / "checkpoint.pt")["model"]
    assert mine.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k  # bit for bit
    assert _losses(run) == _losses(ref)


@pytest.mark.slow
def test_compile_start_up_cost_is_reported(tmp_path, capsys):
    """Not a bound: prints the wall time of `lbtrain max_steps=20` (the digits MLP) on this CPU without compile, with
    compile=true and a cold inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR, as on a fresh machine), then warm."""
    cache = tmp_path / "inductor-cache"
    walls = {}
    for name, compile_ in (("eager", "false"), ("compile, cold cache", "true"), ("compile, warm cache", "true")):
        cwd = tmp_path / name.replace(",", "").replace(" ", "-")
        cwd.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache)}
        env.pop("LBTRAIN_TEST_SIGNAL", None)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "lbtrain", f"compile={compile_}", "max_steps=20", "threads=1"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        walls[name] = time.perf_counter() - t0
        assert p.returncode == 0, p.stderr[-3000:]
    with capsys.disabled():
        print("\nlbtrain max_steps=20 on the CPU: " + ", ".join(f"{k} {v:.1f} s" for k, v in walls.items()))


@pytest.mark.slow
def test_compiled_ghost_bn_conv_net_survives_a_batch_change(tmp_path):
    """compile=true with ghost BN on a conv model under a growing batch: with dynamic shapes inductor failed on
    the first update at the larger batch (`cannot determine truth value of Relational`); one graph per batch size
    now."""
    p = run_cli("experiment=resnet44_cifar10", "dataset=synthetic", "dataset.shape=[3,16,16]",
                "dataset.train_size=512", "dataset.val_size=64", "model.kwargs.depth=8", "base.batch=16", "batch=32",
                "regime=batch_increase", "ghost_batch=8", "epochs=3", "base.milestones=[1,2]", "base.gamma=0.5",
                "compile=true", "threads=1", cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((only_run(tmp_path / "outputs" / "resnet44_cifar10") / "results.json").read_text())
    assert res["status"] == "completed" and res["effective"]["batch_schedule"][-1][1] > 32
