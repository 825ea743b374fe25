"""The bookkeeping of one ``extract_many`` run, shared by its two transports: the input pulled
lazily and converted (local failures settled at once), the window of unanswered items, retries
with backoff within each item's deadline, and finished items handed out in order or as they
complete.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from layertap.common.option_parsing import parse_boxes
from layertap.v1 import layertap_pb2 as pb

from ._bulk_options import BulkOptions, BulkResult, Transport
from ._images import image_to_proto
from ._requests import check_image, image_budget, image_wire_bytes, images_per_request
from ._retry import backoff_delay
from .errors import FeatureServiceError
from .types import ServerInfo


@dataclass(eq=False)
class Entry:
    """One input image on its way through the run."""

    seq: int
    id: Any
    image: pb.Image | None = None
    result: BulkResult | None = None
    retries_used: int = 0
    deadline: float | None = None
    """Set when first sent: ``timeout`` covers the item's attempts and backoff together."""
    solo: bool = False
    """Send alone (after a multi-image call was refused for one image's sake)."""
    size: int = 0


@dataclass(order=True)
class Delayed:
    ready_at: float
    seq: int
    entry: Entry = field(compare=False)


def split_item(item: Any, position: int) -> tuple[Any, Any, Any]:
    """``(id, image)`` tuples keep their id; ``(id, image, regions)`` also carry that image's
    boxes; a bare image gets ``str(position)`` and no regions."""
    if isinstance(item, tuple) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None
    return str(position), item, None


class RunState:
    """The queues and counters of one run (:class:`~._bulk.BulkRun` adds the transports)."""

    def __init__(
        self,
        stub: Any,
        metadata: tuple[tuple[str, str], ...] | None,
        info: ServerInfo | None,
        options: BulkOptions,
        items: Iterable[Any] | AsyncIterable[Any],
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._info = info
        self._opt = options
        self._budget = image_budget(options.template, info, options.client_max_message_bytes)
        self._per_call = images_per_request(info, options.batch_size)
        window = options.concurrency * options.batch_size
        if info is not None and info.max_stream_in_flight > 0:
            window = min(window, info.max_stream_in_flight)
        self.stream_window = max(1, window)
        self.unary_window = options.concurrency * self._per_call
        self._total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
        self._sync_items: Iterator[Any] | None = None
        self._async_items: AsyncIterator[Any] | None = None
        if isinstance(items, AsyncIterable):
            self._async_items = aiter(items)
        else:
            self._sync_items = iter(items)
        self._exhausted = False
        self._pulled = 0
        self._held = 0
        self._ready: deque[Entry] = deque()
        self._delayed: list[Delayed] = []
        self._done: deque[Entry] = deque()
        self._done_by_seq: dict[int, Entry] = {}
        self._next_seq = 0
        self._wake = asyncio.Event()
        self._out = asyncio.Event()
        self._transport: Transport = options.transport
        if info is not None and info.methods and "ExtractStream" not in info.methods:
            self._transport = "unary"  # the server says it has no stream
        self._wire_ids = itertools.count()
        self.max_in_flight = 0
        """Most items that were ever sent and unanswered at once (for tests and tuning)."""

    # ------------------------------------------------------------------ consumer side

    @property
    def window(self) -> int:
        return self.stream_window if self._transport == "stream" else self.unary_window

    def _take_done(self) -> Entry | None:
        if not self._opt.ordered:
            return self._done.popleft() if self._done else None
        entry = self._done_by_seq.pop(self._next_seq, None)
        if entry is not None:
            self._next_seq += 1
        return entry

    def _finish(self, entry: Entry, result: BulkResult) -> None:
        entry.result = result
        entry.image = None  # the pixels are no longer needed
        if self._opt.ordered:
            self._done_by_seq[entry.seq] = entry
        else:
            self._done.append(entry)
        self._out.set()

    def _on_error(
        self, entry: Entry, error: FeatureServiceError, now: float, delay: float | None = None
    ) -> None:
        """Schedule a retry with backoff within the item's deadline, or fail the item.
        Entries of one failed call share ``delay``, so they go again together."""
        if error.retryable and entry.retries_used < self._opt.retries:
            if delay is None:
                delay = backoff_delay(entry.retries_used)
            if entry.deadline is None or now + delay < entry.deadline:
                entry.retries_used += 1
                heapq.heappush(self._delayed, Delayed(now + delay, entry.seq, entry))
                self._wake.set()
                return
        self._finish(entry, error)

    # ------------------------------------------------------------------ input side

    def _convert(self, item: Any, position: int) -> Entry:
        item_id, image, regions = split_item(item, position)
        entry = Entry(seq=position, id=item_id)
        what = f"item {item_id!r}"
        try:
            proto = image_to_proto(image)
            proto.regions.extend(parse_boxes(regions, "regions"))
            check_image(proto, self._info, self._budget, what)
        except FeatureServiceError as exc:
            entry.result = exc
        except (OSError, ValueError, TypeError) as exc:
            error = FeatureServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {exc}")
            error.__cause__ = exc
            entry.result = error
        else:
            entry.image = proto
            entry.size = image_wire_bytes(proto)
        return entry

    def _pull_sync(self) -> Any:
        assert self._sync_items is not None
        try:
            item = next(self._sync_items)
        except StopIteration:
            return _END
        return self._convert(item, self._pulled)

    async def _pull(self) -> Entry | None:
        """The next input item as an entry (local failures already set), or ``None``."""
        if self._exhausted or self._held >= 2 * self.window:
            return None
        if self._async_items is not None:
            try:
                item = await anext(self._async_items)
            except StopAsyncIteration:
                pulled: Any = _END
            else:
                pulled = await asyncio.to_thread(self._convert, item, self._pulled)
        else:
            pulled = await asyncio.to_thread(self._pull_sync)
        if pulled is _END:
            self._exhausted = True
            self._wake.set()
            return None
        self._pulled += 1
        self._held += 1
        entry: Entry = pulled
        if entry.result is not None:
            self._finish(entry, entry.result)
        return entry

    def _promote(self, now: float) -> float | None:
        """Move retries whose backoff is over to the ready queue; the next one's time."""
        while self._delayed and self._delayed[0].ready_at <= now:
            self._ready.append(heapq.heappop(self._delayed).entry)
        return self._delayed[0].ready_at if self._delayed else None

    def _work_left(self) -> bool:
        return not self._exhausted or bool(self._ready) or bool(self._delayed)

    async def _next_to_send(self) -> Entry | None:
        """A retry that is due, else a new input item that is not already failed."""
        while True:
            if self._ready:
                return self._ready.popleft()
            entry = await self._pull()
            if entry is None:
                return None
            if entry.result is None:
                return entry

    async def _sleep_until(self, *times: float | None) -> None:
        """Wait for a wake-up, or until the earliest of ``times``. (A timer that sets the
        event, not ``asyncio.wait_for``, which can swallow a cancellation on Python 3.11.)"""
        due = [t for t in times if t is not None]
        timer = None
        if due:
            delay = max(0.0, min(due) - time.monotonic())
            timer = asyncio.get_running_loop().call_later(delay, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            if timer is not None:
                timer.cancel()
        self._wake.clear()


_END = object()
