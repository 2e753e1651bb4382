"""Resume after SIGKILL/SIGTERM is exact, checkpoints are verified, divergence is recorded, sweeps go on."""

from __future__ import annotations

import io
import json
import signal

import pytest
import torch
from helpers import make_cfg, only_run, run_cli, run_main, scalars

from lbtrain.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta, save_checkpoint
from lbtrain.trainer import Trainer

# Deterministic CPU run of the default digits recipe (384 updates, 96 per epoch), checkpointing every 7
# updates too, so a kill lands between checkpoints and mid-epoch.
ARGS = ("deterministic=true", "checkpoint.every_steps=7", "log_every=5")
RUN = ("outputs", "digits", "default")  # all three keys only change how the run executes


def tb_series(run_dir) -> dict:
    s = scalars(run_dir, every_write=True)
    s.pop("perf/images_per_sec")  # wall-clock, differs between any two runs
    return s


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run to compare against."""
    cwd = tmp_path_factory.mktemp("reference")
    p = run_cli(*ARGS, cwd=cwd)
    assert p.returncode == 0, p.stderr
    run = cwd.joinpath(*RUN)
    return load_checkpoint(run / "checkpoint.pt")["model"], tb_series(run)


def assert_same_as_reference(run, reference):
    weights, series = reference
    final = load_checkpoint(run / "checkpoint.pt")["model"]
    assert final.keys() == weights.keys()
    for k in weights:
        assert torch.equal(final[k], weights[k]), k  # bit for bit
    mine = tb_series(run)
    assert mine.keys() == series.keys()
    for tag in series:
        steps = [st for st, _ in mine[tag]]
        assert len(steps) == len(set(steps)), f"duplicate points in {tag}"
        assert mine[tag] == series[tag], tag


@pytest.mark.parametrize("kill_at", [40, pytest.param(96, marks=pytest.mark.slow),
                                     pytest.param(250, marks=pytest.mark.slow)])  # mid-epoch, an epoch end, later
def test_sigkill_then_resume_is_bit_exact(tmp_path, reference, kill_at):
    p = run_cli(*ARGS, cwd=tmp_path, env={"LBTRAIN_TEST_SIGNAL": f"SIGKILL@{kill_at}"})
    assert p.returncode == -signal.SIGKILL
    run = tmp_path.joinpath(*RUN)
    assert read_checkpoint_meta(run / "checkpoint.pt")["step"] < kill_at  # killed between checkpoints
    p = run_cli(*ARGS, cwd=tmp_path)  # the same command resumes
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stdout + p.stderr
    assert json.loads((run / "results.json").read_text())["status"] == "completed"
    assert_same_as_reference(run, reference)


def test_sigterm_checkpoints_and_resumes(tmp_path, reference):
    p = run_cli(*ARGS, cwd=tmp_path, env={"LBTRAIN_TEST_SIGNAL": "SIGTERM@100"})
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    run = tmp_path.joinpath(*RUN)
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "interrupted" and res["updates"] == 100
    assert read_checkpoint_meta(run / "checkpoint.pt")["step"] == 100
    p = run_cli(*ARGS, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads((run / "results.json").read_text())["status"] == "completed"
    assert_same_as_reference(run, reference)


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01  # one bit: the smallest corruption a disk or a copy can make
    return bytes(out)


def _corruptions(data: bytes, tensor: torch.Tensor) -> dict[str, bytes]:
    """A checkpoint file's bytes, damaged in each part of the v2 format: header line, JSON metadata, the zip's own
    records, the raw tensor bytes, and truncated."""
    header_end = data.index(b"\n") + 1
    digest_at = len(b"LBTRAIN-CKPT-2 ")
    n_meta = int(data[:header_end].split()[-1])
    raw = tensor.numpy().tobytes()
    tensor_at = data.find(raw)
    assert tensor_at > header_end + n_meta and data.find(raw, tensor_at + 1) == -1  # stored raw, once
    return {
        "digest in the header": _flip(data, digest_at + 10),
        "metadata": _flip(data, header_end + n_meta // 2),
        "tensor data": _flip(data, tensor_at + len(raw) // 2),
        "last tensor byte": _flip(data, tensor_at + len(raw) - 1),
        "zip records": _flip(data, len(data) - 100),
        "truncated to half": data[: len(data) // 2],
        "last byte missing": data[:-1],
        "payload missing": data[: header_end + n_meta],
    }


def _refusal(path) -> str:
    """load_checkpoint's error message, or LOADED."""
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        return str(e)
    return "LOADED"


