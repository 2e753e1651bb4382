"""Measurement instruments for large-batch training research, and their registry (torch-free; see `base`).

Estimators (self-contained, torch and numpy only, nothing else from lbtrain):
- :mod:`lbtrain.instruments.gns`: gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018).
- :mod:`lbtrain.instruments.hessian`: sharpness, i.e. the top Hessian eigenvalue (Lanczos) and the Hessian trace
  (Hutchinson), from Hessian-vector products (compare PyHessian, Yao et al. 2020).

Instruments (plug-ins attached to a run through its public hooks; one entry each below):
- `gns` (:mod:`~lbtrain.instruments.noise_scale`, `gns=true`, options `gns_options.bn=train|eval`,
  `gns_options.beta`): B_simple at log steps, corrected for the finite training set, with an interval.
- `sharpness` (:mod:`~lbtrain.instruments.sharpness`, `sharpness.every_epochs=N`): lambda_max and trace at epoch ends.
- `layer_distance` (:mod:`~lbtrain.instruments.layer_distance`, `layer_distance=true`): ||w_t - w_0|| per layer.
"""

from __future__ import annotations

from typing import Any

from lbtrain.instruments.base import InstrumentSpec, register


def _check_sharpness(node: Any, train_size: int | None) -> None:
    from lbtrain.config import ConfigError  # (lbtrain.config reads this registry: imported when used)

    for key in ("every_epochs", "trace_samples"):
        if not isinstance(node[key], int) or node[key] < 0:
            raise ConfigError(f"sharpness.{key}", node[key], "must be an integer >= 0 (0: off)")
    for key in ("samples", "iters"):
        if not isinstance(node[key], int) or node[key] < 1:
            raise ConfigError(f"sharpness.{key}", node[key], "must be an integer >= 1")
    if train_size is not None and node.every_epochs and node.samples > train_size:
        raise ConfigError("sharpness.samples", node.samples, f"must be at most the {train_size} training samples")


def _check_gns(node: Any, train_size: int | None) -> None:
    from lbtrain.config import ConfigError

    if node.bn not in ("train", "eval"):
        raise ConfigError("gns_options.bn", node.bn, "allowed: train, eval")
    if not isinstance(node.beta, (int, float)) or not 0 <= node.beta < 1:
        raise ConfigError("gns_options.beta", node.beta, "must be in [0, 1)")


register(InstrumentSpec("gns", "gns", enabled=bool, factory="lbtrain.instruments.noise_scale:GNSProbe",
                        check=_check_gns, options="gns_options"))
register(InstrumentSpec("sharpness", "sharpness", enabled=lambda node: bool(node and node.every_epochs),
                        factory="lbtrain.instruments.sharpness:SharpnessProbe", check=_check_sharpness))
register(InstrumentSpec("layer_distance", "layer_distance", enabled=bool,
                        factory="lbtrain.instruments.layer_distance:LayerDistance"))
