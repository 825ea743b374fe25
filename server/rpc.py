"""gRPC plumbing every RPC shares: the one table from domain errors to status codes, tolerant
request parsing, request ids, and the `@rpc` decorator that applies them with a log line and
metrics. Torch-free: it knows statuses, never what an RPC computes."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from layertap.v1 import layertap_pb2 as pb

from .errors import (
    Cancelled,
    Disabled,
    InvalidArgument,
    LayertapError,
    LimitExceeded,
    ModelNotFound,
    QueueFull,
    Unavailable,
)
from .fairness import CLIENT, Client
from .metrics import Metrics

# RPC log lines keep the logger name operators filter on (it was the servicer module's).
log = logging.getLogger("layertap.server.service")

# The one table from domain errors to gRPC statuses (most specific first).
STATUS: list[tuple[type[LayertapError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (Disabled, grpc.StatusCode.UNIMPLEMENTED),
]
MAX_DETAILS = 2000
# Trailing metadata on failures worth retrying as is (full queue, model loading, shutting
# down), so clients retry RESOURCE_EXHAUSTED only when it is transient, never for a limit.
RETRYABLE = ("layertap-retryable", "true")
_RETRYABLE_ERRORS = (QueueFull, Unavailable)
# The running RPC's request id, for log lines of work it spawns (stream items).
REQUEST_ID: ContextVar[str] = ContextVar("layertap_request_id", default="")

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


class _EverySoOften:
    """Overload refusals (full queue, a client past its share, shutting down) come by the
    thousand per second in a flood: one WARNING line per method and status every LOG_EVERY_S
    (the rest at DEBUG; the metrics count them all), so the log is not the next bottleneck."""

    LOG_EVERY_S = 10.0

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}

    def due(self, method: str, code: str) -> bool:
        now = time.monotonic()
        if now - self._last.get((method, code), -self.LOG_EVERY_S) < self.LOG_EVERY_S:
            return False
        self._last[(method, code)] = now
        return True


_OVERLOAD_LOG = _EverySoOften()


class HasMetrics(Protocol):
    """What `@rpc` needs of a servicer: its metrics (None when off), and who a call is from
    (for fair queuing)."""

    metrics: Metrics | None

    def identify(self, context: grpc.aio.ServicerContext) -> Client: ...


def status_for(exc: LayertapError) -> grpc.StatusCode:
    """The status of a domain error (INTERNAL only for an error type the table misses)."""
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes are not a valid message (grpc would say UNKNOWN)."""

    reason: str


def tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: bad bytes become Undecodable, which `@rpc`
    answers with INVALID_ARGUMENT instead of grpc's UNKNOWN."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError, bad UTF-8 in a string field, ...
            return Undecodable(str(exc)[:200] or type(exc).__name__)

    return deserialize


def add_to_server(
    servicer: Any, server: grpc.aio.Server, module: Any = pb, name: str = "FeatureService"
) -> None:
    """Register a service (the FeatureService, or another protocol's from its generated
    `module`) like the generated helper does, with tolerant parsing (each message of a request
    stream is parsed on its own, so one bad message is one bad item)."""
    service = module.DESCRIPTOR.services_by_name[name]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(module, method.input_type.name)
        response_cls = getattr(module, method.output_type.name)
        if method.client_streaming and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif method.client_streaming or method.server_streaming:
            raise NotImplementedError(f"{method.name}: half-streaming RPCs are not served")
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=tolerant(request_cls.FromString),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The client's x-request-id (64 chars at most), or a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and value.strip():
            return value.strip()[:64]
    return uuid.uuid4().hex


def rpc(handler: H) -> H:
    """Map domain errors to statuses (anything else is a bug: INTERNAL, logged with traceback),
    and give every RPC a request id, a log line and its metrics."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: HasMetrics, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # the HTTP transport's calls carry their own label (http_server.HttpCall.layertap_method)
        method = getattr(context, "layertap_method", None) or name
        rid = request_id(context)
        REQUEST_ID.set(rid)
        CLIENT.set(self.identify(context))  # what this call queues is tagged with its client
        trailer: tuple[tuple[str, str], ...] = (("x-request-id", rid),)
        model = str(getattr(request, "model", "") or "")
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        details = ""
        retryable = False
        m = self.metrics
        if m is not None:
            m.in_flight.labels(method).inc()
        try:
            if isinstance(request, Undecodable):
                raise InvalidArgument(
                    f"the request is not a valid {method} message ({request.reason}); "
                    "check the client's generated code matches the service's .proto"
                )
            response = await handler(self, request, context)
            context.set_trailing_metadata(trailer)
            return response
        except LayertapError as exc:
            code, details = status_for(exc), str(exc)[:MAX_DETAILS]
            if isinstance(exc, _RETRYABLE_ERRORS):
                trailer += (RETRYABLE,)
                retryable = True
            await context.abort(code, details, trailing_metadata=trailer)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            details = f"internal error in {method}; this is a server bug, see the server log"
            log.exception("bug in %s", method, extra={"request_id": rid})
            await context.abort(code, details, trailing_metadata=trailer)
        finally:
            seconds = time.perf_counter() - started
            if m is not None:
                m.in_flight.labels(method).dec()
                m.requests.labels(method, m.model(model), code.name).inc()
                m.request_seconds.labels(method).observe(seconds)
            fields = {
                "request_id": rid,
                "method": method,
                "model": model[:80],
                "code": code.name,
                "duration_ms": round(seconds * 1000, 2),
            }
            if code == grpc.StatusCode.OK:
                log.debug("%s OK", method, extra=fields)
            elif code == grpc.StatusCode.INTERNAL:
                pass  # logged with its traceback above
            elif retryable and not _OVERLOAD_LOG.due(method, code.name):
                log.debug("%s %s: %s", method, code.name, details[:300], extra=fields)
            else:
                log.warning("%s %s: %s", method, code.name, details[:300], extra=fields)

    return wrapper  # type: ignore[return-value]
