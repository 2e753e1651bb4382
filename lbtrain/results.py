"""The one schema of `results.json`, how it is written (strict JSON) and read (tolerantly, but never wrongly).

The trainer writes it, the CLI writes it for a job that failed before training, the report and the tests read
it: all through `Results`. What a run *is* (experiment, dataset, model, regime, optimizer, batch, ...) is never
filled in by hand: `Results.of_run` derives those copies from the run's identity and plan (`describe`), and the
TensorBoard HParams are the same record (`hparams`). Each instrument's results sit under its registry name.
Values that are not finite (a diverged run's loss) are written as `null`, so every file parses with a strict JSON
parser.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbtrain.identity import flatten, fmt
from lbtrain.instruments.base import REGISTRY as INSTRUMENTS

STATUSES = ("completed", "diverged", "interrupted", "failed")
FINAL = ("completed", "diverged")  # a run in one of these states is never trained again


class ResultsError(ValueError):
    """A results.json that is not a results object (unreadable, not JSON, or not a JSON object)."""


@dataclass
class Results:
    status: str  # completed | diverged | interrupted | failed
    identity: dict[str, Any] = field(default_factory=dict)  # the resolved identity (see lbtrain.identity)
    identity_hash: str | None = None
    error: str | None = None  # failed runs: what went wrong, on one line
    # copies of what the run is, for people reading the file: derived by `describe`, never set by hand
    experiment: str | None = None
    dataset: str | None = None
    model: str | None = None
    regime: str | None = None
    optimizer: str | None = None
    batch: int | None = None  # the batch it trains at (the plan's first; regime.momentum may set it)
    base_batch: int | None = None
    ghost_batch: int | None = None
    bn_batch: int | None = None  # samples per BatchNorm statistic (ghost batch, micro-batch or per-process batch)
    seed: int | None = None
    lr: float | None = None  # the effective (scaled) LR of the first phase
    # outcome
    final_val_error: float | None = None
    final_val_loss: float | None = None
    best_val_error: float | None = None
    final_test_error: float | None = None  # dataset.holdout: the official validation split, evaluated at the end
    final_test_loss: float | None = None
    updates: int = 0
    planned_updates: int | None = None  # the plan's length (max_steps may stop a run before it)
    target_updates: int | None = None  # where this run stops: min(planned_updates, max_steps)
    epochs: float | None = None
    wall_time_s: float | None = None
    images_per_sec: float | None = None
    final_distance: float | None = None
    distance_fit: dict[str, Any] = field(default_factory=dict)  # a, b, r2, points of ||w_t - w_0|| ~ a + b log t
    diverged_at: int | None = None  # update at which divergence was noticed
    effective: dict[str, Any] = field(default_factory=dict)  # the plan (regime.Plan.summary())
    world_size: int = 1
    train_size: int | None = None  # samples trained on (the subset's size when dataset.subset is set)
    # stop at a target (target.error / target.loss): {"metric", "value", "split", "reached", "update", "samples",
    # "resolution"} - the first evaluation at or below the target, and the largest gap between evaluations there
    target: dict[str, Any] | None = None
    instruments: dict[str, Any] = field(default_factory=dict)  # name -> its results (top-level keys in the file)
    version: str | None = None  # lbtrain version that wrote the file
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know (kept when rewriting)

    @property
    def finished_plan(self) -> bool:
        """Completed every update of its plan: the only runs whose numbers enter means in a report."""
        return self.status == "completed" and self.planned_updates is not None and self.updates >= self.planned_updates

    @property
    def gns(self) -> dict[str, Any] | None:
        return self.instruments.get("gns")

    @property
    def sharpness(self) -> dict[str, Any] | None:
        return self.instruments.get("sharpness")

    @classmethod
    def of_run(cls, status: str, identity: dict[str, Any], identity_hash: str | None,
               plan: dict[str, Any] | None = None, bn_batch: int | None = None, **outcome: Any) -> Results:
        """The one constructor: what the run is from its identity and plan (`describe`), plus its outcome."""
        return cls(status=status, identity=identity, identity_hash=identity_hash,
                   **describe(identity, plan, bn_batch), **({"effective": plan} if plan else {}), **outcome)

    def hparams(self) -> dict[str, Any]:
        """The TensorBoard HParams of the run: every key of its identity (flat; lists and nulls as text), so the
        HParams view can tell apart any two runs, plus what the plan made of them (batch, LR, epochs)."""
        out: dict[str, Any] = {k: v if isinstance(v, (int, float, str, bool)) else fmt(v)
                               for k, v in flatten(self.identity).items()}
        out.update({"trained.batch": self.batch, "trained.lr": self.lr, "trained.epochs": self.effective.get("epochs"),
                    "identity": self.identity_hash, "experiment": self.experiment, "regime": self.regime})
        return {k: v for k, v in out.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        skip = ("extra", "instruments")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        measured = {name: self.instruments.get(name) for name in INSTRUMENTS} | self.instruments
        return {**self.extra, **measured, **d}

    @classmethod
    def from_dict(cls, d: Any) -> Results:
        if not isinstance(d, dict):
            raise ResultsError(f"holds {type(d).__name__ if d is not None else 'null'}, not a results object")
        if d.get("status") not in STATUSES:
            raise ResultsError(f"has status {d.get('status')!r}, not one of {', '.join(STATUSES)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "instruments"}
        known = {k: v for k, v in d.items() if k in names}
        measured = {k: v for k, v in d.items() if k in INSTRUMENTS and v is not None}
        rest = {k: v for k, v in d.items() if k not in names and k not in INSTRUMENTS}
        return cls(**known, instruments=measured, extra=rest)


def describe(identity: dict[str, Any], plan: dict[str, Any] | None = None,
             bn_batch: int | None = None) -> dict[str, Any]:
    """What a run is, as results.json spells it, from its identity and (when it got that far) its plan
    (`regime.Plan.summary()`): the plan's values where the regime changes them (batch, LR, ghost batch)."""
    def get(*path: str) -> Any:
        node: Any = identity
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        return node

    ghost = get("ghost_batch") if get("regime", "ghost_bn") else None
    out = {"experiment": get("name"), "dataset": get("dataset", "name"), "model": get("model", "name"),
           "regime": get("regime", "name"), "optimizer": get("optimizer", "name"), "batch": get("batch"),
           "base_batch": get("base", "batch"), "ghost_batch": ghost, "seed": get("seed"), "bn_batch": bn_batch}
    if plan:
        out.update(batch=plan["batch_schedule"][0][1], ghost_batch=plan["ghost_batch"], lr=plan["lr"])
    return out


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Strict JSON text (non-finite floats as null), indented, keys sorted."""
    return json.dumps(strict(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def read_results(path: str | Path) -> Results | None:
    """The Results in `path`; None when there is no such file; ResultsError when it is not a results object."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ResultsError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ResultsError(f"{path}: not JSON ({e})") from None
    try:
        return Results.from_dict(data)
    except ResultsError as e:
        raise ResultsError(f"{path}: {e}") from None
