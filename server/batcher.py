"""Micro-batching: pure asyncio, knows futures and keys, never torch or protobuf.

Items with the same key (same extractor and input shape) from concurrent requests are stacked
into one call of `run_batch`. The rule (after ray serve's batching): take the oldest item; if the
worker was idle and nothing else was queued when it arrived, run at once (a lone request never
waits); otherwise keep collecting same-key items until the batch is full or `max_wait` has passed
since that oldest item arrived. Cancelled items are dropped before running. Whatever happens in
`run_batch`, every waiting future gets a result or an exception: none is left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import QueueFull, Unavailable

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")

RunBatch = Callable[[Hashable, list[Any]], Awaitable[Sequence[Any]]]


@dataclass(frozen=True)
class BatchInfo:
    """How an item was served: time queued, the batch's run time, and the batch size."""

    queue_s: float
    run_s: float
    batch_size: int
    batch_id: int = 0


@dataclass
class _Item(Generic[P]):
    key: Hashable
    payload: P
    future: asyncio.Future[tuple[Any, BatchInfo]]
    enqueued: float
    lone: bool  # arrived to an idle worker with nothing queued
    limit: int = 0
    priority: int = 0  # 0 normal, 1 low (bulk)


@dataclass
class Batcher:
    """One batcher per device worker: batches run one at a time, in arrival order of their head."""

    run_batch: RunBatch
    max_batch_size: int = 8
    max_wait_s: float = 0.002
    max_queue: int = 512
    batch_limit: Callable[[Hashable], int] | None = None
    # observers (metrics): queue depth after every change, size of every batch run
    on_queue_depth: Callable[[int], None] | None = None
    on_batch: Callable[[Hashable, int], None] | None = None
    _pending: list[_Item[Any]] = field(default_factory=list, init=False)
    _wakeup: asyncio.Event | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _busy: bool = field(default=False, init=False)
    _reserved: int = field(default=0, init=False)
    _closed: bool = field(default=False, init=False)
    batches_run: int = field(default=0, init=False)

    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    @property
    def queued(self) -> int:
        return len(self._pending)

    @contextlib.contextmanager
    def reserve(self, count: int) -> Iterator[None]:
        """Hold queue room for `count` items while they are being decoded, so a full queue
        refuses a request before any decoding is spent on it (and decode backlog stays bounded).
        Submit inside the block with `reserved=True`."""
        self._check_room(count)
        self._reserved += count
        try:
            yield
        finally:
            self._reserved -= count

    def _check_room(self, count: int) -> None:
        if self._closed:
            raise Unavailable("server is shutting down; retry on another replica")
        waiting = len(self._pending) + self._reserved
        if waiting + count > self.max_queue:
            raise QueueFull(
                f"batch queue is full ({waiting} images waiting, limit "
                f"max_queue_images={self.max_queue}); retry with backoff"
            )

    def submit_many(
        self, key: Hashable, payloads: Sequence[Any], reserved: bool = False, priority: int = 0
    ) -> list[asyncio.Future[Any]]:
        """Queue all payloads of one request atomically, or refuse them all (RESOURCE_EXHAUSTED).
        `reserved`: the room was already taken with `reserve()` (inside its block)."""
        if not reserved:
            self._check_room(len(payloads))
        elif self._closed:
            raise Unavailable("server is shutting down; retry on another replica")
        self.start()
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        lone = not self._busy and not self._pending
        limit = self.batch_limit(key) if self.batch_limit else self.max_batch_size
        futures = []
        for payload in payloads:
            fut: asyncio.Future[Any] = loop.create_future()
            self._pending.append(_Item(key, payload, fut, now, lone, max(1, limit), priority))
            futures.append(fut)
        assert self._wakeup is not None
        self._wakeup.set()
        self._report_depth()
        return futures

    def _report_depth(self) -> None:
        if self.on_queue_depth is not None:
            self.on_queue_depth(len(self._pending))

    async def submit(self, key: Hashable, payload: Any) -> tuple[Any, BatchInfo]:
        return await self.submit_many(key, [payload])[0]

    def _take(self, head: _Item[Any]) -> list[_Item[Any]]:
        """Remove and return up to `limit` live items with the head's key, oldest first."""
        batch: list[_Item[Any]] = []
        keep: list[_Item[Any]] = []
        for item in self._pending:
            if item.future.done():  # cancelled by its client: drop before compute
                continue
            if item.key == head.key and len(batch) < head.limit:
                batch.append(item)
            else:
                keep.append(item)
        self._pending = keep
        return batch

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            self._pending = [i for i in self._pending if not i.future.done()]
            if not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._pending[0]
            batch = self._take(head)
            lone = head.lone and not self._pending
            deadline = head.enqueued + self.max_wait_s
            while not lone and len(batch) < head.limit and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                more = [i for i in self._pending if i.key == head.key and not i.future.done()]
                if more:
                    room = head.limit - len(batch)
                    take = more[:room]
                    ids = {id(i) for i in take}
                    self._pending = [i for i in self._pending if id(i) not in ids]
                    batch.extend(take)
            batch = [i for i in batch if not i.future.done()]
            if batch:
                await self._run(head.key, batch)

    async def _run(self, key: Hashable, batch: list[_Item[Any]]) -> None:
        self._busy = True
        self._report_depth()
        if self.on_batch is not None:
            self.on_batch(key, len(batch))
        started = time.monotonic()
        try:
            results = await self.run_batch(key, [i.payload for i in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"run_batch returned {len(results)} results for {len(batch)} items"
                )
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(Unavailable("server is shutting down"))
            raise
        except BaseException as exc:  # every waiting future must hear about it
            log.debug("batch of %d failed: %r", len(batch), exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._busy = False
            self.batches_run += 1
        run_s = time.monotonic() - started
        batch_id = self.batches_run
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                info = BatchInfo(started - item.enqueued, run_s, len(batch), batch_id)
                item.future.set_result((result, info))

    async def close(self, drain: bool = True) -> None:
        """Stop taking work; with drain, queued items still run, else they fail UNAVAILABLE."""
        self._closed = True
        if not drain:
            for item in self._pending:
                if not item.future.done():
                    item.future.set_exception(Unavailable("server is shutting down"))
            self._pending.clear()
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
