"""lbtrain.analysis.report on run folders as the trainer writes them: results.json (real identities) plus real
TensorBoard event files. Every number must come from exactly one configuration."""

from __future__ import annotations

import csv
import json
import runpy
import statistics
import sys
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
from helpers import make_run, read_json_strict
from torch.utils.tensorboard import SummaryWriter

from lbtrain.analysis import report, tables
from lbtrain.analysis import runs as runs_io  # (tests name their lists of runs `runs`)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """B_S=16 baseline; B_L in {64, 128} x {baseline, adapt}; a failed +GBN and a diverged +LR job at 128."""
    root = tmp_path / "outputs"
    make_run(root, error=0.05)
    errors = {(64, "baseline"): 0.12, (64, "adapt"): 0.06, (128, "baseline"): 0.2, (128, "adapt"): 0.07}
    for (batch, regime), err in errors.items():
        make_run(root, f"batch={batch}", f"regime={regime}", error=err)
    make_run(root, "batch=128", "regime=gbn", status="failed", error=None, events=False)
    make_run(root, "batch=128", "regime=sqrt_lr", status="diverged", error=0.9, diverged_at=20)
    return root


def acc(cell: str) -> float:
    return float(cell.split()[0])


def test_table1_shape_and_values(sweep: Path):
    runs = report.find_runs([sweep])
    assert len(runs) == 7
    rows = report.table1(runs)
    assert list(rows[0]) == ["experiment", "dataset", "B_S", "B_L", "B_S baseline", "LB", "+LR", "+GBN", "+RA"]
    assert [(r["experiment"], r["dataset"], r["B_S"], r["B_L"]) for r in rows] == [
        ("digits", "digits", 16, 64), ("digits", "digits", 16, 128)]
    by_bl = {r["B_L"]: r for r in rows}
    for r in rows:
        assert acc(r["B_S baseline"]) == pytest.approx(95.0, abs=0.005)
    results = [json.loads(f.read_text()) for f in sweep.rglob("results.json")]
    results = {(r["batch"], r["regime"]): r for r in results}
    for bl in (64, 128):
        assert acc(by_bl[bl]["LB"]) == pytest.approx(100 * (1 - results[(bl, "baseline")]["final_val_error"]),
                                                     abs=0.005)
        assert acc(by_bl[bl]["+RA"]) == pytest.approx(100 * (1 - results[(bl, "adapt")]["final_val_error"]),
                                                      abs=0.005)
    assert by_bl[64]["+LR"] == "-" and by_bl[64]["+GBN"] == "-"
    assert by_bl[128]["+LR"] == "diverged" and by_bl[128]["+GBN"] == "failed"

    long = report.long_table(runs)
    assert [(r["batch"], r["regime"]) for r in long] == [
        (16, "baseline"), (64, "baseline"), (64, "adapt"),
        (128, "baseline"), (128, "sqrt_lr"), (128, "gbn"), (128, "adapt")]
    status = {(r["batch"], r["regime"]): r["status"] for r in long}
    assert status[(128, "gbn")] == "failed" and status[(128, "sqrt_lr")] == "diverged"
    assert {(r["batch"], r["regime"]): r["fit_b"] for r in long}[(128, "sqrt_lr")] is None  # no fit of a blow-up

    # Written tables: the CSV holds the same cells, the Markdown is a pipe table with a header rule.
    out = sweep / "report"
    files = tables.write_tables({"table1": rows, "runs": long}, out)
    assert {f.name for f in files} == {"table1.md", "table1.csv", "runs.md", "runs.csv"}
    with open(out / "table1.csv") as f:
        assert [dict(r) for r in csv.DictReader(f)] == [{k: str(v) for k, v in r.items()} for r in rows]
    md = (out / "table1.md").read_text().splitlines()
    assert md[0] == "| experiment | dataset | B_S | B_L | B_S baseline | LB | +LR | +GBN | +RA |"
    assert md[1].startswith("|---|") and len(md) == 2 + len(rows)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries behind


