"""The same workload over layertap's KServe v2 endpoints, so the protocols' overhead against
layertap's own API is measured on the same server: v2 gRPC (ModelInfer with the image as a raw
BYTES element, the way tritonclient.grpc sends it) and v2 HTTP (Triton's binary tensor data
extension both ways, the way tritonclient.http sends it by default). GeM of the node, float32."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.loadgen import Call, HttpConnection

HEADER_LENGTH = "Inference-Header-Content-Length"


def framed(image: bytes) -> bytes:
    """One BYTES element in the protocol's raw form: a 4-byte little-endian length first."""
    return len(image).to_bytes(4, "little") + image


def v2_grpc_calls(stub: Any, model: str, node: str, jpegs: list[bytes]) -> Callable[[int], Call]:
    """One shared grpc.aio channel (multiplexed, like AsyncFeatureClient); requests built once."""
    from layertap.kserve.v2 import open_inference_pb2 as kpb

    requests = []
    for jpeg in jpegs:
        request = kpb.ModelInferRequest(
            model_name=model,
            inputs=[
                kpb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1])
            ],
            outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=node)],
            raw_input_contents=[framed(jpeg)],
        )
        request.parameters["pool"].string_param = "gem"
        requests.append(request)
    n = len(requests)

    def make(_: int) -> Call:
        async def call(i: int) -> None:
            reply = await stub.ModelInfer(requests[i % n])
            if not np.frombuffer(reply.raw_output_contents[0], np.float32).size:
                raise RuntimeError("empty descriptor")

        return call

    return make


def v2_http_calls(
    port: int, model: str, node: str, jpegs: list[bytes]
) -> tuple[Callable[[int], Call], list[HttpConnection]]:
    """One keep-alive connection per in-flight request (as for LitServe); bodies built once."""
    bodies = []
    for jpeg in jpegs:
        data = framed(jpeg)
        header = json.dumps({
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                        "parameters": {"binary_data_size": len(data)}}],
            "outputs": [{"name": node, "parameters": {"binary_data": True}}],
            "parameters": {"pool": "gem"},
        }).encode()  # fmt: skip
        bodies.append((header + data, f"{HEADER_LENGTH}: {len(header)}\r\n"))
    conns: list[HttpConnection] = []
    path = f"/v2/models/{model}/infer"
    n = len(bodies)

    def make(_: int) -> Call:
        conn = HttpConnection(port)
        conns.append(conn)

        async def call(i: int) -> None:
            body, extra = bodies[i % n]
            data = await conn.post(path, body, extra)
            start = int(conn.headers[HEADER_LENGTH.lower()])
            if not np.frombuffer(data[start:], np.float32).size:
                raise RuntimeError("empty descriptor")

        return call

    return make, conns
