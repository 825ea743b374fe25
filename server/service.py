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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
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
from .compare import compare as run_compare
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
from .heads import Head
from .metrics import Metrics, layertap_version
from .pooling import (
    DTYPES,
    HEAD_OPS,
    OUTPUT_DTYPES,
    OutputSpec,
    PostOp,
    check_output,
    check_pool,
    is_unit_output,
    pooled_dim,
)
from .prepare import Box, ImageInput, Prepared, encode_results, finish_results, prepare_image
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
    pb.POOLING_AVGMAX: "avgmax",
    pb.POOLING_CATAVGMAX: "catavgmax",
    pb.POOLING_RMAC: "rmac",
    pb.POOLING_RGEM: "rgem",
    pb.POOLING_CLS_MEAN: "cls_mean",
}
_POST_OPS = {
    pb.PostStep.OP_L2: "l2",
    pb.PostStep.OP_POWER: "power",
    pb.PostStep.OP_CENTER: "center",
    pb.PostStep.OP_PCA: "pca",
    pb.PostStep.OP_WHITEN: "whiten",
}
# Bounds of the descriptor options (each view is one more forward; regions one more roi).
MAX_TTA_VIEWS = 8
TTA_SCALES = (0.25, 4.0)
RMAC_LEVELS = (1, 5)
ROI_SIZES = (1, 64)
MAX_REGIONS = 256
# roi_align samples regions x channels x roi_size^2 bins per image and node before pooling; above
# this many (float32: 128 MiB) a request would hold the worker for seconds and gigabytes.
MAX_ROI_BINS = 1 << 25
# Entries a request may list (before duplicates collapse), checked before they are iterated on
# the event loop: a 64 MiB message holds millions of PostSteps or scales.
MAX_POST_STEPS = 16
MAX_REQUESTED_NODES = 10_000  # nodes + aliases of one Extract
MAX_TTA_SCALE_ENTRIES = 64
DEFAULT_CONCAT_KEY = "descriptor"

_PRIORITIES = (pb.PRIORITY_NORMAL, pb.PRIORITY_LOW)

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])
# Names a failed image in its error: (error, image index) -> the error to raise.
Label = Callable[[PerImageError, int], PerImageError]


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
        resize_kernel=p.resize_kernel,
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
        prefix_tokens=s.prefix_tokens,
        extraction_mode=s.extraction_mode,
    )


def plan_outputs(nodes: Sequence[str], aliases: Mapping[str, str]) -> list[tuple[str, str]]:
    """(output key, requested name) in request order; aliased nodes not in `nodes` come last."""
    if len(nodes) + len(aliases) > MAX_REQUESTED_NODES:
        raise InvalidArgument(
            f"{len(nodes)} nodes and {len(aliases)} aliases, more than {MAX_REQUESTED_NODES} "
            "names in one request; no model has that many nodes (see DescribeModel)"
        )
    listed = set(nodes)  # once: in the comprehension it was rebuilt per alias (quadratic)
    requested = list(nodes) + sorted(n for n in aliases if n not in listed)
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


