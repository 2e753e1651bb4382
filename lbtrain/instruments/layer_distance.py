"""The `layer_distance` instrument (`layer_distance=true`): ||w_t - w_0|| per layer (module) at the same log-spaced
updates as the total distance, as `weights/distance/<layer>`. After the fact (`lbtrain-measure RUN layer_distance`),
`measure()` gives the same numbers from a checkpoint's weights and its w_0.
"""

from __future__ import annotations

from typing import Any

import torch

from lbtrain.instruments.base import Run


class LayerDistance:
    """||w_t - w_0|| of each layer at the trainer's distance points (measured on the device, read at log points)."""

    def __init__(self, trainer: Run, node: Any = True) -> None:
        names = [n for n, p in trainer.net.named_parameters() if p.requires_grad]
        layers = [n.rsplit(".", 1)[0] if "." in n else n for n in names]
        self.layers = list(dict.fromkeys(layers))
        index = {name: i for i, name in enumerate(self.layers)}
        self.owner = torch.tensor([index[lay] for lay in layers])
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.t = trainer
        trainer.hooks.distance.append(lambda run, step: self.record(step))
        trainer.hooks.flush.append(lambda run: self.flush())

    def _per_layer(self) -> torch.Tensor:
        t = self.t
        with torch.no_grad():
            diffs = torch._foreach_sub(t.params, t.w0)
            sq = torch.stack(torch._foreach_norm(diffs)).square()
            per_layer = torch.zeros(len(self.layers), device=sq.device).index_add_(0, self.owner.to(sq.device), sq)
        return per_layer.sqrt()

    def record(self, step: int) -> None:
        """Measure now, on the device (read and written at the next flush)."""
        self.pending.append((step, self._per_layer()))

    def measure(self) -> dict[str, Any]:
        """Measure now and write it at once (after the fact: `lbtrain-measure`): {layer: ||w_t - w_0||}."""
        step = self.t.state.step
        row = dict(zip(self.layers, self._per_layer().tolist()))
        self.t.tb.scalars(step, {f"weights/distance/{name}": v for name, v in row.items()})
        return {"update": step, "distance": row}

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([v for _, v in self.pending]).tolist()  # one host read for all of them
        for (step, _), row in zip(self.pending, values):
            self.t.tb.scalars(step, {f"weights/distance/{name}": v for name, v in zip(self.layers, row)})
        self.pending = []

    def results(self) -> dict[str, Any] | None:
        return None  # the curves are in TensorBoard

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
