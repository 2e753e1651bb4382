"""The local critical batch from branches (lbtrain.branch; Merrill et al. 2025, "Critical batch size revisited").

A branch (results.json with `branch.parent_identity` in its identity) trained D samples from its parent's kept
checkpoint at update U, at batch k B with the parent's LR there scaled by a rule, and recorded its smoothed loss (the
mean training loss of its last quarter of updates). This module groups branches and writes:

- local_critical_batch.md/.csv, one row per study and branch point U: the parent's samples and LR at U, the seeds,
  the local critical batch B* and B_simple at U. A study is the branches of one parent with one rule (the identity
  minus branch.update, branch.samples, branch.k and branch.seed); a point is a branch point U with a length D (D
  may grow with U: one sweep per point), so rows of different parents or rules never mix.
  At a point, a seed counts when it has a finished branch at every k of the point (k = 1 included): the branches of
  one seed share their data (lbtrain.branch), so the comparison across k is paired, and the loss ratio of k is
  r_k = mean over seeds of L(k) / mean over seeds of L(1). A diverged branch counts as infinitely worse.
  B* (`batch`): the largest k B such that r_k' <= 1 + epsilon for every tested k' <= k (the first k beyond ends the
  search, as in Zhang et al.'s criterion: a lucky larger batch after a failed one is not taken). `interpolated`: where
  log r crosses log(1 + epsilon), linear in log k between the last k within and the first beyond (a finer estimate
  than the tested batches; beyond the largest tested batch it is censored, shown as "> K B"). Interval: a paired
  bootstrap over the seeds (resampled with replacement, the same seeds for every k; RESAMPLES, fixed seed), the 2.5th
  and 97.5th percentiles of the resampled estimates, extended to contain the point estimate; with 2 or 3 seeds a
  bootstrap has only a few distinct resamples, so its interval is coarse (narrower than its nominal 95%); one seed has
  none. B_simple (McCandlish et al.'s simple noise scale, `gns=true` in the parent): the parent's `gns/b_simple`
  point nearest U (in log U), read with the package's TensorBoard reader.
- branch_losses.md/.csv, one row per study, point and k: the batch and LR, the seeds, the mean smoothed loss with a
  95% percentile bootstrap interval over seeds (scipy.stats.bootstrap, fixed seed), r_k and
  whether it is within 1 + epsilon.
- local_critical_batch.png: B* against the parent's samples at U (log-log) with its interval, censored points as
  triangles at the largest tested batch, the tested range, and the parent's B_simple over training; beside it, r_k
  against k B per point, with the 1 + epsilon line.

The parent is found among the runs read (by its identity hash), else at the folder the branch recorded.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lbtrain.analysis.critical import CONFIDENCE, Estimate, contain
from lbtrain.analysis.figures import color, finish, log_axes, new_figure, save_png, style_axes
from lbtrain.analysis.runs import Run, identity_key, number, read_run, run_key, shown, variant_columns, without
from lbtrain.analysis.tables import to_csv, to_markdown, write_tables
from lbtrain.checkpoint import atomic_write_bytes
from lbtrain.config import schema_defaults
from lbtrain.regime import epoch_layout, expand_batches
from lbtrain.results import ResultsError

EPSILON = 0.1  # relative tolerance on the smoothed loss against the k = 1 branch
RESAMPLES = 2000
SEED = 0
PARENT_KEY = "branch.parent_identity"
POINT_KEYS = ("branch.update", "branch.samples", "branch.k", "branch.seed")  # what varies inside a study


def is_branch(run: Run) -> bool:
    return PARENT_KEY in run.identity


def split(runs: Sequence[Run]) -> tuple[list[Run], list[Run]]:
    """(runs that are not branches, branches)."""
    return [r for r in runs if not is_branch(r)], [r for r in runs if is_branch(r)]


def _key(run: Run, key: str) -> Any:
    return run.identity.get(key, schema_defaults().get(key))


def smoothed_loss(run: Run) -> float | None:
    """The branch's smoothed loss: +inf for a diverged branch, None for one without a finished measurement."""
    if run.results.status == "diverged":
        return math.inf
    record = _record(run)
    value = record.get("smoothed_loss")
    if run.results.status != "completed" or value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _record(run: Run) -> dict[str, Any]:
    record = run.results.instruments.get("branch") or run.results.extra.get("branch")
    return record if isinstance(record, dict) else {}


