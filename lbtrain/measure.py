"""`lbtrain-measure`: run instruments on a finished run's checkpoints, after the fact.

    lbtrain-measure RUN [--at final|all|UPDATES] INSTRUMENT [INSTRUMENT ...] [KEY=VALUE ...] [--batches N]

A run that did not switch an instrument on (`sharpness.every_epochs`, `gns=true`, ...) need not be trained again:
this builds the run from its own recorded config (RUN/.hydra/config.yaml; else the identity in results.json, with
the instruments' options and run-only keys such as `threads` at their defaults) as `lbtrain` would
(`Trainer.setup`, which trains nothing and writes nothing into a finished run's folder), restores a checkpoint's
model, w_0, optimizer, run state and random state, builds the instrument from the registry
(`InstrumentSpec.build(run, node)`, the same class as in a run) and calls its `measure()` (the protocol's
`Measurable`; an instrument without one is refused). The numbers are the in-run code's, at the checkpoint's
weights: the sharpness at an update where the run kept a checkpoint and measured is the run's own, bit for bit
(same device and thread count). Runs trained in several processes are measured in one (the noise scale's two
batch sizes and a plain BatchNorm's batch are then one process's: a note says so).

Checkpoints (`--at`): `final` (default) the run's checkpoint.pt (its last update); `all` every kept checkpoint
(checkpoints/update_<N>.pt, from `checkpoint.keep` / `checkpoint.keep_per_decade`) and the final one; or updates,
`--at 96,384`, each of which must have one. Options are the run's recorded ones, changed by Hydra-style overrides
of the instruments' config keys (`sharpness.samples=256 gns_options.bn=eval`; `device=` and `threads=` too),
checked by each instrument's own `check`. `--batches N`: the `batches` keyword of instruments whose measure()
draws training batches of its own (the noise scale: 16 by default; the sharpness: its batch sharpness's, by
default `sharpness.batch_batches`); recorded with the options.

Where results land (the run's own records - results.json, checkpoint.pt, its event files - are never touched):
- RUN/measure/measurements.json: one point per (instrument, definition, update), each naming its checkpoint (file,
  update, SHA-256 of the file), its definition (the instrument's options and settings; `definition_hash`), what
  `measure()` returned (`result`), the TensorBoard scalars it wrote (`scalars`), the time taken, when and on what;
- RUN/measure/<instrument>-<definition hash>/: a TensorBoard stream of its own per instrument and definition, the
  run's tags (sharpness/lambda_max, gns/b_simple, weights/distance/<layer>) at each checkpoint's update.
Each point is written (atomically) as soon as it is measured; the streams are rebuilt from the records. So a
re-run measures only what is missing (a no-op when nothing is), and a kill loses at most the point being measured
and duplicates nothing. One lbtrain-measure at a time per run (a lock in RUN/measure). The report
(`lbtrain-report`) reads the records (`lbtrain.analysis.runs.Run.measurements`).

A run that is not finished (results.json missing, or status other than completed/diverged), an unknown
instrument, a bad option or a missing checkpoint is refused with one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import io
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from lbtrain.analysis.runs import MEASURE_DIR, MEASUREMENTS, number, read_measurements
from lbtrain.checkpoint import atomic_write_bytes, atomic_write_json, read_checkpoint_meta, remove_stale_temporaries
from lbtrain.cli import USER_ERRORS, one_line, setup_hydra
from lbtrain.instruments import base as instruments
from lbtrain.results import FINAL, Results, read_results, strict
from lbtrain.rundir import RunLock

PROG = "lbtrain-measure"
FORMAT = 1  # of measurements.json
STREAM = "lbtrain-measure"  # in the name of the event files it writes
RUN_KEYS = ("device", "threads")  # overridable besides the instruments' nodes: how, not what, is measured


class MeasureError(ValueError):
    """A user mistake or a run that cannot be measured (one line, exit code 2)."""


@dataclass(frozen=True)
class Checkpoint:
    update: int
    path: Path
    file: str  # relative to the run folder

    def sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()


@dataclass(frozen=True)
class Definition:
    """An instrument as measured: its name, the config node it is built with, and its after-the-fact settings."""

    spec: instruments.InstrumentSpec
    node: Any  # what the factory gets
    options: Any  # the node as plain values (recorded)
    settings: dict[str, Any]  # keyword arguments of measure() (e.g. batches)

    @property
    def record(self) -> dict[str, Any]:
        return {"instrument": self.spec.name, "options": self.options, "settings": self.settings}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.record, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def stream(self) -> str:
        return f"{self.spec.name}-{self.hash[:8]}"


class _Recorder:
    """Stands in for the run's TensorBoard logger while an instrument measures: keeps what it writes."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.values.update({tag: float(v) for tag, v in values.items()})

    def hparams(self, params: dict[str, Any], end: bool = False) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- the run
