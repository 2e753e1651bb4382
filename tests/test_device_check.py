"""scripts/device_check.py (the one command for a borrowed GPU) runs end to end on the CPU with --quick, as it will
on the GPU machine: without hydra-core / omegaconf / antlr4 installed.

That machine is simulated by an import hook (`ONLY_IN_DEPS`) put in front of every other finder: those three
packages are found only in the --deps folder (which `--bundle-deps` fills from this environment), or nowhere.
With the folder every section runs, lbtrain's loop (a Trainer, composed with Hydra) included; without it the script
still completes, with a stand-in for lbtrain.config, and reports what it skipped and why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "device_check.py"

# argv: [-c, DEPS ('' for none), SCRIPT, args...]. The hook raises for hydra/omegaconf/antlr4 unless found in DEPS.
ONLY_IN_DEPS = r'''
import importlib.machinery, runpy, sys

DEPS = sys.argv.pop(1)
BLOCKED = ("hydra", "omegaconf", "antlr4")


class OnlyInDeps:
    """hydra, omegaconf and antlr4 as on the GPU machine: not installed, importable only from the --deps folder."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED or path is not None:  # (a submodule: its package's folder decides)
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [DEPS]) if DEPS else None
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on the GPU machine)", name=name)
        return spec


sys.meta_path.insert(0, OnlyInDeps())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def _module():
    spec = importlib.util.spec_from_file_location("_device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(deps: Path | None, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", ONLY_IN_DEPS, str(deps or ""), str(SCRIPT), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_quick_run_with_deps_folder_writes_every_section(tmp_path):
    deps = tmp_path / "deps"
    copied = _module().bundle_deps(deps)
    assert {"hydra", "omegaconf", "antlr4"} <= set(copied)
    out = tmp_path / "out"
    p = _run(deps, "--quick", "--deps", str(deps), "--out", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "device_check.json").read_text())
    md = (out / "device_check.md").read_text()

    assert res["errors"] == [], res["errors"]
    env = res["env"]
    assert env["hydra"] is True and env["config_shim"] is False and env["deps_path"] == [str(deps.resolve())]
    assert env["torch"] and env["device"] == "cpu" and env["quick"] is True
    # the CUDA tests and compile are the only things a quick CPU run leaves out, each with its reason
    assert {(s["section"], s["reason"].split(" ")[0]) for s in res["skipped"]} == {("cuda_tests", "no"),
                                                                                   ("compile", "compile")}
    cases = res["correctness"]["cases"]
    assert len(cases) == 2
    for case in cases.values():
        assert set(case["options"]) == {"bf16", "channels_last"} and case["noise_floor"]["update1_rel"] == 0.0
        for option, d in case["options"].items():
            assert d["ok"] and d["finite"], (option, d)
            assert d["update1_rel"] <= d["tolerance"]["update1_rel"]
        assert case["options"]["channels_last"]["update1_rel"] < 1e-3  # fp32 on the CPU: (nearly) the same numbers
    rows = {(r["workload"], r["flags"], r["path"]) for r in res["throughput"]["rows"]}
    workloads = ("f1_mnist", "resnet44_cifar10", "resnet44_b4096_adapt")
    for w in workloads:
        want = {(w, f, path) for f in ("fp32", "bf16+cl") for path in ("limit", "lbtrain")}
        assert want | {(w, "fp32", "reference")} <= rows
        for f in ("fp32", "bf16+cl"):
            r = res["throughput"]["ratios"][f"{w} {f}"]
            assert r["lbtrain_over_limit"] > 0 and r["lbtrain_over_reference"] > 0
    assert all(r["images_per_sec"] > 0 for r in res["throughput"]["rows"])
    assert res["ghost_bn"]["steps"]["resnet44_cifar10"]["ghost_over_plain_time"] > 0
    assert {"fp32", "bf16"} <= set(res["ghost_bn"]["micro"])
    targets = {t["target"]: t for t in res["targets"]}
    assert any("regime=adapt" in t and targets[t]["measured"] > 0 for t in targets)
    # --quick shows the throughput targets but never judges them (toy sizes on a shared CPU); correctness it judges
    assert all(t["pass"] is None for name, t in targets.items() if "lbtrain loop" in name or "ghost BN" in name)
    assert all(t["pass"] is True for name, t in targets.items() if "matches fp32 eager" in name)
    for heading in ("## Device check:", "### CUDA tests", "### Fast options vs fp32 eager", "### Throughput",
                    "### Ghost BN vs plain BN", "### Compile", "### Targets", "### Skipped"):
        assert heading in md, heading
    assert "torch " + env["torch"] in md and env["date"] in md
    assert "targets:" in p.stdout and "written:" in p.stdout


