"""The instruments attached to a run (gradient noise scale, sharpness, per-layer distance, log-spaced validation):
they observe and never change training, and they measure what they say they measure."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_cfg, read_json_strict, scalars
from torch.func import functional_call

from lbtrain.instruments.sharpness import SHARPNESS_SEED
from lbtrain.trainer import Trainer

# Dropout, augmentation and plain BatchNorm: every way a measurement could leak into training.
C1 = ("experiment=c1_cifar10", "dataset=synthetic", "dataset.shape=[3,8,8]", "dataset.train_size=128",
      "dataset.val_size=32", "dataset.augment=true", "model.kwargs.channels=8", "base.batch=16", "epochs=2",
      "log_every=4", "deterministic=true", "threads=1", "progress=false", "checkpoint.every_epochs=0")
ALL_ON = ("gns=true", "sharpness.every_epochs=1", "sharpness.samples=64", "sharpness.iters=5",
          "sharpness.trace_samples=3", "layer_distance=true", "eval_per_decade=5")


@pytest.fixture(autouse=True)
def _restore_torch_state():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


def train(tmp_path, *overrides: str) -> tuple[Trainer, dict]:
    t = Trainer(make_cfg(*overrides), tmp_path)
    t.setup()
    res = t.fit()
    return t, res


@pytest.mark.parametrize("extra", [(), ("regime=gbn", "batch=32", "ghost_batch=8", "micro_batch=16"),
                                   ("gns_options.bn=eval",)],
                         ids=["plain_bn_half_batch", "gbn_micro_batches", "gns_bn_eval"])
def test_instruments_never_change_training(tmp_path, extra):
    off, _ = train(tmp_path / "off", *C1, *extra)
    rng_off = torch.get_rng_state()
    on, res = train(tmp_path / "on", *C1, *extra, *ALL_ON)
    assert torch.equal(torch.get_rng_state(), rng_off)  # the random streams went on exactly as without
    a, b = off.net.state_dict(), on.net.state_dict()
    for k in a:  # weights and BatchNorm running statistics, bit for bit
        assert torch.equal(a[k], b[k]), k
    assert res["gns"]["trace_cov"] is not None and res["sharpness"]["hvps"] > 0
    assert not any(vars(off.hooks).values()) and off.instruments == {}  # off: nothing attached, nothing extra done


def test_instruments_report_what_they_measure(tmp_path):
    t, res = train(tmp_path, "regime=gbn", "batch=64", "epochs=2", "log_every=4", "threads=1", "progress=false",
                   *ALL_ON)
    read_json_strict(tmp_path / "results.json")
    s = scalars(tmp_path)
    logs = [st for st, _ in s["train/loss"]]
    assert [st for st, _ in s["gns/trace_cov"]] == logs  # at every log step, no more
    assert res["gns"]["b_simple"] == pytest.approx(s["gns/b_simple"][-1][1], rel=1e-6) and res["gns"]["b_simple"] > 0
    gns = res["gns"]  # corrected for the finite training set, the uncorrected beside it, an interval around it
    n = t.plan.train_size
    assert gns["train_size"] == n and gns["measurements"] == len(logs) and gns["bn"] == "train"
    assert gns["b_simple"] == pytest.approx(gns["b_simple_uncorrected"] / (1 + gns["b_simple_uncorrected"] / n))
    assert gns["grad_norm_sq"] == pytest.approx(gns["grad_norm_sq_uncorrected"] + gns["trace_cov"] / n)
    lo, hi = gns["b_simple_ci"]
    assert gns["ci_method"] == "fieller" and gns["ci_level"] == 0.95 and lo is not None
    assert lo <= gns["b_simple"] and (hi is None or gns["b_simple"] <= hi)
    assert [st for st, _ in s["gns/b_simple_uncorrected"]] == logs
    assert [st for st, _ in s["gns/b_simple_lo"]] == logs[2:]  # from the third measurement on (n_eff >= 3)
    sharp = res["sharpness"]
    assert [st for st, _ in s["sharpness/lambda_max"]] == [24, 48]  # both epoch ends (24 updates each)
    assert sharp["lambda_max"] == pytest.approx(s["sharpness/lambda_max"][-1][1], rel=1e-6)
    assert sharp["samples"] == 64 and sharp["batch"] == 16 and sharp["hvps"] > 0 and sharp["seconds"] > 0
    # validation at log-spaced updates too (for steps-to-target curves), not only at epoch ends
    val_steps = [st for st, _ in s["val/error"]]
    assert {1, 2, 3, 24, 48} <= set(val_steps) and len(val_steps) > 5
    # per-layer distances combine to the total at every point
    layers = {tag: dict(v) for tag, v in s.items() if tag.startswith("weights/distance/")}
    assert {"weights/distance/features.0", "weights/distance/features.1", "weights/distance/classifier"} <= set(layers)
    for step, total in s["weights/distance"]:
        if step == 0:
            continue
        combined = math.sqrt(sum(v[step] ** 2 for v in layers.values()))
        assert combined == pytest.approx(total, rel=1e-5), step


def test_noise_scale_two_ways_agree_under_ghost_bn(tmp_path):
    """Under ghost BN the extra half-batch pass and the micro-batch path measure the same thing exactly."""
    common = ("regime=gbn", "batch=64", "ghost_batch=16", "max_steps=20", "log_every=2", "gns=true", "threads=1",
              "progress=false")
    _, extra = train(tmp_path / "extra", *common)
    _, micro = train(tmp_path / "micro", *common, "micro_batch=32")
    for k in ("b_simple", "trace_cov", "grad_norm_sq"):
        assert micro["gns"][k] == pytest.approx(extra["gns"][k], rel=1e-4), k


def test_noise_scale_bn_eval_is_the_eval_mode_gradient(tmp_path):
    """`gns_options.bn=eval` (plain BN, digits MLP): the first measurement is the two strided halves' gradients of
    the model with BN on its running statistics, computed here independently from the state at that moment."""
    t = Trainer(make_cfg("max_steps=1", "log_every=1", "batch=32", "threads=1", "progress=false", "gns=true",
                         "gns_options.bn=eval"), tmp_path)
    t.setup()
    assert t.has_batchnorm and not t.plan.ghost_batch
    seen = {}

    def capture(trainer, x, y, log_now):  # runs after the probe's hook: the same weights and buffers
        seen.update(state={k: v.clone() for k, v in trainer.net.state_dict().items()}, x=x.clone(), y=y.clone())

    t.hooks.after_backward.append(capture)
    res = t.fit()["gns"]
    net = t.net
    net.load_state_dict(seen["state"])
    net.eval()
    x, y = seen["x"], seen["y"]
    halves = [torch.autograd.grad(F.cross_entropy(net(x[j::2]), y[j::2]), list(net.parameters())) for j in (0, 1)]
    small = sum(sum(g.double().square().sum() for g in h) for h in halves) / 2
    big = sum(((a.double() + b.double()) / 2).square().sum() for a, b in zip(*halves))
    n = t.plan.train_size
    g2 = (32 * big - 16 * small) / 16
    s = (small - big) / (1 / 16 - 1 / 32)
    assert res["bn"] == "eval" and res["measurements"] == 1
    assert res["trace_cov"] == pytest.approx(float(s), rel=1e-4)
    assert res["grad_norm_sq_uncorrected"] == pytest.approx(float(g2), rel=1e-4, abs=1e-6)
    assert res["grad_norm_sq"] == pytest.approx(float(g2 + s / n), rel=1e-4, abs=1e-6)


def test_gns_options_are_checked_and_gns_stays_a_switch():
    from lbtrain.config import ConfigError, validate
    from lbtrain.identity import run_only

    validate(make_cfg("gns=true"))  # a plain boolean on the command line, as before
    with pytest.raises(ConfigError, match="gns_options.bn"):
        validate(make_cfg("gns=true", "gns_options.bn=running"))
    with pytest.raises(ConfigError, match="gns_options.beta"):
        validate(make_cfg("gns_options.beta=1.0"))  # refused even with the instrument off
    assert {"gns", "gns_options"} <= set(run_only())


def test_sharpness_is_the_top_eigenvalue_of_the_documented_loss(tmp_path):
    """Against a dense Hessian computed here: the training loss on the fixed samples, BatchNorm in train mode over
    batches of the run's BN batch size, dropout off (digits, a 626-parameter MLP with BN)."""
    t, res = train(tmp_path, "model.kwargs.hidden=8", "model.kwargs.depth=1", "max_steps=30", "threads=1",
                   "progress=false", "sharpness.every_epochs=1", "sharpness.samples=96", "sharpness.iters=40",
                   "sharpness.trace_samples=200")
    n = len(t.train_loader)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(SHARPNESS_SEED))[:96].sort().values
    x, y = t.train_loader.samples(idx)
    net = t.net
    net.eval()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
    names = [k for k, p in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in net.parameters()]).double()
    buffers = {k: v.clone() for k, v in net.named_buffers()}

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            k = math.prod(shape)
            params[name] = flat[i:i + k].view(shape).float()
            i += k
        batches = [(x[j:j + 16], y[j:j + 16]) for j in range(0, 96, 16)]  # bn_batch 16
        losses = [F.cross_entropy(functional_call(net, {**params, **buffers}, (xb,)), yb) for xb, yb in batches]
        return torch.stack(losses).mean().double()

    hessian = torch.autograd.functional.hessian(loss, flat0)
    eig = torch.linalg.eigvalsh((hessian + hessian.T) / 2)
    sharp = res["sharpness"]
    assert sharp["lambda_max"] == pytest.approx(eig.max().item(), rel=0.01)
    assert abs(sharp["trace"] - eig.sum().item()) <= 3 * sharp["trace_stderr"]
