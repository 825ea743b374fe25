"""Pictures of feature maps and conv filters, rendered from plain numpy arrays.

Kept apart from the CLI so the maths (layouts, channel choice, heatmap resizing, kernel
normalisation) is testable without a server, and so matplotlib stays an optional extra
(``pip install 'layertap[viz]'``): it is imported only when a picture is actually drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VIZ_INSTALL_HINT = "pictures need matplotlib: pip install 'layertap[viz]'"

_TILE_IN = 1.4  # inches per tile: labels stay readable up to 64 tiles
_DPI = 100
_MAX_PREFIX_TOKENS = 16  # CLS + distillation + register tokens of common ViTs fit in this


class VizError(ValueError):
    """A feature map or weight that cannot be drawn, with a message that says why."""


def require_matplotlib() -> None:
    """Fail early, with the install hint, before any server call is wasted."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise VizError(f"{VIZ_INSTALL_HINT} ({exc})") from None


# ----------------------------------------------------------------------------- feature maps


def to_chw(array: np.ndarray, layout: str) -> np.ndarray:
    """One image's raw activation as [channels, height, width], whatever its layout.

    NCHW and NHWC (Swin) are spatial already; NLC (ViT tokens) is reshaped to a square
    patch grid after dropping the prefix (CLS, register) tokens. Pooled outputs and NC
    layouts have no spatial extent, so they are refused.
    """
    a = np.asarray(array, dtype=np.float32)
    batched_rank = 3 if layout == "NLC" else 4
    if a.ndim == batched_rank and a.shape[0] == 1:  # as ExtractResult stacks one image
        a = a[0]
    if layout == "NCHW" and a.ndim == 3:
        return a
    if layout == "NHWC" and a.ndim == 3:
        return np.ascontiguousarray(a.transpose(2, 0, 1))
    if layout == "NLC" and a.ndim == 2:
        tokens, channels = a.shape
        side = math.isqrt(tokens)
        prefix = tokens - side * side
        if side < 1 or prefix > _MAX_PREFIX_TOKENS:
            raise VizError(
                f"cannot arrange {tokens} tokens on a square patch grid "
                f"(nearest: {side}x{side} + {prefix} prefix tokens)"
            )
        grid = a[prefix:].reshape(side, side, channels)
        return np.ascontiguousarray(grid.transpose(2, 0, 1))
    raise VizError(
        f"a {layout or 'unknown'}-layout output of shape {list(a.shape)} has no spatial "
        "feature map to draw; pick a convolutional (NCHW/NHWC) or token (NLC) node and no pooling"
    )


def pick_channels(maps: np.ndarray, count: int, top: bool) -> list[int]:
    """The first ``count`` channels, or with ``top`` the ``count`` with the highest mean
    activation (most active first; ties keep channel order so the choice is deterministic)."""
    if count < 1:
        raise VizError(f"channel count must be at least 1, not {count}")
    n = maps.shape[0]
    if not top:
        return list(range(min(count, n)))
    means = maps.reshape(n, -1).mean(axis=1)
    order = np.argsort(-means, kind="stable")
    return [int(c) for c in order[:count]]


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D array (pixel-centre aligned, like PIL/OpenCV), numpy only so
    the heatmap needs no image library."""
    src = np.asarray(image, dtype=np.float32)
    h, w = src.shape

    def coords(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        x = np.clip(x, 0, n_in - 1)
        lo = np.floor(x).astype(np.intp)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (x - lo).astype(np.float32)

    y0, y1, fy = coords(height, h)
    x0, x1, fx = coords(width, w)
    top = src[y0][:, x0] * (1 - fx) + src[y0][:, x1] * fx
    bottom = src[y1][:, x0] * (1 - fx) + src[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def _unit(a: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1]; a constant array becomes zeros instead of NaN."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _colormap(name: str, values: np.ndarray) -> np.ndarray:
    import matplotlib

    rgba = matplotlib.colormaps[name](values)
    return np.asarray(rgba[..., :3], dtype=np.float32)


def mean_heatmap(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """The channel-mean activation resized to ``height`` x ``width``, scaled to [0, 1]."""
    return _unit(resize_bilinear(maps.mean(axis=0), height, width))


def overlay(photo: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``photo`` (uint8 HWC RGB) blended with ``heat`` ([0, 1], same H x W) in a colormap."""
    if heat.shape != photo.shape[:2]:
        raise VizError(f"heatmap {heat.shape} does not match the photo {photo.shape[:2]}")
    base = np.asarray(photo, dtype=np.float32)[..., :3] / 255.0
    return np.clip((1 - alpha) * base + alpha * _colormap("inferno", heat), 0.0, 1.0)


@dataclass(frozen=True)
class MapsPicture:
    """What :func:`feature_maps_picture` drew, so callers (and tests) can inspect it."""

    channels: list[int]
    tiles: list[np.ndarray]
    """Each shown channel's map, [0, 1]-scaled on its own (as drawn)."""
    heatmap: np.ndarray
    """Channel-mean heatmap at the photo's size, [0, 1]."""
    overlay: np.ndarray
    """The photo with the heatmap blended in, float RGB [0, 1]."""
    size_px: tuple[int, int]
    """(width, height) of the saved PNG."""


