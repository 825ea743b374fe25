"""Blocking client over one reusable gRPC channel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

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


class FeatureClient:
    """Blocking client for a layertap server.

    One channel is opened per client and reused by every call (channels are expensive and
    multiplex calls), so create one client and share it; it is thread-safe. Use it as a
    context manager or call :meth:`close`. Every call raises :class:`FeatureServiceError`
    for RPC failures and ValueError/TypeError for bad arguments (before any RPC).
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
        """Open a channel to ``target``.

        ``target``: ``host:port``; ``dns:///name:port`` (every address the name resolves to,
        e.g. a Kubernetes headless Service ``dns:///layertap-headless.ns.svc:50051``);
        ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` (gRPC's address list); or the plain
        ``10.0.0.1:50051,10.0.0.2:50051``, converted to that ``ipv4:``/``ipv6:`` list.

        ``timeout`` is the default per-call deadline in seconds (``None``: none);
        ``credentials`` switches to a TLS channel (see :func:`tls_credentials`); ``metadata``
        is sent with every call; ``token`` adds ``authorization: Bearer <token>`` to it.

        ``load_balancing``: the gRPC policy over the target's addresses, ``"round_robin"``
        (default: each call goes to the next ready replica, and a replica that goes away is
        skipped) or ``"pick_first"``/``None`` (gRPC's default: one connection to the first
        address that answers). A plain ``Service`` (one virtual IP) gets no balancing per
        call whatever the policy; use a headless Service with ``dns:///``.

        ``retries``: how often a call that failed with UNAVAILABLE (replica stopping or
        unreachable, model still loading) is retried, with randomised exponential backoff
        (0.1 s doubling up to 2 s) within the call's deadline; with round_robin a retry goes
        to another replica. All three RPCs are idempotent. 0..4, 0 disables; only requests up
        to 16 MiB (the channel's retry buffer, ``grpc.per_rpc_retry_buffer_size``) are
        retried, bigger ones are sent once. Calls that reached the server's handler and then
        failed otherwise (deadline, INVALID_ARGUMENT, ...) are never retried.
        """
        self.target = target
        self.timeout = check_timeout(timeout)
        self._metadata = with_token(call_metadata(metadata), token)
        options = channel_options(max_message_bytes, load_balancing=load_balancing, retries=retries)
        address = channel_target(target)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.FeatureServiceStub(self._channel)
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the channel; idempotent. Calls made afterwards raise RuntimeError."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"FeatureClient({self.target!r}, timeout={self.timeout}, {state})"

    # ------------------------------------------------------------------ calls

    def _call(self, method: Callable[..., _R], request: Any, timeout: Timeout) -> _R:
        if self._closed:
            raise RuntimeError("FeatureClient is closed")
        try:
            return method(
                request,
                timeout=resolve_timeout(timeout, self.timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise FeatureServiceError.from_rpc_error(exc) from exc

    def list_models(self, *, timeout: Timeout = UNSET) -> list[ModelInfo]:
        """The models the server is configured with (ready or not)."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return models_from_proto(response)

    def server_info(self, *, timeout: Timeout = UNSET) -> ServerInfo:
        """The server's version and request limits (images per request, bytes, pixels, ...)."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return server_info_from_proto(response)

    def describe(self, model: str, *, timeout: Timeout = UNSET) -> ModelDescription:
        """A model's extractable nodes (with shapes for one image) and its modules."""
        response = self._call(
            self._stub.DescribeModel, pb.DescribeModelRequest(model=model), timeout
        )
        return description_from_proto(response)

    def extract(
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
        """Activations of ``nodes`` for one image or a list of images.

        ``images``: file paths, encoded bytes, PIL images, numpy arrays or torch tensors
        (a list/tuple is several images; anything else is one). ``nodes``: a name, a list of
        names, or a mapping node -> output key. ``pool``: None/"raw", "avg", "max", "gem",
        "cls" or "mean". ``dtype``: "float32", "float16" or "bfloat16" on the wire
        (bfloat16 is returned widened to float32, exactly). Returns output key -> [N, ...].
        """
        request, n_images = build_extract_request(
            images,
            model=model,
            nodes=nodes,
            pool=pool,
            gem_p=gem_p,
            normalize=normalize,
            dtype=dtype,
        )
        response = self._call(self._stub.Extract, request, timeout)
        return parse_extract_response(response, n_images)