# ----------------------------------------------------------------------------------------------- estimates
def critical_batch(ks: Sequence[int], ratios: Sequence[float], epsilon: float) -> tuple[int, float | None]:
    """(the largest tested k within 1 + epsilon, from k = 1 on without a gap; the interpolated crossing in k, None
    when every tested k is within: censored). `ks` ascending, starting at 1."""
    limit = 1.0 + epsilon
    last = 0
    for i, r in enumerate(ratios):
        if not r <= limit:
            break
        last = i
    else:
        return ks[-1], None
    if last == len(ks) - 1:
        return ks[-1], None
    lo, hi = ratios[last], ratios[last + 1]
    if not math.isfinite(hi):
        return ks[last], float(ks[last])  # the next one diverged: the crossing is not resolved beyond the last within
    a, b = math.log(max(lo, 1e-12)), math.log(hi)
    t = (math.log(limit) - a) / (b - a) if b > a else 0.0
    t = min(max(t, 0.0), 1.0)
    return ks[last], float(ks[last] * (ks[last + 1] / ks[last]) ** t)


@dataclass
class Point:
    """One branch point U (with its length D) of a study: the branches by (k, seed) and what they give."""

    update: int
    samples: int  # D
    parent_samples: int | None
    parent_lr: float | None
    parent_batch: int
    ks: list[int]
    seeds: list[int]  # the seeds with a finished branch at every k
    losses: dict[int, list[float]]  # k -> smoothed loss per seed (in `seeds` order)
    lrs: dict[int, float | None]
    missing: list[str] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    batch: Estimate = field(default_factory=lambda: Estimate(None))  # B* on the tested batches
    interpolated: Estimate = field(default_factory=lambda: Estimate(None))
    censored: bool = False
    b_simple: float | None = None
    b_simple_update: int | None = None

    @property
    def largest(self) -> int:
        return self.ks[-1] * self.parent_batch


def _ratios(losses: dict[int, np.ndarray], ks: Sequence[int]) -> list[float]:
    base = float(np.mean(losses[1]))
    return [float(np.mean(losses[k])) / base if base > 0 else math.inf for k in ks]


def estimate(point: Point, epsilon: float, resamples: int = RESAMPLES) -> None:
    """Fill the point's ratios and B* (with its bootstrap interval over seeds)."""
    ks, b = point.ks, point.parent_batch
    arrays = {k: np.asarray(point.losses[k], dtype=float) for k in ks}
    point.ratios = _ratios(arrays, ks)
    k_star, k_interp = critical_batch(ks, point.ratios, epsilon)
    point.censored = k_interp is None
    n = len(point.seeds)
    if n < 2:
        note = "no interval: 1 seed"
        point.batch = Estimate(float(k_star * b), note=note)
        point.interpolated = Estimate(None if k_interp is None else k_interp * b, note=note)
        return
    rng = np.random.default_rng(SEED)
    picked, interp = [], []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        k1, ki = critical_batch(ks, _ratios({k: a[idx] for k, a in arrays.items()}, ks), epsilon)
        picked.append(k1 * b)
        interp.append(math.inf if ki is None else ki * b)
    q = (0.025, 0.975)
    lo, hi = (float(v) for v in np.quantile(picked, q, method="inverted_cdf"))
    point.batch = Estimate(float(k_star * b), *contain(float(k_star * b), lo, hi))
    ilo, ihi = (float(v) for v in np.quantile(interp, q, method="inverted_cdf"))
    value = None if k_interp is None else k_interp * b
    if value is not None:
        ilo, ihi = contain(value, ilo, ihi)  # type: ignore[assignment]
    point.interpolated = Estimate(value, ilo, ihi, note="censored: every tested batch within" if value is None else "")


