"""Small custom models the tests register through the config's `factory` key."""

from __future__ import annotations

from torch import nn


class TinyNet(nn.Module):
    """Conv → ReLU(inplace) → 3 max-pools: refuses inputs smaller than 8x8, like real CNNs do."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True))
        self.pools = nn.Sequential(*(nn.MaxPool2d(2) for _ in range(3)))
        self.head = nn.Linear(width, 4)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.pools(self.stem(x))
        return self.head(x.mean((2, 3)))


def tiny_net(width: int = 8) -> nn.Module:
    return TinyNet(width)


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace through it (it must be a leaf)."""

    def forward(self, x):  # type: ignore[no-untyped-def]
        if x.mean() > 0:
            return x * 2
        return -x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.gate(self.conv(x)).mean((2, 3)))


def gated_net() -> nn.Module:
    return GatedNet()
