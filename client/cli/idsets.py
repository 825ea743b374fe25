"""Compact id membership for a bulk run over millions of images: which ids the output already
holds (:class:`DoneIds`) and which ids this run has met, with the file each came from
(:class:`SeenIds`).

A Python ``set`` of a million id strings costs about 100 MB; these keep a 63-bit hash per id
in sorted numpy arrays instead: 8 bytes per finished id, 12 per id met in this run (with a
32-bit hash of its source), nothing per slot left empty. The arrays are levels of at most
``LEVEL_ROWS`` hashes, merged while small, so no merge ever copies more than a few MB; ids are
looked up a chunk at a time (one ``searchsorted`` per level per chunk).

The hash is Python's ``hash(str)`` (SipHash, salted per process) and is never stored: two
ids of a million share one with a chance of about 5 in 10^8, and then the later one would look
done or met in this run only; the next run salts differently and extracts it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

_MASK63 = (1 << 63) - 1
_MASK32 = (1 << 32) - 1
LEVEL_ROWS = 1 << 18  # 2 MiB of hashes: the largest level, the largest merge
CHUNK = 1024  # ids looked up together

NEW, DUPLICATE, CLASH = 0, 1, 2


def id_hash(text: str) -> int:
    """A non-zero 63-bit hash of an id."""
    return (hash(text) & _MASK63) or 1


def source_hash(text: str) -> int:
    """A non-zero 32-bit hash of where an image is read from."""
    return (hash(text) & _MASK32) or 1


def id_hashes(ids: Sequence[str]) -> np.ndarray:
    return np.fromiter((id_hash(i) for i in ids), dtype=np.int64, count=len(ids))


def chunks(items: Iterable[T], size: int = CHUNK) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), pulled lazily."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _find(level: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``keys`` is in the sorted ``level`` and whether it is there."""
    at = np.searchsorted(level, keys)
    at[at == len(level)] = 0
    return at, level[at] == keys


class DoneIds:
    """The ids an output already holds: their hashes in sorted levels. Immutable once built,
    so the progress count may read it from another thread."""

    def __init__(self, levels: list[np.ndarray]) -> None:
        self.levels = levels

    @classmethod
    def from_ids(cls, ids: Iterable[str]) -> DoneIds:
        """Hash ``ids`` as they stream by (the strings are not kept)."""
        hashes = (id_hash(i) for i in ids)
        levels: list[np.ndarray] = []
        while True:
            level = np.fromiter(itertools.islice(hashes, LEVEL_ROWS), dtype=np.int64)
            if not len(level):
                return cls(levels)
            level.sort()
            levels.append(level)

    def __len__(self) -> int:
        return sum(len(level) for level in self.levels)

    @property
    def nbytes(self) -> int:
        return sum(int(level.nbytes) for level in self.levels)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which of the id hashes ``keys`` are done."""
        found = np.zeros(len(keys), dtype=bool)
        for level in self.levels:
            found |= _find(level, keys)[1]
        return found

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and bool(self.contains(id_hashes([image_id]))[0])


class SeenIds:
    """The ids met in this run, each with a hash of its source: :meth:`add` tells a new id
    from one met before from the same source (a duplicate to skip) or another (a clash)."""

    def __init__(self) -> None:
        self.levels: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self.levels)

    @property
    def nbytes(self) -> int:
        return sum(int(keys.nbytes + vals.nbytes) for keys, vals in self.levels)

    def add(self, keys: np.ndarray, sources: np.ndarray) -> np.ndarray:
        """Record the id hashes ``keys`` (int64) read from ``sources`` (uint32 hashes); for
        each, NEW, DUPLICATE (met before from the same source, earlier in ``keys`` too) or
        CLASH (met before from another source)."""
        status = np.full(len(keys), NEW, dtype=np.int8)
        earlier = np.zeros(len(keys), dtype=np.uint32)
        # Within the chunk: later occurrences compare with the first one.
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = ordered[1:] != ordered[:-1]
        leader = order[np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))]
        repeat = order[~first]
        earlier[repeat] = sources[leader[~first]]
        status[repeat] = DUPLICATE
        # The first occurrences against the ids of earlier chunks.
        heads = order[first]
        for level_keys, level_vals in self.levels:
            at, hit = _find(level_keys, keys[heads])
            earlier[heads[hit]] = level_vals[at[hit]]
            status[heads[hit]] = DUPLICATE
        status[(status == DUPLICATE) & (earlier != sources)] = CLASH
        new = heads[status[heads] == NEW]
        if len(new):
            self._push(keys[new], sources[new])
        return status

    def _push(self, keys: np.ndarray, vals: np.ndarray) -> None:
        order = np.argsort(keys)
        self.levels.append((keys[order], vals[order]))
        while len(self.levels) >= 2:
            (a_keys, a_vals), (b_keys, b_vals) = self.levels[-2:]
            if len(a_keys) > 2 * len(b_keys) or len(a_keys) + len(b_keys) > LEVEL_ROWS:
                return
            self.levels[-2:] = [_merge(a_keys, a_vals, b_keys, b_vals)]


def _merge(
    a_keys: np.ndarray, a_vals: np.ndarray, b_keys: np.ndarray, b_vals: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted levels with no key in common, as one."""
    n = len(a_keys) + len(b_keys)
    at = np.searchsorted(a_keys, b_keys) + np.arange(len(b_keys))
    keys = np.empty(n, dtype=np.int64)
    vals = np.empty(n, dtype=np.uint32)
    rest = np.ones(n, dtype=bool)
    rest[at] = False
    keys[at], vals[at] = b_keys, b_vals
    keys[rest], vals[rest] = a_keys, a_vals
    return keys, vals