def _post_op(index: int, step: pb.PostStep, heads: Mapping[str, Head], model: str) -> PostOp:
    """One PostStep -> PostOp, every field checked (heads must exist and suit the model)."""
    op = _POST_OPS.get(step.op)
    if op is None:
        names = ", ".join(f"{pb.PostStep.Op.Name(k)} ({k})" for k in sorted(_POST_OPS))
        raise InvalidArgument(f"post[{index}]: unknown op {step.op}; use one of {names}")
    where = f"post[{index}] ({pb.PostStep.Op.Name(step.op)})"
    alpha = 0.5
    if op == "power":
        alpha = step.alpha or 0.5
        if not math.isfinite(alpha) or not 0 < alpha <= 1:
            raise InvalidArgument(f"{where}: alpha must be in (0, 1] (0: 0.5), got {step.alpha}")
    elif step.alpha:
        raise InvalidArgument(f"{where}: alpha is for OP_POWER only; leave it 0")
    if op not in HEAD_OPS:
        if step.head or step.dim:
            raise InvalidArgument(f"{where}: head and dim are for OP_CENTER/OP_PCA/OP_WHITEN only")
        return PostOp(op, alpha)
    known = ", ".join(sorted(heads)) or "none; add [[heads]] to the server config"
    if not step.head:
        raise InvalidArgument(f"{where} needs a head name; registered heads: {known}")
    head = heads.get(step.head)
    if head is None:
        raise InvalidArgument(
            f"{where}: head {step.head!r} is not registered on this server; registered heads: "
            f"{known} (GetServerInfo lists them)"
        )
    if head.model and model and head.model != model:
        raise InvalidArgument(
            f"{where}: head {step.head!r} was fitted for model {head.model!r}, not {model!r}; "
            "use a head registered for this model"
        )
    if step.dim < 0:
        raise InvalidArgument(f"{where}: dim must be >= 0 (0: all components), got {step.dim}")
    if op == "center" and step.dim:
        raise InvalidArgument(f"{where}: dim is for OP_PCA/OP_WHITEN only")
    if step.dim > head.n_components:
        raise InvalidArgument(
            f"{where}: dim {step.dim} is more than the {head.n_components} components of head "
            f"{step.head!r}"
        )
    return PostOp(op, alpha, step.head, step.dim)


def _tta_scales(tta: pb.TestTimeAugmentation) -> tuple[float, ...]:
    """Distinct scales in request order (empty: 1), each finite and in TTA_SCALES."""
    scales: list[float] = []
    low, high = TTA_SCALES
    if len(tta.scales) > MAX_TTA_SCALE_ENTRIES:
        raise InvalidArgument(
            f"tta.scales lists {len(tta.scales)} values; at most {MAX_TTA_VIEWS} distinct views "
            f"per image are served, send at most {MAX_TTA_SCALE_ENTRIES} scales"
        )
    for index, scale in enumerate(tta.scales):
        if not math.isfinite(scale) or not low <= scale <= high:
            raise InvalidArgument(
                f"tta.scales[{index}] = {scale} is out of range; scales are finite factors in "
                f"[{low}, {high}] of the preprocessed input (e.g. 1, 0.7071, 0.5)"
            )
        if float(scale) not in scales:  # duplicates collapse: the same view twice adds nothing
            scales.append(float(scale))
    return tuple(scales) or (1.0,)


