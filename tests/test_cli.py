"""User mistakes through the real CLI: one line on stderr naming the key, exit code 2, no traceback,
and nothing written but Hydra's own files."""

from __future__ import annotations

import pytest
from helpers import run_cli

BAD_INPUTS = [
    # (overrides, text the one line must contain)
    (["batch=abc"], "batch"),
    (["seed=1.5"], "seed"),
    (["regime=foo"], "regime=foo: unknown option; allowed: adapt, baseline"),
    (["experiment=nope"], "experiment=nope: unknown option"),
    (["bogus=1"], "bogus: unknown key"),
    (["regime.lr_scaling=cube"], "regime.lr_scaling"),
    (["batch=0"], "batch=0: must be an integer >= 1"),
    (["ghost_batch=0", "regime=gbn"], "ghost_batch=0: must be an integer >= 1"),
    (["ghost_batch=1", "regime=gbn"], "ghost_batch=1: must be >= 2"),
    (["batch=96", "ghost_batch=64", "regime=gbn"], "ghost_batch=64: must divide the batch (96)"),
    (["micro_batch=7"], "micro_batch=7: must divide the per-process batch (16)"),
    (["regime=batch_increase", "regime.max_batch=8"], "regime.max_batch=8: must be >= batch (16)"),
    (["base.lr=-0.1"], "base.lr=-0.1: must be a number > 0"),
    (["epochs=0"], "epochs=0.0: must be a number > 0"),
    (["batch=4096"], "batch=4096: exceeds the training set size (1536)"),
    (["device=tpu"], "device='tpu': allowed: auto, cpu, cuda"),
    (["experiment=f1_mnist", "dataset.root=/nonexistent/data"], "/nonexistent/data"),
    (["hydra.run.dir=/etc/hostname/run"], "/etc/hostname"),
    # the run-identity issue's tracebacks, now one line each
    (["epochs=0.001"], "epochs=0.001: gives 0 updates"),
    (["batch=1"], "batch=1: leaves 1 sample per BatchNorm statistic"),
    (["micro_batch=1"], "micro_batch=1: leaves 1 sample per BatchNorm statistic"),
    (["device=mps"], "device='mps': MPS (Apple GPU) is not available"),
    (["dataset=synthetic", "dataset.val_size=0"], "dataset.val_size=0: must be an integer >= 1"),
    (["dataset=synthetic", "dataset.num_classes=0"], "dataset.num_classes=0: must be an integer >= 2"),
    (["model.kwargs.hidden=0"], "model.kwargs="),
    (["+typo=1"], "typo=1: unknown key"),
    (["experiment=f1_mnist", "dataset.train_size=500"], "dataset.train_size=500: only dataset=synthetic reads it"),
    # optimizers, schedules, batch augmentation
    (["optimizer=adam"], "optimizer=adam: unknown option; allowed: adamw, lamb, lars, sgd"),
    (["optimizer=lars", "optimizer.trust_coefficient=-0.1"], "optimizer.trust_coefficient=-0.1: must be"),
    (["base.schedule=cosine", "regime=batch_increase"], "needs base.schedule=step"),
    (["duplicates=3"], "duplicates=3: must divide the batch (16)"),
    (["dataset.cutout=9"], "dataset.cutout=9: must be at most the image side (8)"),
    (["regime.momentum=1.5"], "regime.momentum=1.5: must be in [0, 1)"),
    # instruments
    (["sharpness.every_epochs=-1"], "sharpness.every_epochs=-1: must be an integer >= 0"),
    (["sharpness.every_epochs=1", "sharpness.samples=5000"], "sharpness.samples=5000: must be at most the 1536"),
    (["eval_per_decade=-2"], "eval_per_decade=-2: must be an integer >= 0"),
    # the adversarial pass (issue: what a new user and a deliberate pass of bad use still hit)
    (["base.milestones=[nan]"], "base.milestones=[nan]: must be epochs >= 0"),
    (["base.milestones=[inf]"], "base.milestones=[inf]: must be epochs >= 0"),
    (["seed=99999999999999999999"], "seed=99999999999999999999: must be an integer in [0, 2^63)"),
    (["epochs=1e9"], "more than a plan may have"),
    (["epochs=1e12"], "more than a plan may have"),
    (["regime.momentum=0.9428571428571428", "micro_batch=8"], "micro_batch=8: must divide the per-process batch (28)"),
    (["gns=2"], "gns='2': must be true or false"),
    (["optimizer=sgd", "optimizer.betas=[0.5,0.5]"], "optimizer.betas=[0.5, 0.5]: not used by sgd"),
    (["optimizer=lars", "optimizer.betas=[0.5,0.5]"], "optimizer.betas=[0.5, 0.5]: not used by lars"),
]


@pytest.mark.parametrize("overrides,expected", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_line(tmp_path, overrides, expected):
    p = run_cli(*overrides, "max_steps=1", cwd=tmp_path, env={"LBTRAIN_DATA": str(tmp_path / "nodata")})
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("lbtrain: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in p.stderr + p.stdout
    assert not list(tmp_path.rglob("results.json"))
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    assert not list(tmp_path.rglob("checkpoint.pt"))


def test_missing_mnist_says_where_and_how(tmp_path):
    p = run_cli("experiment=f1_mnist", cwd=tmp_path, env={"LBTRAIN_DATA": str(tmp_path / "empty")})
    assert p.returncode == 2
    line = p.stderr.strip()
    assert str(tmp_path / "empty") in line
    assert "dataset.root" in line and "dataset.download=true" in line and "LBTRAIN_DATA" in line


def test_cfg_job_shows_effective_values(tmp_path):
    p = run_cli("experiment=resnet44_cifar10", "batch=4096", "regime=adapt", "--cfg", "job", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "effective:" in p.stdout
    assert "epochs: 6400.0" in p.stdout and "ghost_batch: 128" in p.stdout
    assert "lr: 0.565685" in p.stdout  # 0.1 * sqrt(32)
    assert "batch_schedule: 0:4096" in p.stdout


def test_cfg_job_shows_only_the_keys_the_chosen_dataset_reads(tmp_path):
    from helpers import run_main

    digits = run_main("--cfg", "job", cwd=tmp_path)
    assert digits.returncode == 0, digits.stderr
    dataset_block = digits.stdout.split("\nmodel:")[0]
    for key in ("shape:", "num_classes:", "train_size:", "val_size:", "image_size:", "workers:"):
        assert key not in dataset_block, key
    assert "effective:" in digits.stdout and "train_size: 1536" in digits.stdout  # the run's own, derived
    synthetic = run_main("--cfg", "job", "dataset=synthetic", cwd=tmp_path)
    block = synthetic.stdout.split("\nmodel:")[0]
    assert "shape:" in block and "train_size: 1024" in block and "image_size:" not in block
    assert not (tmp_path / "outputs").exists()


def test_lamb_options_are_refused_for_other_optimizers(tmp_path):
    from helpers import run_main

    p = run_main("optimizer=sgd", "optimizer.bias_correction=false", "max_steps=1", cwd=tmp_path)
    assert p.returncode == 2 and "optimizer.bias_correction=False: not used by sgd" in p.stderr, p.stderr
    p = run_main("optimizer=lamb", "base.lr=0.01", "optimizer.phi_bounds=[2,1]", "max_steps=1", cwd=tmp_path)
    assert p.returncode == 2 and "optimizer.phi_bounds=[2.0, 1.0]: must be [lo, hi]" in p.stderr, p.stderr
    p = run_main("optimizer=lamb", "base.lr=0.01", "optimizer.bias_correction=false", "optimizer.phi_bounds=[0,10]",
                 "max_steps=2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
