"""The gRPC transport: protobuf in, protobuf out, statuses from one table. Never torch.

Each RPC is validate → decode (thread pool) → submit (batcher) → encode (thread pool). Domain
errors raised anywhere below become gRPC statuses in `_STATUS`, applied by `@rpc`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

from . import codec
from .batcher import BatchInfo, BatchQueue, set_request_deadline
from .catalog import NodeSpec
from .errors import (
    Cancelled,
    InvalidArgument,
    InvalidImage,
    LayertapError,
    LimitExceeded,
    ModelNotFound,
    PerImageError,
    QueueFull,
    Unavailable,
)
from .metrics import Metrics, layertap_version
from .pooling import DTYPES, OutputSpec, check_pool
from .prepare import ImageInput, Prepared, encode_results, prepare_image
from .preprocess import Preprocessing
from .settings import Settings, default_batch_size
from .stream import StreamSession
from .worker import Item, ModelRuntime, ModelStatus

log = logging.getLogger(__name__)

# The one table from domain errors to gRPC statuses (most specific first).
_STATUS: list[tuple[type[LayertapError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Cancelled, grpc.StatusCode.CANCELLED),
]
MAX_DETAILS = 2000
# Trailing metadata on failures worth retrying as is (full queue, model loading, shutting
# down), so clients retry RESOURCE_EXHAUSTED only when it is transient, never for a limit.
RETRYABLE = ("layertap-retryable", "true")
_RETRYABLE_ERRORS = (QueueFull, Unavailable)
# The running RPC's request id, for log lines of work it spawns (stream items).
_REQUEST_ID: ContextVar[str] = ContextVar("layertap_request_id", default="")

_POOLS = {
    pb.POOLING_RAW: "raw",
    pb.POOLING_AVG: "avg",
    pb.POOLING_MAX: "max",
    pb.POOLING_GEM: "gem",
    pb.POOLING_CLS: "cls",
    pb.POOLING_MEAN: "mean",
}

_PRIORITIES = (pb.PRIORITY_NORMAL, pb.PRIORITY_LOW)

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


def status_for(exc: LayertapError) -> grpc.StatusCode:
    for kind, code in _STATUS:
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


def add_to_server(servicer: FeatureService, server: grpc.aio.Server) -> None:
    """Register the FeatureService like the generated helper does, with tolerant parsing
    (each message of a request stream is parsed on its own, so one bad message is one bad
    item)."""
    service = pb.DESCRIPTOR.services_by_name["FeatureService"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
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
    method = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: FeatureService, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rid = request_id(context)
        _REQUEST_ID.set(rid)
        trailer: tuple[tuple[str, str], ...] = (("x-request-id", rid),)
        model = str(getattr(request, "model", "") or "")
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        details = ""
        m = self.metrics
        if m is not None:
            m.in_flight.labels(method).inc()
        try:
            if isinstance(request, Undecodable):
                raise InvalidArgument(
                    f"the request is not a valid {method} message ({request.reason}); "
                    "check the client's generated code matches layertap.v1"
                )
            response = await handler(self, request, context)
            context.set_trailing_metadata(trailer)
            return response
        except LayertapError as exc:
            code, details = status_for(exc), str(exc)[:MAX_DETAILS]
            if isinstance(exc, _RETRYABLE_ERRORS):
                trailer += (RETRYABLE,)
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
            else:
                log.warning("%s %s: %s", method, code.name, details[:300], extra=fields)

    return wrapper  # type: ignore[return-value]


def _preprocessing_pb(p: Preprocessing | None) -> pb.Preprocessing:
    if p is None:
        return pb.Preprocessing()
    return pb.Preprocessing(
        resize_size=p.resize_size or 0,
        crop_size=list(p.crop_size),
        mean=list(p.mean),
        std=list(p.std),
        interpolation=p.interpolation,
        antialias=p.antialias,
    )


def _model_info_pb(s: ModelStatus) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=s.name,
        architecture=s.architecture,
        weights=s.weights,
        weights_sha256=s.weights_sha256,
        input_size=list(s.input_size),
        preprocessing=_preprocessing_pb(s.preprocessing),
        device=s.device,
        ready=s.ready,
        status_message=s.message,
        random_weights=s.random_weights,
        compute_dtype=s.compute_dtype,
    )


def plan_outputs(nodes: Sequence[str], aliases: dict[str, str]) -> list[tuple[str, str]]:
    """(output key, requested name) in request order; aliased nodes not in `nodes` come last."""
    requested = list(nodes) + sorted(n for n in aliases if n not in set(nodes))
    if not requested:
        raise InvalidArgument("no nodes requested; name at least one (see DescribeModel)")
    plan: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for name in requested:
        if not name:
            raise InvalidArgument("empty node name in nodes")
        key = aliases.get(name, name)
        if not key:
            raise InvalidArgument(f"alias for node {name!r} is empty")
        if key in seen:
            if seen[key] == name:
                continue  # the same node twice: return it once
            raise InvalidArgument(f"output key {key!r} is used for both {seen[key]!r} and {name!r}")
        seen[key] = name
        plan.append((key, name))
    return plan


def output_spec(options: pb.OutputOptions) -> OutputSpec:
    pool = _POOLS.get(options.pool)
    if pool is None:
        names = ", ".join(f"{pb.Pooling.Name(k)} ({k})" for k in sorted(_POOLS))
        raise InvalidArgument(f"unknown pool value {options.pool}; use one of {names}")
    p = options.gem_p or 3.0
    if not math.isfinite(p) or not 0.1 <= p <= 100:
        raise InvalidArgument(f"gem_p must be a finite number in [0.1, 100], got {options.gem_p}")
    dtype = options.dtype or "float32"
    if dtype not in DTYPES:
        raise InvalidArgument(f"output dtype {dtype!r} is not supported; use {', '.join(DTYPES)}")
    return OutputSpec(pool=pool, gem_p=float(p), normalize=options.normalize, dtype=dtype)


def image_input(image: pb.Image, index: int) -> ImageInput:
    which = image.WhichOneof("source")
    if which == "encoded":
        return ImageInput(encoded=image.encoded)
    if which == "tensor":
        t = image.tensor
        return ImageInput(dtype=t.dtype, shape=tuple(t.shape), data=t.data)
    raise InvalidImage("neither 'encoded' bytes nor a 'tensor' is set", index)


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _bytes_per_image(node: NodeSpec, spec: OutputSpec) -> int:
    """Output bytes of one image at the model's input size (from the catalogue's shapes)."""
    if spec.pool == "raw":
        elements = math.prod(node.shape[1:])
    else:
        channel_dim = {"NHWC": 3, "NLC": 2}.get(node.layout, 1)
        elements = node.shape[channel_dim] if len(node.shape) > channel_dim else 1
    return elements * _ITEMSIZE[spec.dtype]


class FeatureService(pb_grpc.FeatureServiceServicer):
    """The layertap.v1.FeatureService implementation."""

    def __init__(
        self,
        settings: Settings,
        runtime: ModelRuntime,
        batcher: BatchQueue,
        decode_pool: Executor,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtime = runtime
        self.batcher = batcher
        self.decode_pool = decode_pool
        self.limits = codec.DecodeLimits(
            max_encoded_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )

    @rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = [_model_info_pb(self.runtime.status(n)) for n in self.runtime.names()]
        return pb.ListModelsResponse(
            models=models, limits=self._limits(), server_version=layertap_version()
        )

    def _limits(self) -> pb.ServerLimits:
        s = self.settings
        return pb.ServerLimits(
            max_images_per_request=s.max_images_per_request,
            max_image_bytes=s.max_image_bytes,
            max_image_pixels=s.max_image_pixels,
            max_message_bytes=s.max_message_bytes,
            max_batch_size=s.max_batch_size or default_batch_size(self.runtime.device.type),
            max_queue_images=s.max_queue_images,
            max_stream_in_flight=s.max_stream_in_flight,
            max_parameter_bytes=s.max_parameter_bytes,
        )

    @rpc
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        service = pb.DESCRIPTOR.services_by_name["FeatureService"]
        return pb.GetServerInfoResponse(
            server_version=layertap_version(),
            limits=self._limits(),
            image_formats=list(codec.IMAGE_FORMATS),
            input_dtypes=list(codec.RAW_INPUT_DTYPES),
            pools=[pb.Pooling.Name(k) for k in sorted(_POOLS)],
            output_dtypes=list(DTYPES),
            models=self.runtime.names(),
            devices=list(self.batcher.devices) or [str(self.runtime.device)],
            methods=[m.name for m in service.methods],
        )

    @rpc
    async def GetParameters(
        self, request: pb.GetParametersRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetParametersResponse:
        self.runtime.model(request.model)  # NOT_FOUND / UNAVAILABLE first
        names = list(request.names)
        if not names:
            raise InvalidArgument(
                "no names; list parameter names ('features.0.weight') or module paths "
                "('features.0'; see DescribeModel's modules)"
            )
        for index, name in enumerate(names):
            if not name:
                raise InvalidArgument(
                    f"names[{index}] is empty; the root module is not allowed, name a "
                    "parameter or a module path (see DescribeModel's modules)"
                )
        dtype = request.dtype or "float32"
        if dtype not in DTYPES:
            raise InvalidArgument(f"dtype {dtype!r} is not supported; use {', '.join(DTYPES)}")
        limit = self.settings.max_parameter_bytes
        tensors = await self.runtime.parameters(request.model, names, dtype, limit)
        (encoded,) = await self._in_pool(encode_results, [dict(tensors)])
        return pb.GetParametersResponse(
            model=request.model,
            parameters=[
                pb.NamedTensor(
                    key=name, node=name, tensor=pb.Tensor(dtype=t.dtype, shape=t.shape, data=t.data)
                )
                for name, t in encoded.items()
            ],
        )

    @rpc
    async def ExtractStream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        # items inherit it: the batcher tells a passed stream deadline from a cancel
        set_request_deadline(context.time_remaining())
        session = StreamSession(
            requests,
            context.write,
            self._extract,
            status_for,
            self.settings.max_stream_in_flight,
            self.metrics,
            _REQUEST_ID.get(),
            MAX_DETAILS,
        )
        await session.run()

    @rpc
    async def DescribeModel(
        self, request: pb.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeModelResponse:
        loaded = self.runtime.model(request.model)
        nodes = [
            pb.NodeInfo(
                name=n.name,
                shape=list(n.shape),
                dtype=n.dtype,
                layout=n.layout,
                op=n.op,
                target=n.target,
            )
            for n in loaded.catalog.nodes
        ]
        modules = [pb.ModuleInfo(name=n, type=t, own_parameters=c) for n, t, c in loaded.modules]
        return pb.DescribeModelResponse(
            model=_model_info_pb(self.runtime.status(request.model)),
            nodes=nodes,
            modules=modules,
            extraction_mode="fx",
        )

    def _observe(
        self,
        model: str,
        images: Sequence[Prepared],
        infos: Sequence[BatchInfo],
        encode_s: float,
        size: int,
    ) -> None:
        m = self.metrics
        assert m is not None
        for info in infos:
            m.stage_seconds.labels("queue").observe(info.queue_s)
        for image in images:
            m.stage_seconds.labels("decode").observe(image.decode_s)
        for run_s in {i.batch_id: i.run_s for i in infos}.values():
            m.stage_seconds.labels("compute").observe(run_s)
        m.stage_seconds.labels("encode").observe(encode_s)
        m.images.labels(model).inc(len(images))
        m.output_bytes.labels(model).inc(size)

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    @rpc
    async def Extract(
        self, request: pb.ExtractRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExtractResponse:
        set_request_deadline(context.time_remaining())  # the batcher tells deadline from cancel
        return await self._extract(request)

    async def _extract(self, request: pb.ExtractRequest) -> pb.ExtractResponse:
        """The whole of one Extract, shared by the unary RPC and each ExtractStream item;
        failures raise LayertapError (mapped by the caller)."""
        received = time.perf_counter()
        s = self.settings
        loaded = self.runtime.model(request.model)
        count = len(request.images)
        if count == 0:
            raise InvalidArgument("no images in the request; send at least one")
        if count > s.max_images_per_request:
            raise LimitExceeded(
                f"{count} images in one request exceed max_images_per_request="
                f"{s.max_images_per_request}; split the request"
            )
        plan = plan_outputs(list(request.nodes), dict(request.aliases))
        specs = self.runtime.resolve(request.model, [name for _, name in plan])
        spec = output_spec(request.output)
        for node in specs:
            check_pool(spec.pool, node.layout, node.name)
            if spec.pool == "cls" and loaded.n_prefix_tokens == 0:
                raise InvalidArgument(f"model {request.model!r} has no CLS token; use pool 'mean'")
        full_nodes = tuple(dict.fromkeys(n.name for n in specs))

        inputs = [image_input(img, i) for i, img in enumerate(request.images)]
        for index, given in enumerate(inputs):  # cheap size check before any queue room is held
            if given.encoded is not None:
                try:
                    codec.check_encoded_size(len(given.encoded), self.limits)
                except PerImageError as exc:
                    raise exc.at(index) from None
        # Inputs at the model's own size have known output sizes: refuse oversize answers
        # before spending compute on them (raw float inputs of other sizes are checked after).
        estimate = count * sum(_bytes_per_image(n, spec) for n in specs)
        if estimate > s.max_message_bytes - 64 * 1024:
            raise LimitExceeded(
                f"the response would carry about {estimate} bytes of tensors, over "
                f"max_message_bytes={s.max_message_bytes}; request pooled outputs, fewer nodes "
                "or fewer images"
            )
        preprocessing = loaded.weights.preprocessing
        native = request.native_resolution
        priority = request.priority
        if priority not in _PRIORITIES:
            raise InvalidArgument(
                f"unknown priority {priority}; use PRIORITY_NORMAL (0) or PRIORITY_LOW (1)"
            )
        futures: list[asyncio.Future[Any]] = [None] * count  # type: ignore[list-item]
        try:
            # queue room is held from before decoding: a full queue refuses at once
            with self.batcher.reserve(count):
                prepared = await asyncio.gather(
                    *(
                        self._in_pool(prepare_image, img, self.limits, preprocessing, native)
                        for img in inputs
                    ),
                    return_exceptions=True,
                )
                for index, result in enumerate(prepared):
                    if isinstance(result, PerImageError):
                        raise result.at(index)
                    if isinstance(result, BaseException):
                        raise result
                images: list[Prepared] = prepared  # type: ignore[assignment]
                # one batch key per input shape: a batch must stack
                groups: dict[tuple[int, ...], list[int]] = {}
                for index, image in enumerate(images):
                    groups.setdefault(tuple(image.tensor.shape), []).append(index)
                for shape, indices in groups.items():
                    # requests for other node sets of the same model share the forward
                    key = (request.model, shape)
                    items = [Item(images[i].tensor, spec, full_nodes) for i in indices]
                    submitted = self.batcher.submit_many(
                        key, items, reserved=True, priority=int(priority)
                    )
                    for i, fut in zip(indices, submitted, strict=True):
                        futures[i] = fut
            done: list[tuple[dict[str, Any], BatchInfo]] = await asyncio.gather(*futures)
        except BaseException:  # client gone, queue full or a failed batch: drop our other items
            for fut in futures:
                if fut is not None and not fut.done():
                    fut.cancel()
            raise
        encode_started = time.perf_counter()
        encoded = await self._in_pool(encode_results, [r for r, _ in done])
        encode_s = time.perf_counter() - encode_started
        node_of = {name: n.name for (_, name), n in zip(plan, specs, strict=True)}
        size = sum(len(row[node_of[name]].data) for row in encoded for _, name in plan)
        if size > s.max_message_bytes - 64 * 1024:
            raise LimitExceeded(
                f"the response would carry {size} bytes of tensors, over max_message_bytes="
                f"{s.max_message_bytes}; request pooled outputs, fewer nodes or fewer images"
            )

        layout_of = {n.name: n.layout for n in specs}
        out_layout = "NC" if spec.pool != "raw" else None
        results = []
        for row in encoded:
            outputs = []
            for out_key, name in plan:
                full = node_of[name]
                t = row[full]
                outputs.append(
                    pb.NamedTensor(
                        key=out_key,
                        node=full,
                        tensor=pb.Tensor(
                            dtype=t.dtype,
                            shape=t.shape,
                            data=t.data,
                            layout=out_layout or layout_of[full],
                        ),
                    )
                )
            results.append(pb.ImageResult(outputs=outputs))
        infos = [info for _, info in done]
        if self.metrics is not None:
            self._observe(request.model, images, infos, encode_s, size)
        metadata = pb.ExtractMetadata(
            model=request.model,
            weights_sha256=loaded.weights.sha256,
            nodes=[pb.ResolvedNode(key=k, requested=n, node=node_of[n]) for k, n in plan],
            preprocessing=_preprocessing_pb(preprocessing),
            timings=pb.Timings(
                queue_ms=1000 * max(i.queue_s for i in infos),
                decode_ms=1000 * sum(p.decode_s for p in images),
                compute_ms=1000 * sum({i.batch_id: i.run_s for i in infos}.values()),
                total_ms=1000 * (time.perf_counter() - received),
            ),
            batch_size=max(i.batch_size for i in infos),
            device=infos[0].device or str(self.runtime.device),  # the one that served
        )
        return pb.ExtractResponse(results=results, metadata=metadata)
