"""The science's arithmetic: LR at an update, batch at an epoch, number of updates, for every regime."""

from __future__ import annotations

import math

import pytest
from helpers import make_cfg

from lbtrain.config import ConfigError
from lbtrain.regime import make_plan

N = 50000  # CIFAR training set


def plan(*overrides: str, n: int = N, world: int = 1):
    return make_plan(make_cfg("experiment=resnet44_cifar10", *overrides), n, world)


def test_baseline_small_batch_follows_recipe():
    p = plan()
    spe = N // 128  # 390 updates per epoch
    assert p.total_updates == 200 * spe
    assert p.lr_at(0) == pytest.approx(0.1)
    assert p.lr_at(81 * spe - 1) == pytest.approx(0.1)
    assert p.lr_at(81 * spe) == pytest.approx(0.01)
    assert p.lr_at(122 * spe) == pytest.approx(0.001)
    assert p.lr_at(164 * spe) == pytest.approx(0.0001)
    assert p.batch_at(12345) == 128 and p.ghost_batch is None


@pytest.mark.parametrize("batch", [512, 2048, 4096])
def test_large_batch_milestones_are_in_epochs(batch):
    p = plan(f"batch={batch}")
    spe = N // batch
    assert p.total_updates == 200 * spe
    assert p.lr_at(81 * spe - 1) == pytest.approx(0.1)  # baseline: LR unchanged
    assert p.lr_at(81 * spe) == pytest.approx(0.01)


