"""The `sharpness` instrument (lbtrain/instruments/sharpness.py) against dense Hessians, its Hutchinson interval,
the batch sharpness, the edge-of-stability thresholds, its cadences in a run, its config checks, and the
edge-of-stability figure (lbtrain/analysis/eos.py)."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import make_cfg, make_run, scalars
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call

from lbtrain.instruments.hessian import hutchinson_trace
from lbtrain.instruments.sharpness import SHARPNESS_SEED, SharpnessProbe, eos_thresholds, probe_seed
from lbtrain.trainer import Hooks, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
N, BN = 96, 16  # training samples of the fake run; the measurement's BN batch


# --- a fake run around a tiny float64 MLP with BatchNorm (123 parameters) ------------------------------------------
class Loader:
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def samples(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]


class Recorder:
    def __init__(self) -> None:
        self.points: dict[str, list[tuple[int, float]]] = {}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.points.setdefault(tag, []).append((step, float(v)))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, 3)).to(F64)
    with torch.no_grad():  # non-trivial running statistics for bn=eval
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def fake_run(net: nn.Module, *, step: int = 10, lr: float = 0.1, momentum: float = 0.9, optimizer: str = "sgd",
             nesterov: bool = False, batch: int = 32, run_bn_batch: int = 16) -> SimpleNamespace:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (N,), generator=g)
    plan = SimpleNamespace(ghost_batch=None, momentum=momentum, duplicates=1, lr_at=lambda u: lr,
                           batch_at=lambda u: batch)
    cfg = OmegaConf.create({"optimizer": {"name": optimizer}, "base": {"nesterov": nesterov}})
    return SimpleNamespace(hooks=Hooks(), cfg=cfg, net=net, model=net, params=list(net.parameters()),
                           device=torch.device("cpu"), plan=plan, dist=SimpleNamespace(enabled=False, world=1),
                           tb=Recorder(), state=SimpleNamespace(step=step), train_loader=Loader(x, y),
                           bn_batch=run_bn_batch, has_batchnorm=True, target_updates=100, micro_batch=None)


def node(**kw) -> SimpleNamespace:
    base = dict(every_epochs=0, every_steps=1, per_decade=0, samples=64, bn="train", bn_batch=BN, top_k=1, iters=40,
                trace_samples=30, batch_batches=0)
    return SimpleNamespace(**{**base, **kw})


def dense_hessian(run: SimpleNamespace, bn: str, idx: torch.Tensor, groups: int) -> torch.Tensor:
    """The Hessian of the documented loss, computed here from scratch: the mean over `groups` consecutive batches of
    the samples `idx` of their cross-entropy, BN in train mode over each batch (or in eval mode), dropout off."""
    net = run.net
    net.eval()
    if bn == "train":
        net[1].train()
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    buffers = {k: v.clone() for k, v in net.named_buffers()}  # (train-mode forwards update these copies)
    x, y = run.train_loader.samples(idx)
    size = len(idx) // groups

    def loss(flat: torch.Tensor) -> torch.Tensor:
        ps = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        out = [F.cross_entropy(functional_call(net, {**ps, **buffers}, (x[i * size:(i + 1) * size],)),
                               y[i * size:(i + 1) * size]) for i in range(groups)]
        return torch.stack(out).mean()

    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    h = torch.autograd.functional.hessian(loss, flat0)
    net.train()
    return 0.5 * (h + h.T)


def fixed_samples(run: SimpleNamespace, samples: int = 64) -> torch.Tensor:
    """The instrument's fixed sample set, drawn here as its docstring says."""
    g = torch.Generator().manual_seed(SHARPNESS_SEED)
    return torch.randperm(len(run.train_loader), generator=g)[:samples].sort().values


