"""Protocol responses -> numpy arrays and the client's result types (ModelInfo, ServerInfo,
ModelDescription, ExtractResult ...), checked against the protocol so a broken server cannot
make the client misread memory; also splitting and merging extract results.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from layertap.common.options import WIRE_DTYPES
from layertap.v1 import layertap_pb2 as pb

from .errors import FeatureServiceError
from .types import (
    ExtractMetadata,
    ExtractResult,
    HeadInfo,
    ModelDescription,
    ModelInfo,
    ModuleInfo,
    NodeInfo,
    Preprocessing,
    ResolvedNode,
    ServerInfo,
    Timings,
)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: bf16 is a float32's top 16 bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def decode_tensor(tensor: pb.Tensor, what: str = "tensor", *, copy: bool = True) -> np.ndarray:
    """A protocol Tensor as a numpy array in native byte order; bfloat16 becomes float32.

    Lengths are checked against the shape so a broken server cannot make us misread memory.
    With ``copy=False`` uint8/float16/float32 results may be read-only views of the message.
    """
    wire = WIRE_DTYPES.get(tensor.dtype)
    if wire is None:
        raise FeatureServiceError.invalid_response(
            f"{what} has unknown dtype {tensor.dtype!r} (expected one of {list(WIRE_DTYPES)})"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise FeatureServiceError.invalid_response(f"{what} has a negative dimension {shape}")
    expected = math.prod(shape) * wire.itemsize
    if len(tensor.data) != expected:
        raise FeatureServiceError.invalid_response(
            f"{what} has {len(tensor.data)} bytes of data but shape {list(shape)} "
            f"and dtype {tensor.dtype} need {expected}"
        )
    array = np.frombuffer(tensor.data, dtype=wire).reshape(shape)
    if tensor.dtype == "bfloat16":
        return bfloat16_to_float32(array)  # a new array already
    native = wire.newbyteorder("=")
    if copy or array.dtype != native:
        return array.astype(native, copy=True)
    return array


def _f32(value: float) -> float:
    """A proto float32 as the short decimal it was written as (0.485, not 0.48500001430511475)."""
    return float(str(np.float32(value)))


def preprocessing_from_proto(p: pb.Preprocessing) -> Preprocessing:
    return Preprocessing(
        resize_size=int(p.resize_size),
        crop_size=tuple(int(x) for x in p.crop_size),
        mean=tuple(_f32(x) for x in p.mean),
        std=tuple(_f32(x) for x in p.std),
        interpolation=p.interpolation,
        antialias=bool(p.antialias),
        resize_kernel=p.resize_kernel,
        resize_mode=p.resize_mode or "shorter",
        crop_offset=p.crop_offset or "round",
    )


def model_info_from_proto(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        architecture=m.architecture,
        weights=m.weights,
        weights_sha256=m.weights_sha256,
        input_size=tuple(int(x) for x in m.input_size),
        preprocessing=preprocessing_from_proto(m.preprocessing),
        device=m.device,
        ready=bool(m.ready),
        status_message=m.status_message,
        random_weights=bool(m.random_weights),
        compute_dtype=m.compute_dtype,
        prefix_tokens=int(m.prefix_tokens),
        extraction_mode=m.extraction_mode,
        source=m.source,
    )


def models_from_proto(response: pb.ListModelsResponse) -> list[ModelInfo]:
    return [model_info_from_proto(m) for m in response.models]


def server_info_from_proto(
    response: pb.GetServerInfoResponse | pb.ListModelsResponse,
) -> ServerInfo:
    """ServerInfo from GetServerInfo, or from ListModels (older servers: limits only)."""
    lim = response.limits
    common = {
        "version": response.server_version,
        "max_images_per_request": int(lim.max_images_per_request),
        "max_image_bytes": int(lim.max_image_bytes),
        "max_image_pixels": int(lim.max_image_pixels),
        "max_message_bytes": int(lim.max_message_bytes),
        "max_batch_size": int(lim.max_batch_size),
        "max_queue_images": int(lim.max_queue_images),
        "max_stream_in_flight": int(lim.max_stream_in_flight),
        "max_parameter_bytes": int(lim.max_parameter_bytes),
    }
    if isinstance(response, pb.ListModelsResponse):
        return ServerInfo(**common, models=tuple(m.name for m in response.models))
    return ServerInfo(
        **common,
        image_formats=tuple(response.image_formats),
        input_dtypes=tuple(response.input_dtypes),
        pools=tuple(response.pools),
        output_dtypes=tuple(response.output_dtypes),
        models=tuple(response.models),
        devices=tuple(response.devices),
        methods=tuple(response.methods),
        heads=tuple(
            HeadInfo(
                name=h.name,
                model=h.model,
                input_dim=int(h.input_dim),
                components=int(h.components),
                nodes=tuple(h.nodes),
                pool=h.pool,
            )
            for h in response.heads
        ),
    )


def parameters_from_proto(response: pb.GetParametersResponse, model: str) -> dict[str, np.ndarray]:
    """Full parameter name -> writable array, in the server's order."""
    if response.model and response.model != model:
        raise FeatureServiceError.invalid_response(
            f"parameters of model {response.model!r}, asked for {model!r}"
        )
    out: dict[str, np.ndarray] = {}
    for nt in response.parameters:
        name = nt.key or nt.node
        if not name or name in out:
            raise FeatureServiceError.invalid_response(f"missing or repeated name {name!r}")
        out[name] = decode_tensor(nt.tensor, f"parameter {name!r}")
    return out


