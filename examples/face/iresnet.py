"""An ArcFace-style IResNet face-embedding network, registered in layertap through `factory`.

The layout and parameter names follow insightface's ``arcface_torch/backbones/iresnet.py``
(conv1/bn1/prelu, layer1..layer4 of IBasicBlock, bn2, dropout, fc, features), so a state dict
trained there loads with ``weights = "/path/to/backbone.pth"`` (or a ``.safetensors`` file) in
the config. Without such a file the weights are random (seeded, so every load is identical):
fine for plumbing and tests, useless for recognising anyone.

Input: a 112x112 RGB face crop ALIGNED by the caller (5-point similarity transform to the
ArcFace template), normalised as (x - 127.5) / 127.5, i.e. mean 0.5, std 0.5 on [0, 1] pixels.
Output node `features`: the 512-d embedding (BatchNorm1d after the FC); L2-normalise it and
compare with cosine similarity.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["IBasicBlock", "IResNet", "iresnet"]

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN → conv → BN → PReLU → conv(stride) → BN, plus the (projected) shortcut."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    """112x112 → 512-d. Four stride-2 stages leave a 7x7 map, flattened into the FC (no global
    pooling: the embedding keeps where on the aligned face each feature was)."""

    fc_scale = 7 * 7

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        num_features: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-05),
        )
        layers: list[nn.Module] = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet(depth: int = 18, num_features: int = 512, seed: int | None = 0) -> IResNet:
    """IResNet-18/34/50/100. `seed` makes the random init reproducible (without touching the
    global RNG), so a test can build the same network in-process; real weights replace it."""
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
    if seed is None:
        return IResNet(DEPTHS[depth], num_features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IResNet(DEPTHS[depth], num_features)
