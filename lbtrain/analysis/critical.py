"""The critical batch size of a per-batch-size hyperparameter search, measured the way the field measures it.

A search (Shallue et al. 2018, "Measuring the Effects of Data Parallelism on Neural Network Training", and its code
google-research/batch_science; Zhang et al. 2024, "How Does Critical Batch Size Scale in Pre-training?") trains, at
each batch size B, several trials that differ in their hyperparameters, each stopping at the first evaluation at or
below a target (results.json's `target` block); the best trial's hyperparameters are then re-run with several
confirmation seeds. This module reads those run folders and writes:

- critical_batch.md/.csv, one row per study and batch size: trials run and reached, the confirmed configuration's
  hyperparameters, and over its confirmation seeds the steps (updates) and samples (updates x B) to the target.
  Point estimate: the mean over seeds; interval: a 95% percentile bootstrap of that mean (scipy.stats.bootstrap,
  fixed seed; percentile rather than BCa, whose acceleration term is unstable with 2 to 5 seeds; with so few seeds
  any bootstrap interval is narrower than its nominal 95%); one seed has no interval (said so). A seed that never
  reached the target counts as infinitely many steps, so a batch where one did has no finite mean: it is listed,
  never fitted. `resolution` is the largest gap between evaluations up to the crossing (the trainer's record): the
  crossing lies within that many updates before the recorded one, a measurement error the seed interval does not
  include.
- critical_batch_fit.md/.csv, one row per study and quantity:
  McCandlish et al. (2018): S(B) = S_min (1 + B_noise / B) and E(B) = E_min (1 + B / B_noise) (E = samples), each
  fitted to the per-batch means with scipy.optimize.curve_fit in log space (relative errors: the steps span orders
  of magnitude and seed noise is multiplicative), and B_crit = E_min / S_min. (With a constant batch, E = S B, so
  the two log-space fits are the same fit and B_crit equals the fitted B_noise: both are printed as a check.)
  Zhang et al. (2024): the critical batch is the largest batch B such that S(B) <= (1 + overhead) S(B_0) B_0 / B for
  every measured batch from the smallest, B_0, up to B (steps at most 20% above perfect scaling; the overhead is
  `--overhead`); the batches are discrete, so its interval is the 2.5th to 97.5th percentile of the batches chosen
  across resamples (each one a measured batch; the table also says how often each was chosen), and a log-log
  interpolation of the crossing (log of steps relative to perfect scaling, linear in log B, between the
  last batch within and the first beyond) is given beside it.
  Next to them, the gradient noise scale B_simple at the target crossing of the confirmed runs (the runs'
  `gns/b_simple` point nearest the crossing on a log scale, else the value results.json holds at the end, which for
  a run that stopped at the target is the crossing; the `source` says which): per batch the mean over seeds (one
  seed with only the final value: the estimator's own interval, gns.b_simple_ci), per study the median over
  batches.
  Intervals of the fits: refits on resamples of the confirmation seeds within each batch (fixed seed), the 2.5 and
  97.5 percentiles of the refitted values. A batch-size estimate outside the measured batches is printed as such
  ("> 4096 (beyond the largest batch measured)"), never as a number. Every interval contains its point estimate:
  where a percentile interval misses it (a strongly skewed resampling distribution), it is extended to it.
- critical_batch.png: S against B (log-log) with the perfect-scaling line from the smallest batch, Zhang's bound,
  the McCandlish fit and its band, the B_crit interval (shaded span) and the B_simple interval (hatched span);
  tradeoff.png: E against S (McCandlish et al.'s trade-off curve) with the fit.

Which runs form one study: the identity minus the batch, the seed and the searched hyperparameters. The searched
hyperparameters are the identity keys with numeric values (base.lr, base.momentum, regime.warmup_epochs,
optimizer.betas, ...) that vary among a study's runs, outside the keys that define what is trained on what and to
which target (name, dataset.*, model.*, target.*, base.batch), which a search never varies; `searched=` names them
instead where a folder holds studies that differ in a fixed numeric key (in lbtrain-report: select one study with
--where KEY=VALUE; a batch with two configurations of several seeds is flagged). So runs of two studies never share
a row, a fit or a figure. A configuration is the identity minus the seed. The confirmed configuration of a batch is the
one run with several seeds; its run with the seed of the other (single-seed) trials is the trial that won the
search and is left out of the estimate (it was chosen for being fast: counting it biases the steps low). Without a
confirmed configuration the best trial alone (fewest updates to the target among those that reached it, ties by
lower final validation loss) stands for the batch, without an interval; where other batches of the study are
confirmed, such a batch is shown but neither fitted nor used by Zhang et al.'s criterion (it was picked for being
fast, so it lies low, and it has no seeds to resample). "Measured" batches, for a fitted batch size, are the ones
the fits stand on. A numeric key with one value at each batch size but different values between them is what the
search sets per batch (the budget, `epochs=`): it neither splits the study nor counts as searched.

Steps to the target are the trainer's record (`target.update`: the first evaluation at or below the target, as the
trainer stops there; batch_science's compute_steps_to_result takes the first evaluation strictly below the
threshold, the same for a continuous metric); each run that enters a number is checked against its TensorBoard
`val/<metric>` points (compared at float32, TensorBoard's precision), and a disagreement is reported.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lbtrain.analysis.figures import color, finish, log_axes, new_figure, save_png
from lbtrain.analysis.runs import Run, identity_key, number, run_key, shown, variant_keys, without
from lbtrain.analysis.tables import to_markdown, write_tables

CONFIDENCE = 0.95
RESAMPLES = 2000  # bootstrap resamples of the fits (each one a curve_fit); the per-batch means take scipy's 9999
SEED = 0  # every resampling starts from this seed: the same folders give the same intervals
OVERHEAD = 0.2  # Zhang et al.'s tolerance: steps at most 20% above perfect scaling
MIN_FIT_BATCHES = 3  # two parameters: with two batches a fit goes through both points and says nothing
# Identity keys that say what is trained on what, and to which target: a search never varies them, so they always
# tell studies apart (even numeric ones, such as target.error or dataset.subset)
STUDY_KEYS = ("name", "dataset", "model", "target", "base.batch")
FINAL = ("completed", "diverged")  # a run that stopped (at the target, its plan, or a divergence)
INTERVAL = "95% percentile bootstrap"


# ------------------------------------------------------------------------------------------ one estimate
@dataclass
class Estimate:
    """A point estimate with its interval (None: no interval) and, where there is one, why it is missing."""

    value: float | None
    lo: float | None = None
    hi: float | None = None
    note: str = ""

    @property
    def has_interval(self) -> bool:
        return self.value is not None and self.lo is not None and self.hi is not None


def contain(value: float | None, lo: float | None, hi: float | None) -> tuple[float | None, float | None]:
    """(lo, hi) extended to `value` where they miss it: an interval never excludes its own point estimate."""
    if value is None or lo is None or hi is None:
        return lo, hi
    return min(lo, value), max(hi, value)


def _bootstrap(values: Sequence[float], statistic: Callable[..., Any]) -> tuple[float, float]:
    """scipy.stats.bootstrap's percentile interval, seeded (`rng` from scipy 1.15 on, `random_state` before)."""
    from scipy import stats

    kwargs: dict[str, Any] = {"confidence_level": CONFIDENCE, "method": "percentile", "n_resamples": 9999}
    data = (np.asarray(values, dtype=float),)
    try:
        res = stats.bootstrap(data, statistic, rng=np.random.default_rng(SEED), **kwargs)
    except TypeError:  # scipy < 1.15
        res = stats.bootstrap(data, statistic, random_state=np.random.default_rng(SEED), **kwargs)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_interval(values: Sequence[float]) -> Estimate:
    """The mean of `values` (one per seed) with a 95% percentile bootstrap interval over the seeds; one value has no
    interval, and a value that is infinite (a seed that never reached the target) leaves no finite mean."""
    if not values:
        return Estimate(None, note="no run")
    if any(not math.isfinite(v) for v in values):
        reached = sum(math.isfinite(v) for v in values)
        return Estimate(None, note=f"{reached} of {len(values)} seeds reached: no finite mean")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Estimate(mean, note="no interval: 1 seed")
    if max(values) == min(values):
        return Estimate(mean, mean, mean)  # every resample is the same (scipy would call it degenerate)
    lo, hi = contain(mean, *_bootstrap(values, np.mean))
    return Estimate(mean, lo, hi)