def output_spec(
    options: pb.OutputOptions, heads: Mapping[str, Head] | None = None, model: str = ""
) -> OutputSpec:
    """OutputOptions -> OutputSpec, refusing (INVALID_ARGUMENT) anything that cannot be served
    before any compute. `heads`: the registered heads; `model`: the request's model."""
    heads = heads or {}
    pool = _POOLS.get(options.pool)
    if pool is None:
        names = ", ".join(f"{pb.Pooling.Name(k)} ({k})" for k in sorted(_POOLS))
        raise InvalidArgument(f"unknown pool value {options.pool}; use one of {names}")
    p = options.gem_p or 3.0
    if not math.isfinite(p) or not 0.1 <= p <= 100:
        raise InvalidArgument(f"gem_p must be a finite number in [0.1, 100], got {options.gem_p}")
    dtype = options.dtype or "float32"
    if dtype not in OUTPUT_DTYPES:
        raise InvalidArgument(
            f"output dtype {dtype!r} is not supported; use {', '.join(OUTPUT_DTYPES)}"
        )
    if len(options.post) > MAX_POST_STEPS:
        raise InvalidArgument(
            f"post has {len(options.post)} steps, more than {MAX_POST_STEPS}; a chain needs a few "
            "(e.g. OP_POWER, OP_WHITEN)"
        )
    post = tuple(_post_op(i, step, heads, model) for i, step in enumerate(options.post))
    levels = options.rmac_levels or 3
    if not RMAC_LEVELS[0] <= levels <= RMAC_LEVELS[1]:
        raise InvalidArgument(
            f"rmac_levels must be in {RMAC_LEVELS[0]}..{RMAC_LEVELS[1]} (0: 3), got "
            f"{options.rmac_levels}"
        )
    roi_size = options.roi_size or 7
    if not ROI_SIZES[0] <= roi_size <= ROI_SIZES[1]:
        raise InvalidArgument(
            f"roi_size must be in {ROI_SIZES[0]}..{ROI_SIZES[1]} (0: 7), got {options.roi_size}"
        )
    flip = options.tta.flip
    scales = _tta_scales(options.tta)
    views = len(scales) * (2 if flip else 1)
    if views > MAX_TTA_VIEWS:
        raise InvalidArgument(
            f"tta asks for {views} views ({len(scales)} scales"
            f"{' x 2 with flip' if flip else ''}); at most {MAX_TTA_VIEWS} per image"
        )
    if pool == "raw":
        extras = [
            name
            for name, used in (
                ("post", bool(post)),
                ("concat", options.concat),
                ("tta", views > 1 or scales != (1.0,)),
            )
            if used
        ]
        if extras:
            raise InvalidArgument(
                f"{' and '.join(extras)}: only for pooled outputs, but pool is POOLING_RAW; pick "
                "a pool (e.g. POOLING_GEM)"
            )
    if options.concat_key and not options.concat:
        raise InvalidArgument("concat_key is set but concat is not; set concat=true or drop it")
    spec = OutputSpec(
        pool=pool,
        gem_p=float(p),
        normalize=options.normalize,
        dtype=dtype,
        post=post,
        concat=options.concat,
        rmac_levels=levels,
        flip=flip,
        scales=scales,
        roi_size=roi_size,
    )
    # L2-normalised at the end: normalize, else the last post op ends in L2, else (no post) a
    # concat (a center step after a concat undoes its L2; TTA averages are not unit vectors)
    if dtype == "int8" and (pool == "raw" or not is_unit_output(spec)):
        what = "raw maps" if pool == "raw" else "this descriptor is not L2-normalised at the end"
        raise InvalidArgument(
            f"dtype int8 quantises L2-normalised pooled descriptors (round(127 x)), but {what}; "
            "use a pool, and set normalize=true, concat=true, or end post with OP_L2, OP_POWER, "
            "OP_PCA or OP_WHITEN"
        )
    check_output(spec, heads)  # pooling's own checks, same rules
    return spec


def regions_of(image: pb.Image, index: int) -> list[Box]:
    """An image's region boxes, checked for shape here (bounds need the decoded size)."""
    if len(image.regions) > MAX_REGIONS:
        raise InvalidArgument(
            f"image {index}: {len(image.regions)} regions, more than {MAX_REGIONS} per image; "
            "split them over several requests"
        )
    boxes: list[Box] = []
    for j, r in enumerate(image.regions):
        box = (float(r.x1), float(r.y1), float(r.x2), float(r.y2))
        if not all(math.isfinite(v) for v in box) or not (box[0] < box[2] and box[1] < box[3]):
            raise InvalidArgument(
                f"image {index}: regions[{j}] = ({box[0]:g}, {box[1]:g}, {box[2]:g}, "
                f"{box[3]:g}) is not a box; need finite x1 < x2 and y1 < y2 in pixels of the "
                "image as sent"
            )
        boxes.append(box)
    return boxes


