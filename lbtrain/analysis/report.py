"""Analysis of finished runs: Hoffer et al.'s Table 1, a per-run table, and the curves behind them.

    lbtrain-report outputs/digits [MORE_DIRS ...] [--out DIR] [--no-figures]

Every run folder holds the trainer's results.json and its TensorBoard event files (step = optimizer updates).
This reads them back (lbtrain.analysis.runs) and writes, into the output folder:
- table1.md/csv: validation accuracy (%) per experiment and large batch B_L, columns in the paper's order
  (B_S baseline, LB, +LR, +GBN, +RA, then any other regime: each regime preset's `label:` and `rank:`, see
  lbtrain.analysis.regimes), "mean ± std" over seeds; under the table in table1.md, every run that has no cell
  of its own (a copy, a batch below B_S, a B_S run that trains the baseline's recipe), with the reason;
- runs.md/csv: one row per run; runs_mean.md/csv: one row per configuration, mean ± std over its seeds (the
  identity's `epochs` is the plan's, where runs differ in it; `epochs_done` is what the run trained);
- distance.png (Hoffer et al.'s Figure 2), val_error_updates.png, val_error_epochs.png and, when a batch
  changes during some run (Smith et al.), batch_schedule.png and noise_scale.png. With several experiments,
  each figure is written per experiment, prefixed by its name. Seeds of one configuration are drawn as their
  mean with a min-max band.
- edge_of_stability.png, when runs measured sharpness trajectories (`sharpness.every_steps` / `per_decade`):
  lambda_max and batch sharpness against updates beside 2/lr and 2(1+m)/lr, one panel per run
  (lbtrain.analysis.eos).
- measurements.md/csv, when `lbtrain-measure` measured runs after the fact (RUN/measure/measurements.json): one
  row per run, instrument, update and scalar (e.g. sharpness/lambda_max at a kept checkpoint).
- local_critical_batch.md/csv/png and branch_losses.md/csv, when some runs are branches (`branch.parent=RUN`,
  lbtrain.branch): the local critical batch at each branch point with its interval over seeds, beside the parent's
  B_simple (lbtrain.analysis.branching, `--branch-epsilon`). Branches enter no other table or figure.

Every number says which configuration it came from: runs are grouped by their identity (lbtrain.identity) minus
the seed, so runs that differ in anything but the seed never share a cell; a table carries the dataset and every
other key in which its rows differ (a regime's options too, where runs of one regime differ in them), and a
figure's labels do the same. A (configuration, seed) pair counts once (other copies are listed as duplicates).
Only runs that finished their plan enter a mean; runs stopped early (max_steps), interrupted, failed or diverged
are listed with their status, never averaged; a cell says n when it has fewer seeds than others. A folder that
is missing or holds no results.json is an error: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lbtrain.analysis import branching, critical, eos, regimes, scaling
from lbtrain.analysis.figures import (
    color,
    differences,
    distinct_labels,
    finish,
    label_keys,
    line_style,
    log_axes,
    new_figure,
    save_png,
)
from lbtrain.analysis.runs import (
    SHOWN,
    Run,
    config_key,
    epochs_at,
    find_runs,
    identity_key,
    mean_std,
    number,
    run_key,
    shown,
    variant_columns,
    variant_keys,
    without,
)
from lbtrain.analysis.tables import to_markdown, write_tables
from lbtrain.config import schema_defaults
from lbtrain.identity import fmt
from lbtrain.metrics import fit_log

SB_COLUMN = "B_S baseline"
BATCH_CHANGING = ("batch_increase", "hybrid")  # regimes whose batch grows during the run
RUN_FIELDS = ("final_val_error", "best_val_error", "updates", "epochs", "wall_time_s", "images_per_sec",
              "final_distance")
# results.json's `epochs` is the epochs done (a diverged run's 0.08): its column must not take the name of the
# identity's `epochs` (the plan's), which is a variant column where runs differ in it
RUN_COLUMNS = {"epochs": "epochs_done"}
NUMERIC_COLUMNS = (*(RUN_COLUMNS.get(k, k) for k in RUN_FIELDS), "fit_a", "fit_b", "fit_r2")
OMITTED_TITLE = "Not in Table 1 (runs without a cell of their own, and why)"


class NoRunsError(FileNotFoundError):
    """No results.json under the given paths."""


# ---------------------------------------------------------------------------------------------- reading
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
        base = regimes.label(name)
        varying = variant_columns(list(variants.values())) if len(variants) > 1 else []
        for key, sub in variants.items():
            extra = ",".join(f"{k}={fmt(sub.get(k))}" for k in varying)
            labels[key] = f"{base} ({extra})" if extra else base
    return labels


def table1(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Hoffer et al.'s Table 1: one row per configuration (everything but batch, regime and seed) and B_L,
    validation accuracy (%) per regime.

    "B_S baseline" is the small-batch run (batch == base.batch, regime baseline, else the first regime there).
    Other runs at B_S itself that train something else (e.g. Smith et al.'s batch increase, which starts at B_S, or
    a regime option such as a warm-up) get a row with B_L == B_S; a configuration with small-batch runs only gets a
    row with the B_S cell alone. Columns after the dataset name every other key in which the rows differ, so
    unlike runs never share a cell. Runs without a cell of their own are listed by `table1_omitted`.
    """
    return _table1(runs)[0]


