"""Domain results -> response messages: model facts, Extract's named tensors and metadata,
Compare's distances, and the exact size of what will be sent. Torch-free: encoded tensors are
bytes + dtype + shape already."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from layertap.v1 import layertap_pb2 as pb

from .errors import LimitExceeded
from .requests import ExtractJob

if TYPE_CHECKING:
    from .pipeline import Extracted
    from .preprocess import Preprocessing
    from .spec import NodeSpec
    from .worker import ModelStatus


def preprocessing_pb(p: Preprocessing | None) -> pb.Preprocessing:
    """The preprocessing a model applies, as clients see it (empty: none recorded)."""
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
        resize_mode=p.resize_mode,
        crop_offset=p.crop_offset,
    )


def model_info_pb(s: ModelStatus) -> pb.ModelInfo:
    """One model's status and facts, for ListModels and DescribeModel."""
    return pb.ModelInfo(
        name=s.name,
        architecture=s.architecture,
        weights=s.weights,
        weights_sha256=s.weights_sha256,
        input_size=list(s.input_size),
        preprocessing=preprocessing_pb(s.preprocessing),
        device=s.device,
        ready=s.ready,
        status_message=s.message,
        random_weights=s.random_weights,
        compute_dtype=s.compute_dtype,
        prefix_tokens=s.prefix_tokens,
        extraction_mode=s.extraction_mode,
        source=s.source,
    )


# --------------------------------------------------------------------------- exact sizes
# The serialised size of an answer, computed from its fields' lengths: ByteSize() would encode
# the whole message (every tensor's bytes copied, on the event loop) just to measure it.
def _number(message: Any, field: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[field].number)


def _varint_size(value: int) -> int:
    if 0 <= value < 128:
        return 1
    return (value.bit_length() + 6) // 7 if value > 0 else 10


def field_size(number: int, length: int) -> int:
    """Bytes of one length-delimited field (string, bytes, packed, message) of `length`."""
    return _varint_size(number << 3) + _varint_size(length) + length


@functools.lru_cache(maxsize=1024)  # keys, node names, dtypes and layouts repeat per image
def _text_size(number: int, text: str) -> int:
    """A proto3 string field: absent when empty."""
    length = len(text.encode("utf-8"))
    return field_size(number, length) if length else 0


_DTYPE, _SHAPE, _DATA, _LAYOUT = (
    _number(pb.Tensor, f) for f in ("dtype", "shape", "data", "layout")
)
_SHAPE_TAG, _DATA_TAG = _varint_size(_SHAPE << 3), _varint_size(_DATA << 3)
_KEY, _NODE, _TENSOR = (_number(pb.NamedTensor, f) for f in ("key", "node", "tensor"))
_OUTPUTS = _number(pb.ImageResult, "outputs")
_RESULTS = _number(pb.ExtractResponse, "results")
_METADATA = _number(pb.ExtractResponse, "metadata")
_ITEM_ID = _number(pb.ExtractStreamResponse, "id")
_ITEM_RESPONSE = _number(pb.ExtractStreamResponse, "response")


def tensor_size(dtype: str, shape: Iterable[int], data_bytes: int, layout: str) -> int:
    """Serialised bytes of a Tensor message whose data is `data_bytes` long."""
    size = _text_size(_DTYPE, dtype) + _text_size(_LAYOUT, layout)
    packed = 0
    for dim in shape:
        packed += _varint_size(dim)
    if packed:
        size += _SHAPE_TAG + _varint_size(packed) + packed
    if data_bytes:
        size += _DATA_TAG + _varint_size(data_bytes) + data_bytes
    return size


def named_tensor_size(key: str, node: str, tensor_bytes: int) -> int:
    """Serialised bytes of a NamedTensor holding a (set) Tensor of `tensor_bytes`."""
    return _text_size(_KEY, key) + _text_size(_NODE, node) + field_size(_TENSOR, tensor_bytes)


def extract_response_size(images: Sequence[Sequence[int]], metadata_bytes: int) -> int:
    """Serialised bytes of an ExtractResponse: per image, its NamedTensors' sizes; and the
    (set) metadata's size."""
    results = sum(
        field_size(_RESULTS, sum(field_size(_OUTPUTS, n) for n in outputs)) for outputs in images
    )
    return results + field_size(_METADATA, metadata_bytes)


