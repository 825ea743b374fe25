"""The blocking client's way into the asyncio bulk engine: a private event loop in a daemon
thread with its own grpc.aio channel, and a blocking iterator over one run's results, so
``FeatureClient.extract_many`` drives the same engine as the async client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

import grpc
import grpc.aio

from layertap.v1 import layertap_pb2_grpc as pb_grpc

from ._bulk import BulkRun
from ._bulk_options import BulkOptions, BulkResult
from .types import ServerInfo

_R = TypeVar("_R")


async def _anext(agen: AsyncIterator[_R]) -> _R:
    return await anext(agen)


async def _aclose(agen: Any) -> None:
    while getattr(agen, "ag_running", False):  # a step interrupted in the caller's thread
        await asyncio.sleep(0.005)
    await agen.aclose()


class BulkLoop:
    """A private event loop in a daemon thread with a grpc.aio channel (same target,
    credentials and options as the client's), so ``extract_many`` of the blocking client
    drives the one asyncio bulk engine instead of a second, threaded copy of it."""

    def __init__(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, int | str]],
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.closed = False
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="layertap-bulk", daemon=True
        )
        self._thread.start()

        async def open_channel() -> grpc.aio.Channel:
            if credentials is None:
                return grpc.aio.insecure_channel(address, options=options)
            return grpc.aio.secure_channel(address, credentials, options=options)

        self._channel = self.run(open_channel())
        self.stub = pb_grpc.FeatureServiceStub(self._channel)

    def run(self, coro: Coroutine[Any, Any, _R]) -> _R:
        """Run ``coro`` on the loop and wait; an interrupt here cancels it there too."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def results(
        self,
        metadata: tuple[tuple[str, str], ...] | None,
        info: ServerInfo,
        options: BulkOptions,
        items: Iterable[Any],
    ) -> Iterator[tuple[Any, BulkResult]]:
        """One ``extract_many`` run on the loop; its ``(id, result)`` pairs, one by one, in the
        calling thread. Closing the iterator early stops the run there."""

        async def start() -> AsyncIterator[tuple[Any, BulkResult]]:
            return BulkRun(self.stub, metadata, info, options, items).results()

        agen = self.run(start())
        try:
            while True:
                try:
                    pair = self.run(_anext(agen))
                except StopAsyncIteration:
                    return
                yield pair
        finally:
            if not self.closed:
                self.run(_aclose(agen))

    def close(self) -> None:
        """Close the channel (cancelling runs in flight) and stop the loop thread."""
        if self.closed:
            return
        self.closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._channel.close(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            if not self._thread.is_alive():
                self.loop.close()
