"""KServe v2 / Open Inference Protocol over gRPC, served on the layertap port: called here with
layertap's own generated v2 stubs (the real tritonclient is tests/test_kserve_clients.py).
Every input form and the output options give the same bytes as layertap's Extract for the same
image; bad requests get precise statuses with layertap's messages, never INTERNAL, and the
server answers the next call; streams answer each inference; tokens and metrics apply."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import MOBILENET, RunningServer, photo, requests_counted, serving, start_server

from layertap.client import FeatureClient
from layertap.kserve.v2 import open_inference_pb2 as kpb
from layertap.kserve.v2 import open_inference_pb2_grpc as kpb_grpc
from layertap.server.settings import Settings

NODE = "features.18"
Tensor = kpb.ModelInferRequest.InferInputTensor
Wanted = kpb.ModelInferRequest.InferRequestedOutputTensor


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serving(Settings(port=0, models=(MOBILENET,))) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> kpb_grpc.GRPCInferenceServiceStub:
    return kpb_grpc.GRPCInferenceServiceStub(server.channel())


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(photo("astronaut")).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def framed(*elements: bytes) -> bytes:
    """BYTES elements in the protocol's raw form: a 4-byte little-endian length before each."""
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def infer_request(
    name: str,
    datatype: str,
    shape: list[int],
    raw: bytes | None = None,
    outputs: tuple[str, ...] = (NODE,),
    **parameters: Any,
) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(
        model_name="m",
        id="req-1",
        inputs=[Tensor(name=name, datatype=datatype, shape=shape)],
        outputs=[Wanted(name=o) for o in outputs],
    )
    if raw is not None:
        request.raw_input_contents.append(raw)
    for key, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}
        setattr(request.parameters[key], field[type(value)], value)
    return request


def as_array(response: kpb.ModelInferResponse, index: int = 0) -> np.ndarray:
    out = response.outputs[index]
    dtype = {"FP32": "<f4", "INT8": "i1", "FP16": "<f2"}[out.datatype]
    return np.frombuffer(response.raw_output_contents[index], dtype).reshape(list(out.shape))


def reference(server: RunningServer, images: list[Any], **options: Any) -> np.ndarray:
    with FeatureClient(server.target) as client:
        got = client.extract(images, model="m", nodes=NODE, **options)
    return np.ascontiguousarray(got[next(iter(got))])


def test_health_and_metadata(server: RunningServer, stub: Any) -> None:
    assert stub.ServerLive(kpb.ServerLiveRequest()).live
    assert stub.ServerReady(kpb.ServerReadyRequest()).ready
    assert stub.ModelReady(kpb.ModelReadyRequest(name="m")).ready
    assert not stub.ModelReady(kpb.ModelReadyRequest(name="m", version="2")).ready
    meta = stub.ServerMetadata(kpb.ServerMetadataRequest())
    assert meta.name == "layertap" and "model_stream_infer" in meta.extensions
    md = stub.ModelMetadata(kpb.ModelMetadataRequest(name="m"))
    assert [(i.name, i.datatype, list(i.shape)) for i in md.inputs] == [
        ("images", "BYTES", [-1]),
        ("pixels", "UINT8", [-1, -1, -1, 3]),
        ("normalized", "FP32", [-1, 3, -1, -1]),
    ]
    shapes = {o.name: list(o.shape) for o in md.outputs}
    assert shapes[NODE] == [-1, 1280, 7, 7]  # what a raw ModelInfer of one image returns
    raw = stub.ModelInfer(infer_request("images", "BYTES", [1], framed(photo_jpeg(server))))
    assert list(raw.outputs[0].shape) == [1, 1280, 7, 7]


def photo_jpeg(server: RunningServer) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(photo("coffee")).save(buf, "JPEG")
    return buf.getvalue()