def stream_item_size(item_id: str, response_bytes: int) -> int:
    """Serialised bytes of the ExtractStreamResponse that carries an answer to item `item_id`."""
    return _text_size(_ITEM_ID, item_id) + field_size(_ITEM_RESPONSE, response_bytes)


def check_message_size(size: int, max_bytes: int) -> None:
    """Refuse (RESOURCE_EXHAUSTED) an answer whose message would not fit max_message_bytes;
    gRPC would otherwise fail the call, or end a whole ExtractStream, when sending it."""
    if size > max_bytes:
        raise LimitExceeded(
            f"the answer would be a {size}-byte message, over max_message_bytes={max_bytes} "
            "(tensors, and every image's output keys and node names); request pooled outputs, "
            "fewer nodes, fewer images, or shorter aliases / concat_key"
        )


class SizedResponse(NamedTuple):
    """An ExtractResponse and its exact serialised size."""

    message: pb.ExtractResponse
    size: int


def extract_response(
    job: ExtractJob,
    done: Extracted,
    weights_sha256: str,
    preprocessing: Preprocessing | None,
    received: float,
    default_device: str,
) -> SizedResponse:
    """One named tensor per requested output (or the one concatenation) for each image, and the
    metadata: resolved nodes, preprocessing, stage timings, batch size and serving device;
    with the message's exact size (computed, not serialised)."""
    spec, plan, full_nodes, concat_key = job.spec, job.plan, job.nodes, job.concat_key
    infos, images = done.ran.infos, done.ran.images
    node_of = {name: n.name for (_, name), n in zip(plan, job.specs, strict=True)}
    layout_of = {n.name: n.layout for n in job.specs}
    results = []
    sizes: list[list[int]] = []
    for index, row in enumerate(done.rows):
        has_regions = bool(job.regions[index])
        if concat_key:
            out_plan = [(concat_key, "+".join(full_nodes), concat_key)]
        else:
            out_plan = [(key, node_of[name], node_of[name]) for key, name in plan]
        outputs = []
        image_sizes = []
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
            tensor_bytes = tensor_size(t.dtype, t.shape, len(t.data), layout)
            image_sizes.append(named_tensor_size(out_key, node_field, tensor_bytes))
        results.append(pb.ImageResult(outputs=outputs))
        sizes.append(image_sizes)
    metadata = pb.ExtractMetadata(
        model=job.model,
        weights_sha256=weights_sha256,
        nodes=[pb.ResolvedNode(key=k, requested=n, node=node_of[n]) for k, n in plan],
        preprocessing=preprocessing_pb(preprocessing),
        timings=pb.Timings(
            queue_ms=1000 * max((i.queue_s for i in infos), default=0.0),
            decode_ms=1000 * sum(p.decode_s for p in images),
            compute_ms=1000 * sum({i.batch_id: i.run_s for i in infos}.values()),
            total_ms=1000 * (time.perf_counter() - received),
        ),
        # every image from the result cache: no batch (0) and no device of its own
        batch_size=max((i.batch_size for i in infos), default=0),
        device=(infos[0].device if infos else "") or default_device,  # the one that served
    )
    size = extract_response_size(sizes, metadata.ByteSize())
    return SizedResponse(pb.ExtractResponse(results=results, metadata=metadata), size)


def describe_response(
    status: ModelStatus,
    nodes: Sequence[NodeSpec],
    modules: Sequence[tuple[str, str, int]],
    mode: str,
    reason: str,
) -> pb.DescribeModelResponse:
    """A model's catalogue: every extractable node and every module with its own parameters."""
    return pb.DescribeModelResponse(
        model=model_info_pb(status),
        nodes=[
            pb.NodeInfo(
                name=n.name,
                shape=list(n.shape),
                dtype=n.dtype,
                layout=n.layout,
                op=n.op,
                target=n.target,
            )
            for n in nodes
        ],
        modules=[pb.ModuleInfo(name=n, type=t, own_parameters=c) for n, t, c in modules],
        extraction_mode=mode,
        extraction_reason=reason,
    )
