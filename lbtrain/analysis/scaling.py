"""The scaling section of a report: how large can the batch get for this model and data, and why.

- Steps to a target error (Shallue et al. 2018, "Measuring the Effects of Data Parallelism on Neural Network
  Training"): per configuration (experiment x regime x batch x ..., mean ± std over seeds), the first update, epoch
  and number of training images at which the validation error is <= E (validation points are the run's epoch ends
  and, with `eval_per_decade`, log-spaced updates in between; the crossing is the first such point, so its
  resolution is that of the run's validation schedule). Runs that never reach E are counted as such, never
  averaged. `steps_to_target.png`: updates vs batch on log-log axes per regime, with the perfect-scaling line
  (updates proportional to 1/batch, through the smallest batch) and the fitted curve below.
- The knee: McCandlish et al. (2018) model the steps to a target as S(B) = S_min (1 + B_crit / B); a least-squares
  fit of S against 1/B gives S_min and the critical batch B_crit, where perfect scaling turns into diminishing
  returns. It is shown next to the gradient noise scale B_simple that the runs measured (`gns=true`) at the
  update where they crossed the target, the paper's predictor of B_crit.
- Sharpness: the last measured top Hessian eigenvalue and trace (`sharpness.every_epochs`) per batch and regime
  (Keskar et al. 2017 claim large batches end sharper), `sharpness.png`; B_simple over training per batch,
  `gns_b_simple.png`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lbtrain.analysis import regimes
from lbtrain.analysis.figures import color, finish, log_axes, new_figure, save_png
from lbtrain.analysis.runs import (
    Run,
    config_key,
    epochs_at,
    mean_std,
    run_key,
    shown,
    variant_keys,
)
from lbtrain.analysis.tables import write_tables
from lbtrain.regime import epoch_layout, expand_batches

MEASURED = ("update", "epochs", "images")  # steps_to_target's columns: where each configuration reached the target


def images_at(run: Run, update: int) -> int | None:
    """Training images processed in the first `update` updates (the batch may change between epochs)."""
    eff, size = run.results.effective, run.results.train_size or run.results.effective.get("train_size")
    schedule, epochs = eff.get("batch_schedule"), eff.get("epochs")
    if not (size and schedule and epochs):
        return update * run.batch if run.batch else None
    dup = int(eff.get("duplicates") or 1)
    batches = expand_batches(schedule, max(math.ceil(epochs - 1e-9), 1))
    starts, steps, _ = epoch_layout(int(size), batches, dup)
    total = 0
    for start, n, b in zip(starts, steps, batches):
        total += b * max(0, min(update, start + n) - start)
    return total


def crossing(run: Run, target: float) -> dict[str, Any] | None:
    """Where the run's validation error first reached <= target: update, epochs, images; None if never."""
    stop = run.results.diverged_at
    for step, err in run.scalars("val/error"):
        if stop is not None and step > stop:
            break
        if math.isfinite(err) and err <= target:
            ep = epochs_at(run, [step])
            return {"update": step, "epochs": float(ep[0]) if ep is not None else None,
                    "images": images_at(run, step), "b_simple": _b_simple_at(run, step)}
    return None


def _b_simple_at(run: Run, step: int) -> float | None:
    """The run's B_simple measurement nearest to `step` on a log scale (it is measured at log steps only, and
    changes slowly in log t); None when the run did not measure it."""
    points = [(s, v) for s, v in run.scalars("gns/b_simple") if s >= 1 and math.isfinite(v)]
    if not points:
        return None
    return min(points, key=lambda p: abs(math.log(p[0]) - math.log(max(step, 1))))[1]


def _eligible(runs: Sequence[Run]) -> list[Run]:
    """Runs that count: one per (configuration, seed), finished their plan or diverged (which never reach after)."""
    return [r for r in runs if r.duplicate_of is None and (r.status in ("completed", "diverged"))]


def _groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in sorted(runs, key=run_key):
        groups.setdefault(config_key(r), []).append(r)
    return groups


def steps_to_target(runs: Sequence[Run], target: float) -> list[dict[str, Any]]:
    """One row per configuration: how many seeds reached the target, and their updates / epochs / images."""
    groups = _groups(_eligible(runs))
    variants = variant_keys([rs[0].identity for rs in groups.values()])
    rows = []
    for members in groups.values():
        first = members[0]
        hits = [c for c in (crossing(r, target) for r in members) if c is not None]
        # the plan's epochs is a variant column where configurations differ in it: not the epochs at the crossing
        row = {"experiment": first.experiment, "dataset": first.dataset,
               **{(f"{k} (config)" if k in MEASURED else k): shown(first.identity, k) for k in variants},
               "regime": first.regime, "batch": first.batch, "target_error": target,
               "reached": f"{len(hits)} of {len(members)}"}
        for k in MEASURED:
            values = [c[k] for c in hits if c[k] is not None]
            row[k] = mean_std(values) if values else "not reached"
            row[f"{k}_mean"] = statistics.fmean(values) if values else None
        bs = [c["b_simple"] for c in hits if c["b_simple"] is not None]
        row["b_simple_at_target"] = statistics.fmean(bs) if bs else None
        rows.append(row)
    return sorted(rows, key=lambda r: (r["experiment"], r["dataset"], regimes.rank(r["regime"]), r["batch"]))


