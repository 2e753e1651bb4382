"""Finding run folders and reading them: the one `Run`, its scalars, the keys that group runs, and numbers.

Every run folder holds the trainer's results.json and its TensorBoard event files (step = optimizer updates). A
`Run` is one such folder with its parsed results.json; its flat canonical identity (lbtrain.identity) is what
groups runs: seeds of one configuration share `config_key`, and the identity keys in which rows differ become
their "variant" columns (`variant_keys`, `shown`), so that runs differing in anything but the seed never share
a cell or a label. Everything else in lbtrain.analysis reads runs through this module.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lbtrain.analysis import regimes
from lbtrain.config import schema_defaults
from lbtrain.identity import canonical, fmt, identity_hash
from lbtrain.regime import epoch_layout, expand_batches
from lbtrain.results import Results, ResultsError, read_results


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Run:
    """One run folder and its parsed results.json; TensorBoard scalars are read on first use."""

    path: Path
    results: Results
    duplicate_of: Path | None = None  # another folder holds the same configuration and seed
    _scalars: dict[str, list[tuple[int, float]]] | None = field(default=None, repr=False, compare=False)

    @property
    def identity(self) -> dict[str, Any]:
        """The run's flat canonical identity (keys at the schema default left out); results.json files written
        before identities existed get one from their recorded fields."""
        if self.results.identity:
            return canonical(self.results.identity, schema_defaults())
        r = self.results
        legacy = {"name": r.experiment, "dataset": {"name": r.dataset}, "model": {"name": r.model},
                  "regime": {"name": r.regime}, "batch": r.batch, "base": {"batch": r.base_batch}, "seed": r.seed,
                  "legacy": {"ghost_batch": r.ghost_batch, "bn_batch": r.bn_batch, "lr": r.lr,
                             "planned_updates": r.planned_updates}}
        return canonical(legacy)

    @property
    def identity_hash(self) -> str:
        return identity_hash(self.identity)

    @property
    def experiment(self) -> str:
        return str(self.results.experiment or self.identity.get("name") or self.path.parent.name)

    @property
    def dataset(self) -> str:
        return str(self.results.dataset or self.identity.get("dataset.name") or "?")

    @property
    def batch(self) -> int:
        return int(self.results.batch or self.identity.get("batch") or 0)

    @property
    def base_batch(self) -> int:
        return int(self.results.base_batch or self.identity.get("base.batch") or self.batch)

    @property
    def regime(self) -> str:
        return str(self.results.regime or self.identity.get("regime.name") or "unknown")

    @property
    def seed(self) -> int:
        return int(self.results.seed or 0)

    @property
    def status(self) -> str:
        """completed (the whole plan) | stopped early (max_steps) | diverged | interrupted | failed | duplicate."""
        if self.duplicate_of is not None:
            return "duplicate"
        if self.results.status == "completed" and not self.results.finished_plan:
            return "stopped early"
        return self.results.status

    @property
    def ok(self) -> bool:
        """Finished its plan with a validation error: the only runs that back a number in the tables."""
        return self.status == "completed" and self.results.final_val_error is not None

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        if self._scalars is None:
            self._scalars = read_all_scalars(self.path)
        return self._scalars.get(tag, [])

    @property
    def measurements(self) -> list[dict[str, Any]]:
        """What `lbtrain-measure` measured on this run's checkpoints after the fact (RUN/measure/measurements.json;
        [] when nothing). An unreadable file is skipped with a line on stderr: it never stops a report."""
        try:
            return read_measurements(self.path)
        except ValueError as e:
            print(f"lbtrain-report: skipping {e}", file=sys.stderr)
            return []

    def measured(self, tag: str) -> list[tuple[int, float]]:
        """One scalar measured after the fact (a TensorBoard tag of the instrument, e.g. sharpness/lambda_max), as
        [(update, value), ...] sorted by update (several definitions at one update: each point)."""
        return sorted((int(p["update"]), float(p["scalars"][tag])) for p in self.measurements
                      if p.get("scalars", {}).get(tag) is not None)


def read_run(folder: str | Path) -> Run | None:
    """The run in `folder`; None when it holds no results.json; ResultsError when that file is not a results
    object."""
    folder = Path(folder)
    results = read_results(folder / "results.json")
    return Run(folder, results) if results is not None else None


MEASURE_DIR = "measure"  # lbtrain-measure's folder inside a run folder (its records and TensorBoard streams)
MEASUREMENTS = "measurements.json"  # its records: {"format": 1, "points": [...]}, one point per measurement


def read_measurements(folder: str | Path) -> list[dict[str, Any]]:
    """The points `lbtrain-measure` recorded for the run in `folder` (each: instrument, update, checkpoint,
    definition, definition_hash, result, scalars, ...); [] when there are none; ValueError naming the file when it
    is not a measurement record."""
    path = Path(folder) / MEASURE_DIR / MEASUREMENTS
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    points = data.get("points") if isinstance(data, dict) else None
    if not isinstance(points, list) or not all(isinstance(p, dict) and "instrument" in p and "update" in p
                                               for p in points):
        raise ValueError(f"{path}: not a measurement record (no list of points)")
    return points


def recorded_config(folder: str | Path) -> Any:
    """The config a run folder records in .hydra/config.yaml, as OmegaConf reads it (interpolations resolve on
    access); None when there is none or it cannot be read (it is a record, never needed to read the results)."""
    path = Path(folder) / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        from omegaconf import OmegaConf

        return OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - an unreadable record is only a missed hint
        return None


# -------------------------------------------------------------------------------------------- grouping
def without(flat: dict[str, Any], drop: Iterable[str]) -> dict[str, Any]:
    """A flat identity without the `drop` keys (a key drops everything below it too: "regime" drops regime.*)."""
    drop = tuple(drop)
    return {k: v for k, v in flat.items() if not any(k == d or k.startswith(d + ".") for d in drop)}


def identity_key(flat: dict[str, Any], drop: Iterable[str] = ()) -> str:
    """A hashable key of a flat identity without the `drop` keys."""
    return json.dumps(without(flat, drop), sort_keys=True, default=str)


def config_key(run: Run) -> str:
    """Runs with equal keys are seeds of one configuration."""
    return identity_key(run.identity, ("seed",))


def run_key(run: Run) -> tuple:
    """Sort key: experiment, dataset, batch, regime (report order), seed, folder."""
    return (run.experiment, run.dataset, run.batch, regimes.rank(run.regime), run.seed, str(run.path))


# Identity keys that tables show in columns of their own (experiment, dataset, batch, regime, seed): never as a
# "variant" column. Only the regime's name: its other keys (regime.warmup_epochs, regime.momentum, ...) can tell
# two runs of one regime apart (see variant_keys).
SHOWN = ("name", "dataset.name", "seed", "batch", "regime.name")


def variant_keys(identities: Sequence[dict[str, Any]], shown_keys: Sequence[str] = SHOWN) -> list[str]:
    """The keys that tell rows apart (each row's flat identity): the keys outside `shown_keys` whose values differ
    between rows, sorted; a regime.* key only where rows of one regime differ in it (how regimes differ from each
    other, e.g. baseline's lr_scaling from adapt's, is what their names say), after the others."""
    plain = variant_columns([without(d, (*shown_keys, "regime")) for d in identities])
    by_regime: dict[str, list[dict[str, Any]]] = {}
    for d in identities:
        sub = {k: v for k, v in without(d, shown_keys).items() if k.startswith("regime.")}
        by_regime.setdefault(str(d.get("regime.name")), []).append(sub)
    regime = sorted({k for group in by_regime.values() for k in variant_columns(group)})
    return plain + regime


def variant_columns(keys: Sequence[dict[str, Any]]) -> list[str]:
    """The flat identity keys whose values differ between rows (each row's dict of identity keys)."""
    names = sorted({k for d in keys for k in d})
    return [k for k in names if len({json.dumps(d.get(k), sort_keys=True, default=str) for d in keys}) > 1]


def shown(flat: dict[str, Any], key: str) -> str:
    """A variant column's cell: the identity's value, or the schema default that the canonical form left out
    ("-" only for a key this version does not know)."""
    defaults = schema_defaults()
    return fmt(flat[key]) if key in flat else (fmt(defaults[key]) if key in defaults else "-")


# --------------------------------------------------------------------------------------------- finding
_PREFERENCE = {"completed": 0, "stopped early": 1, "diverged": 2, "interrupted": 3, "failed": 4}


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every results.json under `paths` (run folders, sweep folders at any depth, or the files themselves). Of runs
    with the same configuration and seed, the one that got furthest (then the newest) counts; the others are kept
    as duplicates, listed but never averaged."""
    found: dict[Path, Path] = {}  # resolved -> as given, so overlapping paths list a run once
    for p in map(Path, paths):
        files = [p] if p.is_file() and p.name == "results.json" else sorted(p.rglob("results.json"))
        for f in files:
            found.setdefault(f.resolve(), f)
    runs = []
    for f in found.values():
        try:
            run = read_run(f.parent)
        except ResultsError as e:  # a half-copied or foreign file must not stop the report
            print(f"lbtrain-report: skipping {e}", file=sys.stderr)
            continue
        if run is not None:
            runs.append(run)
    by_pair: dict[tuple[str, int], list[Run]] = {}
    for r in runs:
        by_pair.setdefault((config_key(r), r.seed), []).append(r)
    for same in by_pair.values():
        if len(same) > 1:
            same.sort(key=lambda r: (_PREFERENCE.get(r.status, 9), -_mtime(r.path), str(r.path)))
            for r in same[1:]:
                r.duplicate_of = same[0].path
    return sorted(runs, key=run_key)


def _mtime(path: Path) -> float:
    try:
        return (path / "results.json").stat().st_mtime
    except OSError:
        return 0.0


# --------------------------------------------------------------------------------------------- scalars
def read_all_scalars(run_dir: str | Path, every_write: bool = False) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a run folder as {tag: [(step, value), ...]}, sorted by step. A step written twice
    counts once, the later write winning; `every_write=True` keeps every write in file order (to check that a
    resumed run wrote no point twice)."""
    if not Path(run_dir).is_dir():
        return {}
    # The real reader: it honours the purge events a resumed run writes over the steps it redoes.
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if every_write:
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out = {}
    for tag in acc.Tags()["scalars"]:
        points = {e.step: e.value for e in acc.Scalars(tag)}  # a step logged twice: the later write wins
        out[tag] = sorted(points.items())
    return out


def read_scalars(run_dir: str | Path, tag: str) -> list[tuple[int, float]]:
    """One scalar series of a run folder as [(step, value), ...]; [] when it was never logged."""
    return read_all_scalars(run_dir).get(tag, [])


def epochs_at(run: Run, steps: Sequence[float]) -> np.ndarray | None:
    """Epochs done after each of `steps` updates (a fraction within an epoch); None when unknown.

    Exact from the run's training-set size and batch schedule (regime.epoch_layout: the trainer's own rounding
    rules), whose epochs may hold different batches (Smith et al.). results.json files without `train_size` take
    the batch as constant: step * epochs / updates."""
    steps = np.asarray(steps, dtype=float)
    eff, size = run.results.effective, run.results.train_size or run.results.effective.get("train_size")
    schedule, epochs = eff.get("batch_schedule"), eff.get("epochs")
    if size and schedule and epochs:
        batches = expand_batches(schedule, max(math.ceil(epochs - 1e-9), 1))
        starts_l, sizes_l, _ = epoch_layout(int(size), batches)
        starts, sizes = np.asarray(starts_l), np.maximum(np.asarray(sizes_l), 1)
        i = np.clip(np.searchsorted(starts, steps, side="right") - 1, 0, len(starts) - 1)
        return i + (steps - starts[i]) / sizes[i]
    updates, done = run.results.updates, run.results.epochs
    return steps * done / updates if updates and done else None


# --------------------------------------------------------------------------------------------- numbers
def number(v: Any) -> str:
    """A number for people: 4 significant digits, no exponent for large values; "-" for none or not finite."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def mean_std(values: Sequence[float], digits: int | None = None) -> str:
    """"mean ± std" (sample std, ddof=1) or just the value for a single one."""
    fmt_ = (lambda v: f"{v:.{digits}f}") if digits is not None else number
    mean = statistics.fmean(values)
    return fmt_(mean) if len(values) == 1 else f"{fmt_(mean)} ± {fmt_(statistics.stdev(values))}"
