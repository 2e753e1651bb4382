"""Model zoo: ``build_model({"name": ..., **kwargs}, num_classes, input_shape)``.

All models take float NCHW input (contiguous or channels_last) and use plain ``nn.BatchNorm1d/2d``
so that a later converter can swap in ghost batch norm.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .fc import build_fc
from .imagenet import build_torchvision
from .resnet import build_resnet_cifar
from .shallow import build_shallow
from .vgg import build_vgg
from .wrn import build_wrn

ModelBuilder = Callable[..., nn.Module]

REGISTRY: dict[str, ModelBuilder] = {
    "fc": build_fc,
    "shallow": build_shallow,
    "resnet_cifar": build_resnet_cifar,
    "wrn": build_wrn,
    "vgg": build_vgg,
    "torchvision": build_torchvision,
}
MODEL_NAMES: tuple[str, ...] = tuple(REGISTRY)

__all__ = ["MODEL_NAMES", "REGISTRY", "build_model", "count_parameters"]


def _check_kwargs(name: str, builder: ModelBuilder, kwargs: Mapping[str, Any]) -> None:
    # turn a typo in a config into a clear ValueError instead of a TypeError deep in a constructor
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [k for k in params if k not in ("num_classes", "input_shape")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r}: unknown option(s) {unknown}; allowed: {allowed}")


def build_model(spec: Mapping[str, Any], num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Build the model named by ``spec["name"]``.

    Model options are either the remaining top-level keys (``{"name": "wrn", "depth": 16}``) or nested
    under ``kwargs`` as in ``lbtrain.config.ModelConfig`` (``{"name": "wrn", "kwargs": {"depth": 16}}``).
    """
    kwargs = dict(spec)  # also accepts an OmegaConf DictConfig
    name = kwargs.pop("name", None)
    nested = dict(kwargs.pop("kwargs", None) or {})
    if clash := sorted(set(nested) & set(kwargs)):
        raise ValueError(f"model {name!r}: option(s) {clash} given both at top level and under 'kwargs'")
    kwargs.update(nested)
    if name not in REGISTRY:
        raise ValueError(f"unknown model name {name!r}; allowed names: {list(MODEL_NAMES)}")
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be per-sample (C, H, W), got {input_shape}")
    builder = REGISTRY[name]
    _check_kwargs(name, builder, kwargs)
    return builder(num_classes=int(num_classes), input_shape=input_shape, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters, as usually reported in papers."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