def test_other_regimes_come_after_the_papers(tmp_path: Path):
    make_run(tmp_path)
    for regime in ("linear", "hybrid", "adapt", "batch_increase", "baseline"):
        make_run(tmp_path, "batch=256", f"regime={regime}", events=False)
    make_run(tmp_path, "batch=256", "regime.name=my_regime", "regime.lr_scaling=sqrt", events=False)
    rows = report.table1(report.find_runs([tmp_path]))
    assert list(rows[0])[4:] == ["B_S baseline", "LB", "+RA", "batch_increase", "hybrid", "linear", "my_regime"]


def test_mean_std_over_seeds(tmp_path: Path):
    make_run(tmp_path, error=0.10, events=False)
    make_run(tmp_path, "seed=1", error=0.14, events=False)
    make_run(tmp_path, "batch=64", "regime=adapt", error=0.20, events=False)
    make_run(tmp_path, "batch=64", "regime=adapt", "seed=1", error=0.25, events=False)
    make_run(tmp_path, "batch=64", "regime=adapt", "seed=2", status="diverged", error=0.9, events=False)
    runs = report.find_runs([tmp_path])
    (row,) = report.table1(runs)
    mean, std = statistics.fmean([90.0, 86.0]), statistics.stdev([90.0, 86.0])  # ddof=1
    assert row["B_S baseline"] == f"{mean:.2f} ± {std:.2f}" == "88.00 ± 2.83"
    assert row["+RA"] == "77.50 ± 3.54 (1 diverged)"  # only finished seeds are averaged

    agg = {r["batch"]: r for r in report.aggregate_table(runs)}
    assert agg[16]["seeds"] == 2 and agg[16]["status"] == "2 completed"
    m, s = agg[16]["final_val_error"].split(" ± ")
    assert float(m) == pytest.approx(0.12)
    assert float(s) == pytest.approx(statistics.stdev([0.10, 0.14]), rel=1e-3)
    assert agg[64]["status"] == "2 completed, 1 diverged" and agg[64]["seeds"] == 2


def test_look_alike_runs_never_share_a_cell(tmp_path: Path):
    """The report on a folder holding every kind of look-alike run: another dataset, a smoke run, a duplicate
    seed, other epochs, a diverged run. Only seeds of one configuration that finished their plan are averaged."""
    root = tmp_path / "outputs"
    make_run(root, "experiment=f1_mnist", error=0.02)
    make_run(root, "experiment=f1_mnist", "seed=1", error=0.04)
    make_run(root, "experiment=f1_mnist", "dataset=fashion_mnist", error=0.12)  # same experiment, other data
    make_run(root, "experiment=f1_mnist", "max_steps=5", error=0.50, updates=5)  # smoke run: completed early
    make_run(root, "experiment=f1_mnist", "epochs=1", error=0.30)  # a shorter recipe
    make_run(root, "experiment=f1_mnist", "seed=0", error=0.02, folder="seed=0")  # a copy of the first
    make_run(root, "experiment=f1_mnist", "seed=2", status="diverged", error=None, diverged_at=3)
    runs = report.find_runs([root])
    rows = report.table1(runs)
    # a row per configuration: the variant columns say how they differ
    assert {k for k in rows[0]} >= {"experiment", "dataset", "epochs", "max_steps", "B_S baseline"}
    by = {(r["dataset"], r["epochs"], r["max_steps"]): r["B_S baseline"] for r in rows}
    assert by[("mnist", "null", "null")] == "97.00 ± 1.41 (1 diverged)"  # seeds 0 and 1; the copy of seed 0
    # (97.33 if it counted twice) and the diverged seed 2 are not averaged
    assert by[("fashion_mnist", "null", "null")] == "88.00 (n=1)"  # fewer seeds than other cells: says so
    assert by[("mnist", "null", "5")] == "stopped early"  # never averaged into the baseline
    assert by[("mnist", "1.0", "null")] == "70.00 (n=1)"
    dup = [r for r in runs if r.status == "duplicate"]
    assert len(dup) == 1 and dup[0].duplicate_of is not None
    long = {r["run"]: r for r in report.long_table(runs)}
    assert {r["status"] for r in long.values()} == {"completed", "duplicate", "stopped early", "diverged"}


