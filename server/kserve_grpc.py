"""The Open Inference Protocol (KServe v2) over gRPC, on the server's own port: a protocol
adapter beside service.py. Each ModelInfer becomes a layertap Extract (the same validation,
budgets, batcher, metrics and auth, through `FeatureService._extract`), and its answer a
ModelInferResponse. Torch-free.

- ModelMetadata lists the input `images` (BYTES, one encoded image per element) and, as outputs,
  every node of the model's catalogue with its shape (batch dimension -1) and FP32.
- ModelInfer's requested `outputs` are node names (full or truncated); request `parameters`
  carry the output options by their layertap names: `pool` (string), `gem_p` (double),
  `normalize` (bool), `dtype` (string). Results travel in `raw_output_contents`, one entry per
  output, the images' tensors stacked along a leading batch dimension.

WIP (issue 19): raw UINT8 / FP32 tensor inputs, post steps, TTA and the rest of the options,
the HTTP/REST side and ModelStreamInfer are not done yet.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import grpc

from layertap.common.options import POOL_ALIASES, POOL_NAMES
from layertap.kserve.v2 import open_inference_pb2 as kpb
from layertap.kserve.v2 import open_inference_pb2_grpc as kpb_grpc
from layertap.v1 import layertap_pb2 as pb

from .errors import InvalidArgument
from .metrics import layertap_version
from .rpc import rpc

if TYPE_CHECKING:
    from .service import FeatureService

IMAGES = "images"
DATATYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "int8": "INT8"}
POOLS = {name: value for value, name in POOL_NAMES.items()} | POOL_ALIASES


def bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """The protocol's BYTES tensor in raw form: each element a 4-byte little-endian length
    and its bytes. Refuses a length that runs past the end or a count that does not match."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidArgument("a BYTES element's 4-byte length is cut short")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise InvalidArgument(f"a BYTES element says {size} bytes but fewer remain")
        out.append(raw[at : at + size])
        at += size
    if len(out) != count:
        raise InvalidArgument(f"input {IMAGES!r} has shape [{count}] but holds {len(out)} images")
    return out


def _param(value: kpb.InferParameter) -> object:
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def output_options(parameters: dict[str, kpb.InferParameter]) -> pb.OutputOptions:
    options = pb.OutputOptions()
    for key, value in parameters.items():
        v = _param(value)
        if key == "pool":
            if not isinstance(v, str) or v not in POOLS:
                raise InvalidArgument(f"parameter pool must be one of {sorted(POOLS)}, got {v!r}")
            options.pool = POOLS[v]
        elif key == "gem_p" and isinstance(v, (int, float)) and not isinstance(v, bool):
            options.gem_p = float(v)
        elif key == "normalize" and isinstance(v, bool):
            options.normalize = v
        elif key == "dtype" and isinstance(v, str):
            options.dtype = v
        else:
            raise InvalidArgument(
                f"unknown or mistyped parameter {key!r}; this server takes pool (string), "
                "gem_p (double), normalize (bool) and dtype (string)"
            )
    return options


def extract_request(request: kpb.ModelInferRequest) -> pb.ExtractRequest:
    """ModelInferRequest → layertap's ExtractRequest (the same checks follow in Extract's)."""
    if len(request.inputs) != 1 or request.inputs[0].name != IMAGES:
        raise InvalidArgument(f"send one input named {IMAGES!r} (BYTES, one encoded image each)")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
        raise InvalidArgument(
            f"input {IMAGES!r} must be BYTES of shape [N], got {tensor.datatype} {list(tensor.shape)}"
        )
    count = int(tensor.shape[0])
    if request.raw_input_contents:
        images = bytes_elements(request.raw_input_contents[0], count)
    else:
        images = list(tensor.contents.bytes_contents)
        if len(images) != count:
            raise InvalidArgument(f"input {IMAGES!r} has shape [{count}] but holds {len(images)}")
    if not request.outputs:
        raise InvalidArgument("name at least one output: a node of the model (ModelMetadata)")
    return pb.ExtractRequest(
        model=request.model_name,
        images=[pb.Image(encoded=data) for data in images],
        nodes=[o.name for o in request.outputs],
        output=output_options(dict(request.parameters)),
    )


def infer_response(
    request: kpb.ModelInferRequest, answer: pb.ExtractResponse
) -> kpb.ModelInferResponse:
    response = kpb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    for index, wanted in enumerate(request.outputs):
        tensors = [result.outputs[index].tensor for result in answer.results]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise InvalidArgument(
                f"output {wanted.name!r} has a different shape per image; send one image per request"
            )
        response.outputs.add(
            name=wanted.name,
            datatype=DATATYPES.get(tensors[0].dtype, tensors[0].dtype.upper()),
            shape=[len(tensors), *tensors[0].shape],
        )
        response.raw_output_contents.append(b"".join(t.data for t in tensors))
    return response


class InferenceService(kpb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService, served through the FeatureService's path."""

    def __init__(self, features: FeatureService) -> None:
        self.features = features
        self.runtime = features.runtime
        self.metrics = features.metrics
        self.settings = features.settings

    def identify(self, context: grpc.aio.ServicerContext) -> object:
        return self.features.identify(context)

    @rpc
    async def ServerLive(
        self, request: kpb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(
        self, request: kpb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerReadyResponse:
        names = self.runtime.names()
        return kpb.ServerReadyResponse(ready=all(self.runtime.status(n).ready for n in names))

    @rpc
    async def ModelReady(
        self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelReadyResponse:
        self.features._allow(request.name, self.features._visible(context))
        return kpb.ModelReadyResponse(ready=self.runtime.status(request.name).ready)

    @rpc
    async def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name="layertap", version=layertap_version())

    @rpc
    async def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelMetadataResponse:
        self.features._allow(request.name, self.features._visible(context))
        loaded = self.runtime.model(request.name)
        response = kpb.ModelMetadataResponse(
            name=request.name, versions=["1"], platform="layertap_pytorch"
        )
        response.inputs.add(name=IMAGES, datatype="BYTES", shape=[-1])
        for node in loaded.catalog.nodes:
            response.outputs.add(name=node.name, datatype="FP32", shape=[-1, *node.shape])
        return response

    @rpc
    async def ModelInfer(
        self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelInferResponse:
        extract = extract_request(request)
        answer = await self.features._extract(extract, self.features._visible(context))
        return infer_response(request, answer)
