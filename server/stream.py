"""ExtractStream: many tagged Extract items over one bidirectional stream. Never torch.

Each item runs the same core as the unary Extract (so items batch with each other and with
unary traffic) in its own task; answers are written in completion order by one writer. The
session reads a request message only while it holds fewer than `limit` unanswered items, so
a client that sends faster than the server answers is held back by gRPC/HTTP2 flow control
instead of by server memory. One item's failure becomes that item's ItemError; the stream goes
on. That includes an answer too large for max_message_bytes: its size is checked (exactly, with
this stream's envelope) before it is queued for the writer, so gRPC never has to refuse a send,
which would end the whole stream. When the RPC is cancelled (client gone, deadline), every
unfinished item is cancelled, which cancels its batcher futures so they are dropped before
compute.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from layertap.v1 import layertap_pb2 as pb

from .errors import LayertapError
from .metrics import Metrics

log = logging.getLogger(__name__)

MAX_ID_CHARS = 1024
METHOD = "ExtractStream"

# (request, item id) -> the answer; an answer too large to send in a message with that id
# raises LimitExceeded, so it becomes that item's error instead of failing the whole stream
Extract = Callable[[pb.ExtractRequest, str], Awaitable[pb.ExtractResponse]]
Write = Callable[[pb.ExtractStreamResponse], Awaitable[None]]
Classify = Callable[[LayertapError], grpc.StatusCode]


@dataclass
class _Answer:
    """One finished item, waiting for the writer."""

    message: pb.ExtractStreamResponse
    seq: int  # the item's admission number (its slot)
    owns_id: bool  # this item holds its id in the in-flight set (a duplicate does not)
    model: str
    code: grpc.StatusCode


@dataclass
class _EndOfInput:
    """The reader is done: the client half-closed, or reading failed with `error`."""

    error: BaseException | None = None


def item_error(item_id: str, code: grpc.StatusCode, message: str) -> pb.ExtractStreamResponse:
    return pb.ExtractStreamResponse(
        id=item_id, error=pb.ItemError(code=code.value[0], code_name=code.name, message=message)
    )


class StreamSession:
    """One ExtractStream call: a reader task, one task per item, and the writer (`run`)."""

    def __init__(
        self,
        requests: AsyncIterator[object],
        write: Write,
        extract: Extract,
        classify: Classify,
        limit: int,
        metrics: Metrics | None = None,
        request_id: str = "",
        max_details: int = 2000,
    ) -> None:
        self._requests = requests
        self._write = write
        self._extract = extract
        self._classify = classify
        self._metrics = metrics
        self._request_id = request_id
        self._max_details = max_details
        self._slots = asyncio.Semaphore(limit)
        self._answers: asyncio.Queue[_Answer | _EndOfInput] = asyncio.Queue()
        self._ids: set[str] = set()  # ids of unanswered items
        self._unanswered: dict[int, str] = {}  # seq -> model (for metrics on cancellation)
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = 0

    async def run(self) -> None:
        """Serve the stream until the client half-closes and every item is answered."""
        reader = asyncio.get_running_loop().create_task(self._read(), name="stream-reader")
        reading = True
        try:
            while reading or self._unanswered:
                answer = await self._answers.get()
                if isinstance(answer, _EndOfInput):
                    if answer.error is not None:
                        raise answer.error
                    reading = False
                    continue
                await self._write(answer.message)
                self._done(answer)
        finally:
            # client gone, deadline, or a transport error: nothing may keep running for us
            reader.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(reader, *self._tasks, return_exceptions=True)
            if self._metrics is not None:
                for model in self._unanswered.values():
                    self._metrics.stream_items.labels(model, "CANCELLED").inc()

    def _done(self, answer: _Answer) -> None:
        """The answer is written: free its slot (the reader may read the next message)."""
        if answer.owns_id:
            self._ids.discard(answer.message.id)
        del self._unanswered[answer.seq]
        self._slots.release()
        if self._metrics is not None:
            self._metrics.stream_items.labels(answer.model, answer.code.name).inc()

    async def _read(self) -> None:
        """Admit one message per free slot; at the limit, stop reading (flow control)."""
        try:
            iterator = aiter(self._requests)
            while True:
                await self._slots.acquire()
                try:
                    message = await anext(iterator)
                except StopAsyncIteration:
                    self._slots.release()
                    break
                self._admit(message)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the request stream broke: end the RPC with it
            self._answers.put_nowait(_EndOfInput(exc))
            return
        self._answers.put_nowait(_EndOfInput())

    def _admit(self, message: object) -> None:
        seq = self._seq
        self._seq += 1
        if not isinstance(message, pb.ExtractStreamRequest):  # tolerant parsing gave Undecodable
            reason = getattr(message, "reason", "undecodable")
            self._reject(
                seq,
                "",
                False,
                "",
                f"stream message {seq} is not a valid ExtractStreamRequest ({reason}); its id "
                "is unknown, so this answer has an empty id; check the client's generated code "
                "matches layertap.v1",
            )
            return
        item_id = message.id
        model = message.request.model
        label = self._metrics.model(model) if self._metrics is not None else model
        if not item_id or len(item_id) > MAX_ID_CHARS:
            what = "an empty id" if not item_id else f"an id over {MAX_ID_CHARS} characters"
            self._reject(
                seq,
                "",
                False,
                label,
                f"stream message {seq} has {what}; give every item a unique, non-empty id of "
                f"at most {MAX_ID_CHARS} characters (answers are matched to items by id)",
            )
            return
        if item_id in self._ids:
            self._reject(
                seq,
                item_id,
                False,
                label,
                f"id {item_id[:80]!r} is already used by an unanswered item of this stream; ids "
                "must be unique among unanswered items (this duplicate was not run)",
            )
            return
        self._ids.add(item_id)
        self._observe_admission(seq, label)
        task = asyncio.get_running_loop().create_task(
            self._run_item(seq, item_id, label, message.request)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _observe_admission(self, seq: int, label: str) -> None:
        self._unanswered[seq] = label
        if self._metrics is not None:
            self._metrics.stream_unanswered.observe(len(self._unanswered))

    def _reject(self, seq: int, item_id: str, owns_id: bool, label: str, message: str) -> None:
        """Answer an item that cannot run; it still holds its slot until written."""
        label = label or "unknown"
        self._observe_admission(seq, label)
        code = grpc.StatusCode.INVALID_ARGUMENT
        self._log_failure(item_id, label, code, message)
        response = item_error(item_id, code, message[: self._max_details])
        self._answers.put_nowait(_Answer(response, seq, owns_id, label, code))

    async def _run_item(
        self, seq: int, item_id: str, label: str, request: pb.ExtractRequest
    ) -> None:
        code = grpc.StatusCode.OK
        try:
            response = await self._extract(request, item_id)
            answer = pb.ExtractStreamResponse(id=item_id, response=response)
        except LayertapError as exc:
            code = self._classify(exc)
            self._log_failure(item_id, label, code, str(exc))
            answer = item_error(item_id, code, str(exc)[: self._max_details])
        except asyncio.CancelledError:
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception(
                "bug in %s item %r",
                METHOD,
                item_id[:80],
                extra={"request_id": self._request_id, "method": METHOD, "model": label},
            )
            answer = item_error(
                item_id,
                code,
                f"internal error in {METHOD} item; this is a server bug, see the server log",
            )
        self._answers.put_nowait(_Answer(answer, seq, True, label, code))

    def _log_failure(self, item_id: str, label: str, code: grpc.StatusCode, message: str) -> None:
        log.warning(
            "%s item %r %s: %s",
            METHOD,
            item_id[:80],
            code.name,
            message[:300],
            extra={
                "request_id": self._request_id,
                "method": METHOD,
                "model": label,
                "code": code.name,
            },
        )