def test_encoded_images_raw_and_typed_contents(
    server: RunningServer, stub: Any, jpeg: bytes
) -> None:
    want = reference(server, [jpeg, jpeg], pool="gem", normalize=True)
    raw = stub.ModelInfer(
        infer_request("images", "BYTES", [2], framed(jpeg, jpeg), pool="gem", normalize=True)
    )
    assert raw.id == "req-1" and raw.model_name == "m" and raw.outputs[0].name == NODE
    assert raw.outputs[0].datatype == "FP32" and list(raw.outputs[0].shape) == [2, 1280]
    assert as_array(raw).tobytes() == want.tobytes()
    typed = infer_request("images", "BYTES", [2], pool="gem", normalize=True)
    typed.inputs[0].contents.bytes_contents.extend([jpeg, jpeg])
    assert as_array(stub.ModelInfer(typed)).tobytes() == want.tobytes()


def test_pixels_and_normalized_inputs(server: RunningServer, stub: Any) -> None:
    pixels = photo("chelsea")[:200, :240].copy()  # uint8 [H, W, 3]
    want = reference(server, [pixels], pool="avg")
    raw = infer_request("pixels", "UINT8", [1, *pixels.shape], pixels.tobytes(), pool="avg")
    assert as_array(stub.ModelInfer(raw)).tobytes() == want.tobytes()
    listed = infer_request("pixels", "UINT8", [1, *pixels.shape], pool="avg")
    listed.inputs[0].contents.uint_contents.extend(pixels.ravel().tolist())
    assert as_array(stub.ModelInfer(listed)).tobytes() == want.tobytes()

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = reference(server, [x[0]], pool="max")
    raw = infer_request("normalized", "FP32", list(x.shape), x.tobytes(), pool="max")
    assert as_array(stub.ModelInfer(raw)).tobytes() == want.tobytes()


def test_every_option_rides_in_parameters(server: RunningServer, stub: Any, jpeg: bytes) -> None:
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"pool": "gem", "gem_p": 4.0, "normalize": True, "dtype": "int8"},
         {"pool": "gem", "gem_p": 4.0, "normalize": True, "dtype": "int8"}),
        ({"pool": "rmac", "rmac_levels": 2, "post": "power:0.5,l2"},
         {"pool": "rmac", "rmac_levels": 2, "post": ["power:0.5", "l2"]}),
        ({"pool": "avg", "tta": '{"flip": true, "scales": [1, 0.75]}', "dtype": "float16"},
         {"pool": "avg", "tta": {"flip": True, "scales": [1, 0.75]}, "dtype": "float16"}),
        ({"pool": "gem", "post": '[{"op": "l2"}]', "priority": "low", "bypass_result_cache": True},
         {"pool": "gem", "post": [{"op": "l2"}], "priority": "low"}),
    ]  # fmt: skip
    for params, options in cases:
        want = reference(server, [jpeg], **options)
        got = stub.ModelInfer(infer_request("images", "BYTES", [1], framed(jpeg), **params))
        assert as_array(got).tobytes() == want.tobytes(), params
    concat = stub.ModelInfer(
        infer_request(
            "images", "BYTES", [1], framed(jpeg), ("features.14", NODE), pool="gem", concat=True
        )
    )
    assert [o.name for o in concat.outputs] == ["descriptor"]
    assert list(concat.outputs[0].shape) == [1, 160 + 1280]


def one_image(raw: bytes = b"\x01\0\0\0x", outputs: tuple[str, ...] = (NODE,), **p: Any) -> Any:
    return infer_request("images", "BYTES", [1], raw, outputs, **p)


