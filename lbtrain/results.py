"""The one schema of `results.json`, how it is written (strict JSON) and read (tolerantly, but never wrongly).

The trainer writes it, the CLI writes it for a job that failed before training, the report and the tests read
it: all through `Results`. Values that are not finite (a diverged run's loss) are written as `null`, so every
file parses with a strict JSON parser.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    # convenience copies of identity keys, for people reading the file
    experiment: str | None = None
    dataset: str | None = None
    model: str | None = None
    regime: str | None = None
    optimizer: str | None = None
    batch: int | None = None
    base_batch: int | None = None
    ghost_batch: int | None = None
    bn_batch: int | None = None  # samples per BatchNorm statistic (ghost batch, micro-batch or per-process batch)
    seed: int | None = None
    lr: float | None = None  # the effective (scaled) LR of the first phase
    # outcome
    final_val_error: float | None = None
    final_val_loss: float | None = None
    best_val_error: float | None = None
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
    gns: dict[str, Any] | None = None  # final gradient-noise-scale estimates, when measured
    sharpness: dict[str, Any] | None = None  # last sharpness measurement, when measured
    version: str | None = None  # lbtrain version that wrote the file
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know (kept when rewriting)

    @property
    def finished_plan(self) -> bool:
        """Completed every update of its plan: the only runs whose numbers enter means in a report."""
        return self.status == "completed" and self.planned_updates is not None and self.updates >= self.planned_updates

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: Any) -> Results:
        if not isinstance(d, dict):
            raise ResultsError(f"holds {type(d).__name__ if d is not None else 'null'}, not a results object")
        if d.get("status") not in STATUSES:
            raise ResultsError(f"has status {d.get('status')!r}, not one of {', '.join(STATUSES)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


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
