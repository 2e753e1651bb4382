"""The structural seams: a run is prepared once, instruments are plug-ins (one module + one registry entry), their
last results survive any kill, and what a run is gets recorded from its identity and plan by one constructor."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import make_cfg, only_run, run_cli, run_main
from omegaconf import OmegaConf

from lbtrain import session
from lbtrain.config import resolved
from lbtrain.identity import identity, run_only
from lbtrain.instruments import base as instruments
from lbtrain.results import Results, describe
from lbtrain.trainer import Trainer


@pytest.fixture
def count_checks(monkeypatch):
    """Counts the runs of the pre-flight check (`lbtrain.session.check_config`)."""
    calls: list[int] = []
    real = session.check_config

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(session, "check_config", counted)
    return calls


def test_a_single_run_is_checked_once(tmp_path, count_checks, monkeypatch):
    import lbtrain.config as config

    validated: list[int] = []
    real = config.check_known_keys  # the first thing `validate` does
    monkeypatch.setattr(config, "check_known_keys", lambda cfg: (validated.append(1), real(cfg))[1])
    p = run_main("max_steps=3", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert len(count_checks) == 1 and len(validated) == 1


def test_each_sweep_job_is_checked_once(tmp_path, count_checks):
    p = run_main("-m", "seed=1,2,3", "max_steps=3", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert len(count_checks) == 3


def test_the_folder_lock_is_taken_by_prepare_and_released(tmp_path):
    cfg = make_cfg("max_steps=3")
    run_dir = tmp_path / "run"
    prepared = session.prepare(cfg, run_dir, lock=True)
    assert prepared.lock is not None and prepared.lock.held and (run_dir / ".lock").exists()
    from lbtrain.rundir import RunFolderError

    with pytest.raises(RunFolderError, match="being written by another lbtrain process"):
        session.prepare(cfg, run_dir, lock=True)  # a second writer is refused
    prepared.release()
    session.prepare(cfg, run_dir, lock=True).release()


def test_a_refused_prepare_writes_nothing(tmp_path):
    with pytest.raises(Exception, match="must divide"):
        session.prepare(make_cfg("micro_batch=7"), tmp_path / "run", lock=True)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- instruments as plug-ins
class CountSteps:
    """A toy instrument (not shipped): counts updates and log steps through the public hooks only."""

    def __init__(self, run: instruments.Run, node: Any) -> None:
        self.every = int(node.every)
        self.updates, self.logs = 0, 0
        run.hooks.step_end.append(self._step)
        run.hooks.log.append(lambda r, scalars: self._log())

    def _step(self, run: instruments.Run) -> None:
        self.updates += 1

    def _log(self) -> None:
        self.logs += 1

    def results(self) -> dict[str, Any] | None:
        return {"updates": self.updates, "logs": self.logs, "every": self.every}

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "logs": self.logs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates, self.logs = state["updates"], state["logs"]


@pytest.fixture
def toy_instrument(monkeypatch):
    monkeypatch.setitem(instruments.REGISTRY, "count_steps", instruments.InstrumentSpec(
        "count_steps", "count_steps", enabled=lambda node: node is not None,
        factory=f"{__name__}:CountSteps"))
    yield


def _with_node(cfg: Any, **node: Any) -> Any:
    OmegaConf.set_struct(cfg, False)
    cfg.count_steps = node
    OmegaConf.set_struct(cfg, True)
    return cfg


def test_a_toy_instrument_is_one_class_and_one_registry_entry(tmp_path, toy_instrument):
    cfg = _with_node(make_cfg("max_steps=12", "log_every=5", "progress=false", "threads=1"), every=2)
    assert "count_steps" in run_only()  # its config node is run-only by being an instrument's
    assert "count_steps" not in identity(OmegaConf.to_container(cfg, resolve=True))
    t = Trainer(cfg, tmp_path)
    t.setup()
    assert isinstance(t.instruments["count_steps"], instruments.Instrument)
    res = t.fit()
    assert res["count_steps"] == {"updates": 12, "logs": 3, "every": 2}  # logs at 5, 10 and the last update
    assert json.loads((tmp_path / "results.json").read_text())["count_steps"]["updates"] == 12


def test_instrument_state_and_results_round_trip_through_the_checkpoint(tmp_path, toy_instrument):
    cfg = _with_node(make_cfg("max_steps=12", "log_every=5", "progress=false", "threads=1", "sharpness.every_epochs=1",
                              "sharpness.samples=32", "sharpness.iters=3", "sharpness.trace_samples=2", "gns=true"),
                     every=2)
    t = Trainer(cfg, tmp_path)
    t.setup()
    first = t.fit()
    (tmp_path / "results.json").unlink()  # a kill between the final checkpoint and results.json
    again = Trainer(cfg, tmp_path)
    again.setup()
    second = again.fit()
    for name in ("count_steps", "gns", "sharpness"):
        assert second[name] == first[name] and first[name] is not None, name
    assert second["status"] == "completed"


def test_every_shipped_instrument_keeps_its_results_in_its_state(tmp_path):
    t = Trainer(make_cfg("max_steps=8", "log_every=4", "progress=false", "threads=1", "gns=true",
                         "layer_distance=true", "sharpness.every_epochs=1", "sharpness.samples=32",
                         "sharpness.iters=3", "sharpness.trace_samples=0"), tmp_path)
    t.setup()
    t.fit()
    assert set(t.instruments) == set(instruments.REGISTRY)
    for name, inst in t.instruments.items():
        state = inst.state_dict()
        other = instruments.REGISTRY[name].build(t, instruments.node_of(t.cfg, instruments.REGISTRY[name]))
        other.load_state_dict(state)
        assert other.results() == inst.results(), name


def test_the_final_sharpness_survives_a_kill_before_results_json(tmp_path):
    """Kill the process right after the final checkpoint (fault injection at the last update is too early: use a
    checkpoint-then-kill by removing results.json, as a SIGKILL between the two writes leaves it)."""
    args = ("max_steps=10", "sharpness.every_epochs=1", "sharpness.samples=32", "sharpness.iters=3",
            "sharpness.trace_samples=2")
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    run = only_run(tmp_path / "outputs" / "digits")
    first = json.loads((run / "results.json").read_text())
    (run / "results.json").unlink()
    p = run_cli(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    second = json.loads((run / "results.json").read_text())
    assert second["sharpness"] == first["sharpness"] and second["sharpness"]["lambda_max"] > 0


# ------------------------------------------------------------------------------------------- the one record
def test_the_record_describes_the_batch_the_run_trains_at(tmp_path):
    """regime.momentum sets the batch through Smith et al.'s rule: results.json records that batch."""
    cfg = make_cfg("regime.momentum=0.95", "max_steps=2", "progress=false", "threads=1")
    t = Trainer(cfg, tmp_path)
    t.setup()
    res = t.fit()
    assert t.batch == 32 and res["batch"] == 32 and res["bn_batch"] == 32
    assert res["effective"]["batch_schedule"][0][1] == 32


