"""The bulk-extraction engine behind ``extract_many`` of both clients (asyncio; the blocking
client drives it on a private event loop).

Memory stays bounded on both sides whatever the input's length:

- at most ``window`` items are sent and unanswered: for ExtractStream
  ``min(concurrency * batch_size, server's max_stream_in_flight)`` single-image items; for
  unary Extract ``concurrency`` calls of up to ``batch_size`` images;
- the input is pulled lazily, and at most ``2 * window`` items are held between being pulled
  and being handed to the caller (the in-flight ones, finished ones waiting for their turn when
  ``ordered``, and ones waiting for a retry).

Each image is one stream item, so one bad image fails only itself; the server batches items
of all streams and calls together. Unary calls are sized to the server's advertised limits
(images per request, message bytes); a call refused for one image's sake (INVALID_ARGUMENT,
or a RESOURCE_EXHAUSTED that is not transient) is split and its images resent one by one, so
the error lands on the image that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import sys
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import grpc.aio

from layertap.v1 import layertap_pb2 as pb

from ._images import image_to_proto
from ._option_parsing import parse_boxes
from ._requests import (
    check_image,
    image_budget,
    image_wire_bytes,
    images_per_request,
    request_template,
    with_images,
)
from ._responses import parse_extract_response, split_result
from ._retry import backoff_delay, remaining
from .errors import FeatureServiceError
from .types import ExtractResult, ServerInfo

Transport = Literal["stream", "unary"]
ErrorMode = Literal["raise", "yield"]
BulkResult = ExtractResult | FeatureServiceError

_CALL_LEVEL = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
"""Failures that concern the connection or the caller, not an image: they end the whole run
(even with ``errors="yield"``), since every later item would fail the same way."""
_SPLIT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})
_OFFLOAD_BYTES = 1 << 20


@dataclass(frozen=True)
class BulkOptions:
    """Validated arguments of one ``extract_many`` run."""

    template: pb.ExtractRequest
    batch_size: int
    concurrency: int
    ordered: bool
    progress: bool | None
    transport: Transport
    errors: ErrorMode
    retries: int
    timeout: float | None
    client_max_message_bytes: int


_RUN_OPTIONS = ("batch_size", "concurrency", "ordered", "progress", "transport", "errors")
"""The keyword arguments of ``extract_many`` that shape the run rather than the request."""


def check_bulk_args(
    batch_size: int, concurrency: int, transport: str, errors: str, ordered: bool
) -> None:
    """Refuse bad ``extract_many`` arguments before anything is pulled or sent."""
    for name, value in (("batch_size", batch_size), ("concurrency", concurrency)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if transport not in ("stream", "unary"):
        raise ValueError(f"transport must be 'stream' or 'unary', got {transport!r}")
    if errors not in ("raise", "yield"):
        raise ValueError(f"errors must be 'raise' or 'yield', got {errors!r}")
    if not isinstance(ordered, bool):
        raise TypeError(f"ordered must be a bool, got {ordered!r}")


def bulk_options(
    arguments: Mapping[str, Any],
    timeout: float | None,
    retries: int,
    client_max_message_bytes: int,
) -> BulkOptions:
    """Validate the arguments of an ``extract_many`` call of either client (its ``locals()``:
    the request's options, see :func:`request_template`, and the run's) into BulkOptions;
    ``timeout`` is the call's, resolved against the client's default."""
    run = {name: arguments[name] for name in _RUN_OPTIONS}
    check_bulk_args(
        run["batch_size"], run["concurrency"], run["transport"], run["errors"], run["ordered"]
    )
    return BulkOptions(
        template=request_template(arguments),
        **run,
        retries=retries,
        timeout=timeout,
        client_max_message_bytes=client_max_message_bytes,
    )


@dataclass(eq=False)
class _Entry:
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
class _Delayed:
    ready_at: float
    seq: int
    entry: _Entry = field(compare=False)


def _write_race(error: FeatureServiceError) -> bool:
    """grpc.aio reports INTERNAL "Internal error from Core" instead of the real status when the
    server ends a stream while a request is being written; the real cause is unknown, often
    transient (a server going away), so such a failure is treated as retryable."""
    return error.code == grpc.StatusCode.INTERNAL and error.details == "Internal error from Core"


class _Restart(Exception):
    """Every window slot holds an item that timed out client-side: open a fresh stream."""


class _FallBackToUnary(Exception):
    """The server does not implement ExtractStream."""


def split_item(item: Any, position: int) -> tuple[Any, Any, Any]:
    """``(id, image)`` tuples keep their id; ``(id, image, regions)`` also carry that image's
    boxes; a bare image gets ``str(position)`` and no regions."""
    if isinstance(item, tuple) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None
    return str(position), item, None


def progress_bar(enabled: bool | None, total: int | None, desc: str | None = "extract") -> Any:
    """A tqdm bar on stderr, or ``None``: ``None`` for ``enabled`` shows it only when stderr is
    a terminal, and then not at all if tqdm cannot be imported (the bar is a nicety); ``True``
    needs tqdm. The one progress bar of the client (``extract_many``, ``layertap extract``)."""
    auto = enabled is None
    if enabled is None:
        isatty = getattr(sys.stderr, "isatty", None)
        enabled = bool(isatty and isatty())
    if not enabled:
        return None
    try:
        from tqdm import tqdm  # imported only when a bar is shown
    except ImportError:
        if auto:
            return None
        raise
    return tqdm(total=total, unit="img", file=sys.stderr, desc=desc, dynamic_ncols=True)


class BulkRun:
    """One ``extract_many`` run over an asyncio stub; iterate :meth:`results` once."""

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
        self._ready: deque[_Entry] = deque()
        self._delayed: list[_Delayed] = []
        self._done: deque[_Entry] = deque()
        self._done_by_seq: dict[int, _Entry] = {}
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

    async def results(self) -> AsyncGenerator[tuple[Any, BulkResult], None]:
        """``(id, ExtractResult | FeatureServiceError)`` per image, ordered or as completed."""
        bar = progress_bar(self._opt.progress, self._total)
        pump = asyncio.create_task(self._pump())
        pump.add_done_callback(lambda _: self._out.set())
        try:
            while True:
                entry = self._take_done()
                if entry is None:
                    if pump.done():
                        pump.result()  # raises the run's failure; else every item is done
                        return
                    self._out.clear()
                    await self._out.wait()
                    continue
                self._held -= 1
                self._wake.set()
                if bar is not None:
                    bar.update(1)
                assert entry.result is not None
                if isinstance(entry.result, FeatureServiceError) and self._opt.errors == "raise":
                    raise entry.result
                yield entry.id, entry.result
        finally:
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            if bar is not None:
                bar.close()

    def _take_done(self) -> _Entry | None:
        if not self._opt.ordered:
            return self._done.popleft() if self._done else None
        entry = self._done_by_seq.pop(self._next_seq, None)
        if entry is not None:
            self._next_seq += 1
        return entry

    def _finish(self, entry: _Entry, result: BulkResult) -> None:
        entry.result = result
        entry.image = None  # the pixels are no longer needed
        if self._opt.ordered:
            self._done_by_seq[entry.seq] = entry
        else:
            self._done.append(entry)
        self._out.set()

    def _on_error(
        self, entry: _Entry, error: FeatureServiceError, now: float, delay: float | None = None
    ) -> None:
        """Schedule a retry with backoff within the item's deadline, or fail the item.
        Entries of one failed call share ``delay``, so they go again together."""
        if error.retryable and entry.retries_used < self._opt.retries:
            if delay is None:
                delay = backoff_delay(entry.retries_used)
            if entry.deadline is None or now + delay < entry.deadline:
                entry.retries_used += 1
                heapq.heappush(self._delayed, _Delayed(now + delay, entry.seq, entry))
                self._wake.set()
                return
        self._finish(entry, error)

    # ------------------------------------------------------------------ input side

    def _convert(self, item: Any, position: int) -> _Entry:
        item_id, image, regions = split_item(item, position)
        entry = _Entry(seq=position, id=item_id)
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

    async def _pull(self) -> _Entry | None:
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
        entry: _Entry = pulled
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

    async def _next_to_send(self) -> _Entry | None:
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

    # ------------------------------------------------------------------ pump

    async def _pump(self) -> None:
        if self._transport == "stream":
            try:
                await self._pump_stream()
                return
            except _FallBackToUnary:
                self._transport = "unary"
        await self._pump_unary()

    async def _pump_stream(self) -> None:
        answered = [False]
        failures = 0
        while True:
            pending: dict[str, _Entry] = {}
            answered_before = answered[0]
            answered[0] = False
            try:
                await self._stream_session(pending, answered)
                return
            except _Restart:
                self._requeue(pending)
                continue
            except (grpc.RpcError, FeatureServiceError) as exc:
                error = (
                    exc
                    if isinstance(exc, FeatureServiceError)
                    else FeatureServiceError.from_rpc_error(exc)
                )
                progress, answered[0] = answered[0], answered[0] or answered_before
                race = _write_race(error)
                if not answered[0] and (race or error.code == grpc.StatusCode.UNIMPLEMENTED):
                    # no stream here (an older server, a proxy): unary calls always work, and
                    # report the real status themselves if anything else was wrong
                    self._requeue(pending)
                    raise _FallBackToUnary() from exc
                failures = 0 if progress else failures + 1
                if not (error.retryable or race) or failures > self._opt.retries:
                    raise error from exc
                now = time.monotonic()
                delay = backoff_delay(max((e.retries_used for e in pending.values()), default=0))
                for entry in pending.values():
                    self._on_error(entry, error, now, delay)
                await asyncio.sleep(backoff_delay(max(0, failures - 1)))

    def _requeue(self, pending: dict[str, _Entry]) -> None:
        self._ready.extendleft(sorted(pending.values(), key=lambda e: -e.seq))
        pending.clear()

    async def _stream_session(self, pending: dict[str, _Entry], answered: list[bool]) -> None:
        """One ExtractStream call; returns once all work is answered. Raises the stream's
        failure, or :class:`_Restart` when timed-out items fill the whole window."""
        call: Any = None
        zombies: set[str] = set()
        reader: asyncio.Task[None] | None = None
        # gRPC writes from this queue itself: a failed call then reports its real status to
        # the reader (writing to a call the server already ended reports INTERNAL instead).
        outbox: asyncio.Queue[pb.ExtractStreamRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[pb.ExtractStreamRequest]:
            while (message := await outbox.get()) is not None:
                yield message

        try:
            while True:
                now = time.monotonic()
                if reader is not None and reader.done():
                    exc = reader.exception()
                    if exc is not None:
                        raise exc
                    if pending:
                        raise FeatureServiceError.invalid_response(
                            f"the stream ended with {len(pending)} items unanswered"
                        )
                    return
                earliest = self._expire(pending, zombies, now)
                if zombies and len(zombies) >= self.stream_window:
                    raise _Restart()
                next_retry = self._promote(now)
                while len(pending) + len(zombies) < self.stream_window:
                    entry = await self._next_to_send()
                    if entry is None:
                        break
                    assert entry.image is not None
                    if entry.deadline is None and self._opt.timeout is not None:
                        entry.deadline = time.monotonic() + self._opt.timeout
                    if call is None:
                        call = self._stub.ExtractStream(requests(), metadata=self._metadata)
                        reader = asyncio.create_task(
                            self._read_stream(call, pending, zombies, answered)
                        )
                        reader.add_done_callback(lambda _: self._wake.set())
                    wire_id = str(next(self._wire_ids))
                    pending[wire_id] = entry
                    self.max_in_flight = max(self.max_in_flight, len(pending) + len(zombies))
                    request = with_images(self._opt.template, [entry.image])
                    outbox.put_nowait(pb.ExtractStreamRequest(id=wire_id, request=request))
                if not self._work_left() and not pending:
                    if call is None:
                        return
                    if zombies:
                        return  # the finally cancels the call: nobody waits for those answers
                    outbox.put_nowait(None)  # half-close: the server ends the stream
                    assert reader is not None
                    await asyncio.wait([reader])
                    continue
                await self._sleep_until(next_retry, earliest)
        finally:
            if call is not None and not call.done():
                call.cancel()
            if reader is not None and not reader.done():
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader

    def _expire(self, pending: dict[str, _Entry], zombies: set[str], now: float) -> float | None:
        """Fail items past their deadline (their slot stays taken until the server answers or
        the stream ends); returns the earliest deadline still pending."""
        earliest = None
        for wire_id, entry in list(pending.items()):
            if entry.deadline is None:
                continue
            if entry.deadline <= now:
                del pending[wire_id]
                zombies.add(wire_id)
                self._finish(
                    entry,
                    FeatureServiceError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"item {entry.id!r}: no answer within {self._opt.timeout} s",
                    ),
                )
            elif earliest is None or entry.deadline < earliest:
                earliest = entry.deadline
        return earliest

    async def _read_stream(
        self, call: Any, pending: dict[str, _Entry], zombies: set[str], answered: list[bool]
    ) -> None:
        async for answer in call:
            self._wake.set()
            if answer.id in zombies:
                zombies.discard(answer.id)
                continue
            entry = pending.pop(answer.id, None)
            if entry is None:
                raise FeatureServiceError.invalid_response(f"answer for unknown item {answer.id!r}")
            answered[0] = True
            now = time.monotonic()
            if answer.WhichOneof("result") == "error":
                e = answer.error
                self._on_error(
                    entry, FeatureServiceError.from_item_error(e.code, e.code_name, e.message), now
                )
                continue
            try:
                if answer.response.ByteSize() > _OFFLOAD_BYTES:
                    result = await asyncio.to_thread(parse_extract_response, answer.response, 1)
                else:
                    result = parse_extract_response(answer.response, 1)
            except FeatureServiceError as exc:
                self._finish(entry, exc)
            else:
                self._finish(entry, result)

    # ------------------------------------------------------------------ unary transport

    async def _next_chunk(self) -> list[_Entry]:
        """Up to ``batch_size`` entries (capped by the server's limits) for one Extract call."""
        chunk: list[_Entry] = []
        total = 0
        while len(chunk) < self._per_call:
            entry = await self._next_to_send()
            if entry is None:
                break
            if chunk and (entry.solo or total + entry.size > self._budget):
                self._ready.appendleft(entry)
                break
            chunk.append(entry)
            total += entry.size
            if entry.solo:
                break
        return chunk

    async def _pump_unary(self) -> None:
        calls: set[asyncio.Task[None]] = set()
        in_flight = [0]
        try:
            while True:
                for task in [t for t in calls if t.done()]:
                    calls.discard(task)
                    task.result()  # a call-level failure ends the run
                next_retry = self._promote(time.monotonic())
                while len(calls) < self._opt.concurrency:
                    chunk = await self._next_chunk()
                    if not chunk:
                        break
                    now = time.monotonic()
                    for entry in chunk:
                        if entry.deadline is None and self._opt.timeout is not None:
                            entry.deadline = now + self._opt.timeout
                    in_flight[0] += len(chunk)
                    self.max_in_flight = max(self.max_in_flight, in_flight[0])
                    task = asyncio.create_task(self._unary_call(chunk, in_flight))
                    task.add_done_callback(lambda _: self._wake.set())
                    calls.add(task)
                if not calls and not self._work_left():
                    return
                await self._sleep_until(next_retry)
        finally:
            for task in calls:
                task.cancel()
            if calls:
                await asyncio.wait(calls)

    async def _unary_call(self, chunk: list[_Entry], in_flight: list[int]) -> None:
        deadlines = [e.deadline for e in chunk if e.deadline is not None]
        timeout = remaining(min(deadlines)) if deadlines else None
        request = with_images(self._opt.template, [e.image for e in chunk if e.image is not None])
        try:
            response = await self._stub.Extract(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            error = FeatureServiceError.from_rpc_error(exc)
            if error.code in _CALL_LEVEL:
                raise error from exc
            now = time.monotonic()
            if len(chunk) > 1 and not error.retryable and error.code in _SPLIT:
                for entry in reversed(chunk):
                    entry.solo = True
                    self._ready.appendleft(entry)
            else:
                delay = backoff_delay(max(e.retries_used for e in chunk))
                for entry in chunk:
                    self._on_error(entry, error, now, delay)
            return
        finally:
            in_flight[0] -= len(chunk)
        try:
            if response.ByteSize() > _OFFLOAD_BYTES:
                result = await asyncio.to_thread(parse_extract_response, response, len(chunk))
            else:
                result = parse_extract_response(response, len(chunk))
        except FeatureServiceError as exc:
            for entry in chunk:
                self._finish(entry, exc)
            return
        for entry, one in zip(chunk, split_result(result), strict=True):
            self._finish(entry, one)


_END = object()
