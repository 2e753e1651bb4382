"""Analysis of finished runs: Hoffer et al.'s Table 1, a per-run table, and the curves behind them.

    lbtrain-report outputs/digits [MORE_DIRS ...] [--out DIR] [--no-figures]

Every run folder holds the trainer's results.json and its TensorBoard event files (step = optimizer updates).
This reads them back and writes, into the output folder:
- table1.md/csv: validation accuracy (%) per experiment and large batch B_L, columns in the paper's order
  (B_S baseline, LB, +LR, +GBN, +RA, then any other regime), "mean ± std" over seeds;
- runs.md/csv: one row per run; runs_mean.md/csv: one row per configuration, mean ± std over its seeds;
- distance.png (Hoffer et al.'s Figure 2), val_error_updates.png, val_error_epochs.png and, when a batch
  changes during some run (Smith et al.), batch_schedule.png and noise_scale.png. With several experiments,
  each figure is written per experiment, prefixed by its name.

Every number says which configuration it came from: runs are grouped by their identity (lbtrain.identity) minus
the seed, so runs that differ in anything but the seed never share a cell; a table carries the dataset and every
other key in which its rows differ. A (configuration, seed) pair counts once (other copies are listed as
duplicates). Only runs that finished their plan enter a mean; runs stopped early (max_steps), interrupted, failed
or diverged are listed with their status, never averaged; a cell says n when it has fewer seeds than others.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lbtrain.checkpoint import atomic_write_bytes
from lbtrain.config import schema_defaults
from lbtrain.identity import canonical, fmt, identity_hash
from lbtrain.metrics import fit_log
from lbtrain.regime import epoch_layout, expand_batches
from lbtrain.results import Results, ResultsError, read_results

# Table 1's column order (Hoffer et al.), then Smith et al.'s and Goyal et al.'s regimes; unknown ones last.
REGIME_ORDER = ("baseline", "sqrt_lr", "gbn", "adapt", "batch_increase", "hybrid", "linear")
REGIME_LABELS = {"baseline": "LB", "sqrt_lr": "+LR", "gbn": "+GBN", "adapt": "+RA"}
SB_COLUMN = "B_S baseline"
BATCH_CHANGING = ("batch_increase", "hybrid")  # regimes whose batch grows during the run
RUN_FIELDS = ("final_val_error", "best_val_error", "updates", "epochs", "wall_time_s", "images_per_sec",
              "final_distance")
NUMERIC_COLUMNS = (*RUN_FIELDS, "fit_a", "fit_b", "fit_r2")
# Identity keys shown by dedicated columns (or that are the columns), never as "variant" columns.
_SHOWN = ("name", "dataset.name", "seed", "batch")


class NoRunsError(FileNotFoundError):
    """No results.json under the given paths."""


# ---------------------------------------------------------------------------------------------- reading
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


def _key(flat: dict[str, Any], drop: Iterable[str] = ()) -> str:
    """A hashable key of a flat identity without the `drop` keys (a key drops everything below it too)."""
    drop = tuple(drop)
    kept = {k: v for k, v in flat.items() if not any(k == d or k.startswith(d + ".") for d in drop)}
    return json.dumps(kept, sort_keys=True, default=str)


def config_key(run: Run) -> str:
    """Runs with equal keys are seeds of one configuration."""
    return _key(run.identity, ("seed",))


def regime_rank(regime: str) -> tuple[int, str]:
    return (REGIME_ORDER.index(regime), "") if regime in REGIME_ORDER else (len(REGIME_ORDER), regime)


def run_key(run: Run) -> tuple:
    return (run.experiment, run.dataset, run.batch, regime_rank(run.regime), run.seed, str(run.path))


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
            results = read_results(f)
        except ResultsError as e:  # a half-copied or foreign file must not stop the report
            print(f"lbtrain-report: skipping {e}", file=sys.stderr)
            continue
        if results is not None:
            runs.append(Run(f.parent, results))
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


def distance_fit(run: Run) -> dict[str, float | None]:
    """a, b, R^2 of ||w_t - w_0|| ~ a + b log t: the trainer's fit, else refit from the logged distances. None for a
    diverged run (its distances describe the blow-up, not the diffusion)."""
    if run.results.status == "diverged":
        return {"a": None, "b": None, "r2": None}
    fit = run.results.distance_fit or {}
    if fit.get("a") is not None and fit.get("b") is not None:
        return {"a": fit["a"], "b": fit["b"], "r2": fit.get("r2")}
    points = [(t, d) for t, d in run.scalars("weights/distance") if t >= 1]
    # Like the trainer: fit the first LR phase, where the random walk grows like log t (Hoffer et al. Fig. 2).
    lr_schedule = run.results.effective.get("lr_schedule") or []
    if len(lr_schedule) > 1:
        early = [(t, d) for t, d in points if t <= lr_schedule[1][0]]
        points = early if len(early) >= 3 else points
    return fit_log([t for t, _ in points], [d for _, d in points])


# ----------------------------------------------------------------------------------------------- tables
def _num(v: Any) -> str:
    """A number for people: 4 significant digits, no exponent for large values."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def mean_std(values: Sequence[float], digits: int | None = None) -> str:
    """"mean ± std" (sample std, ddof=1) or just the value for a single one."""
    fmt_ = (lambda v: f"{v:.{digits}f}") if digits is not None else _num
    mean = statistics.fmean(values)
    return fmt_(mean) if len(values) == 1 else f"{fmt_(mean)} ± {fmt_(statistics.stdev(values))}"


