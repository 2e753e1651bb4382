"""Loading a checkpoint never runs code it carries (issue 21, item 10).

The header's SHA-256 is a checksum, not a signature: anyone can write a file that passes it. Each test here forges
one whose pickle holds an object whose `__reduce__` calls `os.system` (harmless: it touches a marker file) behind a
valid header, SHA-256 and run identity, and checks it is refused in one line without running, by `load_checkpoint`
and through the programs that read checkpoints others may have written: a re-run in a shared outputs folder,
`resume=PATH` and `lbtrain-interp RUN_A RUN_B`.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import importlib.util
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import only_run, run_main

from lbtrain.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta, save_checkpoint

REFUSAL = "holds objects that are not tensors or plain data"
ARGS = ("max_steps=5",)  # a run of the default experiment, and its re-run


class Payload:
    """What an attacker would plant: unpickling it runs a shell command (here `touch MARKER`, not something worse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def forge(path: Path, state, meta: dict | None = None, fmt: str = "v2") -> None:
    """Write `state` in the checkpoint format the way an attacker would, without save_checkpoint (which refuses a
    non-plain state): `v2` header + JSON metadata + torch.save zip; `v2-legacy` the same around torch.save's
    pre-1.6 format (a bare pickle stream); `v1` the old header without metadata. The SHA-256 is right in each."""
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=fmt != "v2-legacy")
    payload = buf.getvalue()
    if fmt == "v1":
        path.write_bytes(b"LBTRAIN-CKPT-1 " + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
        return
    meta_bytes = json.dumps(meta or {}).encode()
    length = f"{len(meta_bytes)}\n".encode()
    body = meta_bytes + payload
    path.write_bytes(b"LBTRAIN-CKPT-2 " + hashlib.sha256(length + body).hexdigest().encode() + b" " + length + body)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


def _assert_one_line_refusal(stderr: str, prog: str) -> None:
    assert stderr.count("\n") == 1 and stderr.startswith(f"{prog}: error: "), stderr
    assert REFUSAL in stderr and "Traceback" not in stderr


# ------------------------------------------------------------------------------------------- library level
def test_the_payload_runs_code_when_unpickled_unrestricted(tmp_path, marker):
    """The forged file is a real attack: torch.load(weights_only=False), what load_checkpoint used to do, runs it."""
    forge(tmp_path / "checkpoint.pt", {"model": {"w": torch.ones(3)}, "x": Payload(marker)})
    data = (tmp_path / "checkpoint.pt").read_bytes()
    payload = data[data.index(b"\n") + 1 + len(b"{}"):]
    torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.exists()


def test_a_forged_plain_checkpoint_loads(tmp_path):
    """forge() writes the format right: what makes the malicious files below refused is their payload alone."""
    for fmt in ("v2", "v2-legacy", "v1"):
        forge(tmp_path / "checkpoint.pt", {"model": {"w": torch.arange(3.0)}, "step": 2}, {"step": 2}, fmt)
        state = load_checkpoint(tmp_path / "checkpoint.pt", required=("model",))
        assert torch.equal(state["model"]["w"], torch.arange(3.0)) and state["step"] == 2, fmt


@pytest.mark.parametrize("fmt", ["v2", "v2-legacy", "v1"])
def test_code_in_a_checkpoint_is_refused_without_running(tmp_path, marker, fmt):
    path = tmp_path / "checkpoint.pt"
    forge(path, {"model": {"w": torch.ones(3)}, "identity": {"seed": 0}, "plan": Payload(marker)},
          {"identity": {"seed": 0}, "step": 3}, fmt)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, required=("model", "identity"))
    message = str(e.value)
    assert REFUSAL in message and "not loaded" in message and str(path) in message
    assert ".system" in message  # names what it would have called (posix.system here)
    assert "\n" not in message
    assert not marker.exists(), "the forged checkpoint's payload ran"
    if fmt != "v1":
        assert read_checkpoint_meta(path)["step"] == 3  # the JSON header is read without unpickling anything


@pytest.mark.parametrize("bad, where", [
    (lambda m: Payload(m), "state['plan']"),
    (lambda m: np.float64(0.5), "state['plan']"),  # a numpy scalar: weights_only=True refuses its class
    (lambda m: enum.Enum("Precision", "fp32")["fp32"], "state['plan']"),
    (lambda m: collections.defaultdict(int), "state['plan']"),
    (lambda m: {"ok": [1, (2.0, {"deep": np.int64(1)})]}, "state['plan']['ok'][1][1]['deep']"),
], ids=["code", "numpy", "enum", "defaultdict", "nested"])
def test_save_checkpoint_writes_only_what_loads_with_weights_only(tmp_path, marker, bad, where):
    """A value that would make the run unresumable is refused when saved (naming where it lies), not hours later
    when the run resumes; nothing is written."""
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(TypeError, match=r"holds only tensors and plain") as e:
        save_checkpoint(path, {"model": {"w": torch.ones(2)}, "plan": bad(marker)})
    assert str(e.value).startswith(f"checkpoint {where} is a ")
    assert not path.exists() and not list(tmp_path.glob(".*.tmp")) and not marker.exists()