# --- against dense Hessians -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bn", ["train", "eval"])
def test_top_eigenvalues_match_a_dense_hessian_in_both_bn_modes(bn):
    run = fake_run(tiny_net())
    probe = SharpnessProbe(run, node(bn=bn, top_k=3))
    r = probe.measure()
    eigs = torch.linalg.eigvalsh(dense_hessian(run, bn, fixed_samples(run), groups=64 // BN)).flip(0)
    assert r["lanczos_converged"] and r["definition"]["bn"] == bn and r["samples"] == 64 and r["batches"] == 4
    for got, want in zip(r["eigenvalues"], eigs[:3].tolist()):
        assert got == pytest.approx(want, rel=0.01)
    assert r["lambda_max"] == r["eigenvalues"][0]
    assert abs(r["trace"] - float(eigs.sum())) <= 4 * r["trace_stderr"]
    # the two modes are different functions: the definition matters (the 1.8x on digits)
    other = torch.linalg.eigvalsh(dense_hessian(run, "eval" if bn == "train" else "train", fixed_samples(run), 4))
    assert abs(float(other[-1]) - r["lambda_max"]) > 0.02 * r["lambda_max"]
    assert all(m.training for m in run.net.modules())  # modes restored


def test_bn_batch_defines_the_loss_not_the_run_batch():
    """bn=train normalizes over sharpness.bn_batch samples whatever the run's BN batch, and the value changes with it
    (so it must be fixed across a sweep)."""
    run = fake_run(tiny_net(), run_bn_batch=48)
    idx = fixed_samples(run)
    for bn_batch in (16, 32):
        r = SharpnessProbe(run, node(bn_batch=bn_batch, trace_samples=0)).measure()
        want = float(torch.linalg.eigvalsh(dense_hessian(run, "train", idx, groups=64 // bn_batch))[-1])
        assert r["batch"] == r["definition"]["bn_batch"] == bn_batch
        assert r["lambda_max"] == pytest.approx(want, rel=0.01)


# --- the Hutchinson interval -----------------------------------------------------------------------------------------
def test_hutchinson_interval_covers_the_exact_trace():
    """100 trials, 30 probes each (the default), different probe seeds: estimate +- 1.96 stderr covers the exact
    trace in >= 90% of them, and the stderr is the exact standard error (median ratio ~1)."""
    run = fake_run(tiny_net())
    net = run.net
    net.eval()
    idx = fixed_samples(run)
    x, y = run.train_loader.samples(idx)
    h = dense_hessian(run, "eval", idx, groups=1)
    exact = float(h.trace())
    sd = math.sqrt(2 * float((h**2).sum() - (h.diagonal() ** 2).sum()))  # of one probe's z^T H z (Rademacher)
    net.eval()
    loss = lambda: F.cross_entropy(net(x), y)
    trials = [hutchinson_trace(loss, run.params, samples=30, generator=torch.Generator().manual_seed(probe_seed(t)))
              for t in range(100)]
    covered = sum(abs(t["trace"] - exact) <= 1.96 * t["stderr"] for t in trials)
    assert covered >= 90, covered
    assert 0.85 < statistics.median(t["stderr"] for t in trials) / (sd / math.sqrt(30)) < 1.1


def test_measure_is_reproducible_and_draws_new_probes_per_update():
    """The same update at the same weights: the same numbers bit for bit (a run and lbtrain-measure); another update:
    another draw of the probes (so no one draw's error sits in every standard error of a run)."""
    run = fake_run(tiny_net())
    probe = SharpnessProbe(run, node(batch_batches=2))
    a = dict(probe.measure())
    b = dict(SharpnessProbe(run, node(batch_batches=2)).measure())  # a fresh instrument, as lbtrain-measure builds
    a.pop("seconds"), b.pop("seconds"), a.pop("measurements"), b.pop("measurements")
    assert a == b
    run.state.step = 11
    c = probe.measure()
    assert c["trace"] != a["trace"] and c["lambda_max"] == pytest.approx(a["lambda_max"], rel=1e-3)
    assert probe.results()["update"] == 11 and probe.results()["measurements"] == 2


# --- batch sharpness and the thresholds ------------------------------------------------------------------------------
def test_batch_sharpness_is_the_minibatch_curvature_along_its_gradient():
    """g_B^T H_B g_B / |g_B|^2 averaged over 3 fixed mini-batches of the run's batch (32), BN over the run's BN groups
    (16), recomputed here with dense mini-batch Hessians."""
    run = fake_run(tiny_net(), batch=32, run_bn_batch=16)
    r = SharpnessProbe(run, node(batch_batches=3, trace_samples=0)).measure()
    gen = torch.Generator().manual_seed(SHARPNESS_SEED + 1)
    values = []
    for _ in range(3):
        idx = torch.randperm(N, generator=gen)[:32]
        h = dense_hessian(run, "train", idx, groups=2)
        run.net.eval()
        run.net[1].train()
        x, y = run.train_loader.samples(idx)
        loss = (F.cross_entropy(run.net(x[:16]), y[:16]) + F.cross_entropy(run.net(x[16:]), y[16:])) / 2
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, run.params)])
        values.append(float(g @ h @ g / (g @ g)))
        run.net.train()
    assert r["batch_sharpness_batch"] == 32 and r["batch_sharpness_batches"] == 3
    assert r["batch_sharpness"] == pytest.approx(statistics.fmean(values), rel=1e-6)
    assert r["batch_sharpness_stderr"] == pytest.approx(statistics.stdev(values) / math.sqrt(3), rel=1e-5)
    assert 0 < r["batch_sharpness"] <= r["lambda_max"] * 3  # (mini-batch Hessians are sharper than the mean's)
    assert run.tb.points["sharpness/batch_sharpness"] == [(10, r["batch_sharpness"])]


def test_thresholds_are_sgds_at_the_current_lr_and_momentum():
    assert eos_thresholds("sgd", 0.5, 0.0, False) == {"two_over_lr": 4.0, "two_over_lr_momentum": 4.0}
    assert eos_thresholds("sgd", 0.1, 0.9, False)["two_over_lr_momentum"] == pytest.approx(38.0)
    assert eos_thresholds("sgd", 0.1, 0.9, True)["two_over_lr_momentum"] == pytest.approx(2 * 1.9 / (0.1 * 2.8))
    assert eos_thresholds("adamw", 0.1, 0.9, False) is None and eos_thresholds("sgd", 0.0, 0.9, False) is None
    run = fake_run(tiny_net(), lr=0.25, momentum=0.5)
    r = SharpnessProbe(run, node(trace_samples=0, iters=5)).measure()
    assert (r["lr"], r["momentum"], r["two_over_lr"], r["two_over_lr_momentum"]) == (0.25, 0.5, 8.0, 12.0)
    assert run.tb.points["sharpness/two_over_lr"] == [(10, 8.0)]
    assert run.tb.points["sharpness/two_over_lr_momentum"] == [(10, 12.0)]
    lars = fake_run(tiny_net(), optimizer="lars")
    assert SharpnessProbe(lars, node(trace_samples=0, iters=5)).measure()["two_over_lr"] is None
    assert "sharpness/two_over_lr" not in lars.tb.points


# --- in a run ---------------------------------------------------------------------------------------------------------
SMALL = ("model.kwargs.hidden=16", "model.kwargs.depth=2", "threads=1", "progress=false", "checkpoint.every_epochs=0",
         "sharpness.samples=64", "sharpness.iters=8", "sharpness.trace_samples=4", "sharpness.batch_batches=2")


def test_cadence_in_updates_and_log_spaced(tmp_path):
    """every_steps=10 and per_decade=1 over 30 updates: updates 1..10 (log_spaced_steps), 20 and 30, each measured
    once, each with 2/lr and 2(1+m)/lr of that update; results.json holds the last with its definition."""
    t = Trainer(make_cfg(*SMALL, "max_steps=30", "sharpness.every_steps=10", "sharpness.per_decade=1",
                         "sharpness.top_k=2"), tmp_path)
    t.setup()
    res = t.fit()["sharpness"]
    s = scalars(tmp_path)
    steps = [*range(1, 11), 20, 30]
    for tag in ("lambda_max", "lambda_2", "trace", "trace_stderr", "batch_sharpness", "two_over_lr",
                "two_over_lr_momentum"):
        assert [st for st, _ in s[f"sharpness/{tag}"]] == steps, tag
    assert all(v == pytest.approx(2 / 0.1) for _, v in s["sharpness/two_over_lr"])  # digits: lr 0.1, momentum 0.9
    assert all(v == pytest.approx(2 * 1.9 / 0.1) for _, v in s["sharpness/two_over_lr_momentum"])
    assert res["update"] == 30 and res["measurements"] == len(steps) and len(res["eigenvalues"]) == 2
    d = res["definition"]
    assert (d["bn"], d["bn_batch"], d["samples"], d["top_k"], d["trace_probes"], d["batch_batches"]) == (
        "train", 16, 64, 2, 4, 2)  # bn_batch: ${base.batch} = 16 on digits
    assert res["batch_sharpness_batch"] == 16 and res["lambda_max"] == pytest.approx(s["sharpness/lambda_max"][-1][1])


def test_step_cadence_never_changes_training(tmp_path):
    """Measuring after updates (ghost BN set to one ghost batch and back, BN in eval mode, batch sharpness passes)
    leaves weights, BN statistics and the random streams exactly as without."""
    common = ("regime=gbn", "batch=64", "ghost_batch=16", "max_steps=12", *SMALL[:5])
    off = Trainer(make_cfg(*common), tmp_path / "off")
    off.setup()
    off.fit()
    rng = torch.get_rng_state()
    on = Trainer(make_cfg(*common, *SMALL[5:], "sharpness.every_steps=4", "sharpness.bn=eval"), tmp_path / "on")
    on.setup()
    res = on.fit()["sharpness"]
    assert torch.equal(torch.get_rng_state(), rng)
    a, b = off.net.state_dict(), on.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res["measurements"] == 3 and res["batch_sharpness_batch"] == 64


# --- config -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["sharpness.bn=running"], "sharpness.bn='running': allowed: train, eval"),
    (["sharpness.every_steps=-1"], "sharpness.every_steps=-1: must be an integer >= 0"),
    (["sharpness.per_decade=-2"], "sharpness.per_decade=-2: must be an integer >= 0"),
    (["sharpness.top_k=21"], "sharpness.top_k=21: must be at most sharpness.iters=20"),
    (["sharpness.trace_samples=1"], "sharpness.trace_samples=1: must be 0 (no trace) or >= 2"),
    (["sharpness.bn_batch=0"], "sharpness.bn_batch=0: must be an integer >= 1"),
    (["sharpness.every_steps=5", "sharpness.samples=8"], "sharpness.bn_batch=16: must be at most sharpness.samples=8"),
])
def test_config_mistakes_are_one_line(overrides, message):
    from lbtrain.config import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_any_cadence_switches_it_on():
    from lbtrain.instruments import base

    on = lambda *o: [s.name for s in base.requested(make_cfg(*o))] == ["sharpness"]
    assert not on() and on("sharpness.every_epochs=1") and on("sharpness.every_steps=5")
    assert on("sharpness.per_decade=3")
    assert make_cfg("batch=512").sharpness.bn_batch == 16  # the recipe's small batch, not the run's


