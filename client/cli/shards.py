"""Sharded, append-only output of a bulk ``layertap extract`` into a directory: memory bounded by
one shard, every row written once, a resume that reads only the ids of finished shards.

    index/
      _manifest.json         format, output keys (shape, dtype), the run's options, the shards
      part-00000.parquet     Parquet: column ``id`` and one FixedSizeList column per output key
      part-00001.parquet     (row groups of ``row_group_rows``), the options in the metadata
    or, with format npy:
      part-00000.ids.txt     one id per line
      part-00000.<key>.npy   [rows, ...] per output key (the key percent-encoded)

A shard is written under a hidden temporary name, flushed to disk, renamed, and only then
listed in the manifest (itself replaced atomically), so a crash at any moment leaves every
listed shard whole; files the manifest does not list are a crash's leftovers and are removed
on the next open, and their rows are extracted again. `pyarrow.parquet.read_table("index/")`
reads every shard (it skips names starting with ``_`` and ``.``).
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .stores import PARQUET_INSTALL_HINT, atomic_write

MANIFEST = "_manifest.json"
SHARD_FORMATS = ("parquet", "npy")
SHARD_BYTES = 64 * 1024 * 1024  # the open shard's rows are held in memory up to this
CHUNK_ROWS = 4096  # the open shard's rows live in preallocated blocks of this many
ROW_GROUP_BYTES = 32 * 1024 * 1024
MAX_SHARD_ROWS = 100_000


@dataclass(frozen=True)
class Column:
    """One output key: the shape of one row and its dtype."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _arrow_type(dtype: str) -> Any:
    import pyarrow as pa

    return {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8()}[dtype]


