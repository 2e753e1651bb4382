"""Checkpoint history (`checkpoint.keep`, `checkpoint.keep_per_decade`): checkpoints kept at chosen updates
besides the rolling one, each complete, atomic, named by its update, and exactly the run's state there."""

from __future__ import annotations

import pytest
import torch
from helpers import make_cfg

from lbtrain.checkpoint import load_checkpoint, read_checkpoint_meta
from lbtrain.config import resolved
from lbtrain.identity import identity
from lbtrain.metrics import keep_points
from lbtrain.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_keep_points_closed_form():
    cfg = make_cfg("checkpoint.keep=[0.25,7,1000]", "checkpoint.keep_per_decade=2").checkpoint
    assert keep_points(cfg, 384) == {96, 7, 1, 3, 10, 32, 100, 316, 384}  # 1000 > 384 updates: not a point
    assert keep_points(make_cfg().checkpoint, 384) == set()


def test_kept_checkpoints_are_the_run_at_that_update(tmp_path):
    args = ("deterministic=true", "progress=false", "threads=1", "log_every=5")
    t = Trainer(make_cfg(*args, "checkpoint.keep=[12,0.5]", "max_steps=40"), tmp_path / "kept")
    t.setup()
    t.fit()
    folder = tmp_path / "kept" / "checkpoints"
    # 0.5 of the 384-update plan is update 192, after max_steps=40 stopped the run
    assert sorted(p.name for p in folder.iterdir()) == ["update_00000012.pt"]
    kept = load_checkpoint(folder / "update_00000012.pt")
    assert kept["state"]["step"] == 12 and read_checkpoint_meta(folder / "update_00000012.pt")["step"] == 12
    short = Trainer(make_cfg(*args, "max_steps=12"), tmp_path / "short")
    short.setup()
    short.fit()
    ref = load_checkpoint(tmp_path / "short" / "checkpoint.pt")
    for k, v in ref["model"].items():
        assert torch.equal(kept["model"][k], v), k  # bit for bit the run at update 12


def test_history_keys_are_run_only():
    assert identity(resolved(make_cfg("checkpoint.keep=[5]"))) == identity(resolved(make_cfg()))