def test_legacy_results_without_identity_still_group(tmp_path: Path):
    d = make_run(tmp_path, error=0.1)
    res = json.loads((d / "results.json").read_text())
    res.pop("identity")
    (d / "results.json").write_text(json.dumps(res))
    (run,) = report.find_runs([tmp_path])
    assert run.identity["legacy.planned_updates"] == res["planned_updates"]
    assert report.table1([run])[0]["B_S baseline"] == "90.00"


def test_distance_fit_recovers_a_and_b(tmp_path: Path):
    # results.json without a fit: the report refits the logged distances with metrics.fit_log.
    make_run(tmp_path, "batch=64", dist_ab=(0.3, 1.7), with_fit=False)
    (run,) = report.find_runs([tmp_path])
    fit = report.distance_fit(run)
    assert fit["a"] == pytest.approx(0.3, abs=1e-4) and fit["b"] == pytest.approx(1.7, abs=1e-4)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-6)
    (row,) = report.long_table([run])
    assert row["fit_a"] == pytest.approx(0.3, abs=1e-4) and row["fit_b"] == pytest.approx(1.7, abs=1e-4)


def test_read_scalars_honours_purge(tmp_path: Path):
    w = SummaryWriter(str(tmp_path))
    for t in range(50):
        w.add_scalar("train/loss", 1.0, t)
    w.close()
    w = SummaryWriter(str(tmp_path), purge_step=30)  # what a resumed run writes: steps >= 30 are redone
    for t in range(30, 40):
        w.add_scalar("train/loss", 2.0, t)
    w.close()
    points = runs_io.read_scalars(tmp_path, "train/loss")
    assert [s for s, _ in points] == list(range(40))
    assert {v for s, v in points if s >= 30} == {2.0}
    assert runs_io.read_scalars(tmp_path, "no/such_tag") == []


def test_epochs_from_batch_size(tmp_path: Path):
    const = make_run(tmp_path, "batch=32")
    # Smith et al.: 64 updates of 16 (one epoch of 1024), 32 of 32, 16 of 64; opt/* logged every 20 updates
    grow = make_run(tmp_path, "regime=batch_increase", epoch_batches=[16, 32, 64], log_every=20)
    runs = {r.path: r for r in report.find_runs([tmp_path])}
    assert list(runs_io.epochs_at(runs[const], [0, 16, 32, 64])) == pytest.approx([0, 0.5, 1.0, 2.0])
    epochs = runs_io.epochs_at(runs[grow], [32, 64, 80, 96, 104, 112])
    assert list(epochs) == pytest.approx([0.5, 1, 1.5, 2, 2.5, 3])

    # a fractional last epoch (epochs=1.5: 32 + 16 updates of 32) counts in whole-epoch units
    res_path = const / "results.json"
    res = json.loads(res_path.read_text())
    res["effective"].update(epochs=1.5, updates=48)
    res.update(epochs=2.0, updates=48)  # what the trainer reports for a partial last epoch
    res_path.write_text(json.dumps(res))
    (run,) = report.find_runs([const])
    assert list(runs_io.epochs_at(run, [32, 40, 48])) == pytest.approx([1.0, 1.25, 1.5])

    # no training-set size: a constant batch, step * epochs / updates
    res["train_size"] = None
    res["effective"].pop("train_size")
    res_path.write_text(json.dumps(res))
    (run,) = report.find_runs([const])
    assert list(runs_io.epochs_at(run, [24, 48])) == pytest.approx([1.0, 2.0])


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_figures(sweep: Path, tmp_path: Path):
    runs = report.find_runs([sweep])
    with_events = [r for r in runs if r.scalars("weights/distance")]
    assert len(with_events) == 6  # the failed job logged nothing
    for name in ("distance", "val_error_updates", "val_error_epochs"):
        ax = report.make_figure(runs, name).axes[0]
        curves = [ln for ln in ax.get_lines() if ln.get_marker() in ("None", None, "")]
        assert len(curves) == len(with_events)
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        assert ax.get_xscale() == "log"  # large batches make few updates: a linear axis squeezes them
        # errors that fall from 0.5 to 0.02 differ by their ratio: a log axis shows the late differences
        assert ax.get_yscale() == ("log" if name == "val_error_updates" else "linear")
        labels = {t.get_text() for t in ax.get_legend().get_texts()}
        assert {"B=64 adapt", "B=128 sqrt_lr (diverged)"} <= labels
    assert min(report.make_figure(runs, "distance").axes[0].get_lines()[0].get_xdata()) >= 1  # no step 0

    files = report.write_figures(runs, tmp_path / "fig")
    assert sorted(f.name for f in files) == ["distance.png", "val_error_epochs.png", "val_error_updates.png"]
    for f in files:
        check_png(f)

    # A batch-increase run adds the batch and noise-scale figures; two experiments prefix every file.
    make_run(sweep, "regime=batch_increase", epoch_batches=[16, 32], log_every=20)
    make_run(sweep, "experiment=f1_mnist", "batch=256")
    files = report.write_figures(report.find_runs([sweep]), tmp_path / "fig2")
    names = sorted(f.name for f in files)
    assert "digits_batch_schedule.png" in names and "digits_noise_scale.png" in names
    assert "f1_mnist_distance.png" in names and "f1_mnist_noise_scale.png" not in names
    assert all(n.startswith(("digits_", "f1_mnist_")) for n in names)
    for f in files:
        check_png(f)