def test_quick_run_without_hydra_completes_and_says_what_it_skipped(tmp_path):
    out = tmp_path / "out"
    p = _run(None, "--quick", "--skip", "ghost_bn", "--models", "f1", "--out", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "device_check.json").read_text())
    assert res["errors"] == [], res["errors"]
    assert res["env"]["hydra"] is False and res["env"]["config_shim"] is True  # build_optimizer without Hydra
    assert res["env"]["imports"]["hydra"] == "missing"
    (case,) = res["correctness"]["cases"].values()
    assert all(d["ok"] for d in case["options"].values())
    paths = {r["path"] for r in res["throughput"]["rows"]}
    assert paths == {"limit", "reference"}  # lbtrain's loop needs a composed config
    why = [s["reason"] for s in res["skipped"] if s["item"].endswith("lbtrain")]
    assert why and all("--deps" in r for r in why)
    assert "lbtrain" in (out / "device_check.md").read_text()


def test_deps_folder_takes_wheels_and_sdists(tmp_path, monkeypatch):
    """`--deps` also takes what `pip download` writes: pure-Python wheels and sdists (antlr4 4.9.3 is one)."""
    dc = _module()
    deps = tmp_path / "deps"
    deps.mkdir()
    with zipfile.ZipFile(deps / "wheelpkg_dc-1.0-py3-none-any.whl", "w") as z:
        z.writestr("wheelpkg_dc/__init__.py", "VALUE = 'wheel'\n")
    src = tmp_path / "sdistpkg_dc-2.0" / "src" / "sdistpkg_dc"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("VALUE = 'sdist'\n")
    with tarfile.open(deps / "sdistpkg_dc-2.0.tar.gz", "w:gz") as t:
        t.add(tmp_path / "sdistpkg_dc-2.0", arcname="sdistpkg_dc-2.0")
    monkeypatch.setattr(sys, "path", list(sys.path))
    added = dc.add_deps(deps)
    assert len(added) == 2
    import sdistpkg_dc
    import wheelpkg_dc

    assert (wheelpkg_dc.VALUE, sdistpkg_dc.VALUE) == ("wheel", "sdist")
    for name in ("sdistpkg_dc", "wheelpkg_dc"):
        sys.modules.pop(name)


def test_cuda_test_selection_names_real_cuda_tests():
    """The pytest command of the cuda_tests section selects tests that exist (`-k cuda` in CUDA_TEST_FILES)."""
    dc = _module()
    cmd = dc.cuda_test_command()
    assert cmd[cmd.index("-k") + 1] == "cuda"
    for f in dc.CUDA_TEST_FILES:
        text = (ROOT / f).read_text()
        assert "needs CUDA" in text and ("def test_cuda" in text or '"cuda"' in text), f


def test_cuda_tests_section_runs_pytest_and_reads_its_summary():
    """On the CPU the same pytest run skips every selected test: the section runs it and reads the counts (on the
    GPU they must pass: `ok` needs passed > 0 and nothing failed)."""
    dc = _module()

    class Ck:  # what the section reads of a Check
        deps_path: list[str] = []

    res = dc.section_cuda_tests(Ck(), timeout=120)
    assert res["returncode"] == 0, res["output_tail"]
    assert res["counts"]["skipped"] >= 5 and res["counts"]["deselected"] > 0 and "passed" not in res["counts"]
    assert res["ok"] is False and "skipped" in res["summary"]


@pytest.mark.parametrize("option", ["fp32", "bf16", "channels_last", "compile", "all"])
def test_every_option_has_a_tolerance(option):
    dc = _module()
    tol = dc.tolerance_for(option)
    assert tol["update1_rel"] > 0 and tol["loss_rel"] > 0
