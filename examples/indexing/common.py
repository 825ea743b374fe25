"""What the build and query scripts share: reading a sharded ``layertap extract DIR -o OUT/``
output batch by batch, and describing query images exactly like the indexed ones.

A sharded output (client/cli/shards.py) is a directory:

    OUT/_manifest.json      output keys (shape, dtype), the run's options, the finished shards
    OUT/part-00000.parquet  column ``id`` and one FixedSizeList column per output key
    OUT/part-00001.parquet  ...   (or, with --shard-format npy: part-NNNNN.ids.txt + .npy)

Only the shards the manifest lists are read, so an extract still running (or killed) beside
the build is seen as a consistent snapshot. The run's options (model, nodes, pool, normalize,
dtype, post ...) travel into every index these scripts write, and a query repeats them.

Scores: an index of float descriptors scores by inner product, the cosine similarity of
L2-normalised vectors. int8 descriptors are ``round(127 x)`` of such vectors; divided by 127
they are floats again (within 0.5/127 per value), which is what every index but the int8 one
(build_faiss.py --kind int8) stores.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layertap.common.options import OUTPUT_OPTION_NAMES

MANIFEST = "_manifest.json"
FAISS_FORMAT = "layertap-faiss-v1"  # build_faiss.py's layertap.json
EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# The keywords of FeatureClient.extract a bulk run records in its manifest's options (the
# rest of the options, weights_sha256, resolved_nodes and preprocessing, describe the run).
REQUEST_KEYS = ("model", "nodes", *(k for k in OUTPUT_OPTION_NAMES if k != "roi_size"))


def default_target() -> str:
    return os.environ.get("LAYERTAP_TARGET", "127.0.0.1:50051")


def fail(message: str) -> SystemExit:
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


@dataclass(frozen=True)
class Shards:
    """A sharded output, one pooled output key of it chosen: its rows, read in batches."""

    path: Path
    fmt: str
    key: str
    dim: int
    dtype: str  # as stored: float32, float16 or int8
    options: dict[str, Any]
    shards: tuple[tuple[str, int], ...]  # (name, rows), in the manifest's order

    @classmethod
    def open(cls, path: Path, key: str | None = None) -> Shards:
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise fail(f"{path} has no {MANIFEST}: not a `layertap extract DIR -o {path}/` output")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        columns = manifest["columns"]
        if key is None:
            if len(columns) != 1:
                raise fail(f"{path} holds several outputs ({', '.join(columns)}): pick one, --key")
            key = next(iter(columns))
        if key not in columns:
            raise fail(f"{path} has no output {key!r}; it holds {', '.join(columns)}")
        shape = columns[key]["shape"]
        if len(shape) != 1:
            raise fail(
                f"output {key!r} is {shape} per image, not a vector: extract with --pool "
                "(and --normalize) to index it"
            )
        shards = tuple((s["name"], int(s["rows"])) for s in manifest["shards"])
        return cls(
            path,
            manifest["format"],
            key,
            int(shape[0]),
            columns[key]["dtype"],
            manifest["options"],
            shards,
        )

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.shards)

    def batches(self, batch_rows: int = 16_384) -> Iterator[tuple[list[str], np.ndarray]]:
        """(ids, vectors [n, dim] as stored) of at most ``batch_rows`` rows, shard after shard:
        memory holds one batch, whatever the size of the collection."""
        for name, _rows in self.shards:
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                columns = ["id", self.key]
                with pq.ParquetFile(self.path / f"{name}.parquet") as shard:
                    for batch in shard.iter_batches(batch_size=batch_rows, columns=columns):
                        ids = [str(i) for i in batch.column("id").to_pylist()]
                        flat = batch.column(self.key).flatten().to_numpy(zero_copy_only=False)
                        yield ids, flat.reshape(len(ids), self.dim)
            else:  # npy shards: ids.txt + one .npy per key, read through a memory map
                ids = (self.path / f"{name}.ids.txt").read_text(encoding="utf-8").splitlines()
                quoted = urllib.parse.quote(self.key, safe="")
                array = np.load(self.path / f"{name}.{quoted}.npy", mmap_mode="r")
                for start in range(0, len(ids), batch_rows):
                    stop = start + batch_rows
                    yield ids[start:stop], np.asarray(array[start:stop])

    def sample(self, size: int, seed: int = 0) -> np.ndarray:
        """``size`` rows drawn uniformly without replacement, read in one streaming pass."""
        size = min(size, self.rows)
        chosen = np.sort(np.random.default_rng(seed).choice(self.rows, size, replace=False))
        out = np.empty((size, self.dim), dtype=self.dtype)
        start = filled = 0
        for _ids, batch in self.batches():
            end = filled + int(np.searchsorted(chosen[filled:], start + len(batch)))
            out[filled:end] = batch[chosen[filled:end] - start]
            filled, start = end, start + len(batch)
        return out


def as_float(vectors: np.ndarray) -> np.ndarray:
    """float32 rows for an index: int8 descriptors round(127 x) become x again (/ 127)."""
    if vectors.dtype == np.int8:
        return np.ascontiguousarray(vectors, dtype=np.float32) / np.float32(127.0)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def pq_subvectors(dim: int, values_per_code: int = 8) -> int:
    """Product quantisation's sub-vector count: the fewest sub-vectors of at most
    ``values_per_code`` values that divide ``dim`` (1280 -> 160, 2048 -> 256, 768 -> 96)."""
    m = -(-dim // values_per_code)
    while dim % m:
        m += 1
    return m


def request_options(options: dict[str, Any]) -> dict[str, Any]:
    """FeatureClient.extract keywords that describe an image exactly like the bulk run did."""
    return {k: options[k] for k in REQUEST_KEYS if k in options}


def find_images(paths: Iterable[Path]) -> list[Path]:
    """Image files given directly, and those under given directories (recursively, sorted)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")
            )
        else:
            found.append(path)
    return found


def embed(
    target: str, options: dict[str, Any], key: str, images: list[Path]
) -> tuple[list[str], np.ndarray]:
    """Describe query images with the index's options: (names, vectors [n, dim] with the
    dtype the index was built from). Images the server refuses are reported and skipped. The
    server must hold the same weights as the bulk run (weights_sha256 in the manifest)."""
    from layertap.client import FeatureClient, FeatureServiceError

    names: list[str] = []
    rows: list[np.ndarray] = []
    with FeatureClient(target) as client:
        items = ((str(p), p) for p in images)
        results = client.extract_many(
            items, **request_options(options), errors="yield", priority="normal", progress=False
        )
        for name, result in results:
            if isinstance(result, FeatureServiceError):
                print(f"skipped {name}: {result.code_name}: {result.details}", file=sys.stderr)
                continue
            digest = options.get("weights_sha256")
            if digest and result.metadata.weights_sha256 != digest:
                raise fail(
                    f"the server's {options['model']} has other weights "
                    f"({result.metadata.weights_sha256[:12]}) than the indexed run "
                    f"({digest[:12]}): its descriptors are not comparable"
                )
            names.append(name)
            rows.append(np.asarray(result[key])[0])
    if not rows:
        raise fail("no query image could be described")
    return names, np.stack(rows)


def print_matches(names: list[str], matches: list[list[tuple[str, float]]], as_json: bool) -> None:
    """One block (or one JSON object) per query: rank, score, id."""
    for name, found in zip(names, matches, strict=True):
        if as_json:
            print(json.dumps({"query": name, "matches": found}))
        else:
            print(f"query {name}")
            for rank, (image_id, score) in enumerate(found, 1):
                print(f"  {rank:2d}. {score:7.4f}  {image_id}")
