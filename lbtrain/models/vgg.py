"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman 2015 configs, 512 -> num_classes classifier)."""

from __future__ import annotations

from torch import Tensor, nn

# convs per stage; each stage is followed by a 2x2 max pool, so five pools take 32x32 to 1x1x512
STAGE_WIDTHS = (64, 128, 256, 512, 512)
STAGE_DEPTHS: dict[int, tuple[int, ...]] = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}


class VGG(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"vgg: depth must be one of {sorted(STAGE_DEPTHS)}, got {depth}")
        layers: list[nn.Module] = []
        ch = in_channels
        for width, n_convs in zip(STAGE_WIDTHS, STAGE_DEPTHS[depth], strict=True):
            for _ in range(n_convs):
                layers += [nn.Conv2d(ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                ch = width
            # ceil_mode is a no-op for 32x32 (all sizes even); it stops small inputs (28, 8) shrinking to 0x0
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        # identity for 32x32 inputs; lets other resolutions reuse the same 512 -> num_classes classifier
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build_vgg(num_classes: int, input_shape: tuple[int, ...], depth: int = 16) -> nn.Module:
    return VGG(depth, num_classes, in_channels=input_shape[0])
