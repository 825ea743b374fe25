"""Where a bulk run's rows go, and which ids its output already holds: one file (.npz, .npy,
.parquet; rewritten sorted by id at each checkpoint) or a directory of append-only shards
(:mod:`.shards`). Either way the ids already there are kept as :class:`~.idsets.DoneIds`
(8 bytes each), never as a set of strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .idsets import DoneIds
from .shards import ShardRows
from .stores import NpyStore, Store, Table


class FileRows:
    """Rows gathered so far (from the file and this run), all in memory (use a directory
    output for collections that do not fit); saved sorted by id."""

    def __init__(self, store: Any, keys: list[str], base: Table | None, meta: dict[str, Any]):
        self.store = store
        self.keys = keys
        self.meta = meta
        self.fresh = base is None
        self.ids: list[str] = list(base.ids) if base else []
        self.chunks: dict[str, list[np.ndarray]] = {
            k: [base.arrays[k if not isinstance(store, NpyStore) else ""]] if base else []
            for k in keys
        }
        self.pending = 0

    def add(self, image_id: str, result: Mapping[str, np.ndarray]) -> None:
        self.ids.append(image_id)
        for k in self.keys:
            self.chunks[k].append(np.asarray(result[k])[None])  # a one-row block
        self.pending += 1

    @property
    def count(self) -> int:
        return len(self.ids)

    def save(self) -> None:
        order = sorted(range(len(self.ids)), key=self.ids.__getitem__)
        self.ids = [self.ids[i] for i in order]
        arrays = {}
        for k in self.keys:
            merged = np.concatenate(self.chunks[k])[order]
            self.chunks[k] = [merged]
            arrays["" if isinstance(self.store, NpyStore) else k] = merged
        self.store.save(Table(self.ids, arrays, self.meta))
        self.pending = 0


Rows = FileRows | ShardRows


def check_compatible(
    base: Table, path: Path, expected: Mapping[str, np.ndarray], meta: dict[str, Any], npy: bool
) -> None:
    """Refuse to append rows of different outputs to an existing file (mixed features)."""
    have = {"": base.arrays[""]} if npy else base.arrays
    want = {"": next(iter(expected.values()))} if npy else expected
    if list(have) != list(want):
        raise ValueError(
            f"{path} holds outputs {sorted(have)}, this run makes {sorted(want)}; "
            "use a new output file for different nodes"
        )
    for key, array in want.items():
        old = have[key]
        if old.shape[1:] != array.shape[1:] or old.dtype != array.dtype:
            raise ValueError(
                f"{path}: output {key or 'vectors'!r} is {list(old.shape[1:])} {old.dtype} "
                f"there but {list(array.shape[1:])} {array.dtype} in this run; use a new "
                "output file for different options"
            )
    if base.meta and base.meta != meta:
        raise ValueError(
            f"{path} was written with {base.meta}, this run uses {meta}; "
            "use a new output file for different options"
        )


def open_rows(
    output: Path,
    store: Store | None,
    probe: Any,
    meta: dict[str, Any],
    shard_format: str,
    shard_rows: int,
    row_group_rows: int = 0,
) -> tuple[Rows, DoneIds]:
    """The run's rows (``store`` None: a directory of shards) and the ids already there."""
    keys = list(probe)
    if store is None:
        shards = ShardRows.open(output, shard_format, shard_rows, probe, meta, row_group_rows)
        return shards, DoneIds.from_ids(shards.store.done_ids())
    base = store.load()
    if base is not None:
        expected = {k: np.asarray(probe[k]) for k in keys}
        check_compatible(base, output, expected, meta, npy=isinstance(store, NpyStore))
    rows = FileRows(store, keys, base, meta)
    return rows, DoneIds.from_ids(rows.ids)