def _finished(runs: Sequence[Run]) -> list[Run]:
    return [r for r in runs if r.ok]


def accuracy_cell(runs: Sequence[Run], seeds: int = 0) -> str:
    """Validation accuracy (%) of the runs that finished their plan, "mean ± std" over seeds, with "(n=k)" when
    fewer than `seeds` finished; the other runs are named by status, never averaged."""
    runs = [r for r in runs if r.duplicate_of is None]
    if not runs:
        return "-"
    done = _finished(runs)
    others = Counter(r.status if r.status != "completed" else "no result" for r in runs if r not in done)
    if not done:
        return "/".join(sorted(others))  # e.g. "diverged"
    cell = mean_std([100.0 * (1.0 - float(r.results.final_val_error)) for r in done], digits=2)  # type: ignore[arg-type]
    if len(done) < seeds:
        cell += f" (n={len(done)})"
    if others:
        cell += " (" + ", ".join(f"{n} {s}" for s, n in sorted(others.items())) + ")"
    return cell


def _variant_columns(keys: Sequence[dict[str, Any]]) -> list[str]:
    """The flat identity keys whose values differ between rows (each row's dict of identity keys)."""
    names = sorted({k for d in keys for k in d})
    return [k for k in names if len({json.dumps(d.get(k), sort_keys=True, default=str) for d in keys}) > 1]


def shown(flat: dict[str, Any], key: str) -> str:
    """A variant column's cell: the identity's value, or the schema default that the canonical form left out
    ("-" only for a key this version does not know)."""
    defaults = schema_defaults()
    return fmt(flat[key]) if key in flat else (fmt(defaults[key]) if key in defaults else "-")


def _without(flat: dict[str, Any], drop: Iterable[str]) -> dict[str, Any]:
    drop = tuple(drop)
    return {k: v for k, v in flat.items() if not any(k == d or k.startswith(d + ".") for d in drop)}


def _regime_key(run: Run) -> str:
    """The regime's name, then its whole subtree: regimes that differ in any key are different columns."""
    sub = {k: v for k, v in run.identity.items() if k.startswith("regime.")}
    return run.regime + "\x00" + json.dumps(sub, sort_keys=True, default=str)


