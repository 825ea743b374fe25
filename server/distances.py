"""Compare's formulas: per-pair perceptual (LPIPS-style) and Gram-matrix style distances of
raw feature maps, pure tensor functions run in the decode pool (docs/DESCRIPTORS.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import InvalidArgument
from .spec import NodeSpec

# LPIPS's normalisation epsilon: x / (||x|| + eps) over channels at each position.
EPS = 1e-10
# The pair math runs in float64 on slices of this many map elements (32 MiB), not whole maps.
CHUNK_ELEMENTS = 1 << 22


def positions(
    x: torch.Tensor, layout: str, n_prefix: int = 0, dtype: torch.dtype | None = torch.float64
) -> torch.Tensor:
    """One image's map ([C, H, W], [H, W, C] or [L, C] tokens) → float64 [C, P]: channels by
    positions. Tokens are positions; the leading `n_prefix` (CLS/register) tokens are not.
    `dtype` None: the map's own dtype, a view where the layout allows (no copy)."""
    if layout == "NCHW":
        f = x.reshape(x.shape[0], -1)
    elif layout == "NHWC":
        f = x.reshape(-1, x.shape[-1]).T
    elif layout == "NLC":
        tokens = x[n_prefix:] if x.shape[0] > n_prefix else x
        f = tokens.T
    else:
        raise InvalidArgument(f"cannot compare layout {layout!r}; use NCHW, NHWC or NLC nodes")
    return f if dtype is None else f.to(dtype)


def unit_channels(f: torch.Tensor) -> torch.Tensor:
    """[C, P] with each position's channel vector scaled to unit length (LPIPS)."""
    return f / (f.norm(dim=0, keepdim=True) + EPS)


def layer_distance(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """mean over positions of ||a/|a| - b/|b|||^2 (channels summed), fa and fb [C, P]."""
    diff = unit_channels(fa) - unit_channels(fb)
    return float(diff.pow(2).sum(0).mean())


def gram(f: torch.Tensor) -> torch.Tensor:
    """G = F Fᵀ / (C·P) for F the [C, P] map (P = H·W)."""
    c, p = f.shape
    return (f @ f.T) / (c * p)


def style_distance(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """||G(a) - G(b)||_F^2."""
    return float((gram(fa) - gram(fb)).pow(2).sum())


def node_terms(fa: torch.Tensor, fb: torch.Tensor, style: bool) -> tuple[float, float]:
    """(layer_distance, style_distance) of two [C, P] maps in any float dtype, computed in
    float64 over slices of positions (CHUNK_ELEMENTS each), so a native-resolution map never
    has whole float64 copies: the same values as the formulas above, in bounded memory."""
    c, p = fa.shape
    step = max(1, CHUNK_ELEMENTS // max(c, 1))
    squares = 0.0
    ga = torch.zeros((c, c), dtype=torch.float64)
    gb = torch.zeros((c, c), dtype=torch.float64)
    for start in range(0, p, step):
        a = fa[:, start : start + step].to(torch.float64)
        b = fb[:, start : start + step].to(torch.float64)
        squares += float((unit_channels(a) - unit_channels(b)).pow(2).sum())
        if style:
            ga += a @ a.T
            gb += b @ b.T
    layer = squares / p
    return layer, float(((ga - gb) / (c * p)).pow(2).sum()) if style else 0.0


@dataclass(frozen=True)
class Distances:
    """One pair's terms, a value per node (style: empty unless asked for)."""

    layers: list[float]
    style: list[float]


def pair_distances(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    nodes: Sequence[NodeSpec],
    prefix: Mapping[str, int],
    style: bool,
) -> Distances:
    """Every node's terms for one pair (raw maps of one image each, keyed by full node name);
    `prefix`: each node's leading CLS/register tokens (Catalog.prefix_tokens), not positions."""
    layers, styles = [], []
    with torch.inference_mode():
        for node in nodes:
            fa = positions(a[node.name], node.layout, prefix[node.name], dtype=None)
            fb = positions(b[node.name], node.layout, prefix[node.name], dtype=None)
            layer, style_term = node_terms(fa, fb, style)
            layers.append(layer)
            if style:
                styles.append(style_term)
    return Distances(layers, styles)
