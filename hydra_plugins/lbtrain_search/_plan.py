"""What a search runs, as pure arithmetic: the quasi-random points, the trials' overrides, the budget, the choice of
the best trial and its confirmation runs. No Hydra launcher and no torch here, so that the CLI's whole-sweep check
(`lbtrain.cli._sweep_jobs`) and the sweeper expand a search into exactly the same jobs.

A search (Shallue et al. 2018, Section 3.3 and Appendix B of "Measuring the effects of data parallelism") is, for
every batch size B of `batches`, `trials` runs at points of a scrambled Sobol sequence (the same unit points for
every B) mapped into a search space (`space`: one dimension per searched key), each run stopping at its target
(`target.error` / `target.loss`) within a budget of updates; the best trial of a batch is the one that reached the
target in the fewest updates. Values are rounded to a few significant digits, so that run folders stay readable and
a re-run composes the same values bit for bit (and so finds its finished runs).

A dimension of the space (`hydra.sweeper.space.<name>`):
  key: the override it sets (`base.lr`, `base.momentum`, `optimizer.betas.1`, `regime.warmup_epochs`, ...)
  scale: log (value = 10^x), log1m (value = 1 - 10^x: momentum, Adam's beta2) or linear (value = x)
  low, high: the range of x (for log1m, of log10(1 - value))
  centre, width: instead of low/high (scale log only): x within log10(c) +- width, c = reference * (B/base.batch)^p
    with p from the rule `centre` (none 0, sqrt 0.5, linear 1, or a number) and `reference` (null: base.lr)
  digits: significant digits kept (of 1 - value for log1m)
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

RULES = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
SCALES = ("log", "log1m", "linear")
UNITS = ("epochs", "samples", "steps")
# keys a trial sets itself: the study (the command line's other overrides) may not set them too
SEARCH_SET = ("batch", "epochs")
# a trial skips the test split (dataset.holdout: trials are ranked on the holdout, and only the confirmed runs'
# test error is reported); its confirmation runs evaluate it. A study that sets eval_test itself keeps its choice.
TRIAL_ONLY = "eval_test=false"


def SearchError(key: str, value: Any, allowed: str) -> Exception:  # noqa: N802 - raised like a class
    """A search setting that cannot work: lbtrain's ConfigError (one line: the key, its value and what is allowed),
    so the CLI reports it like any other config mistake. Imported here, not at the top: Hydra imports every plugin
    module at start-up, in every Hydra application of the environment."""
    from lbtrain.config import ConfigError

    return ConfigError(key, value, allowed)


@dataclass(frozen=True)
class Dimension:
    name: str
    key: str
    scale: str
    low: float | None = None
    high: float | None = None
    centre: str | float | None = None
    width: float | None = None
    reference: float | None = None
    digits: int = 3

    def bounds(self, batch: int, base_batch: int, base_lr: float) -> tuple[float, float]:
        """The range of x (the scale's coordinate) at this batch size."""
        if self.centre is None:
            return float(self.low), float(self.high)  # type: ignore[arg-type]
        power = RULES[self.centre] if isinstance(self.centre, str) else float(self.centre)
        ref = self.reference if self.reference is not None else base_lr
        c = math.log10(ref) + power * math.log10(batch / base_batch)
        return c - float(self.width), c + float(self.width)  # type: ignore[arg-type]

    def value(self, t: float, batch: int, base_batch: int, base_lr: float) -> str:
        """The override's value (text, so that it composes the same float every time) at unit coordinate t."""
        lo, hi = self.bounds(batch, base_batch, base_lr)
        x = lo + (hi - lo) * t
        if self.scale == "log":
            return significant(10.0 ** x, self.digits)
        if self.scale == "log1m":  # round 1 - value, where the digits matter (0.99312, not 0.993)
            return str(Decimal(1) - Decimal(significant(10.0 ** x, self.digits)))
        return significant(x, self.digits)


@dataclass(frozen=True)
class Trial:
    """One run of the search: a batch size, a point of the space (or a confirmation seed) and its overrides."""

    batch: int
    index: int  # the point's index in the Sobol sequence (the same index is the same unit point at every batch)
    values: dict[str, str]  # key -> value text
    epochs: str
    steps: int  # the budget in updates
    overrides: list[str] = field(default_factory=list)
    seed: int | None = None  # set for a confirmation run


def significant(x: float, digits: int) -> str:
    """`x` with `digits` significant digits, as the shortest text that reads back as that float."""
    if x == 0 or not math.isfinite(x):
        return repr(float(x))
    return repr(float(f"{x:.{digits}g}"))


def dimensions(space: Mapping[str, Any]) -> list[Dimension]:
    """The space's dimensions in a fixed order (their names sorted: a YAML's key order is not the point's axis)."""
    dims = []
    for name in sorted(space):
        d = dict(space[name] or {})
        where = f"hydra.sweeper.space.{name}"
        unknown = set(d) - {"key", "scale", "low", "high", "centre", "width", "reference", "digits"}
        if unknown:
            raise SearchError(f"{where}.{sorted(unknown)[0]}", d[sorted(unknown)[0]], "unknown key (allowed: key, "
                              "scale, low, high, centre, width, reference, digits)")
        if not d.get("key"):
            raise SearchError(f"{where}.key", d.get("key"), "must name the override this dimension sets")
        scale = d.get("scale", "log")
        if scale not in SCALES:
            raise SearchError(f"{where}.scale", scale, f"allowed: {', '.join(SCALES)}")
        centre = d.get("centre")
        if centre is not None:
            if scale != "log":
                raise SearchError(f"{where}.centre", centre, "a centre rule needs scale log")
            if isinstance(centre, str) and centre not in RULES:
                raise SearchError(f"{where}.centre", centre, f"allowed: {', '.join(RULES)} or a power (number)")
            if not isinstance(d.get("width"), (int, float)) or d["width"] <= 0:
                raise SearchError(f"{where}.width", d.get("width"), "must be a number > 0 (decades either side)")
            ref = d.get("reference")
            if ref is not None and (not isinstance(ref, (int, float)) or ref <= 0):
                raise SearchError(f"{where}.reference", ref, "must be a number > 0 (null: base.lr)")
        else:
            lo, hi = d.get("low"), d.get("high")
            if not all(isinstance(v, (int, float)) for v in (lo, hi)) or not lo < hi:  # type: ignore[operator]
                raise SearchError(f"{where}.low", lo, f"give low < high (high={hi!r}), or centre and width")
        digits = d.get("digits", 3)
        if not isinstance(digits, int) or not 1 <= digits <= 12:
            raise SearchError(f"{where}.digits", digits, "must be an integer in [1, 12]")
        dims.append(Dimension(name=name, key=str(d["key"]), scale=scale, low=d.get("low"), high=d.get("high"),
                              centre=centre, width=d.get("width"), reference=d.get("reference"), digits=digits))
    if not dims:
        raise SearchError("hydra.sweeper.space", {}, "has no dimension (pick one: hydra/sweeper/space=sgd|adam)")
    return dims


def sobol_points(dims: int, trials: int, seed: int) -> list[list[float]]:
    """The first `trials` points of a scrambled Sobol sequence in [0, 1)^dims: a function of (dims, trials, seed)
    alone. Drawn as the first 2^m >= trials points (Sobol's balance holds for powers of two), then cut."""
    from scipy.stats import qmc

    m = max(0, math.ceil(math.log2(trials)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a future scipy may prefer rng= to seed=: same use, no message per run
        try:
            engine = qmc.Sobol(dims, scramble=True, seed=seed)
        except TypeError:  # a scipy without `seed`
            engine = qmc.Sobol(dims, scramble=True, rng=seed)
        points = engine.random_base2(m)
    return [[float(v) for v in row] for row in points[:trials]]


def budget_steps(budget: Mapping[str, Any], batch: int, train_size: int) -> int:
    """Updates a trial at `batch` may take: `amount` updates (unit steps), or ceil(samples / batch) with samples =
    `amount` (unit samples) or `amount` x the training set (unit epochs), never below `min_steps`."""
    unit, amount = budget.get("unit", "epochs"), budget.get("amount")
    floor = budget.get("min_steps") or 1
    if unit not in UNITS:
        raise SearchError("hydra.sweeper.budget.unit", unit, f"allowed: {', '.join(UNITS)}")
    if not isinstance(amount, (int, float)) or not amount > 0:
        raise SearchError("hydra.sweeper.budget.amount", amount, f"must be a number of {unit} > 0")
    if not isinstance(floor, int) or floor < 1:
        raise SearchError("hydra.sweeper.budget.min_steps", floor, "must be an integer >= 1")
    if unit == "steps":
        return max(math.ceil(amount), floor)
    samples = amount * train_size if unit == "epochs" else amount
    return max(math.ceil(samples / batch - 1e-9), floor)


def epochs_for(steps: int, batch: int, train_size: int, duplicates: int = 1) -> str:
    """`epochs=` text that gives exactly `steps` updates under lbtrain's rounding (an epoch is train_size //
    (batch / duplicates) updates; a fractional epoch rounds to the nearest update of its epoch)."""
    per_epoch = train_size // max(batch // duplicates, 1)
    e = Fraction(steps, per_epoch) if per_epoch else Fraction(steps * batch, train_size * duplicates)
    return str(e.numerator) if e.denominator == 1 else repr(float(f"{float(e):.10g}"))


def _key_of(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


@dataclass
class Study:
    """A search expanded: the trials, and what the confirmation runs need."""

    trials: list[Trial]
    study: list[str]  # the command line's overrides every trial carries
    seed: int  # the trials' seed
    confirm_seeds: int
    digest: str  # names the search's summary file


def settings(search: Mapping[str, Any]) -> dict[str, Any]:
    """The sweeper's settings with their defaults, checked."""
    out = {"batches": list(search.get("batches") or []), "trials": search.get("trials"),
           "seed": search.get("seed", 0), "confirm_seeds": search.get("confirm_seeds", 5),
           "budget": dict(search.get("budget") or {}), "space": dict(search.get("space") or {})}
    if not out["batches"] or any(not isinstance(b, int) or b < 1 for b in out["batches"]):
        raise SearchError("hydra.sweeper.batches", out["batches"], "must be a list of batch sizes >= 1")
    if len(set(out["batches"])) != len(out["batches"]):
        raise SearchError("hydra.sweeper.batches", out["batches"], "lists a batch size twice")
    for key in ("trials", "confirm_seeds"):
        if not isinstance(out[key], int) or out[key] < 1:
            raise SearchError(f"hydra.sweeper.{key}", out[key], "must be an integer >= 1")
    if not isinstance(out["seed"], int) or out["seed"] < 0:
        raise SearchError("hydra.sweeper.seed", out["seed"], "must be an integer >= 0")
    return out


def expand(search: Mapping[str, Any], study: Sequence[str], compose: Callable[[list[str]], Any]) -> Study:
    """Every trial of a search. `search`: the sweeper's config (plain containers); `study`: the command line's
    overrides (fixed for every trial); `compose(overrides)`: the job config those overrides give (a DictConfig)."""
    s = settings(search)
    dims = dimensions(s["space"])
    study = [str(o) for o in study]
    sweeps = [o for o in study if _is_sweep(o)]
    if sweeps:
        raise SearchError(_key_of(sweeps[0]), sweeps[0].split("=", 1)[1], "a search sweeps the batch sizes and its "
                          "space itself: give one value per key (run one search per setting)")
    owned = {d.key: f"hydra.sweeper.space.{d.name}" for d in dims} | {"batch": "hydra.sweeper.batches",
                                                                      "epochs": "hydra.sweeper.budget"}
    for o in study:
        key = _key_of(o)
        if key in owned:
            raise SearchError(key, o.split("=", 1)[1] if "=" in o else None,
                              f"is set by the search for every trial (see {owned[key]})")
    # regime=baseline first: the LR is taken as sampled (a regime given on the command line wins and is checked)
    prefix = [] if any(_key_of(o) == "regime" for o in study) else ["regime=baseline"]
    points = sobol_points(len(dims), s["trials"], s["seed"])
    trials: list[Trial] = []
    seed = 0
    own = [] if any(o.split("=")[0].lstrip("+~") == "eval_test" for o in study) else [TRIAL_ONLY]
    for batch in s["batches"]:
        cfg = compose([*prefix, *study, f"batch={batch}"])
        seed = int(cfg.seed)
        _check_study(cfg, dims)
        from lbtrain.data import train_size

        size = train_size(cfg.dataset)
        if size is None:
            raise SearchError("dataset.name", str(cfg.dataset.name), "its training-set size is known only after "
                              "loading it: a search needs it for the budget")
        duplicates = int(cfg.get("duplicates") or 1)
        steps = budget_steps(s["budget"], batch, size)
        epochs = epochs_for(steps, batch, size, duplicates)
        for i, t in enumerate(points):
            values = {d.key: d.value(u, batch, int(cfg.base.batch), float(cfg.base.lr)) for d, u in zip(dims, t)}
            overrides = [*prefix, *study, f"batch={batch}", f"epochs={epochs}",
                         *(f"{k}={v}" for k, v in values.items()), *own]
            trials.append(Trial(batch=batch, index=i, values=values, epochs=epochs, steps=steps, overrides=overrides))
    text = json.dumps([s, study], sort_keys=True, default=str)
    return Study(trials=trials, study=study, seed=seed, confirm_seeds=s["confirm_seeds"],
                 digest=hashlib.sha256(text.encode()).hexdigest()[:8])


def _is_sweep(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        (parsed,) = OverridesParser.create().parse_overrides([override])
    except Exception:  # noqa: BLE001 - the job's composition reports a malformed override in its own words
        return False
    return parsed.is_sweep_override()


def _check_study(cfg: Any, dims: list[Dimension]) -> None:
    """What a search needs of the composed config: a target to rank the trials by, and a regime that takes the
    sampled values as they are (no LR scaling, no epoch adaptation, no batch increase, no momentum rule)."""
    t = cfg.target
    if t.error is None and t.loss is None:
        raise SearchError("target.error", None, "a search ranks its trials by the updates to a target: set "
                          "target.error=E (or target.loss=L)")
    r = cfg.regime
    scaling = getattr(r.lr_scaling, "name", r.lr_scaling)
    if scaling != "none" or r.adapt_epochs or r.batch_increase or r.momentum is not None:
        raise SearchError("regime", str(r.name), "a search takes the sampled LR and momentum as they are: use a "
                          "regime without lr_scaling, adapt_epochs, batch_increase or momentum (regime=baseline)")
    optimizer = str(cfg.optimizer.name)
    for d in dims:
        if d.key.startswith("optimizer.betas") and optimizer not in ("adamw", "lamb"):
            raise SearchError(f"hydra.sweeper.space.{d.name}.key", d.key, f"optimizer={optimizer} has no betas "
                              "(use optimizer=adamw or lamb with this space)")


# ------------------------------------------------------------------------------------------------ outcomes
@dataclass
class Outcome:
    """What a trial's run recorded: its status, whether and where it reached the target, its final loss."""

    trial: Trial
    status: str  # completed | diverged | interrupted | failed | missing
    reached: bool = False
    update: int | None = None
    final_val_loss: float | None = None
    final_val_error: float | None = None
    run_dir: str | None = None
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"batch": self.trial.batch, "index": self.trial.index, "seed": self.trial.seed,
                "values": self.trial.values, "epochs": self.trial.epochs, "budget_steps": self.trial.steps,
                "status": self.status, "reached": self.reached, "update": self.update,
                "final_val_loss": self.final_val_loss, "final_val_error": self.final_val_error,
                "run_dir": self.run_dir, "run": self.run_dir.rsplit("/", 1)[-1] if self.run_dir else None,
                "error": self.error}  # run: the folder's name, beside this summary (outputs/<experiment>/)


def outcome(trial: Trial, results: Mapping[str, Any] | None, run_dir: str | None = None,
            error: str | None = None) -> Outcome:
    """An Outcome from a run's results (the job's return value or its results.json)."""
    if not results:
        return Outcome(trial, "failed" if error else "missing", run_dir=run_dir, error=error)
    target = results.get("target") or {}
    status = str(results.get("status"))
    reached = bool(target.get("reached")) and status == "completed"
    return Outcome(trial, status, reached=reached, update=target.get("update") if reached else None,
                   final_val_loss=results.get("final_val_loss"), final_val_error=results.get("final_val_error"),
                   run_dir=run_dir, error=error or results.get("error"))


def best(outcomes: Sequence[Outcome]) -> Outcome | None:
    """The trial that reached the target in the fewest updates; ties go to the lower final validation loss, then
    to the earlier point. None when no trial reached it."""
    reached = [o for o in outcomes if o.reached and o.update is not None]
    if not reached:
        return None

    def rank(o: Outcome) -> tuple[int, float, int]:
        loss = o.final_val_loss if isinstance(o.final_val_loss, (int, float)) else math.inf
        return (int(o.update), float(loss), o.trial.index)  # type: ignore[arg-type]

    return min(reached, key=rank)


def confirmations(winner: Trial, trial_seed: int, seeds: int) -> list[Trial]:
    """The best trial again with `seeds` new seeds, trial_seed + 1 .. trial_seed + seeds: the same overrides, only
    `seed` differs (and the test split is evaluated: `TRIAL_ONLY` dropped). The trial's own run is not one of them:
    it was picked for being fast, so counting it would bias the steps to target low (on digits the winning trial at
    B=128 took 4 updates, its re-run 39)."""
    return [Trial(batch=winner.batch, index=winner.index, values=winner.values, epochs=winner.epochs,
                  steps=winner.steps, overrides=[*(o for o in winner.overrides if o != TRIAL_ONLY), f"seed={s}"],
                  seed=s)
            for s in range(trial_seed + 1, trial_seed + seeds + 1)]


__all__ = ["SearchError", "Dimension", "Trial", "Study", "Outcome", "expand", "dimensions", "sobol_points",
           "budget_steps", "epochs_for", "significant", "outcome", "best", "confirmations", "settings"]
