"""The search sweeper (`hydra/sweeper=search`, hydra_plugins/lbtrain_search): its points, trials and budget as
arithmetic, then real searches on the digits experiment through the CLI: the runs, the confirmation of each batch
size's best trial, a re-run that trains nothing, a failed trial that the search survives, the joblib launcher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import make_cfg, run_cli, run_main

from hydra_plugins.lbtrain_search import _plan as plan
from lbtrain.config import ConfigError
from lbtrain.identity import diff
from lbtrain.regime import make_plan

pytestmark = pytest.mark.usefixtures("one_thread")

# A small search: two batch sizes, two trials each, the best of each confirmed with two new seeds. target.error
# 0.1 (not the preset's 0.05): both batch sizes reach it, so both have a best trial to confirm.
SMALL = ("-m", "sweep=critical_batch", "hydra.sweeper.batches=[16,128]", "hydra.sweeper.trials=2",
         "hydra.sweeper.confirm_seeds=2", "target.error=0.1")


def compose(overrides: list[str]):
    return make_cfg(*overrides)


# ------------------------------------------------------------------------------------------------ arithmetic
def test_plugin_is_discovered():
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    names = [f"{p.__module__}.{p.__name__}" for p in Plugins.instance().discover(Sweeper)]
    assert "hydra_plugins.lbtrain_search.search_sweeper.SearchSweeper" in names, \
        "Hydra does not see the search sweeper: reinstall lbtrain (pip install -e .)"


def test_sobol_points_are_deterministic_and_stratified():
    a, b = plan.sobol_points(2, 16, seed=0), plan.sobol_points(2, 16, seed=0)
    assert a == b  # a re-run of a search composes the same trials
    assert plan.sobol_points(2, 16, seed=1) != a
    assert plan.sobol_points(2, 5, seed=0) == a[:5]  # fewer trials: the same first points
    assert all(0 <= v < 1 for p in a for v in p)
    # 16 scrambled Sobol points in 2-D are a (0, 4, 2)-net: one point in each of the 16 cells of every 1x16,
    # 16x1, 2x8, 4x4 and 8x2 partition of the square, i.e. the space is covered evenly
    for nx in (1, 2, 4, 8, 16):
        ny = 16 // nx
        cells = {(int(x * nx), int(y * ny)) for x, y in a}
        assert len(cells) == 16, (nx, ny)


def test_values_are_rounded_and_centred_on_the_rule():
    lr, mom = plan.dimensions(_sgd_space())  # sorted by name
    for t in (0.0, 0.37, 0.999):
        for batch in (16, 512):
            text = lr.value(t, batch, 16, 0.1)
            centre = 0.1 * math.sqrt(batch / 16)
            assert centre * 10**-1.5 * 0.99 <= float(text) <= centre * 10**1.5 * 1.01
            assert text == repr(float(f"{float(text):.3g}"))  # three significant digits, read back the same
            m = mom.value(t, batch, 16, 0.1)
            assert 0.5 - 1e-9 <= float(m) <= 0.999 + 1e-9 and len(m) <= 8


def _sgd_space(name: str = "sgd") -> dict:
    from omegaconf import OmegaConf

    from lbtrain.paths import config_dir

    return OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "hydra" / "sweeper" / "space" / f"{name}.yaml"))


def test_adam_space_sets_beta2_and_centres_on_adams_lr():
    search = {"batches": [64], "trials": 4, "budget": {"unit": "steps", "amount": 50}, "space": _sgd_space("adam")}
    study = plan.expand(search, ["sweep=critical_batch", "optimizer=adamw"], compose)
    for t in study.trials:
        cfg = make_cfg(*t.overrides)
        assert 0.9 <= cfg.optimizer.betas[1] <= 0.9999 and cfg.optimizer.betas[0] == 0.9
        assert 1e-3 * 2 * 10**-1.5 * 0.99 <= cfg.base.lr <= 1e-3 * 2 * 10**1.5 * 1.01  # sqrt(64 / 16) = 2
    with pytest.raises(ConfigError, match="has no betas"):
        plan.expand(search, ["sweep=critical_batch"], compose)  # SGD has no beta2


@pytest.mark.parametrize("batch", [16, 96, 512])
def test_budget_gives_exactly_its_updates(batch):
    """The budget (epochs of the training set left after the holdout, at least min_steps updates) becomes each
    trial's `epochs=`, which lbtrain's plan turns into exactly that many updates (96 does not divide 1280)."""
    search = {"batches": [batch], "trials": 2, "budget": {"unit": "epochs", "amount": 8, "min_steps": 100},
              "space": _sgd_space()}
    study = plan.expand(search, ["sweep=critical_batch"], compose)
    assert len(study.trials) == 2
    for t in study.trials:
        assert t.overrides[0] == "regime=baseline" and f"batch={batch}" in t.overrides
        cfg = make_cfg(*t.overrides)
        assert cfg.regime.lr_scaling.name == "none" and cfg.base.schedule.name == "constant"
        assert make_plan(cfg, 1280).total_updates == t.steps == max(100, math.ceil(8 * 1280 / batch))
        assert float(cfg.base.lr) == float(t.values["base.lr"])  # taken as sampled: no scaling rule applied


def test_budget_rules():
    assert plan.budget_steps({"unit": "steps", "amount": 300, "min_steps": 10}, 4096, 10000) == 300
    assert plan.budget_steps({"unit": "samples", "amount": 1e6, "min_steps": 10}, 1000, 10000) == 1000
    assert plan.budget_steps({"unit": "samples", "amount": 1e6, "min_steps": 2000}, 1000, 10000) == 2000
    with pytest.raises(ConfigError, match="budget.unit"):
        plan.budget_steps({"unit": "hours", "amount": 1}, 16, 100)


@pytest.mark.parametrize("study, key", [
    (["sweep=critical_batch", "batch=32"], "batch"),
    (["sweep=critical_batch", "base.lr=0.1"], "base.lr"),
    (["sweep=critical_batch", "regime=sqrt_lr"], "regime"),
    (["sweep=critical_batch", "target.error=null"], "target.error"),
    (["sweep=critical_batch", "seed=0,1"], "seed"),
])
def test_study_settings_the_search_cannot_take(study, key):
    search = {"batches": [16], "trials": 2, "budget": {"unit": "steps", "amount": 10}, "space": _sgd_space()}
    with pytest.raises(ConfigError) as e:
        plan.expand(search, study, compose)
    assert e.value.key == key


def test_best_trial_and_its_confirmations():
    def o(i: int, update: int | None, loss: float | None, status: str = "completed") -> plan.Outcome:
        t = plan.Trial(batch=64, index=i, values={"base.lr": "0.1"}, epochs="2", steps=40, overrides=["batch=64"])
        return plan.outcome(t, {"status": status, "final_val_loss": loss,
                                "target": {"reached": update is not None, "update": update}})

    tied = [o(0, 12, 0.30), o(1, 9, 0.40), o(2, 9, 0.20), o(3, None, 0.01), o(4, 5, 0.1, "diverged")]
    assert plan.best(tied).trial.index == 2  # fewest updates, then the lower final loss; a diverged run never wins
    assert plan.best([o(0, None, 0.3)]) is None
    again = plan.confirmations(tied[2].trial, trial_seed=0, seeds=5)
    assert [t.seed for t in again] == [1, 2, 3, 4, 5]  # new seeds: the trial itself (seed 0) is not one of them
    assert all(t.overrides == ["batch=64", f"seed={t.seed}"] for t in again)
    trial = plan.Trial(batch=64, index=0, values={}, epochs="2", steps=40, overrides=["batch=64", plan.TRIAL_ONLY])
    assert plan.confirmations(trial, 0, 1)[0].overrides == ["batch=64", "seed=1"]  # confirmations evaluate the test


# ------------------------------------------------------------------------------------------- real searches
def _summary(root: Path) -> dict:
    (path,) = (root / "outputs" / "digits").glob("search-*.json")
    return json.loads(path.read_text())


def _stamps(root: Path) -> dict[str, float]:
    files = [*root.rglob("results.json"), *root.rglob("checkpoint.pt"), *root.rglob("events.out.tfevents*")]
    return {str(p): p.stat().st_mtime_ns for p in files}


def test_search_confirms_the_best_trials_and_a_rerun_trains_nothing(tmp_path):
    p = run_main(*SMALL, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    s = _summary(tmp_path)
    assert [row["batch"] for row in s["batches"]] == [16, 128]
    for row in s["batches"]:
        assert len(row["trials"]) == 2 and all(t["seed"] is None for t in row["trials"])
        best = row["best"]
        assert best is not None and best["reached"]
        reached = [t["update"] for t in row["trials"] if t["reached"]]
        assert best["update"] == min(reached)
        # the confirmation: the best trial's hyperparameters, only the seed differs
        first, again = row["confirmations"]  # confirm_seeds=2: two new seeds, not the trial's own
        assert (first["seed"], again["seed"]) == (1, 2)
        assert again["values"] == best["values"] and again["epochs"] == best["epochs"]
        mine = json.loads((Path(best["run_dir"]) / "results.json").read_text())
        theirs = json.loads((Path(again["run_dir"]) / "results.json").read_text())
        assert [k for k, _, _ in diff(mine["identity"], theirs["identity"])] == ["seed"]
        assert mine["lr"] == float(best["values"]["base.lr"])  # regime=baseline: the sampled LR as is
        assert mine["target"]["split"] == "holdout"
        # the test split: skipped by the trials (ranked on the holdout), reported by the confirmed runs
        assert mine["final_test_error"] is None and theirs["final_test_error"] is not None
    runs = [d for d in (tmp_path / "outputs" / "digits").iterdir() if d.is_dir()]
    assert len(runs) == 8  # 2 batches x (2 trials + 2 confirmations)

    before = _stamps(tmp_path)
    again = run_main(*SMALL, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert _stamps(tmp_path) == before  # nothing trained, nothing rewritten
    assert sum((d / "lbtrain.log").read_text().count("nothing to do") for d in runs) == 8
    assert _summary(tmp_path)["batches"] == s["batches"]  # the recorded results: the same choices


def test_failed_trial_is_recorded_and_the_search_goes_on(tmp_path):
    # batch 2048 exceeds digits' 1280 training samples: the whole-search check refuses it before anything runs
    args = ("-m", "sweep=critical_batch", "hydra.sweeper.batches=[16,2048]", "hydra.sweeper.trials=2",
            "hydra.sweeper.confirm_seeds=2", "target.error=0.1")
    p = run_main(*args, cwd=tmp_path)
    assert p.returncode == 2 and "2 job(s) of this sweep are refused" in p.stderr and "batch=2048" in p.stderr
    assert p.stderr.count("\n") == 1 and not (tmp_path / "outputs" / "digits").exists()

    p = run_main(*args, "skip_bad_jobs=true", cwd=tmp_path)
    assert p.returncode == 1 and "some jobs of the multirun failed" in p.stderr  # recorded; the search went on
    big, small = (next(r for r in _summary(tmp_path)["batches"] if r["batch"] == b) for b in (2048, 16))
    assert big["best"] is None and big["confirmations"] == []
    for t in big["trials"]:
        assert t["status"] == "failed" and "exceeds the training set" in t["error"]
        assert json.loads((Path(t["run_dir"]) / "results.json").read_text())["status"] == "failed"
    assert small["best"] is not None and len(small["confirmations"]) == 2  # the other batch size went on


def test_search_on_the_joblib_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    p = run_cli(*SMALL, "hydra/launcher=local", "hydra.launcher.n_jobs=2", cwd=tmp_path, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    s = _summary(tmp_path)
    for row in s["batches"]:
        assert row["best"] is not None and [c["seed"] for c in row["confirmations"]] == [1, 2]
        assert all(c["status"] == "completed" for c in row["confirmations"])


def test_refused_search_setting_is_one_line(tmp_path):
    p = run_main("-m", "sweep=critical_batch", "batch=32", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("lbtrain: error: batch=") and "set by the search" in p.stderr
    assert not (tmp_path / "outputs").exists()