def table1_omitted(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The runs that have no cell of their own in Table 1, each with the reason: copies of a (configuration,
    seed) pair, batches below the recipe's B_S, and runs at B_S that train the B_S baseline's recipe step for
    step under another regime's name (Hoffer et al.'s regimes at r = 1)."""
    return _table1(runs)[1]


def _table1(runs: Sequence[Run]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    everything = sorted(runs, key=run_key)
    omitted = [(r, f"duplicate of {r.duplicate_of}") for r in everything if r.duplicate_of is not None]
    runs = [r for r in everything if r.duplicate_of is None]
    labels = _regime_labels(runs)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(identity_key(r.identity, ("seed", "batch", "regime")), []).append(r)
    specs = []  # (row identity, B_S, B_L, small-batch runs, {regime key: runs})
    for members in groups.values():
        bs = members[0].base_batch
        by_batch: dict[int, dict[str, list[Run]]] = {}
        for r in members:
            by_batch.setdefault(r.batch, {}).setdefault(_regime_key(r), []).append(r)
        omitted += [(r, f"batch {r.batch} is below the recipe's B_S = {bs} (Table 1 compares B_L > B_S with B_S)")
                    for r in members if r.batch < bs]
        small = by_batch.get(bs, {})
        sb_key = min(small, key=lambda k: (small[k][0].regime != "baseline", regimes.rank(small[k][0].regime)),
                     default=None)
        rows = [(bl, by_batch[bl]) for bl in sorted(by_batch) if bl > bs]
        # Hoffer et al.'s regimes at r = 1 are the small-batch recipe itself (same curves, whatever the name): only
        # runs that train something else (e.g. Smith et al.'s batch increase, which starts at B_S, or a regime
        # option such as a warm-up) get a row of their own at B_S.
        same = {curve_key(r) for r in small.get(sb_key, [])} if sb_key else set()
        extra = {k: rs for k, rs in small.items() if k != sb_key and {curve_key(r) for r in rs} != same}
        sb_regime = small[sb_key][0].regime if sb_key else ""
        omitted += [(r, f"at B_S it trains the B_S baseline's recipe ({sb_regime}) step for step; that cell holds "
                        f"the {sb_regime} runs only") for k, rs in small.items() if k != sb_key and k not in extra
                    for r in rs]
        if extra:
            rows.insert(0, (bs, extra))
        ident = without(members[0].identity, ("seed", "batch", "regime", *SHOWN))
        for bl, cells in rows or [("", {})]:
            specs.append((ident, members[0], bs, bl, small.get(sb_key, []) if sb_key else [], cells))
    variants = variant_columns([s[0] for s in specs])
    seeds = max([len(_finished(rs)) for s in specs for rs in [s[4], *s[5].values()]] or [0])
    columns = sorted({k for s in specs for k in s[5]}, key=lambda k: (regimes.rank(k.split("\x00")[0]), k))
    out = []
    for ident, first, bs, bl, small, cells in specs:
        row = {"experiment": first.experiment, "dataset": first.dataset,
               **{k: shown(ident, k) for k in variants},
               "B_S": bs, "B_L": bl, SB_COLUMN: accuracy_cell(small, seeds)}
        for k in columns:
            row[labels[k]] = accuracy_cell(cells[k], seeds) if k in cells else "-"
        out.append(row)
    notes = [{"experiment": r.experiment, "dataset": r.dataset, "batch": r.batch, "regime": r.regime,
              "seed": r.seed, "status": r.status, "reason": why, "run": str(r.path)}
             for r, why in sorted(omitted, key=lambda p: run_key(p[0]))]
    return out, notes


def long_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run (raw values), sorted by experiment, dataset, batch, regime (paper order), seed."""
    runs = sorted(runs, key=run_key)
    variants = variant_keys([r.identity for r in runs])
    rows = []
    for r in runs:
        fit = distance_fit(r)
        values = {RUN_COLUMNS.get(k, k): r.results.to_dict().get(k) for k in RUN_FIELDS}
        rows.append({"experiment": r.experiment, "dataset": r.dataset,
                     **{k: shown(r.identity, k) for k in variants},
                     "batch": r.batch, "regime": r.regime, "seed": r.seed, "status": r.status,
                     "identity": r.identity_hash, **values,
                     "fit_a": fit["a"], "fit_b": fit["b"], "fit_r2": fit["r2"], "run": str(r.path)})
    return rows


