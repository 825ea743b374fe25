"""The Open Inference Protocol (KServe v2) over gRPC, on the server's own port: a protocol
adapter beside service.py. Each ModelInfer becomes a layertap Extract (the same validation,
budgets, batcher, metrics and auth, through `FeatureService._extract`); the conversions both
v2 transports share are kserve_tensors.py. Torch-free.

- ModelMetadata lists the inputs `images` (BYTES), `pixels` (UINT8 [N, H, W, 3]) and
  `normalized` (FP32 [N, 3, H, W]), and every node of the model as an output.
- ModelInfer's requested `outputs` are node names; request `parameters` carry the output
  options by their layertap names. Results travel in `raw_output_contents`.
- ModelStreamInfer (Triton's streaming extension) runs up to max_stream_in_flight inferences
  of one stream at once and answers each, in the order they finish, with its response or its
  error message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from layertap.kserve.v2 import open_inference_pb2 as kpb
from layertap.kserve.v2 import open_inference_pb2_grpc as kpb_grpc

from .batching import set_request_deadline
from .errors import InvalidArgument, LayertapError, ModelNotFound
from .kserve_tensors import (
    V2Input,
    check_count,
    extract_request,
    images_of,
    model_metadata,
    outputs_of,
)
from .metrics import layertap_version
from .rpc import MAX_DETAILS, Undecodable, add_to_server, rpc

if TYPE_CHECKING:
    from .service import FeatureService, Visible

EXTENSIONS = ("binary_tensor_data", "parameters", "model_stream_infer")
# which typed contents field carries each input datatype's values
CONTENTS = {"BYTES": "bytes_contents", "UINT8": "uint_contents", "FP32": "fp32_contents"}


def register(features: FeatureService, server: grpc.aio.Server) -> None:
    """Serve inference.GRPCInferenceService on `server`, through `features`' path."""
    add_to_server(InferenceService(features), server, kpb, "GRPCInferenceService")


def parameters(params: Any) -> dict[str, object]:
    """A protocol parameter map as plain values."""
    out: dict[str, object] = {}
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, kind) if kind else None
    return out


def v2_input(request: kpb.ModelInferRequest) -> V2Input:
    """The request's one input tensor, raw or as typed contents."""
    if len(request.inputs) != 1:
        raise InvalidArgument(
            f"send exactly one input (images, pixels or normalized), got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    given = V2Input(tensor.name, tensor.datatype, list(tensor.shape))
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument("raw_input_contents must hold one entry, for the one input")
        given.raw = request.raw_input_contents[0]
    elif tensor.datatype in CONTENTS:
        given.elements = getattr(tensor.contents, CONTENTS[tensor.datatype])
    return given


def check_outputs(request: kpb.ModelInferRequest) -> list[str]:
    for output in request.outputs:
        for key, value in parameters(output.parameters).items():
            if key != "binary_data" and not (key == "classification" and not value):
                raise InvalidArgument(
                    f"output {output.name[:80]!r}: parameter {key[:40]!r} is not served; "
                    "output options go in the request's parameters (pool, normalize, ...)"
                )
    return [output.name for output in request.outputs]


def infer_response(request: kpb.ModelInferRequest, answer: Any) -> kpb.ModelInferResponse:
    response = kpb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version or "1", id=request.id
    )
    for out in outputs_of(answer):
        response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        response.raw_output_contents.append(out.data)
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

    def _model(self, name: str, version: str, context: grpc.aio.ServicerContext) -> Any:
        self.features._allow(name, self.features._visible(context))
        if version not in ("", "1"):
            raise ModelNotFound(f"model {name!r} has one version, '1' (asked for {version[:20]!r})")
        return self.runtime.model(name)

    @rpc
    async def ServerLive(
        self, request: kpb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(
        self, request: kpb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=bool(self.runtime.ready_models()))

    @rpc
    async def ModelReady(
        self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelReadyResponse:
        self.features._allow(request.name, self.features._visible(context))
        ready = self.runtime.status(request.name).ready and request.version in ("", "1")
        return kpb.ModelReadyResponse(ready=ready)

    @rpc
    async def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(
            name="layertap", version=layertap_version(), extensions=EXTENSIONS
        )

    @rpc
    async def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelMetadataResponse:
        loaded = self._model(request.name, request.version, context)
        meta = model_metadata(request.name, loaded.catalog.nodes)
        response = kpb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"]
        )
        for entry in meta["inputs"]:
            response.inputs.add(**entry)
        for entry in meta["outputs"]:
            response.outputs.add(**entry)
        return response

    async def _infer(
        self, request: kpb.ModelInferRequest, visible: Visible
    ) -> kpb.ModelInferResponse:
        """One inference as an Extract; failures raise LayertapError."""
        if isinstance(request, Undecodable):
            raise InvalidArgument(
                f"the request is not a valid ModelInferRequest ({request.reason})"
            )
        self.features._allow(request.model_name, visible)
        self.runtime.model(request.model_name)  # NOT_FOUND / UNAVAILABLE before the inputs
        if request.model_version not in ("", "1"):
            raise ModelNotFound(f"model {request.model_name!r} has one version, '1'")
        given = v2_input(request)
        check_count(given, self.settings.max_images_per_request)
        if given.elements is not None and given.datatype != "BYTES":
            images = await self.features.pipeline.in_pool(images_of, given)  # a list: off loop
        else:
            images = images_of(given)
        extract = extract_request(
            request.model_name, images, check_outputs(request), parameters(request.parameters)
        )
        answer = await self.features._extract(extract, visible)
        return infer_response(request, answer)

    @rpc
    async def ModelInfer(
        self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelInferResponse:
        set_request_deadline(context.time_remaining())  # the batcher tells deadline from cancel
        return await self._infer(request, self.features._visible(context))

    @rpc
    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        set_request_deadline(context.time_remaining())
        visible = self.features._visible(context)  # one token for the whole stream
        room = asyncio.Semaphore(max(1, self.settings.max_stream_in_flight))
        writing = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: Any) -> None:
            try:
                try:
                    reply = kpb.ModelStreamInferResponse(
                        infer_response=await self._infer(request, visible)
                    )
                except LayertapError as exc:
                    reply = kpb.ModelStreamInferResponse(error_message=str(exc)[:MAX_DETAILS])
                    reply.infer_response.id = getattr(request, "id", "")
                async with writing:
                    await context.write(reply)
            finally:
                room.release()

        try:
            async for request in requests:
                await room.acquire()  # hold the reader back while the stream has enough work
                task = asyncio.get_running_loop().create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
