"""Load a sharded ``layertap extract DIR -o SHARDS/`` output into an embedded LanceDB table.

    python examples/indexing/build_lancedb.py SHARDS/ -o DB/ [--table images] [--index auto]

The table has columns ``id`` (string) and ``vector`` (fixed-size list of float32); the
extract's options go into the table's schema metadata (key ``layertap``), so query_lancedb.py
describes a query the same way. The rows stream from the shards into LanceDB batch by batch
(a RecordBatchReader): memory holds one batch, whatever the size of the collection.

int8 descriptors (--dtype int8 extracts: round(127 x)) are stored as float32 x = q / 127:
LanceDB searches float vector columns only. For int8 on disk, use build_faiss.py.

Vector index (--index): without one, LanceDB compares the query with every row (exact, and
reads every vector: 100 000 1280-d rows are 512 MB). ``auto`` builds an IVF-PQ index (cosine) when
the table has at least --index-min-rows rows (default 100 000): num_partitions = sqrt(rows),
num_sub_vectors = dim / 8 (sub-vectors of 8 values, 8 bits each: 1280-d, 160 bytes a row).
Queries on an indexed table search --nprobes partitions and re-rank the candidates with the
full vectors (--refine-factor).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("LANCEDB_LOG", "error")  # no WARN line for creating a new dataset

import lancedb  # pip install lancedb
import pyarrow as pa

from common import Shards, as_float, fail, pq_subvectors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", type=Path, help="a `layertap extract DIR -o SHARDS/` output")
    parser.add_argument("-o", "--output", type=Path, required=True, help="LanceDB directory")
    parser.add_argument("--table", default="images", help="table name (default: images)")
    parser.add_argument("--key", help="the output key to load (when the extract has several)")
    parser.add_argument("--index", choices=("auto", "ivfpq", "none"), default="auto")
    parser.add_argument(
        "--index-min-rows",
        type=int,
        default=100_000,
        help="--index auto: build the index from this many rows on",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    shards = Shards.open(args.shards, args.key)
    if not shards.rows:
        raise fail(f"{args.shards} holds no rows yet")
    meta = {"key": shards.key, "dtype": shards.dtype, "options": shards.options}
    schema = pa.schema(
        [pa.field("id", pa.string()), pa.field("vector", pa.list_(pa.float32(), shards.dim))],
        metadata={"layertap": json.dumps(meta)},
    )

    def batches() -> Iterator[pa.RecordBatch]:
        for ids, vectors in shards.batches():
            flat = pa.array(as_float(vectors).reshape(-1))
            yield pa.RecordBatch.from_arrays(
                [pa.array(ids, pa.string()), pa.FixedSizeListArray.from_arrays(flat, shards.dim)],
                schema=schema,
            )

    db = lancedb.connect(args.output)
    reader = pa.RecordBatchReader.from_batches(schema, batches())
    table = db.create_table(args.table, data=reader, mode="overwrite")
    rows = table.count_rows()
    indexed = args.index == "ivfpq" or (args.index == "auto" and rows >= args.index_min_rows)
    note = "no vector index (exact search)"
    if indexed:
        from lancedb.index import IvfPq

        partitions = max(1, round(math.sqrt(rows)))
        subvectors = pq_subvectors(shards.dim)
        config = IvfPq(
            distance_type="cosine", num_partitions=partitions, num_sub_vectors=subvectors
        )
        table.create_index("vector", config=config)
        note = f"IVF-PQ index (cosine, {partitions} partitions, {subvectors} sub-vectors)"
    print(
        f"loaded {rows} vectors ({shards.dim}-d {shards.dtype}) into {args.output} table "
        f"{args.table!r} in {time.perf_counter() - start:.1f} s; {note}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