def test_corrupt_checkpoint_is_reported_not_loaded(tmp_path):
    """A byte flipped anywhere, including inside the tensor data (which torch.load alone reads back silently), or a
    truncated file, is reported as corrupt by the checksum and never loaded."""
    path = tmp_path / "checkpoint.pt"
    w = torch.arange(1000.0)
    save_checkpoint(path, {"model": {"w": w}, "step": 7}, meta={"identity": {"seed": 0}, "step": 7})
    assert torch.equal(load_checkpoint(path)["model"]["w"], w)
    data = path.read_bytes()
    header_end = data.index(b"\n") + 1
    payload_at = header_end + int(data[:header_end].split()[-1])
    for what, bad in _corruptions(data, w).items():
        if what == "tensor data":  # without the checksum this would load, with one wrong weight
            state = torch.load(io.BytesIO(bad[payload_at:]), weights_only=False)
            assert not torch.equal(state["model"]["w"], w) and state["step"] == 7
        path.write_bytes(bad)
        assert "truncated or corrupt" in _refusal(path), what
    path.write_bytes(b"garbage")
    assert "not an lbtrain checkpoint" in _refusal(path)
    # the header's length field (where the metadata ends) is outside the checksum: a damaged one must not load
    n = payload_at - header_end
    for other in (n - 1, n + 1):
        path.write_bytes(data[:header_end].replace(b" %d\n" % n, b" %d\n" % other) + data[header_end:])
        assert _refusal(path) != "LOADED", other