def measurement_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """What `lbtrain-measure` measured on the runs' checkpoints after the fact: one row per run, instrument,
    definition (its hash) and update, its TensorBoard scalars in one column (sorted like the runs, then by
    instrument and update); [] when nothing was. Every value: `Run.measurements` / `Run.measured(tag)`."""
    rows = []
    for r in sorted(runs, key=run_key):
        points = sorted(r.measurements, key=lambda p: (str(p["instrument"]), str(p.get("definition_hash")),
                                                       int(p["update"])))
        for p in points:
            values = ", ".join(f"{tag.split('/', 1)[-1]} {number(v)}"
                               for tag, v in sorted((p.get("scalars") or {}).items()))
            rows.append({"experiment": r.experiment, "dataset": r.dataset, "batch": r.batch, "regime": r.regime,
                         "seed": r.seed, "instrument": p["instrument"],
                         "definition": str(p.get("definition_hash") or "")[:8], "update": int(p["update"]),
                         "values": values, "checkpoint": (p.get("checkpoint") or {}).get("file"),
                         "run": str(r.path)})
    return rows


def aggregate_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per configuration: mean ± std over the seeds that finished their plan; the status column counts
    every run (duplicates excluded)."""
    runs = [r for r in sorted(runs, key=run_key) if r.duplicate_of is None]
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(config_key(r), []).append(r)
    variants = variant_keys([rs[0].identity for rs in groups.values()])
    long = {str(row["run"]): row for row in long_table(runs)}
    out = []
    for members in groups.values():
        first = members[0]
        counts = Counter(r.status for r in members)
        done = [long[str(r.path)] for r in _finished(members)]
        agg = {"experiment": first.experiment, "dataset": first.dataset,
               **{k: shown(first.identity, k) for k in variants},
               "batch": first.batch, "regime": first.regime, "seeds": len(done),
               "status": ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), "identity": first.identity_hash[:8]}
        for k in NUMERIC_COLUMNS:
            values = [row[k] for row in done if row[k] is not None]
            agg[k] = mean_std(values) if values else None
        out.append(agg)
    return out


# ---------------------------------------------------------------------------------------------- figures
# name: (tag, x axis, log x, log y, y label, title)
FIGURES = {
    "distance": ("weights/distance", "updates", True, False, r"$\|w_t - w_0\|$",
                 "Distance from initialization (Hoffer et al. Fig. 2)"),
    "val_error_updates": ("val/error", "updates", True, True, "validation error, log scale", "Validation error"),
    "val_error_epochs": ("val/error", "epochs", True, False, "validation error", "Validation error"),
    "batch_schedule": ("opt/batch_size", "epochs", False, False, "batch size", "Batch size schedule"),
    "noise_scale": ("opt/noise_scale", "epochs", False, True, r"noise scale $g = \epsilon N / (B(1-m))$",
                    "SGD noise scale (Smith et al.)"),
}
X_LABELS = {"updates": "updates (optimizer steps), log scale", "epochs": "epochs"}


def curve_key(run: Run) -> str:
    """Runs with equal keys train the same thing step for step, whatever their regime is called (e.g. the four
    Table-1 regimes at r = 1: same LR, epochs and BatchNorm batch): their curves coincide by construction."""
    eff = run.results.effective
    plan = {k: eff.get(k) for k in ("lr_schedule", "batch_schedule", "updates", "warmup_updates", "epochs",
                                    "schedule", "momentum", "duplicates")}
    # (the canonical identity leaves base.lr out at the schema default: that default is then the base LR)
    base_lr = run.identity.get("base.lr", schema_defaults().get("base.lr"))
    if eff.get("lr") is not None and eff.get("lr") == base_lr:
        plan.pop("warmup_updates")  # a warm-up from base.lr to base.lr changes nothing (e.g. linear at r = 1)
    return identity_key(run.identity, ("seed", "regime")) + json.dumps([plan, run.results.bn_batch], default=str)


@dataclass
class CurveGroup:
    """Runs drawn as one curve: one batch, one training (curve_key), one status; one run per seed."""

    index: int  # its colour and line style
    label: str
    status: str
    runs: list[Run]


def curve_groups(runs: Sequence[Run]) -> list[CurveGroup]:
    """The figure's curves: runs grouped by batch x curve x status, one run per seed (of runs whose curves
    coincide by construction, the first), each group labelled "B=4096 adapt (3 seeds)" or
    "B=16 baseline = sqrt_lr = gbn = adapt", plus every identity key in which the groups differ (as the tables'
    variant columns: "B=64 baseline (epochs=2.0)"). No two groups that train different things share a label."""
    names: dict[str, list[str]] = {}
    for r in runs:
        same = names.setdefault(curve_key(r), [])
        if r.regime not in same:
            same.append(r.regime)
    by_key: dict[tuple, list[Run]] = {}
    for r in runs:
        by_key.setdefault((r.batch, curve_key(r), r.status), []).append(r)
    keys = label_keys([rs[0].identity for rs in by_key.values()])
    labels: list[str | None] = []
    for (batch, curve, status), rs in by_key.items():
        seeds = len({r.seed for r in rs})
        alike = " = ".join(sorted(names[curve], key=regimes.rank))
        label = f"B={batch} {alike}{differences(rs[0].identity, keys)}" + (f" ({seeds} seeds)" if seeds > 1 else "")
        labels.append(label + (f" ({status})" if status != "completed" else ""))
    # (a safety net: groups whose identities differ only where the keys print alike still get distinct labels)
    labels = distinct_labels(labels, [without(rs[0].identity, ("seed",)) for rs in by_key.values()])
    out = []
    for i, ((_, _, status), rs) in enumerate(by_key.items()):
        first_of_seed: dict[int, Run] = {}
        for r in rs:
            first_of_seed.setdefault(r.seed, r)
        out.append(CurveGroup(i, str(labels[i]), status, list(first_of_seed.values())))
    return out


def _points(run: Run, tag: str, logx: bool, logy: bool) -> list[tuple[int, float]]:
    """The run's finite points of `tag` that a log axis can show; a diverged run's stop at its divergence."""
    stop = run.results.diverged_at
    return [(s, v) for s, v in run.scalars(tag) if math.isfinite(v) and (s > 0 or not logx)
            and (v > 0 or not logy) and (stop is None or s <= stop)]


def _curve(run: Run, tag: str, x: str, logx: bool, logy: bool) -> dict[int, tuple[float, float]] | None:
    """{step: (x, y)} of the run's points that the axes can show; None when there are none (or no epochs)."""
    points = _points(run, tag, logx, logy)
    if not points:
        return None
    steps = np.array([s for s, _ in points], dtype=float)
    xs = epochs_at(run, steps) if x == "epochs" else steps
    if xs is None:
        return None
    curve = {s: (float(cx), v) for (s, v), cx in zip(points, xs) if cx > 0 or not logx}
    return curve or None


