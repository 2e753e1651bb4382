"""Run identity: every number lbtrain reports says exactly which configuration produced it.

Unit tests of lbtrain.identity, then the CLI cases of the run-identity issue, each as the user would type it:
resume across configurations, a resumed-from run's own checkpoint, folder names, two writers, completed runs,
sweeps on the joblib launcher (a bad job, Ctrl-C), and the one-line errors that write nothing."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time

import pytest
from helpers import CONFIG_DIR, make_cfg, only_run, read_json_strict, run_cli, run_main, scalars
from hydra import compose, initialize_config_dir

from lbtrain.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lbtrain.cli import run_folder_name
from lbtrain.config import ConfigError, DatasetNotFoundError, resolved, schema_defaults
from lbtrain.identity import canonical, diff, flatten, identity, identity_hash, run_only
from lbtrain.results import ResultsError
from lbtrain.rundir import RunFolderError
from lbtrain.trainer import Interrupted, Trainer

DIGITS = ("outputs", "digits")


def ident(*overrides: str) -> dict:
    return identity(resolved(make_cfg(*overrides)))


def folder_name(*overrides: str) -> str:
    """The run folder's name for these overrides, as the CLI computes it (inside a Hydra app)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return run_folder_name(compose(config_name="config", overrides=list(overrides), return_hydra_config=True))


# ------------------------------------------------------------------------------------------- unit tests
def test_run_only_keys_are_not_identity():
    base = ident()
    for override in ("device=cpu", "deterministic=true", "channels_last=true", "compile=true", "log_every=7",
                     "eval_every=2", "checkpoint.every_steps=9", "progress=true", "dataset.root=/x", "threads=1",
                     "resume=/some/checkpoint.pt", "eval_per_decade=5", "gns=true", "sharpness.every_epochs=1",
                     "sharpness.samples=64", "layer_distance=true", "regime.label=X", "regime.rank=3",
                     "skip_bad_jobs=true", "checkpoint.keep=[5]", "checkpoint.keep_per_decade=2",
                     "gns_options.bn=eval", "gns_options.beta=0.9", "target.log_all=true", "eval_test=false",
                     "sharpness.bn=eval", "sharpness.bn_batch=32", "sharpness.top_k=2", "sharpness.every_steps=5",
                     "sharpness.per_decade=3", "sharpness.batch_batches=2"):
        assert ident(override) == base, override
    for override in ("seed=1", "batch=32", "base.lr=0.2", "regime=adapt", "precision=bf16", "max_steps=9",
                     "dataset.subset=500", "epochs=2", "optimizer=lars", "optimizer.eps=1e-6",
                     "base.schedule=cosine", "regime.momentum=0.95", "duplicates=2", "dataset.cutout=4",
                     "target.error=0.1", "ewa.decay=0.9", "dataset.holdout=100", "base.schedule=constant",
                     "optimizer.bias_correction=false", "optimizer.phi_bounds=[0,10]"):
        assert ident(override) != base, override
    assert set(flatten(base)) & set(run_only()) == set()
    # branch.*: a branch's keys are identity, except where its parent lies (the session records the parent's
    # identity hash instead: tests/test_branch.py); without a parent the node is not part of the identity at all
    branch = {"branch.parent": "/x", "branch.update": 5, "branch.samples": 64}
    as_args = lambda **change: [f"{k}={v}" for k, v in {**branch, **change}.items()]  # noqa: E731
    assert ident(*as_args()) != base and "branch" not in base
    assert ident(*as_args(**{"branch.parent": "/elsewhere"})) == ident(*as_args())
    for key, value in (("update", 6), ("k", 2), ("rule", "sqrt"), ("samples", 128), ("seed", 1)):
        assert ident(*as_args(**{f"branch.{key}": value})) != ident(*as_args()), key


def test_micro_batch_is_identity_only_without_ghost_bn():
    assert ident("batch=64", "micro_batch=32") != ident("batch=64")  # plain BN: normalizes over 32 samples
    assert ident("batch=64", "regime=gbn", "micro_batch=32") == ident("batch=64", "regime=gbn")  # exact equality


