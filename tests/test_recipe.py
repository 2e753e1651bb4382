"""What the trainer actually runs, compared with values computed here, independently, from the config's numbers.

The regime arithmetic has its own closed-form tests (test_regime.py); these check the other half: that a real
`Trainer.fit()` hands those numbers to the optimizer on the right update (LR, momentum, weight decay, nesterov,
the batch), clips what it says it clips, measures ||w_t - w_0|| over every trainable parameter, evaluates in eval
mode, and that the report never averages runs of different configurations into one Table-1 cell. Nothing here
asks lbtrain.regime (or any other lbtrain arithmetic) for an expected value.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_cfg, make_run, scalars

from lbtrain.analysis import report
from lbtrain.checkpoint import load_checkpoint
from lbtrain.models import build_model
from lbtrain.trainer import Trainer

DIGITS_SHAPE, DIGITS_CLASSES = (1, 8, 8), 10
RUN_ONLY = ("device=cpu", "progress=false", "threads=1")  # how a run executes, not what it trains


@pytest.fixture(autouse=True)
def _restore_threads():
    """`threads=1` (one thread is fastest for these tiny models on a shared machine) sets torch's global pool."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def trainable(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in net.named_parameters() if p.requires_grad}


def total_norm(tensors) -> float:
    """||.||_2 over all given tensors, in float64."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


# ------------------------------------------------------------------------------------ the optimizer's recipe
@dataclass(frozen=True)
class Recipe:
    """A run and its plan written out by hand from the config's numbers (see each case's comments)."""

    overrides: tuple[str, ...]
    updates: int
    lr: object  # update u (0-based: the step producing update u + 1) -> LR
    batch: object  # update u -> batch
    momentum: float
    weight_decay: float
    nesterov: bool
    grad_clip: float
    checkpoints: dict[int, str]  # updates that must be observed, and why


def _linear_lr(u: int) -> float:
    # batch 64 = 4 x B_S 16, linear scaling: 4 x 0.1 = 0.4. `epochs=1` of the recipe's 4 shrinks every epoch
    # count by 4: one epoch of 1536 // 64 = 24 updates; warm-up 1 epoch -> 0.25 epoch = 6 updates, linear from
    # the base 0.1; milestones 2 and 3 -> epochs 0.5 and 0.75 = updates 12 and 18, x0.1 each.
    if u < 6:
        return 0.1 + (0.4 - 0.1) * u / 6
    return 0.4 if u < 12 else 0.04 if u < 18 else 0.004


def _increase_lr(u: int) -> float:
    # Smith et al. at batch 32 with `epochs=2` (milestones 2, 3 of 4 -> epochs 1 and 1.5): at epoch 1 the batch
    # grows x10 (the recipe's drop) to 320 instead of the LR dropping; at epoch 1.5 a further x10 (3200) exceeds
    # the 1536 samples, so the LR drops instead, at update 48 + round(0.5 * (1536 // 320 = 4)) = 50.
    return 0.1 if u < 50 else 0.01


RECIPES = {
    "linear_warmup": Recipe(
        overrides=("regime=linear", "batch=64", "regime.warmup_epochs=1", "epochs=1", "base.momentum=0.8",
                   "base.weight_decay=5e-4", "base.nesterov=true", "base.grad_clip=1.5"),
        updates=24, lr=_linear_lr, batch=lambda u: 64, momentum=0.8, weight_decay=5e-4, nesterov=True,
        grad_clip=1.5,
        checkpoints={0: "warm-up start", 5: "last warm-up update", 6: "warm-up done", 11: "before milestone 1",
                     12: "milestone 1", 17: "before milestone 2", 18: "milestone 2", 23: "last update"}),
    "batch_increase": Recipe(
        overrides=("regime=batch_increase", "batch=32", "epochs=2", "base.grad_clip=1.5"),
        # epoch 0: 1536 // 32 = 48 updates of 32; epoch 1: 1536 // 320 = 4 updates of 320
        updates=52, lr=_increase_lr, batch=lambda u: 32 if u < 48 else 320, momentum=0.9, weight_decay=1e-4,
        nesterov=False, grad_clip=1.5,
        checkpoints={47: "last update of batch 32", 48: "batch increase", 49: "before the LR drop",
                     50: "LR drop past max_batch", 51: "last update"}),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_optimizer_runs_the_planned_recipe(tmp_path: Path, name: str):
    """Wrap the optimizer step of a real run: at every update the param groups hold the LR, momentum, weight
    decay and nesterov of the plan computed above, the batch has the planned size, the clipped gradient has norm
    <= grad_clip (and is untouched below it), and the parameters move exactly as SGD with those numbers moves
    them from the gradient the optimizer was given."""
    rc = RECIPES[name]
    trainer = Trainer(make_cfg(*rc.overrides, *RUN_ONLY), tmp_path)
    trainer.setup()
    params = trainable(trainer.net)
    seen: dict[int, dict] = {}
    raw: dict[str, list] = {}  # this update's gradient before clipping, and its batch size

    def after_backward(t, x, y, log_now):
        raw["grads"] = [p.grad.detach().clone() for p in params.values()]
        raw["batch"] = x.shape[0]

    trainer.hooks.after_backward.append(after_backward)
    buffers: dict[str, torch.Tensor] = {}  # this test's own momentum buffers
    inner = trainer.opt.step

    def step(*args, **kwargs):
        u = trainer.state.step  # updates made so far: this step produces update u + 1
        groups = trainer.opt.param_groups
        opt_params = {id(p) for g in groups for p in g["params"]}
        assert opt_params == {id(p) for p in params.values()}, "the optimizer does not hold every trainable param"
        before = {n: p.detach().clone() for n, p in params.items()}
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        out = inner(*args, **kwargs)
        lr = rc.lr(u)
        # SGD as torch documents it (dampening 0): d = g + wd w; b = m b + d (b = d at the first step);
        # w -= lr (d + m b) with nesterov, else lr b. Computed here from the recipe's numbers, not the groups'.
        moved = {}
        for n, p in params.items():
            d = grads[n] + rc.weight_decay * before[n]
            buffers[n] = d.clone() if n not in buffers else rc.momentum * buffers[n] + d
            direction = d + rc.momentum * buffers[n] if rc.nesterov else buffers[n]
            expected = before[n] - lr * direction
            moved[n] = float((p.detach() - expected).abs().max() / (lr * direction).abs().max().clamp_min(1e-12))
        seen[u] = {"lr": [g["lr"] for g in groups], "momentum": [g["momentum"] for g in groups],
                   "weight_decay": [g["weight_decay"] for g in groups],
                   "nesterov": [g["nesterov"] for g in groups], "batch": raw["batch"],
                   "raw_norm": total_norm(raw["grads"]), "clipped_norm": total_norm(grads.values()),
                   "untouched": all(torch.equal(a, b) for a, b in zip(raw["grads"], grads.values())),
                   "moved_error": max(moved.values())}
        return out

    trainer.opt.step = step  # an instance attribute: whatever class the optimizer is
    res = trainer.fit()

    assert res["status"] == "completed" and res["updates"] == rc.updates
    assert sorted(seen) == list(range(rc.updates))  # one optimizer step per update, none skipped
    assert set(rc.checkpoints) <= set(seen)
    clipped = unclipped = 0
    for u, s in seen.items():
        where = f"update {u} ({rc.checkpoints.get(u, 'plain')})"
        assert s["lr"] == [pytest.approx(rc.lr(u), rel=1e-12)] * len(s["lr"]), where
        assert s["momentum"] == [rc.momentum] * len(s["momentum"]), where
        assert s["weight_decay"] == [rc.weight_decay] * len(s["weight_decay"]), where
        assert s["nesterov"] == [rc.nesterov] * len(s["nesterov"]), where
        assert s["batch"] == rc.batch(u), where
        assert s["clipped_norm"] <= rc.grad_clip * (1 + 1e-5), where
        if s["raw_norm"] <= rc.grad_clip * (1 - 1e-5):
            unclipped += 1
            assert s["untouched"] and s["clipped_norm"] == s["raw_norm"], where
        elif s["raw_norm"] > rc.grad_clip * (1 + 1e-5):
            clipped += 1
            assert s["clipped_norm"] == pytest.approx(rc.grad_clip, rel=1e-5), where
        assert s["moved_error"] < 1e-3, where  # the parameters moved as SGD with these numbers moves them
    assert clipped and unclipped, (clipped, unclipped)  # both branches of clipping were exercised


# ------------------------------------------------------------------------------------ ||w_t - w_0||
def test_weight_distance_is_over_every_trainable_parameter(tmp_path: Path):
    """`final_distance` and every logged `weights/distance` point equal ||w_t - w_0|| computed here over every
    trainable parameter: w_t from the checkpoint (final) or snapshots taken at each update, w_0 rebuilt from the
    seed without the trainer."""
    cfg = make_cfg("seed=3", "max_steps=30", "log_every=7", *RUN_ONLY)
    trainer = Trainer(cfg, tmp_path)
    trainer.setup()
    snapshots = {}
    trainer.hooks.step_end.append(
        lambda t: snapshots.__setitem__(t.state.step, {n: p.detach().clone() for n, p in trainable(t.net).items()}))
    res = trainer.fit()
    assert res["updates"] == 30

    torch.manual_seed(3)  # what a run does before building its model
    w0 = trainable(build_model(cfg.model, DIGITS_CLASSES, DIGITS_SHAPE))
    assert len(w0) > 1 and set(w0) == set(trainable(trainer.net))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    for saved, (n, w) in zip(ckpt["w0"], w0.items()):
        assert torch.equal(saved, w), n  # the run started from the w_0 rebuilt here

    def distance(weights: dict[str, torch.Tensor]) -> float:
        return total_norm(weights[n] - w0[n] for n in w0)

    final = {n: ckpt["model"][n] for n in w0}
    assert res["final_distance"] == pytest.approx(distance(final), rel=1e-5)
    logged = dict(scalars(tmp_path)["weights/distance"])
    assert logged[0] == 0.0 and {1, 2, 10, 30} <= set(logged) and len(logged) > 12
    for step, value in logged.items():
        if step:
            assert value == pytest.approx(distance(snapshots[step]), rel=1e-5), step
    assert dict(trainer.state.distances)[30] == pytest.approx(distance(snapshots[30]), rel=1e-5)


# ------------------------------------------------------------------------------------ evaluation mode
C1_TINY = ("experiment=c1_cifar10", "dataset=synthetic", "dataset.shape=[3,8,8]", "dataset.train_size=128",
           "dataset.val_size=96", "model.kwargs.channels=8", "base.batch=32", "epochs=1")


def test_evaluation_is_in_eval_mode_without_ghost_bn(tmp_path: Path):
    """C1 (BatchNorm and dropout 0.5), plain BN (regime baseline): validation equals a manual eval() pass (no
    dropout, BN running statistics), leaves the running statistics alone and puts the model back in training."""
    trainer = Trainer(make_cfg(*C1_TINY, *RUN_ONLY), tmp_path)
    trainer.setup()
    assert trainer.plan.ghost_batch is None
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in trainer.net.modules())
    res = trainer.fit()
    assert res["status"] == "completed" and res["updates"] == 4

    x, y = next(trainer.val_loader.eval_batches(10_000))  # the whole validation set, in order
    assert x.shape[0] == 96

    def manual(train: bool) -> tuple[float, float]:
        net = copy.deepcopy(trainer.net).train(train)
        with torch.no_grad():
            out = net(x)
        return float(F.cross_entropy(out, y)), int((out.argmax(1) != y).sum()) / y.shape[0]

    loss, error = manual(train=False)
    assert res["final_val_loss"] == pytest.approx(loss, rel=1e-5)
    assert res["final_val_error"] == pytest.approx(error, abs=1e-12)
    assert manual(train=True)[0] != pytest.approx(loss, rel=1e-3)  # train mode would tell: the check has teeth

    buffers = {n: b.clone() for n, b in trainer.net.named_buffers()}
    again = trainer.evaluate()
    assert again == trainer.evaluate()  # no dropout: evaluation is deterministic
    assert again["val/loss"] == pytest.approx(loss, rel=1e-5)
    for n, b in trainer.net.named_buffers():
        assert torch.equal(b, buffers[n]), f"evaluation changed {n}"
    assert trainer.net.training  # back to training mode for the next update


# ------------------------------------------------------------------------------------ Table 1 cells
def test_table1_never_averages_runs_that_differ_beyond_the_seed(tmp_path: Path):
    """Runs that differ in ghost batch, base LR or epochs (updates) land in different Table-1 rows or cells, and
    every cell holds only its own runs' numbers; seeds of one configuration (and only those) are averaged."""
    root = tmp_path / "outputs"
    runs = {  # overrides -> validation errors of its seeds 0, 1, ...
        (): [0.05, 0.07],  # B_S baseline
        ("batch=64", "regime=gbn"): [0.10, 0.12],  # ghost batch 16 (B_S): the default
        ("batch=64", "regime=gbn", "ghost_batch=32"): [0.20],
        ("batch=64", "regime=gbn", "ghost_batch=64"): [0.24],
        ("batch=64", "regime=adapt"): [0.30],
        ("batch=64", "regime=adapt", "base.lr=0.2"): [0.36],
        ("batch=64", "regime=sqrt_lr"): [0.40],
        ("batch=64", "regime=sqrt_lr", "epochs=2"): [0.46],
        ("batch=64", "regime=sqrt_lr", "base.lr=0.05"): [0.52],
    }
    for overrides, errors in runs.items():
        for seed, err in enumerate(errors):
            make_run(root, *overrides, *([f"seed={seed}"] if seed else []), error=err, events=False)
    found = report.find_runs([root])
    assert len(found) == 11 and not [r for r in found if r.duplicate_of]

    def cell(errors: list[float]) -> str:
        return report.mean_std([100 * (1 - e) for e in errors], digits=2)

    def number(text: str) -> str:  # a cell without its "(n=1)" note (fewer seeds than the fullest cell)
        return text.split(" (")[0]

    rows = report.table1(found)
    value_columns = [c for c in rows[0] if c == report.SB_COLUMN or c in ("LB", "+LR", "+GBN", "+RA")]
    cells = [number(row[c]) for row in rows for c in value_columns if row[c] != "-"]
    expected = [cell(errors) for errors in runs.values()]
    # every configuration's numbers are in the table, each in a cell of its own (the baseline cell is repeated on
    # the rows that share its configuration: at most once per row)
    for e in expected:
        assert e in cells, (e, rows)
    assert sorted(set(cells)) == sorted(expected), rows
    for row in rows:
        row_cells = [number(row[c]) for c in value_columns if row[c] != "-" and c != report.SB_COLUMN]
        assert len(row_cells) == len(set(row_cells)), row
    assert cell([0.10, 0.12]) == "89.00 ± 1.41"  # the seeds of one configuration are averaged
    # the rows say how they differ
    assert {"ghost_batch", "base.lr", "epochs"} <= set(rows[0]), list(rows[0])

    agg = report.aggregate_table(found)
    assert len(agg) == len(runs)  # one row per configuration in the per-configuration table too
    assert sorted(r["seeds"] for r in agg) == sorted(len(e) for e in runs.values())
