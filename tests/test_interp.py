"""`lbtrain-interp`: loss along the line between two runs (Keskar et al. 2017, Figure 3), on real tiny runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SHARED_DATA, make_cfg, run_cli
from torch import nn

from lbtrain.analysis import interp
from lbtrain.trainer import Trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Recomputing the BN statistics moves these runs' endpoint validation metrics by (measured) +0.008 loss and 5 of
# the 261 samples (A), +0.004 and 1 sample (B). Runs of a few updates move far more: their own running statistics
# still hold much of the initial (0, 1) (0.9^12 = 28% after 12 updates), so the test runs are not that short.
RECOMPUTE_LOSS_TOL, RECOMPUTE_ERROR_TOL = 0.05, 0.03


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads mostly wait for each other


def _train(root: Path, name: str, *overrides: str) -> Path:
    folder = root / name
    folder.mkdir()
    t = Trainer(make_cfg(*overrides, "progress=false", "device=cpu"), folder)
    t.setup()
    assert t.fit()["status"] == "completed"
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A: batch 16 (plain BN), one epoch; B: batch 64 with ghost BN of 16 and another seed, its whole 4-epoch plan;
    C: another model width."""
    root = tmp_path_factory.mktemp("interp")
    return {
        "a": _train(root, "a", "max_steps=96"),
        "b": _train(root, "b", "batch=64", "regime=gbn", "ghost_batch=16", "seed=1"),
        "c": _train(root, "c", "model.kwargs.hidden=64", "max_steps=2"),
        "root": root,
    }


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == interp.COLUMNS
        return [{k: float(v) for k, v in row.items()} for row in reader]


def _listing(*folders: Path) -> dict[Path, list[str]]:
    return {f: sorted(p.name for p in f.rglob("*")) for f in folders}


