"""scripts/bench.py runs end to end (--quick) and measures what it says it measures.

The quick run is instrumented from outside (the script is not touched): its clock (`time.perf_counter` as bench.py
sees it) advances only when an optimizer steps, by a fixed cost per path (much more for a path's first update, the
warm-up, and for evaluation), so every images/s and ratio has an exact expected value that holds only if each
path's timed window spans exactly its `steps` timed updates; a global optimizer
hook and the loss count each path's updates and training samples; the lbtrain path's training set is compared with
the arrays the other two paths use. No real timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parent.parent
COST = {"limit": 0.25, "lbtrain": 1.0, "reference": 4.0}  # fake seconds per optimizer update of each path
SLOW = 1000.0  # fake seconds added to each path's first update (the warm-up) and to every evaluation batch


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


class Recorder:
    """What each (workload, path) of a bench run did, observed from outside the script."""

    def __init__(self) -> None:
        self.now = 100.0  # the fake clock
        self.where: tuple[str, str] | None = None  # (workload, path) running now
        self.updates: Counter = Counter()  # optimizer steps (a global torch hook: whatever the optimizer class)
        self.samples: Counter = Counter()  # samples through the training loss (grad enabled)
        self.params: dict[tuple[str, str], set[int]] = {}  # trainable parameters the optimizer stepped
        self.data = None  # the arrays bench made for the current workload
        self.same_data: dict[str, bool] = {}  # workload -> the lbtrain path trained on exactly those arrays

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name):  # the rest of the `time` module, real
        return getattr(time, name)

    def on_step(self, optimizer, args, kwargs) -> None:
        if self.where is None:
            return
        self.now += COST[self.where[1]] + (SLOW if not self.updates[self.where] else 0.0)
        self.updates[self.where] += 1
        count = sum(p.numel() for g in optimizer.param_groups for p in g["params"] if p.requires_grad)
        self.params.setdefault(self.where, set()).add(count)


def _instrument(mp: pytest.MonkeyPatch, bench, rec: Recorder) -> None:
    from lbtrain.trainer import Trainer

    mp.setattr(bench, "time", rec)
    real_ce, real_setup, real_data = F.cross_entropy, Trainer.setup, bench.make_synthetic

    def cross_entropy(input, target, *args, **kwargs):
        if rec.where is not None and torch.is_grad_enabled():
            rec.samples[rec.where] += target.shape[0]
        elif rec.where is not None:  # evaluation: never inside a timed window
            rec.now += SLOW
        return real_ce(input, target, *args, **kwargs)

    def make_synthetic(*args, **kwargs):
        rec.data = real_data(*args, **kwargs)
        return rec.data

    def setup(self):
        real_setup(self)
        x, y = self.train_loader.x.cpu(), self.train_loader.y.cpu()
        rec.same_data[rec.where[0]] = torch.equal(x, rec.data.train_x) and torch.equal(y, rec.data.train_y)

    def at(path, run):
        def wrapped(wl, *args):
            rec.where = (wl.name, path)
            try:
                return run(wl, *args)
            finally:
                rec.where = None
        return wrapped

    mp.setattr(F, "cross_entropy", cross_entropy)
    mp.setattr(Trainer, "setup", setup)
    mp.setattr(bench, "make_synthetic", make_synthetic)
    for path in bench.PATHS:
        mp.setattr(bench, f"run_{path}", at(path, getattr(bench, f"run_{path}")))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    bench = _load("bench")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    rec = Recorder()
    handle = register_optimizer_step_post_hook(rec.on_step)
    try:
        with pytest.MonkeyPatch.context() as mp:
            _instrument(mp, bench, rec)
            # one thread: on a small shared machine, 2-thread OpenMP regions stall whenever another process runs
            res = bench.main(["--quick", "--device", "cpu", "--workers", "1", "--threads", "1", "--json", str(out)])
    finally:
        handle.remove()
    return bench, res, json.loads(out.read_text()), rec


def test_quick_bench_produces_every_row(quick_run):
    bench, res, _, _ = quick_run
    rows = {(r["workload"], r["path"]): r for r in res["rows"]}
    assert set(rows) == {(w, p) for w in bench.DEFAULT_WORKLOADS for p in bench.PATHS}
    for (workload, path), r in rows.items():
        assert r["steps"] == 2 and r["batch"] > 0
        for key in ("images_per_sec", "seconds", "step_ms_mean", "step_ms_median"):
            assert _positive(r[key]), (workload, path, key, r[key])
    # the reference runs one chunk per ghost batch; lbtrain's run kept its dataset as uint8
    assert rows[("resnet44_cifar10", "reference")]["chunks"] == 4
    assert rows[("f1_mnist", "reference")]["chunks"] == 1
    for workload in bench.DEFAULT_WORKLOADS:
        mem = res["memory"][workload]
        resident = mem["dataset_resident_bytes"]
        assert resident["uint8"] > 0 and resident.get("float32", 0) < 1024  # images are held as uint8 only
        assert sum(resident.values()) < mem["dataset_float32_copy_bytes"]


def test_the_three_paths_train_alike(quick_run):
    """Same number of updates, of the same batch, of the same model, on the same data: a comparison of like with
    like (each counted by hooks outside the script, not taken from its rows)."""
    bench, res, _, rec = quick_run
    rows = {(r["workload"], r["path"]): r for r in res["rows"]}
    for workload in bench.DEFAULT_WORKLOADS:
        row = rows[(workload, "lbtrain")]
        updates = row["warmup"] + row["steps"]
        batch = row["batch"]
        for path in bench.PATHS:
            where = (workload, path)
            assert rows[where]["batch"] == batch and rows[where]["warmup"] + rows[where]["steps"] == updates
            assert rec.updates[where] == updates, where  # optimizer steps actually made
            assert rec.samples[where] == updates * batch, where  # samples through the training loss
        params = [rec.params[(workload, path)] for path in bench.PATHS]
        assert all(len(p) == 1 for p in params) and params[0] == params[1] == params[2], params  # one model
        assert rec.same_data[workload], f"{workload}: lbtrain trained on other data than limit and reference"


def test_rates_and_ratios_come_from_the_timed_updates(quick_run):
    """Under the fake clock each update of a path costs COST[path] seconds (its warm-up and any evaluation far more):
    images/s is batch / cost exactly when the window holds exactly the `steps` updates after the warm-up (no
    warm-up, set-up or evaluation inside), and each ratio is the ratio of its own workload's measured rates."""
    bench, res, saved, _ = quick_run
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    rows = {(r["workload"], r["path"]): r for r in saved["rows"]}
    for (workload, path), r in rows.items():
        assert r["seconds"] == pytest.approx(r["steps"] * COST[path], rel=1e-12), (workload, path)
        assert r["images_per_sec"] == pytest.approx(r["batch"] / COST[path], rel=1e-12), (workload, path)
        assert r["step_ms_median"] == pytest.approx(1e3 * COST[path], rel=1e-9), (workload, path)
    for workload in bench.DEFAULT_WORKLOADS:
        ratios = saved["ratios"][workload]
        for other in ("limit", "reference"):
            expected = COST[other] / COST["lbtrain"]  # lbtrain's rate over the other's
            assert ratios[f"lbtrain_over_{other}"] == pytest.approx(expected, rel=1e-12), (workload, other)
            assert ratios[f"lbtrain_over_{other}_median"] == pytest.approx(expected, rel=1e-9), (workload, other)
    gbn = saved["gbn"]  # the GBN micro-benchmark keeps its own (real) clock
    assert gbn["ghosts"] == 32
    for key in ("plain_ms", "vectorized_ms", "loop_ms", "loop_over_vectorized", "vectorized_over_plain"):
        assert _positive(gbn[key]), key
    meta = saved["meta"]
    assert meta["device"] == "cpu" and meta["quick"] is True and meta["threads"] >= 1


def test_table_has_one_line_per_row(quick_run):
    bench, res, _, _ = quick_run
    table = bench.format_table(res)
    for r in res["rows"]:
        assert any(line.startswith(r["workload"]) and f" {r['path']} " in line for line in table.splitlines())
    assert "(2)/(1)" in table and "(2)/(3)" in table


def test_bad_workload_is_a_usage_error():
    bench = _load("bench")
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--device", "cpu", "--workloads", "nope", "--skip-gbn"])
    assert e.value.code == 2
