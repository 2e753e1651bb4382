"""Analysis of finished runs: Hoffer et al.'s Table 1, a per-run table, and the curves behind them.

    lbtrain-report outputs/digits [MORE_DIRS ...] [--out DIR] [--no-figures]

Every run folder holds the trainer's results.json and its TensorBoard event files (step = optimizer
updates). This reads them back and writes, into the output folder:
- table1.md/csv: validation accuracy (%) per experiment and large batch B_L, columns in the paper's
  order (B_S baseline, LB, +LR, +GBN, +RA, then any other regime), "mean ± std" over seeds;
- runs.md/csv: one row per run; runs_mean.md/csv: the same, mean ± std over seeds;
- distance.png (Hoffer et al.'s Figure 2), val_error_updates.png, val_error_epochs.png and, when a batch
  changes during some run (Smith et al.), batch_schedule.png and noise_scale.png. With several
  experiments, each figure is written per experiment, prefixed by its name.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
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
from lbtrain.metrics import fit_log
from lbtrain.regime import KNOWN_TRAIN_SIZES

# Table 1's column order (Hoffer et al.), then Smith et al.'s and Goyal et al.'s regimes; unknown ones last.
REGIME_ORDER = ("baseline", "sqrt_lr", "gbn", "adapt", "batch_increase", "hybrid", "linear")
REGIME_LABELS = {"baseline": "LB", "sqrt_lr": "+LR", "gbn": "+GBN", "adapt": "+RA"}
SB_COLUMN = "B_S baseline"
BATCH_CHANGING = ("batch_increase", "hybrid")  # regimes whose batch grows during the run
RUN_FIELDS = ("final_val_error", "best_val_error", "updates", "epochs", "wall_time_s", "images_per_sec",
              "final_distance")
NUMERIC_COLUMNS = (*RUN_FIELDS, "fit_a", "fit_b", "fit_r2")


class NoRunsError(FileNotFoundError):
    """No results.json under the given paths."""


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class Run:
    """One run folder and its parsed results.json; TensorBoard scalars are read on first use."""

    path: Path
    results: dict[str, Any]
    _scalars: dict[str, list[tuple[int, float]]] | None = field(default=None, repr=False, compare=False)

    @property
    def experiment(self) -> str:
        return str(self.results.get("experiment") or self.path.parent.name)

    @property
    def batch(self) -> int:
        return int(self.results.get("batch") or 0)

    @property
    def base_batch(self) -> int:
        return int(self.results.get("base_batch") or self.batch)

    @property
    def regime(self) -> str:
        return str(self.results.get("regime") or "unknown")

    @property
    def seed(self) -> int:
        return int(self.results.get("seed") or 0)

    @property
    def status(self) -> str:
        return str(self.results.get("status") or "unknown")

    @property
    def ok(self) -> bool:
        """Completed with a validation error: the only runs that back a number in the tables."""
        return self.status == "completed" and self.results.get("final_val_error") is not None

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        if self._scalars is None:
            self._scalars = read_all_scalars(self.path)
        return self._scalars.get(tag, [])


def regime_rank(regime: str) -> tuple[int, str]:
    return (REGIME_ORDER.index(regime), "") if regime in REGIME_ORDER else (len(REGIME_ORDER), regime)


def run_key(run: Run) -> tuple:
    return (run.experiment, run.batch, regime_rank(run.regime), run.seed, str(run.path))


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every results.json under `paths` (run folders, sweep folders at any depth, or the files themselves)."""
    found: dict[Path, Path] = {}  # resolved -> as given, so overlapping paths list a run once
    for p in map(Path, paths):
        files = [p] if p.is_file() and p.name == "results.json" else sorted(p.rglob("results.json"))
        for f in files:
            found.setdefault(f.resolve(), f)
    runs = []
    for f in found.values():
        try:
            results = json.loads(f.read_text())
        except (OSError, ValueError) as e:  # a half-copied or foreign file must not stop the report
            print(f"lbtrain-report: skipping {f}: {e}", file=sys.stderr)
            continue
        if isinstance(results, dict):
            runs.append(Run(f.parent, results))
    return sorted(runs, key=run_key)