@pytest.mark.parametrize("batch", [512, 4096])
def test_sqrt_lr_and_gbn(batch):
    r = batch / 128
    for regime in ("sqrt_lr", "gbn"):
        p = plan(f"batch={batch}", f"regime={regime}")
        assert p.lr_at(0) == pytest.approx(0.1 * math.sqrt(r))
        assert p.lr_at(p.lr_updates[1]) == pytest.approx(0.01 * math.sqrt(r))
        assert p.total_updates == 200 * (N // batch)
    assert plan(f"batch={batch}", "regime=sqrt_lr").ghost_batch is None
    assert plan(f"batch={batch}", "regime=gbn").ghost_batch == 128
    assert plan(f"batch={batch}", "regime=gbn", "ghost_batch=256").ghost_batch == 256


@pytest.mark.parametrize("batch", [512, 2048, 4096])
def test_adapt_makes_r_times_the_updates(batch):
    r = batch // 128
    base = plan(f"batch={batch}")
    p = plan(f"batch={batch}", "regime=adapt")
    assert p.total_updates == r * base.total_updates
    assert p.epochs == pytest.approx(200 * r)
    spe = N // batch
    assert p.lr_at(81 * r * spe - 1) == pytest.approx(0.1 * math.sqrt(r))
    assert p.lr_at(81 * r * spe) == pytest.approx(0.01 * math.sqrt(r))
    assert p.ghost_batch == 128


def test_adapt_matches_small_batch_updates_when_batches_divide_dataset():
    # digits: 1536 training samples, divisible by 16 and 512
    small = make_plan(make_cfg(), 1536)
    large = make_plan(make_cfg("batch=512", "regime=adapt"), 1536)
    assert large.total_updates == small.total_updates == 4 * 96
    assert large.lr_updates == small.lr_updates


def test_epochs_override_scales_milestones_and_adapt_applies_on_top():
    p = plan("epochs=2")
    spe = N // 128
    assert p.total_updates == 2 * spe
    assert p.lr_updates == (0, round(0.81 * spe), round(1.22 * spe), round(1.64 * spe))
    q = plan("epochs=2", "regime=adapt", "batch=4096")
    assert q.epochs == pytest.approx(64)  # SPEC: epochs=2 regime=adapt batch=4096 trains 64 epochs
    assert q.total_updates == 64 * (N // 4096)


def test_linear_scaling_with_warmup():
    p = plan("batch=1024", "regime=linear")
    spe = N // 1024
    w = 5 * spe
    assert p.warmup_updates == w
    assert p.lr_at(0) == pytest.approx(0.1)
    assert p.lr_at(w // 2) == pytest.approx(0.1 + (0.8 - 0.1) * (w // 2) / w)
    assert p.lr_at(w) == pytest.approx(0.8)
    assert p.ghost_batch is None


def test_batch_increase_smith_schedule():
    p = make_plan(make_cfg("experiment=wrn16_4_cifar10", "regime=batch_increase"), N)
    assert p.batch_at_epoch(0) == 128 and p.batch_at_epoch(59) == 128
    assert p.batch_at_epoch(60) == 640 and p.batch_at_epoch(120) == 3200 and p.batch_at_epoch(160) == 16000
    assert set(p.lr_values) == {0.1}  # constant LR
    assert p.total_updates == 60 * (N // 128) + 60 * (N // 640) + 40 * (N // 3200) + 40 * (N // 16000)
    # noise scale falls by the same factor 5 as a decayed LR would make it
    g0 = p.noise_scale(0)
    g1 = p.noise_scale(p.epoch_start[60])
    assert g0 == pytest.approx(0.1 * N / (128 * 0.1)) and g1 == pytest.approx(g0 / 5)


def test_hybrid_switches_to_lr_decay_at_max_batch():
    p = make_plan(make_cfg("experiment=wrn16_4_cifar10", "regime=hybrid"), N)
    assert p.batch_at_epoch(60) == 640 and p.batch_at_epoch(120) == 3200 and p.batch_at_epoch(199) == 3200
    i = p.epoch_start[160]
    assert p.lr_at(i - 1) == pytest.approx(0.1) and p.lr_at(i) == pytest.approx(0.02)


def test_decay_lr_reference_divides_by_five():
    p = make_plan(make_cfg("experiment=wrn16_4_cifar10"), N)
    assert [round(v, 6) for v in p.lr_values] == [0.1, 0.02, 0.004, 0.0008]


def test_explicit_lr_schedule():
    p = make_plan(make_cfg("experiment=wrn16_4_cifar100"), N)
    spe = N // 128
    assert p.lr_updates == (0, 60 * spe, 120 * spe, 140 * spe)
    assert p.lr_values == pytest.approx((0.1, 0.02, 0.004, 1e-4))


def test_batch_larger_than_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="training set size"):
        make_plan(make_cfg("batch=4096"), 1536)


def test_per_rank_divisibility():
    with pytest.raises(ConfigError, match="ghost_batch"):
        plan("batch=384", "regime=gbn", world=2)  # 192 per rank, ghost 128


def test_effective_values_in_composed_config():
    from omegaconf import OmegaConf

    cfg = make_cfg("experiment=resnet44_cifar10", "batch=4096", "regime=adapt")
    eff = OmegaConf.to_container(cfg.effective, resolve=True)
    assert eff["lr"] == pytest.approx(0.1 * math.sqrt(32))
    assert eff["epochs"] == pytest.approx(6400)
    assert eff["updates"] == 6400 * (N // 4096)
    assert eff["ghost_batch"] == 128


def test_milestones_inside_a_partial_last_epoch_use_full_epoch_lengths():
    p = make_plan(make_cfg("epochs=0.5"), 1536)  # digits: 96 updates per epoch, milestones at 2, 3 of 4 epochs
    assert p.total_updates == 48 and p.epoch_steps == (48,)
    assert p.lr_updates == (0, 24, 36)


def test_epochs_override_scales_warmup_too():
    p = plan("batch=512", "regime=linear", "epochs=2")  # 5 of 200 epochs -> 0.05 epochs
    assert p.warmup_updates == round(0.05 * (N // 512))
    assert p.lr_at(p.warmup_updates) == pytest.approx(0.4)


# ------------------------------------------------------------------------------------ schedule shapes
def cosine(peak: float, t: int, total: int, warmup: int = 0, start: float = 0.1) -> float:
    """Closed form: linear warm-up from `start`, then peak * (1 + cos(pi (t - w) / (T - w))) / 2."""
    if t < warmup:
        return start + (peak - start) * t / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


@pytest.mark.parametrize("extra,peak,epochs", [
    ((), 0.1, 200),
    (("batch=512", "regime=adapt"), 0.2, 800),  # adapt stretches the shape: 4x the epochs, same updates
    (("batch=1024", "regime=linear", "epochs=20"), 0.8, 20),  # linear scaling, warm-up 5 of 200 epochs -> 0.5
])
def test_cosine_matches_the_closed_form(extra, peak, epochs):
    p = plan("base.schedule=cosine", *extra)
    spe = N // p.batch_at(0)
    total = round(epochs * spe)
    assert p.total_updates == total
    w = p.warmup_updates
    assert w == (round(0.5 * spe) if "regime=linear" in extra else 0)
    for t in (0, 1, w // 2, w, w + 1, (total + w) // 2, total - 1, total):
        assert p.lr_at(t) == pytest.approx(cosine(peak, t, total, w)), t
    assert p.lr_at(total) == pytest.approx(0.0, abs=1e-12)
    s = p.summary()
    assert s["schedule"] == "cosine" and s["lr_schedule"] == [[w, pytest.approx(peak)], [total, 0.0]]


def test_linear_decay_matches_the_closed_form():
    p = plan("base.schedule=linear", "batch=256", "regime=sqrt_lr")
    total, peak = p.total_updates, 0.1 * math.sqrt(2)
    for t in (0, 7, total // 3, total - 1):
        assert p.lr_at(t) == pytest.approx(peak * (1 - t / total))


def test_step_schedule_is_the_default_and_unchanged():
    assert plan().schedule == "step" and plan().summary()["schedule"] == "step"
    assert plan("base.schedule=step").lr_updates == plan().lr_updates


def test_batch_increase_needs_a_step_schedule():
    with pytest.raises(ConfigError, match="base.schedule='cosine': regime.batch_increase .* needs base.schedule=step"):
        plan("regime=batch_increase", "base.schedule=cosine")


# ------------------------------------------------------------------------------ Smith's momentum rule
def g(p, update: int = 0) -> float:
    """Smith et al.'s noise scale computed here, from the plan's LR, batch and momentum."""
    return p.lr_at(update) * N / (p.batch_at(update) * (1 - p.momentum))


@pytest.mark.parametrize("m,batch", [(0.95, 256), (0.975, 512), (0.8, 64)])
def test_momentum_rule_scales_the_batch_keeping_g(m, batch):
    base = plan()
    p = plan(f"regime.momentum={m}")
    assert p.momentum == m and p.batch_at(0) == batch and p.lr_at(0) == pytest.approx(0.1)
    assert g(p) == pytest.approx(g(base)) == pytest.approx(p.summary()["base_noise_scale"])
    assert p.summary()["noise_scale"] == pytest.approx(p.summary()["base_noise_scale"])


def test_momentum_rule_with_linear_scaling_scales_the_lr():
    p = plan("regime.momentum=0.95", "regime.lr_scaling=linear", "batch=1024")
    assert p.batch_at(0) == 1024 and p.momentum == 0.95
    assert p.lr_at(0) == pytest.approx(0.1 * 8 * 0.05 / 0.1)  # 8x the batch, half of 1 - m
    assert g(p) == pytest.approx(g(plan()))


def test_momentum_rule_refuses_what_cannot_keep_g():
    with pytest.raises(ConfigError, match="regime.momentum=0.93: gives a fractional batch"):
        plan("regime.momentum=0.93")
    with pytest.raises(ConfigError, match="regime.lr_scaling='sqrt': with regime.momentum"):
        plan("regime.momentum=0.95", "regime.lr_scaling=sqrt")
    with pytest.raises(ConfigError, match="batch=512: is set by regime.momentum"):
        plan("regime.momentum=0.95", "batch=512")


# ---------------------------------------------------------------------------------- batch augmentation
def test_duplicates_count_distinct_samples():
    p = plan("duplicates=4", "batch=512")  # 128 distinct samples x 4 copies per step
    assert p.epoch_steps[0] == N // 128 and p.total_updates == 200 * (N // 128)  # as many steps as B_S
    assert p.lr_at(0) == pytest.approx(0.1)
    assert p.noise_scale(0) == pytest.approx(0.1 * N / (128 * 0.1))  # g counts distinct samples
    assert plan("duplicates=1").total_updates == plan().total_updates
    with pytest.raises(ConfigError, match="duplicates=3: must divide the batch"):
        plan("duplicates=3", "batch=512")
