"""HTTP/REST beside gRPC, on the server's own event loop: the KServe v2 REST endpoints
(http_v2.py) and layertap's small JSON API for curl (http_v1.py), served by aiohttp.

aiohttp because it is asyncio-native (its server runs as tasks on the loop gRPC already uses:
no second loop, thread or ASGI adapter between a request and the batcher), it bounds request
bodies itself (`client_max_size`), parses multipart forms, and parses HTTP in C. The gates
every call passes (token, admission, `@rpc`) are http_server.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from . import http_v1, http_v2
from .http_server import HttpGate, errors, ssl_context
from .settings import ConfigError, Settings

if TYPE_CHECKING:
    from .admission import Admission
    from .service import FeatureService

log = logging.getLogger("layertap.server.http")


class HttpServer:
    """The bound HTTP server: `port` is the one actually bound (http_port 0 picks one)."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self.runner, self.port = runner, port

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start(settings: Settings, features: FeatureService, admission: Admission) -> HttpServer:
    """Build the app (v2 and v1 routes), bind http_host:http_port and start serving."""
    app = web.Application(client_max_size=settings.max_message_bytes, middlewares=[errors])
    gate = HttpGate(settings, admission)
    http_v2.add_routes(app, gate, features)
    http_v1.add_routes(app, gate, features)
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,  # a client that leaves cancels its call (and its batch items)
        shutdown_timeout=settings.shutdown_grace_s,  # in-flight calls finish, like gRPC's
    )
    await runner.setup()
    host = settings.http_host or settings.host
    site = web.TCPSite(
        runner,
        host,
        settings.http_port,
        ssl_context=ssl_context(settings),
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot bind HTTP {host}:{settings.http_port}: {exc}") from exc
    sockets = [s for s in (site._server.sockets if site._server else ())]  # type: ignore[attr-defined]
    port = sockets[0].getsockname()[1] if sockets else settings.http_port
    scheme = "https" if settings.tls_cert else "http"
    log.info("layertap HTTP on %s://%s:%d (KServe v2 REST, /v1)", scheme, host, port)
    return HttpServer(runner, port)
