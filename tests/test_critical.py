"""The critical-batch analysis (lbtrain.analysis.critical) on fake search folders built from a known ground truth:
S(B) = S_min (1 + B_noise / B) per batch, multiplicative seed noise, trials that lose, and the confirmation seeds of
the best one; each run's TensorBoard val/error crosses the target exactly at the update its results.json records."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lbtrain.analysis import critical, report
from lbtrain.analysis.runs import find_runs, read_all_scalars
from lbtrain.config import schema_defaults
from lbtrain.identity import identity_hash
from lbtrain.results import Results, dumps

RESAMPLES = 400  # the tests' bootstrap size (the report's default is critical.RESAMPLES): a few seconds per study
CONFIRM = (1, 2, 3, 4, 5)  # confirmation seeds; trials run with seed 0
NOISE = 0.03  # seed-to-seed spread of the steps (log-normal sigma)


def steps_true(batch: int, s_min: float, b_noise: float) -> float:
    return s_min * (1 + b_noise / batch)


def write_run(root: Path, folder: str, ident: dict[str, Any], steps: float | None, target: float,
              budget: int = 100_000, b_simple: float | None = None, b_simple_final: bool = False) -> Path:
    """A run folder as a search's run leaves it: val/error at every evaluation (every 1% of the steps, at least 1
    update apart) as err(t) = target sqrt(steps / t), so the first point at or below the target is the first
    evaluation at or after `steps`, where the run stops; `steps=None` never reaches it (the error stalls above the
    target until `budget`). results.json carries the target block (update, samples, resolution) and, with
    `b_simple`, gns/b_simple at log-spaced updates (or only results.json's final value: `b_simple_final`)."""
    d = root / folder
    d.mkdir(parents=True)
    batch = int(ident["batch"])
    gap = max(1, int(0.01 * (steps or budget)))
    w = SummaryWriter(str(d))
    update = None
    t = gap
    while t <= budget:
        err = target * math.sqrt(steps / t) if steps is not None else target * (1.5 + 1.0 / t)
        w.add_scalar("val/error", err, t)
        if steps is not None and err <= target:
            update = t
            break
        t += gap
    if b_simple is not None and not b_simple_final:
        for k in range(int(math.log2(update or budget)) + 2):
            w.add_scalar("gns/b_simple", b_simple * (0.8 + 0.05 * k), 2**k)  # drifts: only the point nearest counts
    w.close()
    done = update or budget
    res = Results.of_run(
        "completed", ident, identity_hash(ident, schema_defaults()), final_val_error=target if update else 1.5 * target,
        final_val_loss=0.3 + 0.001 * ident["seed"], best_val_error=target, updates=done, planned_updates=budget,
        target_updates=budget, train_size=1024, epochs=done * batch / 1024,
        target={"metric": "error", "value": target, "split": "holdout", "reached": update is not None,
                "update": update, "samples": update * batch if update else None, "resolution": gap})
    if b_simple is not None:
        res.instruments["gns"] = {"b_simple": b_simple * (0.8 + 0.05 * (int(math.log2(done)) + 1))
                                  if not b_simple_final else b_simple, "b_simple_ci": [0.9 * b_simple, 1.1 * b_simple]}
    (d / "results.json").write_text(dumps(res.to_dict()))
    return d


def identity(name: str, batch: int, seed: int, lr: float, target: float, model: str = "digits_mlp") -> dict:
    """As the search composes a trial: its batch, LR, budget (`epochs=`, set per batch size) and seed."""
    return {"name": name, "dataset": {"name": "digits"}, "model": {"name": model}, "batch": batch, "seed": seed,
            "epochs": 40 * 16 / batch, "base": {"lr": lr, "momentum": 0.9}, "target": {"error": target}}


def make_study(root: Path, name: str, batches: list[int], s_min: float, b_noise: float, target: float,
               seed: int = 0, unconfirmed: tuple[int, ...] = (), b_simple: float | None = None,
               model: str = "digits_mlp") -> dict[int, list[float]]:
    """A search at each batch: three trials at seed 0 (the winner 10% faster than the truth, as a search's
    winner is: it was picked for being fast; one 1.5x slower; one that never reaches the target) and the winner's
    hyperparameters re-run with CONFIRM seeds (not at the batches in `unconfirmed`). Returns the true steps of
    each confirmation seed, per batch."""
    rng = np.random.default_rng(seed)
    truth: dict[int, list[float]] = {}
    for b in batches:
        lr = round(0.1 * math.sqrt(b / 16), 6)  # the best LR moves with the batch, as a search finds
        s = steps_true(b, s_min, b_noise)
        tag = f"{name}/target={target}/B={b}"
        write_run(root, f"{tag}/lr={lr},seed=0", identity(name, b, 0, lr, target, model), round(0.9 * s), target,
                  b_simple=b_simple)
        write_run(root, f"{tag}/lr={3 * lr},seed=0", identity(name, b, 0, 3 * lr, target, model), round(1.5 * s),
                  target)
        write_run(root, f"{tag}/lr={lr / 3},seed=0", identity(name, b, 0, lr / 3, target, model), None, target,
                  budget=int(3 * s))
        if b in unconfirmed:
            continue
        truth[b] = []
        for k in CONFIRM:
            steps = round(s * math.exp(NOISE * rng.standard_normal()))
            truth[b].append(steps)
            write_run(root, f"{tag}/lr={lr},seed={k}", identity(name, b, k, lr, target, model), steps, target,
                      b_simple=None if b_simple is None else b_simple * math.exp(0.1 * rng.standard_normal()))
    return truth


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two searches in one folder: to error <= 0.1 with B_noise = 400, and to error <= 0.05 with B_noise = 64
    (not confirmed at B = 1024: its best trial alone)."""
    root = tmp_path_factory.mktemp("search")
    make_study(root, "search", [16, 32, 64, 128, 256, 512, 1024, 2048, 4096], 100.0, 400.0, 0.1, seed=1,
               b_simple=300.0)
    make_study(root, "search", [16, 32, 64, 128, 256, 512, 1024], 300.0, 64.0, 0.05, seed=2, unconfirmed=(1024,))
    return root


@pytest.fixture(scope="module")
def found(two_studies: Path) -> list[critical.Study]:
    return critical.studies(find_runs([two_studies]), resamples=RESAMPLES)


def by_target(found: list[critical.Study]) -> dict[float, critical.Study]:
    return {s.target["value"]: s for s in found}


def test_two_studies_in_one_folder_are_never_mixed(found: list[critical.Study]):
    assert len(found) == 2
    a, b = by_target(found)[0.1], by_target(found)[0.05]
    assert a.searched == b.searched == ["base.lr"]  # base.momentum is the same everywhere: not searched
    assert any("epochs" in n for n in a.notes)  # the budget: set per batch size, not searched, not a study key
    assert [r.batch for r in a.batches] == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert [r.batch for r in b.batches] == [16, 32, 64, 128, 256, 512, 1024]
    for s in found:
        for r in s.batches:
            assert r.trials == 3 and r.trials_reached == 2  # three trials, one never reaches
            assert {c.run.results.target["value"] for c in r.seeds} == {s.target["value"]}
            assert {c.run.identity["target.error"] for c in r.seeds} == {s.target["value"]}
    rows = critical.batch_rows(found)
    assert {(row["study"], row["target"]) for row in rows} == {(a.index, "holdout error <= 0.1"),
                                                             (b.index, "holdout error <= 0.05")}


def test_confirmation_seeds_without_the_winning_trial(found: list[critical.Study]):
    a = by_target(found)[0.1]
    for r in a.batches:
        assert r.confirmed and sorted(c.run.seed for c in r.seeds) == list(CONFIRM)
        assert r.hparams == {"base.lr": repr(round(0.1 * math.sqrt(r.batch / 16), 6))}
        assert r.steps.has_interval and r.resolution is not None
        assert r.resolution <= 0.02 * r.steps.value


def test_steps_equal_those_recomputed_from_tensorboard(two_studies: Path, found: list[critical.Study]):
    """The report's steps to the target are the first val/error point at or below it, read back here with the
    package's TensorBoard reader, independently of the analysis."""
    rows = {(row["study"], row["batch"]): row for row in critical.batch_rows(found)}
    for s in found:
        for r in s.batches:
            recomputed = []
            for c in r.seeds:
                points = read_all_scalars(c.run.path)["val/error"]
                first = next(t for t, v in points if v <= np.float32(s.target["value"]))
                assert c.update == first and c.tensorboard == first and c.agrees
                recomputed.append(first)
            assert rows[(s.index, r.batch)]["steps"] == pytest.approx(np.mean(recomputed))
            assert rows[(s.index, r.batch)]["samples"] == pytest.approx(np.mean(recomputed) * r.batch)
            assert rows[(s.index, r.batch)]["tensorboard_check"] == f"{len(r.seeds)} of {len(r.seeds)} agree"


def test_fit_recovers_b_noise_within_its_interval(found: list[critical.Study], capsys: pytest.CaptureFixture):
    for truth, s in ((400.0, by_target(found)[0.1]), (64.0, by_target(found)[0.05])):
        for name in ("B_noise", "B_noise (E fit)", "B_crit"):
            e = s.fit[name]
            assert e.has_interval and e.lo <= truth <= e.hi, (name, truth, e)
            assert e.value == pytest.approx(truth, rel=0.25)
        with capsys.disabled():
            e = s.fit["B_noise"]
            print(f"\ntrue B_noise {truth:g}: fitted {e.value:.1f} [{e.lo:.1f}, {e.hi:.1f}]; "
                  f"B_crit {s.fit['B_crit'].value:.1f}; S_min {s.fit['S_min'].value:.1f}")


def test_zhang_picks_the_right_batch(found: list[critical.Study]):
    """S(B) B / (S(16) 16) = (B + 400) / 416: 1.115 at 64, 1.27 at 128: the critical batch at 20% is 64."""
    a = by_target(found)[0.1]
    z = a.fit["B_zhang"]
    assert z.value == 64 and z.lo <= 64 <= z.hi and {64} <= set(a.zhang_choices)
    interp = a.fit["B_zhang (interpolated)"]
    assert 64 < interp.value < 128 and interp.lo <= interp.value <= interp.hi
    # exact numbers, no noise: the bound at 20%, 10% and 50%
    batches = [16, 32, 64, 128, 256, 512]
    s = [steps_true(b, 100, 400) for b in batches]
    assert critical.zhang(batches, s, 0.2)["batch"] == 64
    assert critical.zhang(batches, s, 0.1)["batch"] == 32  # 32: (432 / 416) = 1.04; 64: 1.115
    assert critical.zhang(batches, s, 0.5)["batch"] == 128
    z = critical.zhang(batches, s, 0.2)
    exact = (1.2 * 416 - 400)  # where (B + 400) / 416 = 1.2
    assert 64 < z["interpolated"] < 128 and z["interpolated"] == pytest.approx(exact, rel=0.1)
    assert critical.zhang(batches, [s[0], s[1], math.inf, s[3], s[4], s[5]], 0.2)["batch"] == 32  # unreached: beyond
    bumpy = critical.zhang([16, 32, 64, 128], [100.0, 50.0, 40.0, 12.0], 0.2)  # 64 beyond, 128 within again
    assert bumpy["batch"] == 32 and bumpy["within_again"] == [128]


def test_every_interval_contains_its_point(found: list[critical.Study]):
    for s in found:
        for r in s.batches:
            for e in (r.steps, r.samples, r.b_simple):
                if e.has_interval:
                    assert e.lo <= e.value <= e.hi, e
        for name, e in s.fit.items():
            if e.has_interval:
                assert e.lo <= e.value <= e.hi, (name, e)
    for row in critical.fit_rows(found) + critical.batch_rows(found):  # (a bound outside the batches: empty)
        for name in ("estimate", "steps", "samples", "b_simple"):
            point, lo, hi = row.get(name), row.get("lo" if name == "estimate" else f"{name}_lo"), \
                row.get("hi" if name == "estimate" else f"{name}_hi")
            if point is not None:
                assert (lo is None or lo <= point) and (hi is None or point <= hi), row


def test_a_batch_with_one_seed_has_no_interval(found: list[critical.Study]):
    b = by_target(found)[0.05]
    (one,) = [r for r in b.batches if r.batch == 1024]
    assert not one.confirmed and len(one.seeds) == 1 and one.seeds[0].run.seed == 0
    assert one.hparams == {"base.lr": repr(round(0.1 * math.sqrt(1024 / 16), 6))}  # the best trial's
    assert one.steps.value is not None and not one.steps.has_interval and one.steps.note == "no interval: 1 seed"
    (row,) = [r for r in critical.batch_rows(found) if r["study"] == b.index and r["batch"] == 1024]
    assert row["steps_lo"] is None and row["interval"] == "no interval: 1 seed" and row["estimate_from"] == "best trial"
    assert "best trial alone" in row["notes"]
    assert 1024 not in b.fitted and b.fitted == [16, 32, 64, 128, 256, 512]  # picked for being fast: not fitted
    assert any("not fitted" in n and "1024" in n for n in b.notes)
    assert critical.mean_interval([5.0]).lo is None and critical.mean_interval([5.0]).note == "no interval: 1 seed"
    missed = critical.mean_interval([120.0, math.inf, 130.0])  # a seed that never reached: no finite mean
    assert missed.value is None and missed.note == "2 of 3 seeds reached: no finite mean"


def test_b_simple_at_the_crossing(found: list[critical.Study]):
    a, b = by_target(found)[0.1], by_target(found)[0.05]
    for r in a.batches:
        assert r.b_simple.has_interval and r.b_simple.lo <= r.b_simple.value <= r.b_simple.hi
        assert r.b_simple_source.startswith("tensorboard")
    assert a.fit["B_simple"].has_interval and 200 < a.fit["B_simple"].value < 400
    assert b.fit["B_simple"].value is None and all(r.b_simple.value is None for r in b.batches)


def test_b_crit_beyond_the_measured_batches_says_so(tmp_path: Path):
    make_study(tmp_path, "wide", [16, 32, 64, 128, 256, 512], 50.0, 20_000.0, 0.1, seed=3)
    (s,) = critical.studies(find_runs([tmp_path]), resamples=RESAMPLES)
    assert s.fit["B_crit"].value > 512
    rows = {row["quantity"]: row for row in critical.fit_rows([s])}
    assert rows["B_crit"]["value"].startswith("> 512 (beyond the largest batch measured)")
    assert rows["B_crit"]["estimate"] is None and rows["B_noise"]["estimate"] is None
    assert rows["B_zhang"]["value"].startswith(">= 512")  # every batch within 20% of perfect scaling
    assert "every measured batch is within the bound" in rows["B_zhang (interpolated)"]["value"]


def test_report_adds_the_section_by_itself(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Runs with target blocks: lbtrain-report writes the section (tables, figures) without being asked."""
    make_study(tmp_path / "runs", "small", [16, 64, 256, 1024], 100.0, 200.0, 0.1, seed=4, b_simple=150.0)
    out = tmp_path / "rep"
    assert report.main([str(tmp_path / "runs"), "--out", str(out), "--overhead", "0.3"]) == 0
    stdout = capsys.readouterr().out
    assert "Critical batch: steps to the target per batch size" in stdout and "B_crit" in stdout
    for name in ("critical_batch.md", "critical_batch.csv", "critical_batch_fit.md", "critical_batch_fit.csv",
                 "critical_batch.png", "tradeoff.png"):
        assert (out / name).is_file(), name
    assert (out / "critical_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "critical_batch_fit.csv") as f:
        rows = {r["quantity"]: r for r in csv.DictReader(f)}
    assert rows["B_zhang"]["overhead"] == "0.3"
    with open(out / "critical_batch.csv") as f:
        assert [int(r["batch"]) for r in csv.DictReader(f)] == [16, 64, 256, 1024]
    assert report.main([str(tmp_path / "runs"), "--out", str(out), "--overhead", "-1"]) == 2
    assert "--overhead" in capsys.readouterr().err


def test_report_without_target_blocks_is_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture):
    from helpers import make_run

    make_run(tmp_path / "runs", "batch=64")
    out = tmp_path / "rep"
    assert report.main([str(tmp_path / "runs"), "--out", str(out), "--no-figures"]) == 0
    assert "Critical batch" not in capsys.readouterr().out
    assert not (out / "critical_batch.md").exists()
    assert report.main([str(tmp_path / "runs"), "--out", str(out), "--no-figures", "--critical-batch"]) == 0
    assert "no run carries a target block" in capsys.readouterr().out
    assert not (out / "critical_batch.md").exists()


def test_a_crossing_that_tensorboard_contradicts_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture):
    make_study(tmp_path / "runs", "bad", [16, 64, 256], 100.0, 200.0, 0.1, seed=5)
    path = next((tmp_path / "runs").rglob("B=64/lr=0.2,seed=3/results.json"))
    res = Results.from_dict(json.loads(path.read_text()))
    res.target = {**res.target, "update": res.target["update"] - 1}  # not where the points cross
    path.write_text(dumps(res.to_dict()))
    tables, _, (s,) = critical.write_critical(find_runs([tmp_path / "runs"]), tmp_path / "rep", figures=False,
                                              resamples=50)
    (row,) = [r for r in tables["critical_batch"] if r["batch"] == 64]
    assert row["tensorboard_check"] == "4 of 5 agree" and "TensorBoard puts the crossing at" in row["notes"]
    assert "warning" in capsys.readouterr().err