def test_diverged_run_never_sets_the_axes(tmp_path: Path):
    make_run(tmp_path, "batch=64", dist_ab=(0.5, 2.0))
    bad = make_run(tmp_path, "batch=128", status="diverged", error=None, diverged_at=5, dist_ab=(0.5, 2.0))
    w = SummaryWriter(str(bad))  # the blow-up after divergence was noticed
    for t in range(6, 9):
        w.add_scalar("weights/distance", 2.7e13, t)
    w.close()
    runs = report.find_runs([tmp_path])
    ax = report.make_figure(runs, "distance").axes[0]
    assert ax.get_ylim()[1] < 100  # set by the sane run, not by 2.7e13
    diverged_lines = [ln for ln in ax.get_lines() if max(ln.get_xdata()) <= 5]
    assert diverged_lines and any(ln.get_marker() == "x" for ln in diverged_lines)  # marked where it stopped


def test_coinciding_curves_are_drawn_once(tmp_path: Path):
    """At r = 1 the four Table-1 regimes are the small-batch recipe itself: one line, one label."""
    for regime in ("baseline", "sqrt_lr", "gbn", "adapt"):
        make_run(tmp_path, f"regime={regime}")
    make_run(tmp_path, "batch=64", "regime=adapt")
    ax = report.make_figure(report.find_runs([tmp_path]), "val_error_updates").axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["B=16 baseline = sqrt_lr = gbn = adapt", "B=64 adapt"]
    assert len(ax.get_lines()) == 2


def test_seeds_are_one_mean_curve_with_a_min_max_band(tmp_path: Path):
    make_run(tmp_path, "batch=64", "regime=adapt", dist_ab=(0.5, 2.0))
    make_run(tmp_path, "batch=64", "regime=adapt", "seed=1", dist_ab=(0.5, 4.0))
    make_run(tmp_path, "batch=128", "seed=3", status="diverged", diverged_at=8)
    runs = report.find_runs([tmp_path])
    ax = report.make_figure(runs, "val_error_updates").axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["B=64 adapt (2 seeds)",
                                                                   "B=128 baseline (diverged)"]
    lines = [ln for ln in ax.get_lines() if ln.get_marker() != "x"]
    assert len(lines) == 2 and lines[0].get_color() != lines[1].get_color()  # one line for the two seeds
    ax = report.make_figure(runs, "distance").axes[0]
    mean = ax.get_lines()[0]
    t = mean.get_xdata()
    assert list(mean.get_ydata()) == pytest.approx(list(0.5 + 3.0 * np.log(t)))  # the seeds' mean
    (band,) = ax.collections  # from the smaller seed's distance to the larger's, in the line's colour
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert low == pytest.approx(0.5 + 2.0 * np.log(t.min())) and high == pytest.approx(0.5 + 4.0 * np.log(t.max()))
    assert tuple(band.get_facecolor()[0][:3]) == pytest.approx(matplotlib.colors.to_rgb(mean.get_color()))