# ---------------------------------------------------------------------------------------- endpoints
def test_endpoints_reproduce_each_runs_final_metrics_without_bn_recompute(runs, tmp_path, capsys):
    out = tmp_path / "out"
    code = interp.main([str(runs["a"]), str(runs["b"]), "--alphas", "0,1", "--no-bn-recompute", "--out", str(out),
                        "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    at = {r["alpha"]: r for r in _rows(out / "interp.csv")}
    assert sorted(at) == [0.0, 1.0]
    for alpha, run in ((0.0, runs["a"]), (1.0, runs["b"])):
        res = _results(run)
        assert at[alpha]["val_loss"] == pytest.approx(res["final_val_loss"], rel=1e-6, abs=1e-7)
        assert at[alpha]["val_error"] == pytest.approx(res["final_val_error"], abs=1e-12)


def test_endpoints_with_bn_recompute_are_close_and_csv_png_and_table_are_written(runs, capsys):
    """`--alphas -1:2:7` as the issue writes it (a value starting with '-'), default --out."""
    a, b = runs["a"], runs["b"]
    code = interp.main([str(a), str(b), "--alphas", "-1:2:7", "--device", "cpu"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    out = a / f"interp-{b.name}"
    rows = _rows(out / "interp.csv")
    assert [r["alpha"] for r in rows] == [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("train_error", "val_error"))
    at = {r["alpha"]: r for r in rows}
    for alpha, run in ((0.0, a), (1.0, b)):
        res = _results(run)
        assert abs(at[alpha]["val_loss"] - res["final_val_loss"]) < RECOMPUTE_LOSS_TOL
        assert abs(at[alpha]["val_error"] - res["final_val_error"]) < RECOMPUTE_ERROR_TOL
    assert (out / "interp.png").read_bytes()[:8] == PNG_MAGIC
    record = json.loads((out / "interp.json").read_text())  # where the numbers came from
    assert record["run_a"] == str(a) and record["identity_a"] and record["bn_recompute"] is True
    assert [p["alpha"] for p in record["points"]] == [r["alpha"] for r in rows]
    assert "recomputed at every alpha on 6 fixed training batches of 256" in stdout
    assert "train_loss" in stdout and str(out / "interp.csv") in stdout
    assert not list(out.glob(".*.tmp"))


def test_recomputation_uses_the_same_batches_at_every_alpha(runs):
    """The BN batches are fixed: evaluating one alpha twice, with another alpha between, gives the same numbers."""
    a, b = interp.load_run(runs["a"]), interp.load_run(runs["b"])
    setup = interp.prepare(a, b, torch.device("cpu"), train_samples=500)
    first, _, again = interp.interpolate(a, b, [0.5, 0.0, 0.5], setup)
    assert first == again and setup.bn_count == 6 and setup.bn_batch == 256 and setup.train_samples == 500


def test_recompute_bn_is_the_plain_average_over_the_batches_with_dropout_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3), nn.BatchNorm1d(3))
    batches = [(torch.randn(32, 5) * (i + 1) + i, torch.zeros(32, dtype=torch.long)) for i in range(3)]
    assert interp.recompute_bn(model, batches) == 96
    assert not model.training and all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    with torch.no_grad():
        h = [model[0](x) for x, _ in batches]
        assert torch.allclose(model[1].running_mean, torch.stack([v.mean(0) for v in h]).mean(0), atol=1e-5)
        assert torch.allclose(model[1].running_var, torch.stack([v.var(0) for v in h]).mean(0), atol=1e-4)
        # the second BN layer saw the first one's train-mode output, with no dropout mask in between
        bn = model[1]
        h2 = [model[3](F.batch_norm(v, None, None, bn.weight, bn.bias, training=True)) for v in h]
    assert torch.allclose(model[4].running_mean, torch.stack([v.mean(0) for v in h2]).mean(0), atol=1e-5)
    assert torch.allclose(model[4].running_var, torch.stack([v.var(0) for v in h2]).mean(0), atol=1e-4)


def test_interpolate_state_is_exact_at_the_ends_and_linear_between():
    a = {"w": torch.randn(3, 3), "bn.running_var": torch.rand(3), "bn.num_batches_tracked": torch.tensor(7)}
    b = {"w": torch.randn(3, 3), "bn.running_var": torch.rand(3), "bn.num_batches_tracked": torch.tensor(9)}
    assert all(torch.equal(interp.interpolate_state(a, b, 0.0)[k], a[k]) for k in a)
    one = interp.interpolate_state(a, b, 1.0)
    assert torch.equal(one["w"], b["w"]) and torch.equal(one["bn.running_var"], b["bn.running_var"])
    assert torch.equal(one["bn.num_batches_tracked"], a["bn.num_batches_tracked"])
    half = interp.interpolate_state(a, b, 0.5)
    assert torch.allclose(half["w"], (a["w"] + b["w"]) / 2)
    far = interp.interpolate_state(a, {**b, "bn.running_var": a["bn.running_var"] + 5}, -1.0)
    assert (far["bn.running_var"] >= 0).all()  # extrapolated variances clamped
    kept = interp.interpolate_state(a, b, 0.5, bn_buffers=False)
    assert torch.equal(kept["bn.running_var"], a["bn.running_var"])


@pytest.mark.parametrize("spec, expected", [
    ("-1:2:31", [round(-1 + 0.1 * i, 12) + 0.0 for i in range(31)]),
    ("0:1:3", [0.0, 0.5, 1.0]),
    ("1,0,0.5,1", [0.0, 0.5, 1.0]),
    ("0.25", [0.25]),
    ("3:3:1", [3.0]),
])
def test_parse_alphas(spec, expected):
    got = interp.parse_alphas(spec)
    assert got == pytest.approx(expected, abs=1e-12)
    if "0:1" in spec or spec == "-1:2:31":
        assert 0.0 in got and 1.0 in got  # exactly: the endpoints are the runs' own weights


# ---------------------------------------------------------------------------------------- refusals
def _refused(capsys, argv: list[str], *contains: str) -> str:
    code = interp.main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (captured.out, err)
    assert len(err.splitlines()) == 1 and err.startswith("lbtrain-interp: error: "), err
    assert "Traceback" not in err
    for text in contains:
        assert text in err, err
    return err


def test_mismatched_models_are_refused_in_one_line_and_nothing_is_written(runs, tmp_path, capsys):
    before = _listing(runs["a"], runs["c"])
    out = tmp_path / "out"
    _refused(capsys, [str(runs["a"]), str(runs["c"]), "--out", str(out)],
             "differ in model or data", "model.kwargs.hidden: 128 (RUN_A) vs 64 (RUN_B)")
    _refused(capsys, [str(runs["c"]), str(runs["a"])], "model.kwargs.hidden: 64 (RUN_A) vs 128 (RUN_B)")
    assert not out.exists() and _listing(runs["a"], runs["c"]) == before


def test_python_m_lbtrain_analysis_interp_refuses_mismatched_models(runs, tmp_path):
    """The module runs as a program; a refusal is one line on stderr, exit code 2, no traceback."""
    proc = run_cli(str(runs["a"]), str(runs["c"]), "--out", str(tmp_path / "out"), cwd=tmp_path,
                   module="lbtrain.analysis.interp")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "model.kwargs.hidden: 128 (RUN_A) vs 64 (RUN_B)" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_runs_on_different_data_are_refused(runs, tmp_path, capsys):
    """A copy of run A whose identity says it trained on a subset: another dataset."""
    from lbtrain.checkpoint import load_checkpoint, save_checkpoint

    other = tmp_path / "subset"
    other.mkdir()
    ckpt = load_checkpoint(runs["a"] / "checkpoint.pt")
    ckpt["identity"] = {**ckpt["identity"], "dataset": {**ckpt["identity"]["dataset"], "subset": 500}}
    save_checkpoint(other / "checkpoint.pt", ckpt, meta={"identity": ckpt["identity"]})
    _refused(capsys, [str(runs["a"]), str(other), "--out", str(tmp_path / "out")],
             "dataset.subset: null (RUN_A) vs 500 (RUN_B)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["empty", "results_only", "missing", "file", "corrupt"])
def test_a_folder_without_a_usable_checkpoint_is_refused(runs, tmp_path, capsys, kind):
    bad = tmp_path / "bad"
    expected = {"empty": "holds no checkpoint.pt", "results_only": "holds no checkpoint.pt",
                "missing": "no such folder", "file": "not a folder", "corrupt": "checksum mismatch"}[kind]
    if kind in ("empty", "results_only", "corrupt"):
        bad.mkdir()
    if kind == "results_only":
        (bad / "results.json").write_text((runs["a"] / "results.json").read_text())
    if kind == "file":
        bad.write_bytes((runs["a"] / "checkpoint.pt").read_bytes())
    if kind == "corrupt":
        data = bytearray((runs["a"] / "checkpoint.pt").read_bytes())
        data[-10] ^= 0xFF
        (bad / "checkpoint.pt").write_bytes(bytes(data))
    before = _listing(runs["a"])
    _refused(capsys, [str(runs["a"]), str(bad)], "RUN_B", expected)
    _refused(capsys, [str(bad), str(runs["a"]), "--out", str(tmp_path / "out")], "RUN_A", expected)
    assert _listing(runs["a"]) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, contains", [
    (["--alphas", "0:1"], "--alphas"),
    (["--alphas", "a:b:c"], "START:STOP:NUM"),
    (["--alphas", "0:1:0"], "NUM must be at least 1"),
    (["--alphas", "0:1:99999999"], "at most"),
    (["--alphas", "0,x"], "--alphas"),
    (["--alphas", "0,nan"], "finite"),
    (["--alphas", ""], "--alphas"),
    (["--alphas"], "--alphas"),
    (["--bn-batch", "1"], "--bn-batch"),
    (["--bn-batches", "0"], "--bn-batches"),
    (["--train-samples", "some"], "--train-samples"),
    (["--eval-batch", "-5"], "--eval-batch"),
    (["--device", "tpu"], "--device"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_options_are_refused_in_one_line(runs, tmp_path, capsys, argv, contains):
    out = tmp_path / "out"
    _refused(capsys, [str(runs["a"]), str(runs["b"]), "--out", str(out), *argv], contains)
    assert not out.exists()


def test_out_that_is_a_file_and_missing_arguments_are_refused(runs, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _refused(capsys, [str(runs["a"]), str(runs["b"]), "--out", str(f)], "is a file")
    _refused(capsys, [str(runs["a"])], "RUN_B")
    if not torch.cuda.is_available():
        _refused(capsys, [str(runs["a"]), str(runs["b"]), "--device", "cuda", "--out", str(tmp_path / "o")],
                 "CUDA is not available")
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------------- MNIST
@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").exists(), reason="no MNIST copy in ../shared/data")
def test_real_mnist_end_to_end(tmp_path, capsys):
    common = ("experiment=f1_mnist", f"dataset.root={SHARED_DATA}", "model.kwargs.hidden=64", "model.kwargs.depth=2",
              "batch=256", "progress=false")
    a = _train(tmp_path, "a", *common, "max_steps=20")
    b = _train(tmp_path, "b", *common, "max_steps=5", "seed=1")
    out = tmp_path / "out"
    code = interp.main([str(a), str(b), "--alphas", "0:1:3", "--data-root", str(SHARED_DATA), "--train-samples",
                        "2000", "--bn-batches", "4", "--out", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "train metrics on 2000 of 60000 training samples, val on all 10000" in capsys.readouterr().out
    rows = _rows(out / "interp.csv")
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["val_error"] < 0.2  # a trained network, on the real test set
    assert (out / "interp.png").read_bytes()[:8] == PNG_MAGIC
