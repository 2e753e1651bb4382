"""A real multirun: every job its own folder, results.json and TensorBoard run (scalars + HParams), and the
summary built from them."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT, make_cfg, run_cli, run_main
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lbtrain.analysis import report


def test_two_batches_by_two_regimes(tmp_path):
    p = run_main("-m", "batch=16,32", "regime=baseline,adapt", "epochs=0.5", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    root = tmp_path / "outputs" / "digits"
    runs = sorted(d.name for d in root.iterdir() if d.is_dir())
    # batch=16 is the recipe's B_S, so it is not part of the names (a function of the identity)
    assert runs == ["batch=32,epochs=0.5", "batch=32,epochs=0.5,regime=adapt", "epochs=0.5",
                    "epochs=0.5,regime=adapt"]
    for name in runs:
        run = root / name
        res = json.loads((run / "results.json").read_text())
        assert res["status"] == "completed"
        assert len(list(run.glob("events.out.tfevents*"))) == 1  # one TensorBoard run per job
        acc = EventAccumulator(str(run))
        acc.Reload()
        assert {"train/loss", "val/error", "weights/distance"} <= set(acc.Tags()["scalars"])
        hp = acc.PluginTagToContent("hparams")
        assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hp)
        assert b"regime" in hp["_hparams_/session_start_info"] and res["regime"].encode() in \
            hp["_hparams_/session_start_info"]
    adapt32 = json.loads((root / "batch=32,epochs=0.5,regime=adapt" / "results.json").read_text())
    base32 = json.loads((root / "batch=32,epochs=0.5" / "results.json").read_text())
    assert adapt32["updates"] == 2 * base32["updates"] == 48

    # The summary's numbers are the runs' own.
    out = tmp_path / "report"
    summary = report.summarize([root], out)
    (row,) = summary["table1"]
    assert row["B_S"] == 16 and row["B_L"] == 32
    small = json.loads((root / "epochs=0.5" / "results.json").read_text())
    assert row["B_S baseline"] == f"{100 * (1 - small['final_val_error']):.2f}"
    assert row["+RA"] == f"{100 * (1 - adapt32['final_val_error']):.2f}"
    assert row["LB"] == f"{100 * (1 - base32['final_val_error']):.2f}"
    assert (out / "table1.md").exists() and (out / "runs.csv").exists()
    assert any(f.name.endswith("distance.png") for f in out.iterdir())


@pytest.mark.parametrize("sweep", ["demo", "table1", "smith"])
def test_shipped_sweeps_compose(sweep):
    cfg = make_cfg(f"sweep={sweep}")
    assert cfg.name


def test_submitit_launcher_config_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    p = run_cli("hydra/launcher=slurm", "--cfg", "hydra", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "submitit_slurm" in p.stdout or "SlurmLauncher" in p.stdout
    assert "tasks_per_node: 8" in p.stdout and "gpus_per_node: 8" in p.stdout


def test_local_parallel_launcher_config_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    p = run_cli("hydra/launcher=local", "--cfg", "hydra", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "JoblibLauncher" in p.stdout


def test_readme_commands_exist():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