def make_figure(runs: Sequence[Run], name: str, title_prefix: str = "") -> Figure:
    """The figure `name` (a key of FIGURES): one curve per group of runs (`curve_groups`) that logged its tag.
    Seeds of one configuration are drawn as their mean, with a band from their minimum to their maximum, at the
    steps that all of them logged. Diverged runs are drawn one by one up to their divergence, marked with an x,
    and never set the axes' limits."""
    tag, x, logx, logy, ylabel, title = FIGURES[name]
    fig, ax = new_figure()
    runs = [r for r in runs if r.duplicate_of is None]
    sane: list[float] = []  # y values of runs that did not diverge: they set the y range
    # opt/* values hold for the updates since the previous log, hence steps
    steps_style = {"drawstyle": "steps-pre"} if tag.startswith("opt/") else {}
    for group in curve_groups(runs):
        curves = [(run, c) for run in group.runs if (c := _curve(run, tag, x, logx, logy)) is not None]
        style = {"color": color(group.index), "linestyle": line_style(group.index), "alpha": 0.85, **steps_style}
        common = sorted(set.intersection(*(set(c) for _, c in curves))) if len(curves) > 1 else []
        if common and group.status != "diverged":
            xs = np.array([curves[0][1][s][0] for s in common])
            ys = np.array([[c[s][1] for s in common] for _, c in curves])
            ax.plot(xs, ys.mean(axis=0), label=group.label, **style)
            ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=style["color"], alpha=0.2, linewidth=0,
                            step="pre" if steps_style else None, label="_nolegend_")
            sane += [float(ys.min()), float(ys.max())]
            continue
        for k, (run, c) in enumerate(curves):  # one run, diverged runs, or seeds that share no step
            xs, ys = [p[0] for p in c.values()], [p[1] for p in c.values()]
            (line,) = ax.plot(xs, ys, label=group.label if k == 0 else "_nolegend_", **style)
            if run.results.status == "diverged":
                ax.plot([xs[-1]], [ys[-1]], marker="x", markersize=9, color=line.get_color(), label="_nolegend_")
            else:
                sane += ys
    log_axes(ax, x=logx, y=logy)
    if sane:
        lo, hi = min(sane), max(sane)
        if logy:
            ax.set_ylim(lo / 1.3, hi * 1.3)
        else:
            pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
            ax.set_ylim(lo - pad, hi + pad)
    return finish(fig, ax, X_LABELS[x] if x != "epochs" or not logx else "epochs, log scale", ylabel,
                  f"{title_prefix}{title}")


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
            written.append(save_png(fig, path))
    return written