def read_all_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a run folder as {tag: [(step, value), ...]}, sorted by step."""
    if not Path(run_dir).is_dir():
        return {}
    # The real reader: it honours the purge events a resumed run writes over the steps it redoes.
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        points = {e.step: e.value for e in acc.Scalars(tag)}  # a step logged twice: the later write wins
        out[tag] = sorted(points.items())
    return out


def read_scalars(run_dir: str | Path, tag: str) -> list[tuple[int, float]]:
    """One scalar series of a run folder as [(step, value), ...]; [] when it was never logged."""
    return read_all_scalars(run_dir).get(tag, [])


def distance_fit(run: Run) -> dict[str, float | None]:
    """a, b, R^2 of ||w_t - w_0|| ~ a + b log t: the trainer's fit, else refit from the logged distances."""
    fit = run.results.get("distance_fit") or {}
    if fit.get("a") is not None and fit.get("b") is not None:
        return {"a": fit["a"], "b": fit["b"], "r2": fit.get("r2")}
    points = [(t, d) for t, d in run.scalars("weights/distance") if t >= 1]
    # Like the trainer: fit the first LR phase, where the random walk grows like log t (Hoffer et al. Fig. 2).
    lr_schedule = (run.results.get("effective") or {}).get("lr_schedule") or []
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
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def mean_std(values: Sequence[float], digits: int | None = None) -> str:
    """"mean ± std" (sample std, ddof=1) or just the value for a single one."""
    fmt = (lambda v: f"{v:.{digits}f}") if digits is not None else _num
    mean = statistics.fmean(values)
    return fmt(mean) if len(values) == 1 else f"{fmt(mean)} ± {fmt(statistics.stdev(values))}"


def accuracy_cell(runs: Sequence[Run]) -> str:
    """Validation accuracy (%) of the completed runs, "mean ± std" over seeds; else the runs' status."""
    if not runs:
        return "-"
    acc = [100.0 * (1.0 - r.results["final_val_error"]) for r in runs if r.ok]
    others = Counter(r.status if r.status != "completed" else "no result" for r in runs if not r.ok)
    if not acc:
        return "/".join(sorted(others))  # e.g. "diverged"
    cell = mean_std(acc, digits=2)
    if others:  # some seeds did not finish: say so rather than silently averaging fewer
        cell += " (" + ", ".join(f"{n} {s}" for s, n in sorted(others.items())) + ")"
    if len({_variant(r) for r in runs}) > 1:  # same batch and regime, but not only the seed differs
        cell += " (mixed configs)"
        print(f"warning: averaging runs that differ in more than the seed: {[str(r.path) for r in runs]}",
              file=sys.stderr)
    return cell


def _variant(run: Run) -> tuple:
    """What must agree for runs to be seeds of one configuration (beyond experiment, batch, regime)."""
    res = run.results
    return (res.get("ghost_batch"), res.get("bn_batch"), res.get("lr"), res.get("planned_updates"))


def table1(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Hoffer et al.'s Table 1: one row per (experiment, B_L), validation accuracy (%) per regime.

    "B_S baseline" is the small-batch run (batch == base_batch, regime baseline, else the first regime
    there). Regimes other than the paper's run at B_S itself (e.g. Smith et al.'s batch increase) get a
    row with B_L == B_S; an experiment with small-batch runs only gets a row with the B_S cell alone.
    """
    groups: dict[tuple[str, int], dict[int, dict[str, list[Run]]]] = {}
    for r in sorted(runs, key=run_key):
        by_batch = groups.setdefault((r.experiment, r.base_batch), {})
        by_batch.setdefault(r.batch, {}).setdefault(r.regime, []).append(r)
    rows, regimes = [], set()
    for (experiment, bs), by_batch in sorted(groups.items()):
        small = by_batch.get(bs, {})
        sb_regime = "baseline" if "baseline" in small else min(small, key=regime_rank, default=None)
        specs = [(bl, by_batch[bl]) for bl in sorted(by_batch) if bl > bs]
        # Hoffer et al.'s regimes at r = 1 are the small-batch recipe itself: only other ones (e.g. Smith
        # et al.'s batch increase, which starts at B_S) get a row of their own at B_S.
        extra = {g: rs for g, rs in small.items() if g != sb_regime and g not in REGIME_LABELS}
        if extra:
            specs.insert(0, (bs, extra))
        for bl, cells in specs or [("", {})]:
            regimes.update(cells)
            rows.append({"experiment": experiment, "B_S": bs, "B_L": bl,
                         SB_COLUMN: accuracy_cell(small.get(sb_regime, [])),
                         **{g: accuracy_cell(rs) for g, rs in cells.items()}})
    # Every row gets every regime column seen anywhere, in the paper's order.
    order = sorted(regimes, key=regime_rank)
    return [{"experiment": r["experiment"], "B_S": r["B_S"], "B_L": r["B_L"], SB_COLUMN: r[SB_COLUMN],
             **{REGIME_LABELS.get(g, g): r.get(g, "-") for g in order}} for r in rows]


def long_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run (raw values), sorted by experiment, batch, regime (paper order), seed."""
    rows = []
    for r in sorted(runs, key=run_key):
        fit = distance_fit(r)
        rows.append({"experiment": r.experiment, "batch": r.batch, "regime": r.regime, "seed": r.seed,
                     "status": r.status, **{k: r.results.get(k) for k in RUN_FIELDS},
                     "fit_a": fit["a"], "fit_b": fit["b"], "fit_r2": fit["r2"], "run": str(r.path)})
    return rows


