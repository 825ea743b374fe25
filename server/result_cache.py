"""The result cache (issue 18): finished, encoded per-image Extract results kept in memory, so an
image seen before is answered without decode, forward or memory reservation.

Optional: `result_cache_bytes` bounds it, 0 (the default) turns it off. An entry is one image's
row exactly as the finish stage encoded it (tensors by full node name, or the concat key), under
a sha256 key of two parts:

- the request's (`request_digest`): the model's weights digest (`LoadedWeights.sha256`, the one
  ListModels shows) and preprocessing, and every field of the validated `ExtractJob` except the
  per-image ones (`PER_IMAGE`) and those that do not change a row (`UNKEYED`), serialised with
  repr. A field added to the job joins the key by itself; dataclasses, tuples, strings and
  floats repr the same way every time, so equal requests give equal keys.
- the image's (`image_digest`): its encoded bytes, or a raw tensor's dtype, shape and bytes, and
  its region boxes.

Hashing is proportional to the bytes, so `image_keys` runs in the decode pool; lookups and
stores are constant work per image on the event loop (one dict, its LRU order, byte counts).
The bound counts the tensors' bytes plus a fixed allowance per entry and per tensor for the
Python objects; past it the least recently used entries go. A row is stored only after its
request computed it (a failed request raises first), so errors are never cached.
Torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .requests import ExtractJob
from .spec import Box, ImageInput

if TYPE_CHECKING:
    from .metrics import Metrics
    from .prepare import EncodedTensor

Row = Mapping[str, "EncodedTensor"]
"""One image's finished outputs: encoded tensors by full node name (or the concat key)."""

PER_IMAGE = frozenset({"inputs", "regions"})  # the image's part of the key
# Job fields that change no row: the batch queue's class, the answer's output keys (applied by
# responses.py from the plan), the resolved nodes' catalogue entries (a function of the model
# and `nodes`, which are keyed), and the bypass itself.
UNKEYED = frozenset({"priority", "plan", "specs", "bypass_result_cache"})
ENTRY_OVERHEAD = 256  # bytes counted per entry: its key, record and dict slots
TENSOR_OVERHEAD = 256  # and per tensor: its record, shape list and name


def request_digest(job: ExtractJob, weights_sha256: str, preprocessing: object) -> bytes:
    """The request's part of every image's key (module docstring)."""
    keyed = [
        (f.name, getattr(job, f.name))
        for f in dataclasses.fields(job)
        if f.name not in PER_IMAGE and f.name not in UNKEYED
    ]
    text = repr((weights_sha256, preprocessing, keyed))
    return hashlib.sha256(text.encode()).digest()


def image_digest(prefix: bytes, image: ImageInput, boxes: Sequence[Box]) -> bytes:
    """One image's key: the request's digest, then the image as sent (its bytes' length in the
    header, so the fields cannot run into each other), then its boxes."""
    digest = hashlib.sha256(prefix)
    if image.encoded is not None:
        digest.update(f"encoded {len(image.encoded)}\n".encode())
        digest.update(image.encoded)
    else:
        digest.update(f"tensor {image.dtype} {list(image.shape)} {len(image.data)}\n".encode())
        digest.update(image.data)
    digest.update(repr([tuple(box) for box in boxes]).encode())
    return digest.digest()


def image_keys(job: ExtractJob, weights_sha256: str, preprocessing: object) -> list[bytes]:
    """Every image's key, in request order (decode pool: proportional to the images' bytes)."""
    prefix = request_digest(job, weights_sha256, preprocessing)
    return [
        image_digest(prefix, image, boxes)
        for image, boxes in zip(job.inputs, job.regions, strict=True)
    ]


def row_bytes(row: Row) -> int:
    """What one entry counts against result_cache_bytes."""
    return ENTRY_OVERHEAD + sum(len(t.data) + TENSOR_OVERHEAD for t in row.values())


def only(job: ExtractJob, indices: Sequence[int]) -> ExtractJob:
    """The job for some of its images (those the cache did not hold), in their order."""
    return dataclasses.replace(
        job, inputs=[job.inputs[i] for i in indices], regions=[job.regions[i] for i in indices]
    )


def merge(cached: Sequence[Row | None], computed: Sequence[Row]) -> list[Row]:
    """Request-order rows: each cached one, else the next computed one."""
    fresh = iter(computed)
    rows = [row if row is not None else next(fresh) for row in cached]
    if next(fresh, None) is not None:
        raise RuntimeError("more computed rows than images missing from the result cache")
    return rows


@dataclass
class _Entry:
    model: str
    row: Row
    size: int


class ResultCache:
    """Rows by key, least recently used first, at most `capacity` bytes (0: off). Used from the
    event loop only."""

    def __init__(self, capacity: int, metrics: Metrics | None = None) -> None:
        self.capacity = capacity
        self.used = 0
        self.metrics = metrics
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, model: str, keys: Sequence[bytes]) -> list[Row | None]:
        """Each key's row (None: not held), counted as hits and misses; a hit becomes the most
        recently used."""
        rows: list[Row | None] = []
        served = 0
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                served += sum(len(t.data) for t in entry.row.values())
            rows.append(entry.row if entry is not None else None)
        m = self.metrics
        if m is not None:
            hits = sum(row is not None for row in rows)
            label = m.model(model)
            m.result_cache_hits.labels(label).inc(hits)
            m.result_cache_misses.labels(label).inc(len(rows) - hits)
            m.output_bytes.labels(label).inc(served)
        return rows

    def put(self, model: str, keys: Sequence[bytes], rows: Sequence[Row]) -> None:
        """Store computed rows (a row larger than the whole cache is not kept), then evict the
        least recently used entries until the cache fits."""
        for key, row in zip(keys, rows, strict=True):
            size = row_bytes(row)
            if size > self.capacity:
                continue
            old = self._entries.pop(key, None)
            if old is not None:  # the same image computed twice at once: keep one
                self.used -= old.size
            self._entries[key] = _Entry(model, row, size)
            self.used += size
        while self.used > self.capacity:
            _, evicted = self._entries.popitem(last=False)
            self.used -= evicted.size
            if self.metrics is not None:
                self.metrics.result_cache_evictions.labels(self.metrics.model(evicted.model)).inc()
        if self.metrics is not None:
            self.metrics.result_cache_bytes.set(self.used)
            self.metrics.result_cache_entries.set(len(self._entries))
