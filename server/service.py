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
from .metrics import layertap_version
from .requests import extract_job, parameter_request
from .responses import describe_response, extract_response, model_info_pb
from .rpc import MAX_DETAILS, REQUEST_ID, rpc, status_for
from .settings import Settings, default_batch_size
from .stream import StreamSession

if TYPE_CHECKING:
    from .pipeline import Pipeline

Compare = Callable[[pb.CompareRequest], Awaitable[pb.CompareResponse]]


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

    @rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = [model_info_pb(self.runtime.status(n)) for n in self.runtime.names()]
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
            image_formats=list(self._image_formats),
            input_dtypes=list(self._input_dtypes),
            pools=[pb.Pooling.Name(k) for k in sorted(POOL_NAMES)],
            output_dtypes=list(OUTPUT_DTYPES),
            models=self.runtime.names(),
            devices=list(self.pipeline.batcher.devices) or [str(self.runtime.device)],
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
        return await self._extract(request)

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
            REQUEST_ID.get(),
            MAX_DETAILS,
        )
        await session.run()

    @rpc
    async def Compare(
        self, request: pb.CompareRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompareResponse:
        set_request_deadline(context.time_remaining())  # the batcher tells deadline from cancel
        return await self._compare(request)  # server/compare.py

    async def _extract(self, request: pb.ExtractRequest) -> pb.ExtractResponse:
        """The whole of one Extract, shared by the unary RPC and each ExtractStream item;
        failures raise LayertapError (mapped by the caller)."""
        received = time.perf_counter()
        weights = self.runtime.model(request.model).weights  # NOT_FOUND / UNAVAILABLE first
        job = extract_job(request, self.settings, self.runtime, self.heads)
        done = await self.pipeline.extract(job)
        return extract_response(
            job, done, weights.sha256, weights.preprocessing, received, str(self.runtime.device)
        )