BAD: list[tuple[str, kpb.ModelInferRequest, str]] = [  # each is INVALID_ARGUMENT
    ("datatype", infer_request("images", "FP32", [1], b"\0" * 4), "must be BYTES"),
    ("rank", infer_request("pixels", "UINT8", [2, 2, 3], b"\0" * 12), "shape [N, *, *, 3]"),
    (
        "bytes vs shape",
        infer_request("pixels", "UINT8", [1, 4, 4, 3], b"\0" * 47),
        "needs 48 bytes",
    ),
    ("count vs shape", infer_request("images", "BYTES", [2], framed(b"x")), "holds 1 element"),
    ("cut length", one_image(b"\x10\0\0\0abc"), "says 16 bytes"),
    ("not an image", one_image(framed(b"not an image")), "image 0"),
    ("unknown input", infer_request("img", "BYTES", [1], framed(b"x")), "unknown input 'img'"),
    ("unknown output", one_image(outputs=("no.such",)), "no.such"),
    ("no output", one_image(outputs=()), "name at least one output"),
    ("unknown parameter", one_image(pooling="gem"), "'pooling'"),
    ("mistyped parameter", one_image(normalize="yes"), "must be a bool"),
    ("bad pool", one_image(pool="median"), "unknown pool 'median'"),
    ("int8 unnormalised", one_image(pool="gem", dtype="int8"), "normalize"),
    ("sequence", one_image(sequence_id=7), "stateless"),
    ("listed values", infer_request("pixels", "UINT8", [1, 1, 1, 3]), "needs 3 values"),
]


@pytest.mark.parametrize(("case", "request_", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_precise_statuses(
    server: RunningServer, stub: Any, jpeg: bytes, case: str, request_: Any, words: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert words in info.value.details()
    ok = stub.ModelInfer(infer_request("images", "BYTES", [1], framed(jpeg), pool="gem"))
    assert list(ok.outputs[0].shape) == [1, 1280]  # the server goes on


def test_unknown_model_version_and_bytes(server: RunningServer, stub: Any) -> None:
    for request in (
        kpb.ModelInferRequest(model_name="nope"),
        kpb.ModelInferRequest(model_name="m", model_version="3"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(kpb.ModelMetadataRequest(name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "available: m" in info.value.details()
    garbage = server.channel().unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as info:
        garbage(b"\xff\xff\xff")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_answers_each_inference(server: RunningServer, stub: Any, jpeg: bytes) -> None:
    requests = []
    for i in range(5):
        request = infer_request("images", "BYTES", [1], framed(jpeg), pool="gem")
        request.id = f"item-{i}"
        requests.append(request)
    requests[2] = infer_request("images", "BYTES", [1], framed(b"junk"), pool="gem")
    requests[2].id = "bad"
    answers = list(stub.ModelStreamInfer(iter(requests), timeout=120))
    assert len(answers) == 5
    by_id = {a.infer_response.id: a for a in answers}
    assert set(by_id) == {"item-0", "item-1", "bad", "item-3", "item-4"}
    assert "image 0" in by_id["bad"].error_message
    want = reference(server, [jpeg], pool="gem")
    for i in (0, 1, 3, 4):  # items batch together: equal up to float rounding across batch sizes
        assert not by_id[f"item-{i}"].error_message
        got = as_array(by_id[f"item-{i}"].infer_response)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tokens_and_metrics_apply(jpeg: bytes) -> None:
    running = start_server(Settings(port=0, models=(MOBILENET,), auth_tokens="s3cret"))
    try:
        v2 = kpb_grpc.GRPCInferenceServiceStub(running.channel())
        request = infer_request("images", "BYTES", [1], framed(jpeg), pool="gem")
        refusals = [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer nope"),), grpc.StatusCode.PERMISSION_DENIED),
        ]
        for metadata, code in refusals:
            with pytest.raises(grpc.RpcError) as info:
                v2.ModelInfer(request, metadata=metadata)
            assert info.value.code() == code
        good = (("authorization", "Bearer s3cret"), ("x-request-id", "v2-abc"))
        reply, call = v2.ModelInfer.with_call(request, metadata=good)
        assert list(reply.outputs[0].shape) == [1, 1280]
        assert ("x-request-id", "v2-abc") in call.trailing_metadata()
        counted = requests_counted(running.server.metrics_port)
        assert counted[("ModelInfer", "OK")] == 1
    finally:
        running.stop()


def test_too_many_images_are_refused_before_any_is_read(stub: Any) -> None:
    for request in (
        infer_request("images", "BYTES", [10**6], framed(b"x")),
        infer_request("pixels", "UINT8", [10**6, 2, 2, 3], b"\0" * 12),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_images_per_request=64" in info.value.details()