def aggregate_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """long_table averaged over seeds: "mean ± std" of the completed runs (of all, when none completed)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in long_table(runs):
        groups.setdefault((row["experiment"], row["batch"], row["regime"]), []).append(row)
    out = []
    for (experiment, batch, regime), rows in groups.items():
        counts = Counter(r["status"] for r in rows)
        done = [r for r in rows if r["status"] == "completed"] or rows
        agg = {"experiment": experiment, "batch": batch, "regime": regime, "seeds": len(rows),
               "status": ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))}
        for k in NUMERIC_COLUMNS:
            values = [r[k] for r in done if r[k] is not None]
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
    "val_error_updates": ("val/error", "updates", False, False, "validation error", "Validation error"),
    "val_error_epochs": ("val/error", "epochs", False, False, "validation error", "Validation error"),
    "batch_schedule": ("opt/batch_size", "epochs", False, False, "batch size", "Batch size schedule"),
    "noise_scale": ("opt/noise_scale", "epochs", False, True, r"noise scale $g = \epsilon N / (B(1-m))$",
                    "SGD noise scale (Smith et al.)"),
}
X_LABELS = {"updates": "updates (optimizer steps)", "epochs": "epochs"}
LINE_STYLES = ("-", "--", ":", "-.")


def epoch_plan(run: Run) -> tuple[list[int], list[int]] | None:
    """First update and (full) number of updates of each epoch of the run, as the trainer planned them.

    regime.py gives epoch e `train_size // batch_e` updates, the batches coming from results'
    effective["batch_schedule"]. results.json does not hold train_size, so it is taken as the dataset's
    known size when that reproduces the planned number of updates, else solved for: the smallest N whose
    plan has effective["updates"] updates over effective["epochs"] epochs. That N gives the run's own
    epochs whenever each batch of the schedule fills a whole epoch. None without an effective schedule.
    """
    eff = run.results.get("effective") or {}
    schedule, epochs, total = eff.get("batch_schedule"), eff.get("epochs"), eff.get("updates")
    if not schedule or not epochs or not total:
        return None
    n_epochs = max(math.ceil(epochs - 1e-9), 1)
    changes = {int(e): int(b) for e, b in schedule}
    batches, b = [], int(schedule[0][1])
    for i in range(n_epochs):
        b = changes.get(i, b)
        batches.append(b)

    def plan(n: int) -> tuple[list[int], list[int], int]:  # regime.make_plan's rounding rules
        sizes = [n // b for b in batches]
        starts = list(itertools.accumulate([0] + sizes[:-1]))
        i = min(math.floor(epochs + 1e-9), n_epochs)
        last = starts[-1] + sizes[-1] if i >= n_epochs else starts[i] + round((epochs - i) * sizes[i])
        return starts, sizes, last

    known = KNOWN_TRAIN_SIZES.get(str(run.results.get("dataset")))
    if known and plan(known)[2] == total:
        n = known
    else:  # the planned length grows with N: bisect for the smallest N that gives it
        lo, hi = 1, max(batches)
        while plan(hi)[2] < total and hi < 2**40:
            hi *= 2
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if plan(mid)[2] >= total else (mid + 1, hi)
        n = lo
    starts, sizes, last = plan(n)
    return (starts, sizes) if last == total and min(sizes) > 0 else None


def epochs_at(run: Run, steps: Sequence[float]) -> np.ndarray | None:
    """Epochs done after each of `steps` updates (a fraction within an epoch); None when unknown.

    Exact from the run's epoch plan (see epoch_plan), whose epochs may hold different batches (Smith et
    al.). Without a usable effective schedule the batch is taken as constant: step * epochs / updates.
    """
    steps = np.asarray(steps, dtype=float)
    plan = epoch_plan(run)
    if plan is not None:
        starts, sizes = np.asarray(plan[0]), np.asarray(plan[1])
        i = np.clip(np.searchsorted(starts, steps, side="right") - 1, 0, len(starts) - 1)
        return i + (steps - starts[i]) / sizes[i]
    updates, epochs = run.results.get("updates"), run.results.get("epochs")
    return steps * epochs / updates if updates and epochs else None


def _groups(runs: Sequence[Run]) -> tuple[list[int], list[str | None]]:
    """Per run: a group index (one colour per batch x regime x status) and its legend label, given only on
    the group's first line ("B=4096 adapt (3 seeds)", "B=512 gbn (diverged)") so seeds share one entry."""
    keys = [(r.batch, r.regime, r.status) for r in runs]
    order = list(dict.fromkeys(keys))
    counts = {k: keys.count(k) for k in order}
    groups, labels, seen = [], [], set()
    for k in keys:
        batch, regime, status = k
        label = f"B={batch} {regime}" + (f" ({counts[k]} seeds)" if counts[k] > 1 else "")
        if status != "completed":
            label += f" ({status})"
        groups.append(order.index(k))
        labels.append(None if k in seen else label)
        seen.add(k)
    return groups, labels


