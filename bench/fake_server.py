"""A layertap.v1 server without a model, for measuring the client side of bulk runs at scale
(bench/index_scale.py): it answers Extract and ExtractStream with a deterministic vector per
image (a hash of its bytes), so a run's output can be compared row by row with another run's,
at thousands of items per second.

    python -m bench.fake_server --port 50099 --dim 256
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

MODEL = "fake"
NODE = "feat"


def vector(seed: bytes, dim: int) -> bytes:
    """dim float32 values drawn from a generator seeded by a hash of `seed`: the same on every
    run, and as incompressible as real descriptors (so output sizes are realistic)."""
    digest = hashlib.blake2b(seed, digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return rng.standard_normal(dim, dtype=np.float32).astype("<f4").tobytes()


class FakeService(pb_grpc.FeatureServiceServicer):
    def __init__(self, dim: int) -> None:
        self.dim = dim

    def _answer(self, request: pb.ExtractRequest) -> pb.ExtractResponse:
        keys = [request.aliases.get(n, n) for n in request.nodes] or [NODE]
        results = []
        for image in request.images:
            data = vector(image.encoded or image.tensor.data, self.dim)
            tensor = pb.Tensor(dtype="float32", shape=[self.dim], data=data)
            results.append(
                pb.ImageResult(
                    outputs=[pb.NamedTensor(key=k, node=NODE, tensor=tensor) for k in keys]
                )
            )
        resolved = [pb.ResolvedNode(key=k, requested=k, node=NODE) for k in keys]
        metadata = pb.ExtractMetadata(model=request.model, weights_sha256="fake", nodes=resolved)
        return pb.ExtractResponse(results=results, metadata=metadata)

    async def ListModels(self, request: Any, context: Any) -> pb.ListModelsResponse:
        info = pb.ModelInfo(name=MODEL, architecture="fake", ready=True, input_size=[32, 32])
        return pb.ListModelsResponse(models=[info], server_version="fake")

    async def Extract(self, request: pb.ExtractRequest, context: Any) -> pb.ExtractResponse:
        return self._answer(request)

    async def ExtractStream(
        self, requests: AsyncIterator[pb.ExtractStreamRequest], context: Any
    ) -> AsyncIterator[pb.ExtractStreamResponse]:
        async for item in requests:
            answer = self._answer(item.request)
            yield pb.ExtractStreamResponse(id=item.id, response=answer)


async def serve(port: int, dim: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
    )
    pb_grpc.add_FeatureServiceServicer_to_server(FakeService(dim), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"fake layertap on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.dim))


if __name__ == "__main__":
    main()