def finished_run(run_dir: Path) -> Results:
    """results.json of a finished run (completed or diverged); MeasureError otherwise."""
    if not run_dir.is_dir():
        raise MeasureError(f"{run_dir}: no such run folder")
    results = read_results(run_dir / "results.json")
    if results is None:
        raise MeasureError(f"{run_dir} is not a finished run (no results.json): measure a run folder that lbtrain "
                           "finished, or finish this one first (re-run its lbtrain command)")
    if results.status not in FINAL:
        raise MeasureError(f"{run_dir} is not a finished run (status {results.status}): finish it first (re-run its "
                           "lbtrain command, which resumes it), then measure it")
    return results


def run_config(run_dir: Path, results: Results, overrides: Sequence[str]) -> Any:
    """The run's config: its recorded .hydra/config.yaml (else its identity) on the schema, with `overrides` of
    the instruments' keys (and device, threads) applied."""
    from omegaconf import OmegaConf

    from lbtrain.config import Config

    recorded = run_dir / ".hydra" / "config.yaml"
    if recorded.is_file():
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(recorded))
    elif results.identity:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), results.identity)
    else:
        raise MeasureError(f"{run_dir} records neither its config (.hydra/config.yaml) nor an identity in "
                           "results.json (written by an older lbtrain): it cannot be rebuilt")
    allowed = (*instruments.config_keys(), *RUN_KEYS)
    for text in overrides:
        key, _, _ = text.partition("=")
        if key.split(".")[0] not in allowed:
            shown = [f"{k}.*" if OmegaConf.is_config(cfg.get(k)) else k for k in allowed]
            raise MeasureError(f"{text}: not an instrument option; the run is measured as it was trained (allowed: "
                               f"{', '.join(shown)})")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([text]))
    cfg.resume = None
    cfg.progress = False
    return cfg


def checkpoints(run_dir: Path, results: Results, at: str) -> list[Checkpoint]:
    """The checkpoints `--at` names, by update (a kept one where the final checkpoint is at the same update)."""
    kept = {}
    for path in sorted((run_dir / "checkpoints").glob("update_*.pt")):
        stem = path.stem.removeprefix("update_")
        if stem.isdigit():
            kept[int(stem)] = Checkpoint(int(stem), path, f"checkpoints/{path.name}")
    final_path = run_dir / "checkpoint.pt"
    final = None
    if final_path.is_file():
        step = read_checkpoint_meta(final_path).get("step", results.updates)
        final = Checkpoint(int(step), final_path, "checkpoint.pt")
    if at == "final":
        if final is None:
            raise MeasureError(f"{final_path} is missing: the run's final checkpoint is gone (--at all or --at "
                               f"UPDATES measures the kept ones{': ' + _listed(kept) if kept else ''})")
        return [final]
    available = {**({final.update: final} if final else {}), **kept}
    if at == "all":
        if not available:
            raise MeasureError(f"{run_dir} holds no checkpoint to measure (no checkpoint.pt, no checkpoints/)")
        return [available[u] for u in sorted(available)]
    try:
        wanted = sorted({int(u) for u in at.split(",")})
    except ValueError:
        raise MeasureError(f"--at {at}: expected final, all, or updates such as 96,384") from None
    missing = [u for u in wanted if u not in available]
    if missing:
        raise MeasureError(f"--at {at}: no checkpoint at update {missing[0]}; this run has checkpoints at "
                           f"{_listed(available) or 'no update'} (checkpoint.keep=[...] keeps more in a new run)")
    return [available[u] for u in wanted]