def knee(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per experiment and regime: S_min and B_crit of S(B) = S_min (1 + B_crit / B) fitted by least squares to the
    mean updates-to-target (the configurations where every seed reached it), beside the measured B_simple (the
    median over the configurations of their mean B_simple at the crossing). A fitted B_crit more than 4x outside
    the measured batches is no knee (the points are on the perfect-scaling line): left empty."""
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["experiment"], r["dataset"], r["regime"]), []).append(r)
    out = []
    for (experiment, dataset, regime), rs in by.items():
        pts = [(r["batch"], r["update_mean"]) for r in rs if r["update_mean"] is not None
               and r["reached"].split(" of ")[0] == r["reached"].split(" of ")[1]]
        fit = _fit_knee(pts)
        batches = [b for b, _ in pts]
        if fit and not min(batches) / 4 <= fit[1] <= 4 * max(batches):
            fit = None  # the curve is straight (perfect scaling) over the measured batches: no knee to read off
        bs = [r["b_simple_at_target"] for r in rs if r["b_simple_at_target"] is not None]
        out.append({"experiment": experiment, "dataset": dataset, "regime": regime, "batches": len(pts),
                    "S_min": fit[0] if fit else None, "B_crit": fit[1] if fit else None,
                    # the median over batches: single large-batch estimates are noisy (|G|^2 is small there)
                    "B_simple_at_target": statistics.median(bs) if bs else None})
    return sorted(out, key=lambda r: (r["experiment"], r["dataset"], regimes.rank(r["regime"])))


def _fit_knee(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(S_min, B_crit) of steps = S_min + S_min B_crit / B, least squares in (1/B, steps); None with < 2 points or
    a fit that is not a knee (negative S_min or B_crit)."""
    if len(points) < 2:
        return None
    inv = np.array([1.0 / b for b, _ in points])
    steps = np.array([s for _, s in points])
    slope, intercept = np.polyfit(inv, steps, 1)
    if intercept <= 0 or slope <= 0:
        return None
    return float(intercept), float(slope / intercept)


def sharpness_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Final lambda_max / trace / B_simple per configuration, mean ± std over the seeds that measured them."""
    groups = _groups([r for r in runs if r.duplicate_of is None and r.ok])
    rows = []
    for members in groups.values():
        first = members[0]
        lam = [r.results.sharpness["lambda_max"] for r in members if r.results.sharpness]
        tr = [r.results.sharpness["trace"] for r in members if r.results.sharpness
              and r.results.sharpness.get("trace") is not None]
        gns = [r.results.gns["b_simple"] for r in members if r.results.gns and r.results.gns.get("b_simple")]
        if not (lam or gns):
            continue
        rows.append({"experiment": first.experiment, "dataset": first.dataset, "regime": first.regime,
                     "batch": first.batch, "seeds": len(members),
                     "lambda_max": mean_std(lam) if lam else None, "lambda_max_mean": statistics.fmean(lam) if lam
                     else None, "trace": mean_std(tr) if tr else None,
                     "b_simple_final": mean_std(gns) if gns else None,
                     "val_error": mean_std([float(r.results.final_val_error) for r in members])})
    return sorted(rows, key=lambda r: (r["experiment"], r["dataset"], regimes.rank(r["regime"]), r["batch"]))


# ------------------------------------------------------------------------------------------------ figures
def steps_figure(rows: Sequence[dict[str, Any]], knees: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Updates to target vs batch (log-log) per regime, mean ± std; perfect scaling through the smallest batch;
    the fitted S_min (1 + B_crit / B) and B_crit; B_simple at the target as a dotted line."""
    fig, ax = new_figure()
    names = sorted({r["regime"] for r in rows}, key=regimes.rank)
    top = max((r["update_mean"] for r in rows if r["update_mean"] is not None), default=1.0)
    for i, regime in enumerate(names):
        pts = sorted((r["batch"], r["update_mean"], r["update"]) for r in rows
                     if r["regime"] == regime and r["update_mean"] is not None)
        if not pts:
            continue
        b = np.array([p[0] for p in pts], dtype=float)
        s = np.array([p[1] for p in pts])
        err = np.array([float(str(p[2]).split(" ± ")[1]) if " ± " in str(p[2]) else 0.0 for p in pts])
        ax.errorbar(b, s, yerr=err, marker="o", color=color(i), label=f"{regime}", capsize=3)
        missing = [r["batch"] for r in rows if r["regime"] == regime and r["update_mean"] is None]
        if missing:
            # above the measured points, one row per regime so that no marker hides another
            ax.plot(missing, [top * 1.4 * 1.12**i] * len(missing), marker="^", linestyle="none",
                    color=color(i), label=f"{regime}: not reached")
        k = next((k for k in knees if k["regime"] == regime and k["B_crit"]), None)
        if k:
            grid = np.geomspace(b.min(), b.max(), 50)
            ax.plot(grid, k["S_min"] * (1 + k["B_crit"] / grid), linestyle=":", color=color(i),
                    label=f"{regime}: fit, B_crit = {k['B_crit']:.0f}")
            ax.axvline(k["B_crit"], color=color(i), linestyle=":", alpha=0.5)
        if i == 0:
            grid = np.geomspace(b.min(), b.max(), 50)
            ax.plot(grid, s[0] * b[0] / grid, color="black", linestyle="--", alpha=0.6, label="perfect scaling")
    bs = [k["B_simple_at_target"] for k in knees if k["B_simple_at_target"]]
    if bs:
        b_simple = statistics.median(bs)
        ax.axvline(b_simple, color="grey", linestyle="-.", label=f"B_simple at target ({b_simple:.0f})")
    log_axes(ax, x=True, y=True, xbase=2)
    return finish(fig, ax, "batch size", "updates to reach the target error",
                   title or "Steps to target (Shallue et al. 2018)")


def sharpness_figure(rows: Sequence[dict[str, Any]], title: str = "") -> Figure:
    fig, ax = new_figure()
    names = sorted({r["regime"] for r in rows}, key=regimes.rank)
    for i, regime in enumerate(names):
        pts = sorted((r["batch"], r["lambda_max_mean"]) for r in rows
                     if r["regime"] == regime and r["lambda_max_mean"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color(i), label=regime)
    log_axes(ax, x=True, xbase=2)
    return finish(fig, ax, "batch size", r"final $\lambda_{max}$ of the training-loss Hessian",
                   title or "Sharpness at the end of training (Keskar et al. 2017)")


def gns_figure(runs: Sequence[Run], title: str = "") -> Figure:
    """B_simple over training, one line per batch (the smallest-index regime of each batch, mean over seeds)."""
    fig, ax = new_figure()
    eligible = [r for r in runs if r.duplicate_of is None and r.scalars("gns/b_simple")]
    batches = sorted({r.batch for r in eligible})
    for i, batch in enumerate(batches):
        mine = [r for r in eligible if r.batch == batch]
        regime = min({r.regime for r in mine}, key=regimes.rank)
        series = [dict(r.scalars("gns/b_simple")) for r in mine if r.regime == regime]
        steps = sorted(set.intersection(*(set(s) for s in series)))
        if not steps:
            continue
        mean = [statistics.fmean(s[t] for s in series) for t in steps]
        ax.plot(steps, mean, color=color(i, len(batches), "viridis"), label=f"B={batch} {regime}")
    log_axes(ax, x=True, y=True)
    return finish(fig, ax, "updates, log scale", r"$B_{simple} = tr(\Sigma) / |G|^2$",
                   title or "Gradient noise scale over training (McCandlish et al. 2018)")


def write_scaling(runs: Sequence[Run], out_dir: Path, target: float | None,
                  figures: bool = True) -> tuple[dict[str, list[dict[str, Any]]], list[Path]]:
    """The scaling tables (and figures) for `runs` into `out_dir`: steps_to_target (with `target`), knee,
    sharpness. Returns (tables, written files)."""
    tables: dict[str, list[dict[str, Any]]] = {}
    files: list[Path] = []
    if target is not None:
        rows = steps_to_target(runs, target)
        knees = knee(rows)
        tables["steps_to_target"] = [{k: v for k, v in r.items() if not k.endswith("_mean")} for r in rows]
        tables["knee"] = knees
        if figures and rows:
            files.append(save_png(steps_figure(rows, knees, f"Updates to val error <= {target:g}"),
                                  out_dir / "steps_to_target.png"))
    sharp = sharpness_rows(runs)
    if sharp:
        tables["scaling"] = [{k: v for k, v in r.items() if not k.endswith("_mean")} for r in sharp]
        if figures:
            files.append(save_png(sharpness_figure(sharp), out_dir / "sharpness.png"))
    if figures and any(r.scalars("gns/b_simple") for r in runs if r.duplicate_of is None):
        files.append(save_png(gns_figure(runs), out_dir / "gns_b_simple.png"))
    files += write_tables(tables, out_dir) if tables else []
    return tables, files