# -------------------------------------------------------------------------------------------- one run
@dataclass
class Crossing:
    """Where one run reached its target: the trainer's record, and the same read back from TensorBoard."""

    run: Run
    reached: bool
    update: int | None  # the first evaluation at or below the target (None: never reached)
    samples: float | None  # samples trained on up to it
    resolution: int | None  # the largest gap between evaluations up to the crossing
    tensorboard: int | None | str = "not checked"  # the first val/<metric> point at or below it; "not checked"

    @property
    def steps(self) -> float:
        """Updates to the target; infinite for a run that never reached it (it would need more than any number)."""
        return float(self.update) if self.reached and self.update is not None else math.inf

    @property
    def agrees(self) -> bool | None:
        """Whether TensorBoard's points put the crossing where the trainer recorded it; None: not checked."""
        return None if self.tensorboard == "not checked" else self.tensorboard == (self.update if self.reached
                                                                                   else None)


def crossing(run: Run) -> Crossing:
    """The run's target block as recorded (a block that says reached without an update counts as not reached)."""
    t = run.results.target or {}
    update = t.get("update")
    reached = bool(t.get("reached")) and update is not None
    samples = t.get("samples") if t.get("samples") is not None else (update * run.batch if reached else None)
    return Crossing(run, reached, int(update) if reached else None, float(samples) if reached else None,
                    t.get("resolution"))


def tensorboard_crossing(run: Run) -> int | None | str:
    """The first TensorBoard point of val/<metric> at or below the run's target (up to a divergence), compared at
    float32, the precision TensorBoard stores: rounding is monotonic, so a point the trainer found at or below the
    target is at or below it here too. None: never; "not checked": the run logged no such points."""
    t = run.results.target or {}
    points = run.scalars(f"val/{t.get('metric') or 'error'}")
    if not points or t.get("value") is None:
        return "not checked"
    target = np.float32(t["value"])
    stop = run.results.diverged_at
    for step, value in points:
        if stop is not None and step > stop:
            break
        if math.isfinite(value) and np.float32(value) <= target:
            return int(step)
    return None


def b_simple_at(c: Crossing) -> tuple[float | None, str]:
    """(B_simple at the run's target crossing, where it came from): the `gns/b_simple` point nearest the crossing on
    a log scale (it is measured at log-spaced steps and changes slowly in log t), else results.json's final value
    (a run that stopped at the target ends there)."""
    points = [(s, v) for s, v in c.run.scalars("gns/b_simple") if s >= 1 and math.isfinite(v)]
    if points and c.update is not None:
        step, value = min(points, key=lambda p: abs(math.log(p[0]) - math.log(max(c.update or 1, 1))))
        return float(value), f"tensorboard (update {step})"
    gns = c.run.results.gns or {}
    if gns.get("b_simple") is not None:
        return float(gns["b_simple"]), "results.json (final)"
    return None, ""


# ---------------------------------------------------------------------------------------- one batch size
@dataclass
class BatchResult:
    """One batch size of a study: its trials and the estimate from its confirmed configuration."""

    batch: int
    trials: int  # configurations run (each configuration is one trial)
    trials_reached: int  # configurations with a run that reached the target
    hparams: dict[str, Any]  # the confirmed (or best) configuration's searched hyperparameters
    confirmed: bool  # several seeds of one configuration (else the best trial alone)
    seeds: list[Crossing]  # the runs behind the estimate
    steps: Estimate
    samples: Estimate
    resolution: int | None
    b_simple: Estimate
    b_simple_source: str
    notes: list[str] = field(default_factory=list)
    winner_left_out: bool = False  # the search's winning trial, one of the configuration's seeds, is not counted

    @property
    def finite(self) -> bool:
        return self.steps.value is not None


