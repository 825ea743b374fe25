"""``layertap show-maps`` and ``show-filters``: PNG pictures of a node's feature maps over a
photo, and of a conv layer's kernels (matplotlib, the ``viz`` extra, imported when they run)."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

from ..errors import FeatureServiceError
from .common import Subcommands, positive_int

if TYPE_CHECKING:
    from .._sync import FeatureClient


def register(subcommands: Subcommands) -> None:
    """Add the ``show-maps`` and ``show-filters`` subcommands (one call from
    client/cli/__init__.py)."""
    maps = subcommands.add(
        "show-maps",
        show_maps,
        help="picture of a node's feature maps and their mean over the photo (layertap[viz])",
    )
    maps.add_argument("image", type=Path, metavar="IMAGE")
    maps.add_argument("--model", required=True)
    maps.add_argument("-n", "--node", required=True)
    maps.add_argument(
        "--channels", type=positive_int, default=16, metavar="K", help="tiles (default: 16)"
    )
    maps.add_argument(
        "--top", action="store_true", help="the K most active channels instead of the first K"
    )
    maps.add_argument(
        "--max-size",
        type=positive_int,
        default=1024,
        metavar="PX",
        help="shrink the photo to this longer side first (default: 1024)",
    )
    maps.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")

    filters = subcommands.add(
        "show-filters",
        show_filters,
        help="picture of a conv layer's kernels (layertap[viz])",
    )
    filters.add_argument("model")
    filters.add_argument(
        "-n", "--node", required=True, help="conv layer (module path) or its weight's name"
    )
    filters.add_argument(
        "--count", type=positive_int, default=64, metavar="K", help="kernels shown (default: 64)"
    )
    filters.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")


def _load_photo(path: Path, max_size: int) -> np.ndarray:
    """The photo as uint8 RGB, upright (EXIF) and at most ``max_size`` on its longer side.

    Decoded here rather than on the server so the picture's pixels are exactly the ones the
    model saw; Pillow comes with matplotlib, so the viz extra needs nothing more.
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(path.read_bytes())) as opened:
        rgb = ImageOps.exif_transpose(opened).convert("RGB")
    if max(rgb.size) > max_size:
        rgb.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb)


def show_maps(client: FeatureClient, args: argparse.Namespace) -> int:
    from .. import viz

    viz.require_matplotlib()
    photo = _load_photo(args.image, args.max_size)
    common = {"model": args.model, "nodes": {args.node: "map"}, "pool": None}
    try:
        # The whole photo, not the centre crop: the heatmap then lines up with all of it.
        result = client.extract(photo, native_resolution=True, **common)
        shown = photo
    except FeatureServiceError as exc:
        if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        # Models with a fixed input size (ViT) refuse other sizes: overlay on the crop
        # the server's resize + centre crop keeps instead.
        result = client.extract(photo, **common)
        prep = result.metadata.preprocessing
        top, left, h, w = viz.crop_box(photo.shape[:2], prep.resize_size, prep.crop_size)
        shown = photo[top : top + h, left : left + w]
    maps = viz.to_chw(result["map"][0], result.layouts.get("map", ""))
    node = result.nodes.get("map", args.node)
    picture = viz.feature_maps_picture(
        maps,
        shown,
        args.output,
        count=args.channels,
        top=args.top,
        title=f"{args.model} {node}  {list(result.array('map').shape[1:])}"
        + ("  (most active channels)" if args.top else ""),
    )
    w, h = picture.size_px
    print(f"wrote {args.output} ({w}x{h}): channels {picture.channels} of {maps.shape[0]}")
    return 0


def show_filters(client: FeatureClient, args: argparse.Namespace) -> int:
    from .. import viz

    viz.require_matplotlib()
    node: str = args.node
    name = node if node.endswith(".weight") else node + ".weight"
    try:
        params = client.get_parameters(args.model, [name])
    except FeatureServiceError as exc:
        if exc.code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            raise
        # Often a container (features.0) whose conv sits one level down: say which.
        module = name.removesuffix(".weight")
        convs = [
            m.name
            for m in client.describe(args.model).modules
            if m.name.startswith(module + ".") and "Conv" in m.type and m.own_parameters
        ]
        if not convs:
            raise
        raise ValueError(
            f"{module} has no conv weight of its own; conv layers under it: "
            + ", ".join(convs[:8])
            + (" ..." if len(convs) > 8 else "")
        ) from None
    weight = params[name] if name in params else next(iter(params.values()))
    picture = viz.filters_picture(
        weight,
        args.output,
        count=args.count,
        name=name,
        title=f"{args.model} {name}  {list(weight.shape)}",
    )
    w, h = picture.size_px
    kind = "RGB" if picture.rgb else "mean over input channels"
    print(f"wrote {args.output} ({w}x{h}): {len(picture.tiles)} kernels, {kind}")
    return 0
