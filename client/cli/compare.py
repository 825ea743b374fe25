"""``layertap compare A B [A2 B2 ...]``: perceptual distance of image pairs, one line each.

The server computes the distances (Compare RPC), so nothing but images and a few floats
travel; the output is a table a person reads or a script parses (--json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .._compare import CompareResult
from .._sync import FeatureClient
from .common import Subcommands


def register(subcommands: Subcommands) -> None:
    """Add the ``compare`` subcommand (one call from client/cli/__init__.py)."""
    p = subcommands.add(
        "compare",
        run,
        help="perceptual (LPIPS-style) distance of image pairs, computed on the server",
        description="Distance of each pair (A, B), (A2, B2), ...: feature maps of the chosen "
        "nodes, channels unit-normalised at each position, squared difference, mean over "
        "positions, summed over nodes. 0 means identical features.",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="A B", help="image files, in pairs")
    p.add_argument("--model", required=True)
    p.add_argument(
        "-n",
        "--nodes",
        action="append",
        metavar="NODE",
        help="feature-map node (repeat, or comma-separate); default: the model's "
        "compare_nodes (VGG16: features.3,8,15,22,29)",
    )
    p.add_argument("--style", action="store_true", help="also Gram-matrix style distances")
    p.add_argument(
        "--native-resolution",
        action="store_true",
        help="skip the resize and centre crop (both images of a pair must be the same size)",
    )
    p.add_argument("--layers", action="store_true", help="also print every node's term")
    p.add_argument("--json", action="store_true", help="one JSON object per pair")


def _nodes(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def run(client: FeatureClient, args: argparse.Namespace) -> int:
    images: list[Path] = args.images
    if len(images) % 2:
        raise ValueError(
            f"{len(images)} images given; compare takes pairs: A B [A2 B2 ...] (an even count)"
        )
    for path in images:
        if not path.is_file():
            raise ValueError(f"{path} is not a file")
    a, b = images[0::2], images[1::2]
    result = client.compare(
        [str(p) for p in a],
        [str(p) for p in b],
        model=args.model,
        nodes=_nodes(args.nodes),
        style=args.style,
        native_resolution=args.native_resolution,
    )
    print(format_result(result, a, b, layers=args.layers, as_json=args.json))
    return 0


def format_result(
    result: CompareResult, a: list[Path], b: list[Path], *, layers: bool, as_json: bool
) -> str:
    """One line per pair: the distance (and style distance), then per-node terms if asked."""
    style = any(p.style_layers for p in result.pairs)
    lines = []
    for pa, pb_, pair in zip(a, b, result.pairs, strict=True):
        if as_json:
            row: dict[str, object] = {"a": str(pa), "b": str(pb_), "distance": pair.distance}
            if layers:
                row["layers"] = pair.layers
            if style:
                row["style_distance"] = pair.style_distance
                if layers:
                    row["style_layers"] = pair.style_layers
            lines.append(json.dumps(row))
            continue
        text = f"{pa}  {pb_}  distance={pair.distance:.6g}"
        if style:
            text += f"  style={pair.style_distance:.6g}"
        lines.append(text)
        if layers:
            for key, value in pair.layers.items():
                extra = f"  style={pair.style_layers[key]:.6g}" if key in pair.style_layers else ""
                lines.append(f"    {key}: {value:.6g}{extra}")
    if not as_json:
        nodes = ", ".join(n.node for n in result.nodes)
        lines.append(f"({result.model}; nodes: {nodes})")
    return "\n".join(lines)