def description_from_proto(response: pb.DescribeModelResponse) -> ModelDescription:
    return ModelDescription(
        model=model_info_from_proto(response.model),
        nodes=[
            NodeInfo(
                name=n.name,
                shape=tuple(int(d) for d in n.shape),
                dtype=n.dtype,
                layout=n.layout,
                op=n.op,
                target=n.target,
            )
            for n in response.nodes
        ],
        modules=[
            ModuleInfo(name=m.name, type=m.type, own_parameters=int(m.own_parameters))
            for m in response.modules
        ],
        extraction_mode=response.extraction_mode,
        extraction_reason=response.extraction_reason,
    )


def _metadata_from_proto(m: pb.ExtractMetadata) -> ExtractMetadata:
    t = m.timings
    return ExtractMetadata(
        model=m.model,
        weights_sha256=m.weights_sha256,
        device=m.device,
        batch_size=int(m.batch_size),
        nodes=[ResolvedNode(r.key, r.requested, r.node) for r in m.nodes],
        preprocessing=preprocessing_from_proto(m.preprocessing),
        timings=Timings(
            queue_ms=t.queue_ms,
            decode_ms=t.decode_ms,
            compute_ms=t.compute_ms,
            total_ms=t.total_ms,
        ),
    )


def parse_extract_response(response: pb.ExtractResponse, n_images: int) -> ExtractResult:
    """Decode and stack per-image outputs, checking the response against the protocol."""
    results = list(response.results)
    if len(results) != n_images:
        raise FeatureServiceError.invalid_response(
            f"{len(results)} image results for {n_images} images"
        )
    keys = [nt.key for nt in results[0].outputs]
    if len(set(keys)) != len(keys):
        raise FeatureServiceError.invalid_response(f"duplicate output keys {keys}")
    decoded: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for i, result in enumerate(results):
        image_keys = [nt.key for nt in result.outputs]
        if image_keys != keys:
            raise FeatureServiceError.invalid_response(
                f"image {i} has outputs {image_keys}, image 0 has {keys}"
            )
        for nt in result.outputs:
            what = f"output {nt.key!r} of image {i}"
            decoded[nt.key].append(decode_tensor(nt.tensor, what, copy=False))

    first = results[0].outputs
    layouts = {nt.key: nt.tensor.layout for nt in first}
    nodes = {nt.key: nt.node for nt in first}
    stacked: dict[str, np.ndarray | None] = {}
    per_image: list[dict[str, np.ndarray]] = [{} for _ in results]
    for key, arrays in decoded.items():
        if len({(a.shape, a.dtype) for a in arrays}) == 1:
            # One copy into a fresh writable buffer; per-image entries are views of it.
            out = np.empty((len(arrays), *arrays[0].shape), arrays[0].dtype.newbyteorder("="))
            for i, a in enumerate(arrays):
                out[i] = a
                per_image[i][key] = out[i]
            stacked[key] = out
        else:
            stacked[key] = None
            for i, a in enumerate(arrays):
                per_image[i][key] = np.array(a, dtype=a.dtype.newbyteorder("="), copy=True)
    metadata = _metadata_from_proto(response.metadata)
    return ExtractResult(stacked, per_image, layouts, nodes, metadata)


def split_result(result: ExtractResult) -> list[ExtractResult]:
    """One ExtractResult per image of ``result`` (arrays with leading dimension 1), each with
    its own copy of the data, so keeping one does not keep the whole batch alive."""
    out = []
    for image in result.per_image:
        stacked: dict[str, np.ndarray | None] = {k: a[None].copy() for k, a in image.items()}
        per_image = [{k: a[0] for k, a in stacked.items() if a is not None}]
        out.append(ExtractResult(stacked, per_image, result.layouts, result.nodes, result.metadata))
    return out


def merge_results(parts: Sequence[ExtractResult]) -> ExtractResult:
    """Several calls' results as one, images in order. Metadata is the first call's, with
    ``batch_size`` the largest and timings summed over the calls."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for part in parts[1:]:
        if list(part) != list(first):
            raise FeatureServiceError.invalid_response(
                f"calls answered different outputs {list(first)} and {list(part)}"
            )
    per_image = [image for part in parts for image in part.per_image]
    stacked: dict[str, np.ndarray | None] = {}
    for key in first:
        arrays = [image[key] for image in per_image]
        if len({(a.shape, a.dtype) for a in arrays}) == 1:
            out = np.stack(arrays)
            for i, image in enumerate(per_image):
                image[key] = out[i]
            stacked[key] = out
        else:
            stacked[key] = None
    t = [p.metadata.timings for p in parts]
    metadata = dataclasses.replace(
        first.metadata,
        batch_size=max(p.metadata.batch_size for p in parts),
        timings=Timings(
            queue_ms=sum(x.queue_ms for x in t),
            decode_ms=sum(x.decode_ms for x in t),
            compute_ms=sum(x.compute_ms for x in t),
            total_ms=sum(x.total_ms for x in t),
        ),
    )
    return ExtractResult(stacked, per_image, first.layouts, first.nodes, metadata)