def _grid_shape(n: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def _save(fig: Any, path: Path) -> tuple[int, int]:
    """Save through the Agg canvas directly: no pyplot, so no global backend is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI)
    w, h = canvas.get_width_height()  # what Agg rendered (it truncates, so never round)
    return int(w), int(h)


def feature_maps_picture(
    maps: np.ndarray,
    photo: np.ndarray,
    path: str | Path,
    *,
    count: int = 16,
    top: bool = False,
    title: str = "",
) -> MapsPicture:
    """Draw a grid of channel tiles plus the channel-mean heatmap over ``photo``; save a PNG.

    ``maps``: [C, H, W] (see :func:`to_chw`); ``photo``: uint8 [H, W, 3] the maps were
    computed from (at native resolution, so the heatmap covers the whole photo).
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    channels = pick_channels(maps, count, top)
    tiles = [_unit(maps[c]) for c in channels]
    ph, pw = photo.shape[:2]
    heat = mean_heatmap(maps, ph, pw)
    blended = overlay(photo, heat)

    rows, cols = _grid_shape(len(channels))
    label_in = 0.25
    # tiles follow the map's aspect (within reason) so wide photos leave no empty bands
    tile_h = _TILE_IN * min(1.5, max(0.5, maps.shape[1] / maps.shape[2]))
    grid_w, grid_h = cols * _TILE_IN, rows * (tile_h + label_in)
    photo_h = grid_h
    photo_w = photo_h * pw / ph
    title_in = 0.5
    fig_w, fig_h = grid_w + photo_w + 0.3, grid_h + title_in
    fig = Figure(figsize=(fig_w, fig_h), dpi=_DPI)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.15 / fig_h)
    cell_w, cell_h = _TILE_IN / fig_w, (tile_h + label_in) / fig_h
    pad = 0.06 * _TILE_IN / fig_w
    for i, (channel, tile) in enumerate(zip(channels, tiles, strict=True)):
        r, c = divmod(i, cols)
        left = c * cell_w + pad
        bottom = 1 - title_in / fig_h - (r + 1) * cell_h
        ax = fig.add_axes((left, bottom, cell_w - 2 * pad, tile_h / fig_h * 0.92))
        ax.imshow(tile, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"ch {channel}", fontsize=8, pad=2)
        ax.set_axis_off()
    ax = fig.add_axes(((grid_w + 0.2) / fig_w, 0.02, photo_w / fig_w, grid_h / fig_h * 0.96))
    ax.imshow(blended)
    ax.set_title("channel mean", fontsize=9, pad=2)
    ax.set_axis_off()
    size = _save(fig, Path(path))
    return MapsPicture(channels, tiles, heat, blended, size)


# ----------------------------------------------------------------------------- conv filters


def filter_tiles(weight: np.ndarray, name: str = "weight") -> tuple[np.ndarray, bool]:
    """Conv kernels [out, in, kh, kw] as drawable tiles, and whether they are RGB.

    A first layer (in == 3) shows each kernel as an RGB patch, min-max normalised per kernel
    (so weak and strong kernels are equally visible); deeper layers show the per-kernel mean
    over input channels, [0, 1]-scaled per kernel, for a colormap.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 4:
        raise VizError(
            f"{name} has shape {list(w.shape)}, not a 2-D conv kernel [out, in, kh, kw]; "
            "pick a Conv2d layer (see `layertap nodes MODEL --tree`)"
        )
    if w.shape[1] == 3:
        rgb = w.transpose(0, 2, 3, 1)
        return np.stack([_unit(k) for k in rgb]), True
    return np.stack([_unit(k) for k in w.mean(axis=1)]), False


@dataclass(frozen=True)
class FiltersPicture:
    """What :func:`filters_picture` drew."""

    tiles: np.ndarray
    """[n, kh, kw, 3] RGB or [n, kh, kw] for the colormap, each in [0, 1]."""
    rgb: bool
    size_px: tuple[int, int]


def filters_picture(
    weight: np.ndarray,
    path: str | Path,
    *,
    count: int = 64,
    title: str = "",
    name: str = "weight",
) -> FiltersPicture:
    """Draw the first ``count`` kernels of a conv weight as a grid and save a PNG."""
    require_matplotlib()
    from matplotlib.figure import Figure

    tiles, rgb = filter_tiles(weight, name)
    tiles = tiles[: max(1, count)]
    rows, cols = _grid_shape(len(tiles))
    tile_in = 0.8
    title_in = 0.5
    fig_w, fig_h = cols * tile_in, rows * tile_in + title_in
    fig = Figure(figsize=(fig_w, fig_h), dpi=_DPI)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.12 / fig_h)
    pad = 0.05
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        ax = fig.add_axes(
            (
                (c * tile_in + pad) / fig_w,
                1 - (title_in + (r + 1) * tile_in - pad) / fig_h,
                (tile_in - 2 * pad) / fig_w,
                (tile_in - 2 * pad) / fig_h,
            )
        )
        if rgb:
            ax.imshow(tile, interpolation="nearest")
        else:
            ax.imshow(tile, cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
    size = _save(fig, Path(path))
    return FiltersPicture(tiles, rgb, size)


def crop_box(
    photo_hw: Sequence[int], resize_size: int, crop_hw: Sequence[int]
) -> tuple[int, int, int, int]:
    """The (top, left, height, width) region of the original photo that the server's
    resize-shorter-side + centre crop keeps, so a fixed-size model's map can be overlaid on it.
    """
    h, w = int(photo_hw[0]), int(photo_hw[1])
    ch, cw = int(crop_hw[0]), int(crop_hw[-1])
    scale = resize_size / min(h, w) if resize_size > 0 else 1.0
    kh, kw = min(h, round(ch / scale)), min(w, round(cw / scale))
    return (h - kh) // 2, (w - kw) // 2, kh, kw