def mean_interval(values: Sequence[float], resamples: int = RESAMPLES) -> Estimate:
    """The mean of `values` (one per seed) with a percentile bootstrap interval (scipy.stats.bootstrap, fixed seed);
    an infinite value (a diverged branch) leaves no finite mean, one value no interval."""
    if not values:
        return Estimate(None, note="no branch")
    if any(not math.isfinite(v) for v in values):
        return Estimate(math.inf, note="diverged")
    mean = statistics.fmean(values)
    if len(values) == 1 or max(values) == min(values):
        return Estimate(mean, note="no interval: 1 seed") if len(values) == 1 else Estimate(mean, mean, mean)
    from scipy import stats

    kwargs: dict[str, Any] = {"confidence_level": CONFIDENCE, "method": "percentile", "n_resamples": resamples}
    data = (np.asarray(values, dtype=float),)
    try:
        res = stats.bootstrap(data, np.mean, rng=np.random.default_rng(SEED), **kwargs)
    except TypeError:  # scipy < 1.15
        res = stats.bootstrap(data, np.mean, random_state=np.random.default_rng(SEED), **kwargs)
    lo, hi = contain(mean, float(res.confidence_interval.low), float(res.confidence_interval.high))
    return Estimate(mean, lo, hi)


# --------------------------------------------------------------------------------------------------- studies
@dataclass
class Study:
    index: int
    label: str
    identity: dict[str, Any]  # the study's flat identity (no update, samples, k, seed)
    parent_identity: str
    parent: Run | None
    rule: str
    points: list[Point]
    epsilon: float
    b_simple_curve: list[tuple[float, float]] = field(default_factory=list)  # (parent samples, B_simple)


def _parent_of(branches: Sequence[Run], others: Sequence[Run]) -> Run | None:
    want = str(_key(branches[0], PARENT_KEY))
    for r in others:
        if r.duplicate_of is None and not is_branch(r) and r.identity_hash == want:
            return r
    for b in branches:  # the folder the branch recorded (relative paths: from where it ran, or from here)
        folder = _record(b).get("parent")
        if folder and Path(folder).is_dir():
            try:
                run = read_run(folder)
            except ResultsError:
                continue
            if run is not None and run.identity_hash == want:
                return run
    return None


def parent_samples(parent: Run, steps: Sequence[float]) -> np.ndarray | None:
    """Samples the parent trained on after each of `steps` updates (its batch schedule, epoch by epoch)."""
    eff, size = parent.results.effective, parent.results.train_size or parent.results.effective.get("train_size")
    schedule, epochs = eff.get("batch_schedule"), eff.get("epochs")
    if not (size and schedule and epochs):
        return None
    duplicates = int(eff.get("duplicates") or 1)
    batches = expand_batches(schedule, max(math.ceil(float(epochs) - 1e-9), 1))
    starts, steps_of, _ = epoch_layout(int(size), batches, duplicates)
    out = []
    for s in steps:
        done = 0.0
        for e, first in enumerate(starts):
            if first >= s:
                break
            end = first + steps_of[e] if e < len(starts) - 1 else s  # (the last epoch may be partial)
            done += (min(s, end) - first) * batches[e]
        out.append(done)
    return np.asarray(out)


def _nearest(points: Sequence[tuple[int, float]], update: int) -> tuple[int | None, float | None]:
    good = [(s, v) for s, v in points if s >= 1 and math.isfinite(v)]
    if not good or update < 1:
        return None, None
    s, v = min(good, key=lambda p: (abs(math.log(p[0] / update)), p[0]))
    return s, v


