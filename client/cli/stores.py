"""Output files of a bulk ``layertap extract``: ids plus one array per output key, in .npz,
.npy (+ ids file) or .parquet, read back for resuming and written atomically, so a checkpoint
interrupted at any moment leaves the previous file whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

FORMATS = (".npz", ".npy", ".parquet")
PARQUET_INSTALL_HINT = "pip install 'layertap[parquet]'"


@dataclass
class Table:
    """Rows of an output file: ids and, per output key, an array [rows, ...]."""

    ids: list[str]
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename over ``path``:
    a crash at any moment leaves either the old file or the new one, never half of one.
    Missing parent directories are created (``-o out/features.npz``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_npz(f: IO[bytes] | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """What ``np.savez(f, **arrays)`` writes, without keys clashing with its parameters."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _ids_array(ids: Sequence[str]) -> np.ndarray:
    return np.asarray(list(ids), dtype=np.str_) if ids else np.zeros(0, dtype="<U1")


class NpzStore:
    """``ids`` plus one array per output key, in one .npz."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Table | None:
        if not self.path.exists():
            return None
        with np.load(self.path, allow_pickle=False) as npz:
            if "ids" not in npz.files:
                raise ValueError(
                    f"{self.path} exists but has no 'ids' array (not written by a bulk "
                    "`layertap extract`); choose another output or delete it"
                )
            ids = [str(i) for i in npz["ids"]]
            arrays = {k: npz[k] for k in npz.files if k != "ids"}
        return Table(ids, arrays)

    def save(self, table: Table) -> None:
        atomic_write(
            self.path, lambda f: write_npz(f, {"ids": _ids_array(table.ids), **table.arrays})
        )


class NpyStore:
    """One pooled output as a 2-D .npy, ids one per line in ``<name>.ids.txt``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids_path = path.with_suffix(".ids.txt")

    def load(self) -> Table | None:
        if not self.path.exists():
            return None
        if not self.ids_path.exists():
            raise ValueError(
                f"{self.path} exists without its ids file {self.ids_path}; "
                "choose another output or delete it"
            )
        array = np.load(self.path, allow_pickle=False)
        ids = self.ids_path.read_text(encoding="utf-8").splitlines()
        if len(ids) != len(array):
            raise ValueError(
                f"{self.ids_path} has {len(ids)} ids but {self.path} {len(array)} rows "
                "(written by something else, or interrupted between the two renames); "
                "delete both to start over"
            )
        return Table(ids, {"": array})

    def save(self, table: Table) -> None:
        (array,) = table.arrays.values()
        atomic_write(self.path, lambda f: np.save(f, array, allow_pickle=False))
        text = "".join(i + "\n" for i in table.ids)
        atomic_write(self.ids_path, lambda f: f.write(text.encode("utf-8")))


class ParquetStore:
    """Column ``id`` plus one ``list<float>`` column per output key; shapes and the
    extraction options in the schema metadata (checked on resume)."""

    def __init__(self, path: Path) -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                f".parquet output needs pyarrow: {PARQUET_INSTALL_HINT} ({exc})"
            ) from None
        self.path = path

    def load(self) -> Table | None:
        import pyarrow.parquet as pq

        if not self.path.exists():
            return None
        table = pq.read_table(self.path)
        raw = (table.schema.metadata or {}).get(b"layertap")
        if raw is None or "id" not in table.column_names:
            raise ValueError(
                f"{self.path} was not written by a bulk `layertap extract`; "
                "choose another output or delete it"
            )
        meta = json.loads(raw)
        n = table.num_rows
        # list<float> holds float16 outputs exactly (int8 ones are list<int8>); give them back
        # in the run's dtype
        dtype = _PARQUET_DTYPES.get(meta["options"].get("dtype"), np.float32)
        arrays = {}
        for key in table.column_names:
            if key == "id":
                continue
            shape = meta["shapes"][key]
            flat = table.column(key).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            arrays[key] = np.asarray(flat, dtype=dtype).reshape(n, *shape)
        return Table([str(i) for i in table.column("id").to_pylist()], arrays, meta["options"])

    def save(self, table: Table) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns: dict[str, Any] = {"id": pa.array(table.ids, type=pa.string())}
        shapes = {}
        for key, array in table.arrays.items():
            n = len(array)
            dtype = np.int8 if array.dtype == np.int8 else np.float32
            flat = np.ascontiguousarray(array, dtype=dtype).reshape(n, -1)
            width = flat.shape[1]
            offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width, type=pa.int32())
            columns[key] = pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1)))
            shapes[key] = list(array.shape[1:])
        meta = json.dumps({"shapes": shapes, "options": table.meta})
        out = pa.table(columns).replace_schema_metadata({"layertap": meta})
        atomic_write(self.path, lambda f: pq.write_table(out, f))


_PARQUET_DTYPES: dict[str, type[np.generic]] = {"float16": np.float16, "int8": np.int8}


Store = NpzStore | NpyStore | ParquetStore


def open_store(path: Path) -> Store:
    """The store of ``path``, by its extension."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return NpzStore(path)
    if suffix == ".npy":
        return NpyStore(path)
    if suffix == ".parquet":
        return ParquetStore(path)
    raise ValueError(f"unknown output format {path.suffix!r}; use one of {', '.join(FORMATS)}")