# --- the figure -------------------------------------------------------------------------------------------------------
def test_edge_of_stability_figure_in_the_report(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from lbtrain.analysis import eos
    from lbtrain.analysis.report import summarize
    from lbtrain.analysis.runs import find_runs

    d = make_run(tmp_path / "runs", "batch=1024")
    make_run(tmp_path / "runs", "batch=512")  # no sharpness trajectory: no panel
    w = SummaryWriter(str(d))
    for step in range(2, 60, 2):
        w.add_scalar("sharpness/lambda_max", min(0.1 * step, 4.0), step)
        w.add_scalar("sharpness/batch_sharpness", min(0.12 * step, 4.1), step)
        w.add_scalar("sharpness/two_over_lr", 4.0, step)
        w.add_scalar("sharpness/two_over_lr_momentum", 4.0, step)
    w.close()
    runs = find_runs([tmp_path / "runs"])
    assert [eos.has_trajectory(r) for r in sorted(runs, key=lambda r: r.batch)] == [False, True]
    out = summarize([tmp_path / "runs"], tmp_path / "report", target_error=None)
    png = tmp_path / "report" / "edge_of_stability.png"
    assert png in out["files"] and png.stat().st_size > 10_000
    assert eos.write_eos([r for r in runs if r.batch == 512], tmp_path / "none") == []
