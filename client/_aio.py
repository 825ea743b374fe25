"""asyncio client: the same API as FeatureClient with ``async def`` methods over ``grpc.aio``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from layertap.common.option_parsing import NodesArg, PostArg, RegionsArg, TtaArg
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

from ._bulk import BulkRun
from ._bulk_options import BulkOptions, BulkResult, ErrorMode, Transport, bulk_options
from ._compare import CompareResult, compare_requests, parse_compare_responses, several_pairs
from ._images import ImageLike, images_to_proto
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
    check_retries,
    check_timeout,
    resolve_timeout,
)
from ._requests import attach_regions, parameters_request, plan_requests, request_template
from ._responses import (
    description_from_proto,
    merge_results,
    models_from_proto,
    parameters_from_proto,
    parse_extract_response,
    server_info_from_proto,
)
from ._retry import call_with_retries_async
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
        (default ``"round_robin"``; ``None``: pick_first) and ``retries`` (default 4 retries
        on UNAVAILABLE or a transient RESOURCE_EXHAUSTED, within the call's deadline)."""
        self.target = target
        self.timeout = check_timeout(timeout)
        self.retries = check_retries(retries)
        self._max_message_bytes = max_message_bytes
        self._info: ServerInfo | None = None
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
        """One unary RPC, retried per :mod:`._retry` within ``timeout`` (all attempts)."""
        method: Callable[..., Awaitable[Any]] = getattr(self._get_stub(), method_name)

        async def attempt(left: float | None) -> Any:
            try:
                return await method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as exc:  # grpc.aio.AioRpcError subclasses it
                raise FeatureServiceError.from_rpc_error(exc) from exc

        return await call_with_retries_async(
            attempt, retries=self.retries, timeout=resolve_timeout(timeout, self.timeout)
        )

    async def list_models(self, *, timeout: Timeout = UNSET) -> list[ModelInfo]:
        """The models the server is configured with (ready or not)."""
        response = await self._call("ListModels", pb.ListModelsRequest(), timeout)
        return models_from_proto(response)

    async def get_server_info(self, *, timeout: Timeout = UNSET) -> ServerInfo:
        """The server's version, limits and capabilities (GetServerInfo; an older server
        without it answers through ListModels, limits only). Cached for automatic chunking."""
        try:
            response = await self._call("GetServerInfo", pb.GetServerInfoRequest(), timeout)
        except FeatureServiceError as exc:
            if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            response = await self._call("ListModels", pb.ListModelsRequest(), timeout)
        self._info = server_info_from_proto(response)
        return self._info

    async def server_info(self, *, timeout: Timeout = UNSET) -> ServerInfo:
        """Same as :meth:`get_server_info` (kept for existing callers)."""
        return await self.get_server_info(timeout=timeout)

    async def _limits(self, timeout: Timeout) -> ServerInfo:
        return self._info if self._info is not None else await self.get_server_info(timeout=timeout)

    async def describe(self, model: str, *, timeout: Timeout = UNSET) -> ModelDescription:
        """A model's extractable nodes (with shapes for one image) and its modules."""
        response = await self._call("DescribeModel", pb.DescribeModelRequest(model=model), timeout)
        return description_from_proto(response)

    async def get_parameters(
        self,
        model: str,
        names: str | Sequence[str],
        dtype: str = "float32",
        *,
        timeout: Timeout = UNSET,
    ) -> dict[str, Any]:
        """Parameter tensors of ``model``; see FeatureClient.get_parameters."""
        request = parameters_request(model, names, dtype)
        response = await self._call("GetParameters", request, timeout)
        return await _maybe_offload(
            response.ByteSize() > _OFFLOAD_BYTES, lambda: parameters_from_proto(response, model)
        )

    async def compare(
        self,
        a: ImageLike | Sequence[ImageLike],
        b: ImageLike | Sequence[ImageLike],
        *,
        model: str,
        nodes: str | Sequence[str] | None = None,
        style: bool = False,
        native_resolution: bool = False,
        timeout: Timeout = UNSET,
    ) -> CompareResult:
        """Perceptual distance of each pair; see FeatureClient.compare."""
        arguments = locals()
        info = await self._limits(timeout) if several_pairs(a) else self._info
        requests = await _maybe_offload(
            _is_large_input(a) or _is_large_input(b), lambda: compare_requests(arguments, info)
        )
        responses = [await self._call("Compare", r, timeout) for r in requests]
        return parse_compare_responses(responses)

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
        post: PostArg = None,
        concat: bool = False,
        concat_key: str | None = None,
        tta: TtaArg = None,
        rmac_levels: int = 0,
        roi_size: int = 0,
        regions: RegionsArg = None,
        priority: str = "normal",
        native_resolution: bool = False,
        bypass_result_cache: bool = False,
        timeout: Timeout = UNSET,
    ) -> ExtractResult:
        """Activations of ``nodes`` for one image or a list of images; see
        FeatureClient.extract (descriptor options, regions, and the split into several calls
        past server limits, which keeps each image's regions with it)."""
        template = request_template(locals())
        proto_images = await _maybe_offload(
            _is_large_input(images), lambda: images_to_proto(images)
        )
        attach_regions(proto_images, regions)
        info = await self._limits(timeout) if len(proto_images) > 1 else self._info
        requests = plan_requests(template, proto_images, info, self._max_message_bytes)
        parts = []
        for request in requests:
            response = await self._call("Extract", request, timeout)
            n_images = len(request.images)
            parts.append(
                await _maybe_offload(
                    response.ByteSize() > _OFFLOAD_BYTES,
                    lambda: parse_extract_response(response, n_images),  # noqa: B023
                )
            )
        return merge_results(parts)

    def extract_many(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        model: str,
        nodes: NodesArg,
        pool: str | None = None,
        gem_p: float = 3.0,
        normalize: bool = False,
        dtype: str = "float32",
        post: PostArg = None,
        concat: bool = False,
        concat_key: str | None = None,
        tta: TtaArg = None,
        rmac_levels: int = 0,
        roi_size: int = 0,
        batch_size: int = 8,
        concurrency: int = 4,
        ordered: bool = True,
        progress: bool | None = None,
        transport: Transport = "stream",
        errors: ErrorMode = "raise",
        priority: str = "low",
        native_resolution: bool = False,
        bypass_result_cache: bool = False,
        timeout: Timeout = UNSET,
    ) -> AsyncIterator[tuple[Any, BulkResult]]:
        """Async iterator of ``(id, result)`` over many images; see FeatureClient.extract_many.

        ``items`` may also be an async iterable. Arguments are checked here, at the call;
        the server's limits are read (once per client) when iteration starts.
        """
        options = bulk_options(
            locals(), resolve_timeout(timeout, self.timeout), self.retries, self._max_message_bytes
        )
        return self._extract_many(items, options, timeout)

    async def _extract_many(
        self, items: Iterable[Any] | AsyncIterable[Any], options: BulkOptions, timeout: Timeout
    ) -> AsyncIterator[tuple[Any, BulkResult]]:
        info = await self._limits(timeout)
        run = BulkRun(self._get_stub(), self._metadata, info, options, items)
        results = run.results()
        try:
            async for pair in results:
                yield pair
        finally:
            await results.aclose()


def _is_large_input(images: object) -> bool:
    """Offload conversion when it may read files or copy many pixels (cheap to decide)."""
    items = images if isinstance(images, (list, tuple)) else [images]
    return any(
        not isinstance(img, (bytes, bytearray, memoryview)) or len(img) > _OFFLOAD_BYTES
        for img in items
    )


async def _maybe_offload(offload: bool, fn: Callable[[], _R]) -> _R:
    return await asyncio.to_thread(fn) if offload else fn()
