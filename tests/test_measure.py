"""`lbtrain-measure`: instruments on a finished run's checkpoints, after the fact. The numbers are the in-run
code's at the checkpoint's weights (the sharpness bit for bit), the run's own records are never touched, a re-run
is a no-op, a kill loses nothing and duplicates nothing, and whatever cannot be measured is one line, exit 2."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ROOT, make_run, only_run, run_main, scalars

from lbtrain.analysis import report
from lbtrain.analysis.runs import read_run
from lbtrain.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 epochs of digits (192 updates): sharpness at both epoch ends (96, 192), a kept checkpoint at 96, the per-layer
# distances at the log-spaced updates and epoch ends.
RUN_ARGS = ("threads=1", "progress=false", "max_steps=192", "sharpness.every_epochs=1", "sharpness.samples=128",
            "sharpness.iters=8", "sharpness.trace_samples=3", "sharpness.batch_batches=2", "layer_distance=true",
            "checkpoint.keep=[96]")
SHARPNESS_OPTIONS = {"every_epochs": 1, "samples": 128, "iters": 8, "trace_samples": 3, "batch_batches": 2}
COMPARED = ("lambda_max", "trace", "trace_stderr", "batch_sharpness")  # what the sharpness instrument measures


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def measure(*args: str | Path) -> Ran:
    """`lbtrain-measure ARGS` in this process (torch's global settings restored afterwards, as run_main does)."""
    import torch

    from lbtrain import measure as cmd

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state())
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cmd.main([str(a) for a in args])
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.set_rng_state(saved[2])
    return Ran(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished digits run that measured its sharpness and per-layer distances in the run."""
    cwd = tmp_path_factory.mktemp("trained")
    p = run_main(*RUN_ARGS, cwd=cwd)
    assert p.returncode == 0, p.stderr[-2000:]
    run = only_run(cwd / "outputs" / "digits")
    assert (run / "checkpoints" / "update_00000096.pt").is_file() and (run / ".hydra" / "config.yaml").is_file()
    return run


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run for one test to measure."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of the run's own (everything but measure/)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and "measure" not in p.relative_to(folder).parts}


def points(run: Path) -> list[dict]:
    return json.loads((run / "measure" / "measurements.json").read_text())["points"]


def streams(run: Path) -> dict[str, Path]:
    """The TensorBoard streams of RUN/measure, by instrument."""
    return {d.name.split("-")[0]: d for d in (run / "measure").iterdir() if d.is_dir()}


def test_after_the_fact_is_the_runs_own_measurement_and_a_rerun_is_a_noop(run: Path, tmp_path: Path):
    own = digests(run)
    p = measure(run, "--at", "all", "sharpness", "layer_distance")
    assert p.returncode == 0, p.stderr
    assert "measuring 4 point(s), 0 already there" in p.stdout
    got = {(q["instrument"], q["update"]): q for q in points(run)}
    assert sorted(got) == [("layer_distance", 96), ("layer_distance", 192), ("sharpness", 96), ("sharpness", 192)]

    # sharpness, bit for bit: at 96 the in-run measurement is in the kept checkpoint's instrument state, at 192 in
    # results.json (full precision); TensorBoard holds both (float32)
    kept = load_checkpoint(run / "checkpoints" / "update_00000096.pt")["instruments"]["sharpness"]["last"]
    final = json.loads((run / "results.json").read_text())["sharpness"]
    for update, in_run in ((96, kept), (192, final)):
        after = got["sharpness", update]["result"]
        assert in_run["update"] == update
        assert [after.get(k) for k in COMPARED] == [in_run.get(k) for k in COMPARED], update
    in_run_tb, after_tb = scalars(run), scalars(streams(run)["sharpness"], every_write=True)
    for tag in ("sharpness/lambda_max", "sharpness/trace"):
        assert after_tb[tag] == in_run_tb[tag], tag  # (the run measured at 96 and 192 only)
    # per-layer distances: the same as the run's at both updates
    layers = scalars(streams(run)["layer_distance"], every_write=True)
    assert layers and all(tag.startswith("weights/distance/") for tag in layers)
    for tag, series in layers.items():
        assert series == [(s, v) for s, v in in_run_tb[tag] if s in (96, 192)], tag

    # each point says which checkpoint and which definition produced it
    point = got["sharpness", 96]
    assert point["checkpoint"] == {"file": "checkpoints/update_00000096.pt", "update": 96, "sha256": hashlib.sha256(
        (run / "checkpoints" / "update_00000096.pt").read_bytes()).hexdigest()}
    assert got["sharpness", 192]["checkpoint"]["file"] == "checkpoint.pt"
    assert point["definition"]["instrument"] == "sharpness"
    assert point["definition"]["options"].items() >= SHARPNESS_OPTIONS.items()  # the run's own options
    assert point["scalars"]["sharpness/lambda_max"] == kept["lambda_max"]

    # the run's own records are untouched
    assert digests(run) == own

    # a re-run is a no-op: nothing measured, nothing rewritten
    def records() -> dict[Path, bytes]:  # (the lock file says who held it last: not a record)
        return {p: p.read_bytes() for p in (run / "measure").rglob("*") if p.is_file() and p.name != ".lock"}

    files = records()
    again = measure(run, "sharpness", "layer_distance", "--at", "96,192")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("nothing to do: 4 point(s) already measured")
    assert records() == files

    # the report reads them: through the analysis Run, and as a table of its own
    measured = read_run(run)
    assert measured.measured("sharpness/lambda_max") == [(96, kept["lambda_max"]), (192, final["lambda_max"])]
    summary = report.summarize([run], tmp_path / "report", figures=False)
    rows = [r for r in summary["measurements"] if r["instrument"] == "sharpness"]
    assert [(r["update"], r["checkpoint"]) for r in rows] == [(96, "checkpoints/update_00000096.pt"),
                                                               (192, "checkpoint.pt")]
    assert (tmp_path / "report" / "measurements.md").is_file()


KILLER = """
import functools, os, signal, sys
from lbtrain.instruments import sharpness
from lbtrain import measure
calls = []
real = sharpness.SharpnessProbe.measure
@functools.wraps(real)
def dying(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # in the middle of the second measurement
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
sharpness.SharpnessProbe.measure = dying
sys.exit(measure.main(sys.argv[1:]))
"""


def test_a_kill_during_a_measurement_loses_nothing_and_duplicates_nothing(run: Path, finished: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", KILLER, str(run), "sharpness", "--at", "all"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert [q["update"] for q in points(run)] == [96]  # the point measured before the kill is kept
    assert scalars(streams(run)["sharpness"], every_write=True)["sharpness/lambda_max"][0][0] == 96

    again = measure(run, "sharpness", "--at", "all")
    assert again.returncode == 0, again.stderr
    assert "measuring 1 point(s), 1 already there" in again.stdout
    assert sorted(q["update"] for q in points(run)) == [96, 192]
    written = scalars(streams(run)["sharpness"], every_write=True)  # every write: a duplicate would show
    assert [s for s, _ in written["sharpness/lambda_max"]] == [96, 192]
    assert [s for s, _ in written["sharpness/trace"]] == [96, 192]
    assert written["sharpness/lambda_max"] == scalars(finished)["sharpness/lambda_max"]
    assert len([f for f in streams(run)["sharpness"].iterdir()]) == 1


def test_an_interrupted_measurement_keeps_its_points(run: Path, monkeypatch):
    from lbtrain.instruments import sharpness

    calls = []
    real = sharpness.SharpnessProbe.measure

    @functools.wraps(real)
    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(sharpness.SharpnessProbe, "measure", interrupted)
    p = measure(run, "sharpness", "--at", "all")
    assert p.returncode == 130 and "re-run the same command" in p.stderr
    assert [q["update"] for q in points(run)] == [96]
    assert [s for s, _ in scalars(streams(run)["sharpness"])["sharpness/lambda_max"]] == [96]


def test_noise_scale_after_the_fact_records_its_batches_and_options(run: Path):
    p = measure(run, "gns", "gns_options.bn=eval", "--batches", "4")
    assert p.returncode == 0, p.stderr
    (point,) = points(run)
    assert point["update"] == 192 and point["checkpoint"]["file"] == "checkpoint.pt"
    assert point["definition"] == {"instrument": "gns", "options": {"bn": "eval", "beta": 0.95},
                                   "settings": {"batches": 4}}
    result = point["result"]
    assert result["bn"] == "eval" and result["measurements"] == 4
    assert {k: result["batches"][k] for k in ("count", "size", "augmented")} == {"count": 4, "size": 16,
                                                                                  "augmented": False}
    assert len(result["batches"]["indices_sha256"]) == 64
    assert point["scalars"]["gns/trace_cov"] == result["trace_cov"]
    # another definition is another measurement, in a stream of its own; the same one again is not
    assert measure(run, "gns", "--batches", "4").returncode == 0
    assert len(points(run)) == 2 and len([d for d in (run / "measure").iterdir() if d.is_dir()]) == 2
    assert measure(run, "gns", "gns_options.bn=eval", "--batches", "4").stdout.startswith("nothing to do")


def test_an_unfinished_run_is_refused(tmp_path: Path):
    interrupted = make_run(tmp_path / "outputs", status="interrupted")
    p = measure(interrupted, "sharpness")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "is not a finished run (status interrupted)" in p.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    p = measure(empty, "sharpness")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "(no results.json)" in p.stderr
    assert not (interrupted / "measure").exists() and not (empty / "measure").exists()


@pytest.mark.parametrize(("args", "says"), [
    (("nosuch",), "unknown instrument 'nosuch'; allowed: gns, layer_distance, sharpness"),
    (("sharpness", "batch=32"), "batch=32: not an instrument option"),
    (("gns", "gns_options.bn=sometimes"), "gns_options.bn='sometimes': allowed: train, eval"),
    (("sharpness", "sharpness.samples=0"), "sharpness.samples=0: must be an integer >= 1"),
    (("sharpness", "--at", "50"), "no checkpoint at update 50; this run has checkpoints at 96, 192"),
    (("layer_distance", "--batches", "4"), "--batches 4: none of layer_distance draws batches of its own"),
])
def test_what_cannot_be_measured_is_one_line(finished: Path, args: tuple[str, ...], says: str):
    p = measure(finished, *args)
    assert p.returncode == 2, p.stdout
    assert p.stderr.startswith("lbtrain-measure: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert says in p.stderr
    assert not (finished / "measure").exists()


class NoAfterTheFact:
    """A toy instrument (not shipped) without measure(): it can only watch a run."""

    def __init__(self, run, node) -> None:
        pass

    def results(self):
        return None

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass


def test_an_instrument_without_measure_is_refused(finished: Path, monkeypatch):
    from lbtrain.instruments import base

    monkeypatch.setitem(base.REGISTRY, "watch_only", base.InstrumentSpec(
        "watch_only", "watch_only", enabled=lambda node: node is not None, factory=f"{__name__}:NoAfterTheFact"))
    p = measure(finished, "watch_only")
    assert p.returncode == 2
    assert "instrument 'watch_only' cannot measure after the fact" in p.stderr and p.stderr.count("\n") == 1


def test_the_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lbtrain-measure"] == "lbtrain.measure:main"
