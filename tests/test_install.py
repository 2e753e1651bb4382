"""lbtrain as a Python tool: a wheel and an sdist carry the configs, a non-editable install runs from any folder,
users add their own configs, `threads=`, training subsets, and progress a person can read in a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import sysconfig
import tarfile
import termios
import time
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import ROOT, SHARED_DATA, make_cfg, only_run, run_main

from lbtrain.data import class_balanced_subset, load_dataset
from lbtrain.trainer import Trainer


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (whl,) = out.glob("lbtrain-*.whl")
    return whl


def test_building_warns_about_no_ignored_config_folder(tmp_path):
    """Every config folder is a listed (data-only) package: setuptools' "Package would be ignored" warning, once
    per folder, used to bury an editable install's output."""
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "would be ignored" not in p.stdout + p.stderr


def test_wheel_carries_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"lbtrain/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names


def test_sdist_carries_the_configs(tmp_path):
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (sdist,) = tmp_path.glob("lbtrain-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"configs/config.yaml", "configs/experiment/digits.yaml", "configs/optimizer/lars.yaml"} <= names


def test_non_editable_install_runs_from_another_folder(wheel, tmp_path):
    """pip install of the wheel into a fresh virtual environment (reusing this one's torch), then `lbtrain`."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the installed dependencies (torch, hydra, ...), but not the editable lbtrain of this checkout
    Path(site, "_reuse_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    elsewhere = tmp_path / "somewhere_else"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LBTRAIN_TEST_SIGNAL")}
    where = subprocess.run([str(py), "-c", "import lbtrain.cli as c; print(c.__file__); print(c.CONFIG_DIR)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env)
    module, configs = where.stdout.split()
    assert module.startswith(str(venv)) and configs.startswith(str(venv))  # the installed copy, not this checkout
    p = subprocess.run([str(venv / "bin" / "lbtrain"), "max_steps=2"], cwd=elsewhere, capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((elsewhere / "outputs" / "digits" / "max_steps=2" / "results.json").read_text())
    assert res["status"] == "completed" and res["updates"] == 2


def test_own_configs_from_the_users_folder(tmp_path):
    """Hydra's own way: --config-dir (or hydra.searchpath) adds a user's experiment and model configs."""
    mine = tmp_path / "my_configs"
    (mine / "experiment").mkdir(parents=True)
    (mine / "model").mkdir()
    (mine / "experiment" / "tiny_digits.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /dataset: digits\n  - override /model: tiny_mlp\n"
        "name: tiny_digits\nbase: {batch: 32, lr: 0.05, milestones: [1], gamma: 0.1, momentum: 0.9,"
        " weight_decay: 0.0, epochs: 2, grad_clip: null}\n")
    (mine / "model" / "tiny_mlp.yaml").write_text("name: fc\nkwargs: {hidden: 16, depth: 1}\n")
    p = run_main("--config-dir", str(mine), "experiment=tiny_digits", "max_steps=3", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    run = only_run(tmp_path / "outputs" / "tiny_digits")
    res = json.loads((run / "results.json").read_text())
    assert run.name == "max_steps=3" and res["identity"]["model"] == {"name": "fc", "kwargs": {"hidden": 16,
                                                                                                 "depth": 1}}
    assert res["base_batch"] == 32
    p = run_main(f"hydra.searchpath=[file://{mine}]", "experiment=tiny_digits", "max_steps=3", cwd=tmp_path)
    assert p.returncode == 0 and "nothing to do" in p.stdout  # the same run, found the other way


def test_threads_reach_torch(tmp_path):
    before = torch.get_num_threads()
    try:
        t = Trainer(make_cfg("threads=1", "max_steps=1", "progress=false"), tmp_path)
        t.setup()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- subsets
def test_subset_is_class_balanced_and_fixed():
    y = torch.arange(1000) % 7  # 7 classes, 142-143 samples each
    idx = class_balanced_subset(y, 100, 7)
    counts = torch.bincount(y[idx], minlength=7)
    assert idx.numel() == 100 and len(set(idx.tolist())) == 100 and counts.max() - counts.min() <= 1
    assert torch.equal(idx, class_balanced_subset(y, 100, 7))  # a fixed draw, never the run's seed
    assert not torch.equal(idx, class_balanced_subset(y, 100, 7, seed=1))
    with pytest.raises(ValueError, match="fewer than its share"):
        class_balanced_subset(torch.cat([torch.zeros(10), torch.ones(200)]).long(), 100, 2)


def test_subset_is_the_runs_training_set(tmp_path):
    full = load_dataset(make_cfg().dataset)
    runs = []
    for seed in (0, 1):
        t = Trainer(make_cfg("dataset.subset=500", f"seed={seed}", "max_steps=1", "progress=false"),
                    tmp_path / str(seed))
        t.setup()
        runs.append(t)
    a, b = runs
    assert a.plan.train_size == 500 and a.plan.epoch_steps[0] == 500 // 16  # the regime counts the subset
    assert torch.equal(a.train_loader.x, b.train_loader.x)  # the same samples for every seed of a sweep
    assert torch.bincount(a.train_loader.y, minlength=10).tolist() == [50] * 10
    rows = {bytes(r) for r in full.train_x.flatten(1).numpy()}
    assert all(bytes(r) in rows for r in a.train_loader.x.cpu().flatten(1).numpy())  # samples of the split
    assert a.fit()["train_size"] == 500


@pytest.mark.skipif(not (SHARED_DATA / "FashionMNIST" / "raw").exists(), reason="no Fashion-MNIST copy")
def test_fashion_mnist_subset_of_10000(tmp_path):
    """The issue's command: LBTRAIN_DATA=... lbtrain experiment=f1_mnist dataset=fashion_mnist dataset.subset=10000"""
    p = run_main("experiment=f1_mnist", "dataset=fashion_mnist", "dataset.subset=10000", "max_steps=20", cwd=tmp_path,
                env={"LBTRAIN_DATA": str(SHARED_DATA)})
    assert p.returncode == 0, p.stderr
    res = json.loads(only_run(tmp_path / "outputs" / "f1_mnist").joinpath("results.json").read_text())
    assert res["train_size"] == 10000 and res["effective"]["updates"] == 40 * (10000 // 128)


# ------------------------------------------------------------------------------------------- progress
def test_epoch_lines_in_a_terminal_and_in_the_log(tmp_path):
    """Under a pseudo-terminal the tqdm bar shows, the per-epoch lines print above it, and lbtrain.log has them."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    env = {**{k: v for k, v in os.environ.items() if k != "LBTRAIN_TEST_SIGNAL"}, "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "lbtrain", "epochs=2"], cwd=tmp_path, stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.time() + 120
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(30)
    os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "upd/s" in text or "upd]" in text  # the progress bar
    assert "epoch 1/2 update 96/192" in text and "val_err" in text
    log = only_run(tmp_path / "outputs" / "digits").joinpath("lbtrain.log").read_text()
    assert "epoch 1/2 update 96/192" in log and "epoch 2/2 update 192/192" in log
    assert "results: " in text and "checkpoint: " in text  # where everything is, at the end
