"""The layertap.v1.FeatureService RPCs, each a few lines: validate (server/requests.py), run
(server/pipeline.py, server/compare.py), answer (server/responses.py). Statuses, request ids,
logs and metrics come from `@rpc` (server/rpc.py). Torch-free: the pipeline is handed in.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from layertap.common.options import OUTPUT_DTYPES, POOL_NAMES
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

from .batching import set_request_deadline
from .errors import Disabled
from .fairness import Client, identify
from .metrics import layertap_version
from .requests import extract_job, parameter_request
from .responses import (
    check_message_size,
    describe_response,
    extract_response,
    model_info_pb,
    stream_item_size,
)
from .rpc import MAX_DETAILS, REQUEST_ID, rpc, status_for
from .security import bearer_token, model_access
from .settings import Settings, default_batch_size
from .stream import StreamSession

if TYPE_CHECKING:
    from .pipeline import Pipeline

Compare = Callable[[pb.CompareRequest], Awaitable[pb.CompareResponse]]
Visible = frozenset[str] | None  # the models a caller's token may use; None: every model
GET_PARAMETERS_OFF = (
    "GetParameters is turned off on this server (setting get_parameters = false): it does not "
    "hand out model weights; ask its operator, or use DescribeModel for the modules and shapes"
)


class FeatureService(pb_grpc.FeatureServiceServicer):
    """The layertap.v1.FeatureService implementation."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        compare: Compare,
        image_formats: tuple[str, ...],
        input_dtypes: tuple[str, ...],
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.runtime = pipeline.runtime
        self.metrics = pipeline.metrics
        self.heads = pipeline.heads
        self._compare = compare
        self._image_formats = image_formats
        self._input_dtypes = input_dtypes
        self._access = model_access(settings)  # auth_tokens entries may name their models
        self._weights = {t: e.weight for t, e in settings.token_entries().items()}

    def identify(self, context: grpc.aio.ServicerContext) -> Client:
        """Who a call is from, for fair queuing: its token, else its connection."""
        token = bearer_token(context.invocation_metadata())
        return identify(token, str(context.peer() or ""), self._weights)

    def _visible(self, context: grpc.aio.ServicerContext) -> Visible:
        return self._access.visible(context.invocation_metadata())

    def _names(self, visible: Visible) -> list[str]:
        names = self.runtime.names()
        return names if visible is None else [n for n in names if n in visible]

    def _allow(self, model: str, visible: Visible) -> None:
        """NOT_FOUND for a model outside the caller's token's models, with the same message as
        a model that is not configured (listing only the caller's): a scoped token learns
        nothing about the other models, not even that they exist."""
        if visible is not None and model and model not in visible:
            raise self.runtime.not_found(model, visible)

    @rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        names = self._names(self._visible(context))
        models = [model_info_pb(self.runtime.status(n)) for n in names]
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
        visible = self._visible(context)
        methods = [m.name for m in service.methods]
        if not self.settings.get_parameters:
            methods.remove("GetParameters")
        return pb.GetServerInfoResponse(
            server_version=layertap_version(),
            limits=self._limits(),
            image_formats=list(self._image_formats),
            input_dtypes=list(self._input_dtypes),
            pools=[pb.Pooling.Name(k) for k in sorted(POOL_NAMES)],
            output_dtypes=list(OUTPUT_DTYPES),
            models=self._names(visible),
            devices=list(self.pipeline.batcher.devices) or [str(self.runtime.device)],
            methods=methods,
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
                if visible is None or not h.model or h.model in visible
            ],
        )

    @rpc
    async def GetParameters(
        self, request: pb.GetParametersRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetParametersResponse:
        if not self.settings.get_parameters:
            raise Disabled(GET_PARAMETERS_OFF)
        self._allow(request.model, self._visible(context))
        self.runtime.model(request.model)  # NOT_FOUND / UNAVAILABLE first
        names, dtype = parameter_request(request)
        encoded = await self.pipeline.parameters(request.model, names, dtype)
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
    async def DescribeModel(
        self, request: pb.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeModelResponse:
        self._allow(request.model, self._visible(context))
        loaded = self.runtime.model(request.model)
        return describe_response(
            self.runtime.status(request.model),
            loaded.catalog.nodes,
            loaded.modules,
            loaded.catalog.mode,
            loaded.catalog.reason,
        )

    @rpc
    async def Extract(
        self, request: pb.ExtractRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExtractResponse:
        set_request_deadline(context.time_remaining())  # the batcher tells deadline from cancel
        return await self._extract(request, self._visible(context))

    @rpc
    async def ExtractStream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        # items inherit it: the batcher tells a passed stream deadline from a cancel
        set_request_deadline(context.time_remaining())
        visible = self._visible(context)  # one token for the whole stream

        def extract(request: pb.ExtractRequest, item_id: str) -> Awaitable[pb.ExtractResponse]:
            return self._extract(request, visible, item_id)

        session = StreamSession(
            requests,
            context.write,
            extract,
            status_for,
            self.settings.max_stream_in_flight,
            self.metrics,
            REQUEST_ID.get(),
            MAX_DETAILS,
        )
        await session.run()

    @rpc
    async def Compare(
        self, request: pb.CompareRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompareResponse:
        set_request_deadline(context.time_remaining())  # the batcher tells deadline from cancel
        self._allow(request.model, self._visible(context))
        return await self._compare(request)  # server/compare.py

    async def _extract(
        self, request: pb.ExtractRequest, visible: Visible, item_id: str | None = None
    ) -> pb.ExtractResponse:
        """The whole of one Extract, shared by the unary RPC and each ExtractStream item
        (`item_id`: its answer is sent inside an ExtractStreamResponse with that id, which the
        size check counts); failures raise LayertapError (mapped by the caller)."""
        received = time.perf_counter()
        self._allow(request.model, visible)
        weights = self.runtime.model(request.model).weights  # NOT_FOUND / UNAVAILABLE first
        job = extract_job(request, self.settings, self.runtime, self.heads)
        done = await self.pipeline.extract(job)
        answer = extract_response(
            job, done, weights.sha256, weights.preprocessing, received, str(self.runtime.device)
        )
        sent = answer.size if item_id is None else stream_item_size(item_id, answer.size)
        check_message_size(sent, self.settings.max_message_bytes)
        return answer.message
