"""The report's scaling section on hand-made run folders with known crossing points (lbtrain.analysis.scaling)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import TRAIN_SIZE, make_run
from torch.utils.tensorboard import SummaryWriter

from lbtrain.analysis import report, scaling


def first_crossing(batch: int, target: float) -> int | None:
    """make_run logs val/error = 0.5 / sqrt(t) at every epoch end (TRAIN_SIZE // batch updates per epoch, 2
    epochs): the first epoch end t with 0.5 / sqrt(t) <= target."""
    per_epoch = TRAIN_SIZE // batch
    for t in (per_epoch, 2 * per_epoch):
        if 0.5 / math.sqrt(t) <= target:
            return t
    return None


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for batch in (16, 32, 64):
        for seed in (0, 1):
            make_run(tmp_path, f"batch={batch}", f"seed={seed}")
    make_run(tmp_path, "batch=64", "regime=adapt")
    make_run(tmp_path, "batch=128", status="diverged", error=None, diverged_at=3)
    return tmp_path


def test_steps_to_target_at_known_crossings(sweep: Path):
    runs = report.find_runs([sweep])
    target = 0.1  # 0.5 / sqrt(t) <= 0.1 from t = 25 on: the first epoch end at or after 25
    rows = {(r["regime"], r["batch"]): r for r in scaling.steps_to_target(runs, target)}
    for batch in (16, 32, 64):
        t = first_crossing(batch, target)
        row = rows[("baseline", batch)]
        assert row["reached"] == "2 of 2" and row["update_mean"] == t and row["update"] == f"{t} ± 0"
        assert row["images_mean"] == t * batch  # constant batch: updates x batch
        assert row["epochs_mean"] == pytest.approx(t / (TRAIN_SIZE // batch))
    assert rows[("baseline", 128)]["reached"] == "0 of 1" and rows[("baseline", 128)]["update"] == "not reached"
    never = {(r["regime"], r["batch"]): r for r in scaling.steps_to_target(runs, 0.001)}
    assert all(r["update"] == "not reached" for r in never.values())


def test_crossing_ignores_points_after_divergence(tmp_path: Path):
    d = make_run(tmp_path, "batch=64", status="diverged", error=None, diverged_at=5)
    w = SummaryWriter(str(d))
    w.add_scalar("val/error", 0.0, 7)  # logged after the blow-up: not a real crossing
    w.close()
    (run,) = report.find_runs([tmp_path])
    assert scaling.crossing(run, 0.01) is None


def test_images_follow_a_growing_batch(tmp_path: Path):
    make_run(tmp_path, "regime=batch_increase", epoch_batches=[16, 32, 64])
    (run,) = report.find_runs([tmp_path])
    per = TRAIN_SIZE // 16, TRAIN_SIZE // 32  # 64 updates of 16, then 32 of 32, then 16 of 64
    assert scaling.images_at(run, per[0]) == TRAIN_SIZE
    assert scaling.images_at(run, per[0] + 10) == TRAIN_SIZE + 10 * 32
    assert scaling.images_at(run, per[0] + per[1] + 1) == 2 * TRAIN_SIZE + 64


def test_knee_recovers_a_known_critical_batch():
    s_min, b_crit = 200.0, 300.0
    rows = [{"experiment": "e", "dataset": "d", "regime": "r", "batch": b, "reached": "3 of 3",
             "update_mean": s_min * (1 + b_crit / b), "b_simple_at_target": 280.0} for b in (32, 64, 128, 512, 2048)]
    (k,) = scaling.knee(rows)
    assert k["S_min"] == pytest.approx(s_min) and k["B_crit"] == pytest.approx(b_crit)
    assert k["B_simple_at_target"] == 280.0 and k["batches"] == 5
    rows[0]["reached"] = "2 of 3"  # a batch where some seeds missed the target is not fitted
    assert scaling.knee(rows)[0]["batches"] == 4


def test_report_cli_adds_the_scaling_section(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "rep"
    assert report.main([str(sweep), "--out", str(out), "--target-error", "0.1"]) == 0
    stdout = capsys.readouterr().out
    assert "Steps to validation error <= 0.1" in stdout
    for name in ("steps_to_target.md", "steps_to_target.csv", "steps_to_target.png", "knee.md"):
        assert (out / name).is_file(), name
    for bad in ("0", "1.5", "-0.2"):
        assert report.main([str(sweep), "--out", str(out), "--target-error", bad]) == 2
        assert "must be in (0, 1)" in capsys.readouterr().err