def test_everything_save_checkpoint_accepts_loads_back(tmp_path):
    state = {
        "model": collections.OrderedDict(w=torch.randn(2, 3), n=torch.tensor(4)),
        "w0": [torch.nn.Parameter(torch.zeros(2)), torch.zeros(0, dtype=torch.bfloat16)],
        "optimizer": {"state": {0: {"step": 3, "momentum_buffer": torch.ones(2)}},
                      "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "nesterov": False, "foreach": None,
                                        "params": [0]}]},
        "rng": {"torch": torch.get_rng_state(), "cuda": None},
        "state": {"distances": [(1, 0.5), (2, float("nan"))], "best_val_error": float("inf")},
        "misc": [torch.Size([2, 3]), torch.float16, "text", -1, True],
    }
    save_checkpoint(tmp_path / "checkpoint.pt", state, meta={"step": 3})
    back = load_checkpoint(tmp_path / "checkpoint.pt")
    assert back.keys() == state.keys()
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["misc"] == state["misc"]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["state"]["distances"][0] == (1, 0.5)


# ---------------------------------------------------------------------------------------- through the CLIs
@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A short real run of the default experiment, stopped by SIGTERM after 3 updates (interrupted: the same command
    resumes it, loading its checkpoint): its folder, with its genuine checkpoint."""
    cwd = tmp_path_factory.mktemp("real")
    p = run_main(*ARGS, cwd=cwd, env={"LBTRAIN_TEST_SIGNAL": "SIGTERM@3"})
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert read_checkpoint_meta(next(cwd.rglob("checkpoint.pt")))["status"] == "interrupted"
    return only_run(cwd / "outputs" / "digits")


def _poison(ckpt: Path, marker: Path) -> None:
    """Rewrite `ckpt` as an attacker with write access to a shared outputs folder would: the same run identity in
    the header and the payload (so every check before loading passes), a valid SHA-256, and the payload in it."""
    meta = read_checkpoint_meta(ckpt)
    state = load_checkpoint(ckpt)
    state["plan"] = Payload(marker)
    forge(ckpt, state, meta)


def _copy_run(real_run: Path, cwd: Path) -> Path:
    """The run folder copied to the same place under `cwd` (outputs/digits/<its name>), where a re-run lands."""
    run = cwd / real_run.relative_to(real_run.parents[2])
    shutil.copytree(real_run, run)
    return run


def test_rerun_in_a_folder_holding_a_forged_checkpoint_is_refused(real_run, tmp_path, marker):
    """The same command again, to resume, in a folder where someone replaced the checkpoint: exit 2, one line."""
    run = _copy_run(real_run, tmp_path)
    _poison(run / "checkpoint.pt", marker)
    p = run_main(*ARGS, cwd=tmp_path)
    assert not marker.exists(), "the forged checkpoint's payload ran"
    assert p.returncode == 2, p.stderr
    _assert_one_line_refusal(p.stderr, "lbtrain")


def test_resume_from_a_forged_checkpoint_is_refused(real_run, tmp_path, marker):
    """`resume=PATH` naming a forged copy of this run's checkpoint (the run's own folder is empty)."""
    forged = tmp_path / "elsewhere" / "checkpoint.pt"
    forged.parent.mkdir()
    shutil.copy(real_run / "checkpoint.pt", forged)
    _poison(forged, marker)
    p = run_main(*ARGS, f"resume='{forged}'", cwd=tmp_path / "elsewhere")
    assert not marker.exists(), "the forged checkpoint's payload ran"
    assert p.returncode == 2, p.stderr
    _assert_one_line_refusal(p.stderr, "lbtrain")


def _interp_command() -> list[str]:
    """`lbtrain-interp` as installed (the console script beside this Python, while its entry point imports), else
    `python -m` on whichever module holds it now (lbtrain/interp.py is moving to lbtrain/analysis/interp.py)."""
    exe = Path(sys.executable).parent / "lbtrain-interp"
    target = next(iter(entry_points(group="console_scripts", name="lbtrain-interp")), None)
    if exe.is_file() and target is not None and importlib.util.find_spec(target.module) is not None:
        return [str(exe)]
    for module in ("lbtrain.analysis.interp", "lbtrain.interp"):
        if importlib.util.find_spec(module) is not None:
            return [sys.executable, "-m", module]
    pytest.fail("no lbtrain-interp to run: neither the console script nor its module is importable")


@pytest.mark.parametrize("forged", ["RUN_A", "RUN_B"])
def test_interp_on_a_forged_run_folder_is_refused(real_run, tmp_path, marker, forged):
    """`lbtrain-interp RUN_A RUN_B` where one of the two folders holds a forged checkpoint: exit 2, one line."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    shutil.copytree(real_run, good)
    shutil.copytree(real_run, bad)
    _poison(bad / "checkpoint.pt", marker)
    pair = [str(bad), str(good)] if forged == "RUN_A" else [str(good), str(bad)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*_interp_command(), *pair, "--out", str(tmp_path / "out")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "the forged checkpoint's payload ran"
    assert p.returncode == 2, p.stderr
    _assert_one_line_refusal(p.stderr, "lbtrain-interp")
    assert f"{forged}: " in p.stderr and not (tmp_path / "out").exists()