def studies(runs: Sequence[Run], others: Sequence[Run] = (), epsilon: float = EPSILON,
            resamples: int = RESAMPLES) -> list[Study]:
    """The branch studies among `runs` (others: where to look for the parents), each point estimated."""
    branches = [r for r in sorted(runs, key=run_key) if is_branch(r) and r.duplicate_of is None]
    groups: dict[str, list[Run]] = {}
    for r in branches:
        groups.setdefault(identity_key(r.identity, POINT_KEYS), []).append(r)
    idents = [without(rs[0].identity, POINT_KEYS) for rs in groups.values()]
    varying = variant_columns(idents)
    out = []
    for i, (members, ident) in enumerate(zip(groups.values(), idents), start=1):
        parent = _parent_of(members, [*others, *runs])
        rule = str(_key(members[0], "branch.rule"))
        label = f"rule {rule}" + (f" ({', '.join(f'{k}={shown(ident, k)}' for k in varying)})" if varying else "")
        curve = []
        if parent is not None:
            pts = [(s, v) for s, v in parent.scalars("gns/b_simple") if s >= 1 and math.isfinite(v) and v > 0]
            xs = parent_samples(parent, [s for s, _ in pts]) if pts else None
            if xs is not None:
                curve = [(float(x), v) for x, (_, v) in zip(xs, pts) if x > 0]
        study = Study(i, label, ident, str(_key(members[0], PARENT_KEY)), parent, rule,
                      _points(members, parent, epsilon, resamples), epsilon, curve)
        out.append(study)
    return out


