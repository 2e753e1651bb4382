"""Steps to a target (stop at target.error, evaluations at most 2% apart), the held-out validation split, the
constant LR shape and exponential weight averaging: checked against closed forms and the runs' own records."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from helpers import make_cfg, only_run, run_cli, scalars

from lbtrain.data import load_dataset
from lbtrain.ewa import WeightAverage
from lbtrain.regime import make_plan
from lbtrain.target import TargetBound, target_steps
from lbtrain.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_target_steps_are_at_most_the_resolution_apart():
    for total, r in ((40, 0.02), (5000, 0.02), (20000, 0.05)):
        s = sorted(target_steps(total, r))
        assert s[0] == 1 and s[-1] == total
        assert all(b - a <= max(1, math.ceil(r * a)) for a, b in zip(s, s[1:]))
        assert all(b - a == 1 for a, b in zip(s, s[1:]) if b <= 1 / r)  # every update at the start


def test_constant_schedule_keeps_the_lr_after_warmup():
    plan = make_plan(make_cfg("base.schedule=constant", "regime=linear", "batch=64", "regime.warmup_epochs=1"), 1536)
    w = plan.warmup_updates
    assert w == 24 and plan.lr == pytest.approx(0.1 * 64 / 16)
    assert [plan.lr_at(u) for u in (w, w + 1, plan.total_updates - 1)] == [plan.lr] * 3
    assert plan.lr_at(0) == pytest.approx(0.1) and plan.lr_at(w // 2) == pytest.approx(0.1 + (0.4 - 0.1) / 2)
    assert plan.summary()["lr_schedule"] == [[w, plan.lr]]


def test_samples_at_follows_a_growing_batch():
    plan = make_plan(make_cfg("regime=batch_increase", "epochs=4", "base.milestones=[1,2]", "base.gamma=0.5"), 1536)
    # epoch 0: 96 updates of 16, epoch 1: 48 of 32, epochs 2-3: 24 of 64 each
    assert plan.epoch_batches == (16, 32, 64, 64)
    assert plan.samples_at(96) == 1536 and plan.samples_at(100) == 1536 + 4 * 32
    assert plan.samples_at(plan.total_updates) == 4 * 1536


def _stop_at(tmp_path, name, *overrides):
    """A digits run stopping at its target; returns (results, trainer, samples looked at by bounded checks)."""
    t = Trainer(make_cfg("progress=false", "threads=1", "deterministic=true", *overrides), tmp_path / name)
    t.setup()
    looked = []
    samples = t.val_loader.samples
    t.val_loader.samples = lambda idx: (looked.append(len(idx)), samples(idx))[1]
    return t.fit(), t, sum(looked)


@pytest.mark.parametrize("target", ["target.error=0.12", "target.loss=0.45"])
def test_the_run_stops_at_its_target_and_records_where(tmp_path, target):
    """With every target point evaluated in full and logged (target.log_all), the crossing recomputed from
    TensorBoard is the run's; the default (the bound: a point is decided from its hardest samples) stops at the same
    update with the same weights, records and crossing value, having looked at fewer samples."""
    full, t_full, looked_full = _stop_at(tmp_path, "full", target, "target.log_all=true")
    metric, value = target.split("=")[0].split(".")[1], float(target.split("=")[1])
    val = scalars(tmp_path / "full")[f"val/{metric}"]
    first = next(step for step, v in val if v <= value)  # recomputed from TensorBoard
    tgt = full["target"]
    assert tgt["reached"] and tgt["update"] == first == full["updates"] < full["planned_updates"]
    assert tgt["samples"] == first * 16 and tgt["split"] == "val" and full["status"] == "completed"
    before = max(step for step, _ in val if step < first)
    assert tgt["resolution"] == first - before <= max(1, math.ceil(0.02 * first))
    assert looked_full == 0 and first > 10  # (a crossing after several points: the bound had work to do)

    fast, t_fast, looked = _stop_at(tmp_path, "fast", target)
    same = ("updates", "final_val_error", "final_val_loss", "best_val_error", "target", "final_distance")
    assert {k: fast[k] for k in same} == {k: full[k] for k in same}
    assert all(torch.equal(a, b) for a, b in zip(t_fast.net.state_dict().values(), t_full.net.state_dict().values()))
    points = sum(1 for s in t_fast.target_steps if s < first)
    assert 0 < looked < 0.5 * points * len(t_fast.val_loader)  # not every point evaluated in full
    fast_val = dict(scalars(tmp_path / "fast")[f"val/{metric}"])
    assert fast_val[first] == dict(val)[first] and len(fast_val) < len(val)  # the crossing is a full evaluation


def test_the_bound_never_calls_a_reached_target_above():
    """Against brute force: for random per-sample outcomes and any order, a prefix declared above the target only
    when the whole split is; an error exactly at the target (k = E n) is never above."""
    g = torch.Generator().manual_seed(0)
    for n, value in ((261, 0.12), (2000, 0.05), (100, 0.3)):
        for _ in range(200):
            wrong = (torch.rand(n, generator=g) < torch.rand((), generator=g)).float()
            bound = TargetBound("error", value, n, torch.device("cpu"))
            bound.record(torch.randperm(n, generator=g), torch.rand(n, generator=g))
            total = wrong.sum().item()
            order, partial, said_above = bound.order(), 0.0, False
            for lo, hi in bound.chunks():
                partial += wrong[order[lo:hi]].sum().item()
                said_above = said_above or bound.above(partial)
            assert said_above == (total / n > value)
        exact = TargetBound("error", value, n, torch.device("cpu"))
        assert not exact.above(math.floor(value * n)) and exact.above(math.floor(value * n) + 1)
    loss = TargetBound("loss", 0.5, 1000, torch.device("cpu"))
    assert not loss.above(500.0) and not loss.above(500.004) and loss.above(500.01)


def test_the_bound_looks_at_the_hardest_samples_first():
    bound = TargetBound("error", 0.05, 2000, torch.device("cpu"))
    assert [c for c in bound.chunks()] == [(0, 126), (126, 378), (378, 882), (882, 1890), (1890, 2000)]
    bound.record(torch.arange(1000), torch.linspace(0, 1, 1000))  # the other 1000: never looked at, first
    order = bound.order()
    assert order[:1000].tolist() == list(range(1000, 2000)) and order[1000:1003].tolist() == [999, 998, 997]


def test_holdout_is_class_balanced_disjoint_and_fixed(tmp_path):
    ds = load_dataset(make_cfg("dataset.holdout=200").dataset)
    full = load_dataset(make_cfg().dataset)
    assert ds.train_size == 1536 - 200 and ds.val_size == 200
    assert torch.equal(ds.test_x, full.val_x)  # the official validation split became the test split
    counts = torch.bincount(ds.val_y, minlength=10)
    assert counts.min() >= 20 and counts.max() <= 20
    rows = {tuple(r) for r in full.train_x.flatten(1).tolist()}
    held = [tuple(r) for r in ds.val_x.flatten(1).tolist()]
    trained = {tuple(r) for r in ds.train_x.flatten(1).tolist()}
    assert all(r in rows for r in held) and not (set(held) & trained)
    again = load_dataset(make_cfg("dataset.holdout=200", "seed=5").dataset)
    assert torch.equal(again.val_x, ds.val_x)  # never the run's seed
    t = Trainer(make_cfg("dataset.holdout=200", "max_steps=3", "progress=false", "threads=1"), tmp_path)
    t.setup()
    res = t.fit()
    assert res["train_size"] == 1336 and res["final_test_error"] is not None
    assert "test/error" in scalars(tmp_path)


def test_weight_average_matches_its_formula():
    net = torch.nn.Linear(3, 2)
    avg = WeightAverage(net, decay=0.9)
    expect = [p.detach().clone() for p in net.parameters()]
    for t in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        d = min(0.9, (1 + t) / (10 + t))
        expect = [d * e + (1 - d) * p.detach() for e, p in zip(expect, net.parameters())]
        avg.update(list(net.parameters()))
    for a, e in zip(avg.params, expect):
        assert torch.allclose(a, e, atol=1e-6)
    other = WeightAverage(net, decay=0.9)
    other.load_state_dict(avg.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.params, avg.params)) and other.updates == 5


def test_ewa_survives_an_interruption_bit_for_bit(tmp_path):
    from lbtrain.checkpoint import load_checkpoint

    args = ("ewa.decay=0.95", "max_steps=30", "checkpoint.every_steps=7", "deterministic=true")
    ref = tmp_path / "ref"
    ref.mkdir()
    assert run_cli(*args, cwd=ref).returncode == 0
    cut = tmp_path / "cut"
    cut.mkdir()
    p = run_cli(*args, cwd=cut, env={"LBTRAIN_TEST_SIGNAL": "SIGTERM@12"})
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-2000:]
    assert run_cli(*args, cwd=cut).returncode == 0
    a = load_checkpoint(only_run(ref / "outputs" / "digits") / "checkpoint.pt")
    b = load_checkpoint(only_run(cut / "outputs" / "digits") / "checkpoint.pt")
    assert a["ewa"]["updates"] == b["ewa"]["updates"] == 30
    assert all(torch.equal(x, y) for x, y in zip(a["ewa"]["params"], b["ewa"]["params"]))
    res = json.loads((only_run(cut / "outputs" / "digits") / "results.json").read_text())
    assert res["final_val_error"] is not None


def test_a_stop_at_target_survives_an_interruption_bit_for_bit(tmp_path):
    """Killed between two target points and resumed: the same crossing, the same weights and the same hardest-first
    order (it travels in the checkpoint) as the run that was never interrupted."""
    from lbtrain.checkpoint import load_checkpoint

    args = ("target.error=0.12", "checkpoint.every_steps=7", "deterministic=true")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir(), cut.mkdir()
    assert run_cli(*args, cwd=ref).returncode == 0
    p = run_cli(*args, cwd=cut, env={"LBTRAIN_TEST_SIGNAL": "SIGTERM@20"})
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-2000:]
    assert run_cli(*args, cwd=cut).returncode == 0
    runs = [only_run(d / "outputs" / "digits") for d in (ref, cut)]
    a, b = (json.loads((r / "results.json").read_text()) for r in runs)
    assert a["target"]["reached"] and a["target"] == b["target"] and a["updates"] == b["updates"] > 20
    ca, cb = (load_checkpoint(r / "checkpoint.pt") for r in runs)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert torch.equal(ca["target_bound"]["scores"], cb["target_bound"]["scores"])


def test_target_keys_are_checked():
    from lbtrain.config import ConfigError, validate

    for bad, msg in ((("target.error=1.5",), "target.error"), (("target.error=0.1", "target.loss=0.5"), "one target"),
                     (("ewa.decay=1.0",), "ewa.decay"), (("target.resolution=0",), "target.resolution")):
        with pytest.raises(ConfigError, match=msg):
            validate(make_cfg(*bad))


def test_validation_error_is_the_exact_fraction_of_errors(tmp_path):
    """k errors in n samples is k / n as division gives it (1 - correct / n is off by an ulp for many k): a target of
    exactly k / n is then reached where the run's TensorBoard point says so."""
    t = Trainer(make_cfg("max_steps=3", "progress=false", "threads=1"), tmp_path)
    t.setup()
    for _ in range(12):  # (1 - c / 261 differs from (261 - c) / 261 for 107 of the 262 counts c)
        err = t.evaluate()["val/error"]
        k = round(err * 261)
        assert err == k / 261
        t.train_step(*next(iter(t.train_loader.epoch(0, 16, 0, 0, 1))), False)