def _regime_labels(runs: Sequence[Run]) -> dict[str, str]:
    """Column label per distinct regime: the paper's label or the regime's name, plus the keys that tell apart
    different regimes that share a name."""
    by_name: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        sub = {k: v for k, v in r.identity.items() if k.startswith("regime.")}
        by_name.setdefault(r.regime, {})[_regime_key(r)] = sub
    labels = {}
    for name, variants in by_name.items():
        base = REGIME_LABELS.get(name, name)
        varying = _variant_columns(list(variants.values())) if len(variants) > 1 else []
        for key, sub in variants.items():
            extra = ",".join(f"{k}={fmt(sub.get(k))}" for k in varying)
            labels[key] = f"{base} ({extra})" if extra else base
    return labels


def table1(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Hoffer et al.'s Table 1: one row per configuration (everything but batch, regime and seed) and B_L,
    validation accuracy (%) per regime.

    "B_S baseline" is the small-batch run (batch == base.batch, regime baseline, else the first regime there).
    Regimes other than the paper's at B_S itself (e.g. Smith et al.'s batch increase) get a row with B_L == B_S;
    a configuration with small-batch runs only gets a row with the B_S cell alone. Columns after the dataset name
    every other key in which the rows differ, so unlike runs never share a cell.
    """
    runs = [r for r in sorted(runs, key=run_key) if r.duplicate_of is None]
    labels = _regime_labels(runs)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(_key(r.identity, ("seed", "batch", "regime")), []).append(r)
    specs = []  # (row identity, B_S, B_L, small-batch runs, {regime key: runs})
    for members in groups.values():
        bs = members[0].base_batch
        by_batch: dict[int, dict[str, list[Run]]] = {}
        for r in members:
            by_batch.setdefault(r.batch, {}).setdefault(_regime_key(r), []).append(r)
        small = by_batch.get(bs, {})
        sb_key = min(small, key=lambda k: (small[k][0].regime != "baseline", regime_rank(small[k][0].regime)),
                     default=None)
        rows = [(bl, by_batch[bl]) for bl in sorted(by_batch) if bl > bs]
        # Hoffer et al.'s regimes at r = 1 are the small-batch recipe itself: only other ones (e.g. Smith et al.'s
        # batch increase, which starts at B_S) get a row of their own at B_S.
        same = {curve_key(r) for r in small.get(sb_key, [])} if sb_key else set()
        extra = {k: rs for k, rs in small.items() if k != sb_key and rs[0].regime not in REGIME_LABELS
                 and {curve_key(r) for r in rs} != same}  # (e.g. linear at r = 1 trains B_S's recipe itself)
        if extra:
            rows.insert(0, (bs, extra))
        ident = _without(members[0].identity, ("seed", "batch", "regime", *_SHOWN))
        for bl, cells in rows or [("", {})]:
            specs.append((ident, members[0], bs, bl, small.get(sb_key, []) if sb_key else [], cells))
    variants = _variant_columns([s[0] for s in specs])
    seeds = max([len(_finished(rs)) for s in specs for rs in [s[4], *s[5].values()]] or [0])
    columns = sorted({k for s in specs for k in s[5]}, key=lambda k: (regime_rank(k.split("\x00")[0]), k))
    out = []
    for ident, first, bs, bl, small, cells in specs:
        row = {"experiment": first.experiment, "dataset": first.dataset,
               **{k: shown(ident, k) for k in variants},
               "B_S": bs, "B_L": bl, SB_COLUMN: accuracy_cell(small, seeds)}
        for k in columns:
            row[labels[k]] = accuracy_cell(cells[k], seeds) if k in cells else "-"
        out.append(row)
    return out


def long_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run (raw values), sorted by experiment, dataset, batch, regime (paper order), seed."""
    runs = sorted(runs, key=run_key)
    variants = _variant_columns([_without(r.identity, ("seed", "batch", "regime", *_SHOWN)) for r in runs])
    rows = []
    for r in runs:
        fit = distance_fit(r)
        values = {k: r.results.to_dict().get(k) for k in RUN_FIELDS}
        rows.append({"experiment": r.experiment, "dataset": r.dataset,
                     **{k: shown(r.identity, k) for k in variants},
                     "batch": r.batch, "regime": r.regime, "seed": r.seed, "status": r.status,
                     "identity": r.identity_hash, **values,
                     "fit_a": fit["a"], "fit_b": fit["b"], "fit_r2": fit["r2"], "run": str(r.path)})
    return rows