def test_cli(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "report"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| experiment | dataset | B_S | B_L | B_S baseline | LB | +LR | +GBN | +RA |" in stdout
    assert "| digits | digits | 128 | gbn | 0 | failed |" in stdout
    for name in ("table1.md", "table1.csv", "runs.md", "runs.csv", "distance.png", "val_error_epochs.png"):
        assert (out / name).is_file() and str(out / name) in stdout
    assert (out / "table1.md").read_text() in stdout

    # default output folder, and no figures
    assert report.main([str(sweep), "--no-figures"]) == 0
    assert (sweep / "report" / "table1.md").is_file() and not list((sweep / "report").glob("*.png"))


def test_where_scopes_the_report_to_matching_runs(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "report"
    assert report.main([str(sweep), "--out", str(out), "--no-figures", "--where", "batch=64",
                        "--where", "regime.name=baseline,adapt"]) == 0
    runs = (out / "runs.csv").read_text().splitlines()[1:]
    assert len(runs) == 2 and all(",64," in row for row in runs)
    capsys.readouterr()
    assert report.main([str(sweep), "--out", str(out), "--where", "batch=7"]) == 2
    assert "no run under" in capsys.readouterr().err
    assert report.main([str(sweep), "--out", str(out), "--where", "batch"]) == 2


def test_out_is_an_existing_file(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    assert report.main([str(sweep), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and "Traceback" not in err
    assert target.read_text() == "keep me"


def test_every_results_json_is_strict_json(sweep: Path):
    for f in sweep.rglob("results.json"):
        read_json_strict(f)


def test_cli_without_results(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """An empty or a missing folder is a user mistake: one line, exit code 2, nothing written."""
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: no results.json" in err and "Traceback" not in err
    assert not (tmp_path / "report").exists()
    assert report.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing: no such file or folder" in err and not (tmp_path / "out").exists()
    # `python -m lbtrain.analysis.report` exits with main's code (run in-process: a subprocess would re-import torch)
    monkeypatch.setattr(sys, "argv", ["lbtrain-report", str(tmp_path / "nothing")])
    monkeypatch.delitem(sys.modules, "lbtrain.analysis.report")  # run it fresh as __main__, as `python -m` does
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("lbtrain.analysis.report", run_name="__main__")
    assert exit_info.value.code == 2 and "no such file or folder" in capsys.readouterr().err


def test_regime_labels_and_order_come_from_the_presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Table 1's column names and order are the presets' `label:` and `rank:`, not a list in the code."""
    from lbtrain.analysis import regimes

    assert [regimes.label(r) for r in ("baseline", "sqrt_lr", "gbn", "adapt", "linear")] == [
        "LB", "+LR", "+GBN", "+RA", "linear"]  # the shipped presets; no label: the name
    runs_dir = tmp_path / "runs"
    make_run(runs_dir, events=False)
    for regime in ("baseline", "adapt", "linear"):
        make_run(runs_dir, "batch=64", f"regime={regime}", events=False)
    configs = tmp_path / "configs"
    (configs / "regime").mkdir(parents=True)
    for name, extra in (("baseline", "label: Large\nrank: 2"), ("adapt", "rank: 0"), ("linear", "label: Goyal")):
        (configs / "regime" / f"{name}.yaml").write_text(f"name: {name}\n{extra}\n")
    monkeypatch.setattr(regimes, "config_dir", lambda: str(configs))
    regimes.presets.cache_clear()
    try:
        (row,) = report.table1(report.find_runs([runs_dir]))
        # ranked first (adapt 0, baseline 2), then the unranked one; a preset without a label shows its name
        assert list(row)[4:] == ["B_S baseline", "adapt", "Large", "Goyal"]
    finally:
        regimes.presets.cache_clear()


def test_different_runs_never_share_a_legend_label(tmp_path: Path):
    """Recipes at one batch and regime that differ elsewhere (epochs, a warm-up): the labels name what differs."""
    make_run(tmp_path, "batch=64", "epochs=1")
    make_run(tmp_path, "batch=64", "epochs=2")
    make_run(tmp_path, "batch=64", "regime=sqrt_lr")
    make_run(tmp_path, "batch=64", "regime=sqrt_lr", "regime.warmup_epochs=1")
    ax = report.make_figure(report.find_runs([tmp_path]), "val_error_updates").axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 4 and len(set(labels)) == 4, labels
    assert sum(label.startswith("B=64 baseline (") for label in labels) == 2, labels
    assert sum(label.startswith("B=64 sqrt_lr (") for label in labels) == 2, labels
    assert any("epochs=1" in label for label in labels) and any("warmup_epochs=1" in label for label in labels)


def test_tables_show_the_epochs_planned_and_done_and_regime_options(tmp_path: Path):
    """runs.md keeps the identity's epochs (the plan) apart from results.json's (the epochs done), and names the
    regime option in which two runs of one regime differ."""
    make_run(tmp_path, "epochs=1", epoch_batches=[16])
    make_run(tmp_path, "epochs=2", "batch=32", "regime=sqrt_lr", status="diverged", error=None, diverged_at=5,
             updates=5)
    make_run(tmp_path, "epochs=2", "batch=32", "regime=sqrt_lr", "regime.warmup_epochs=1")
    runs = report.find_runs([tmp_path])
    long = report.long_table(runs)
    assert [(r["epochs"], r["epochs_done"]) for r in long] == [("1.0", 1.0), ("2.0", pytest.approx(2 * 5 / 64)),
                                                                ("2.0", 2.0)]
    assert [r["regime.warmup_epochs"] for r in long] == ["0.0", "0.0", "1.0"]
    assert "regime.lr_scaling" not in long[0]  # how regimes differ from each other is their name
    agg = report.aggregate_table(runs)
    assert [(r["epochs"], r["regime.warmup_epochs"]) for r in agg] == [("1.0", "0.0"), ("2.0", "0.0"),
                                                                        ("2.0", "1.0")]
    assert "epochs_done" in agg[0]


def test_no_run_leaves_table1_silently(tmp_path: Path, capsys: pytest.CaptureFixture):
    """A batch below the recipe's, a copy, and small-batch runs of other regimes: each has a cell or is listed
    under Table 1 with the reason."""
    root = tmp_path / "runs"
    make_run(root, error=0.05)
    make_run(root, "batch=64", error=0.1)
    make_run(root, "batch=8", error=0.2)  # below B_S = 16
    make_run(root, error=0.05, folder="copy")  # a second folder with the same configuration and seed
    make_run(root, "regime=sqrt_lr", error=0.05)  # r = 1: the B_S recipe itself
    # at B_S, but another recipe (the baseline with its batch growing): a row of its own, not dropped
    make_run(root, "regime.batch_increase=true", epoch_batches=[16, 32], error=0.07)
    runs = report.find_runs([root])
    rows = report.table1(runs)
    assert [(r["B_S"], r["B_L"]) for r in rows] == [(16, 16), (16, 64)]
    assert [k for k, v in rows[0].items() if v == "93.00"] == ["LB (regime.batch_increase=true)"]
    omitted = {(r["batch"], r["regime"], r["status"]): r["reason"] for r in report.table1_omitted(runs)}
    assert set(omitted) == {(8, "baseline", "completed"), (16, "baseline", "duplicate"),
                            (16, "sqrt_lr", "completed")}
    assert "below the recipe's B_S = 16" in omitted[(8, "baseline", "completed")]
    assert "duplicate of" in omitted[(16, "baseline", "duplicate")]
    assert "B_S baseline's recipe" in omitted[(16, "sqrt_lr", "completed")]
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out), "--no-figures"]) == 0
    md = (out / "table1.md").read_text()
    assert report.OMITTED_TITLE in md and "below the recipe's B_S" in md and md in capsys.readouterr().out
    with open(out / "table1.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)  # the CSV stays one table
