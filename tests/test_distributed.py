"""Data-parallel training: two Gloo processes under torchrun equal one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import only_run as _only_run
from helpers import run_cli, scalars

from lbtrain.checkpoint import load_checkpoint, read_checkpoint_meta

# GBN with ghost 16 inside each rank's 32 samples of the global batch 64. LR 0.01: at larger LRs this tiny net
# amplifies float rounding (the order of DDP's gradient all-reduce) far beyond a tight tolerance within steps.
ARGS = ("regime=gbn", "batch=64", "ghost_batch=16", "max_steps=40", "base.lr=0.01", "log_every=5",
        "deterministic=true", "checkpoint.every_steps=10")
RUN = ("outputs", "digits")


def torchrun(*args: str, cwd, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lbtrain", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def only_run(cwd):
    return _only_run(cwd.joinpath(*RUN))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("single")
    p = run_cli(*ARGS, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return only_run(cwd)


def assert_same_run(run, reference):
    a = load_checkpoint(run / "checkpoint.pt")["model"]
    b = load_checkpoint(reference / "checkpoint.pt")["model"]
    # Parameters and the (rank-averaged) BN running statistics. Not bit-exact: DDP sums gradients in another
    # order than one process does, and 40 updates grow those rounding differences to ~5e-5 on weights ~0.1.
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4, msg=k)
    sa, sb = scalars(run), scalars(reference)
    for tag in ("train/loss", "train/error", "val/loss", "val/error", "weights/distance", "opt/lr"):
        assert [s for s, _ in sa[tag]] == [s for s, _ in sb[tag]], tag
        torch.testing.assert_close(torch.tensor([v for _, v in sa[tag]]), torch.tensor([v for _, v in sb[tag]]),
                                   rtol=1e-3, atol=2e-4, msg=tag)


def test_two_gloo_processes_equal_one(tmp_path, single):
    start = time.perf_counter()
    p = torchrun(*ARGS, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert p.returncode == 0, p.stderr[-3000:]
    run = only_run(tmp_path)
    res = json.loads((run / "results.json").read_text())
    assert res["world_size"] == 2 and res["status"] == "completed" and res["updates"] == 40
    assert_same_run(run, single)
    # only rank 0 writes: one event file, one log, one .hydra copy
    assert len(list(run.glob("events.out.tfevents*"))) == 1
    names = sorted(p.name for p in run.iterdir() if not p.name.startswith("events."))
    assert names == [".hydra", ".lock", "checkpoint.pt", "lbtrain.log", "results.json"]
    print(f"two-process run: {elapsed:.1f} s")


def test_killed_distributed_run_resumes_to_the_same_weights(tmp_path, single):
    p = torchrun(*ARGS, cwd=tmp_path, env={"LBTRAIN_TEST_SIGNAL": "SIGKILL@25"})
    assert p.returncode != 0
    assert read_checkpoint_meta(only_run(tmp_path) / "checkpoint.pt")["step"] == 24  # the epoch-end checkpoint
    p = torchrun(*ARGS, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(only_run(tmp_path), single)


def test_per_rank_ghost_batch_must_divide(tmp_path):
    p = torchrun("regime=gbn", "batch=64", "ghost_batch=64", "max_steps=1", cwd=tmp_path)
    assert p.returncode != 0
    assert "ghost_batch=64: must divide the per-process batch (32)" in p.stderr


def test_micro_batches_in_two_processes_equal_one_full_step_process(tmp_path, single):
    """Each rank splits its 32 samples into 2 micro-batches of 16 (= the ghost batch); DDP all-reduces once."""
    p = torchrun(*ARGS, "micro_batch=16", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_checkpoint(only_run(tmp_path) / "checkpoint.pt")["model"]
    b = load_checkpoint(single / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()
    for k in b:  # weights and BN running statistics (collected over micro-batches, one update per step)
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4, msg=k)


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_noise_scale_two_ranks_equal_one_process(tmp_path, bn):
    """`gns=true` under DDP. bn=train: each rank's local gradient (taken in a DDP comm hook, before the all-reduce)
    against the all-reduced one, |g_r|^2 averaged over the ranks; in one process the same two strided halves x[r::2]
    (the ranks' shares, whole ghost batches) by extra passes. bn=eval: each rank's eval-mode gradient with the
    rank-averaged running statistics, all-reduced; in one process the same halves. Same estimates up to float
    rounding (measured: 1e-5 relative; DDP sums gradients in another order, the estimators are differences of
    norms)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    gns = ("gns=true", f"gns_options.bn={bn}")
    p = run_cli(*ARGS, *gns, cwd=one)
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun(*ARGS, *gns, cwd=two)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = only_run(two), only_run(one)
    ra, rb = (json.loads((r / "results.json").read_text())["gns"] for r in (a, b))
    assert ra["measurements"] == rb["measurements"] == 8 and ra["train_size"] == rb["train_size"]
    assert ra["bn"] == rb["bn"] == bn
    for k in ("b_simple", "b_simple_uncorrected", "trace_cov", "grad_norm_sq"):
        assert ra[k] == pytest.approx(rb[k], rel=1e-3), k
    sa, sb = scalars(a), scalars(b)
    for tag in ("gns/b_simple", "gns/trace_cov", "gns/grad_norm_sq", "gns/b_simple_lo"):
        assert [s for s, _ in sa[tag]] == [s for s, _ in sb[tag]], tag
        torch.testing.assert_close(torch.tensor([v for _, v in sa[tag]]), torch.tensor([v for _, v in sb[tag]]),
                                   rtol=1e-3, atol=1e-6, msg=tag)
    assert all(v > 0 for _, v in sa["gns/trace_cov"])  # (what the per-rank pass against the global gradient missed)


def test_target_bound_under_two_processes_stops_where_full_evaluations_do(tmp_path):
    """The bound's looks are split over the ranks (each its share of every chunk, the counts all-reduced, the order
    kept the same on every rank): the run stops at the update, with the weights, that full evaluations give."""
    args = ("regime=gbn", "batch=64", "ghost_batch=16", "deterministic=true", "target.error=0.06", "max_steps=300")
    runs = {}
    for name, extra in (("bound", ()), ("full", ("target.log_all=true",))):
        (tmp_path / name).mkdir()
        p = torchrun(*args, *extra, cwd=tmp_path / name)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = only_run(tmp_path / name)
    bound, full = (json.loads((runs[k] / "results.json").read_text()) for k in ("bound", "full"))
    assert bound["target"]["reached"] and bound["target"] == full["target"] and bound["updates"] > 10
    a, b = (load_checkpoint(runs[k] / "checkpoint.pt")["model"] for k in ("bound", "full"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(scalars(runs["bound"])["val/error"]) < len(scalars(runs["full"])["val/error"])
