"""Zagoruyko & Komodakis 2016 Wide ResNet WRN-d-k (pre-activation blocks, widths 16/16k/32k/64k)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3, with a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        # when projecting, the shortcut also sees the pre-activated input (as in the reference code)
        identity = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + identity


class WideResNet(nn.Module):
    def __init__(
        self, depth: int, widen: int, num_classes: int, dropout: float = 0.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"wrn: depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen < 1:
            raise ValueError(f"wrn: widen must be >= 1, got {widen}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = 16
        for planes, stride in zip(widths, (1, 2, 2), strict=True):
            for i in range(n):
                blocks.append(WideBlock(in_planes, planes, stride if i == 0 else 1, dropout))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)  # final pre-activation BN before pooling
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def build_wrn(
    num_classes: int, input_shape: tuple[int, ...], depth: int = 16, widen: int = 4, dropout: float = 0.0
) -> nn.Module:
    return WideResNet(depth, widen, num_classes, dropout=dropout, in_channels=input_shape[0])
