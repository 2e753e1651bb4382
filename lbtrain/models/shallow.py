"""Keskar et al.'s shallow conv net C1 (CIFAR-10) / C3 (CIFAR-100), as used by Hoffer et al. 2017."""

from __future__ import annotations

from torch import Tensor, nn


def _pooled(size: int) -> int:
    # conv5x5 pad 2 keeps the size; maxpool(3, stride 2, pad 1) maps n -> (n - 1) // 2 + 1
    return (size - 1) // 2 + 1


class ShallowConvNet(nn.Module):
    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, channels: int = 64, dropout: float = 0.5
    ) -> None:
        super().__init__()
        in_ch, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, channels, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.BatchNorm2d(channels),
            nn.Conv2d(channels, channels, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.BatchNorm2d(channels),
        )
        flat = channels * _pooled(_pooled(h)) * _pooled(_pooled(w))
        self.classifier = nn.Sequential(
            nn.Linear(flat, 384),
            nn.BatchNorm1d(384),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(384, 192),
            nn.BatchNorm1d(192),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(192, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        # flatten() reshapes, so channels_last feature maps are fine
        return self.classifier(self.features(x).flatten(1))


def build_shallow(
    num_classes: int, input_shape: tuple[int, ...], channels: int = 64, dropout: float = 0.5
) -> nn.Module:
    return ShallowConvNet(input_shape, num_classes, channels=channels, dropout=dropout)
