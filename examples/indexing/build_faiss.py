"""Build a FAISS index from a sharded ``layertap extract DIR -o SHARDS/`` output, shard by shard.

    python examples/indexing/build_faiss.py SHARDS/ -o FAISS/ [--kind auto|flat|ivfpq|int8]

Writes FAISS/index.faiss, FAISS/ids.txt (line i = the image of FAISS id i) and
FAISS/layertap.json (the extract's options, so query_faiss.py describes a query the same way).
The shards are read in batches, so memory holds one batch plus the index itself:

  flat    IndexFlatIP, exact: the inner product of L2-normalised descriptors is their cosine
          similarity. 4 bytes per value in memory and on disk (1280-d: 5 KiB per image).
  ivfpq   IndexIVFPQ, approximate: an inverted file of ``nlist`` k-means lists, each vector
          stored as a product-quantisation code of ``m`` sub-vectors x ``nbits`` bits
          (one bit per value: 1280-d, 160 bytes per image, 32x less than flat). Trained on
          a uniform sample, then filled in a second pass. Parameters from the data size
          (ivfpq_params below).
  int8    IndexScalarQuantizer QT_8bit_direct_signed, exact on int8 descriptors
          (--dtype int8 extracts: round(127 x)): each value kept as the int8 it is, 1 byte,
          nothing to train. A query is the server's int8 descriptor too, and scores are
          divided by 127^2 (cosine similarity within about 1 %).
  auto    int8 for int8 descriptors, flat otherwise.

--recall-check N compares the ivfpq index with an exact search for N sampled indexed vectors
(one more pass over the shards) and prints recall@10.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import faiss  # pip install faiss-cpu
import numpy as np

from common import FAISS_FORMAT, Shards, as_float, fail, pq_subvectors

MIN_POINTS = 39  # FAISS's k-means asks for at least 39 training vectors per centroid


def ivfpq_params(
    rows: int, dim: int, train_size: int = 0, nlist: int = 0, m: int = 0, nbits: int = 0
) -> dict[str, int]:
    """IVF-PQ parameters from the collection's size (those given, non-zero, are kept):

    - train: every row up to 100 000 (a uniform sample beyond; float32 in memory while
      training, 1280-d: 512 MB);
    - nlist: the power of two nearest 4 sqrt(rows) (1M rows: 4096), at most train / 39 so
      that every list gets 39 training vectors (1M rows, 100k sample: 2048);
    - nbits: 8 (256 centroids per sub-vector) once the sample has 39 x 256 vectors, else 4
      (16 centroids; FAISS warns below 39 x 16 = 624, and the codes are coarse: prefer flat);
    - m: sub-vectors of nbits values (pq_subvectors), so a code spends one bit per value:
      dim / 8 bytes per vector (1280-d: 160 bytes, 32x less than float32) at either nbits;
    - nprobe (lists searched; query_faiss.py --nprobe overrides): nlist / 16, at least 8
      (all of them when nlist <= 8).
    """
    train = min(rows, train_size or 100_000)
    if not nlist:
        nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(rows))))
        nlist = max(1, min(nlist, 2 ** int(math.log2(max(1, train // MIN_POINTS)))))
    nbits = nbits or (8 if train >= MIN_POINTS * 256 else 4)
    m = m or pq_subvectors(dim, values_per_code=nbits)
    nprobe = min(nlist, max(8, nlist // 16))
    return {"train": train, "nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe}


def build_ivfpq(shards: Shards, params: dict[str, int]) -> Any:
    dim = shards.dim
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(
        quantizer, dim, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT
    )
    sample = as_float(shards.sample(params["train"]))
    if len(sample) < MIN_POINTS * 2 ** params["nbits"]:
        print(
            f"warning: {len(sample)} training vectors for {2 ** params['nbits']} PQ centroids "
            f"per sub-vector (FAISS asks for {MIN_POINTS * 2 ** params['nbits']}): a coarse "
            "approximation; below about 10 000 images use --kind flat",
            file=sys.stderr,
        )
        index.pq.cp.min_points_per_centroid = 1  # said once above, not once per sub-vector
        index.cp.min_points_per_centroid = 1
    if len(sample) < 2 ** params["nbits"] or len(sample) < params["nlist"]:
        raise fail(f"{len(sample)} vectors are too few to train IVF-PQ: use --kind flat")
    index.train(sample)
    del sample
    index.nprobe = params["nprobe"]
    return index


def recall_check(index: Any, shards: Shards, queries: int, k: int = 10) -> float:
    """recall@k of ``index`` against the exact top-k (inner product) of ``queries`` sampled
    indexed vectors, the exact one computed in one more streaming pass."""
    q = as_float(shards.sample(queries, seed=1))
    k = min(k, shards.rows)
    best = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(q), k), dtype=np.int64)
    start = 0
    for _ids, batch in shards.batches():
        scores = q @ as_float(batch).T
        both = np.concatenate([best, scores], axis=1)
        both_ids = np.concatenate(
            [best_ids, np.broadcast_to(np.arange(start, start + len(batch)), scores.shape)], axis=1
        )
        top = np.argsort(-both, axis=1, kind="stable")[:, :k]
        best, best_ids = np.take_along_axis(both, top, 1), np.take_along_axis(both_ids, top, 1)
        start += len(batch)
    _scores, found = index.search(q, k)
    hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), best_ids.tolist(), strict=True))
    return hits / (len(q) * k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", type=Path, help="a `layertap extract DIR -o SHARDS/` output")
    parser.add_argument("-o", "--output", type=Path, required=True, help="index directory")
    parser.add_argument("--kind", choices=("auto", "flat", "ivfpq", "int8"), default="auto")
    parser.add_argument("--key", help="the output key to index (when the extract has several)")
    parser.add_argument("--train-size", type=int, default=0, help="ivfpq training sample")
    parser.add_argument("--nlist", type=int, default=0, help="ivfpq lists (default: from size)")
    parser.add_argument("--m", type=int, default=0, help="ivfpq sub-vectors (must divide dim)")
    parser.add_argument("--nbits", type=int, default=0, help="ivfpq bits per sub-vector code")
    parser.add_argument(
        "--recall-check",
        type=int,
        default=0,
        metavar="N",
        help="ivfpq: recall@10 against exact search for N sampled indexed vectors",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    shards = Shards.open(args.shards, args.key)
    if not shards.rows:
        raise fail(f"{args.shards} holds no rows yet")
    kind = args.kind
    if kind == "auto":
        kind = "int8" if shards.dtype == "int8" else "flat"
    if kind == "int8" and shards.dtype != "int8":
        raise fail(f"--kind int8 indexes int8 descriptors; {args.shards} holds {shards.dtype}")
    if not shards.options.get("normalize") and not shards.options.get("post"):
        print(
            "warning: the descriptors are not L2-normalised (extract with --normalize): "
            "inner products are not cosine similarities",
            file=sys.stderr,
        )

    params: dict[str, int] = {}
    score_scale = 1.0
    if kind == "flat":
        index = faiss.IndexFlatIP(shards.dim)
    elif kind == "int8":
        qtype = faiss.ScalarQuantizer.QT_8bit_direct_signed
        index = faiss.IndexScalarQuantizer(shards.dim, qtype, faiss.METRIC_INNER_PRODUCT)
        score_scale = 1.0 / 127**2
    else:
        params = ivfpq_params(
            shards.rows, shards.dim, args.train_size, args.nlist, args.m, args.nbits
        )
        if shards.dim % params["m"]:
            raise fail(f"--m {params['m']} does not divide the dimension {shards.dim}")
        index = build_ivfpq(shards, params)

    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "ids.txt", "w", encoding="utf-8") as ids_file:
        for ids, batch in shards.batches():
            # int8 values go in as they are (QT_8bit_direct_signed stores each as one byte)
            rows = np.ascontiguousarray(batch, np.float32) if kind == "int8" else as_float(batch)
            index.add(rows)
            ids_file.writelines(i + "\n" for i in ids)
    faiss.write_index(index, str(args.output / "index.faiss"))
    info = {
        "format": FAISS_FORMAT,
        "kind": kind,
        "key": shards.key,
        "dim": shards.dim,
        "dtype": shards.dtype,
        "rows": index.ntotal,
        "score_scale": score_scale,
        "ivfpq": params,
        "options": shards.options,
    }
    (args.output / "layertap.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    size = (args.output / "index.faiss").stat().st_size
    detail = {"flat": "IndexFlatIP", "int8": "IndexScalarQuantizer int8"}.get(kind) or (
        "IndexIVFPQ nlist={nlist} m={m} nbits={nbits} nprobe={nprobe} trained on {train}"
    ).format(**params)
    print(
        f"indexed {index.ntotal} vectors ({shards.dim}-d {shards.dtype}, {detail}) in "
        f"{time.perf_counter() - start:.1f} s -> {args.output}/index.faiss ({size:,} bytes)"
    )
    if kind == "ivfpq" and args.recall_check:
        recall = recall_check(index, shards, args.recall_check)
        queries = min(args.recall_check, shards.rows)
        print(
            f"recall@10 against exact search: {recall:.3f} ({queries} sampled indexed "
            f"vectors as queries, nprobe {index.nprobe})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
