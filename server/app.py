"""Server assembly: `create_server(settings)` wires the stages; `main()` runs it until a signal.

Kept apart from main() so tests start a real server on 127.0.0.1:0 with a real channel.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from layertap.v1 import layertap_pb2_grpc as pb_grpc

from .batcher import Batcher
from .settings import ConfigError, Settings, load_settings
from .worker import ModelRuntime

log = logging.getLogger("layertap.server")


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    """Explicit message limits: gRPC's 4 MiB default is too small for raw feature maps."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]


@dataclass
class Server:
    """A bound (not yet started) layertap server and the pieces tests may want to look at."""

    grpc_server: grpc.aio.Server
    runtime: ModelRuntime
    batcher: Batcher
    decode_pool: ThreadPoolExecutor
    settings: Settings
    _load_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start serving; models load on the worker in the background (ListModels shows ready)."""
        await self.grpc_server.start()
        self.batcher.start()
        self._load_task = asyncio.get_running_loop().create_task(self.runtime.load_all())

    async def wait_ready(self, timeout: float | None = None) -> None:
        await self.runtime.wait_ready(timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new work, let in-flight requests finish within `grace`, then release threads."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.grpc_server.stop(grace)
        await self.batcher.close(drain=False)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.runtime.shutdown()


async def create_server(settings: Settings) -> tuple[Server, int]:
    """Build every stage and bind the port; returns the server and the port actually bound."""
    runtime = ModelRuntime(settings)
    batcher = Batcher(
        runtime.run_batch,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
        max_queue=settings.max_queue_images,
        batch_limit=lambda key: _batch_limit(settings, key),
    )
    decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
    grpc_server = grpc.aio.server(options=channel_options(settings))
    # imported here: the servicer module pulls in protobuf stubs and codec
    from .service import FeatureService

    pb_grpc.add_FeatureServiceServicer_to_server(
        FeatureService(settings, runtime, batcher, decode_pool), grpc_server
    )
    address = f"{settings.host}:{settings.port}"
    port = grpc_server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot bind {address}")
    return Server(grpc_server, runtime, batcher, decode_pool, settings), port


def _batch_limit(settings: Settings, key: object) -> int:
    name = key[0] if isinstance(key, tuple) and key else None
    cfg = settings.model(name) if isinstance(name, str) else None
    return cfg.max_batch_size if cfg and cfg.max_batch_size > 0 else settings.max_batch_size


async def serve(settings: Settings) -> None:
    server, port = await create_server(settings)
    await server.start()
    log.info("layertap serving on %s:%d (device %s)", settings.host, port, server.runtime.device)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.0fs", settings.shutdown_grace_s)
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`layertap serve`: settings from flags, LAYERTAP_* and the config file, then serve."""
    try:
        settings = load_settings(list(argv) if argv is not None else sys.argv[1:])
    except ConfigError as exc:
        print(f"layertap serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"layertap serve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