def _listed(by_update: dict[int, Checkpoint]) -> str:
    return ", ".join(map(str, sorted(by_update)))


def definitions(cfg: Any, names: Sequence[str], batches: int | None) -> list[Definition]:
    """The requested instruments (registry order of the command line), each with its node and settings."""
    from omegaconf import OmegaConf

    out = []
    for name in dict.fromkeys(names):
        spec = instruments.REGISTRY.get(name)
        if spec is None:
            raise MeasureError(f"unknown instrument {name!r}; allowed: {', '.join(sorted(instruments.REGISTRY))}")
        module, _, cls_name = spec.factory.partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        method = getattr(cls, "measure", None)
        if not callable(method):
            raise MeasureError(f"instrument {name!r} cannot measure after the fact: {spec.factory} has no measure() "
                               "method (see lbtrain.instruments.base.Measurable)")
        node = instruments.options_of(cfg, spec)
        options = OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else None
        settings = {}
        param = inspect.signature(method).parameters.get("batches")
        if param is not None:
            settings["batches"] = batches if batches is not None else param.default
        out.append(Definition(spec, node, options, settings))
    if batches is not None and not any("batches" in d.settings for d in out):
        raise MeasureError(f"--batches {batches}: none of {', '.join(names)} draws batches of its own (gns, "
                           "sharpness do)")
    return out


# ------------------------------------------------------------------------------------------- measuring
def _plain(obj: Any) -> Any:
    """`obj` as JSON values (tensors and numpy scalars as lists / numbers)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def measure_one(t: Any, state: dict[str, Any], d: Definition) -> tuple[Any, dict[str, float], float]:
    """Measure one instrument at one checkpoint: (its result, its scalars, seconds). A fresh instrument, the
    checkpoint's state and random state; the global random state is as before afterwards."""
    import torch

    t.hooks = type(t.hooks)()  # (what the instrument attaches is never called: nothing is trained)
    recorder = _Recorder()
    t.tb = recorder
    with torch.random.fork_rng(devices=[t.device] if t.device.type == "cuda" else []):
        t.restore(state)  # the checkpoint's model, optimizer, w_0, run state, weight average and random state
        inst = d.spec.build(t, d.node)
        start = time.perf_counter()
        result = inst.measure(**d.settings)
        seconds = time.perf_counter() - start
    if result is None:
        result = inst.results()
    return _plain(result), recorder.values, seconds


def _setup(cfg: Any, run_dir: Path) -> Any:
    """The run's trainer, set up (data, model, optimizer) without training or writing anything."""
    from lbtrain.trainer import Trainer

    t = Trainer(cfg, run_dir)
    t.setup()
    if not t.folder.final:  # (checked before; a folder changed meanwhile)
        raise MeasureError(f"{run_dir} is not a finished run any more")
    t.instruments = {}  # the run's own instruments: not measured here
    return t


# --------------------------------------------------------------------------------------- records, streams
def _write_records(path: Path, points: list[dict[str, Any]]) -> None:
    atomic_write_json(path, {"format": FORMAT, "points": points})


