"""lbtrain: a config-driven experiment runner for large-batch training research."""

from typing import Any

__all__ = [
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "apply_deferred_stats",
    "convert_to_ghost_bn",
    "defer_running_stats",
    "set_ghost_batch",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that `lbtrain` reports config mistakes without paying for the torch import.
    if name in __all__:
        from lbtrain import ghost_bn

        return getattr(ghost_bn, name)
    raise AttributeError(f"module 'lbtrain' has no attribute {name!r}")
