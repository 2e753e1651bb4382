"""lbtrain: a config-driven experiment runner for large-batch training research."""

from lbtrain.ghost_bn import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, convert_to_ghost_bn

__all__ = ["GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "convert_to_ghost_bn"]
__version__ = "0.1.0"