def _configurations(runs: Sequence[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in sorted(runs, key=run_key):
        out.setdefault(identity_key(r.identity, ("seed",)), []).append(r)
    return out


def batch_result(batch: int, runs: Sequence[Run], searched: Sequence[str]) -> BatchResult:
    """The trials of one batch size of one study and the estimate from its confirmed configuration (the one with
    several seeds, less the search's own trial run); the best trial alone where no configuration has several."""
    configs = _configurations(runs)
    crossings = {k: [crossing(r) for r in rs] for k, rs in configs.items()}
    notes: list[str] = []
    winner_left_out = False
    multi = [k for k, rs in configs.items() if len({r.seed for r in rs}) > 1]
    reached = sum(any(c.reached for c in cs) for cs in crossings.values())
    if multi:
        # the most seeds; between equals (not expected of one search), the faster
        multi.sort(key=lambda k: (-len(configs[k]), statistics.fmean(c.steps for c in crossings[k])))
        if len(multi) > 1:
            notes.append(f"{len(multi)} configurations with several seeds: took the one with the most (several "
                         "studies that differ in a numeric key? select one with --where KEY=VALUE)")
        chosen = crossings[multi[0]]
        trial_seeds = {r.seed for k, rs in configs.items() if len(rs) == 1 for r in rs}
        confirmation = [c for c in chosen if c.run.seed not in trial_seeds]
        if confirmation and len(confirmation) < len(chosen):
            chosen = confirmation  # the trial that won the search was chosen for being fast: left out
            winner_left_out = True
    else:
        hits = [c for cs in crossings.values() for c in cs if c.reached]
        if hits:
            loss = lambda c: c.run.results.final_val_loss if c.run.results.final_val_loss is not None else math.inf  # noqa: E731
            chosen = [min(hits, key=lambda c: (c.steps, loss(c)))]
            notes.append("no configuration with several seeds: the best trial alone, no interval")
        else:
            chosen = []
            notes.append(f"none of {len(configs)} trials reached the target")
    for c in chosen:
        c.tensorboard = tensorboard_crossing(c.run)
        if c.agrees is False:
            notes.append(f"{c.run.path}: TensorBoard puts the crossing at {c.tensorboard}, results.json at "
                         f"{c.update if c.reached else 'never'}")
    first = chosen[0].run if chosen else runs[0]
    hparams = {k: shown(first.identity, k) for k in searched} if chosen else {k: "-" for k in searched}
    steps = mean_interval([c.steps for c in chosen])
    samples = mean_interval([c.samples if c.samples is not None else math.inf for c in chosen])
    resolutions = [c.resolution for c in chosen if c.reached and c.resolution is not None]
    b = [(v, src) for v, src in map(b_simple_at, (c for c in chosen if c.reached)) if v is not None]
    b_simple = mean_interval([v for v, _ in b]) if b else Estimate(None, note="not measured")
    sources = sorted({src.split(" (")[0] for _, src in b})
    if len(b) == 1 and b[0][1].startswith("results.json"):
        ci = (chosen[0].run.results.gns or {}).get("b_simple_ci")
        if ci and len(ci) == 2 and None not in ci:  # one seed: the estimator's own interval, not one over seeds
            lo, hi = contain(b[0][0], float(ci[0]), float(ci[1]))
            b_simple = Estimate(b[0][0], lo, hi, note="the estimator's interval (1 seed)")
    return BatchResult(batch, len(configs), reached, hparams, bool(multi), chosen, steps, samples,
                       max(resolutions) if resolutions else None, b_simple,
                       b[0][1] if len(b) == 1 else ", ".join(sources), notes, winner_left_out)


# -------------------------------------------------------------------------------------------- the fits
def _log_steps(b: np.ndarray, log_s_min: float, log_b_noise: float) -> np.ndarray:
    """log S(B) = log S_min + log(1 + B_noise / B)."""
    return log_s_min + np.log1p(np.exp(log_b_noise) / b)


def _log_samples(b: np.ndarray, log_e_min: float, log_b_noise: float) -> np.ndarray:
    """log E(B) = log E_min + log(1 + B / B_noise)."""
    return log_e_min + np.log1p(b / np.exp(log_b_noise))


def fit_steps(batches: Sequence[float], steps: Sequence[float]) -> tuple[float, float] | None:
    """(S_min, B_noise) of S(B) = S_min (1 + B_noise / B), least squares in log S (scipy.optimize.curve_fit), with
    B_noise bounded to 10^4 times beyond the measured batches (a bound reached reads as "beyond"); None with fewer
    than MIN_FIT_BATCHES points or a failed fit. Start: the straight line S = S_min + S_min B_noise / B."""
    b, y = np.asarray(batches, dtype=float), np.asarray(steps, dtype=float)
    if len(b) < MIN_FIT_BATCHES or not np.all(np.isfinite(y)) or np.any(y <= 0):
        return None
    slope, intercept = np.polyfit(1.0 / b, y, 1)
    return _fit(_log_steps, b, y, (intercept, slope / intercept) if slope > 0 and intercept > 0 else None)


def fit_samples(batches: Sequence[float], samples: Sequence[float]) -> tuple[float, float] | None:
    """(E_min, B_noise) of E(B) = E_min (1 + B / B_noise), least squares in log E, as `fit_steps`. Start: the
    straight line E = E_min + E_min B / B_noise."""
    b, y = np.asarray(batches, dtype=float), np.asarray(samples, dtype=float)
    if len(b) < MIN_FIT_BATCHES or not np.all(np.isfinite(y)) or np.any(y <= 0):
        return None
    slope, intercept = np.polyfit(b, y, 1)
    return _fit(_log_samples, b, y, (intercept, intercept / slope) if slope > 0 and intercept > 0 else None)


def _fit(model: Callable[..., np.ndarray], b: np.ndarray, y: np.ndarray,
         start: tuple[float, float] | None) -> tuple[float, float] | None:
    """(scale, B_noise) of `model` fitted to log y; a start that is no knee (the straight line has no positive slope
    and intercept) becomes the smallest value and the middle batch (geometric mean)."""
    from scipy.optimize import curve_fit

    lo_n, hi_n = math.log(b.min() / 1e4), math.log(b.max() * 1e4)
    scale, noise = start or (float(y.min()), float(np.exp(np.log(b).mean())))
    noise = min(max(noise, math.exp(lo_n) * 1.001), math.exp(hi_n) / 1.001)
    try:
        (log_scale, log_noise), _ = curve_fit(model, b, np.log(y), p0=(math.log(scale), math.log(noise)),
                                              bounds=([-np.inf, lo_n], [np.inf, hi_n]))
    except (RuntimeError, ValueError):
        return None
    return float(math.exp(log_scale)), float(math.exp(log_noise))


def zhang(batches: Sequence[int], steps: Sequence[float], overhead: float = OVERHEAD) -> dict[str, Any] | None:
    """Zhang et al.'s critical batch: the largest batch B such that every measured batch from the smallest, B_0, up
    to B has S(B) <= (1 + overhead) S(B_0) B_0 / B (an unreached batch has infinite steps: beyond). Returns
    {"batch", "all_within", "interpolated"}: the log-log interpolation of the crossing between the last batch within
    and the first beyond (log of steps relative to perfect scaling, linear in log B; None when every batch is within
    or the first beyond never reached the target); None without a finite S(B_0)."""
    order = sorted(range(len(batches)), key=lambda i: batches[i])
    b = [float(batches[i]) for i in order]
    s = [float(steps[i]) for i in order]
    if not b or not math.isfinite(s[0]):
        return None
    ratio = [si * bi / (s[0] * b[0]) for bi, si in zip(b, s)]  # steps relative to perfect scaling from B_0
    bound = 1.0 + overhead
    last = 0
    while last + 1 < len(b) and ratio[last + 1] <= bound:
        last += 1
    if last + 1 == len(b):
        return {"batch": int(b[last]), "all_within": True, "interpolated": None}
    r1, r2 = ratio[last], ratio[last + 1]
    interpolated = None
    if math.isfinite(r2):
        f = (math.log(bound) - math.log(r1)) / (math.log(r2) - math.log(r1))
        interpolated = math.exp(math.log(b[last]) + f * (math.log(b[last + 1]) - math.log(b[last])))
    again = [int(bi) for bi, ri in zip(b[last + 2:], ratio[last + 2:]) if ri <= bound]
    return {"batch": int(b[last]), "all_within": False, "interpolated": interpolated, "within_again": again}


# -------------------------------------------------------------------------------------------- one study
@dataclass
class Study:
    """One search: the runs that share everything but the batch, the seed and the searched hyperparameters."""

    index: int
    identity: dict[str, Any]  # the shared flat identity (no batch, seed or searched key)
    experiment: str
    dataset: str
    regime: str
    searched: list[str]
    target: dict[str, Any]
    batches: list[BatchResult]
    overhead: float
    fit: dict[str, Estimate] = field(default_factory=dict)
    fitted: list[int] = field(default_factory=list)  # the batches the McCandlish fit stands on
    zhang_choices: dict[int, int] = field(default_factory=dict)  # batch chosen -> resamples that chose it
    curves: np.ndarray | None = None  # bootstrap refits (S_min, B_noise), for the figure's band
    notes: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def measured(self) -> tuple[int, int]:
        """The smallest and largest batch the McCandlish fit stands on (confirmed, every seed reached; every batch
        before fitting): a fitted batch size outside them is an extrapolation."""
        bs = self.fitted or [r.batch for r in self.batches]
        return min(bs), max(bs)

    @property
    def shown_range(self) -> tuple[int, int]:
        """The smallest and largest batch in the study (the figures' x range)."""
        bs = [r.batch for r in self.batches]
        return min(bs), max(bs)


def searched_keys(runs: Sequence[Run]) -> list[str]:
    """The hyperparameters a search varied among these runs: identity keys with numeric values (or lists of them)
    outside STUDY_KEYS, batch and seed, that take more than one value."""
    def numeric(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return bool(v) and all(numeric(x) for x in v)
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    keys = {k for r in runs for k in without(r.identity, (*STUDY_KEYS, "batch", "seed"))}
    values: dict[str, set[str]] = {}
    for k in sorted(keys):
        vs = [r.identity.get(k) for r in runs]
        if all(v is None or numeric(v) for v in vs):
            values[k] = {json.dumps(v) for v in vs}
    return sorted(k for k, v in values.items() if len(v) > 1)


def per_batch_keys(runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
    """Of `keys`, those the search sets per batch size rather than per trial (the budget, `epochs=`): one value at
    each batch; only where some other key varies within a batch (otherwise each batch ran one trial, and its keys are
    still the searched ones)."""
    by: dict[int, list[Run]] = {}
    for r in runs:
        by.setdefault(r.batch, []).append(r)

    def constant(k: str) -> bool:
        return all(len({json.dumps(r.identity.get(k)) for r in rs}) == 1 for rs in by.values())

    fixed = [k for k in keys if constant(k)]
    return fixed if len(fixed) < len(keys) else []


def eligible(runs: Sequence[Run]) -> list[Run]:
    """Runs that enter the analysis: one per (configuration, seed), with a target block, and stopped (at the target,
    at the end of their plan, or by diverging); interrupted or failed runs may still reach it."""
    return [r for r in runs if r.duplicate_of is None and isinstance(r.results.target, dict)
            and r.results.status in FINAL]


def studies(runs: Sequence[Run], searched: Sequence[str] | None = None, overhead: float = OVERHEAD,
            resamples: int = RESAMPLES) -> list[Study]:
    """The studies among `runs` (see the module's docstring), each measured and fitted."""
    runs = eligible(runs)
    if searched is None:
        # first by what a search never varies, then the numeric keys that vary inside each such group
        groups: dict[str, list[Run]] = {}
        for r in runs:
            groups.setdefault(identity_key(r.identity, ("batch", "seed", *_non_study(r.identity))), []).append(r)
        split: list[tuple[list[str], list[Run]]] = []
        for members in groups.values():
            keys = searched_keys(members)
            by: dict[str, list[Run]] = {}
            for r in members:
                by.setdefault(identity_key(r.identity, ("batch", "seed", *keys)), []).append(r)
            split += [(keys, rs) for rs in by.values()]
    else:
        by = {}
        for r in runs:
            by.setdefault(identity_key(r.identity, ("batch", "seed", *searched)), []).append(r)
        split = [(sorted(k for k in searched if any(k in r.identity for r in rs)), rs) for rs in by.values()]
    split.sort(key=lambda kr: run_key(min(kr[1], key=run_key)))
    out = []
    for i, (keys, members) in enumerate(split, 1):
        first = members[0]
        budget = per_batch_keys(members, keys) if searched is None else []
        keys = [k for k in keys if k not in budget]
        by_batch: dict[int, list[Run]] = {}
        for r in members:
            by_batch.setdefault(r.batch, []).append(r)
        results = [batch_result(b, rs, keys) for b, rs in sorted(by_batch.items())]
        study = Study(i, without(first.identity, ("batch", "seed", *keys, *budget)), first.experiment,
                      first.dataset, first.regime, keys, dict(first.results.target or {}), results, overhead)
        if budget:
            study.notes.append(f"set per batch size by the search (not searched): {', '.join(budget)}")
        fit_study(study, resamples)
        out.append(study)
    labels = _labels(out)
    for s, label in zip(out, labels):
        s.label = label
    return out


def _non_study(flat: dict[str, Any]) -> list[str]:
    """The keys of a flat identity outside STUDY_KEYS with numeric values: the ones a search may vary."""
    return [k for k in without(flat, (*STUDY_KEYS, "batch", "seed"))
            if isinstance(flat[k], (int, float, list, tuple)) and not isinstance(flat[k], bool)]


def _labels(all_studies: Sequence[Study]) -> list[str]:
    keys = variant_keys([{**s.identity, "name": s.experiment} for s in all_studies])
    out = []
    for s in all_studies:
        extra = ", ".join(f"{k}={shown(s.identity, k)}" for k in keys)
        out.append(f"{s.experiment}" + (f" ({extra})" if extra else ""))
    return out


def fit_study(study: Study, resamples: int = RESAMPLES) -> None:
    """McCandlish et al.'s fits, B_crit, Zhang et al.'s critical batch and B_simple, each with its bootstrap
    interval (resampling the confirmation seeds within each batch, fixed seed), into `study.fit`."""
    # A batch without confirmation stands on its best trial, picked for being fast (biased low) and without any
    # seed spread to resample: where other batches are confirmed it is shown, never fitted.
    confirmed = any(r.confirmed for r in study.batches)
    rows = [r for r in study.batches if r.confirmed or not confirmed]
    left = [r.batch for r in study.batches if r not in rows]
    if left:
        study.notes.append(f"not fitted (best trial only, no confirmation seeds): B = {', '.join(map(str, left))}")
    fitted = [r for r in rows if r.finite]
    fit: dict[str, Estimate] = {}
    if len(fitted) < MIN_FIT_BATCHES:
        study.notes.append(f"no McCandlish fit: {len(fitted)} batch sizes with a finite mean (it needs "
                           f"{MIN_FIT_BATCHES})")
    rng = np.random.default_rng(SEED)
    steps_of = [np.array([c.steps for c in r.seeds]) for r in rows]
    samples_of = [np.array([c.samples if c.samples is not None else math.inf for c in r.seeds]) for r in rows]
    b_simple_of = [np.array([v for v in (b_simple_at(c)[0] for c in r.seeds if c.reached) if v is not None])
                   for r in rows]
    batches = np.array([r.batch for r in rows], dtype=float)
    in_fit = np.array([r.finite for r in rows], dtype=bool)  # the fits' resamples stand on the point fit's batches
    point_s = fit_steps([r.batch for r in fitted], [r.steps.value for r in fitted])  # type: ignore[misc]
    point_e = fit_samples([r.batch for r in fitted], [r.samples.value for r in fitted])  # type: ignore[misc]
    point_z = zhang([r.batch for r in rows], [r.steps.value if r.finite else math.inf for r in rows],
                    study.overhead)
    bs_points = [float(np.mean(v)) for v in b_simple_of if len(v)]
    point_b = statistics.median(bs_points) if bs_points else None

    draws: dict[str, list[float]] = {k: [] for k in ("S_min", "B_noise", "E_min", "B_noise_E", "B_crit",
                                                     "zhang_interp", "B_simple")}
    curves, choices = [], []
    for _ in range(resamples):
        pick = [rng.integers(0, len(v), len(v)) if len(v) else np.array([], dtype=int) for v in steps_of]
        s = np.array([float(np.mean(v[p])) if len(v) else math.inf for v, p in zip(steps_of, pick)])
        e = np.array([float(np.mean(v[p])) if len(v) else math.inf for v, p in zip(samples_of, pick)])
        ok = in_fit & np.isfinite(s) & np.isfinite(e)
        if point_s is not None:
            fs, fe = fit_steps(batches[ok], s[ok]), fit_samples(batches[ok], e[ok])
            if fs is not None and fe is not None:
                draws["S_min"].append(fs[0])
                draws["B_noise"].append(fs[1])
                draws["E_min"].append(fe[0])
                draws["B_noise_E"].append(fe[1])
                draws["B_crit"].append(fe[0] / fs[0])
                curves.append(fs)
        if point_z is not None:
            z = zhang([r.batch for r in rows], list(s), study.overhead)
            if z is not None:
                choices.append(z["batch"])
                if z["interpolated"] is not None:
                    draws["zhang_interp"].append(z["interpolated"])
        if point_b is not None:
            bpick = [v[rng.integers(0, len(v), len(v))] for v in b_simple_of if len(v)]
            draws["B_simple"].append(statistics.median(float(np.mean(v)) for v in bpick))

    def interval(name: str, value: float | None, note: str = "") -> Estimate:
        d = np.asarray(draws[name])
        if value is None:
            return Estimate(None, note=note)
        if len(d) < 2 or np.ptp(d) == 0 and not _resampled(rows):
            return Estimate(value, note=note or "no interval: no batch has several seeds")
        lo, hi = contain(value, *np.percentile(d, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)]))
        return Estimate(value, float(lo), float(hi), note)  # type: ignore[arg-type]

    if point_s is not None and point_e is not None:
        fit["S_min"] = interval("S_min", point_s[0])
        fit["B_noise"] = interval("B_noise", point_s[1])
        fit["E_min"] = interval("E_min", point_e[0])
        fit["B_noise (E fit)"] = interval("B_noise_E", point_e[1])
        fit["B_crit"] = interval("B_crit", point_e[0] / point_s[0])
        study.curves = np.array(curves) if curves else None
        if len(draws["B_crit"]) < resamples:
            study.notes.append(f"{resamples - len(draws['B_crit'])} of {resamples} resamples could not be fitted")
    if point_z is not None:
        study.zhang_choices = {b: choices.count(b) for b in sorted(set(choices))}
        if choices and _resampled(rows):
            lo = float(np.quantile(choices, (1 - CONFIDENCE) / 2, method="lower"))
            hi = float(np.quantile(choices, (1 + CONFIDENCE) / 2, method="higher"))
            lo, hi = contain(point_z["batch"], lo, hi)
        else:
            lo = hi = None
        fit["B_zhang"] = Estimate(float(point_z["batch"]), lo, hi,
                                  "every measured batch is within the bound" if point_z["all_within"] else
                                  ("" if lo is not None else "no interval: no batch has several seeds"))
        fit["B_zhang (interpolated)"] = interval(
            "zhang_interp", point_z["interpolated"],
            "" if point_z["interpolated"] is not None else
            ("every measured batch is within the bound" if point_z["all_within"]
             else "the first batch beyond never reached the target"))
        if point_z.get("within_again"):
            study.notes.append(f"Zhang et al.: B = {', '.join(map(str, point_z['within_again']))} is within the bound "
                               f"again, past the first batch beyond it (noise, or a curve that is not monotone): the "
                               f"critical batch is the last one before that first batch beyond")
    else:
        study.notes.append("no Zhang et al. critical batch: the smallest batch has no finite mean")
    fit["B_simple"] = interval("B_simple", point_b, "" if point_b is not None else "not measured")
    study.fit = fit
    study.fitted = [r.batch for r in fitted]


def _resampled(rows: Sequence[BatchResult]) -> bool:
    return any(len(r.seeds) > 1 for r in rows)


# ------------------------------------------------------------------------------------------- the tables
BATCH_VALUED = ("B_noise", "B_noise (E fit)", "B_crit", "B_zhang (interpolated)")
DEFINITIONS = {
    "S_min": ("McCandlish: S(B) = S_min (1 + B_noise / B), curve_fit in log S", "updates"),
    "B_noise": ("McCandlish: S(B) = S_min (1 + B_noise / B), curve_fit in log S", "samples"),
    "E_min": ("McCandlish: E(B) = E_min (1 + B / B_noise), curve_fit in log E", "samples"),
    "B_noise (E fit)": ("McCandlish: E(B) = E_min (1 + B / B_noise), curve_fit in log E", "samples"),
    "B_crit": ("B_crit = E_min / S_min (McCandlish et al. 2018)", "samples"),
    "B_zhang": ("Zhang: the largest B with S <= (1 + overhead) S(B_0) B_0 / B from B_0 on; interval: the batches "
                "chosen across resamples", "samples"),
    "B_zhang (interpolated)": ("Zhang's crossing, log-log interpolated between the last batch within and the first "
                               "beyond", "samples"),
    "B_simple": ("gradient noise scale at the target crossing of the confirmed runs, median over batches of the "
                 "mean over seeds", "samples"),
}


def shown_estimate(e: Estimate, measured: tuple[int, int] | None = None, short: bool = False) -> str:
    """"312 [250, 410]"; a batch-size estimate outside the measured batches as "> 4096 (beyond the largest batch
    measured)"; a missing interval with its reason (`short`, for a legend: "> 4096", no reason)."""
    def one(v: float) -> str:
        if measured is not None and v > measured[1]:
            return f"> {measured[1]}"
        if measured is not None and v < measured[0]:
            return f"< {measured[0]}"
        return number(float(v))

    if e.value is None:
        return e.note or "-"
    if measured is not None and not measured[0] <= e.value <= measured[1] and not short:
        where = "beyond the largest" if e.value > measured[1] else "below the smallest"
        text = f"{one(e.value)} ({where} batch measured)"
    else:
        text = one(e.value)
    if e.has_interval and not (one(e.lo) == one(e.hi) != number(float(e.lo))):  # type: ignore[arg-type]
        text += f" [{one(e.lo)}, {one(e.hi)}]"  # type: ignore[arg-type]  # (not "[> 512, > 512]")
    if e.note and not short:
        text += f" ({e.note})"
    return text


def _study_columns(all_studies: Sequence[Study]) -> dict[int, dict[str, Any]]:
    keys = variant_keys([{**s.identity, "name": s.experiment} for s in all_studies])
    return {s.index: {"study": s.index, "experiment": s.experiment, "dataset": s.dataset, "regime": s.regime,
                      **{k: shown(s.identity, k) for k in keys},
                      "target": f"{s.target.get('split', '?')} {s.target.get('metric', 'error')} <= "
                                f"{s.target.get('value')}"} for s in all_studies}


def batch_rows(all_studies: Sequence[Study]) -> list[dict[str, Any]]:
    """critical_batch: one row per study and batch size."""
    head = _study_columns(all_studies)
    searched = sorted({k for s in all_studies for k in s.searched})
    rows = []
    for s in all_studies:
        for r in s.batches:
            n_reached = sum(c.reached for c in r.seeds)
            checked = [c for c in r.seeds if c.agrees is not None]
            rows.append({
                **head[s.index], "batch": r.batch, "trials": r.trials, "trials_reached": r.trials_reached,
                **{k: r.hparams.get(k, "-") for k in searched},
                "estimate_from": (f"{len(r.seeds)} confirmation seed{'s' if len(r.seeds) > 1 else ''}"
                                  + (" (not the winning trial)"
                                                                          if r.winner_left_out else "")
                                  if r.confirmed else ("best trial" if r.seeds else "-")),
                "seeds_reached": f"{n_reached} of {len(r.seeds)}",
                "steps": r.steps.value, "steps_lo": r.steps.lo, "steps_hi": r.steps.hi,
                "samples": r.samples.value, "samples_lo": r.samples.lo, "samples_hi": r.samples.hi,
                "interval": INTERVAL if r.steps.has_interval else (r.steps.note or "-"),
                "resolution": r.resolution,
                "b_simple": r.b_simple.value, "b_simple_lo": r.b_simple.lo, "b_simple_hi": r.b_simple.hi,
                "b_simple_source": r.b_simple_source or "-",
                "tensorboard_check": (f"{sum(bool(c.agrees) for c in checked)} of {len(checked)} agree"
                                      if checked else "not checked"),
                "notes": "; ".join(r.notes) or "-"})
    return rows


def fit_rows(all_studies: Sequence[Study]) -> list[dict[str, Any]]:
    """critical_batch_fit: one row per study and quantity: the text a person reads ("312 [250, 410]", "> 4096
    (beyond the largest batch measured)"), and the estimate and interval as numbers (empty where a fitted batch
    size, or a bound of its interval, lies outside the batches measured: an extrapolation is no measurement)."""
    head = _study_columns(all_studies)
    rows = []
    for s in all_studies:
        for name, e in s.fit.items():
            measured = s.measured if name in BATCH_VALUED else None
            how, unit = DEFINITIONS[name]
            text = shown_estimate(e, measured)
            if name == "B_zhang" and s.zhang_choices:
                total = sum(s.zhang_choices.values())
                how += " (" + ", ".join(f"{b}: {100 * n / total:.0f}%" for b, n in s.zhang_choices.items()) + ")"
            beyond = name == "B_zhang" and e.note.startswith("every measured batch")
            if beyond:  # every batch within the bound: the critical batch is at or beyond the largest
                text = f">= {text}"
            known = _inside(e.value, measured) is not None and not beyond
            rows.append({**head[s.index], "quantity": name, "value": text,
                         "estimate": e.value if known else None,
                         "lo": _inside(e.lo, measured) if known else None,
                         "hi": _inside(e.hi, measured) if known else None,
                         "unit": unit, "overhead": s.overhead if name.startswith("B_zhang") else None,
                         "batches": f"{s.measured[0]}-{s.measured[1]} ({len(s.batches)} sizes)",
                         "method": how, "interval": _interval_text(name, e)})
    return rows


def _interval_text(name: str, e: Estimate) -> str:
    if not e.has_interval:
        return e.note or "-"
    if name == "B_zhang":
        return f"{100 * CONFIDENCE:.0f}% range of the batches chosen across resamples of the seeds"
    return f"{INTERVAL} of refits on resamples of the seeds" if name in DEFINITIONS and name != "B_simple" else INTERVAL


def _inside(v: float | None, measured: tuple[int, int] | None) -> float | None:
    """`v`, or None where it is a batch size outside the batches measured."""
    return v if v is None or measured is None or measured[0] <= v <= measured[1] else None


def notes(all_studies: Sequence[Study]) -> str:
    """What the tables' numbers are, and each study's own notes (Markdown, written under the tables)."""
    lines = [f"Steps: updates to the first evaluation at or below the target (the trainer's record, checked against "
             f"TensorBoard); per batch the mean over the confirmation seeds, {INTERVAL} (scipy.stats.bootstrap, seed "
             f"{SEED}); `resolution`: the largest gap between evaluations up to the crossing. Fits: "
             f"scipy.optimize.curve_fit in log space; intervals: 2.5-97.5 percentiles of refits on {RESAMPLES} "
             f"resamples of the seeds within each batch (seed {SEED})."]
    for s in all_studies:
        lines.append(f"\nStudy {s.index}: {s.label}; searched: {', '.join(s.searched) or 'nothing'}.")
        lines += [f"- {n}" for n in s.notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- the figures
def _span(ax: Any, e: Estimate, measured: tuple[int, int], colour: Any, label: str, hatch: str | None = None) -> None:
    """The estimate's interval as a shaded vertical span and its point as a line; outside the batches measured, the
    part that is outside is cut at the axes and says so in the legend."""
    if e.value is None:
        return
    lo_ax, hi_ax = measured[0] / 2, measured[1] * 2
    inside = measured[0] <= e.value <= measured[1]
    # (B_simple is measured, not fitted: its value is shown as it is, wherever it lies)
    text = f"{label} = {shown_estimate(e, None if label == 'B_simple' else measured, short=True)}"
    if e.has_interval:
        ax.axvspan(max(e.lo, lo_ax), min(e.hi, hi_ax), color=colour, alpha=0.15, hatch=hatch,  # type: ignore[type-var]
                   fill=hatch is None, linewidth=0, label="_nolegend_")
    ax.axvline(min(max(e.value, lo_ax), hi_ax), color=colour, linestyle="-." if hatch else ":",
               alpha=0.9 if inside else 0.4, label=text)


def critical_figure(study: Study) -> Figure:
    """Steps to the target against the batch (log-log): per batch the mean over the confirmation seeds with its
    interval (seeds as dots), perfect scaling from the smallest batch and Zhang's bound above it, the McCandlish fit
    with its band, the B_crit interval and the B_simple interval."""
    fig, ax = new_figure()
    rows = [r for r in study.batches if r.finite and r.batch in study.fitted]
    for r in study.batches:
        ys = [c.steps for c in r.seeds if c.reached]
        ax.plot([r.batch] * len(ys), ys, marker=".", linestyle="none", color="grey", alpha=0.5, label="_nolegend_")
    alone = [r for r in study.batches if r.finite and r.batch not in study.fitted]
    if alone:
        ax.plot([r.batch for r in alone], [r.steps.value for r in alone], marker="o", linestyle="none",
                markerfacecolor="none", color=color(0), label="best trial only (not fitted)")
    if rows:
        b = np.array([r.batch for r in rows], dtype=float)
        s = np.array([r.steps.value for r in rows], dtype=float)
        lo = np.array([r.steps.lo if r.steps.lo is not None else r.steps.value for r in rows], dtype=float)
        hi = np.array([r.steps.hi if r.steps.hi is not None else r.steps.value for r in rows], dtype=float)
        ax.errorbar(b, s, yerr=[s - lo, hi - s], marker="o", linestyle="none", color=color(0), capsize=3,
                    label=f"mean over seeds, {INTERVAL}")
        grid = np.geomspace(study.shown_range[0] / 1.5, study.shown_range[1] * 1.5, 100)
        ref = study.batches[0]
        if ref.finite:
            perfect = ref.steps.value * ref.batch / grid  # type: ignore[operator]
            ax.plot(grid, perfect, color="black", linestyle="--", alpha=0.6, label="perfect scaling")
            ax.plot(grid, (1 + study.overhead) * perfect, color="black", linestyle=":", alpha=0.4,
                    label=f"+{100 * study.overhead:.0f}% (Zhang et al.)")
        if "S_min" in study.fit and study.fit["S_min"].value is not None:
            s_min, b_noise = study.fit["S_min"].value, study.fit["B_noise"].value
            ax.plot(grid, s_min * (1 + b_noise / grid), color=color(1), label="S_min (1 + B_noise / B)")  # type: ignore[operator]
            if study.curves is not None and len(study.curves) > 1:
                band = study.curves[:, :1] * (1 + study.curves[:, 1:] / grid[None, :])
                ax.fill_between(grid, *np.percentile(band, [2.5, 97.5], axis=0), color=color(1), alpha=0.2,
                                linewidth=0, label="_nolegend_")
    unreached = [r.batch for r in study.batches if not r.finite]
    if unreached:
        top = max((r.steps.value for r in rows), default=1.0) * 1.5  # type: ignore[type-var]
        ax.plot(unreached, [top] * len(unreached), marker="^", linestyle="none", color=color(3),
                label="no finite mean (not reached)")
    if "B_crit" in study.fit:
        _span(ax, study.fit["B_crit"], study.measured, color(1), "B_crit")
    _span(ax, study.fit.get("B_simple", Estimate(None)), study.measured, color(2), "B_simple", hatch="//")
    if "B_zhang" in study.fit:
        ax.axvline(study.fit["B_zhang"].value, color=color(4), linestyle="--", alpha=0.6,  # type: ignore[arg-type]
                   label=f"Zhang et al. = {shown_estimate(study.fit['B_zhang'], short=True)}")
    log_axes(ax, x=True, y=True, xbase=2)
    ax.set_xlim(study.shown_range[0] / 2, study.shown_range[1] * 2)
    return finish(fig, ax, "batch size B", "updates to reach the target, S",
                  f"Study {study.index}: {study.label}")


def tradeoff_figure(study: Study) -> Figure:
    """Samples against steps to the target (McCandlish et al.'s trade-off curve), per batch with their intervals,
    and the fitted (S_min (1 + B_noise / B), E_min (1 + B / B_noise)) over the batches."""
    fig, ax = new_figure()
    rows = [r for r in study.batches if r.finite and r.batch in study.fitted]
    alone = [r for r in study.batches if r.finite and r.batch not in study.fitted]
    if alone:
        ax.plot([r.steps.value for r in alone], [r.samples.value for r in alone], marker="o", linestyle="none",
                markerfacecolor="none", color=color(0), label="best trial only (not fitted)")
        for r in alone:
            ax.annotate(f"B={r.batch}", (r.steps.value, r.samples.value), textcoords="offset points", xytext=(4, 4),
                        fontsize="x-small")
    if rows:
        s = np.array([r.steps.value for r in rows], dtype=float)
        e = np.array([r.samples.value for r in rows], dtype=float)
        xerr = [s - np.array([r.steps.lo if r.steps.lo is not None else v for r, v in zip(rows, s)]),
                np.array([r.steps.hi if r.steps.hi is not None else v for r, v in zip(rows, s)]) - s]
        yerr = [e - np.array([r.samples.lo if r.samples.lo is not None else v for r, v in zip(rows, e)]),
                np.array([r.samples.hi if r.samples.hi is not None else v for r, v in zip(rows, e)]) - e]
        ax.errorbar(s, e, xerr=xerr, yerr=yerr, marker="o", linestyle="none", color=color(0), capsize=3,
                    label="per batch (mean over seeds)")
        for r, x, y in zip(rows, s, e):
            ax.annotate(f"B={r.batch}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
        if "S_min" in study.fit and study.fit["S_min"].value is not None:
            s_min, b_noise = study.fit["S_min"].value, study.fit["B_noise"].value
            e_min, b_noise_e = study.fit["E_min"].value, study.fit["B_noise (E fit)"].value
            grid = np.geomspace(study.shown_range[0] / 4, study.shown_range[1] * 4, 200)
            ax.plot(s_min * (1 + b_noise / grid), e_min * (1 + grid / b_noise_e), color=color(1),  # type: ignore[operator]
                    label="(S_min (1 + B_noise/B), E_min (1 + B/B_noise))")
            ax.axvline(s_min, color="grey", linestyle=":", label=f"S_min = {s_min:.4g}")  # type: ignore[arg-type]
            ax.axhline(e_min, color="grey", linestyle="--", label=f"E_min = {e_min:.4g}")  # type: ignore[arg-type]
    log_axes(ax, x=True, y=True)
    return finish(fig, ax, "updates to the target, S", "samples to the target, E",
                  f"Study {study.index}: {study.label} (trade-off)")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


# ------------------------------------------------------------------------------------------------ entry
def has_targets(runs: Sequence[Run]) -> bool:
    """Whether some run carries a target block (a search's trial or confirmation): the section then runs by itself."""
    return any(isinstance(r.results.target, dict) for r in runs if r.duplicate_of is None)


def write_critical(runs: Sequence[Run], out_dir: str | Path, overhead: float = OVERHEAD, figures: bool = True,
                   searched: Sequence[str] | None = None,
                   resamples: int = RESAMPLES) -> tuple[dict[str, list[dict[str, Any]]], list[Path], list[Study]]:
    """critical_batch.md/.csv, critical_batch_fit.md/.csv and (with `figures`) critical_batch.png and tradeoff.png
    (per study, `_<n>` after the name, when there are several) into `out_dir`. Returns (tables, files, studies)."""
    out_dir = Path(out_dir)
    found = studies(runs, searched, overhead, resamples)
    if not found:
        return {}, [], []
    for s in found:
        for r in s.batches:
            for c in r.seeds:
                if c.agrees is False:
                    print(f"lbtrain-report: warning: {c.run.path}: TensorBoard's val/"
                          f"{s.target.get('metric') or 'error'} reaches the target at {c.tensorboard}, "
                          f"results.json at {c.update if c.reached else 'never'}", file=sys.stderr)
    tables = {"critical_batch": batch_rows(found), "critical_batch_fit": fit_rows(found)}
    text = notes(found)
    files = write_tables(tables, out_dir, notes={"critical_batch": text, "critical_batch_fit": text})
    if figures:
        for s in found:
            suffix = "" if len(found) == 1 else f"_{s.index}"
            files.append(save_png(critical_figure(s), out_dir / f"critical_batch{suffix}.png"))
            files.append(save_png(tradeoff_figure(s), out_dir / f"tradeoff{suffix}.png"))
    return tables, files, found


def section(tables: dict[str, list[dict[str, Any]]], found: Sequence[Study]) -> str:
    """The report's stdout section."""
    if not found:
        return "Critical batch: no run carries a target block (a search's runs do)\n"
    searched = sorted({k for s in found for k in s.searched})
    per_batch = [{"study": r["study"], "batch": r["batch"],
                  "trials (reached)": f"{r['trials']} ({r['trials_reached']})",
                  **{k: r[k] for k in searched}, "from": r["estimate_from"], "reached": r["seeds_reached"],
                  "steps": _text(r, "steps"), "samples": _text(r, "samples"), "resolution": r["resolution"],
                  "B_simple": _text(r, "b_simple"), "notes": r["notes"]} for r in tables["critical_batch"]]
    fits = [{"study": r["study"], "quantity": r["quantity"], "value": r["value"],
             "overhead": r["overhead"]} for r in tables["critical_batch_fit"]]
    return ("Critical batch: steps to the target per batch size, mean [95% interval] over the confirmation seeds "
            "(full tables: critical_batch.md/.csv)\n\n" + to_markdown(per_batch)
            + "\nCritical batch: fits (McCandlish et al. 2018, Zhang et al. 2024) and B_simple at the target\n\n"
            + to_markdown(fits) + "\n" + notes(found))


def _text(row: dict[str, Any], name: str) -> str:
    """"1495 [1442, 1548]" from a per-batch row's value and interval columns."""
    v, lo, hi = row[name], row[f"{name}_lo"], row[f"{name}_hi"]
    if v is None:
        return "-"
    return number(float(v)) + (f" [{number(float(lo))}, {number(float(hi))}]" if lo is not None else "")