def _event_bytes(points: list[dict[str, Any]]) -> bytes:
    """A TensorBoard event file holding each point's scalars at its update (file order: by update)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    buf = io.BytesIO()
    writer = RecordWriter(buf)
    first = min((p["measured_at"] for p in points), default=time.time())
    writer.write(Event(wall_time=first, file_version="brain.Event:2").SerializeToString())
    for p in points:
        values = [Summary.Value(tag=tag, simple_value=v) for tag, v in sorted(p["scalars"].items()) if v is not None]
        if values:
            event = Event(wall_time=p["measured_at"], step=int(p["update"]), summary=Summary(value=values))
            writer.write(event.SerializeToString())
    return buf.getvalue()


def sync_streams(measure_dir: Path, points: list[dict[str, Any]]) -> None:
    """Make each TensorBoard stream (RUN/measure/<instrument>-<hash>/) hold exactly its records' scalars: one
    event file named by a digest of them, rebuilt when they changed (written under a name TensorBoard does not
    read, the old file removed, then renamed into place: never two files with the same points)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault(p["stream"], []).append(p)
    for name, members in groups.items():
        members = sorted(members, key=lambda p: (int(p["update"]), p["measured_at"]))
        digest = hashlib.sha256(json.dumps([(p["update"], p["scalars"], p["measured_at"]) for p in members],
                                           sort_keys=True).encode()).hexdigest()[:12]
        folder = measure_dir / name
        folder.mkdir(exist_ok=True)
        remove_stale_temporaries(folder)
        current = [f for f in folder.iterdir() if "tfevents" in f.name]
        if len(current) == 1 and current[0].name.endswith(f".{STREAM}.{digest}"):
            continue
        partial = folder / "stream.partial"
        atomic_write_bytes(partial, _event_bytes(members))
        for f in current:
            f.unlink()
        os.replace(partial, folder / f"events.out.tfevents.{time.time_ns()}.{STREAM}.{digest}")


# ------------------------------------------------------------------------------------------------ main
def measure(run_dir: Path, names: Sequence[str], overrides: Sequence[str] = (), at: str = "final",
            batches: int | None = None, out: TextIO | None = None) -> list[dict[str, Any]]:
    """Measure `names` at the checkpoints `at` names; returns the points measured now (see the module
    docstring). MeasureError & co. (lbtrain.cli.USER_ERRORS) on a refusal. Progress lines go to `out` (stdout)."""
    out = out or sys.stdout
    setup_hydra()
    results = finished_run(run_dir)
    cfg = run_config(run_dir, results, overrides)
    defs = definitions(cfg, names, batches)
    if not defs:
        raise MeasureError("name at least one instrument to measure")
    from lbtrain.config import validate

    validate(cfg)  # the config, each instrument's own check among it (again with the data's size in set-up)
    chosen = checkpoints(run_dir, results, at)
    measure_dir = run_dir / MEASURE_DIR
    measure_dir.mkdir(exist_ok=True)
    records = measure_dir / MEASUREMENTS
    with RunLock(measure_dir):
        remove_stale_temporaries(measure_dir)
        try:
            points = read_measurements(run_dir)
        except ValueError as e:
            raise MeasureError(f"{e}: move it away to measure again") from None
        sync_streams(measure_dir, points)  # (after a kill between a point's record and its stream)
        done = {(p["instrument"], p["definition_hash"], int(p["update"])): p for p in points}
        todo: list[tuple[Checkpoint, str, list[Definition]]] = []
        for ck in chosen:
            sha = ck.sha256()
            missing = []
            for d in defs:
                old = done.get((d.spec.name, d.hash, ck.update))
                if old is None:
                    missing.append(d)
                elif old["checkpoint"]["file"] == ck.file and old["checkpoint"]["sha256"] != sha:
                    raise MeasureError(f"{records}: {d.spec.name} at update {ck.update} was measured on another "
                                       f"{ck.file} (its SHA-256 differs): move {measure_dir} away to measure again")
            if missing:
                todo.append((ck, sha, missing))
        wanted = len(chosen) * len(defs)
        if not todo:
            out.write(f"nothing to do: {wanted} point(s) already measured ({records})\n")
            return []
        count = sum(len(m) for _, _, m in todo)
        out.write(f"{run_dir} ({results.status}, {results.updates} updates): measuring {count} point(s), "
                  f"{wanted - count} already there\n")
        if not (run_dir / ".hydra" / "config.yaml").is_file():
            out.write(f"note: {run_dir} has no .hydra/config.yaml: the run is rebuilt from its identity "
                      "(results.json); instrument options and threads are the defaults unless given\n")
        out.flush()
        t = _setup(cfg, run_dir)
        env = {"device": str(t.device), "threads": _threads(), "host": socket.gethostname(), "world": 1,
               "bn_batch": t.bn_batch}
        if t.has_batchnorm and results.bn_batch and results.bn_batch != t.bn_batch:
            out.write(f"note: the run normalized BatchNorm over {results.bn_batch} samples per statistic "
                      f"({results.world_size} processes); measured in one process, over {t.bn_batch}\n")
        new: list[dict[str, Any]] = []
        from lbtrain.checkpoint import CHECKPOINT_KEYS, load_checkpoint
        from lbtrain.config import schema_defaults
        from lbtrain.identity import describe_diff, diff

        for ck, sha, missing in todo:
            state = load_checkpoint(ck.path, required=CHECKPOINT_KEYS)
            changes = diff(state["identity"], t.identity, schema_defaults())
            if changes:
                raise MeasureError(f"{ck.path} belongs to another run "
                                   f"({describe_diff(changes, 'checkpoint', 'run')})")
            for d in missing:
                result, scalars, seconds = measure_one(t, state, d)
                point = strict({  # (as it reads back: not a finite number is null)
                    "instrument": d.spec.name, "update": ck.update,
                    "checkpoint": {"file": ck.file, "update": ck.update, "sha256": sha},
                    "definition": d.record, "definition_hash": d.hash, "stream": d.stream, "result": result,
                    "scalars": scalars, "seconds": round(seconds, 3), "measured_at": time.time(), "environment": env})
                points.append(point)
                new.append(point)
                _write_records(records, points)  # each point once it is measured: a kill loses only the next
                sync_streams(measure_dir, [q for q in points if q["stream"] == d.stream])
                shown = " ".join(f"{tag} {number(v)}" for tag, v in point["scalars"].items())
                out.write(f"update {ck.update} {d.spec.name}: {shown or '(no scalars)'} ({seconds:.2f} s, "
                          f"{ck.file})\n")
                out.flush()
        out.write(f"measured {len(new)} point(s): {records}; TensorBoard: {measure_dir}\n")
        return new


