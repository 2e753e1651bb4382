"""Fully connected MLP (Hoffer et al. 2017, model F1 on MNIST: 784 -> 5x[512, BN, ReLU] -> 10)."""

from __future__ import annotations

import math

from torch import Tensor, nn


class MLP(nn.Module):
    """flatten -> depth x [Linear(hidden), BatchNorm1d, ReLU] -> Linear(num_classes)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 512, depth: int = 5) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"fc: depth must be >= 1, got {depth}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # flatten (reshape) so NCHW and channels_last inputs both work
        return self.classifier(self.features(x.flatten(1)))


def build_fc(num_classes: int, input_shape: tuple[int, ...], hidden: int = 512, depth: int = 5) -> nn.Module:
    return MLP(math.prod(input_shape), num_classes, hidden=hidden, depth=depth)