def check_roi_bins(nodes: Sequence[NodeSpec], roi_size: int, regions: Sequence[list[Box]]) -> None:
    """Refuse (RESOURCE_EXHAUSTED) region requests whose roi_align bins, per image and node,
    exceed MAX_ROI_BINS: the worker would spend seconds and gigabytes on them."""
    for node in nodes:
        channels = _channels(node) or 1
        for index, boxes in enumerate(regions):
            bins = len(boxes) * channels * roi_size**2
            if bins > MAX_ROI_BINS:
                fit = max(1, MAX_ROI_BINS // (channels * roi_size**2))
                raise LimitExceeded(
                    f"image {index}: {len(boxes)} regions x {channels} channels of node "
                    f"{node.name!r} x roi_size {roi_size}^2 are {bins} roi_align bins, over "
                    f"the limit of {MAX_ROI_BINS}; send at most {fit} regions per image at this "
                    "roi_size, or a smaller roi_size (0: 7)"
                )


def image_input(image: pb.Image, index: int) -> ImageInput:
    which = image.WhichOneof("source")
    if which == "encoded":
        return ImageInput(encoded=image.encoded)
    if which == "tensor":
        t = image.tensor
        return ImageInput(dtype=t.dtype, shape=tuple(t.shape), data=t.data)
    raise InvalidImage("neither 'encoded' bytes nor a 'tensor' is set", index)


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def _channels(node: NodeSpec) -> int | None:
    """C of a node from the catalogue's shape (None when unknown)."""
    channel_dim = {"NHWC": 3, "NLC": 2}.get(node.layout, 1)
    return int(node.shape[channel_dim]) if len(node.shape) > channel_dim else None


def descriptor_dims(
    nodes: Sequence[NodeSpec], spec: OutputSpec, heads: Mapping[str, Head]
) -> list[int | None]:
    """Length of each pooled output (one for concat) after the post chain, checking every
    head step against the dimension it would receive (INVALID_ARGUMENT before compute)."""
    if spec.pool == "raw":
        return []
    parts: list[tuple[str, int | None]] = []
    for node in nodes:
        c = _channels(node)
        parts.append((f"node {node.name!r}", None if c is None else pooled_dim(spec.pool, c)))
    if spec.concat:
        sizes = [d for _, d in parts]
        total = None if None in sizes else sum(d for d in sizes if d is not None)
        parts = [(f"the concatenation of {len(nodes)} nodes", total)]
    dims: list[int | None] = []
    for what, dim in parts:
        for index, step in enumerate(spec.post):
            if step.op not in HEAD_OPS or dim is None:
                continue
            head = heads[step.head]
            if dim != head.input_dim:
                raise InvalidArgument(
                    f"post[{index}] ({step.op}): head {step.head!r} takes {head.input_dim}-d "
                    f"descriptors but {what} pooled with {spec.pool} gives {dim}; use a head "
                    "fitted on the same model, nodes and pool"
                )
            if step.op != "center":
                dim = step.dim or head.n_components
        dims.append(dim)
    return dims


def estimate_bytes(
    nodes: Sequence[NodeSpec],
    spec: OutputSpec,
    dims: Sequence[int | None],
    regions: Sequence[int],
) -> int:
    """Output bytes of a request at the model's input size: per image the outputs' elements
    (pooled: the descriptor dims; raw: the catalogue's shapes, or C x roi x roi per region),
    times the image's region count (1 without regions)."""
    itemsize = _ITEMSIZE[spec.dtype]
    if spec.pool == "raw":
        whole = sum(math.prod(n.shape[1:]) for n in nodes)
        per_region = sum((_channels(n) or 1) * spec.roi_size**2 for n in nodes)
    else:
        whole = per_region = sum(d or 1 for d in dims)
    return itemsize * sum(per_region * r if r else whole for r in regions)


class FeatureService(pb_grpc.FeatureServiceServicer):
    """The layertap.v1.FeatureService implementation."""

    def __init__(
        self,
        settings: Settings,
        runtime: ModelRuntime,
        batcher: BatchQueue,
        decode_pool: Executor,
        metrics: Metrics | None = None,
        heads: Mapping[str, Head] | None = None,
    ) -> None:
        self.settings = settings
        self.heads: Mapping[str, Head] = dict(heads or {})  # loaded at start-up (app.load_heads)
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
            output_dtypes=list(OUTPUT_DTYPES),
            models=self.runtime.names(),
            devices=list(self.batcher.devices) or [str(self.runtime.device)],
            methods=[m.name for m in service.methods],
            heads=[
                pb.HeadInfo(
                    name=h.name,
                    model=h.model,
                    input_dim=h.input_dim,
                    components=h.n_components,
                    nodes=list(h.nodes),
                    pool=h.pool,
                )
                for h in self.heads.values()
            ],
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
    async def Compare(
        self, request: pb.CompareRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompareResponse:
        set_request_deadline(context.time_remaining())  # the batcher tells deadline from cancel
        return await run_compare(self, request)  # server/compare.py

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
            extraction_mode=loaded.catalog.mode,
            extraction_reason=loaded.catalog.reason,
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

    def _check_encoded_sizes(
        self, inputs: Sequence[ImageInput], label: Label = PerImageError.at
    ) -> None:
        """The cheap size check of encoded images, before any queue room is held."""
        for index, given in enumerate(inputs):
            if given.encoded is not None:
                try:
                    codec.check_encoded_size(len(given.encoded), self.limits)
                except PerImageError as exc:
                    raise label(exc, index) from None

    async def _run_images(
        self,
        model: str,
        inputs: Sequence[ImageInput],
        spec: OutputSpec,
        nodes: tuple[str, ...],
        native: bool,
        priority: int = 0,
        regions: Sequence[Sequence[Box]] | None = None,
        label: Label = PerImageError.at,
        check: Callable[[Sequence[Prepared]], None] | None = None,
    ) -> tuple[list[Prepared], list[list[dict[str, Any]]], list[BatchInfo]]:
        """Decode (decode pool), then batch and run every image's views; the path Extract and
        Compare share. Queue room is held from before decoding, so a full queue refuses at
        once; `label` names a failed image (index → message); `check` sees the decoded images
        before anything is submitted. Returns the prepared images, each image's worker
        outputs (one per view) and every item's batch info. If anything fails or the caller
        goes away, this request's other items are cancelled (dropped before compute)."""
        preprocessing = self.runtime.model(model).weights.preprocessing
        n_views = len(spec.scales) * (2 if spec.flip else 1)
        boxes = regions or [()] * len(inputs)
        # futures[i][v]: view v of image i (TTA views are items of their own)
        futures: list[list[asyncio.Future[Any]]] = [[] for _ in inputs]
        try:
            with self.batcher.reserve(len(inputs) * n_views):
                prepared = await asyncio.gather(
                    *(
                        self._in_pool(
                            prepare_image,
                            img,
                            self.limits,
                            preprocessing,
                            native,
                            image_boxes,
                            spec.flip,
                            spec.scales,
                        )
                        for img, image_boxes in zip(inputs, boxes, strict=True)
                    ),
                    return_exceptions=True,
                )
                for index, result in enumerate(prepared):
                    if isinstance(result, PerImageError):
                        raise label(result, index)
                    if isinstance(result, BaseException):
                        raise result
                images: list[Prepared] = prepared  # type: ignore[assignment]
                if check is not None:
                    check(images)
                # one batch key per input shape: a batch must stack (a flip view has its
                # image's shape and batches with it; each scale with same-shaped views)
                groups: dict[tuple[int, ...], list[tuple[int, Item]]] = {}
                for index, image in enumerate(images):
                    for view in image.inputs():
                        item = Item(view.tensor, spec, nodes, view.boxes)
                        groups.setdefault(tuple(view.tensor.shape), []).append((index, item))
                for shape, entries in groups.items():
                    # requests for other node sets of the same model share the forward
                    submitted = self.batcher.submit_many(
                        (model, shape),
                        [item for _, item in entries],
                        reserved=True,
                        priority=priority,
                    )
                    for (i, _), fut in zip(entries, submitted, strict=True):
                        futures[i].append(fut)
            flat = [fut for per_image in futures for fut in per_image]
            done: list[tuple[dict[str, Any], BatchInfo]] = await asyncio.gather(*flat)
        except BaseException:  # client gone, queue full or a failed batch: drop our other items
            for per_image in futures:
                for fut in per_image:
                    if not fut.done():
                        fut.cancel()
            raise
        rows: list[list[dict[str, Any]]] = []
        position = 0
        for per_image in futures:  # back to per-image view lists
            rows.append([r for r, _ in done[position : position + len(per_image)]])
            position += len(per_image)
        return images, rows, [info for _, info in done]

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
        if len(request.nodes) + len(request.aliases) > MAX_REQUESTED_NODES:  # before copying
            plan_outputs(request.nodes, request.aliases)  # raises with the counts
        plan = plan_outputs(list(request.nodes), dict(request.aliases))
        specs = self.runtime.resolve(request.model, [name for _, name in plan])
        spec = output_spec(request.output, self.heads, request.model)
        for node in specs:
            check_pool(spec.pool, node.layout, node.name)
            if (
                spec.pool in ("cls", "cls_mean")
                and loaded.catalog.prefix_tokens(node.name, loaded.n_prefix_tokens) == 0
            ):
                where = (
                    f"model {request.model!r} has no CLS token"
                    if loaded.n_prefix_tokens == 0
                    else f"node {node.name!r} comes before the CLS token is prepended"
                )
                raise InvalidArgument(f"{where}; use pool 'mean' (or a later token node)")
        full_nodes = tuple(dict.fromkeys(n.name for n in specs))
        unique_specs = [next(n for n in specs if n.name == name) for name in full_nodes]
        concat_key = ""
        if spec.concat:
            concat_key = request.output.concat_key or DEFAULT_CONCAT_KEY
        dims = descriptor_dims(unique_specs, spec, self.heads)

        inputs = [image_input(img, i) for i, img in enumerate(request.images)]
        regions = [regions_of(img, i) for i, img in enumerate(request.images)]
        if any(regions):
            for node in unique_specs:
                if node.layout not in ("NCHW", "NHWC"):
                    raise InvalidArgument(
                        f"regions need feature-map nodes (layout NCHW or NHWC); node "
                        f"{node.name!r} is {node.layout or 'of unknown layout'}"
                    )
        self._check_encoded_sizes(inputs)
        # Inputs at the model's own size have known output sizes: refuse oversize answers
        # before spending compute on them (raw float inputs of other sizes are checked after).
        estimate = estimate_bytes(unique_specs, spec, dims, [len(r) for r in regions])
        if estimate > s.max_message_bytes - 64 * 1024:
            raise LimitExceeded(
                f"the response would carry about {estimate} bytes of tensors, over "
                f"max_message_bytes={s.max_message_bytes}; request pooled outputs, fewer nodes, "
                "regions or images"
            )
        if any(regions):  # after the size check: for raw regions the message limit says more
            check_roi_bins(unique_specs, spec.roi_size, regions)
        preprocessing = loaded.weights.preprocessing
        native = request.native_resolution
        priority = request.priority
        if priority not in _PRIORITIES:
            raise InvalidArgument(
                f"unknown priority {priority}; use PRIORITY_NORMAL (0) or PRIORITY_LOW (1)"
            )
        n_views = len(spec.scales) * (2 if spec.flip else 1)
        if n_views > 1 and count * n_views > s.max_queue_images:  # the batcher would say "images"
            raise LimitExceeded(
                f"{count} images x {n_views} TTA views are {count * n_views} forward inputs, "
                f"more than the whole batch queue (max_queue_images={s.max_queue_images}); send "
                f"at most {max(1, s.max_queue_images // n_views)} images per request with this tta"
            )
        images, rows, infos = await self._run_images(
            request.model,
            inputs,
            spec,
            full_nodes,
            native,
            int(priority),
            regions,
        )
        encode_started = time.perf_counter()
        # finish (TTA average, concat, post chain, dtype) and encode: decode pool, not the loop
        encoded = await self._in_pool(
            finish_results, rows, full_nodes, spec, self.heads, concat_key
        )
        encode_s = time.perf_counter() - encode_started
        size = sum(len(t.data) for row in encoded for t in row.values())
        if size > s.max_message_bytes - 64 * 1024:
            raise LimitExceeded(
                f"the response would carry {size} bytes of tensors, over max_message_bytes="
                f"{s.max_message_bytes}; request pooled outputs, fewer nodes or fewer images"
            )

        node_of = {name: n.name for (_, name), n in zip(plan, specs, strict=True)}
        layout_of = {n.name: n.layout for n in specs}
        results = []
        for index, row in enumerate(encoded):
            has_regions = bool(regions[index])
            if concat_key:
                out_plan = [(concat_key, "+".join(full_nodes), concat_key)]
            else:
                out_plan = [(key, node_of[name], node_of[name]) for key, name in plan]
            outputs = []
            for out_key, node_field, row_key in out_plan:
                t = row[row_key]
                if spec.pool != "raw":
                    layout = "NC"
                elif has_regions:
                    layout = "NCHW"  # roi_align bins, whatever the node's layout
                else:
                    layout = layout_of[node_field]
                outputs.append(
                    pb.NamedTensor(
                        key=out_key,
                        node=node_field,
                        tensor=pb.Tensor(dtype=t.dtype, shape=t.shape, data=t.data, layout=layout),
                    )
                )
            results.append(pb.ImageResult(outputs=outputs))
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
