"""The two ways the items of an ``extract_many`` run travel: one ExtractStream call with a
window of single-image items (reopened after failures, with backoff), or concurrent unary
Extract calls sized to the server's limits, split image by image when one image spoils a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from layertap.v1 import layertap_pb2 as pb

from ._bulk_state import Entry, RunState
from ._requests import with_images
from ._responses import parse_extract_response, split_result
from ._retry import backoff_delay, remaining
from .errors import FeatureServiceError

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


def _write_race(error: FeatureServiceError) -> bool:
    """grpc.aio reports INTERNAL "Internal error from Core" instead of the real status when the
    server ends a stream while a request is being written; the real cause is unknown, often
    transient (a server going away), so such a failure is treated as retryable."""
    return error.code == grpc.StatusCode.INTERNAL and error.details == "Internal error from Core"


class _Restart(Exception):
    """Every window slot holds an item that timed out client-side: open a fresh stream."""


class FallBackToUnary(Exception):
    """The server does not implement ExtractStream."""


class StreamTransport(RunState):
    """Items sent as ExtractStream items, at most ``stream_window`` unanswered at once."""

    async def _pump_stream(self) -> None:
        answered = [False]
        failures = 0
        while True:
            pending: dict[str, Entry] = {}
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
                    raise FallBackToUnary() from exc
                failures = 0 if progress else failures + 1
                if not (error.retryable or race) or failures > self._opt.retries:
                    raise error from exc
                now = time.monotonic()
                delay = backoff_delay(max((e.retries_used for e in pending.values()), default=0))
                for entry in pending.values():
                    self._on_error(entry, error, now, delay)
                await asyncio.sleep(backoff_delay(max(0, failures - 1)))

    def _requeue(self, pending: dict[str, Entry]) -> None:
        self._ready.extendleft(sorted(pending.values(), key=lambda e: -e.seq))
        pending.clear()

    async def _stream_session(self, pending: dict[str, Entry], answered: list[bool]) -> None:
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

    def _expire(self, pending: dict[str, Entry], zombies: set[str], now: float) -> float | None:
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
        self, call: Any, pending: dict[str, Entry], zombies: set[str], answered: list[bool]
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


class UnaryTransport(RunState):
    """Items sent in Extract calls of up to ``batch_size`` images, ``concurrency`` at once."""

    async def _next_chunk(self) -> list[Entry]:
        """Up to ``batch_size`` entries (capped by the server's limits) for one Extract call."""
        chunk: list[Entry] = []
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

    async def _unary_call(self, chunk: list[Entry], in_flight: list[int]) -> None:
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