# ------------------------------------------------------------------------------------------------- main
def parse_where(texts: Iterable[str]) -> dict[str, list[str]]:
    """`KEY=V1,V2` filters (`--where`) as {flat identity key: accepted values as text}; ValueError when malformed."""
    out: dict[str, list[str]] = {}
    for text in texts:
        key, sep, values = text.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--where {text}: expected KEY=VALUE[,VALUE...], e.g. batch=16,512 or regime.name=gbn")
        out.setdefault(key, []).extend(v.strip() for v in values.split(","))
    return out


def matches(run: Run, where: dict[str, list[str]]) -> bool:
    """Whether a run's identity has, for every key of `where`, one of its values (a key at its schema default
    compares as that default: `--where epochs=null` finds runs that kept the recipe's length)."""
    defaults = schema_defaults()
    for key, values in where.items():
        value = run.identity.get(key, defaults.get(key))
        if fmt(value) not in values and str(value) not in values:
            return False
    return True


def summarize(paths: Iterable[str | Path], out_dir: str | Path, figures: bool = True,
              target_error: float | None = None, where: dict[str, list[str]] | None = None,
              critical_batch: bool | None = None, overhead: float = critical.OVERHEAD,
              branch_epsilon: float = branching.EPSILON) -> dict[str, Any]:
    """Find the runs (those matching `where`, when given), write tables (and figures) into `out_dir`; returns the
    tables and the written files. With `target_error`, or when runs measured the noise scale or sharpness, the
    scaling section too (lbtrain.analysis.scaling); with `critical_batch` (None: when some run carries a target
    block, as a search's runs do), the critical-batch section (lbtrain.analysis.critical, `overhead` for Zhang et
    al.'s criterion). Branches (lbtrain.branch) have a section of their own, the local critical batch
    (lbtrain.analysis.branching, `branch_epsilon` its tolerance), and no place in the other tables."""
    paths = [Path(p) for p in paths]
    runs = find_runs(paths)
    if not runs:
        raise NoRunsError(f"no results.json found under {', '.join(map(str, paths))}")
    if where:
        runs = [r for r in runs if matches(r, where)]
        if not runs:
            shown = " ".join(f"{k}={','.join(v)}" for k, v in where.items())
            raise NoRunsError(f"no run under {', '.join(map(str, paths))} matches --where {shown}")
    runs, branches = branching.split(runs)
    rows, omitted = _table1(runs)
    tables = {"table1": rows, "runs": long_table(runs), "runs_mean": aggregate_table(runs)}
    measured = measurement_rows(runs)
    if measured:  # lbtrain-measure's points on the runs' checkpoints
        tables["measurements"] = measured
    files = write_tables(tables, out_dir, notes={"table1": omitted_note(omitted)} if omitted else None)
    if figures:
        files += write_figures(runs, out_dir)
        files += eos.write_eos(runs, out_dir)  # runs that measured sharpness trajectories (lbtrain.analysis.eos)
    more, extra = scaling.write_scaling(runs, Path(out_dir), target_error, figures)
    if critical_batch or (critical_batch is None and critical.has_targets(runs)):
        crit, crit_files, studies = critical.write_critical(runs, out_dir, overhead, figures)
        more = {**more, **crit, "critical_studies": studies, "critical_section": critical.section(crit, studies)}
        extra += crit_files
    if branches:
        found, b_files, b_studies = branching.write_branching(branches, out_dir, branch_epsilon, figures, runs)
        more = {**more, **found, "branching_section": branching.section(found, b_studies, branch_epsilon)}
        extra += b_files
    return {**tables, **more, "table1_omitted": omitted, "files": files + extra, "runs_found": runs + branches}