def test_hash_and_diff_treat_absent_keys_as_their_default():
    now = ident()
    old = json.loads(json.dumps(now))
    del old["dataset"]["subset"]  # an identity written before dataset.subset existed
    defaults = schema_defaults()
    assert identity_hash(old, defaults) == identity_hash(now, defaults)
    assert diff(old, now, defaults) == []
    assert diff(old, ident("dataset.subset=100"), defaults) == [("dataset.subset", None, 100)]
    assert "dataset.subset" not in canonical(now, defaults)


@pytest.mark.parametrize("a,b", [
    (("deterministic=true",), ("deterministic=True",)),
    (("base.lr=1e6",), ("base.lr=1000000.0",)),
    (("batch=16", "seed=0"), ()),  # the defaults of digits spelled out
    (("regime=baseline", "regime.lr_scaling=sqrt", "regime.ghost_bn=true", "regime.adapt_epochs=true",
      "regime.name=adapt"), ("regime=adapt",)),  # the same regime typed key by key
])
def test_folder_name_is_a_function_of_the_identity(a, b):
    assert folder_name(*a) == folder_name(*b)


def test_folder_names_read_as_the_differences():
    assert folder_name() == "default"
    assert folder_name("regime=adapt", "batch=512", "seed=2") == "batch=512,regime=adapt,seed=2"
    assert folder_name("base.lr=1e6") == "base.lr=1000000.0"
    assert folder_name("regime=gbn", "regime.warmup_epochs=1") == "regime=gbn,regime.warmup_epochs=1.0"
    assert folder_name("experiment=f1_mnist", "dataset=fashion_mnist") == "dataset=fashion_mnist"
    assert folder_name("ghost_batch=8", "regime=gbn") != folder_name("regime=gbn")


def test_user_errors_survive_pickling():
    """Sweep launchers (joblib, submitit) return a job's exception by pickling it."""
    errors = [ConfigError("batch", 40, "must be divisible"), ConfigError("model.kwargs", {"a": object()}, "bad"),
              DatasetNotFoundError("MNIST not found"), CheckpointError("corrupt"), RunFolderError("locked"),
              ResultsError("holds list"), Interrupted(signal.SIGINT), Interrupted(signal.SIGTERM)]
    for e in errors:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)
    assert pickle.loads(pickle.dumps(Interrupted(signal.SIGINT))).signum == signal.SIGINT


# --------------------------------------------------------------------------------------------- resume
def test_resume_refuses_another_configuration_listing_every_key(tmp_path):
    """The issue's commands: updates 1-20 at lr 0.1, then a resume that asks for linear scaling and momentum 0.5."""
    a, b = tmp_path / "A", tmp_path / "B"
    p = run_main("batch=64", f"hydra.run.dir={a}", cwd=tmp_path, env={"LBTRAIN_TEST_SIGNAL": "SIGTERM@20"})
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    p = run_main("batch=64", f"resume={a}/checkpoint.pt", "regime.lr_scaling=linear", "base.momentum=0.5",
                f"hydra.run.dir={b}", cwd=tmp_path)
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert "checkpoint belongs to another run" in line
    assert "base.momentum: 0.9 (checkpoint) vs 0.5 (this run)" in line
    assert "regime.lr_scaling: none (checkpoint) vs linear (this run)" in line
    assert not b.exists()  # nothing written