def make_figure(runs: Sequence[Run], name: str, title_prefix: str = "") -> Figure:
    """The figure `name` (a key of FIGURES) with one line per run that logged its tag."""
    tag, x, logx, logy, ylabel, title = FIGURES[name]
    fig = Figure(figsize=(9, 4.8))
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    ax = fig.add_subplot()
    colors = colormaps["tab10"]
    for run, group, label in zip(runs, *_groups(runs), strict=True):
        # log axes have no place for step 0 (or a zero value)
        points = [(s, v) for s, v in run.scalars(tag) if (s > 0 or not logx) and (v > 0 or not logy)]
        if not points:
            continue
        steps = np.array([s for s, _ in points], dtype=float)
        xs = epochs_at(run, steps) if x == "epochs" else steps
        if xs is None:
            continue
        # past 10 groups the colours repeat, so the line style changes; opt/* values hold for the updates
        # since the previous log, hence steps-pre
        ax.plot(xs, [v for _, v in points], label=label or "_nolegend_", color=colors(group % 10),
                linestyle=LINE_STYLES[group // 10 % 4], alpha=0.85,
                drawstyle="steps-pre" if tag.startswith("opt/") else "default")
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title_prefix}{title}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():  # outside the axes, so many runs never hide the curves
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def changes_batch(runs: Sequence[Run]) -> bool:
    """Whether some run grows its batch (Smith et al.), which is when the batch/noise figures matter."""
    return any(r.regime in BATCH_CHANGING
               or len((r.results.get("effective") or {}).get("batch_schedule") or []) > 1
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
def summarize(paths: Iterable[str | Path], out_dir: str | Path, figures: bool = True) -> dict[str, Any]:
    """Find the runs, write tables (and figures) into `out_dir`; returns the tables and the written files."""
    paths = [Path(p) for p in paths]
    runs = find_runs(paths)
    if not runs:
        raise NoRunsError(f"no results.json found under {', '.join(map(str, paths))}")
    tables = {"table1": table1(runs), "runs": long_table(runs), "runs_mean": aggregate_table(runs)}
    files = write_tables(tables, out_dir)
    if figures:
        files += write_figures(runs, out_dir)
    return {**tables, "files": files}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbtrain-report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
                        help="run folders or folders holding them at any depth")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first dir>/report)")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    args = parser.parse_args(argv)
    first = args.paths[0]
    out = args.out or ((first.parent if first.is_file() else first) / "report")
    try:
        summary = summarize(args.paths, out, figures=not args.no_figures)
    except NoRunsError as e:
        print(f"lbtrain-report: {e}", file=sys.stderr)
        return 1
    print("Table 1: validation accuracy (%), mean ± std over seeds\n")
    print(to_markdown(summary["table1"]))
    print("Runs\n")
    print(to_markdown(summary["runs"]))
    if any(row["seeds"] > 1 for row in summary["runs_mean"]):
        print("Runs, mean ± std over seeds\n")
        print(to_markdown(summary["runs_mean"]))
    print("Wrote:")
    for path in summary["files"]:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
