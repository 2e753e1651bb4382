"""Branches (lbtrain.branch) and the local critical batch (lbtrain.analysis.branching): a branch's identity, the k = 1
branch continuing its parent bit for bit, the data stream of k > 1, the smoothed loss, resume, the refusals, and
the analysis on branch folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_cfg, make_run, read_json_strict, run_main, scalars

from lbtrain import branch as branching
from lbtrain.analysis import branching as analysis
from lbtrain.analysis.runs import find_runs
from lbtrain.checkpoint import load_checkpoint
from lbtrain.config import ConfigError, resolved, schema_defaults, validate
from lbtrain.data.loaders import DeviceLoader
from lbtrain.identity import identity, identity_hash
from lbtrain.results import Results
from lbtrain.session import check_config, prepare
from lbtrain.trainer import Interrupted, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = ("deterministic=true", "progress=false", "threads=1", "log_every=5")
KEEP = (12, 90, 106)  # digits at batch 16: 96 updates an epoch, so 90 -> 106 crosses an epoch's end


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A digits run that kept checkpoints at KEEP (stopped at the last one)."""
    folder = tmp_path_factory.mktemp("parent") / "run"
    t = Trainer(make_cfg(*ARGS, f"checkpoint.keep=[{','.join(map(str, KEEP))}]", f"max_steps={KEEP[-1]}"), folder)
    t.setup()
    t.fit()
    return folder


def branch_cfg(parent: Path | str, *overrides: str, update: int = 90, k: int = 1, samples: int = 256):
    return make_cfg(*ARGS, f"branch.parent={parent}", f"branch.update={update}", f"branch.k={k}",
                    f"branch.samples={samples}", *overrides)


def train(cfg, folder: Path) -> tuple[Trainer, dict]:
    t = Trainer(cfg, folder)
    t.setup()
    return t, t.fit()


# ------------------------------------------------------------------------------------------- the branch
def test_the_k1_branch_is_the_parent_bit_for_bit(parent, tmp_path):
    """16 updates from the kept checkpoint at 90 (across the epoch's end at 96) equal the parent's kept update 106:
    weights, momentum buffers and BN statistics; the identity names the parent's hash, the update, k and rule."""
    t, res = train(branch_cfg(parent), tmp_path / "k1")
    assert res["status"] == "completed" and res["updates"] == 16 and res["batch"] == 16
    kept = load_checkpoint(parent / "checkpoints" / "update_00000106.pt")
    mine = load_checkpoint(tmp_path / "k1" / "checkpoint.pt")
    for name, v in kept["model"].items():
        assert torch.equal(mine["model"][name], v), name
    for i, state in kept["optimizer"]["state"].items():
        assert torch.equal(mine["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"])
    for a, b in zip(mine["w0"], kept["w0"]):
        assert torch.equal(a, b)  # the distance is from the parent's initialization
    parent_res = read_json_strict(parent / "results.json")
    ident = res["identity"]
    assert ident["branch"] == {"parent_identity": parent_res["identity_hash"], "update": 90, "k": 1,
                               "rule": "linear", "samples": 256, "seed": 0}
    assert str(parent) not in json.dumps(ident)  # where the parent lies is run-only
    rec = res["branch"]
    assert (rec["parent_lr"], rec["lr"], rec["parent_samples"], rec["tail_updates"]) == (0.1, 0.1, 90 * 16, 4)
    assert math.isfinite(rec["smoothed_loss"]) and rec["tail_samples"] == 64
    distance = dict(scalars(tmp_path / "k1")["weights/distance"])
    start = math.sqrt(sum(float(((w - w0) ** 2).sum()) for w, w0 in zip(_params(parent, 90), kept["w0"])))
    assert distance[0] == pytest.approx(start, rel=1e-5)  # the branch starts at the parent's distance, not 0


def _params(parent: Path, update: int) -> list[torch.Tensor]:
    """The trained parameters of the parent's kept checkpoint (no BN buffers), in order."""
    ckpt = load_checkpoint(parent / "checkpoints" / f"update_{update:08d}.pt")
    return [v for k, v in ckpt["model"].items() if not k.endswith(("running_mean", "running_var",
                                                                     "num_batches_tracked"))]


