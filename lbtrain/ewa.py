"""Exponential weight averaging (EWA) of a model's parameters, for evaluation only (Zhang et al. 2024, "How does
critical batch size scale in pre-training?": steps to a target measured on averaged weights do not depend on the
length of the LR schedule).

After every update w_avg <- d w_avg + (1 - d) w with d = min(decay, (1 + t) / (10 + t)), t the updates averaged
so far: the usual warm-up of the average (timm's ModelEmaV2 and others use the same), so the first evaluations do
not read an average dominated by the initial weights. The average lives in a copy of the model; its buffers
(BatchNorm running statistics) are the live model's, copied at each evaluation. Cost: one fused `lerp` over the
parameters per update.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    def __init__(self, net: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay {decay} must be in (0, 1)")
        self.decay = decay
        self.net = copy.deepcopy(net)  # holds the averaged parameters; never trained
        self.net.requires_grad_(False)
        self.params = [p for p, live in zip(self.net.parameters(), net.parameters()) if live.requires_grad]
        self.updates = 0

    @torch.no_grad()
    def update(self, params: list[torch.Tensor]) -> None:
        """Average in the current parameters (`params`: the live model's trained parameters, in order)."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.params, params, 1.0 - d)

    @torch.no_grad()
    def model(self, live: nn.Module) -> nn.Module:
        """The averaged model, with the live model's buffers (BatchNorm running statistics) copied in."""
        for mine, theirs in zip(self.net.buffers(), live.buffers()):
            mine.copy_(theirs)
        return self.net

    def state_dict(self) -> dict[str, Any]:
        return {"params": [p.detach().clone() for p in self.params], "updates": self.updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p, saved in zip(self.params, state["params"]):
            p.copy_(saved)
        self.updates = int(state["updates"])


__all__ = ["WeightAverage"]