class ShardedStore:
    """Append rows; every ``shard_rows`` of them become one shard (0: sized by bytes). The open
    shard's rows are copied into preallocated blocks as they come, so it costs its data and
    not a Python object per row."""

    def __init__(
        self,
        directory: Path,
        fmt: str,
        columns: Mapping[str, Column],
        meta: Mapping[str, Any],
        shard_rows: int = 0,
        row_group_rows: int = 0,
    ) -> None:
        if fmt not in SHARD_FORMATS:
            raise ValueError(f"unknown shard format {fmt!r}; use one of {', '.join(SHARD_FORMATS)}")
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError as exc:
                message = f"parquet shards need pyarrow: {PARQUET_INSTALL_HINT} ({exc})"
                raise ValueError(message) from None
        self.dir, self.fmt = directory, fmt
        self.columns = dict(columns)
        self.meta = json.loads(json.dumps(dict(meta)))  # as the manifest will give it back
        row_bytes = max(1, sum(c.row_bytes for c in self.columns.values()))
        self.shard_rows = shard_rows or max(1, min(MAX_SHARD_ROWS, SHARD_BYTES // row_bytes))
        self.row_group_rows = row_group_rows or max(1, ROW_GROUP_BYTES // row_bytes)
        self.shards: list[dict[str, Any]] = []
        self._ids: list[str] = []
        self._blocks: dict[str, list[np.ndarray]] = {k: [] for k in self.columns}
        self._open()

    # ------------------------------------------------------------------ manifest

    def _describe(self) -> dict[str, Any]:
        return {
            "layertap_shards": 1,
            "format": self.fmt,
            "columns": {
                k: {"shape": list(c.shape), "dtype": c.dtype} for k, c in self.columns.items()
            },
            "options": self.meta,
        }

    def _open(self) -> None:
        path = self.dir / MANIFEST
        if not path.exists():
            if self.dir.exists() and any(self.dir.iterdir()):
                raise ValueError(
                    f"{self.dir} is not empty and has no {MANIFEST} (not a sharded layertap "
                    "output); choose a new or empty directory"
                )
            self._save_manifest()
            return
        manifest = json.loads(path.read_text(encoding="utf-8"))
        have = {k: v for k, v in manifest.items() if k != "shards"}
        want = self._describe()
        if have != want:
            raise ValueError(
                f"{self.dir} was written with {_differences(have, want)}; use a new output "
                "directory for different nodes or options"
            )
        self.shards = list(manifest["shards"])
        listed = {name for s in self.shards for name in self._files(s["name"])}
        for entry in self.dir.iterdir():  # a crash's leftovers: rows extracted again
            if entry.name != MANIFEST and entry.name not in listed:
                entry.unlink()

    def _save_manifest(self) -> None:
        text = json.dumps({**self._describe(), "shards": self.shards}, indent=1)
        atomic_write(self.dir / MANIFEST, lambda f: f.write(text.encode("utf-8")))

    def _files(self, name: str) -> list[str]:
        if self.fmt == "parquet":
            return [f"{name}.parquet"]
        return [f"{name}.ids.txt", *(f"{name}.{_quote(k)}.npy" for k in self.columns)]

    # ------------------------------------------------------------------ reading

    @property
    def rows(self) -> int:
        """Rows in finished shards and in the open one."""
        return sum(int(s["rows"]) for s in self.shards) + len(self._ids)

    def done_ids(self) -> Iterator[str]:
        """The ids of the finished shards, reading nothing else."""
        for shard in self.shards:
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(self.dir / f"{shard['name']}.parquet", columns=["id"])
                yield from (str(i) for i in table.column("id").to_pylist())
            else:
                text = (self.dir / f"{shard['name']}.ids.txt").read_text(encoding="utf-8")
                yield from text.splitlines()

    # ------------------------------------------------------------------ writing

    def add(self, row_id: str, row: Mapping[str, np.ndarray]) -> None:
        at = len(self._ids) % CHUNK_ROWS
        for key, column in self.columns.items():
            blocks = self._blocks[key]
            if at == 0:  # a new block (never more rows than the shard takes)
                rows = min(CHUNK_ROWS, self.shard_rows - len(self._ids))
                blocks.append(np.empty((rows, *column.shape), dtype=column.dtype))
            blocks[-1][at] = np.asarray(row[key], dtype=column.dtype).reshape(column.shape)
        self._ids.append(row_id)
        if len(self._ids) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Write the open shard's rows (if any) as one finished shard."""
        if not self._ids:
            return
        name = f"part-{len(self.shards):05d}"
        n = len(self._ids)
        arrays = {k: np.concatenate(v)[:n] for k, v in self._blocks.items()}
        if self.fmt == "parquet":
            self._write_parquet(name, arrays)
        else:
            for key, array in arrays.items():
                atomic_write(
                    self.dir / f"{name}.{_quote(key)}.npy",
                    lambda f, a=array: np.save(f, a, allow_pickle=False),  # type: ignore[misc]
                )
            text = "".join(i + "\n" for i in self._ids)
            atomic_write(self.dir / f"{name}.ids.txt", lambda f: f.write(text.encode("utf-8")))
        self.shards.append({"name": name, "rows": len(self._ids)})
        self._save_manifest()  # last: a shard counts once it is whole on disk
        self._ids = []
        self._blocks = {k: [] for k in self.columns}

    def _write_parquet(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = len(self._ids)
        fields = [pa.field("id", pa.string())]
        data: list[Any] = [pa.array(self._ids, type=pa.string())]
        for key, array in arrays.items():
            column = self.columns[key]
            width = int(np.prod(column.shape, dtype=np.int64))
            kind = pa.list_(_arrow_type(column.dtype), width)
            values = pa.array(np.ascontiguousarray(array).reshape(-1))
            data.append(pa.FixedSizeListArray.from_arrays(values, width))
            fields.append(pa.field(key, kind))
        meta = {"layertap": json.dumps(self._describe())}
        table = pa.Table.from_arrays(data, schema=pa.schema(fields, metadata=meta))

        def write(f: Any) -> None:
            with pq.ParquetWriter(f, table.schema) as writer:
                for start in range(0, n, self.row_group_rows):
                    writer.write_table(table.slice(start, self.row_group_rows))

        atomic_write(self.dir / f"{name}.parquet", write)


def read_npy_shards(directory: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every row of an npy-sharded output: ids and one array per output key (for small
    outputs and tests; large ones are read shard by shard)."""
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    ids: list[str] = []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in manifest["columns"]}
    for shard in manifest["shards"]:
        name = shard["name"]
        ids += (directory / f"{name}.ids.txt").read_text(encoding="utf-8").splitlines()
        for key in parts:
            parts[key].append(np.load(directory / f"{name}.{_quote(key)}.npy", allow_pickle=False))
    return ids, {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}


def _quote(key: str) -> str:
    return urllib.parse.quote(key, safe="")


def _differences(have: Mapping[str, Any], want: Mapping[str, Any]) -> str:
    diffs = [
        f"{k}={have.get(k)!r} (this run: {want.get(k)!r})"
        for k in want
        if have.get(k) != want.get(k)
    ]
    return "; ".join(diffs) or "other settings"


def is_sharded_output(path: Path) -> bool:
    """A directory output: an existing directory, or a path without a file suffix."""
    return path.is_dir() or (not path.suffix and not path.exists())


class ShardRows:
    """A bulk run's rows into a ShardedStore (the interface extract_dir's runs use): ``pending``
    stays 0 because the store writes a shard whenever one is full (no checkpoints needed);
    ``save`` writes the open shard (the end of a run, or an interrupted one). The ids already
    written are the store's ``done_ids()`` (the run keeps them compactly, idsets.py)."""

    pending = 0
    fresh = True  # the open shard is written at the end of every run

    def __init__(self, store: ShardedStore) -> None:
        self.store = store

    @classmethod
    def open(
        cls,
        directory: Path,
        fmt: str,
        shard_rows: int,
        probe: Any,
        options: Mapping[str, Any],
        row_group_rows: int = 0,
    ) -> ShardRows:
        """The store for a run whose probe extract (one image) gave ``probe``: its outputs'
        shapes and dtypes, and what a reader needs to reload (the run's options, the weights'
        digest, the resolved nodes, the preprocessing)."""
        columns = {}
        for key in probe:
            array = np.asarray(probe[key])
            columns[key] = Column(tuple(int(d) for d in array.shape[1:]), str(array.dtype))
        meta = dict(options)
        info = getattr(probe, "metadata", None)
        if info is not None:
            meta["weights_sha256"] = info.weights_sha256
            meta["resolved_nodes"] = {n.key: n.node for n in info.nodes}
            meta["preprocessing"] = dataclasses.asdict(info.preprocessing)
        store = ShardedStore(
            directory, fmt, columns, meta, shard_rows=shard_rows, row_group_rows=row_group_rows
        )
        return cls(store)

    @property
    def count(self) -> int:
        return self.store.rows

    def add(self, image_id: str, result: Mapping[str, np.ndarray]) -> None:
        self.store.add(image_id, result)

    def save(self) -> None:
        self.store.flush()
