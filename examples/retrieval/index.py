"""Index a folder of images through a layertap server into a numpy index (.npz with ids).

    python examples/retrieval/index.py PHOTOS/ -o index.npz [-r] [--pool gem] [--target HOST:PORT]

Each image is described by the server (default: mobilenet_v2 ``features``, GeM, L2), streamed
with ``extract_many`` so memory stays flat on a large folder. Images the server refuses are
reported and left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common import Descriptor, Index, default_target, describe, find_images
from layertap.client import FeatureClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True, help="index file (.npz)")
    parser.add_argument("-r", "--recursive", action="store_true", help="include subfolders")
    parser.add_argument("--target", default=default_target(), help="server host:port")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--node", default="features")
    parser.add_argument("--pool", default="gem", help="avg, max, gem, rmac, ... (default: gem)")
    parser.add_argument("--gem-p", type=float, default=3.0)
    parser.add_argument(
        "--post",
        action="append",
        default=[],
        help="post step, repeatable, e.g. --post l2 --post whiten:HEAD (a head in the server "
        "config); queries repeat it",
    )
    args = parser.parse_args(argv)
    paths = find_images(args.folder, args.recursive)
    if not paths:
        print(f"no images in {args.folder}", file=sys.stderr)
        return 2
    desc = Descriptor(args.model, args.node, args.pool, args.gem_p, tuple(args.post))
    items = ((p.relative_to(args.folder).as_posix(), p) for p in paths)
    ids: list[str] = []
    rows: list[np.ndarray] = []
    failed = 0
    start = time.perf_counter()
    with FeatureClient(args.target) as client:
        for image_id, vector in describe(client, items, desc):
            if isinstance(vector, np.ndarray):
                ids.append(image_id)
                rows.append(vector)
            else:
                failed += 1
                print(f"skipped {image_id}: {vector.code_name}: {vector.details}", file=sys.stderr)
    if not rows:
        print("no image could be described", file=sys.stderr)
        return 1
    index = Index(ids, np.stack(rows), desc)
    index.save(args.output)
    print(
        f"indexed {len(ids)} images ({index.vectors.shape[1]}-d, {desc.model} {desc.node} "
        f"{desc.pool}) in {time.perf_counter() - start:.1f} s -> {args.output}"
        + (f"; {failed} skipped" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
