"""Query a FAISS index written by build_faiss.py with images; print the top-k ids and scores.

    python examples/indexing/query_faiss.py FAISS/ QUERY.jpg [MORE.jpg | DIR ...] [-k 5] [--json]

Each query image is described by the layertap server with the options the indexed images were
extracted with (model, nodes, pool, normalize, dtype ... from FAISS/layertap.json), so it lands
in the same space. Scores are cosine similarities (1 = the same descriptor): inner products,
for an int8 index divided by 127^2 (both sides are round(127 x)).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import faiss  # pip install faiss-cpu
import numpy as np

from common import (
    FAISS_FORMAT,
    as_float,
    default_target,
    embed,
    fail,
    find_images,
    print_matches,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index", type=Path, help="a build_faiss.py output directory")
    parser.add_argument("queries", nargs="+", type=Path, metavar="IMAGE|DIR")
    parser.add_argument("-k", type=int, default=5, help="matches per query (default: 5)")
    parser.add_argument("--nprobe", type=int, default=0, help="ivfpq: lists searched")
    parser.add_argument("--target", default=default_target(), help="server host:port")
    parser.add_argument("--json", action="store_true", help="one JSON object per query")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("-k must be at least 1")
    info_path = args.index / "layertap.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    if info.get("format") != FAISS_FORMAT:
        raise fail(f"{args.index} is not a build_faiss.py output")
    index = faiss.read_index(str(args.index / "index.faiss"))
    if args.nprobe:
        if info["kind"] != "ivfpq":
            parser.error("--nprobe applies to an ivfpq index")
        index.nprobe = args.nprobe
    ids = (args.index / "ids.txt").read_text(encoding="utf-8").splitlines()

    names, vectors = embed(args.target, info["options"], info["key"], find_images(args.queries))
    if info["kind"] == "int8":  # the server's int8 query, as the index holds its rows
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
    else:
        queries = as_float(vectors)
    scores, positions = index.search(queries, min(args.k, len(ids)))
    scores = scores * info["score_scale"]
    matches = [
        [(ids[int(i)], round(float(s), 6)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
        for row_s, row_i in zip(scores, positions, strict=True)
    ]
    print_matches(names, matches, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