def _threads() -> int:
    import torch

    return torch.get_num_threads()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (argparse prints the usage too)
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`lbtrain-measure`)."""
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0],
                     epilog="e.g. lbtrain-measure outputs/digits/default --at all sharpness sharpness.samples=256")
    parser.add_argument("run", type=Path, metavar="RUN", help="a finished run's folder")
    parser.add_argument("items", nargs="+", metavar="INSTRUMENT|KEY=VALUE",
                        help=f"instruments ({', '.join(sorted(instruments.REGISTRY))}) and overrides of their "
                             "options (sharpness.samples=256, gns_options.bn=eval; device=, threads=)")
    parser.add_argument("--at", default="final", metavar="final|all|UPDATES",
                        help="the final checkpoint (default), all (kept ones and the final one), or updates with a "
                             "kept checkpoint, comma-separated")
    parser.add_argument("--batches", type=int, default=None, metavar="N",
                        help="batches drawn by instruments that draw training batches of their own (gns: 16; "
                             "sharpness: its batch sharpness's)")
    args = parser.parse_intermixed_args(argv)
    if args.batches is not None and args.batches < 1:
        parser.error(f"--batches {args.batches}: must be >= 1")
    names = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    try:
        if not names:
            raise MeasureError("name at least one instrument to measure "
                               f"({', '.join(sorted(instruments.REGISTRY))})")
        measure(args.run, names, overrides, at=args.at, batches=args.batches)
    except (MeasureError, *USER_ERRORS) as e:
        sys.stderr.write(f"{PROG}: error: {e if isinstance(e, MeasureError) else one_line(e)}\n")
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        sys.stderr.write(f"{PROG}: error: cannot write {e.filename}: {e.strerror}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted; the points measured so far are recorded: re-run the same command to "
                         "measure the rest\n")
        return 130
    except Exception as e:
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(e, OmegaConfBaseException):
            sys.stderr.write(f"{PROG}: error: {one_line(e)}\n")
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "measure", "MeasureError", "finished_run", "run_config", "checkpoints", "definitions",
           "sync_streams"]