def test_resumed_run_continues_from_its_own_checkpoint(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    args = ("batch=64", "checkpoint.every_steps=5")
    assert run_main(*args, f"hydra.run.dir={a}", cwd=tmp_path,
                   env={"LBTRAIN_TEST_SIGNAL": "SIGTERM@20"}).returncode == 128 + signal.SIGTERM
    cmd = (*args, f"resume={a}/checkpoint.pt", f"hydra.run.dir={b}")
    p = run_main(*cmd, cwd=tmp_path, env={"LBTRAIN_TEST_SIGNAL": "SIGTERM@40"})
    assert p.returncode == 128 + signal.SIGTERM and f"resuming {a}/checkpoint.pt from update 20" in p.stdout
    p = run_main(*cmd, cwd=tmp_path)  # "re-run the same command"
    assert p.returncode == 0, p.stderr
    assert f"resuming {b}/checkpoint.pt from update 40" in p.stdout
    res = read_json_strict(b / "results.json")
    assert res["status"] == "completed" and res["updates"] == 96


def test_completed_run_stays_completed_without_its_checkpoint(tmp_path):
    assert run_main("max_steps=5", cwd=tmp_path).returncode == 0
    run = tmp_path.joinpath(*DIGITS, "max_steps=5")
    (run / "checkpoint.pt").unlink()
    (stale := run / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # killed mid-write
    events = {f.name: f.stat().st_size for f in run.glob("events.out.tfevents*")}
    before = (run / "results.json").read_text()
    p = run_main("max_steps=5", cwd=tmp_path)
    assert p.returncode == 0 and "nothing to do" in p.stdout
    assert {f.name: f.stat().st_size for f in run.glob("events.out.tfevents*")} == events  # nothing deleted
    assert (run / "results.json").read_text() == before and not (run / "checkpoint.pt").exists()
    assert not stale.exists()  # temporaries of a killed writer are removed (under the folder's lock)


# ---------------------------------------------------------------------------------------------- writers
def test_one_writer_per_folder(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "lbtrain", "epochs=200", f"hydra.run.dir={tmp_path / 'C'}"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not list((tmp_path / "C").glob("events.out.tfevents*")) and time.time() < deadline:
            time.sleep(0.2)
        events = list((tmp_path / "C").glob("events.out.tfevents*"))
        assert events, "the first run did not start"
        p = run_cli("epochs=200", f"hydra.run.dir={tmp_path / 'C'}", cwd=tmp_path)
        assert p.returncode == 2
        (line,) = p.stderr.strip().splitlines()
        assert f"pid {first.pid}" in line and "being written by another lbtrain process" in line
        assert events[0].exists() and first.poll() is None  # the live run's files and process untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
    assert read_json_strict(tmp_path / "C" / "results.json")["status"] == "interrupted"


# ---------------------------------------------------------------------------------------------- sweeps
@pytest.fixture
def joblib_launcher():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")


def test_joblib_sweep_survives_a_bad_job(tmp_path, joblib_launcher):
    p = run_cli("-m", "hydra/launcher=local", "batch=40,16", "seed=0,1", "regime=gbn", "max_steps=5",
                "skip_bad_jobs=true", cwd=tmp_path)
    assert p.returncode == 1 and "un-serialize" not in p.stderr
    assert "some jobs of the multirun failed; first failure: ghost_batch=16: must divide the batch (40)" in p.stderr
    res = {f.parent.name: read_json_strict(f) for f in tmp_path.rglob("results.json")}
    assert {k: v["status"] for k, v in res.items()} == {
        "batch=40,max_steps=5,regime=gbn": "failed", "batch=40,max_steps=5,regime=gbn,seed=1": "failed",
        "max_steps=5,regime=gbn": "completed", "max_steps=5,regime=gbn,seed=1": "completed"}
    assert all(r["identity_hash"] for r in res.values())


@pytest.mark.parametrize("to_group", [True, False], ids=["process_group", "parent_alone"])
def test_ctrl_c_stops_a_joblib_sweep_with_checkpoints(tmp_path, joblib_launcher, to_group):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LBTRAIN_TEST_SIGNAL", None)
    p = subprocess.Popen([sys.executable, "-m", "lbtrain", "-m", "hydra/launcher=local", "epochs=100",
                          "seed=0,1,2,3"], cwd=tmp_path, env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = tmp_path.joinpath(*DIGITS)
    deadline = time.time() + 90
    while len(list(root.glob("*/checkpoint.pt"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    if to_group:
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    else:
        os.kill(p.pid, signal.SIGINT)  # `kill -INT` of the lbtrain -m process alone: it forwards to the workers
    out, err = p.communicate(timeout=90)
    assert p.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err
    results = {f.parent.name: read_json_strict(f) for f in root.glob("*/results.json")}
    assert len(results) == 2 and {r["status"] for r in results.values()} == {"interrupted"}
    for name, r in results.items():  # each stopped job checkpointed where it stopped
        assert load_checkpoint(root / name / "checkpoint.pt")["state"]["step"] == r["updates"] > 0
    assert sorted(d.name for d in root.iterdir()) == sorted(results)  # the other jobs never started


# ------------------------------------------------------------------------------- mistakes: one line, no files
def test_rejected_command_touches_no_existing_run(tmp_path):
    assert run_main("max_steps=3", cwd=tmp_path).returncode == 0
    root = tmp_path.joinpath(*DIGITS)
    run = root / "max_steps=3"
    before = {f: f.stat().st_mtime_ns for f in run.rglob("*")}
    # the same folder, a resume file that does not exist: refused before anything is written
    p = run_main("max_steps=3", "dataset.subset=100000", cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    p = run_main("max_steps=3", "base.lr=-1", cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert sorted(d.name for d in root.iterdir()) == ["max_steps=3"]  # no new (empty) folder
    assert {f: f.stat().st_mtime_ns for f in run.rglob("*")} == before


def test_results_json_that_is_not_a_results_object(tmp_path):
    assert run_main("max_steps=2", cwd=tmp_path).returncode == 0
    res = tmp_path.joinpath(*DIGITS, "max_steps=2", "results.json")
    for content in ("[]", "null"):
        res.write_text(content)
        p = run_main("max_steps=2", cwd=tmp_path)
        assert p.returncode == 2
        (line,) = p.stderr.strip().splitlines()
        assert "not a results object" in line and "delete it to rebuild it from the checkpoint" in line
        assert res.read_text() == content  # not relabelled failed
    res.unlink()  # as the message says: the checkpoint knows the run completed
    p = run_main("max_steps=2", cwd=tmp_path)
    assert p.returncode == 0 and read_json_strict(res)["status"] == "completed" and "nothing to do" in p.stdout


def test_checkpoint_missing_a_key_is_one_line(tmp_path):
    assert run_main("max_steps=4", "checkpoint.every_steps=2", cwd=tmp_path,
                    env={"LBTRAIN_TEST_SIGNAL": "SIGTERM@3"}).returncode == 128 + signal.SIGTERM
    ckpt = tmp_path.joinpath(*DIGITS, "max_steps=4", "checkpoint.pt")
    state = load_checkpoint(ckpt)
    del state["optimizer"]
    save_checkpoint(ckpt, state, meta={"identity": state["identity"], "step": 3, "status": "interrupted"})
    mtime = ckpt.stat().st_mtime_ns
    p = run_main("max_steps=4", "checkpoint.every_steps=2", cwd=tmp_path)
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert "lacks 'optimizer'" in line and "Traceback" not in p.stderr
    assert ckpt.stat().st_mtime_ns == mtime and read_json_strict(ckpt.parent / "results.json")["updates"] == 3


def test_files_respect_the_umask(tmp_path):
    p = subprocess.run(["sh", "-c", f"umask 027 && exec {sys.executable} -m lbtrain max_steps=2"], cwd=tmp_path,
                       capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                            if k != "LBTRAIN_TEST_SIGNAL"})
    assert p.returncode == 0, p.stderr
    run = tmp_path.joinpath(*DIGITS, "max_steps=2")
    for name in ("results.json", "checkpoint.pt"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o640, name


def test_disk_full_is_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing the checkpoint: one line naming the file, exit 2."""
    import lbtrain.checkpoint as ckpt_module
    from lbtrain.cli import main

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module.os, "fsync", full)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lbtrain", "max_steps=2", "progress=false"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lbtrain: error: cannot write ") and "No space left on device" in line
    assert "checkpoint.pt" in line


def test_divergence_is_noticed_whatever_log_every_is(tmp_path):
    t = Trainer(make_cfg("log_every=100000", "base.lr=1e6", "base.grad_clip=null", "progress=false"), tmp_path)
    t.setup()
    res = t.fit()
    assert res["status"] == "diverged" and res["updates"] <= 16  # checked every 8 updates, no sync per step
    assert res["diverged_at"] == res["updates"]
    read_json_strict(tmp_path / "results.json")  # non-finite values written as null
    assert scalars(tmp_path)["status/diverged"][0][1] == 1.0
    assert res["distance_fit"]["b"] is None  # no log-t fit of a blow-up


def test_multirun_and_single_run_share_a_folder(tmp_path):
    assert run_main("-m", "max_steps=2", "deterministic=true", "seed=0", cwd=tmp_path).returncode == 0
    p = run_main("max_steps=2", "deterministic=True", cwd=tmp_path)
    assert p.returncode == 0 and "nothing to do" in p.stdout
    assert only_run(tmp_path.joinpath(*DIGITS)).name == "max_steps=2"
