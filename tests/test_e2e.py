"""End-to-end runs of the real CLI on the embedded digits dataset, read back through TensorBoard."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli, run_main, scalars

TAGS = {"train/loss", "train/error", "val/loss", "val/error", "weights/distance", "opt/lr", "opt/batch_size",
        "opt/noise_scale", "opt/grad_norm", "perf/images_per_sec"}
RESULT_KEYS = {"status", "final_val_error", "best_val_error", "updates", "epochs", "wall_time_s", "images_per_sec",
               "final_distance", "distance_fit", "batch", "regime", "lr", "ghost_batch", "experiment", "seed"}


def test_default_run_end_to_end(tmp_path):
    p = run_cli(cwd=tmp_path)  # `lbtrain` with no arguments: 4 epochs of digits
    assert p.returncode == 0, p.stderr
    run = tmp_path / "outputs" / "digits" / "default"
    res = json.loads((run / "results.json").read_text())
    assert RESULT_KEYS <= set(res)
    assert res["status"] == "completed" and res["updates"] == 4 * 96 and res["epochs"] == pytest.approx(4)
    assert res["final_val_error"] < 0.2  # digits are easy: even 4 epochs learn them
    assert set(res["distance_fit"]) >= {"a", "b", "r2"}
    s = scalars(run)
    assert TAGS <= set(s)
    assert [st for st, _ in s["val/error"]] == [96, 192, 288, 384]  # steps count updates
    assert [st for st, _ in s["train/loss"]] == list(range(10, 385, 10)) + [384]
    dist = dict(s["weights/distance"])
    assert dist[0] == 0.0 and 0 < dist[1] < dist[10] < dist[384]
    assert {1, 2, 3, 10} <= set(dist)  # dense early
    assert all(v == 16 for _, v in s["opt/batch_size"])
    assert s["opt/lr"][0][1] == pytest.approx(0.1)
    # HParams live in the same run as the scalars
    assert (run / ".hydra" / "config.yaml").exists()
    assert len(list(run.glob("events.out.tfevents*"))) == 1


def test_rerun_of_completed_run_does_not_train_again(tmp_path):
    assert run_main("max_steps=5", cwd=tmp_path).returncode == 0
    p = run_main("max_steps=5", cwd=tmp_path)
    assert p.returncode == 0 and "nothing to do" in (p.stdout + p.stderr)


def test_batch_increase_logs_growing_batch(tmp_path):
    # digits recipe: LR x0.1 at epochs 2 and 3 of 4. Batch 16 -> 160 at epoch 2; 1600 would exceed the
    # 1536 training samples, so at epoch 3 the LR drops instead (hybrid).
    p = run_main("regime=batch_increase", "log_every=5", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    run = next((tmp_path / "outputs" / "digits").iterdir())
    s = scalars(run)
    batch = dict(s["opt/batch_size"])
    assert batch[95] == 16 and batch[190] == 16 and batch[195] == 160 and batch[210] == 160
    lr = dict(s["opt/lr"])
    assert lr[195] == pytest.approx(0.1) and lr[200] == pytest.approx(0.1) and lr[205] == pytest.approx(0.01)
    noise = dict(s["opt/noise_scale"])
    assert noise[95] == pytest.approx(10 * noise[195])  # same as a 10x LR drop
    res = json.loads((run / "results.json").read_text())
    assert res["updates"] == 2 * 96 + 2 * 9
    assert res["effective"]["batch_schedule"] == [[0, 16], [2, 160]]
