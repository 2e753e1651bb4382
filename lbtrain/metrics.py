"""Measurements of a run: weight distance from initialization, its log-t fit, and when to take them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


@torch.no_grad()
def weight_distance(params: Sequence[torch.Tensor], w0: Sequence[torch.Tensor]) -> torch.Tensor:
    """||w_t - w_0||_2 over all given parameters, as a 0-d tensor on their device (no host sync)."""
    diffs = torch._foreach_sub(list(params), list(w0))
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs)))


def log_spaced_steps(total: int, per_decade: int = 20) -> set[int]:
    """Updates at which to measure the distance: every update up to 10, then `per_decade` per decade."""
    steps = set(range(1, min(total, 10) + 1))
    if total > 10:
        n = int(math.ceil(per_decade * math.log10(total))) + 1
        steps.update(int(round(s)) for s in np.logspace(0, math.log10(total), n))
    steps.add(total)
    return {s for s in steps if 1 <= s <= total}


def fit_log(steps: Sequence[float], values: Sequence[float]) -> dict[str, float | None]:
    """Least-squares fit values ~ a + b log(steps); returns a, b and R^2 (None when under 3 points)."""
    t = np.asarray(steps, dtype=float)
    d = np.asarray(values, dtype=float)
    keep = (t >= 1) & np.isfinite(d)
    t, d = t[keep], d[keep]
    if len(t) < 3 or np.ptp(np.log(t)) == 0:
        return {"a": None, "b": None, "r2": None}
    b, a = np.polyfit(np.log(t), d, 1)
    pred = a + b * np.log(t)
    ss_res = float(np.sum((d - pred) ** 2))
    ss_tot = float(np.sum((d - d.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"a": float(a), "b": float(b), "r2": float(r2)}


def keep_points(checkpoint_cfg: Any, total: int) -> set[int]:
    """The updates at which a run keeps a checkpoint in its history: `checkpoint.keep` (values >= 1 are updates,
    values in (0, 1) fractions of the plan's `total` updates) and `checkpoint.keep_per_decade` log-spaced points per
    decade with the last update."""
    points = set()
    for k in checkpoint_cfg.keep or ():
        update = max(1, round(float(k) * total)) if float(k) < 1 else int(k)
        if update <= total:
            points.add(update)
    per_decade = int(checkpoint_cfg.keep_per_decade or 0)
    if per_decade:  # 10**(i / per_decade) for i = 0, 1, ..., rounded (1, 3, 10, 32, ... at 2), and the last update
        n = int(math.floor(per_decade * math.log10(total) + 1e-9))
        points |= {int(round(10 ** (i / per_decade))) for i in range(n + 1)} | {total}
    return points
