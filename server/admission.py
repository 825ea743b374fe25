"""Admission: which calls the server takes on, counted by kind, so that idle or slow streams can
never take the slots of unary calls or health probes.

gRPC's own `maximum_concurrent_rpcs` counts every call alike, so 1,024 idle Health.Watch
streams (open without a token while health is open) took every slot and the kubelet's
Health.Check probes failed. Here:

- `Health.Check` is always admitted and never counted (a probe must be answered);
- unary calls share `max_concurrent_rpcs` slots;
- streaming calls (ExtractStream, Health.Watch, reflection: anything with a request or response
  stream) share `max_streaming_rpcs`, at most `max_streaming_rpcs_per_connection` of them on
  one connection (the peer address names the connection);
- a streaming call with no message in or out for `stream_idle_timeout_s` is ended with
  UNAVAILABLE (retryable), so forgotten streams give their slot back.

A refusal is RESOURCE_EXHAUSTED naming the limit and its setting. Counting is done where the
call runs (its handler), so a call cancelled before it started holds nothing. Torch-free, and
constant work per call on the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import grpc.aio

from .metrics import Metrics
from .rpc import RETRYABLE
from .settings import Settings

log = logging.getLogger("layertap.server.admission")

PROBE = "/grpc.health.v1.Health/Check"
LOG_EVERY_S = 10.0  # at most one log line per limit this often: a flood must not flood the log

Handler = Callable[..., Any]


@dataclass(frozen=True)
class Limits:
    unary: int  # max_concurrent_rpcs
    streams: int  # max_streaming_rpcs
    streams_per_connection: int  # max_streaming_rpcs_per_connection
    stream_idle_s: float  # stream_idle_timeout_s; 0 = never


@dataclass
class _Stream:
    """One open streaming call: its last message time and the timer that ends it when idle."""

    task: asyncio.Task[Any] | None
    loop: asyncio.AbstractEventLoop
    last: float
    timer: asyncio.TimerHandle | None = None
    expired: bool = False

    def touch(self) -> None:
        self.last = self.loop.time()


class _Requests:
    """The request stream, marking the call active on every message."""

    def __init__(self, requests: Any, stream: _Stream) -> None:
        self._requests = aiter(requests)
        self._stream = stream

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        message = await anext(self._requests)
        self._stream.touch()
        return message


class _Context:
    """The servicer context, marking the call active on every message read or written."""

    def __init__(self, context: Any, stream: _Stream) -> None:
        self._context = context
        self._stream = stream

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._stream.touch()

    async def read(self) -> Any:
        message = await self._context.read()
        self._stream.touch()
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


@dataclass
class Admission(grpc.aio.ServerInterceptor):
    """The interceptor; its counts are read by tests (and could be by metrics)."""

    limits: Limits
    metrics: Metrics | None = None  # refusals count in layertap_requests_total like any call
    unary: int = 0
    streams: int = 0
    per_connection: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # setting name -> refusals
    _logged: dict[str, float] = field(default_factory=dict)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = getattr(handler_call_details, "method", "") or ""
        if handler is None or method == PROBE:
            return handler
        name = method.rsplit("/", 1)[-1]
        if handler.request_streaming or handler.response_streaming:
            return self._streaming(handler, name)
        return self._unary(handler, name)

    # ------------------------------------------------------------------ refusals

    async def _refuse(
        self, context: Any, method: str, setting: str, message: str, retryable: bool
    ) -> NoReturn:
        """RESOURCE_EXHAUSTED naming the limit; retryable (the trailer) when others hold it."""
        self.refused[setting] = self.refused.get(setting, 0) + 1
        if self.metrics is not None:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED.name
            self.metrics.requests.labels(method, self.metrics.model(""), code).inc()
        now = time.monotonic()
        if now - self._logged.get(setting, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[setting] = now
            log.warning("refusing calls: %s (%d refused so far)", message, self.refused[setting])
        trailer = (RETRYABLE,) if retryable else ()
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailing_metadata=trailer)
        raise AssertionError("context.abort returned")  # it raises grpc.aio.AbortError

    # ------------------------------------------------------------------ unary calls

    async def unary_call(self, method: str, inner: Handler, request: Any, context: Any) -> Any:
        """Run one unary call in a max_concurrent_rpcs slot, or refuse it (the context's abort
        raises). gRPC calls come through the interceptor; HTTP calls call this directly."""
        if self.unary >= self.limits.unary:
            await self._refuse(
                context,
                method,
                "max_concurrent_rpcs",
                f"the server is serving its limit of {self.limits.unary} unary calls at "
                "once (max_concurrent_rpcs, HTTP and gRPC together); retry with backoff",
                retryable=True,
            )
        self.unary += 1
        try:
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result
        finally:
            self.unary -= 1

    def _unary(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        inner: Handler = handler.unary_unary

        async def serve(request: Any, context: Any) -> Any:
            return await self.unary_call(method, inner, request, context)

        return grpc.unary_unary_rpc_method_handler(
            serve,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # ------------------------------------------------------------------ streaming calls

    async def _open(self, context: Any, peer: str, method: str) -> None:
        """Count a new stream in, or refuse it (the context's abort raises)."""
        held = self.per_connection.get(peer, 0)
        if held >= self.limits.streams_per_connection:
            await self._refuse(
                context,
                method,
                "max_streaming_rpcs_per_connection",
                f"this connection already holds {held} streaming calls, the limit per "
                "connection (max_streaming_rpcs_per_connection); close streams you no longer "
                "use (ExtractStream, Health.Watch, reflection)",
                retryable=False,
            )
        if self.streams >= self.limits.streams:
            await self._refuse(
                context,
                method,
                "max_streaming_rpcs",
                f"the server holds its limit of {self.limits.streams} open streaming calls "
                "(max_streaming_rpcs); unary calls are not affected; retry the stream with "
                "backoff",
                retryable=True,
            )
        self.streams += 1
        self.per_connection[peer] = held + 1

    def _close(self, peer: str) -> None:
        self.streams -= 1
        held = self.per_connection[peer] - 1
        if held:
            self.per_connection[peer] = held
        else:
            del self.per_connection[peer]

    def _watch_idle(self, stream: _Stream) -> None:
        """End the stream's task once no message went either way for stream_idle_s."""
        idle = self.limits.stream_idle_s
        if idle <= 0 or stream.task is None:
            return

        def check() -> None:
            due = stream.last + idle
            if stream.loop.time() < due:  # active since: look again when it could be idle
                stream.timer = stream.loop.call_at(due, check)
                return
            stream.expired = True
            if stream.task is not None:
                stream.task.cancel()

        stream.timer = stream.loop.call_at(stream.last + idle, check)

    def _streaming(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.request_streaming and handler.response_streaming:
            inner: Handler = handler.stream_stream
            make = grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            inner = handler.stream_unary
            make = grpc.stream_unary_rpc_method_handler
        else:
            inner = handler.unary_stream
            make = grpc.unary_stream_rpc_method_handler
        responses = handler.response_streaming
        generator = inspect.isasyncgenfunction(inner)

        async def serve(request: Any, context: Any) -> Any:
            peer = str(context.peer() or "")
            await self._open(context, peer, method)
            loop = asyncio.get_running_loop()
            stream = _Stream(asyncio.current_task(), loop, loop.time())
            self._watch_idle(stream)
            if handler.request_streaming:
                request = _Requests(request, stream)
            tracked = _Context(context, stream)
            try:
                if generator:  # an async generator: its answers are written here
                    answers: AsyncIterator[Any] = inner(request, tracked)
                    async for answer in answers:
                        await tracked.write(answer)
                    return None
                result = inner(request, tracked)
                result = await result if inspect.isawaitable(result) else result
                return None if responses else result
            except asyncio.CancelledError:
                if not stream.expired:
                    raise  # the client went away, or the server stops
                if stream.task is not None:
                    stream.task.uncancel()
                idle = self.limits.stream_idle_s
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"stream ended after {idle:g} s without a message in either direction "
                    "(stream_idle_timeout_s), to free its slot; open a new one when needed",
                    trailing_metadata=(RETRYABLE,),
                )
            finally:
                if stream.timer is not None:
                    stream.timer.cancel()
                self._close(peer)

        if not (generator or inspect.iscoroutinefunction(inner)):
            return handler  # a synchronous handler (none here): not wrapped, not counted
        return make(
            serve,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def interceptor(settings: Settings, metrics: Metrics | None = None) -> Admission:
    """The admission interceptor the settings ask for."""
    return Admission(
        Limits(
            unary=settings.max_concurrent_rpcs,
            streams=settings.max_streaming_rpcs,
            streams_per_connection=settings.max_streaming_rpcs_per_connection,
            stream_idle_s=settings.stream_idle_timeout_s,
        ),
        metrics,
    )