def test_truncated_run_checkpoint_through_cli(tmp_path):
    p = run_main("max_steps=20", "checkpoint.every_steps=5", cwd=tmp_path, env={"LBTRAIN_TEST_SIGNAL": "SIGTERM@12"})
    assert p.returncode == 128 + signal.SIGTERM
    ckpt = next(tmp_path.rglob("checkpoint.pt"))
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    p = run_main("max_steps=20", "checkpoint.every_steps=5", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "truncated or corrupt" in p.stderr
    assert "Traceback" not in p.stderr


def test_checkpoint_from_another_run_is_refused(tmp_path):
    assert run_main("max_steps=3", cwd=tmp_path).returncode == 0
    ckpt = next(tmp_path.rglob("checkpoint.pt"))
    p = run_main("max_steps=3", "seed=1", f"resume={ckpt}", cwd=tmp_path)
    assert p.returncode == 2 and "quote values" in p.stderr  # the run folder's name holds '='
    p = run_main("max_steps=3", "seed=1", f"resume='{ckpt}'", cwd=tmp_path)
    assert p.returncode == 2
    assert "checkpoint belongs to another run: seed: 0 (checkpoint) vs 1 (this run)" in p.stderr


def test_divergence_is_recorded_and_sweep_goes_on(tmp_path):
    p = run_main("-m", "base.lr=0.1,1e5", "base.grad_clip=null", "epochs=1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = {r.parent.name: json.loads(r.read_text()) for r in tmp_path.rglob("results.json")}
    assert res["base.grad_clip=null,base.lr=100000.0,epochs=1.0"]["status"] == "diverged"
    assert res["base.grad_clip=null,epochs=1.0"]["status"] == "completed"  # base.lr=0.1 is the recipe's
    assert "diverged at update" in p.stdout + p.stderr
    diverged = tmp_path / "outputs" / "digits" / "base.grad_clip=null,base.lr=100000.0,epochs=1.0"
    assert scalars(diverged)["status/diverged"][0][1] == 1.0


def test_failed_job_is_recorded_and_others_complete(tmp_path):
    # batch 24 is not divisible by the ghost batch 16: that job fails, the other completes
    p = run_main("-m", "regime=gbn", "ghost_batch=16", "batch=16,24", "max_steps=5", "skip_bad_jobs=true",
                 cwd=tmp_path)
    assert p.returncode == 1
    assert "some jobs of the multirun failed" in p.stderr
    res = {r.parent.name: json.loads(r.read_text()) for r in tmp_path.rglob("results.json")}
    assert len(res) == 2
    failed = res["batch=24,max_steps=5,regime=gbn"]  # ghost_batch=16 (B_S) and skip_bad_jobs (run-only): not named
    assert failed["status"] == "failed" and "must divide the batch (24)" in failed["error"]
    assert res["max_steps=5,regime=gbn"]["status"] == "completed"
    # the summary lists the failed job with its status
    from lbtrain.analysis import report

    summary = report.summarize([tmp_path / "outputs"], tmp_path / "report", figures=False)
    statuses = {(row["batch"], row["status"]) for row in summary["runs"]}
    assert statuses == {(16, "stopped early"), (24, "failed")}  # max_steps=5 of a 384-update plan
    assert summary["table1"][0]["+GBN"] == "failed"


def test_kill_before_the_first_checkpoint_starts_over_without_duplicates(tmp_path):
    p = run_cli("seed=3", "log_every=5", cwd=tmp_path, env={"LBTRAIN_TEST_SIGNAL": "SIGKILL@37"})  # 1st ckpt: 96
    assert p.returncode == -signal.SIGKILL
    assert run_cli("seed=3", "log_every=5", cwd=tmp_path).returncode == 0
    run = tmp_path / "outputs" / "digits" / "seed=3"
    assert len(list(run.glob("events.out.tfevents*"))) == 1
    for tag, points in scalars(run, every_write=True).items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), tag


def test_sigusr2_checkpoints_then_hands_over_to_the_launcher(tmp_path, monkeypatch):
    """submitit sends SIGUSR2 before a SLURM time limit and requeues in its own handler: ours runs first."""
    from helpers import make_cfg

    from lbtrain.trainer import Interrupted, Trainer

    calls = []
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    monkeypatch.setenv("LBTRAIN_TEST_SIGNAL", "SIGUSR2@5")
    try:
        t = Trainer(make_cfg("max_steps=20", "progress=false"), tmp_path)
        t.setup()
        with pytest.raises(Interrupted):
            t.fit()
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert calls == [signal.SIGUSR2]
    assert read_checkpoint_meta(tmp_path / "checkpoint.pt")["step"] == 5
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "interrupted"


# C1 (dropout 0.5: random draws from torch's global generator at every update) with augmentation on synthetic
# CIFAR-shaped data: 256 samples, batch 32 = 8 updates per epoch, 3 epochs; checkpoints every 5 updates and at
# epoch ends, so update 13 (mid-epoch 2) lies between the checkpoints at 10 and 15.
C1_ARGS = ("experiment=c1_cifar10", "dataset=synthetic", "dataset.shape=[3,16,16]", "dataset.train_size=256",
           "dataset.val_size=64", "dataset.augment=true", "model.kwargs.channels=16", "base.batch=32", "epochs=3",
           "device=cpu", "deterministic=true", "checkpoint.every_steps=5", "log_every=4", "threads=1")


def test_resume_with_dropout_and_augmentation_is_bit_exact(tmp_path):
    """Resume restores the global RNG: a model that draws random numbers while training (dropout) resumes to the
    weights of an uninterrupted run, bit for bit (the digits MLP draws none, so it cannot tell)."""
    reference = tmp_path / "reference"  # uninterrupted, in this process (the same code path as the CLI's)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        trainer = Trainer(make_cfg(*C1_ARGS, "progress=false"), reference)
        trainer.setup()
        assert trainer.fit()["updates"] == 24
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    killed = tmp_path / "killed"
    killed.mkdir()
    p = run_cli(*C1_ARGS, cwd=killed, env={"LBTRAIN_TEST_SIGNAL": "SIGKILL@13"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    run = only_run(killed / "outputs" / "c1_cifar10")
    assert read_checkpoint_meta(run / "checkpoint.pt")["step"] == 10  # mid-epoch, between checkpoints
    p = run_cli(*C1_ARGS, cwd=killed)
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stdout + p.stderr
    assert json.loads((run / "results.json").read_text())["updates"] == 24
    mine, theirs = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt")
    assert mine["model"].keys() == theirs["model"].keys()
    for k in theirs["model"]:
        assert torch.equal(mine["model"][k], theirs["model"][k]), k
    assert tb_series(run) == tb_series(reference)