def aggregate_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per configuration: mean ± std over the seeds that finished their plan; the status column counts
    every run (duplicates excluded)."""
    runs = [r for r in sorted(runs, key=run_key) if r.duplicate_of is None]
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(config_key(r), []).append(r)
    idents = {k: _without(rs[0].identity, ("seed", "batch", "regime", *_SHOWN)) for k, rs in groups.items()}
    variants = _variant_columns(list(idents.values()))
    long = {str(row["run"]): row for row in long_table(runs)}
    out = []
    for key, members in groups.items():
        first = members[0]
        counts = Counter(r.status for r in members)
        done = [long[str(r.path)] for r in _finished(members)]
        agg = {"experiment": first.experiment, "dataset": first.dataset,
               **{k: shown(idents[key], k) for k in variants},
               "batch": first.batch, "regime": first.regime, "seeds": len(done),
               "status": ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), "identity": first.identity_hash[:8]}
        for k in NUMERIC_COLUMNS:
            values = [row[k] for row in done if row[k] is not None]
            agg[k] = mean_std(values) if values else None
        out.append(agg)
    return out


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub pipe table; the columns are the first row's keys."""
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    cell = lambda v: _num(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV with full-precision numbers; None is written as an empty field."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def write_tables(tables: dict[str, Sequence[dict[str, Any]]], out_dir: str | Path) -> list[Path]:
    """NAME.md and NAME.csv for each table, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in tables.items():
        for ext, text in (("md", to_markdown(rows)), ("csv", to_csv(rows))):
            path = out_dir / f"{name}.{ext}"
            atomic_write_bytes(path, text.encode())
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- figures
# name: (tag, x axis, log x, log y, y label, title)
FIGURES = {
    "distance": ("weights/distance", "updates", True, False, r"$\|w_t - w_0\|$",
                 "Distance from initialization (Hoffer et al. Fig. 2)"),
    "val_error_updates": ("val/error", "updates", True, False, "validation error", "Validation error"),
    "val_error_epochs": ("val/error", "epochs", True, False, "validation error", "Validation error"),
    "batch_schedule": ("opt/batch_size", "epochs", False, False, "batch size", "Batch size schedule"),
    "noise_scale": ("opt/noise_scale", "epochs", False, True, r"noise scale $g = \epsilon N / (B(1-m))$",
                    "SGD noise scale (Smith et al.)"),
}
X_LABELS = {"updates": "updates (optimizer steps), log scale", "epochs": "epochs"}
LINE_STYLES = ("-", "--", ":", "-.")


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


def curve_key(run: Run) -> str:
    """Runs with equal keys train the same thing step for step, whatever their regime is called (e.g. the four
    Table-1 regimes at r = 1: same LR, epochs and BatchNorm batch): their curves coincide by construction."""
    eff = run.results.effective
    plan = {k: eff.get(k) for k in ("lr_schedule", "batch_schedule", "updates", "warmup_updates", "epochs",
                                    "schedule", "momentum", "duplicates")}
    if eff.get("lr") is not None and eff.get("lr") == run.identity.get("base.lr", eff.get("lr")):
        plan.pop("warmup_updates")  # a warm-up from base.lr to base.lr changes nothing (e.g. linear at r = 1)
    return _key(run.identity, ("seed", "regime")) + json.dumps([plan, run.results.bn_batch], default=str)


def _groups(runs: Sequence[Run]) -> tuple[list[int], list[str | None], list[bool]]:
    """Per run: a colour group (one per batch x curve x status), its legend label on the group's first line only
    ("B=4096 adapt (3 seeds)", "B=16 baseline = sqrt_lr = gbn = adapt"), and whether to draw it at all (of runs
    whose curves coincide by construction, one per seed)."""
    names: dict[str, list[str]] = {}
    for r in runs:
        regimes = names.setdefault(curve_key(r), [])
        if r.regime not in regimes:
            regimes.append(r.regime)
    keys = [(r.batch, curve_key(r), r.status) for r in runs]
    order = list(dict.fromkeys(keys))
    drawn: set[tuple] = set()
    groups, labels, draw, seen = [], [], [], set()
    for r, k in zip(runs, keys):
        pair = (k, r.seed)
        draw.append(pair not in drawn)
        drawn.add(pair)
        seeds = len({rr.seed for rr, kk in zip(runs, keys) if kk == k})
        regimes = " = ".join(sorted(names[k[1]], key=regime_rank))
        label = f"B={r.batch} {regimes}" + (f" ({seeds} seeds)" if seeds > 1 else "")
        if r.status != "completed":
            label += f" ({r.status})"
        groups.append(order.index(k))
        labels.append(None if k in seen else label)
        seen.add(k)
    return groups, labels, draw


def _points(run: Run, tag: str, logx: bool, logy: bool) -> list[tuple[int, float]]:
    """The run's finite points of `tag` that a log axis can show; a diverged run's stop at its divergence."""
    stop = run.results.diverged_at
    return [(s, v) for s, v in run.scalars(tag) if math.isfinite(v) and (s > 0 or not logx)
            and (v > 0 or not logy) and (stop is None or s <= stop)]


def make_figure(runs: Sequence[Run], name: str, title_prefix: str = "") -> Figure:
    """The figure `name` (a key of FIGURES) with one line per run that logged its tag (runs whose curves coincide
    by construction drawn once). Diverged runs are drawn up to their divergence, marked with an x, and never set
    the axes' limits."""
    tag, x, logx, logy, ylabel, title = FIGURES[name]
    fig = Figure(figsize=(9.5, 4.8))
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    ax = fig.add_subplot()
    colors = colormaps["tab10"]
    runs = [r for r in runs if r.duplicate_of is None]
    sane: list[float] = []  # y values of runs that did not diverge: they set the y range
    for run, group, label, draw in zip(runs, *_groups(runs), strict=True):
        points = _points(run, tag, logx, logy)
        if not points or not draw:
            continue
        steps = np.array([s for s, _ in points], dtype=float)
        xs = epochs_at(run, steps) if x == "epochs" else steps
        if xs is None:
            continue
        ys = [v for _, v in points]
        if logx:
            keep = np.asarray(xs) > 0
            xs, ys = np.asarray(xs)[keep], list(np.asarray(ys)[keep])
            if not len(ys):
                continue
        diverged = run.results.status == "diverged"
        # past 10 groups the colours repeat, so the line style changes; opt/* values hold for the updates since
        # the previous log, hence steps-pre
        (line,) = ax.plot(xs, ys, label=label or "_nolegend_", color=colors(group % 10),
                          linestyle=LINE_STYLES[group // 10 % 4], alpha=0.85,
                          drawstyle="steps-pre" if tag.startswith("opt/") else "default")
        if diverged:
            ax.plot([xs[-1]], [ys[-1]], marker="x", markersize=9, color=line.get_color(), label="_nolegend_")
        else:
            sane += ys
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if sane:
        lo, hi = min(sane), max(sane)
        if logy:
            ax.set_ylim(lo / 1.3, hi * 1.3)
        else:
            pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
            ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(X_LABELS[x] if x != "epochs" or not logx else "epochs, log scale")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title_prefix}{title}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():  # outside the axes, so the legend never hides a curve
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def changes_batch(runs: Sequence[Run]) -> bool:
    """Whether some run grows its batch (Smith et al.), which is when the batch/noise figures matter."""
    return any(r.regime in BATCH_CHANGING or len(r.results.effective.get("batch_schedule") or []) > 1
               or len({b for _, b in r.scalars("opt/batch_size")}) > 1 for r in runs)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def write_figures(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """One PNG per figure (per experiment, prefixed by its name, when there are several); skips empty ones."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_experiment: dict[str, list[Run]] = {}
    for r in sorted(runs, key=run_key):
        by_experiment.setdefault(r.experiment, []).append(r)
    several = len(by_experiment) > 1
    written = []
    for experiment, exp_runs in by_experiment.items():
        names = ["distance", "val_error_updates", "val_error_epochs"]
        if changes_batch(exp_runs):
            names += ["batch_schedule", "noise_scale"]
        for name in names:
            fig = make_figure(exp_runs, name, title_prefix=f"{experiment}: ")
            if not fig.axes[0].get_lines():  # nothing logged, e.g. only failed runs
                continue
            path = out_dir / (f"{_safe_name(experiment)}_{name}.png" if several else f"{name}.png")
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=120)
            atomic_write_bytes(path, buf.getvalue())
            written.append(path)
    return written


# ------------------------------------------------------------------------------------------------- main
def summarize(paths: Iterable[str | Path], out_dir: str | Path, figures: bool = True,
              target_error: float | None = None) -> dict[str, Any]:
    """Find the runs, write tables (and figures) into `out_dir`; returns the tables and the written files. With
    `target_error`, or when runs measured the noise scale or sharpness, the scaling section too
    (lbtrain.scaling)."""
    from lbtrain import scaling  # (it builds on this module)

    paths = [Path(p) for p in paths]
    runs = find_runs(paths)
    if not runs:
        raise NoRunsError(f"no results.json found under {', '.join(map(str, paths))}")
    tables = {"table1": table1(runs), "runs": long_table(runs), "runs_mean": aggregate_table(runs)}
    files = write_tables(tables, out_dir)
    if figures:
        files += write_figures(runs, out_dir)
    more, extra = scaling.write_scaling(runs, Path(out_dir), target_error, figures)
    return {**tables, **more, "files": files + extra, "runs_found": runs}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbtrain-report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
                        help="run folders or folders holding them at any depth")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first dir>/report)")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    parser.add_argument("--target-error", type=float, default=None, metavar="E",
                        help="add steps to validation error <= E per configuration (Shallue et al. 2018), with "
                             "steps_to_target.md/.csv/.png and the fitted critical batch (knee.md/.csv)")
    args = parser.parse_args(argv)
    if args.target_error is not None and not 0 < args.target_error < 1:
        print(f"lbtrain-report: error: --target-error {args.target_error}: must be in (0, 1) (a validation error)",
              file=sys.stderr)
        return 2
    first = args.paths[0]
    out = args.out or ((first.parent if first.is_file() else first) / "report")
    if out.exists() and not out.is_dir():
        print(f"lbtrain-report: error: --out {out}: is a file; give a folder (it is created if missing)",
              file=sys.stderr)
        return 2
    try:
        summary = summarize(args.paths, out, figures=not args.no_figures, target_error=args.target_error)
    except NoRunsError as e:
        print(f"lbtrain-report: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"lbtrain-report: error: cannot write {e.filename or out}: {e.strerror}", file=sys.stderr)
        return 2
    print("Table 1: validation accuracy (%), mean ± std over seeds\n")
    print(to_markdown(summary["table1"]))
    print("Runs\n")
    print(to_markdown(summary["runs"]))
    if any(row["seeds"] > 1 for row in summary["runs_mean"]):
        print("Runs, mean ± std over seeds\n")
        print(to_markdown(summary["runs_mean"]))
    for name, title in (("steps_to_target", f"Steps to validation error <= {args.target_error}"),
                        ("knee", "Critical batch: S(B) = S_min (1 + B_crit / B) fitted to the steps to target"),
                        ("scaling", "Sharpness and noise scale at the end of training")):
        if summary.get(name):
            print(f"{title}\n")
            print(to_markdown(summary[name]))
    print("Wrote:")
    for path in summary["files"]:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