def omitted_note(omitted: Sequence[dict[str, Any]]) -> str:
    """The Markdown written under Table 1 for the runs it has no cell for (`table1_omitted`)."""
    return f"{OMITTED_TITLE}:\n\n{to_markdown(omitted)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbtrain-report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
                        help="run folders or folders holding them at any depth")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first dir>/report)")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    parser.add_argument("--target-error", type=float, default=None, metavar="E",
                        help="add steps to validation error <= E per configuration (Shallue et al. 2018), with "
                             "steps_to_target.md/.csv/.png and the fitted critical batch (knee.md/.csv)")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=V1,V2",
                        help="only runs whose identity key (flat, as in results.json's identity: batch, seed, "
                             "regime.name, base.lr, ...) has one of the values; repeat for several keys")
    parser.add_argument("--critical-batch", action="store_true", default=None,
                        help="add the critical batch of a per-batch-size search (runs with target blocks; on by "
                             "itself when some run has one): critical_batch.md/.csv/.png, critical_batch_fit.md/.csv, "
                             "tradeoff.png")
    parser.add_argument("--overhead", type=float, default=critical.OVERHEAD, metavar="X",
                        help="Zhang et al.'s critical batch: the largest batch whose steps to the target are at most "
                             "(1 + X) times perfect scaling from the smallest batch (default 0.2)")
    parser.add_argument("--branch-epsilon", type=float, default=branching.EPSILON, metavar="E",
                        help="branches (branch.parent=RUN): the local critical batch is the largest batch whose "
                             "smoothed loss is within a factor 1 + E of the k = 1 branch's (default "
                             f"{branching.EPSILON})")
    args = parser.parse_args(argv)
    if not args.branch_epsilon > 0:
        print(f"lbtrain-report: error: --branch-epsilon {args.branch_epsilon}: must be > 0", file=sys.stderr)
        return 2
    if not args.overhead > 0:
        print(f"lbtrain-report: error: --overhead {args.overhead}: must be > 0", file=sys.stderr)
        return 2
    try:
        where = parse_where(args.where)
    except ValueError as e:
        print(f"lbtrain-report: error: {e}", file=sys.stderr)
        return 2
    if args.target_error is not None and not 0 < args.target_error < 1:
        print(f"lbtrain-report: error: --target-error {args.target_error}: must be in (0, 1) (a validation error)",
              file=sys.stderr)
        return 2
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"lbtrain-report: error: {missing[0]}: no such file or folder", file=sys.stderr)
        return 2
    first = args.paths[0]
    out = args.out or ((first.parent if first.is_file() else first) / "report")
    if out.exists() and not out.is_dir():
        print(f"lbtrain-report: error: --out {out}: is a file; give a folder (it is created if missing)",
              file=sys.stderr)
        return 2
    try:
        summary = summarize(args.paths, out, figures=not args.no_figures, target_error=args.target_error,
                            where=where, critical_batch=args.critical_batch, overhead=args.overhead,
                            branch_epsilon=args.branch_epsilon)
    except NoRunsError as e:
        print(f"lbtrain-report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"lbtrain-report: error: cannot write {e.filename or out}: {e.strerror}", file=sys.stderr)
        return 2
    print("Table 1: validation accuracy (%), mean ± std over seeds\n")
    print(to_markdown(summary["table1"]))
    if summary["table1_omitted"]:
        print(omitted_note(summary["table1_omitted"]))
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
    if summary.get("critical_section"):
        print(summary["critical_section"])
    if summary.get("branching_section"):
        print(summary["branching_section"])
    if summary.get("measurements"):
        print("Measured after the fact (lbtrain-measure), at the runs' checkpoints\n")
        print(to_markdown(summary["measurements"]))
    print("Wrote:")
    for path in summary["files"]:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