def test_describe_reads_identity_and_plan_only():
    ident = identity(resolved(make_cfg("regime=gbn", "batch=64", "ghost_batch=8")))
    d = describe(ident)
    assert (d["experiment"], d["regime"], d["batch"], d["ghost_batch"], d["base_batch"]) == ("digits", "gbn", 64, 8,
                                                                                              16)
    plan = {"batch_schedule": [[0, 96]], "ghost_batch": 8, "lr": 0.2}
    assert describe(ident, plan)["batch"] == 96  # the plan's batch wins
    r = Results.of_run("failed", ident, "abc", error="x")
    assert r.regime == "gbn" and r.to_dict()["gns"] is None and r.hparams()["identity"] == "abc"


def test_divergence_does_not_depend_on_the_logging_cadence(tmp_path):
    """Issue: `diverge_loss=2.0 log_every=1` diverged while `diverge_loss=2.0` completed, in one run folder."""
    outcomes = []
    for every in (1, 50):
        t = Trainer(make_cfg("diverge_loss=2.0", f"log_every={every}", "max_steps=40", "progress=false",
                             "threads=1"), tmp_path / str(every))
        t.setup()
        res = t.fit()
        outcomes.append((res["status"], res["diverged_at"]))
    assert outcomes[0] == outcomes[1]


def test_the_shipped_registry_is_the_three_instruments():
    assert set(instruments.REGISTRY) == {"gns", "sharpness", "layer_distance"}
    assert set(instruments.config_keys()) <= set(run_only())


def test_hparams_tell_apart_runs_that_differ_in_any_identity_key():
    a = identity(resolved(make_cfg("max_steps=5")))
    b = identity(resolved(make_cfg("max_steps=5", "base.schedule=cosine")))
    ha, hb = Results.of_run("completed", a, "a").hparams(), Results.of_run("completed", b, "b").hparams()
    assert ha["max_steps"] == 5 and (ha["base.schedule"], hb["base.schedule"]) == ("step", "cosine")
    assert all(isinstance(v, (int, float, str, bool)) for v in ha.values())


def test_a_failed_download_leaves_no_run_folder_and_no_data_folder(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets as tvd

    def offline(self: Any) -> None:
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    root = tmp_path / "fresh_data"
    p = run_main("experiment=f1_mnist", "dataset.download=true", f"dataset.root={root}", "max_steps=2", cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "dataset.download=true failed" in p.stderr
    assert not (tmp_path / "outputs").exists() and not root.exists()


def test_spelling_out_the_recipes_own_epochs_is_the_same_run():
    ident = lambda *o: identity(resolved(make_cfg(*o)))  # noqa: E731
    assert ident("epochs=4") == ident()  # digits' recipe: base.epochs=4
    assert ident("epochs=2") != ident()


def test_the_batch_rules_read_the_batch_the_run_trains_at(tmp_path):
    """regime.momentum=0.95 trains at batch 32: a ghost batch of 32 divides it (it did not divide the configured
    16, which used to be checked); a micro-batch of 8 does not divide 20 (momentum 0.92), refused up front."""
    prepared = session.prepare(make_cfg("regime.momentum=0.95", "regime.ghost_bn=true", "ghost_batch=32"),
                               tmp_path / "a")
    assert prepared.batch == 32 and prepared.bn_batch == 32
    with pytest.raises(Exception, match=r"micro_batch=8: must divide the per-process batch \(20\)"):
        session.prepare(make_cfg("regime.momentum=0.92", "micro_batch=8"), tmp_path / "b")
