"""asyncio client: the same API as FeatureClient with ``async def`` methods over ``grpc.aio``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

from ._convert import (
    ImageLike,
    NodesArg,
    build_extract_request,
    description_from_proto,
    models_from_proto,
    parse_extract_response,
    server_info_from_proto,
)
from ._options import (
    DEFAULT_LOAD_BALANCING,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_RETRIES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    UNSET,
    Timeout,
    call_metadata,
    channel_options,
    channel_target,
    check_timeout,
    resolve_timeout,
)
from ._security import with_token
from .errors import FeatureServiceError
from .types import ExtractResult, ModelDescription, ModelInfo, ServerInfo

_R = TypeVar("_R")

# Requests/responses this big are encoded/decoded in a worker thread so a large batch does
# not stall the event loop; small ones are cheaper inline.
_OFFLOAD_BYTES = 1 << 20


class AsyncFeatureClient:
    """asyncio client for a layertap server (``async with AsyncFeatureClient() as c``).

    The ``grpc.aio`` channel is created on first use, inside the running event loop it is
    bound to, so the client may be constructed anywhere. Share one client per event loop.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        token: str | None = None,
        load_balancing: str | None = DEFAULT_LOAD_BALANCING,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        """Same arguments as :class:`FeatureClient`, including ``load_balancing``
        (default ``"round_robin"``; ``None``: pick_first) and ``retries`` (default 4
        retries on UNAVAILABLE for requests up to 16 MiB; 0 disables)."""
        self.target = target
        self.timeout = check_timeout(timeout)
        self._metadata = with_token(call_metadata(metadata), token)
        self._options = channel_options(
            max_message_bytes, load_balancing=load_balancing, retries=retries
        )
        self._address = channel_target(target)
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        return self._closed

    def _get_stub(self) -> Any:
        if self._closed:
            raise RuntimeError("AsyncFeatureClient is closed")
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self._address, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self._address, self._credentials, options=self._options
                )
            self._stub = pb_grpc.FeatureServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        """Close the channel (cancelling calls in flight); idempotent."""
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> AsyncFeatureClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"AsyncFeatureClient({self.target!r}, timeout={self.timeout}, {state})"

    # ------------------------------------------------------------------ calls

    async def _call(self, method_name: str, request: Any, timeout: Timeout) -> Any:
        method: Callable[..., Awaitable[Any]] = getattr(self._get_stub(), method_name)
        try:
            return await method(
                request,
                timeout=resolve_timeout(timeout, self.timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:  # grpc.aio.AioRpcError subclasses it
            raise FeatureServiceError.from_rpc_error(exc) from exc

    async def list_models(self, *, timeout: Timeout = UNSET) -> list[ModelInfo]:
        """The models the server is configured with (ready or not)."""
        response = await self._call("ListModels", pb.ListModelsRequest(), timeout)
        return models_from_proto(response)

    async def server_info(self, *, timeout: Timeout = UNSET) -> ServerInfo:
        """The server's version and request limits (images per request, bytes, pixels, ...)."""
        response = await self._call("ListModels", pb.ListModelsRequest(), timeout)
        return server_info_from_proto(response)

    async def describe(self, model: str, *, timeout: Timeout = UNSET) -> ModelDescription:
        """A model's extractable nodes (with shapes for one image) and its modules."""
        response = await self._call("DescribeModel", pb.DescribeModelRequest(model=model), timeout)
        return description_from_proto(response)

    async def extract(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        model: str,
        nodes: NodesArg,
        pool: str | None = None,
        gem_p: float = 3.0,
        normalize: bool = False,
        dtype: str = "float32",
        timeout: Timeout = UNSET,
    ) -> ExtractResult:
        """Activations of ``nodes`` for one image or a list of images; see FeatureClient.extract."""
        request, n_images = await _maybe_offload(
            _is_large_input(images),
            lambda: build_extract_request(
                images,
                model=model,
                nodes=nodes,
                pool=pool,
                gem_p=gem_p,
                normalize=normalize,
                dtype=dtype,
            ),
        )
        response = await self._call("Extract", request, timeout)
        return await _maybe_offload(
            response.ByteSize() > _OFFLOAD_BYTES,
            lambda: parse_extract_response(response, n_images),
        )


def _is_large_input(images: object) -> bool:
    """Offload conversion when it may read files or copy many pixels (cheap to decide)."""
    items = images if isinstance(images, (list, tuple)) else [images]
    return any(
        not isinstance(img, (bytes, bytearray, memoryview)) or len(img) > _OFFLOAD_BYTES
        for img in items
    )


async def _maybe_offload(offload: bool, fn: Callable[[], _R]) -> _R:
    return await asyncio.to_thread(fn) if offload else fn()