def test_a_k2_branch_takes_the_parents_batches_two_at_a_time():
    """The stream of k B-batches is the k B loader's batch at that position, rank shares included, across epochs."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8, generator=g), torch.arange(40) % 3
    loader = DeviceLoader(x, y, (0.5,), (0.25,), augment=True, device="cpu", seed=3)
    br = branching.Branch(parent="p", checkpoint="c", parent_identity="h", update=6, parent_samples=24, k=2,
                          rule="linear", samples=64, seed=0, data_seed=3, parent_batch=4, parent_lr=0.1, lr=0.2,
                          updates=8, start_epoch=0, start_step=6)
    for rank, world in ((0, 1), (1, 2)):
        got = list(zip(range(8), branching.batches(loader, br, 0, rank, world)))
        # positions 24..87 of epochs 0 and 1 (10 batches of 4 an epoch): the 8-batches at 24 and 32, then epoch 1's
        want = (list(loader.epoch(0, 8, 3, rank, world)) + list(loader.epoch(1, 8, 0, rank, world)))[:2] + \
            list(loader.epoch(1, 8, 0, rank, world))[:6]
        assert len(got) == 8
        for (_, (gx, gy)), (wx, wy) in zip(got, [*want[:2], *want[2:]]):
            assert torch.equal(gx, wx) and torch.equal(gy, wy)
        resumed = next(branching.batches(loader, br, 3, rank, world))  # update 3 of the branch: epoch 1's second
        assert torch.equal(resumed[0], list(loader.epoch(1, 8, 1, rank, world))[0][0])


def test_plan_lr_rules_and_data_seeds(parent):
    p = prepare(branch_cfg(parent, "branch.rule=sqrt", update=12, k=4, samples=1024), parent.parent / "x",
                verify=False)
    br, plan = p.branch, p.plan
    assert (br.batch, br.updates, br.parent_lr) == (64, 16, 0.1)
    assert plan.lr_at(0) == plan.lr_at(15) == pytest.approx(0.2) and plan.total_updates == 16
    assert plan.epoch_batches == (64,) and p.batch == 64
    assert [branching.rule_factor(r, 9) for r in ("none", "sqrt", "linear")] == [1.0, 3.0, 9.0]
    assert branching.data_seed(7, 0) == 7 and branching.data_seed(7, 1) != branching.data_seed(7, 2) != 7


def test_the_smoothed_loss_is_the_mean_train_loss_of_the_last_quarter(parent, tmp_path):
    """Every update logged (log_every=1): the recorded smoothed loss is the mean of the last quarter's losses,
    across divergence blocks (8 updates) and whatever the log cadence."""
    cfg = branch_cfg(parent, "log_every=1", "branch.seed=1", update=12, k=2, samples=1536)  # 48 updates, tail 12
    _, res = train(cfg, tmp_path / "b")
    losses = [v for s, v in scalars(tmp_path / "b")["train/loss"] if s > 36]
    assert len(losses) == 12
    assert res["branch"]["smoothed_loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)
    _, again = train(make_cfg(*ARGS[:-1], "log_every=7", *list(cfg_overrides(cfg))), tmp_path / "c")
    assert again["branch"]["smoothed_loss"] == pytest.approx(res["branch"]["smoothed_loss"], rel=1e-6)


def cfg_overrides(cfg) -> list[str]:
    b = cfg.branch
    return [f"branch.{k}={b[k]}" for k in ("parent", "update", "k", "samples", "seed")]


def test_an_interrupted_branch_resumes_to_the_same_result(parent, tmp_path, monkeypatch):
    cfg = branch_cfg(parent, "checkpoint.every_steps=5", k=2, samples=1024)  # 32 updates, tail from 24
    _, whole = train(cfg, tmp_path / "whole")
    monkeypatch.setenv("LBTRAIN_TEST_SIGNAL", "SIGTERM@27")
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "cut")
    monkeypatch.delenv("LBTRAIN_TEST_SIGNAL")
    _, resumed = train(cfg, tmp_path / "cut")
    assert resumed["branch"]["smoothed_loss"] == whole["branch"]["smoothed_loss"]
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt")["model"] for d in ("whole", "cut"))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_identity_keeps_the_parent_hash_not_its_folder(parent, tmp_path):
    link = tmp_path / "elsewhere"
    link.symlink_to(parent)
    a, b = (check_config(branch_cfg(p, k=2)) for p in (parent, link))
    assert a["identity"] == b["identity"] and a["identity_hash"] == b["identity_hash"]
    assert a["identity_hash"] != check_config(branch_cfg(parent, k=4))["identity_hash"]
    plain = identity(resolved(make_cfg()))
    assert "branch" not in plain  # a run that is not a branch: identities (and hashes) as before
    assert identity_hash(plain, schema_defaults()) == identity_hash(identity(resolved(make_cfg("branch.k=1"))),
                                                                   schema_defaults())


@pytest.mark.parametrize("change,key,says", [
    ({"parent": "/no/such/run"}, "branch.parent", "no such run folder"),
    ({"update": 50}, "branch.update", "kept updates 12, 90, 106"),
    ({"overrides": ("base.lr=0.2",)}, "branch.parent", "base.lr: 0.1 (parent) vs 0.2 (this branch)"),
    ({"samples": 100}, "branch.samples", "multiple of the branch's batch"),
    ({"k": 200}, "branch.k", "exceeds the training set size"),
    ({"overrides": ("target.error=0.1",)}, "target.error", "cannot stop at a target"),
])
def test_a_refused_branch_names_the_key(parent, change, key, says):
    change = dict(change)
    where, overrides = change.pop("parent", parent), change.pop("overrides", ())
    with pytest.raises(ConfigError) as e:
        check_config(branch_cfg(where, *overrides, **change))
    assert e.value.key == key and says in str(e.value) and "\n" not in str(e.value)


def test_branch_keys_need_a_parent():
    with pytest.raises(ConfigError, match="branch.k=4: needs branch.parent"):
        validate(make_cfg("branch.k=4"))


def test_a_refused_branch_on_the_command_line_writes_nothing(parent, tmp_path):
    out = tmp_path / "out"
    p = run_main(f"branch.parent={parent}", "branch.update=7", "branch.samples=64", f"hydra.run.dir={out}",
                 cwd=tmp_path)
    assert p.returncode == 2 and not out.exists()
    (line,) = p.stderr.strip().splitlines()
    assert "branch.update=7" in line and "no kept checkpoint" in line


def test_a_sweep_branch_refused_before_training_is_recorded_as_a_branch(parent, tmp_path):
    """skip_bad_jobs: the job without a kept checkpoint leaves a failed record naming its parent's hash, so the report
    counts it with the branches, not among ordinary runs."""
    p = run_main("-m", *ARGS, f"branch.parent={parent}", "branch.update=7,90", "branch.samples=32",
                 "skip_bad_jobs=true", "max_steps=2", cwd=tmp_path)
    assert p.returncode in (0, 1), p.stderr[-2000:]
    runs = find_runs([tmp_path / "outputs"])
    failed = [r for r in runs if r.results.status == "failed"]
    assert len(runs) == 2 and len(failed) == 1
    parent_hash = json.loads((parent / "results.json").read_text())["identity_hash"]
    assert failed[0].identity[analysis.PARENT_KEY] == parent_hash and analysis.split(runs)[0] == []


# ---------------------------------------------------------------------------------------------- analysis
def test_critical_batch_closed_form():
    ks = [1, 2, 4, 8]
    assert analysis.critical_batch(ks, [1.0, 1.05, 1.21, 1.5], 0.1) == (2, pytest.approx(2 * 2 ** (
        (math.log(1.1) - math.log(1.05)) / (math.log(1.21) - math.log(1.05)))))
    assert analysis.critical_batch(ks, [1.0, 1.2, 1.0, 1.0], 0.1)[0] == 1  # the first one beyond ends the search
    assert analysis.critical_batch(ks, [1.0, 1.0, 1.05, 1.09], 0.1) == (8, None)  # censored
    assert analysis.critical_batch(ks, [1.0, 1.0, math.inf, math.inf], 0.1) == (2, 2.0)  # diverged beyond


def fake_branch(root: Path, parent_hash: str, update: int, k: int, seed: int, loss: float, status: str = "completed"):
    ident = identity(resolved(make_cfg()))
    ident["branch"] = {"parent_identity": parent_hash, "update": update, "k": k, "rule": "linear",
                       "samples": 1024, "seed": seed}
    res = Results.of_run(status, ident, identity_hash(ident, schema_defaults()),
                         {"batch_schedule": [[0, 16 * k]], "ghost_batch": 16, "lr": 0.1 * k}, updates=1024 // (16 * k),
                         planned_updates=1024 // (16 * k), final_val_error=0.1)
    d = root / f"u{update}_k{k}_s{seed}"
    d.mkdir(parents=True)
    record = {"parent": "/nowhere", "parent_identity": parent_hash, "update": update, "parent_samples": 16 * update,
              "k": k, "parent_batch": 16, "parent_lr": 0.1, "lr": 0.1 * k, "smoothed_loss": loss}
    (d / "results.json").write_text(json.dumps({**res.to_dict(), "branch": record}))


def test_the_local_critical_batch_rises_where_the_losses_say_so(tmp_path):
    """Synthetic branches whose loss ratio crosses 1.1 at k = 2, 4, 8 at three points: B* = 32, 64, 128 with intervals
    from three seeds; a censored point; B_simple from the parent's scalars; the report's section and figure."""
    from torch.utils.tensorboard import SummaryWriter

    parent = make_run(tmp_path / "runs", "seed=0")
    w = SummaryWriter(str(parent))
    for s in (10, 50, 100, 200):
        w.add_scalar("gns/b_simple", float(s), s)
    w.close()
    parent_hash = find_runs([parent])[0].identity_hash
    crossing = {10: 2, 50: 4, 100: 8, 200: 99}  # the last k within
    for u, last in crossing.items():
        for k in (1, 2, 4, 8):
            for seed, noise in enumerate((1.0, 1.01, 0.99)):
                ratio = 1.0 if k <= last else 1.3
                fake_branch(tmp_path / "runs" / "branches", parent_hash, u, k, seed, 0.5 * ratio * noise ** k)
    for seed in range(3):  # diverged at k = 16: worse than any loss
        fake_branch(tmp_path / "runs" / "branches", parent_hash, 10, 16, seed, math.nan, status="diverged")
    fake_branch(tmp_path / "runs" / "branches", parent_hash, 50, 16, 0, 0.9)  # one seed only at k = 16
    from lbtrain.analysis.report import summarize

    out = summarize([tmp_path / "runs"], tmp_path / "report")
    rows = {r["update"]: r for r in out["local_critical_batch"]}
    assert [rows[u]["B_crit_tested"] for u in (10, 50, 100)] == ["32", "64", "128"]
    assert rows[200]["B_crit"] == "> 128" and rows[200]["seeds"] == 3
    assert rows[50]["notes"] == "seed 1: k=16; seed 2: k=16" and rows[50]["seeds"] == 1  # (paired seeds only)
    assert rows[50]["B_crit_95%"] == "-"  # one seed: no interval
    assert [rows[u]["B_simple"] for u in (10, 50, 100, 200)] == [10.0, 50.0, 100.0, 200.0]
    assert all(rows[u]["B_crit_95%"] != "-" for u in (10, 100, 200))
    assert "Local critical batch by branching" in out["branching_section"]
    assert (tmp_path / "report" / "local_critical_batch.png").stat().st_size < 200_000
    assert all("branch" not in str(r["run"]) for r in out["runs"])  # branches have their own section only


@pytest.mark.slow
def test_a_branch_sweep_on_the_command_line_and_its_report(tmp_path):
    """The README's commands, small: a parent with kept checkpoints, `lbtrain -m sweep=branch`, `lbtrain-report`."""
    from lbtrain.analysis.report import main as report

    p = run_main("checkpoint.keep=[8,16]", "gns=true", "log_every=4", "max_steps=24",
                 "hydra.run.dir=outputs/digits/parent", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    p = run_main("-m", "sweep=branch", "max_steps=24", "branch.parent=outputs/digits/parent", "branch.update=8,16",
                 "branch.samples=256", "branch.k=1,2,4", "branch.seed=0,1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert len(list((tmp_path / "outputs" / "digits").glob("branch.k=*"))) == 12
    assert report([str(tmp_path / "outputs" / "digits"), "--out", str(tmp_path / "report")]) == 0
    rows = (tmp_path / "report" / "local_critical_batch.csv").read_text().splitlines()
    assert len(rows) == 3 and (tmp_path / "report" / "local_critical_batch.png").is_file()
