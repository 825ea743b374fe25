"""Query an index written by index.py with images; print the top-k matches and their scores.

    python examples/retrieval/query.py index.npz QUERY.jpg [MORE.jpg ...] [-k 5] [--json]

Queries are described with the options stored in the index; the score is the cosine
similarity (1 = same descriptor). FAISS is used when installed, numpy otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import Index, default_target, describe
from layertap.client import FeatureClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index", type=Path)
    parser.add_argument("queries", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("-k", type=int, default=5, help="matches per query (default: 5)")
    parser.add_argument("--target", default=default_target(), help="server host:port")
    parser.add_argument("--backend", choices=("auto", "numpy", "faiss"), default="auto")
    parser.add_argument("--json", action="store_true", help="one JSON object per query")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("-k must be at least 1")
    index = Index.load(args.index)
    names: list[str] = []
    vectors: list[np.ndarray] = []
    failed = 0
    with FeatureClient(args.target) as client:
        items = ((str(p), p) for p in args.queries)
        for name, vector in describe(client, items, index.desc):
            if isinstance(vector, np.ndarray):
                names.append(name)
                vectors.append(vector)
            else:
                failed += 1
                print(f"skipped {name}: {vector.code_name}: {vector.details}", file=sys.stderr)
    if vectors:
        scores, positions = index.search(np.stack(vectors), args.k, args.backend)
        for name, row_scores, row_pos in zip(names, scores, positions, strict=True):
            matches = [
                (index.ids[int(i)], float(s)) for s, i in zip(row_scores, row_pos, strict=True)
            ]
            if args.json:
                print(json.dumps({"query": name, "matches": matches}))
            else:
                print(f"query {name}")
                for rank, (image_id, score) in enumerate(matches, 1):
                    print(f"  {rank:2d}. {score:7.4f}  {image_id}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
