"""scripts/bench.py runs end to end (--quick) and reports every row and ratio. No timing thresholds here."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    bench = _load("bench")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # one thread: on a small shared machine, 2-thread OpenMP regions stall whenever another process runs
    res = bench.main(["--quick", "--device", "cpu", "--workers", "1", "--threads", "1", "--json", str(out)])
    return bench, res, json.loads(out.read_text())


def test_quick_bench_produces_every_row(quick_run):
    bench, res, _ = quick_run
    rows = {(r["workload"], r["path"]): r for r in res["rows"]}
    assert set(rows) == {(w, p) for w in bench.DEFAULT_WORKLOADS for p in bench.PATHS}
    for (workload, path), r in rows.items():
        assert r["steps"] == 2 and r["batch"] > 0
        for key in ("images_per_sec", "seconds", "step_ms_mean", "step_ms_median"):
            assert _positive(r[key]), (workload, path, key, r[key])
        assert r["images_per_sec"] == pytest.approx(r["batch"] * r["steps"] / r["seconds"])
    # the reference runs one chunk per ghost batch; lbtrain's run kept its dataset as uint8
    assert rows[("resnet44_cifar10", "reference")]["chunks"] == 4
    assert rows[("f1_mnist", "reference")]["chunks"] == 1
    for workload in bench.DEFAULT_WORKLOADS:
        mem = res["memory"][workload]
        resident = mem["dataset_resident_bytes"]
        assert resident["uint8"] > 0 and resident.get("float32", 0) < 1024  # images are held as uint8 only
        assert sum(resident.values()) < mem["dataset_float32_copy_bytes"]


def test_quick_bench_json_has_ratios_and_gbn(quick_run):
    bench, res, saved = quick_run
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    for workload in bench.DEFAULT_WORKLOADS:
        ratios = saved["ratios"][workload]
        assert {"lbtrain_over_limit", "lbtrain_over_reference"} <= set(ratios)
        assert all(_positive(v) for v in ratios.values())
        speed = {r["path"]: r["images_per_sec"] for r in saved["rows"] if r["workload"] == workload}
        assert ratios["lbtrain_over_limit"] == pytest.approx(speed["lbtrain"] / speed["limit"])
        assert ratios["lbtrain_over_reference"] == pytest.approx(speed["lbtrain"] / speed["reference"])
    gbn = saved["gbn"]
    assert gbn["ghosts"] == 32
    for key in ("plain_ms", "vectorized_ms", "loop_ms", "loop_over_vectorized", "vectorized_over_plain"):
        assert _positive(gbn[key]), key
    meta = saved["meta"]
    assert meta["device"] == "cpu" and meta["quick"] is True and meta["threads"] >= 1


def test_table_has_one_line_per_row(quick_run):
    bench, res, _ = quick_run
    table = bench.format_table(res)
    for r in res["rows"]:
        assert any(line.startswith(r["workload"]) and f" {r['path']} " in line for line in table.splitlines())
    assert "(2)/(1)" in table and "(2)/(3)" in table


def test_bad_workload_is_a_usage_error():
    bench = _load("bench")
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--device", "cpu", "--workloads", "nope", "--skip-gbn"])
    assert e.value.code == 2
