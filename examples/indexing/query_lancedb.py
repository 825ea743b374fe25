"""Query a LanceDB table written by build_lancedb.py with images; print the top-k ids and scores.

    python examples/indexing/query_lancedb.py DB/ QUERY.jpg [MORE.jpg | DIR ...] [-k 5] [--json]

Each query image is described by the layertap server with the options stored in the table's
schema metadata (those of the extract), so it lands in the same space. Scores are cosine
similarities, 1 - LanceDB's cosine ``_distance``. On a table with an IVF-PQ index,
``--nprobes`` lists are searched and ``--refine-factor`` x k candidates re-ranked with the
full vectors.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("LANCEDB_LOG", "error")

import lancedb  # pip install lancedb

from common import as_float, default_target, embed, fail, find_images, print_matches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db", type=Path, help="a build_lancedb.py output directory")
    parser.add_argument("queries", nargs="+", type=Path, metavar="IMAGE|DIR")
    parser.add_argument("--table", default="images", help="table name (default: images)")
    parser.add_argument("-k", type=int, default=5, help="matches per query (default: 5)")
    parser.add_argument("--nprobes", type=int, default=20, help="indexed: lists searched")
    parser.add_argument(
        "--refine-factor",
        type=int,
        default=10,
        help="indexed: re-rank this many times k candidates exactly",
    )
    parser.add_argument("--target", default=default_target(), help="server host:port")
    parser.add_argument("--json", action="store_true", help="one JSON object per query")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("-k must be at least 1")
    table = lancedb.connect(args.db).open_table(args.table)
    raw = (table.schema.metadata or {}).get(b"layertap")
    if raw is None:
        raise fail(f"table {args.table!r} in {args.db} was not written by build_lancedb.py")
    meta = json.loads(raw)
    indexed = bool(table.list_indices())

    names, vectors = embed(args.target, meta["options"], meta["key"], find_images(args.queries))
    matches = []
    for vector in as_float(vectors):
        search = table.search(vector, vector_column_name="vector").distance_type("cosine")
        if indexed:
            search = search.nprobes(args.nprobes).refine_factor(args.refine_factor)
        found = search.select(["id", "_distance"]).limit(args.k).to_arrow()
        distances = found.column("_distance").to_pylist()
        matches.append(
            [
                (str(i), round(1.0 - float(d), 6))
                for i, d in zip(found.column("id").to_pylist(), distances, strict=True)
            ]
        )
    print_matches(names, matches, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
