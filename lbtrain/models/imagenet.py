"""Any torchvision classification model by name (e.g. ResNet-50 for ImageNet), randomly initialised."""

from __future__ import annotations

from typing import Any

from torch import nn


def build_torchvision(
    num_classes: int, input_shape: tuple[int, ...], arch: str = "resnet50", **kwargs: Any
) -> nn.Module:
    import torchvision  # lazily: importing torchvision costs ~1.5 s of start-up for every other model

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise ValueError(
            f"torchvision: unknown classification arch {arch!r}; choose from {sorted(available)}"
        )
    if input_shape[0] != 3:
        # torchvision stems are hard-wired to RGB input
        raise ValueError(f"torchvision: {arch} expects 3 input channels, got input_shape={input_shape}")
    # extra kwargs (e.g. aux_logits, dropout) go straight to the torchvision constructor
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
