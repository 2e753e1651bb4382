"""Stopping at a target: where to look, and deciding cheaply that a look has not reached it.

A run with `target.error=E` (or `target.loss=L`) evaluates its validation (holdout) split at `target_steps`, at most
`target.resolution` of the update count apart, and stops at the first point at or below the target (Shallue et al.
2018's steps to result). Evaluating the whole split at every such point cost two thirds of an F1/MNIST trial, so
at those points the trainer only asks the question the stop needs, exactly:

**the bound.** The error over n samples is (wrong samples)/n. Counting wrong samples over any part of the split
gives a lower bound, so once the count over a prefix exceeds E n the whole split is above the target, whatever the
rest holds: the point is decided without evaluating it. (For a loss target, per-sample losses are >= 0 and the
same holds for the loss sum.) Only a point that is at or below the target needs the whole split, and that is
evaluated as any validation is (`Trainer.validate`, logged), so the crossing and its value are those of a full
evaluation. The decision does not depend on the order of the samples: the order only decides how soon it is made.

**hardest first.** The samples are taken in decreasing order of their loss at their last evaluation: between two
points 2% apart few predictions change, so the samples wrong last time are nearly all wrong again and the bound is
exceeded after about E n of them. Chunks start at 1.25 E n samples (at least 32) and double.

Not logged: a bounded point has no value for the whole split (it has a lower bound), so TensorBoard shows val/* at
the full evaluations only (epoch ends, `eval_per_decade`, the crossing). `target.log_all=true` evaluates the whole
split at every point instead (the dense curve near the crossing, at the old cost; same decisions, same run).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

# A loss target compares float sums made in another order than the full evaluation's: a prefix counts as above
# the target only when it is this much (relative) above, so rounding can never call a crossing "above".
LOSS_MARGIN = 1e-5


def target_steps(total: int, resolution: float) -> set[int]:
    """Evaluation points for stopping at a target: every update up to 1/resolution, then every ceil(resolution t),
    so consecutive evaluations are at most `resolution` of the update count apart (2%: 1..50, then 51, 53, 55,
    ...). About 1/r + ln(T r)/r points: 280 for T = 5000 at 2%."""
    steps, t = set(), 1
    while t <= total:
        steps.add(t)
        t += max(1, int(-(-resolution * t // 1)))  # ceil(resolution t), at least one update
    steps.add(total)
    return steps


class TargetBound:
    """The hardest-first order of a validation split of `n` samples and the bound that decides a point above the
    target (see the module's docstring). `metric` is "error" or "loss", `value` the target."""

    def __init__(self, metric: str, value: float, n: int, device: torch.device) -> None:
        if metric not in ("error", "loss"):
            raise ValueError(f"metric {metric!r} must be 'error' or 'loss'")
        self.metric, self.value, self.n = metric, float(value), int(n)
        # per-sample loss at the sample's last evaluation: the order is its decreasing sort
        self.scores = torch.full((self.n,), math.inf, device=device)  # never evaluated: looked at first
        # a bound needs more than E n wrong samples: the first chunk holds a quarter more than that
        first = math.ceil(1.25 * value * n) + 1 if metric == "error" else math.ceil(n / 8)
        self.first = min(self.n, max(32, first))

    def order(self) -> torch.Tensor:
        """Sample indices, hardest first (stable: ties keep the split's order)."""
        return torch.argsort(self.scores, descending=True, stable=True)

    def chunks(self) -> Iterator[tuple[int, int]]:
        """[lo, hi) of the order's prefix chunks: `first` samples, then doubling."""
        lo, size = 0, self.first
        while lo < self.n:
            hi = min(self.n, lo + size)
            yield lo, hi
            lo, size = hi, 2 * size

    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """The per-sample losses just measured at `indices` (they order the next look)."""
        self.scores[indices] = losses.float()

    def above(self, partial: float) -> bool:
        """Whether a prefix's count of wrong samples (or its loss sum) proves the whole split above the target."""
        if self.metric == "error":
            return partial / self.n > self.value  # the full evaluation's own formula, with a smaller count
        return partial / self.n > self.value * (1 + LOSS_MARGIN)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores.copy_(state["scores"].to(self.scores.device))


__all__ = ["TargetBound", "target_steps", "LOSS_MARGIN"]
