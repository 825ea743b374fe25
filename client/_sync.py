"""Blocking client over one reusable gRPC channel."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np

from layertap.common.option_parsing import NodesArg, PostArg, RegionsArg, TtaArg
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

from ._bulk_loop import BulkLoop
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
from ._retry import call_with_retries
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

        ``retries`` (0..10, default 4; 0 disables): how often a call is retried after it
        failed with UNAVAILABLE (replica stopping or unreachable, model still loading) or with
        a RESOURCE_EXHAUSTED the server marked transient (trailing metadata
        ``layertap-retryable: true``: its queue is full). At most ``retries + 1`` attempts:
        the SDK is the only retry layer (the channel has no gRPC retry policy, so the two
        never multiply; gRPC only replays on its own a call that never reached a server).
        Backoff is exponential with full jitter (a random wait up to 0.1 s, 0.2 s, 0.4 s ...,
        capped at 2 s); all attempts and waits stay within the call's ``timeout``: no wait
        sleeps past it. With round_robin a retry goes to the next replica. Every RPC is
        idempotent. Limits (too many images, a message too big), deadlines and bad requests
        are never retried.
        """
        self.target = target
        self.timeout = check_timeout(timeout)
        self.retries = check_retries(retries)
        self._metadata = with_token(call_metadata(metadata), token)
        self._options = channel_options(
            max_message_bytes, load_balancing=load_balancing, retries=retries
        )
        self._max_message_bytes = max_message_bytes
        self._address = channel_target(target)
        self._credentials = credentials
        if credentials is None:
            self._channel = grpc.insecure_channel(self._address, options=self._options)
        else:
            self._channel = grpc.secure_channel(self._address, credentials, options=self._options)
        self._stub = pb_grpc.FeatureServiceStub(self._channel)
        self._closed = False
        self._info: ServerInfo | None = None
        self._bulk_lock = threading.Lock()
        self._bulk: BulkLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the channel; idempotent. Calls made afterwards raise RuntimeError."""
        if not self._closed:
            self._closed = True
            self._channel.close()
            with self._bulk_lock:
                bulk, self._bulk = self._bulk, None
            if bulk is not None:
                bulk.close()

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
        """One unary RPC, retried per :mod:`._retry` within ``timeout`` (all attempts)."""
        if self._closed:
            raise RuntimeError("FeatureClient is closed")

        def attempt(left: float | None) -> _R:
            try:
                return method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise FeatureServiceError.from_rpc_error(exc) from exc

        return call_with_retries(
            attempt, retries=self.retries, timeout=resolve_timeout(timeout, self.timeout)
        )

    def list_models(self, *, timeout: Timeout = UNSET) -> list[ModelInfo]:
        """The models the server is configured with (ready or not)."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return models_from_proto(response)

    def get_server_info(self, *, timeout: Timeout = UNSET) -> ServerInfo:
        """The server's version, limits (images per request, bytes, pixels, stream window,
        parameter bytes) and capabilities (image formats, pools, dtypes, models, devices,
        RPCs). An older server without GetServerInfo answers through ListModels (limits
        only). The answer is cached: :meth:`extract` and :meth:`extract_many` size their
        calls with it."""
        try:
            response = self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)
        except FeatureServiceError as exc:
            if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        self._info = server_info_from_proto(response)
        return self._info

    def server_info(self, *, timeout: Timeout = UNSET) -> ServerInfo:
        """Same as :meth:`get_server_info` (kept for existing callers)."""
        return self.get_server_info(timeout=timeout)

    def _limits(self, timeout: Timeout) -> ServerInfo:
        return self._info if self._info is not None else self.get_server_info(timeout=timeout)

    def describe(self, model: str, *, timeout: Timeout = UNSET) -> ModelDescription:
        """A model's extractable nodes (with shapes for one image) and its modules."""
        response = self._call(
            self._stub.DescribeModel, pb.DescribeModelRequest(model=model), timeout
        )
        return description_from_proto(response)

    def get_parameters(
        self,
        model: str,
        names: str | Sequence[str],
        dtype: str = "float32",
        *,
        timeout: Timeout = UNSET,
    ) -> dict[str, np.ndarray]:
        """Named parameter tensors (weights, biases, buffers) of a configured model.

        ``names``: parameter names (``"features.0.weight"``) or module paths
        (``"features.0"``: every parameter of that module itself). Returns full parameter
        name -> writable numpy array, in the server's order; ``dtype`` "float32", "float16"
        or "bfloat16" on the wire (bfloat16 is widened to float32). The server refuses answers
        over ``ServerInfo.max_parameter_bytes`` with RESOURCE_EXHAUSTED: ask for fewer names.
        """
        request = parameters_request(model, names, dtype)
        response = self._call(self._stub.GetParameters, request, timeout)
        return parameters_from_proto(response, model)

    def compare(
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
        """Perceptual distance of each pair (a[i], b[i]), computed on the server (no feature
        maps travel). ``nodes``: feature-map nodes; None uses the model's ``compare_nodes``
        (VGG16: features.3, 8, 15, 22, 29). ``style``: also Gram-matrix style distances.
        ``a``/``b``: one image each, or lists of the same length (any form :meth:`extract`
        takes). Pairs past the server's ``max_images_per_request`` (both sides count) are
        split into several calls; ``timeout`` applies to each."""
        info = self._limits(timeout) if several_pairs(a) else self._info
        requests = compare_requests(locals(), info)
        responses = [self._call(self._stub.Compare, r, timeout) for r in requests]
        return parse_compare_responses(responses)

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
        """Activations of ``nodes`` for one image or a list of images.

        ``images``: file paths, encoded bytes, PIL images, numpy arrays or torch tensors
        (a list/tuple is several images; anything else is one). ``nodes``: a name, a list of
        names, or a mapping node -> output key. ``pool``: None/"raw", "avg", "max", "gem",
        "avgmax", "catavgmax" (2C values), "rmac", "rgem" (feature maps only, with
        ``rmac_levels``, 0: 3), or for tokens "cls", "mean", "cls_mean" (alias "cls+mean",
        2C values). ``dtype``: "float32", "float16" or "bfloat16" on the wire (bfloat16 is
        returned widened to float32, exactly), or "int8" for L2-normalised pooled descriptors
        (np.int8 arrays of round(127 x): divide by 127 for [-1, 1]). ``priority``: "normal"
        (interactive) or "low" (batched only when no normal-priority image waits).
        ``native_resolution``: skip the resize and centre crop (normalise only).
        ``bypass_result_cache``: compute every image afresh on a server with a result cache
        (``result_cache_bytes``), neither reading it nor storing into it.
        Returns output key -> [N, ...].

        Descriptor options (pooled outputs only):

        - ``post``: steps applied in order after pooling: "l2", "power" (signed square root,
          then L2), "power:0.3", "center:HEAD", "pca:HEAD", "pca:HEAD:128", "whiten:HEAD",
          "whiten:HEAD:128" (HEAD: a head of :meth:`get_server_info`, 128: keep that many
          components), or dicts ``{"op": "whiten", "head": "HEAD", "dim": 128}``; then
          ``normalize``.
        - ``concat=True``: every node pooled and L2-normalised, concatenated in request order,
          L2-normalised: one output keyed ``concat_key`` (default "descriptor").
        - ``tta``: "flip" or ``{"flip": True, "scales": [1, 0.7071, 0.5]}``: each view pooled
          and L2-normalised, then averaged.
        - ``regions``: one entry per image, None or boxes (x1, y1, x2, y2) in pixels of the
          image as given (a list of tuples or an [R, 4] array); that image's outputs are then
          [R, ...] pooled from ``roi_size`` x ``roi_size`` roi_align bins (0: 7; raw outputs
          are [R, C, roi_size, roi_size]). When R differs between images ``result[key]`` is a
          list of per-image arrays (see :class:`ExtractResult`).

        More images than the server's ``max_images_per_request``, or more bytes than one
        message may carry, are split into several calls, made one after another, and their
        results merged in order (metadata: the first call's, ``batch_size`` the largest,
        timings summed); ``timeout`` applies to each call. An image that cannot be sent (an
        encoded image over the server's ``max_image_bytes``) fails with RESOURCE_EXHAUSTED
        before anything is sent. The limits come from :meth:`get_server_info`, read once per
        client when a call has several images. For thousands of images use
        :meth:`extract_many`.
        """
        template = request_template(locals())
        proto_images = images_to_proto(images)
        attach_regions(proto_images, regions)
        info = self._limits(timeout) if len(proto_images) > 1 else self._info
        parts = []
        for request in plan_requests(template, proto_images, info, self._max_message_bytes):
            response = self._call(self._stub.Extract, request, timeout)
            parts.append(parse_extract_response(response, len(request.images)))
        return merge_results(parts)

    def extract_many(
        self,
        items: Iterable[Any],
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
    ) -> Iterator[tuple[Any, BulkResult]]:
        """Extract from many images (a list, or a lazy generator of any length) with bounded
        memory; yields ``(id, result)`` per image.

        ``items``: images (anything :meth:`extract` takes as one image), ``(id, image)``
        tuples, or ``(id, image, regions)`` with that image's boxes (see :meth:`extract`); a
        bare image's id is ``str(position)``. Each result is an :class:`ExtractResult` for
        that one image (arrays with leading dimension 1). The descriptor options (``post``,
        ``concat``, ``tta`` ...) are those of :meth:`extract`.

        - ``ordered=True`` yields in input order; ``False`` as images complete.
        - ``errors="raise"`` raises the first failed image's :class:`FeatureServiceError`
          (in input order when ``ordered``) after cancelling the rest; ``"yield"`` yields
          ``(id, FeatureServiceError)`` for it and goes on. Unreadable images, and encoded
          images over the server's ``max_image_bytes``, fail locally without being sent.
          Failures of the connection or the caller (UNAUTHENTICATED, PERMISSION_DENIED, a
          stream that keeps failing after ``retries``) always raise.
        - ``transport="stream"``: one ExtractStream, one image per item, at most
          ``min(concurrency * batch_size, server's max_stream_in_flight)`` unanswered (the
          window: nothing more is sent ahead). Falls back to unary when the server does not
          implement the stream. ``"unary"``: ``concurrency`` Extract calls at a time, each of
          up to ``batch_size`` images within the server's per-request limits (for proxies
          without streaming); a call refused for one image's sake is split so that only
          that image fails.
        - The input is read lazily: at most twice the window of images is held between being
          read and being yielded.
        - ``timeout`` applies to each image (stream) or call (unary), from when it is first
          sent, and covers its retries: images that failed with UNAVAILABLE or a transient
          RESOURCE_EXHAUSTED are resent with backoff up to ``retries`` times.
        - ``priority`` defaults to "low" so a bulk job does not delay interactive calls.
        - ``bypass_result_cache``: as in :meth:`extract`, for every image.
        - ``progress``: a tqdm bar on stderr; ``None`` shows it only when stderr is a TTY.

        Arguments are checked, and the server's limits read (once per client), at the call.
        The blocking client runs the work on a private event loop thread with its own
        channel (same target, credentials and options); breaking out of the loop cancels it.
        """
        options = bulk_options(
            locals(), resolve_timeout(timeout, self.timeout), self.retries, self._max_message_bytes
        )
        info = self._limits(timeout)
        return self._extract_many(items, options, info)

    def _bulk_loop(self) -> BulkLoop:
        with self._bulk_lock:
            if self._closed:
                raise RuntimeError("FeatureClient is closed")
            if self._bulk is None:
                self._bulk = BulkLoop(self._address, self._credentials, self._options)
            return self._bulk

    def _extract_many(
        self, items: Iterable[Any], options: BulkOptions, info: ServerInfo
    ) -> Iterator[tuple[Any, BulkResult]]:
        bulk = self._bulk_loop()  # a generator: the loop starts on the first next()
        yield from bulk.results(self._metadata, info, options, items)
