"""What every HTTP endpoint shares (http_app.py assembles them; http_v2.py, http_v1.py).

Every HTTP call goes through the same gates as a gRPC call: the bearer-token check (the gRPC
interceptor's own `check`, with /v2/health open when auth_open_health is set), admission's
max_concurrent_rpcs slots (shared with gRPC's unary calls), and `@rpc` (request ids, status
mapping, log lines, metrics labelled `http:<Method>`), by handing the servicer methods an
`HttpCall` that plays the gRPC context. A gRPC status becomes an HTTP status and the v2 error
body `{"error": "<layertap's message>"}`. Torch-free; the loop never parses JSON or base64 of
an untrusted size (the decode pool does).
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from aiohttp import web

from .rpc import RETRYABLE
from .security import interceptors
from .settings import Settings

if TYPE_CHECKING:
    from .admission import Admission

log = logging.getLogger("layertap.server.http")

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,  # a limit; 429 when retryable (queue full)
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
OPEN_WHEN_PROBES = ("/v2/health/",)
JSON = "application/json"

Call = Callable[[Any, Any], Awaitable[Any]]


class HttpAbort(grpc.aio.AbortError):
    """A call ended with a gRPC status (raised by `HttpCall.abort`, which `@rpc` calls)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailer: Iterable[Any] = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.trailer = code, details, tuple(trailer)


class HttpCall:
    """One HTTP request in the shape of a grpc.aio.ServicerContext, for `@rpc`, admission and
    the servicers: its headers are the metadata (authorization, x-request-id), its connection
    the peer; `abort` raises HttpAbort."""

    def __init__(self, request: web.Request, method: str) -> None:
        self.request = request
        self.layertap_method = f"http:{method}"
        self.trailer: tuple[tuple[str, str], ...] = ()
        self._metadata = tuple((k.lower(), v) for k, v in request.headers.items())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        peer = self.request.transport.get_extra_info("peername") if self.request.transport else None
        return f"http:{peer[0]}:{peer[1]}" if peer else "http:unknown"

    def time_remaining(self) -> float | None:
        return None  # HTTP has no deadline header; a client that leaves cancels the call

    def set_trailing_metadata(self, metadata: Iterable[Any]) -> None:
        self.trailer = tuple(metadata)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Iterable[Any] = ()
    ) -> None:
        raise HttpAbort(code, details, trailing_metadata)


def error_response(exc: HttpAbort) -> web.Response:
    """The v2 error body with the status's HTTP code (429 + Retry-After when retryable)."""
    headers = {k: v for k, v in exc.trailer if k == "x-request-id"}
    status = HTTP_STATUS.get(exc.code, 500)
    if RETRYABLE in exc.trailer and exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        status = 429
    if RETRYABLE in exc.trailer:
        headers["Retry-After"] = "1"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return json_reply({"error": exc.details}, status, headers)


class HttpGate:
    """The gates an HTTP call passes before its handler runs: token, then admission."""

    def __init__(self, settings: Settings, admission: Admission) -> None:
        checks = interceptors(settings)
        self.token = checks[0] if checks else None
        self.open_prefixes = OPEN_WHEN_PROBES if settings.auth_open_health else ()
        self.admission = admission

    async def call(self, request: web.Request, method: str, handler: Call, message: Any) -> Any:
        """Run `handler(message, call)` (an `@rpc` method) as one admitted, authorised call;
        returns its result and the HttpCall (for the request id)."""
        context = HttpCall(request, method)
        if self.token is not None and not request.path.startswith(self.open_prefixes):
            failure = self.token.check(context.invocation_metadata())
            if failure is not None:
                log.info("rejected HTTP %s: %s", request.path[:100], failure[0].name)
                raise HttpAbort(*failure)
        result = await self.admission.unary_call(context.layertap_method, handler, message, context)
        return result, context


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
    """Every failure as the v2 error JSON: statuses from the call, aiohttp's own (unknown path,
    wrong method, a body over client_max_size) reworded to say what to do."""
    try:
        return await handler(request)
    except HttpAbort as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        message = (
            f"the request body is over {request.client_max_size} bytes (max_message_bytes); "
            "send fewer or smaller images per request"
        )
        return json_reply({"error": message}, 413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"{exc.status} {exc.reason}: {request.method} {request.path[:200]}"
        if exc.status == 404:
            message += "; the endpoints are /v2/..., /v1/models and /v1/extract (docs/PROTOCOLS.md)"
        return json_reply({"error": message}, exc.status)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The gRPC port's TLS for HTTP too (tls_cert/tls_key; tls_client_ca: clients must present
    a certificate it signed). The files were checked by security.server_credentials."""
    if not settings.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(
        str(Path(settings.tls_cert).expanduser()), str(Path(settings.tls_key).expanduser())
    )
    if settings.tls_client_ca:
        context.load_verify_locations(cafile=str(Path(settings.tls_client_ca).expanduser()))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def json_body(data: Any) -> bytes:
    """Compact JSON, one line ending in a newline (a curl user's prompt starts on its own line)."""
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def json_reply(data: Any, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json_body(data), status=status, content_type="application/json", headers=headers
    )