def _points(members: Sequence[Run], parent: Run | None, epsilon: float, resamples: int) -> list[Point]:
    by_point: dict[tuple[int, int], list[Run]] = {}
    for r in members:
        by_point.setdefault((int(_key(r, "branch.update")), int(_key(r, "branch.samples"))), []).append(r)
    gns = parent.scalars("gns/b_simple") if parent is not None else []
    points = []
    for update, samples in sorted(by_point):
        rs = by_point[update, samples]
        ks = sorted({int(_key(r, "branch.k")) for r in rs})
        cells: dict[tuple[int, int], float | None] = {}
        for r in rs:
            cells[int(_key(r, "branch.k")), int(_key(r, "branch.seed"))] = smoothed_loss(r)
        all_seeds = sorted({s for _, s in cells})
        seeds = [s for s in all_seeds if all(cells.get((k, s)) is not None for k in ks)]
        missing = [f"seed {s}: k={','.join(str(k) for k in ks if cells.get((k, s)) is None)}"
                   for s in all_seeds if s not in seeds]
        records = [_record(r) for r in rs]
        first = next((rec for rec in records if rec), {})
        parent_batch = int(first.get("parent_batch") or rs[0].results.batch // max(int(_key(rs[0], "branch.k")), 1))
        lrs = {int(_key(r, "branch.k")): _record(r).get("lr") for r in rs}
        point = Point(update, samples, first.get("parent_samples"), first.get("parent_lr"), parent_batch, ks, seeds,
                      {k: [cells[k, s] for s in seeds] for k in ks}, lrs, missing)  # type: ignore[misc]
        if 1 in ks and seeds:
            estimate(point, epsilon, resamples)
        point.b_simple_update, point.b_simple = _nearest(gns, update)
        points.append(point)
    return points


# ------------------------------------------------------------------------------------------------- tables
def _interval(e: Estimate, largest: int | None = None) -> tuple[str, str]:
    """(value, "[lo, hi]") as text; censored values and bounds beyond the largest tested batch as "> K"."""
    def text(v: float | None) -> str:
        if v is None:
            return "-"
        if not math.isfinite(v) or (largest is not None and v > largest):
            return f"> {largest}"
        return number(float(v))
    value = f"> {largest}" if e.value is None and largest is not None and e.note.startswith("censored") else text(
        e.value)
    return value, (f"[{text(e.lo)}, {text(e.hi)}]" if e.lo is not None and e.hi is not None else "-")


def point_rows(found: Sequence[Study]) -> list[dict[str, Any]]:
    rows = []
    for s in found:
        for p in s.points:
            interp, interp_ci = _interval(p.interpolated, p.largest)
            batch, batch_ci = _interval(p.batch, p.largest)
            rows.append({"study": s.index, "update": p.update, "samples": p.parent_samples, "D": p.samples,
                         "parent_lr": p.parent_lr,
                         "seeds": len(p.seeds), "tested": f"{p.ks[0] * p.parent_batch}..{p.largest}",
                         "loss_k1": statistics.fmean(p.losses[1]) if p.seeds and 1 in p.losses else None,
                         "B_crit": interp, "B_crit_95%": interp_ci, "B_crit_tested": batch,
                         "B_crit_tested_95%": batch_ci, "B_simple": p.b_simple,
                         "B_simple_update": p.b_simple_update,
                         "notes": "; ".join(p.missing) + (
                             "; no k = 1 branch" if 1 not in p.ks else "")})
    return rows


def point_csv_rows(found: Sequence[Study]) -> list[dict[str, Any]]:
    """The same, with plain numbers (CSV): censored values empty, `censored` true."""
    rows = []
    for s in found:
        for p in s.points:
            rows.append({"study": s.index, "label": s.label, "parent_identity": s.parent_identity, "update": p.update,
                         "samples": p.parent_samples, "branch_samples": p.samples, "parent_lr": p.parent_lr,
                         "parent_batch": p.parent_batch,
                         "largest_batch": p.largest, "seeds": len(p.seeds), "epsilon": s.epsilon,
                         "b_crit": p.interpolated.value, "b_crit_lo": _finite(p.interpolated.lo),
                         "b_crit_hi": _finite(p.interpolated.hi), "censored": p.censored,
                         "b_crit_tested": p.batch.value, "b_crit_tested_lo": p.batch.lo,
                         "b_crit_tested_hi": p.batch.hi, "b_simple": p.b_simple,
                         "b_simple_update": p.b_simple_update})
    return rows


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def loss_rows(found: Sequence[Study]) -> list[dict[str, Any]]:
    rows = []
    for s in found:
        for p in s.points:
            for i, k in enumerate(p.ks):
                values = p.losses.get(k, [])
                e = mean_interval(values)
                ratio = p.ratios[i] if p.ratios else None
                rows.append({"study": s.index, "update": p.update, "D": p.samples, "k": k, "batch": k * p.parent_batch,
                             "lr": p.lrs.get(k), "seeds": len(values), "smoothed_loss": e.value,
                             "loss_lo": e.lo, "loss_hi": e.hi, "ratio_to_k1": ratio,
                             "within": None if ratio is None else bool(ratio <= 1 + s.epsilon)})
    return rows


def notes(found: Sequence[Study], epsilon: float) -> str:
    lines = [f"Local critical batch (Merrill et al. 2025) at epsilon = {epsilon}: the largest batch whose branch's "
             "smoothed training loss (the mean over its last quarter of updates) after D samples is within "
             f"{100 * epsilon:g}% of the k = 1 branch's, mean over seeds (B_crit: interpolated in log k; "
             "B_crit_tested: on the tested batches); 95% interval: paired bootstrap over the seeds "
             f"({RESAMPLES} resamples, seed {SEED}; with few seeds it is coarse). B_simple: the parent's gns/b_simple "
             "nearest the branch point (update B_simple_update).", ""]
    for s in found:
        where = str(s.parent.path) if s.parent is not None else "not found (pass its folder to the report)"
        lines.append(f"- study {s.index}: {s.label}; parent {s.parent_identity} at {where}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- figure
def figure(study: Study) -> Figure:
    """B* against the parent's samples at the branch point beside B_simple (left); the loss ratios (right)."""
    fig, (ax, bx) = new_figure(ncols=2, size=(12.0, 4.8))
    pts = [p for p in study.points if p.parent_samples and p.seeds and p.ratios]
    if study.b_simple_curve:
        xs, ys = zip(*study.b_simple_curve)
        ax.plot(xs, ys, color="grey", linewidth=1.2, label=r"$B_{simple}$ (parent, gns/b_simple)")
    lengths = sorted({p.samples for p in pts})
    if pts:
        largest = max(p.largest for p in pts)
        ax.axhspan(min(p.ks[0] * p.parent_batch for p in pts), largest, color="tab:blue", alpha=0.06,
                   label="tested batches")
    for j, length in enumerate(lengths):
        mine = [p for p in pts if p.samples == length]
        tint = color(j) if len(lengths) > 1 else "tab:blue"
        named = f" (D={length})" if len(lengths) > 1 else f", D={length}"
        known = [p for p in mine if p.interpolated.value is not None]
        if known:
            x = np.array([p.parent_samples for p in known], dtype=float)
            y = np.array([p.interpolated.value for p in known], dtype=float)
            lo = np.array([min(p.interpolated.lo if p.interpolated.lo is not None else v, v)
                           for p, v in zip(known, y)], dtype=float)
            hi = np.array([max(min(p.interpolated.hi if p.interpolated.hi is not None else v, 1.4 * p.largest), v)
                           for p, v in zip(known, y)], dtype=float)
            ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o-", color=tint, capsize=3,
                        label=rf"local $B_{{crit}}$ ($\epsilon$={study.epsilon:g}){named}, 95% interval over seeds")
        ax.plot([p.parent_samples for p in mine], [p.batch.value for p in mine], "s", color=tint,
                markerfacecolor="none", markersize=5, label="largest tested batch within" if j == 0 else None)
        censored = [p for p in mine if p.interpolated.value is None]
        if censored:
            ax.plot([p.parent_samples for p in censored], [p.largest for p in censored], "^", color="tab:red",
                    markersize=8, label="censored: every tested batch within" if j == 0 else None)
    log_axes(ax, x=True)
    ax.set_yscale("log", base=2)
    style_axes(ax, "samples trained by the parent at the branch point U", "batch size",
               f"Local critical batch vs B_simple ({study.label})", legend="inside")
    for i, p in enumerate(pts):
        bx.plot([k * p.parent_batch for k in p.ks], p.ratios, "o-", color=color(i, len(pts), "viridis"),
                label=f"U={p.update}" + (f", D={p.samples}" if len(lengths) > 1 else ""))
    bx.axhline(1 + study.epsilon, color="tab:red", linestyle="--", label=r"1 + $\epsilon$")
    log_axes(bx, x=True, y=True, xbase=2)
    return finish(fig, bx, "branch batch k B", "smoothed loss / k = 1 branch's (mean over seeds)",
                  "Loss ratio after D samples")


# -------------------------------------------------------------------------------------------------- entry
def write_branching(runs: Sequence[Run], out_dir: str | Path, epsilon: float = EPSILON, figures: bool = True,
                    others: Sequence[Run] = ()) -> tuple[dict[str, list[dict[str, Any]]], list[Path],
                                                         list[Study]]:
    """local_critical_batch.md/.csv, branch_losses.md/.csv and (with `figures`) local_critical_batch.png (per study,
    `_<n>` after the name, when there are several) into `out_dir`. Returns (tables, files, studies)."""
    found = studies(runs, others, epsilon)
    if not found:
        return {}, [], []
    out_dir = Path(out_dir)
    text = notes(found, epsilon)
    tables = {"local_critical_batch": point_rows(found), "branch_losses": loss_rows(found)}
    files = write_tables(tables, out_dir, notes={"local_critical_batch": text, "branch_losses": text})
    # the CSV of the first table with plain numbers (the Markdown's "> K" and "[lo, hi]" are for people)
    atomic_write_bytes(out_dir / "local_critical_batch.csv", to_csv(point_csv_rows(found)).encode())
    if figures:
        for s in found:
            suffix = "" if len(found) == 1 else f"_{s.index}"
            files.append(save_png(figure(s), out_dir / f"local_critical_batch{suffix}.png"))
    return tables, files, found


def section(tables: dict[str, list[dict[str, Any]]], found: Sequence[Study], epsilon: float) -> str:
    """The report's stdout section."""
    if not found:
        return ""
    return ("Local critical batch by branching (full tables: local_critical_batch.md/.csv, branch_losses.md/.csv)\n\n"
            + to_markdown(tables["local_critical_batch"]) + "\n" + notes(found, epsilon))
