"""Measurement instruments for large-batch training research, and their registry (torch-free; see `base`).

Estimators (self-contained, torch and numpy only, nothing else from lbtrain):
- :mod:`lbtrain.instruments.gns`: gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018).
- :mod:`lbtrain.instruments.hessian`: sharpness, i.e. the top Hessian eigenvalue (Lanczos) and the Hessian trace
  (Hutchinson), from Hessian-vector products (compare PyHessian, Yao et al. 2020).

Instruments (plug-ins attached to a run through its public hooks; one entry each below):
- `gns` (:mod:`~lbtrain.instruments.noise_scale`, `gns=true`, options `gns_options.bn=train|eval`,
  `gns_options.beta`): B_simple at log steps, corrected for the finite training set, with an interval.
- `sharpness` (:mod:`~lbtrain.instruments.sharpness`, `sharpness.every_epochs=N`, `sharpness.every_steps=N`,
  `sharpness.per_decade=K`; `sharpness.bn=train|eval`, `sharpness.bn_batch`): top-k eigenvalues, trace with its
  standard error, batch sharpness and the edge-of-stability thresholds 2/lr, 2(1+m)/lr.
- `layer_distance` (:mod:`~lbtrain.instruments.layer_distance`, `layer_distance=true`): ||w_t - w_0|| per layer.
"""

from __future__ import annotations

from typing import Any

from lbtrain.instruments.base import InstrumentSpec, register


def _sharpness_on(node: Any) -> bool:
    """On when any cadence is set (epoch ends, every N updates, log-spaced updates)."""
    return bool(node and (node.every_epochs or node.get("every_steps") or node.get("per_decade")))


def _check_sharpness(node: Any, train_size: int | None) -> None:
    from lbtrain.config import ConfigError  # (lbtrain.config reads this registry: imported when used)

    def integer(key: str, low: int, allowed: str) -> None:
        if isinstance(node[key], bool) or not isinstance(node[key], int) or node[key] < low:
            raise ConfigError(f"sharpness.{key}", node[key], allowed)

    for key in ("every_epochs", "every_steps", "per_decade", "batch_batches"):
        integer(key, 0, "must be an integer >= 0 (0: off)")
    for key in ("samples", "iters", "top_k", "bn_batch"):
        integer(key, 1, "must be an integer >= 1")
    integer("trace_samples", 0, "must be an integer >= 0 (0: no trace)")
    if node.trace_samples == 1:
        raise ConfigError("sharpness.trace_samples", 1, "must be 0 (no trace) or >= 2 (a standard error needs two "
                                                        "probes)")
    if node.bn not in ("train", "eval"):
        raise ConfigError("sharpness.bn", node.bn, "allowed: train, eval")
    if node.top_k > node.iters:
        raise ConfigError("sharpness.top_k", node.top_k, f"must be at most sharpness.iters={node.iters} (Lanczos "
                                                         "steps)")
    if not _sharpness_on(node):
        return
    if train_size is not None and node.samples > train_size:
        raise ConfigError("sharpness.samples", node.samples, f"must be at most the {train_size} training samples")
    if node.bn_batch > node.samples:
        raise ConfigError("sharpness.bn_batch", node.bn_batch, f"must be at most sharpness.samples={node.samples} "
                                                               "(the fixed samples are split into batches of it)")


def _check_gns(node: Any, train_size: int | None) -> None:
    from lbtrain.config import ConfigError

    if node.bn not in ("train", "eval"):
        raise ConfigError("gns_options.bn", node.bn, "allowed: train, eval")
    if not isinstance(node.beta, (int, float)) or not 0 <= node.beta < 1:
        raise ConfigError("gns_options.beta", node.beta, "must be in [0, 1)")


register(InstrumentSpec("gns", "gns", enabled=bool, factory="lbtrain.instruments.noise_scale:GNSProbe",
                        check=_check_gns, options="gns_options"))
register(InstrumentSpec("sharpness", "sharpness", enabled=_sharpness_on,
                        factory="lbtrain.instruments.sharpness:SharpnessProbe", check=_check_sharpness))
register(InstrumentSpec("layer_distance", "layer_distance", enabled=bool,
                        factory="lbtrain.instruments.layer_distance:LayerDistance"))
