"""The torch device a `device=` setting names, checked to exist on this machine.

A module of its own so that both the run layer (the pre-flight check, the trainer) and the analysis
(`lbtrain-interp --device`) can ask without the analysis importing the run layer.
"""

from __future__ import annotations

import torch

from lbtrain.config import ConfigError


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device for `device=` (auto: CUDA when present, else the CPU); ConfigError when not available."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device", name, "CUDA is not available on this machine; use device=cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError("device", name, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("device", name, "MPS (Apple GPU) is not available on this machine; use device=cpu or auto")
    return torch.device(name)
